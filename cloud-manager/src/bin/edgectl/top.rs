//! `edgectl top`: the tenant's nodes and apps ordered by usage, redrawn in
//! the terminal every interval (`--once`: one frame, for scripts).

use edgepool_common::proto as pb;
use serde_json::{Value, json};

use super::render::{self, Table};

/// One frame's data: every node (ListNodes, all pages) and every app of
/// every pool (ListPools placements), each ordered by usage.
pub struct Frame {
    pub nodes: Vec<pb::Node>,
    /// (pool, placement)
    pub apps: Vec<(String, pb::Placement)>,
}

impl Frame {
    pub fn new(mut nodes: Vec<pb::Node>, pools: Vec<pb::Pool>) -> Frame {
        // Busiest first: CPU, then memory; ties by id.
        nodes.sort_by(|a, b| {
            let (ua, ub) = (a.usage.unwrap_or_default(), b.usage.unwrap_or_default());
            b.cpu_percent
                .total_cmp(&a.cpu_percent)
                .then(ub.memory_mb.cmp(&ua.memory_mb))
                .then(a.node_id.cmp(&b.node_id))
        });
        let mut apps: Vec<(String, pb::Placement)> = pools
            .into_iter()
            .flat_map(|p| {
                let name = p.name;
                p.placements.into_iter().map(move |a| (name.clone(), a))
            })
            .collect();
        apps.sort_by(|(pa, a), (pb_, b)| {
            let (ua, ub) = (a.usage.unwrap_or_default(), b.usage.unwrap_or_default());
            ub.cpu_millis
                .cmp(&ua.cpu_millis)
                .then(ub.memory_mb.cmp(&ua.memory_mb))
                .then(pa.cmp(pb_))
                .then(a.app.cmp(&b.app))
        });
        Frame { nodes, apps }
    }

    pub fn table(&self) -> String {
        let connected = self.nodes.iter().filter(|n| n.connected).count();
        let mut out = format!(
            "edgectl top: {} nodes ({connected} connected), {} apps; busiest first\n\n",
            self.nodes.len(),
            self.apps.len()
        );
        let mut t = Table::new(&[
            "NODE",
            "STATE",
            "POOL",
            "SLOT",
            "CPU%",
            "CPU(m)",
            "MEM(MiB)",
            "NET(Mb/s)",
        ]);
        for n in &self.nodes {
            let (cap, used) = (n.capacity.unwrap_or_default(), n.usage.unwrap_or_default());
            t.row(vec![
                n.node_id.clone(),
                render::short_enum(render::node_state(n.state), "NODE_STATE_"),
                render::or_dash(&n.pool),
                render::num_or_dash(n.slot),
                if n.connected {
                    format!("{:.1}", n.cpu_percent)
                } else {
                    "-".into()
                },
                render::used_cap(used.cpu_millis, cap.cpu_millis),
                render::used_cap(used.memory_mb, cap.memory_mb),
                used.network_mbps.to_string(),
            ]);
        }
        out.push_str(&t.render());
        out.push('\n');
        let mut t = Table::new(&[
            "APP", "POOL", "NODE", "STATE", "CPU(m)", "MEM(MiB)", "RESTARTS",
        ]);
        for (pool, a) in &self.apps {
            let used = a.usage.unwrap_or_default();
            t.row(vec![
                a.app.clone(),
                pool.clone(),
                render::or_dash(&a.host_node_id),
                render::short_enum(render::app_state(a.state), "APP_STATE_"),
                used.cpu_millis.to_string(),
                used.memory_mb.to_string(),
                a.restarts.to_string(),
            ]);
        }
        out.push_str(&t.render());
        out
    }

    pub fn json(&self) -> Value {
        json!({
            "nodes": self.nodes.iter().map(render::node).collect::<Vec<_>>(),
            "apps": self.apps.iter().map(|(pool, a)| {
                let mut v = render::placement(a);
                if let Some(o) = v.as_object_mut() {
                    o.insert("pool".into(), json!(pool));
                }
                v
            }).collect::<Vec<_>>(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, cpu: f64, mem: u64) -> pb::Node {
        pb::Node {
            node_id: id.into(),
            cpu_percent: cpu,
            connected: true,
            usage: Some(pb::Resources {
                memory_mb: mem,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn app(name: &str, cpu: u64) -> pb::Placement {
        pb::Placement {
            app: name.into(),
            usage: Some(pb::Resources {
                cpu_millis: cpu,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn busiest_first() {
        let pools = vec![pb::Pool {
            name: "p".into(),
            placements: vec![app("idle", 1), app("busy", 300), app("mid", 20)],
            ..Default::default()
        }];
        let f = Frame::new(
            vec![node("a", 5.0, 10), node("b", 50.0, 1), node("c", 5.0, 99)],
            pools,
        );
        let ids: Vec<&str> = f.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(ids, ["b", "c", "a"]);
        let apps: Vec<&str> = f.apps.iter().map(|(_, a)| a.app.as_str()).collect();
        assert_eq!(apps, ["busy", "mid", "idle"]);
        let text = f.table();
        assert!(text.find("busy") < text.find("idle"), "{text}");
    }
}
