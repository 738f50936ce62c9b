//! What the dashboard's endpoints send: one tenant's nodes and pools, and
//! events, as JSON. Read through `Nodes` and `Pools`, the tenant API's own
//! read paths (committed registry snapshot, live data per node).

use serde_json::{Value, json};

use crate::control::ManagerError;
use crate::events::EventRecord;
use crate::manager::Manager;
use crate::model::{AppRunState, NodeState, Resources};
use crate::node_list::{MAX_PAGE_SIZE, NodeQuery};

/// The tenant's first `MAX_PAGE_SIZE` nodes (by id) and all its pools.
pub fn state(manager: &Manager, tenant: &str) -> Result<Value, ManagerError> {
    let page = manager.nodes().list_nodes_page(
        tenant,
        &NodeQuery {
            after: None,
            page_size: MAX_PAGE_SIZE,
            state: None,
            pool: None,
        },
    )?;
    let nodes: Vec<Value> = page
        .nodes
        .iter()
        .map(|n| {
            let sample = n.live.sample.as_ref();
            json!({
                "id": n.record.node_id,
                "state": node_state(n.state()),
                "connected": n.live.conn_id.is_some(),
                "pool": n.record.pool,
                "slot": n.record.slot,
                "hostname": n.record.hostname,
                "cpuPercent": sample.map(|s| s.cpu_percent).unwrap_or_default(),
                "usage": resources(&sample.map(|s| s.usage).unwrap_or_default()),
                "capacity": resources(&n.record.capacity),
                "lastSeenMs": n.live.last_seen_ms,
            })
        })
        .collect();
    let pools: Vec<Value> = manager
        .pools()
        .list_pools(tenant)?
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "generation": p.generation,
                "degraded": p.degraded.iter().collect::<Vec<_>>(),
                "members": p.members.iter().map(|m| json!({
                    "slot": m.slot,
                    "node": m.node_id,
                    "generation": m.generation,
                })).collect::<Vec<_>>(),
                "apps": p.placements.iter().map(|a| json!({
                    "name": a.app,
                    "homeSlot": a.home_slot,
                    "node": a.host_node_id,
                    "state": app_state(a.run.state),
                    "pid": a.run.pid,
                    "restarts": a.run.restarts,
                    "usage": resources(&a.run.usage),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({
        "tenant": tenant,
        "nowMs": crate::model::now_ms(),
        "nodes": nodes,
        "more": page.next_after.is_some(),
        "pools": pools,
    }))
}

/// One event, as the page shows it.
pub fn event(e: &EventRecord) -> Value {
    json!({
        "seq": e.seq,
        "atMs": e.at_ms,
        "kind": screaming(&format!("{:?}", e.kind)),
        "pool": e.pool,
        "node": e.node_id,
        "slot": e.slot,
        "app": e.app,
        "message": e.message,
    })
}

fn resources(r: &Resources) -> Value {
    json!({
        "cpuMillis": r.cpu_millis,
        "memoryMb": r.memory_mb,
        "diskMb": r.disk_mb,
        "networkMbps": r.network_mbps,
    })
}

fn node_state(s: NodeState) -> String {
    screaming(&format!("{s:?}"))
}

fn app_state(s: AppRunState) -> String {
    screaming(&format!("{s:?}"))
}

/// `FailoverDone` -> `FAILOVER_DONE` (the proto's names, as edgectl shows).
fn screaming(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_protos() {
        assert_eq!(screaming("FailoverDone"), "FAILOVER_DONE");
        assert_eq!(node_state(NodeState::Member), "MEMBER");
        assert_eq!(app_state(AppRunState::Running), "RUNNING");
    }
}
