//! Sealing of the rows that hold private keys, in the shared store (etcd)
//! and in the embedded one (`state.redb`): ChaCha20-Poly1305 with a 256-bit key
//! that lives only in the managers' data dirs (`DATA_DIR/store.key`, 0600,
//! made on first use; every manager on one etcd prefix needs the same file,
//! copied like `ca.key`). The store key names the row (the AEAD's
//! associated data), so a sealed row cannot be moved to another key; a
//! fresh random nonce is drawn per write.
//!
//! Sealed value: `EPS1` | nonce (12 bytes) | ciphertext and tag.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const MAGIC: &[u8] = b"EPS1";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {why}")]
    KeyFile { path: PathBuf, why: String },
    #[error("row {0} is not sealed (was it written without encryption?)")]
    NotSealed(String),
    #[error(
        "row {0} cannot be opened with this manager's store.key (another key sealed it: copy the store.key of the managers that share this prefix into this data dir)"
    )]
    WrongKey(String),
}

pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// Reads `DATA_DIR/store.key`, or makes it (0600) when it is missing.
    pub fn load_or_create(data_dir: &Path) -> Result<Sealer, SealError> {
        let path = data_dir.join("store.key");
        let bad = |why: String| SealError::KeyFile {
            path: path.clone(),
            why,
        };
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                crate::random::fill(&mut key);
                let hex = edgepool_common::identity::hex(&key);
                edgepool_common::fsutil::write_private(&path, format!("{hex}\n").as_bytes())
                    .map_err(|e| bad(format!("cannot write: {e}")))?;
                tracing::info!(path = %path.display(), "made a new store key (copy it to every manager that shares this store)");
                hex.into_bytes()
            }
            Err(e) => return Err(bad(format!("cannot read: {e}"))),
        };
        let text = String::from_utf8_lossy(&bytes);
        let key = parse_hex(text.trim())
            .filter(|k| k.len() == 32)
            .ok_or_else(|| bad("must hold 64 hex digits (a 256-bit key)".into()))?;
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &key)
            .map_err(|_| bad("not a usable key".into()))?;
        Ok(Sealer {
            key: LessSafeKey::new(unbound),
        })
    }

    /// Seals `plain` as the value of store key `name`.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::random::fill(&mut nonce);
        let mut body = plain.to_vec();
        // Sealing in place cannot fail for a buffer of this size.
        if self
            .key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .is_err()
        {
            body.clear();
        }
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out
    }

    /// Opens the value of store key `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let rest = sealed
            .strip_prefix(MAGIC)
            .filter(|r| r.len() >= NONCE_LEN)
            .ok_or_else(|| SealError::NotSealed(name.to_string()))?;
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| SealError::NotSealed(name.to_string()))?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut body)
            .map_err(|_| SealError::WrongKey(name.to_string()))?;
        Ok(plain.to_vec())
    }
}

/// Whether `value` is a sealed value (by its magic; says nothing of
/// which key sealed it).
pub fn is_sealed(value: &[u8]) -> bool {
    value.len() >= MAGIC.len() + NONCE_LEN && value.starts_with(MAGIC)
}

fn parse_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_row_opens_only_under_its_name_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::load_or_create(dir.path()).unwrap();
        let sealed = s.seal("/e/pools/t/p", b"secret key");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.open("/e/pools/t/p", &sealed).unwrap(), b"secret key");
        // Another row's name, a flipped bit, a plain row: refused.
        assert!(matches!(
            s.open("/e/pools/t/q", &sealed),
            Err(SealError::WrongKey(_))
        ));
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(s.open("/e/pools/t/p", &flipped).is_err());
        assert!(matches!(
            s.open("/e/pools/t/p", b"{}"),
            Err(SealError::NotSealed(_))
        ));
        // The same file gives the same key; another dir another key.
        let again = Sealer::load_or_create(dir.path()).unwrap();
        assert_eq!(again.open("/e/pools/t/p", &sealed).unwrap(), b"secret key");
        let other = tempfile::tempdir().unwrap();
        let stranger = Sealer::load_or_create(other.path()).unwrap();
        assert!(stranger.open("/e/pools/t/p", &sealed).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("store.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
