//! Output: aligned tables for people, JSON for scripts.
//!
//! The JSON is built by hand from the prost messages in the shape grpcurl
//! prints: camelCase field names, enums by their proto names, timestamps as
//! RFC 3339 UTC strings. Unlike grpcurl, fields with default values are
//! always present, and 64-bit integers are numbers.

use std::time::{SystemTime, UNIX_EPOCH};

use edgepool_common::proto as pb;
use prost_types::Timestamp;
use serde_json::{Map, Value, json};

// ---- tables ----

/// Columns padded to their widest cell, two spaces apart.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            rows: vec![headers.iter().map(|h| h.to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; cols];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            out.push_str(&pad_row(row, &widths));
            out.push('\n');
        }
        out
    }
}

/// One line with cells padded to `widths` (cells longer than their width
/// push the rest of the line right); the last cell is not padded.
pub fn pad_row(cells: &[String], widths: &[usize]) -> String {
    let mut line = String::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            line.push_str("  ");
        }
        line.push_str(cell);
        if i + 1 < cells.len() {
            let w = widths.get(i).copied().unwrap_or(0);
            let n = cell.chars().count();
            line.extend(std::iter::repeat_n(' ', w.saturating_sub(n)));
        }
    }
    line.trim_end().to_string()
}

/// `-` for empty strings.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".to_string()
    } else {
        s.to_string()
    }
}

/// `-` for zero (unset slot numbers and pids).
pub fn num_or_dash(n: u32) -> String {
    if n == 0 {
        "-".to_string()
    } else {
        n.to_string()
    }
}

/// A timestamp to the second, RFC 3339 UTC; `-` if absent.
pub fn time_s(t: Option<&Timestamp>) -> String {
    match t {
        Some(t) => Timestamp {
            seconds: t.seconds,
            nanos: 0,
        }
        .to_string(),
        None => "-".to_string(),
    }
}

/// How long ago a timestamp was, e.g. `3s ago`; `never` if absent.
pub fn ago(t: Option<&Timestamp>) -> String {
    let Some(t) = t else {
        return "never".to_string();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let d = now - t.seconds;
    if d < 0 {
        return "just now".to_string();
    }
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

/// `used/cap` of one resource.
pub fn used_cap(used: u64, cap: u64) -> String {
    format!("{used}/{cap}")
}

/// A proto enum's name without a prefix, for tables (`RUNNING` for
/// `APP_STATE_RUNNING`); the number if unknown.
pub fn short_enum(name: Value, prefix: &str) -> String {
    match name {
        Value::String(s) => s.strip_prefix(prefix).unwrap_or(&s).to_string(),
        other => other.to_string(),
    }
}

// ---- JSON ----

fn enum_json<E: TryFrom<i32>>(v: i32, name: fn(&E) -> &'static str) -> Value {
    match E::try_from(v) {
        Ok(e) => Value::from(name(&e)),
        Err(_) => Value::from(v),
    }
}

pub fn node_state(v: i32) -> Value {
    enum_json::<pb::NodeState>(v, pb::NodeState::as_str_name)
}

pub fn app_state(v: i32) -> Value {
    enum_json::<pb::AppState>(v, pb::AppState::as_str_name)
}

pub fn event_kind(v: i32) -> Value {
    enum_json::<pb::EventKind>(v, pb::EventKind::as_str_name)
}

pub fn target_mode(v: i32) -> Value {
    enum_json::<pb::TargetMode>(v, pb::TargetMode::as_str_name)
}

pub fn on_disconnect(v: i32) -> Value {
    enum_json::<pb::OnDisconnect>(v, pb::OnDisconnect::as_str_name)
}

pub fn ts(t: Option<&Timestamp>) -> Value {
    t.map_or(Value::Null, |t| Value::from(t.to_string()))
}

fn string_map<'a>(m: impl IntoIterator<Item = (&'a String, &'a String)>) -> Value {
    Value::Object(
        m.into_iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect::<Map<_, _>>(),
    )
}

pub fn resources(r: Option<&pb::Resources>) -> Value {
    match r {
        Some(r) => json!({
            "cpuMillis": r.cpu_millis,
            "memoryMb": r.memory_mb,
            "diskMb": r.disk_mb,
            "networkMbps": r.network_mbps,
            "diskIoKbps": r.disk_io_kbps,
        }),
        None => Value::Null,
    }
}

pub fn node(n: &pb::Node) -> Value {
    json!({
        "nodeId": n.node_id,
        "state": node_state(n.state),
        "pool": n.pool,
        "slot": n.slot,
        "labels": string_map(&n.labels),
        "peerAddress": n.peer_address,
        "capacity": resources(n.capacity.as_ref()),
        "usage": resources(n.usage.as_ref()),
        "lastSeen": ts(n.last_seen.as_ref()),
        "connected": n.connected,
        "tenant": n.tenant,
        "cpuPercent": n.cpu_percent,
        "disks": n.disks.iter().map(|d| json!({
            "mountPoint": d.mount_point,
            "fileSystem": d.file_system,
            "totalMb": d.total_mb,
            "usedMb": d.used_mb,
            "readBytesPerSec": d.read_bytes_per_sec,
            "writeBytesPerSec": d.write_bytes_per_sec,
        })).collect::<Vec<_>>(),
        "interfaces": n.interfaces.iter().map(|i| json!({
            "name": i.name,
            "rxBytesPerSec": i.rx_bytes_per_sec,
            "txBytesPerSec": i.tx_bytes_per_sec,
            "linkMbps": i.link_mbps,
        })).collect::<Vec<_>>(),
        "agentVersion": n.agent_version,
        "enrolledAt": ts(n.enrolled_at.as_ref()),
        "certSerial": n.cert_serial,
        "peers": n.peers.iter().map(|p| json!({
            "slot": p.slot,
            "nodeId": p.node_id,
            "reachable": p.reachable,
            "lastOk": ts(p.last_ok.as_ref()),
            "error": p.error,
        })).collect::<Vec<_>>(),
    })
}

pub fn threshold(t: Option<&pb::Threshold>) -> Value {
    t.map_or(Value::Null, |t| json!({ "high": t.high, "low": t.low }))
}

pub fn policy(p: Option<&pb::Policy>) -> Value {
    match p {
        Some(p) => json!({
            "cpu": threshold(p.cpu.as_ref()),
            "memory": threshold(p.memory.as_ref()),
            "disk": threshold(p.disk.as_ref()),
            "network": threshold(p.network.as_ref()),
            "diskIo": threshold(p.disk_io.as_ref()),
            "sustainSeconds": p.sustain_seconds,
            "cooldownSeconds": p.cooldown_seconds,
            "target": target_mode(p.target),
            "version": p.version,
            "returnHome": p.return_home,
            "returnHomeSeconds": p.return_home_seconds,
        }),
        None => Value::Null,
    }
}

pub fn app_spec(a: &pb::AppSpec) -> Value {
    let mut v = json!({
        "name": a.name,
        "command": a.command,
        "env": string_map(&a.env),
        "resources": resources(a.resources.as_ref()),
        "priority": a.priority,
        "offloadable": a.offloadable,
        "artifact": a.artifact,
        "onDisconnect": on_disconnect(a.on_disconnect),
    });
    if let (Some(slot), Value::Object(m)) = (a.slot, &mut v) {
        m.insert("slot".into(), Value::from(slot));
    }
    v
}

pub fn member(m: &pb::Member) -> Value {
    json!({
        "slot": m.slot,
        "nodeId": m.node_id,
        "certPem": m.cert_pem,
        "certSerial": m.cert_serial,
        "generation": m.generation,
        "peerAddress": m.peer_address,
        "certExpiresAt": ts(m.cert_expires_at.as_ref()),
    })
}

pub fn placement(p: &pb::Placement) -> Value {
    json!({
        "app": p.app,
        "homeSlot": p.home_slot,
        "hostNodeId": p.host_node_id,
        "state": app_state(p.state),
        "pid": p.pid,
        "restarts": p.restarts,
        "usage": resources(p.usage.as_ref()),
        "lastExit": p.last_exit,
        "diskReadBytesPerSec": p.disk_read_bytes_per_sec,
        "diskWriteBytesPerSec": p.disk_write_bytes_per_sec,
    })
}

pub fn pool(p: &pb::Pool) -> Value {
    json!({
        "name": p.name,
        "caPem": p.ca_pem,
        "members": p.members.iter().map(member).collect::<Vec<_>>(),
        "placements": p.placements.iter().map(placement).collect::<Vec<_>>(),
        "policy": policy(p.policy.as_ref()),
        "generation": p.generation,
        "apps": p.apps.iter().map(app_spec).collect::<Vec<_>>(),
        "createdAt": ts(p.created_at.as_ref()),
        "tenant": p.tenant,
        "spareLabels": string_map(&p.spare_labels),
        "degradedSlots": p.degraded_slots,
    })
}

pub fn event(e: &pb::Event) -> Value {
    json!({
        "seq": e.seq,
        "time": ts(e.time.as_ref()),
        "pool": e.pool,
        "kind": event_kind(e.kind),
        "nodeId": e.node_id,
        "slot": e.slot,
        "app": e.app,
        "message": e.message,
    })
}

pub fn token(t: &pb::CreateJoinTokenResponse) -> Value {
    json!({
        "token": t.token,
        "expiresAt": ts(t.expires_at.as_ref()),
    })
}

// ---- human views ----

/// `edgectl node ls`.
pub fn nodes_table(nodes: &[pb::Node]) -> String {
    let mut t = Table::new(&[
        "NODE",
        "STATE",
        "POOL",
        "SLOT",
        "CONNECTED",
        "CPU(m)",
        "MEM(MiB)",
        "DISK(MiB)",
        "LAST SEEN",
    ]);
    for n in nodes {
        let cap = n.capacity.unwrap_or_default();
        let use_ = n.usage.unwrap_or_default();
        t.row(vec![
            n.node_id.clone(),
            short_enum(node_state(n.state), "NODE_STATE_"),
            or_dash(&n.pool),
            num_or_dash(n.slot),
            yes_no(n.connected),
            used_cap(use_.cpu_millis, cap.cpu_millis),
            used_cap(use_.memory_mb, cap.memory_mb),
            used_cap(use_.disk_mb, cap.disk_mb),
            ago(n.last_seen.as_ref()),
        ]);
    }
    t.render()
}

/// `edgectl node summary`: one row of counts.
pub fn summary_table(s: &pb::NodeSummaryResponse) -> String {
    let mut t = Table::new(&[
        "TOTAL",
        "CONNECTED",
        "FREE",
        "MEMBER",
        "SUSPECT",
        "FAILED",
        "FENCED",
    ]);
    t.row(
        [
            s.total,
            s.connected,
            s.free,
            s.member,
            s.suspect,
            s.failed,
            s.fenced,
        ]
        .iter()
        .map(u32::to_string)
        .collect(),
    );
    t.render()
}

/// `edgectl node summary -o json`.
pub fn summary(s: &pb::NodeSummaryResponse) -> Value {
    json!({
        "total": s.total,
        "connected": s.connected,
        "free": s.free,
        "member": s.member,
        "suspect": s.suspect,
        "failed": s.failed,
        "fenced": s.fenced,
    })
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// Key/value lines with the keys padded.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$}  {v}\n", format!("{k}:")))
        .collect()
}

/// `edgectl node get ID`.
pub fn node_detail(n: &pb::Node) -> String {
    let cap = n.capacity.unwrap_or_default();
    let u = n.usage.unwrap_or_default();
    let mut labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let pool = if n.pool.is_empty() {
        "-".to_string()
    } else {
        format!("{} (slot {})", n.pool, n.slot)
    };
    let mut out = fields(&[
        ("Node", n.node_id.clone()),
        ("State", short_enum(node_state(n.state), "NODE_STATE_")),
        ("Pool", pool),
        ("Connected", yes_no(n.connected)),
        (
            "Last seen",
            format!(
                "{} ({})",
                ago(n.last_seen.as_ref()),
                time_s(n.last_seen.as_ref())
            ),
        ),
        ("Peer address", or_dash(&n.peer_address)),
        (
            "Labels",
            if labels.is_empty() {
                "-".to_string()
            } else {
                labels.join(", ")
            },
        ),
        ("Agent version", or_dash(&n.agent_version)),
        ("Enrolled", time_s(n.enrolled_at.as_ref())),
        ("Cert serial", or_dash(&n.cert_serial)),
        (
            "CPU",
            format!(
                "{} millicores ({:.1}%)",
                used_cap(u.cpu_millis, cap.cpu_millis),
                n.cpu_percent
            ),
        ),
        (
            "Memory",
            format!("{} MiB", used_cap(u.memory_mb, cap.memory_mb)),
        ),
        ("Disk", format!("{} MiB", used_cap(u.disk_mb, cap.disk_mb))),
        (
            "Network",
            format!("{} Mbit/s", used_cap(u.network_mbps, cap.network_mbps)),
        ),
        (
            "Disk I/O",
            format!("{} KiB/s", used_cap(u.disk_io_kbps, cap.disk_io_kbps)),
        ),
    ]);
    if !n.disks.is_empty() {
        let mut t = Table::new(&["MOUNT", "FS", "USED/TOTAL(MiB)", "READ(B/s)", "WRITE(B/s)"]);
        for d in &n.disks {
            t.row(vec![
                d.mount_point.clone(),
                or_dash(&d.file_system),
                used_cap(d.used_mb, d.total_mb),
                d.read_bytes_per_sec.to_string(),
                d.write_bytes_per_sec.to_string(),
            ]);
        }
        out.push_str("\nDisks:\n");
        out.push_str(&t.render());
    }
    if !n.interfaces.is_empty() {
        let mut t = Table::new(&["INTERFACE", "RX(B/s)", "TX(B/s)", "LINK(Mbit/s)"]);
        for i in &n.interfaces {
            t.row(vec![
                i.name.clone(),
                i.rx_bytes_per_sec.to_string(),
                i.tx_bytes_per_sec.to_string(),
                i.link_mbps.to_string(),
            ]);
        }
        out.push_str("\nInterfaces:\n");
        out.push_str(&t.render());
    }
    if !n.peers.is_empty() {
        let mut t = Table::new(&["SLOT", "NODE", "REACHABLE", "LAST OK", "ERROR"]);
        for p in &n.peers {
            t.row(vec![
                p.slot.to_string(),
                p.node_id.clone(),
                yes_no(p.reachable),
                ago(p.last_ok.as_ref()),
                or_dash(&p.error),
            ]);
        }
        out.push_str("\nPeers:\n");
        out.push_str(&t.render());
    }
    out
}

/// `edgectl pool ls`.
pub fn pools_table(pools: &[pb::Pool]) -> String {
    let mut t = Table::new(&["NAME", "MEMBERS", "APPS", "GENERATION"]);
    for p in pools {
        t.row(vec![
            p.name.clone(),
            p.members.len().to_string(),
            p.apps.len().max(p.placements.len()).to_string(),
            p.generation.to_string(),
        ]);
    }
    t.render()
}

fn policy_line(p: Option<&pb::Policy>) -> String {
    let Some(p) = p else {
        return "-".to_string();
    };
    let th = |name: &str, t: Option<&pb::Threshold>| match t {
        Some(t) => format!("{name}={}/{}", t.low, t.high),
        None => format!("{name}=-"),
    };
    let return_home = if p.return_home {
        format!("return_home=after {}s", p.return_home_seconds)
    } else {
        "return_home=off".to_string()
    };
    format!(
        "target={} sustain={}s cooldown={}s {} {} {} {} {} (low/high) {return_home} version={}",
        short_enum(target_mode(p.target), "TARGET_MODE_"),
        p.sustain_seconds,
        p.cooldown_seconds,
        th("cpu", p.cpu.as_ref()),
        th("memory", p.memory.as_ref()),
        th("disk", p.disk.as_ref()),
        th("network", p.network.as_ref()),
        th("disk_io", p.disk_io.as_ref()),
        p.version,
    )
}

/// `edgectl pool get NAME` (and the answer of create/apps).
pub fn pool_detail(p: &pb::Pool) -> String {
    let mut spare: Vec<String> = p
        .spare_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    spare.sort();
    let degraded: Vec<String> = p.degraded_slots.iter().map(u32::to_string).collect();
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let mut out = fields(&[
        ("Pool", p.name.clone()),
        ("Generation", p.generation.to_string()),
        ("Created", time_s(p.created_at.as_ref())),
        ("Policy", policy_line(p.policy.as_ref())),
        ("Spare labels", list(&spare)),
        ("Degraded slots", list(&degraded)),
    ]);
    let mut members = Table::new(&["SLOT", "NODE", "SERIAL", "GENERATION", "CERT-EXPIRES"]);
    for m in &p.members {
        members.row(vec![
            m.slot.to_string(),
            or_dash(&m.node_id),
            or_dash(&m.cert_serial),
            m.generation.to_string(),
            time_s(m.cert_expires_at.as_ref()),
        ]);
    }
    out.push_str("\nMembers:\n");
    out.push_str(&members.render());
    let mut placements = Table::new(&["APP", "SLOT", "HOST", "STATE", "PID", "RESTARTS"]);
    for pl in &p.placements {
        placements.row(vec![
            pl.app.clone(),
            num_or_dash(pl.home_slot),
            or_dash(&pl.host_node_id),
            short_enum(app_state(pl.state), "APP_STATE_"),
            num_or_dash(pl.pid),
            pl.restarts.to_string(),
        ]);
    }
    out.push_str("\nPlacements:\n");
    out.push_str(&placements.render());
    out
}

pub const EVENT_HEADERS: [&str; 8] = [
    "SEQ", "TIME", "POOL", "KIND", "NODE", "SLOT", "APP", "MESSAGE",
];

/// Fixed column widths for a followed event stream (cells can't be measured
/// ahead of time; longer cells push the line right).
pub const EVENT_WIDTHS: [usize; 8] = [6, 20, 12, 16, 10, 4, 12, 0];

pub fn event_cells(e: &pb::Event) -> Vec<String> {
    vec![
        e.seq.to_string(),
        time_s(e.time.as_ref()),
        or_dash(&e.pool),
        short_enum(event_kind(e.kind), "EVENT_KIND_"),
        or_dash(&e.node_id),
        num_or_dash(e.slot),
        or_dash(&e.app),
        e.message.clone(),
    ]
}

/// A table of events (for `edgectl events` without `-f`).
pub fn events_table(events: &[pb::Event]) -> String {
    let mut t = Table::new(&EVENT_HEADERS);
    for e in events {
        t.row(event_cells(e));
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_aligned() {
        let mut t = Table::new(&["A", "LONGER", "C"]);
        t.row(vec!["xxxx".into(), "y".into(), "z".into()]);
        assert_eq!(t.render(), "A     LONGER  C\nxxxx  y       z\n");
    }

    #[test]
    fn enums_use_proto_names_and_timestamps_rfc3339() {
        assert_eq!(node_state(1), json!("FREE"));
        assert_eq!(app_state(2), json!("APP_STATE_RUNNING"));
        assert_eq!(event_kind(1), json!("POOL_CREATED"));
        assert_eq!(event_kind(999), json!(999));
        assert_eq!(short_enum(app_state(2), "APP_STATE_"), "RUNNING");
        let t = Timestamp {
            seconds: 1_700_000_000,
            nanos: 500_000_000,
        };
        assert_eq!(ts(Some(&t)), json!("2023-11-14T22:13:20.500Z"));
        assert_eq!(time_s(Some(&t)), "2023-11-14T22:13:20Z");
    }

    #[test]
    fn pool_view_shows_the_whole_policy() {
        let policy = pb::Policy {
            cpu: Some(pb::Threshold {
                high: 0.8,
                low: 0.6,
            }),
            sustain_seconds: 10,
            cooldown_seconds: 60,
            target: pb::TargetMode::Spread as i32,
            version: 3,
            return_home: true,
            return_home_seconds: 120,
            ..Default::default()
        };
        let line = policy_line(Some(&policy));
        for s in [
            "target=SPREAD",
            "sustain=10s",
            "cooldown=60s",
            "cpu=0.6/0.8",
            "disk_io=-",
            "return_home=after 120s",
            "version=3",
        ] {
            assert!(line.contains(s), "{s} missing: {line}");
        }
        let off = policy_line(Some(&pb::Policy::default()));
        assert!(off.contains("return_home=off"), "{off}");
        let v = self::policy(Some(&policy));
        assert_eq!(v["returnHome"], json!(true));
        assert_eq!(v["returnHomeSeconds"], json!(120));
        let p = pb::Pool {
            name: "p".into(),
            policy: Some(policy),
            spare_labels: [("zone".to_string(), "lab".to_string())].into(),
            degraded_slots: vec![2],
            ..Default::default()
        };
        let text = pool_detail(&p);
        assert!(text.contains("return_home=after 120s"), "{text}");
        assert!(
            text.contains("zone=lab") && text.contains("Degraded slots:  2"),
            "{text}"
        );
        let v = pool(&p);
        assert_eq!(v["spareLabels"]["zone"], json!("lab"));
        assert_eq!(v["degradedSlots"], json!([2]));
    }

    #[test]
    fn json_uses_camel_case_and_keeps_optional_slot_absent() {
        let a = pb::AppSpec {
            name: "a".into(),
            command: vec!["sleep".into(), "1".into()],
            offloadable: true,
            ..Default::default()
        };
        let v = app_spec(&a);
        assert!(v.get("slot").is_none());
        assert_eq!(v["command"], json!(["sleep", "1"]));
        let v = app_spec(&pb::AppSpec { slot: Some(2), ..a });
        assert_eq!(v["slot"], json!(2));
        let p = pb::Placement {
            app: "a".into(),
            home_slot: 1,
            host_node_id: "n".into(),
            state: pb::AppState::Running as i32,
            ..Default::default()
        };
        let v = placement(&p);
        assert_eq!(v["homeSlot"], json!(1));
        assert_eq!(v["hostNodeId"], json!("n"));
        assert_eq!(v["state"], json!("APP_STATE_RUNNING"));
    }
}
