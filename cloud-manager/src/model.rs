//! Domain types of the manager. No prost or tonic here: the transport
//! module converts (see `convert.rs`).

use serde::{Deserialize, Serialize};

/// Amounts of the four scheduled resources.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub network_mbps: u64,
}

/// Lifecycle state of a node (see `NodeState` in the proto).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    #[default]
    Free,
    Member,
    Suspect,
    Failed,
    Fenced,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStat {
    pub mount_point: String,
    pub file_system: String,
    pub total_mb: u64,
    pub used_mb: u64,
    pub read_bytes_per_sec: u64,
    pub write_bytes_per_sec: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStat {
    pub name: String,
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
    pub link_mbps: u64,
}

/// One telemetry sample from an agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub usage: Resources,
    pub cpu_percent: f64,
    pub disks: Vec<DiskStat>,
    pub interfaces: Vec<InterfaceStat>,
}

/// What an agent says about itself when its stream opens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hello {
    pub agent_version: String,
    pub peer_address: String,
    pub capacity: Resources,
    pub hostname: String,
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
