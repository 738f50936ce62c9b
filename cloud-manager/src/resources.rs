//! The one amount-of-resources type of the manager's domain (capacity,
//! usage, requests). A leaf module: pools, the partitioner and the records
//! all use it without importing each other. Converted from and to the
//! proto's `Resources` in `convert.rs` only.

use serde::{Deserialize, Serialize};

/// Amounts of the five scheduled resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub network_mbps: u64,
    /// Disk read+write rate in KiB/s (capacity or usage).
    #[serde(default)]
    pub disk_io_kbps: u64,
}
