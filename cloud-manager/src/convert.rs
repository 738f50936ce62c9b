//! Conversions between prost wire types and the manager's domain types.
//! Only the transport modules (`api`, `agent_api`, `convert`) see prost.

use edgepool_common::proto as pb;

use crate::manager::NodeView;
use crate::model::{DiskStat, Hello, InterfaceStat, NodeState, Resources, Sample};

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
            state: pb::NodeState::from(r.state) as i32,
            pool: String::new(),
            slot: 0,
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
