//! Amounts of the five scheduled resources, as measured (`telemetry`) and
//! kept in the shared state (`node::Shared`). A leaf: imports nothing from
//! the crate.

/// Amounts of the five scheduled resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub network_mbps: u64,
    /// Disk read+write rate in KiB/s.
    pub disk_io_kbps: u64,
}
