//! Agent configuration: a TOML file (every field optional; defaults in
//! `agent.example.toml`), then flags and environment variables on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use edgepool_common::logging::LogFormat;
use serde::Deserialize;

use crate::offload_state::MAX_LEASE_MS;

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Where the node key, certificates and local state live. Made
    /// owner-only (0700) at start: no app may read or traverse it.
    /// Default `/var/lib/edge-agent`.
    pub data_dir: PathBuf,
    /// Parent of the apps' working directories (`<apps_dir>/<app>/`, owned
    /// by the app user, mode 0700; the app's HOME). Must not be inside
    /// `data_dir`, and its parents must be traversable by `run_as`. Empty =
    /// `<data_dir>-apps` (`/var/lib/edge-agent-apps` by default).
    pub apps_dir: PathBuf,
    /// The unprivileged user apps run as when the agent runs as root (with
    /// a clean environment, see docs/install.md). An agent that is not root
    /// runs its apps as itself and ignores this. A user that does not exist
    /// stops the agent at start. Empty = apps run as root (tests only).
    /// Default `edgepool-app` (made by the edge-agent package).
    pub run_as: String,
    /// Manager address `HOST:PORT`, or several (`HOST:PORT,HOST:PORT`,
    /// replicas tried in turn). Empty = what `join` recorded.
    pub manager: String,
    /// Address of the peer gRPC server. Default `0.0.0.0:7444`.
    pub peer_listen: SocketAddr,
    /// Address peers should dial, reported to the manager. Empty = the
    /// bound peer address, with the host name in place of 0.0.0.0.
    pub peer_advertise: String,
    /// Telemetry period until the manager says otherwise. Default 1000.
    pub telemetry_interval_ms: u32,
    /// Heartbeat period until the manager says otherwise. Default 1000.
    pub heartbeat_interval_ms: u32,
    /// Network interfaces to measure. Empty = every interface except `lo`.
    pub interfaces: Vec<String>,
    /// Capacity reported to the manager; 0 in a field = detect it (except
    /// `disk_io_kbps`, which is not detected: 0 = not evaluated).
    pub capacity: CapacityConfig,
    /// First reconnect delay after the stream drops. Default 200.
    pub reconnect_min_ms: u64,
    /// Largest reconnect delay (exponential backoff, jittered). Default 10000.
    pub reconnect_max_ms: u64,
    /// TLS handshakes computing at once on the peer port (after the
    /// client's hello; clients that have not sent it hold no slot). Beyond
    /// it connections wait for a slot. Default 32 (a pool has few members).
    pub peer_max_concurrent_handshakes: u32,
    /// A peer-port connection whose TLS handshake is not done this long
    /// after it was accepted is closed, so silent or slow clients hold
    /// nothing for longer. Default 10000.
    pub peer_handshake_timeout_ms: u32,
    /// How often a pool member probes the other members' peer ports for
    /// their capacity and usage (offload decisions, `GetNode.peers`).
    /// Default 2000.
    pub peer_probe_interval_ms: u64,
    /// How often two pool members exchange a liveness beat (for fast
    /// failure detection; each beat is a sign of life of its sender).
    /// Default 200.
    pub peer_liveness_interval_ms: u64,
    /// A member that has not answered for this long is reported to the
    /// manager as unreachable (which then pings it). Default 600.
    pub peer_suspect_ms: u64,
    /// Stop the apps when the agent stops gracefully (SIGINT/SIGTERM). If
    /// false they keep running and the next agent start adopts them. A
    /// crashed agent never stops them. Default true.
    pub stop_apps_on_exit: bool,
    /// A member cut off from the manager and from every peer for longer
    /// than this stops its apps whose `on_disconnect` is STOP. Default 10000.
    pub isolation_lease_ms: u64,
    /// The autonomy window (s): while this member has no stream to the
    /// manager, it still accepts a peer's member certificate that expired
    /// at most this long ago, if its serial is the one the held membership
    /// lists for that slot (see SECURITY.md, "Offline grace"). 0 turns the
    /// grace off; at most 2592000 (30 days). Default 259200 (72 h).
    pub autonomy_window_secs: u64,
    /// How often the threshold policy is evaluated (ms). Default 1000.
    pub scheduler_interval_ms: u64,
    /// The offload reconciliation interval (ms): the lease an offloaded app
    /// runs under on its host. The owner renews it every third of this; a
    /// host stops a guest not renewed for this long, and an owner that
    /// could not renew for this long runs the app at home again. No app
    /// runs on two nodes for longer than this. Default 6000.
    pub offload_lease_ms: u64,
    /// Most guests (other members' apps run here) one member may have on
    /// this node at once; an offer above it is refused. Default 16.
    pub max_guests_per_member: u32,
    /// Largest share of this node's capacity, in percent of each resource,
    /// that one member's guests may hold (each guest counted at the larger
    /// of what it was admitted with and what it measures); an offer above
    /// it is refused. Default 90.
    pub max_guest_percent_per_member: u32,
    /// How the node's network use is measured: `interface` (rx+tx of the
    /// measured interfaces; one agent per machine) or `process` (each app's
    /// socket I/O; for several agents on one machine). Default `interface`.
    pub network_accounting: NetworkAccounting,
    /// What the node keeps for itself, added to the group's need before it
    /// is compared with the thresholds. Default all 0.
    pub reserve: CapacityConfig,
    /// Address of the Prometheus metrics listener (plain HTTP, `GET
    /// /metrics` in the OpenMetrics text format); its URL is written to
    /// `DATA_DIR/metrics.url`. No TLS and no authentication: keep it on
    /// loopback or a network only your monitoring reaches. Port 0 picks a
    /// free port. Default none (off).
    pub metrics_listen: Option<SocketAddr>,
    /// Log output: `plain` or `json`. Default `plain`.
    pub log_format: LogFormat,
}

/// Capacity overrides. Detection: CPU = logical CPUs x 1000, memory = RAM,
/// disk = the sum of real file systems, network = the link speed of the
/// measured interfaces (`/sys/class/net/*/speed`, via sysinfo; 1000 Mbit/s
/// if none reports a speed). The disk I/O rate is not detected:
/// `disk_io_kbps` 0 = unknown, so the disk I/O threshold is not evaluated on
/// the node (it never triggers there, and the node admits any disk I/O).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct CapacityConfig {
    pub cpu_millis: u64,
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub network_mbps: u64,
    /// Disk read+write rate in KiB/s (0 = unknown: not evaluated, admits
    /// any; never detected).
    pub disk_io_kbps: u64,
}

/// How the node's network use is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetworkAccounting {
    /// The measured interfaces' rx+tx rate (one agent per machine).
    #[default]
    Interface,
    /// Each app's socket I/O (its process group's read/written bytes that
    /// did not go to disk): for several agents on one machine.
    Process,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            data_dir: PathBuf::from("/var/lib/edge-agent"),
            apps_dir: PathBuf::new(),
            run_as: DEFAULT_RUN_AS.to_string(),
            manager: String::new(),
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 7444)),
            peer_advertise: String::new(),
            telemetry_interval_ms: 1000,
            heartbeat_interval_ms: 1000,
            interfaces: Vec::new(),
            capacity: CapacityConfig::default(),
            reconnect_min_ms: 200,
            reconnect_max_ms: 10_000,
            peer_max_concurrent_handshakes: 32,
            peer_handshake_timeout_ms: 10_000,
            peer_probe_interval_ms: 2000,
            peer_liveness_interval_ms: 200,
            peer_suspect_ms: 600,
            stop_apps_on_exit: true,
            isolation_lease_ms: 10_000,
            autonomy_window_secs: 259_200,
            scheduler_interval_ms: 1000,
            offload_lease_ms: 6000,
            max_guests_per_member: 16,
            max_guest_percent_per_member: 90,
            network_accounting: NetworkAccounting::Interface,
            reserve: CapacityConfig::default(),
            metrics_listen: None,
            log_format: LogFormat::Plain,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {why}")]
    Invalid { field: &'static str, why: String },
}

/// The longest autonomy window an agent accepts (30 days).
pub const MAX_AUTONOMY_WINDOW_SECS: u64 = 2_592_000;

/// The user the edge-agent package makes for apps.
pub const DEFAULT_RUN_AS: &str = "edgepool-app";

impl AgentConfig {
    /// `apps_dir`, or its default next to `data_dir`.
    pub fn apps_dir(&self) -> PathBuf {
        if !self.apps_dir.as_os_str().is_empty() {
            return self.apps_dir.clone();
        }
        let mut dir = self.data_dir.clone().into_os_string();
        dir.push("-apps");
        PathBuf::from(dir)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: &str| ConfigError::Invalid {
            field,
            why: why.to_string(),
        };
        for (field, v) in [
            ("telemetry_interval_ms", self.telemetry_interval_ms),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
        ] {
            if !(100..=60_000).contains(&v) {
                return Err(invalid(field, "must be between 100 and 60000"));
            }
        }
        if !(1..=65_536).contains(&self.peer_max_concurrent_handshakes) {
            return Err(invalid(
                "peer_max_concurrent_handshakes",
                "must be between 1 and 65536",
            ));
        }
        if !(100..=600_000).contains(&self.peer_handshake_timeout_ms) {
            return Err(invalid(
                "peer_handshake_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        if self.peer_probe_interval_ms < 100 {
            return Err(invalid("peer_probe_interval_ms", "must be at least 100"));
        }
        if !(50..=60_000).contains(&self.peer_liveness_interval_ms) {
            return Err(invalid(
                "peer_liveness_interval_ms",
                "must be between 50 and 60000",
            ));
        }
        if self.peer_suspect_ms < 2 * self.peer_liveness_interval_ms
            || self.peer_suspect_ms > 600_000
        {
            return Err(invalid(
                "peer_suspect_ms",
                "must be at least twice peer_liveness_interval_ms and at most 600000",
            ));
        }
        if self.autonomy_window_secs > MAX_AUTONOMY_WINDOW_SECS {
            return Err(invalid(
                "autonomy_window_secs",
                "must be at most 2592000 (30 days): the grace must stay bounded",
            ));
        }
        if self.scheduler_interval_ms < 50 {
            return Err(invalid("scheduler_interval_ms", "must be at least 50"));
        }
        if !(300..=MAX_LEASE_MS).contains(&self.offload_lease_ms) {
            return Err(invalid(
                "offload_lease_ms",
                "must be between 300 and 3600000",
            ));
        }
        if !(1..=1024).contains(&self.max_guests_per_member) {
            return Err(invalid(
                "max_guests_per_member",
                "must be between 1 and 1024",
            ));
        }
        if !(1..=100).contains(&self.max_guest_percent_per_member) {
            return Err(invalid(
                "max_guest_percent_per_member",
                "must be between 1 and 100",
            ));
        }
        if self.reconnect_min_ms == 0 {
            return Err(invalid("reconnect_min_ms", "must be > 0"));
        }
        if self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(invalid("reconnect_max_ms", "must be >= reconnect_min_ms"));
        }
        if !self.manager.is_empty() {
            edgepool_common::tls::manager_addresses(&self.manager)
                .map_err(|e| invalid("manager", &e.to_string()))?;
        }
        if !self.peer_advertise.is_empty() && !self.peer_advertise.contains(':') {
            return Err(invalid("peer_advertise", "expected HOST:PORT"));
        }
        let data = lexical(&self.data_dir);
        if lexical(&self.apps_dir()).starts_with(&data) {
            return Err(invalid(
                "apps_dir",
                "must not be inside data_dir (apps must not reach the agent's keys and state)",
            ));
        }
        Ok(())
    }
}

/// `path` made absolute (against the current directory) without `.`
/// components, for comparing directories that may not exist yet.
fn lexical(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apps_dir_is_next_to_the_data_dir_and_never_inside() {
        let c = AgentConfig::default();
        assert_eq!(c.apps_dir(), PathBuf::from("/var/lib/edge-agent-apps"));
        let inside = AgentConfig {
            apps_dir: "/var/lib/edge-agent/./apps".into(),
            ..Default::default()
        };
        let err = inside.validate().unwrap_err().to_string();
        assert!(err.contains("apps_dir"), "{err}");
        let other = AgentConfig {
            apps_dir: "/srv/apps".into(),
            ..Default::default()
        };
        other.validate().unwrap();
        assert_eq!(other.apps_dir(), PathBuf::from("/srv/apps"));
    }

    #[test]
    fn example_file_is_the_defaults() {
        let c = AgentConfig::from_toml(include_str!("../agent.example.toml")).unwrap();
        assert_eq!(c, AgentConfig::default());
        c.validate().unwrap();
    }

    #[test]
    fn the_autonomy_window_is_bounded() {
        let c = AgentConfig {
            autonomy_window_secs: MAX_AUTONOMY_WINDOW_SECS + 1,
            ..Default::default()
        };
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("autonomy_window_secs"), "{err}");
        for ok in [0, 259_200, MAX_AUTONOMY_WINDOW_SECS] {
            let c = AgentConfig {
                autonomy_window_secs: ok,
                ..Default::default()
            };
            c.validate().unwrap();
        }
    }

    #[test]
    fn errors_name_the_field() {
        let err = AgentConfig::from_toml("peer_lisen = \"0.0.0.0:1\"").unwrap_err();
        assert!(err.contains("peer_lisen"), "{err}");
        let err = AgentConfig::from_toml("[capacity]\ncpu = 4").unwrap_err();
        assert!(err.contains("cpu"), "{err}");
        let c = AgentConfig {
            reconnect_max_ms: 1,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("reconnect_max_ms")
        );
        let c = AgentConfig {
            manager: "no-port".into(),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("manager"));
    }
}
