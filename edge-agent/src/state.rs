//! The node's identity on disk, in the data directory:
//! `node.key` (0600, made here, never sent anywhere), `node.pem` (signed by
//! the manager), `ca.pem` (the root CA) and `node.json` (who we are and where
//! the manager is).

use std::path::{Path, PathBuf};

use edgepool_common::fsutil::{write_private, write_public};
use edgepool_common::tls;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub tenant: String,
    pub trust_domain: String,
    /// Manager address used at join time.
    pub manager: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no enrolled node: run `edge-agent join` first")]
    NotEnrolled(PathBuf),
    #[error("{path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

#[derive(Clone, Debug)]
pub struct DataDir {
    pub dir: PathBuf,
}

impl DataDir {
    pub fn new(dir: &Path) -> Self {
        DataDir {
            dir: dir.to_path_buf(),
        }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("node.pem")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn info(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    pub fn is_enrolled(&self) -> bool {
        self.info().exists() && self.cert().exists() && self.key().exists()
    }

    pub fn create(&self) -> Result<(), StateError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })
    }

    /// Saves a completed enrollment. The key is written first so that a
    /// crash never leaves a certificate without its key; `node.json` last
    /// marks the enrollment complete.
    pub fn save(
        &self,
        key_pem: &str,
        cert_pem: &str,
        ca_pem: &str,
        info: &NodeInfo,
    ) -> Result<(), StateError> {
        self.write(&self.key(), key_pem.as_bytes(), true)?;
        self.write(&self.cert(), cert_pem.as_bytes(), false)?;
        self.write(&self.ca(), ca_pem.as_bytes(), false)?;
        let json = serde_json::to_vec_pretty(info).map_err(|e| StateError::Corrupt {
            path: self.info(),
            why: e.to_string(),
        })?;
        self.write(&self.info(), &json, false)
    }

    pub fn load_info(&self) -> Result<NodeInfo, StateError> {
        if !self.is_enrolled() {
            return Err(StateError::NotEnrolled(self.dir.clone()));
        }
        let bytes = std::fs::read(self.info()).map_err(|source| StateError::Io {
            path: self.info(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: self.info(),
            why: e.to_string(),
        })
    }

    fn write(&self, path: &Path, bytes: &[u8], private: bool) -> Result<(), StateError> {
        let r = if private {
            write_private(path, bytes)
        } else {
            write_public(path, bytes)
        };
        r.map_err(|source| StateError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
