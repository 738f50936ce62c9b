//! Conversions between prost wire types and the manager's domain types.
//! Only the transport modules (`api`, `agent_api`, `convert`) see prost.

mod nodes;

pub use nodes::page_token;

use edgepool_common::catalog::app_digest;
use edgepool_common::proto as pb;

use crate::events::{EventKind, EventRecord};
use crate::model::{AppReport, AppRun, AppRunState, MemberView, NodeAssignment, PoolView};
use crate::model::{DiskStat, Hello, InterfaceStat, NodeState, Resources, Sample};
use crate::nodes::NodeView;
use crate::pool::{AppDef, OnDisconnect, PolicyDef, PoolError, TargetMode, Threshold};

pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn ms_of(ts: &prost_types::Timestamp) -> u64 {
    if ts.seconds < 0 {
        return 0;
    }
    (ts.seconds as u64) * 1000 + (ts.nanos.max(0) as u64) / 1_000_000
}

impl From<pb::Resources> for Resources {
    fn from(r: pb::Resources) -> Self {
        Resources {
            cpu_millis: r.cpu_millis,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
            network_mbps: r.network_mbps,
            disk_io_kbps: r.disk_io_kbps,
        }
    }
}

impl From<Resources> for pb::Resources {
    fn from(r: Resources) -> Self {
        pb::Resources {
            cpu_millis: r.cpu_millis,
            memory_mb: r.memory_mb,
            disk_mb: r.disk_mb,
            network_mbps: r.network_mbps,
            disk_io_kbps: r.disk_io_kbps,
        }
    }
}

impl From<NodeState> for pb::NodeState {
    fn from(s: NodeState) -> Self {
        match s {
            NodeState::Free => pb::NodeState::Free,
            NodeState::Member => pb::NodeState::Member,
            NodeState::Suspect => pb::NodeState::Suspect,
            NodeState::Failed => pb::NodeState::Failed,
            NodeState::Fenced => pb::NodeState::Fenced,
        }
    }
}

fn disk_from(d: pb::DiskStat) -> DiskStat {
    DiskStat {
        mount_point: d.mount_point,
        file_system: d.file_system,
        total_mb: d.total_mb,
        used_mb: d.used_mb,
        read_bytes_per_sec: d.read_bytes_per_sec,
        write_bytes_per_sec: d.write_bytes_per_sec,
    }
}

fn disk_to(d: &DiskStat) -> pb::DiskStat {
    pb::DiskStat {
        mount_point: d.mount_point.clone(),
        file_system: d.file_system.clone(),
        total_mb: d.total_mb,
        used_mb: d.used_mb,
        read_bytes_per_sec: d.read_bytes_per_sec,
        write_bytes_per_sec: d.write_bytes_per_sec,
    }
}

fn iface_from(i: pb::InterfaceStat) -> InterfaceStat {
    InterfaceStat {
        name: i.name,
        rx_bytes_per_sec: i.rx_bytes_per_sec,
        tx_bytes_per_sec: i.tx_bytes_per_sec,
        link_mbps: i.link_mbps,
    }
}

fn iface_to(i: &InterfaceStat) -> pb::InterfaceStat {
    pb::InterfaceStat {
        name: i.name.clone(),
        rx_bytes_per_sec: i.rx_bytes_per_sec,
        tx_bytes_per_sec: i.tx_bytes_per_sec,
        link_mbps: i.link_mbps,
    }
}

/// Bounds on what one telemetry message may carry, so a misbehaving agent
/// cannot make the manager hold unbounded data per node.
const MAX_DISKS: usize = 64;
const MAX_INTERFACES: usize = 64;

impl From<pb::Telemetry> for Sample {
    fn from(t: pb::Telemetry) -> Self {
        Sample {
            at_ms: t
                .time
                .as_ref()
                .map(ms_of)
                .unwrap_or_else(crate::model::now_ms),
            usage: t.usage.map(Into::into).unwrap_or_default(),
            cpu_percent: if t.cpu_percent.is_finite() {
                t.cpu_percent.clamp(0.0, 100.0)
            } else {
                0.0
            },
            disks: t.disks.into_iter().take(MAX_DISKS).map(disk_from).collect(),
            interfaces: t
                .interfaces
                .into_iter()
                .take(MAX_INTERFACES)
                .map(iface_from)
                .collect(),
        }
    }
}

impl From<pb::Hello> for Hello {
    fn from(h: pb::Hello) -> Self {
        Hello {
            agent_version: h.agent_version.chars().take(64).collect(),
            peer_address: h.peer_address.chars().take(256).collect(),
            capacity: h.capacity.map(Into::into).unwrap_or_default(),
            hostname: h.hostname.chars().take(253).collect(),
        }
    }
}

impl From<&NodeView> for pb::Node {
    fn from(v: &NodeView) -> Self {
        let r = &v.record;
        let sample = v.live.sample.as_ref();
        pb::Node {
            node_id: r.node_id.clone(),
            // A member without its stream is shown SUSPECT (derived, not stored).
            state: pb::NodeState::from(v.state()) as i32,
            pool: r.pool.clone(),
            slot: r.slot,
            labels: r.labels.clone().into_iter().collect(),
            peer_address: r.peer_address.clone(),
            capacity: Some(r.capacity.into()),
            usage: Some(sample.map(|s| s.usage).unwrap_or_default().into()),
            last_seen: (v.live.last_seen_ms > 0).then(|| timestamp(v.live.last_seen_ms)),
            connected: v.live.conn_id.is_some(),
            tenant: r.tenant.clone(),
            cpu_percent: sample.map(|s| s.cpu_percent).unwrap_or_default(),
            disks: sample
                .map(|s| s.disks.iter().map(disk_to).collect())
                .unwrap_or_default(),
            interfaces: sample
                .map(|s| s.interfaces.iter().map(iface_to).collect())
                .unwrap_or_default(),
            agent_version: r.agent_version.clone(),
            enrolled_at: Some(timestamp(r.enrolled_at_ms)),
            cert_serial: r.cert_serial.clone(),
            peers: v
                .live
                .report
                .iter()
                .filter(|rep| rep.pool == r.pool)
                .flat_map(|rep| rep.peers.iter())
                .map(|p| pb::PeerReach {
                    slot: p.slot,
                    node_id: p.node_id.clone(),
                    reachable: p.reachable,
                    last_ok: (p.last_ok_ms > 0).then(|| timestamp(p.last_ok_ms)),
                    error: p.error.clone(),
                })
                .collect(),
        }
    }
}

// ---- pools ----

impl From<pb::AppSpec> for AppDef {
    fn from(a: pb::AppSpec) -> Self {
        AppDef {
            name: a.name,
            command: a.command,
            env: a.env.into_iter().collect(),
            resources: a.resources.map(Into::into).unwrap_or_default(),
            priority: a.priority,
            offloadable: a.offloadable,
            slot: a.slot,
            artifact: a.artifact,
            on_disconnect: match pb::OnDisconnect::try_from(a.on_disconnect) {
                Ok(pb::OnDisconnect::Stop) => OnDisconnect::Stop,
                _ => OnDisconnect::KeepRunning,
            },
            limits: a.limits.map(Into::into),
        }
    }
}

impl From<&AppDef> for pb::AppSpec {
    fn from(a: &AppDef) -> Self {
        pb::AppSpec {
            name: a.name.clone(),
            command: a.command.clone(),
            env: a.env.clone().into_iter().collect(),
            resources: Some(a.resources.into()),
            priority: a.priority,
            offloadable: a.offloadable,
            slot: a.slot,
            artifact: a.artifact.clone(),
            on_disconnect: match a.on_disconnect {
                OnDisconnect::KeepRunning => pb::OnDisconnect::KeepRunning,
                OnDisconnect::Stop => pb::OnDisconnect::Stop,
            } as i32,
            limits: a.limits.map(Into::into),
        }
    }
}

/// A wire policy into the domain. Thresholds left out take the default;
/// an unknown target mode is an error naming the field.
impl TryFrom<pb::Policy> for PolicyDef {
    type Error = PoolError;

    fn try_from(p: pb::Policy) -> Result<Self, PoolError> {
        let d = PolicyDef::default();
        let t = |x: Option<pb::Threshold>, default: Threshold| {
            x.map(|x| Threshold {
                high: x.high,
                low: x.low,
            })
            .unwrap_or(default)
        };
        let target = match pb::TargetMode::try_from(p.target) {
            Ok(pb::TargetMode::Unspecified) | Ok(pb::TargetMode::Single) => TargetMode::Single,
            Ok(pb::TargetMode::Spread) => TargetMode::Spread,
            Err(_) => {
                return Err(crate::pool::invalid(
                    "policy.target",
                    format!("unknown target mode {}", p.target),
                ));
            }
        };
        Ok(PolicyDef {
            cpu: t(p.cpu, d.cpu),
            memory: t(p.memory, d.memory),
            disk: t(p.disk, d.disk),
            network: t(p.network, d.network),
            disk_io: t(p.disk_io, d.disk_io),
            sustain_seconds: if p.sustain_seconds == 0 {
                d.sustain_seconds
            } else {
                p.sustain_seconds
            },
            cooldown_seconds: if p.cooldown_seconds == 0 {
                d.cooldown_seconds
            } else {
                p.cooldown_seconds
            },
            target,
            version: d.version,
            return_home: p.return_home,
            return_home_seconds: if p.return_home_seconds == 0 {
                d.return_home_seconds
            } else {
                p.return_home_seconds
            },
        })
    }
}

impl From<&PolicyDef> for pb::Policy {
    fn from(p: &PolicyDef) -> Self {
        let t = |x: Threshold| {
            Some(pb::Threshold {
                high: x.high,
                low: x.low,
            })
        };
        pb::Policy {
            cpu: t(p.cpu),
            memory: t(p.memory),
            disk: t(p.disk),
            network: t(p.network),
            disk_io: t(p.disk_io),
            sustain_seconds: p.sustain_seconds,
            cooldown_seconds: p.cooldown_seconds,
            target: match p.target {
                TargetMode::Single => pb::TargetMode::Single,
                TargetMode::Spread => pb::TargetMode::Spread,
            } as i32,
            version: p.version,
            return_home: p.return_home,
            return_home_seconds: p.return_home_seconds,
        }
    }
}

impl From<&MemberView> for pb::Member {
    fn from(m: &MemberView) -> Self {
        pb::Member {
            slot: m.slot,
            node_id: m.node_id.clone(),
            cert_pem: m.cert_pem.clone(),
            cert_serial: m.cert_serial.clone(),
            generation: m.generation,
            peer_address: m.peer_address.clone(),
            cert_expires_at: Some(timestamp(m.cert_not_after_ms)),
        }
    }
}

fn app_state(s: AppRunState) -> pb::AppState {
    match s {
        AppRunState::Pending => pb::AppState::Pending,
        AppRunState::Running => pb::AppState::Running,
        AppRunState::Backoff => pb::AppState::Backoff,
        AppRunState::Stopped => pb::AppState::Stopped,
        AppRunState::Failed => pb::AppState::Failed,
    }
}

impl From<&PoolView> for pb::Pool {
    fn from(p: &PoolView) -> Self {
        pb::Pool {
            name: p.name.clone(),
            ca_pem: p.ca_pem.clone(),
            members: p.members.iter().map(Into::into).collect(),
            placements: p
                .placements
                .iter()
                .map(|pl| pb::Placement {
                    app: pl.app.clone(),
                    home_slot: pl.home_slot,
                    host_node_id: pl.host_node_id.clone(),
                    state: app_state(pl.run.state) as i32,
                    pid: pl.run.pid,
                    restarts: pl.run.restarts,
                    usage: Some(pl.run.usage.into()),
                    last_exit: pl.run.last_exit.clone(),
                    disk_read_bytes_per_sec: pl.run.disk_read_bytes_per_sec,
                    disk_write_bytes_per_sec: pl.run.disk_write_bytes_per_sec,
                })
                .collect(),
            policy: Some((&p.policy).into()),
            generation: p.generation,
            apps: p.apps.iter().map(Into::into).collect(),
            created_at: Some(timestamp(p.created_at_ms)),
            tenant: p.tenant.clone(),
            spare_labels: p.spare_labels.clone().into_iter().collect(),
            degraded_slots: p.degraded.iter().copied().collect(),
        }
    }
}

impl From<&NodeAssignment> for pb::Assignment {
    fn from(a: &NodeAssignment) -> Self {
        pb::Assignment {
            pool: a.pool.clone(),
            slot: a.slot,
            generation: a.generation,
            apps: a.apps.iter().map(Into::into).collect(),
            member_cert_pem: a.member_cert_pem.clone(),
            pool_ca_pem: a.pool_ca_pem.clone(),
            members: a.members.iter().map(Into::into).collect(),
            policy: a.policy.as_ref().map(Into::into),
            catalog: a
                .catalog
                .iter()
                .map(|(slot, app)| pb::CatalogApp {
                    name: app.name.clone(),
                    slot: *slot,
                    digest: app_digest(&app.into()).to_vec(),
                })
                .collect(),
        }
    }
}

/// Bounds on an agent's report, like those on telemetry.
const MAX_REPORTED_APPS: usize = 4096;

impl From<pb::AppReport> for AppReport {
    fn from(r: pb::AppReport) -> Self {
        AppReport {
            pool: r.pool,
            generation: r.generation,
            apps: r
                .apps
                .into_iter()
                .take(MAX_REPORTED_APPS)
                .map(|p| AppRun {
                    state: match pb::AppState::try_from(p.state) {
                        Ok(pb::AppState::Running) => AppRunState::Running,
                        Ok(pb::AppState::Backoff) => AppRunState::Backoff,
                        Ok(pb::AppState::Stopped) => AppRunState::Stopped,
                        Ok(pb::AppState::Failed) => AppRunState::Failed,
                        _ => AppRunState::Pending,
                    },
                    name: p.app,
                    pid: p.pid,
                    restarts: p.restarts,
                    usage: p.usage.map(Into::into).unwrap_or_default(),
                    last_exit: p.last_exit.chars().take(256).collect(),
                    disk_read_bytes_per_sec: p.disk_read_bytes_per_sec,
                    disk_write_bytes_per_sec: p.disk_write_bytes_per_sec,
                })
                .collect(),
            offloads: r
                .offloads
                .into_iter()
                .take(MAX_REPORTED_APPS)
                .map(|o| crate::model::OffloadRec {
                    app: o.app,
                    from_node: o.from_node,
                    to_node: o.to_node,
                    to_slot: o.to_slot,
                    resource: o.resource.chars().take(32).collect(),
                    utilisation: if o.utilisation.is_finite() {
                        o.utilisation
                    } else {
                        0.0
                    },
                    triggered_at_ms: o.triggered_at.as_ref().map(ms_of).unwrap_or(0),
                    running_at_ms: o.running_at.as_ref().map(ms_of).unwrap_or(0),
                })
                .collect(),
            peers: r
                .peers
                .into_iter()
                .take(MAX_REPORTED_APPS)
                .map(|p| crate::model::PeerReach {
                    slot: p.slot,
                    node_id: p.node_id,
                    reachable: p.reachable,
                    last_ok_ms: p.last_ok.as_ref().map(ms_of).unwrap_or(0),
                    error: p.error.chars().take(256).collect(),
                })
                .collect(),
        }
    }
}

impl From<&EventRecord> for pb::Event {
    fn from(e: &EventRecord) -> Self {
        let kind = match e.kind {
            EventKind::PoolCreated => pb::EventKind::PoolCreated,
            EventKind::PoolDeleted => pb::EventKind::PoolDeleted,
            EventKind::AppStarted => pb::EventKind::AppStarted,
            EventKind::AppStopped => pb::EventKind::AppStopped,
            EventKind::AppExited => pb::EventKind::AppExited,
            EventKind::AppsUpdated => pb::EventKind::AppsUpdated,
            EventKind::NodeEnrolled => pb::EventKind::NodeEnrolled,
            EventKind::CertRenewed => pb::EventKind::CertRenewed,
            EventKind::NodeSuspect => pb::EventKind::NodeSuspect,
            EventKind::FailoverStarted => pb::EventKind::FailoverStarted,
            EventKind::FailoverDone => pb::EventKind::FailoverDone,
            EventKind::CertRevoked => pb::EventKind::CertRevoked,
            EventKind::PoolDegraded => pb::EventKind::PoolDegraded,
            EventKind::NodeFenced => pb::EventKind::NodeFenced,
            EventKind::NodeFreed => pb::EventKind::NodeFreed,
            EventKind::Offload => pb::EventKind::Offload,
            EventKind::PolicyUpdated => pb::EventKind::PolicyUpdated,
        };
        pb::Event {
            time: Some(timestamp(e.at_ms)),
            pool: e.pool.clone(),
            kind: kind as i32,
            node_id: e.node_id.clone(),
            slot: e.slot,
            app: e.app.clone(),
            message: e.message.clone(),
            seq: e.seq,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, 1, 999, 1_000, 1_764_300_000_123] {
            assert_eq!(ms_of(&timestamp(ms)), ms);
        }
        assert_eq!(
            ms_of(&prost_types::Timestamp {
                seconds: -5,
                nanos: 0
            }),
            0
        );
    }

    #[test]
    fn hostile_telemetry_is_bounded() {
        let t = pb::Telemetry {
            cpu_percent: f64::NAN,
            disks: vec![pb::DiskStat::default(); 1000],
            interfaces: vec![pb::InterfaceStat::default(); 1000],
            ..Default::default()
        };
        let s = Sample::from(t);
        assert_eq!(s.cpu_percent, 0.0);
        assert_eq!(s.disks.len(), MAX_DISKS);
        assert_eq!(s.interfaces.len(), MAX_INTERFACES);
    }
}
