//! Domain types of the manager. No prost or tonic here: the transport
//! module converts (see `convert.rs`).

use serde::{Deserialize, Serialize};

pub use crate::resources::Resources;

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

/// A member as an agent needs to know it (membership pushed to every member).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberView {
    pub slot: u32,
    pub node_id: String,
    pub cert_pem: String,
    pub cert_serial: String,
    pub cert_not_after_ms: u64,
    pub generation: u64,
    pub peer_address: String,
}

/// The whole desired state of one node: its pool slot, its group of apps,
/// its member certificate and the membership. An empty `pool` means the
/// node is not a member and runs nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeAssignment {
    pub pool: String,
    pub slot: u32,
    pub generation: u64,
    pub apps: Vec<crate::pool::AppDef>,
    pub member_cert_pem: String,
    pub pool_ca_pem: String,
    pub members: Vec<MemberView>,
    pub policy: Option<crate::pool::PolicyDef>,
    /// The pool's catalog: every app of the pool with the slot of its
    /// group (the agents admit only these as guests, from that slot).
    pub catalog: Vec<(u32, crate::pool::AppDef)>,
}

/// Run state of an app as an agent reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AppRunState {
    #[default]
    Pending,
    Running,
    Backoff,
    Stopped,
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppRun {
    pub name: String,
    pub state: AppRunState,
    pub pid: u32,
    pub restarts: u32,
    pub usage: Resources,
    pub last_exit: String,
    pub disk_read_bytes_per_sec: u64,
    pub disk_write_bytes_per_sec: u64,
}

/// What an agent runs, as it last reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AppReport {
    pub pool: String,
    pub generation: u64,
    pub apps: Vec<AppRun>,
    pub peers: Vec<PeerReach>,
    pub offloads: Vec<OffloadRec>,
}

/// An offload an agent reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OffloadRec {
    pub app: String,
    pub from_node: String,
    pub to_node: String,
    pub to_slot: u32,
    pub resource: String,
    pub utilisation: f64,
    pub triggered_at_ms: u64,
    pub running_at_ms: u64,
}

/// Whether a member reaches another member's peer port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerReach {
    pub slot: u32,
    pub node_id: String,
    pub reachable: bool,
    pub last_ok_ms: u64,
    pub error: String,
}

/// Where an app of a pool runs, as `GetPool` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlacementView {
    pub app: String,
    pub home_slot: u32,
    pub host_node_id: String,
    pub run: AppRun,
}

/// A pool as the tenant API shows it (never the pool CA's key).
#[derive(Clone, Debug)]
pub struct PoolView {
    pub name: String,
    pub tenant: String,
    pub ca_pem: String,
    pub members: Vec<MemberView>,
    pub apps: Vec<crate::pool::AppDef>,
    pub placements: Vec<PlacementView>,
    pub policy: crate::pool::PolicyDef,
    pub generation: u64,
    pub created_at_ms: u64,
    pub spare_labels: std::collections::BTreeMap<String, String>,
    pub degraded: std::collections::BTreeSet<u32>,
}
