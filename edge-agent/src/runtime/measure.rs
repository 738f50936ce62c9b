//! The runtime's one way out for per-app usage: [`Runtime::app_usage`].
//!
//! The offload scheduler (`crate::offload::meter`) measures the apps only
//! through this function, so where the figures come from (today the apps'
//! cgroups, or their process trees under `/proc` when there are none, and
//! their directories) is the runtime's business alone: changing the source
//! changes the runtime, never the scheduler.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Runtime, usage::process_tree};

/// What one app uses, in the runtime's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeasuredUsage {
    /// Thousandths of one core.
    pub cpu_millis: u64,
    /// Resident memory.
    pub memory_mb: u64,
    /// Bytes held by the files below the app's working directory.
    pub disk_bytes: u64,
    /// Disk reads plus writes, bytes per second.
    pub disk_io_bytes_per_sec: u64,
    /// Bytes the app moved through sockets since it started (a counter:
    /// the caller takes the rate). 0 unless asked for.
    pub socket_bytes: u64,
}

impl Runtime {
    /// The usage of every app that has a process (starting, running or
    /// stopping), by name. `socket_bytes` asks for the per-app socket
    /// counter too, which costs a read of `/proc/<pid>/io` per process.
    pub fn app_usage(&self, socket_bytes: bool) -> BTreeMap<String, MeasuredUsage> {
        self.status()
            .into_iter()
            .filter_map(|s| {
                let pid = s.pid?;
                let usage = MeasuredUsage {
                    cpu_millis: s.usage.cpu_millis,
                    memory_mb: s.usage.memory_mb,
                    // The agent's record of the app and, when sandboxed,
                    // its working directory elsewhere.
                    disk_bytes: self.app_dirs(&s.name).iter().map(|d| dir_bytes(d)).sum(),
                    disk_io_bytes_per_sec: s.usage.disk_read_bytes_per_sec
                        + s.usage.disk_write_bytes_per_sec,
                    socket_bytes: if socket_bytes { sockets(pid) } else { 0 },
                };
                Some((s.name, usage))
            })
            .collect()
    }
}

/// Per-app network accounting from /proc: bytes through read/write calls
/// (rchar + wchar) minus bytes that hit storage (read_bytes + write_bytes),
/// summed over the app's process group.
fn sockets(pgid: u32) -> u64 {
    // The app leads its process group: its own process tree, not a walk of
    // every process on the machine.
    let mut total = 0u64;
    for pid in process_tree(pgid) {
        let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) else {
            continue;
        };
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let chars = field("rchar:") + field("wchar:");
        let disk = field("read_bytes:") + field("write_bytes:");
        total += chars.saturating_sub(disk);
    }
    total
}

/// Bytes used by the files below `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}
