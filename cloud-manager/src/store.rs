//! Persistence of the manager's registry.
//!
//! `Store` is the one seam to the storage backend. The embedded default,
//! `FileStore`, keeps the whole registry as one JSON document in the data
//! directory, replaced atomically (temp file, fsync, rename) on every
//! change: no server to install, and a crash at any point leaves either the
//! old or the new registry. It only writes on durable changes (tokens,
//! enrollments, a changed hello), never per telemetry sample.

use std::path::{Path, PathBuf};

use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
}

pub trait Store: Send + Sync + 'static {
    /// The saved registry, or an empty one on first start.
    fn load(&self) -> Result<Registry, StoreError>;
    /// Durably replaces the saved registry.
    fn save(&self, registry: &Registry) -> Result<(), StoreError>;
}

pub struct FileStore {
    path: PathBuf,
}

impl FileStore {
    pub fn new(data_dir: &Path) -> Self {
        FileStore {
            path: data_dir.join("state.json"),
        }
    }
}

impl Store for FileStore {
    fn load(&self) -> Result<Registry, StoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                why: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(source) => Err(StoreError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn save(&self, registry: &Registry) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(registry).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        // 0600: the registry holds token hashes and tenant data.
        edgepool_common::fsutil::write_private(&self.path, &bytes).map_err(|source| {
            StoreError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert_eq!(store.load().unwrap(), Registry::default());
        let mut r = Registry::default();
        r.add_token(
            "ept_x",
            crate::registry::TokenRecord {
                tenant: "t".into(),
                labels: Default::default(),
                created_at_ms: 1,
                expires_at_ms: u64::MAX / 2,
                used_by: None,
            },
            0,
        );
        store.save(&r).unwrap();
        assert_eq!(store.load().unwrap(), r);
    }

    #[test]
    fn corrupt_file_is_an_error_not_an_empty_registry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(matches!(
            FileStore::new(dir.path()).load(),
            Err(StoreError::Corrupt { .. })
        ));
    }
}
