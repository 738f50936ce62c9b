//! Revoked tenant and node certificates: `DATA_DIR/revoked-certs`, one
//! certificate serial (lower-case hex) per line, `#` starts a comment.
//! `cloud-manager tenant revoke` and `node revoke` append to it; the manager reads it again whenever its
//! size or modification time changed (one `stat` per check), so a
//! revocation holds from the next TLS handshake on, without a restart.
//! A file that cannot be read keeps the last list read (and is logged):
//! a revocation is never undone by a read error.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// File name of the list in the data dir.
pub const FILE: &str = "revoked-certs";

#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    stamp: Option<(SystemTime, u64)>,
    serials: HashSet<String>,
}

impl Revocations {
    pub fn new(data_dir: &Path) -> Self {
        Revocations {
            path: data_dir.join(FILE),
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Whether the certificate with serial `serial` (hex) is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()));
        if stamp != cache.stamp {
            match std::fs::read_to_string(&self.path) {
                Ok(text) => {
                    cache.serials = parse(&text);
                    cache.stamp = stamp;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Removed on purpose by the operator: nothing revoked.
                    cache.serials.clear();
                    cache.stamp = None;
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot read the revocation list; keeping the last one read");
                }
            }
        }
        cache.serials.contains(&normalize(serial))
    }
}

/// The serials of a revocation list.
fn parse(text: &str) -> HashSet<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(normalize)
        .collect()
}

/// Lower-case hex without separators (`AB:01` and `ab01` are one serial).
pub fn normalize(serial: &str) -> String {
    serial
        .chars()
        .filter(|c| !matches!(c, ':' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

/// Whether `s` is a usable serial: 1 to 40 bytes of hex.
pub fn valid_serial(s: &str) -> bool {
    let n = normalize(s);
    !n.is_empty() && n.len() <= 80 && n.len() % 2 == 0 && n.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Appends `serial` (with a comment) to the list in `data_dir`. Returns
/// false when it was already there.
pub fn revoke(data_dir: &Path, serial: &str, comment: &str) -> std::io::Result<bool> {
    use std::io::Write;
    let path = data_dir.join(FILE);
    let serial = normalize(serial);
    let existing = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    if parse(&existing).contains(&serial) {
        return Ok(false);
    }
    let comment: String = comment.chars().filter(|c| !c.is_control()).collect();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    // One write of a whole line: a reader never sees half a serial.
    file.write_all(format!("{serial} # {comment}\n").as_bytes())?;
    file.sync_all()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_serial_holds_from_the_next_check() {
        let dir = tempfile::tempdir().unwrap();
        let r = Revocations::new(dir.path());
        assert!(!r.is_revoked("ab01"));
        assert!(revoke(dir.path(), "AB:01", "tenant t user u").unwrap());
        assert!(!revoke(dir.path(), "ab01", "again").unwrap());
        assert!(r.is_revoked("ab01"));
        assert!(!r.is_revoked("ab02"));
        revoke(dir.path(), "cd", "second").unwrap();
        assert!(r.is_revoked("cd") && r.is_revoked("ab01"));
        let text = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
    }

    #[test]
    fn serials_are_checked() {
        assert!(valid_serial("0a:1B"));
        assert!(!valid_serial(""));
        assert!(!valid_serial("abc"));
        assert!(!valid_serial("zz"));
        assert!(!valid_serial(&"ab".repeat(41)));
    }
}
