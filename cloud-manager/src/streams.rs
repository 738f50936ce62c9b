//! `Streams`: agents' streams as the manager tracks them. Opening one
//! records the hello, fences a failed node and hands the session its
//! assignment; closing or ending one tells the failure detector; an app
//! report goes to fencing (`failover`) and to its pool (`pools`). Owns the
//! connection counter; each node's connection state is its `LiveNode`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::control::{Control, ManagerError};
use crate::failover::Failover;
use crate::live::LiveNode;
use crate::model::{AppReport, AppRunState, Hello};
use crate::node_key::NodeKey;
use crate::pools::Pools;

pub struct Streams {
    control: Arc<Control>,
    pools: Arc<Pools>,
    failover: Arc<Failover>,
    next_conn: AtomicU64,
}

impl Streams {
    pub fn new(control: Arc<Control>, pools: Arc<Pools>, failover: Arc<Failover>) -> Self {
        Streams {
            control,
            pools,
            failover,
            next_conn: AtomicU64::new(1),
        }
    }

    /// Registers a new stream for `node` (replacing an older one) and
    /// records its hello. Returns the connection id and the live handle.
    pub async fn open_stream(
        &self,
        node: &NodeKey,
        hello: &Hello,
    ) -> Result<(u64, Arc<LiveNode>), ManagerError> {
        let changed = self.control.registry()?.hello_changes(node, hello);
        let live = self.control.live_node(node)?;
        if changed {
            self.control
                .mutate_async(|r| {
                    r.apply_hello(node, hello);
                    Ok(())
                })
                .await?;
            // Peers learn the new peer address through the membership.
            self.pools.push_pool_of(node)?;
        }
        // A failed node that comes back is fenced before it learns its
        // (now empty) assignment.
        self.failover.fence_if_failed(node).await?;
        // The session sends this first thing (and every later change).
        live.set_assignment(self.pools.assignment_for(node)?);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        // An older session of this node ends now (not at its next message).
        live.open(conn_id);
        tracing::info!(%node, conn_id, peer = %hello.peer_address, "agent connected");
        Ok((conn_id, live))
    }

    /// Marks the stream closed, unless a newer one already replaced it.
    pub fn close_stream(&self, node: &NodeKey, live: &LiveNode, conn_id: u64) {
        if live.close(conn_id) {
            // What it said of its peers is no longer current, and a member
            // without its stream is suspect at once.
            self.failover.stream_closed(node);
            tracing::info!(%node, conn_id, "agent disconnected");
        }
    }

    /// Ends the node's current stream, if it has one, at once: its session
    /// stops (`LiveNode::ended`) and the agent must connect again, which a
    /// replaced certificate no longer can.
    pub(crate) fn end_stream(&self, node: &NodeKey) -> Result<(), ManagerError> {
        let live = self.control.live_node(node)?;
        if let Some(conn_id) = live.current_stream() {
            tracing::info!(%node, conn_id, "ending the stream of a re-enrolled node");
            self.close_stream(node, &live, conn_id);
        }
        Ok(())
    }

    /// Takes an agent's app report: keeps it for `GetPool`, fences or
    /// releases the node if it is FAILED or FENCED (`failover`), and
    /// records what changed in its pool (`pools`).
    pub async fn record_report(&self, node: &NodeKey, live: &LiveNode, report: AppReport) {
        let previous = live.swap_report(report.clone());
        let running_apps = report
            .apps
            .iter()
            .filter(|a| !matches!(a.state, AppRunState::Stopped))
            .count();
        self.failover.on_report(node, running_apps).await;
        self.pools.record_report(node, report, previous).await;
    }
}
