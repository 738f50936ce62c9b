//! The tenant API's view of nodes: each durable record with its live data,
//! listed, paged (`node_list`), counted or looked up. Reads only: nodes
//! change through `enrollment`, `streams`, `pools` and `failover`.

use std::sync::Arc;

use crate::control::{Control, ManagerError};
use crate::live::LiveData;
use crate::model::NodeState;
use crate::node_key::NodeKey;
use crate::node_list::{NodeCounts, NodeQuery, shown_state};
use crate::registry::NodeRecord;

/// A node as the tenant API shows it: durable record + live data.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub record: NodeRecord,
    pub live: LiveData,
}

impl NodeView {
    /// The state the tenant sees (a member without its stream is SUSPECT).
    pub fn state(&self) -> NodeState {
        shown_state(self.record.state, self.live.conn_id.is_some())
    }
}

/// One page of `Nodes::list_nodes_page`.
#[derive(Clone, Debug)]
pub struct NodePage {
    pub nodes: Vec<NodeView>,
    /// Where the next page starts (the last node id of this one), if more
    /// nodes match.
    pub next_after: Option<String>,
}

/// Node queries of the tenant API (no state of its own).
pub struct Nodes {
    control: Arc<Control>,
}

impl Nodes {
    pub fn new(control: Arc<Control>) -> Self {
        Nodes { control }
    }

    fn view(&self, record: &NodeRecord) -> Result<NodeView, ManagerError> {
        let live = self.control.live_data(&record.key())?;
        Ok(NodeView {
            record: record.clone(),
            live,
        })
    }

    /// The tenant's nodes, ordered by id.
    pub fn list_nodes(&self, tenant: &str) -> Result<Vec<NodeView>, ManagerError> {
        let records: Vec<NodeRecord> = self
            .control
            .registry()?
            .nodes_of_tenant(tenant, None)
            .cloned()
            .collect();
        records.iter().map(|r| self.view(r)).collect()
    }

    /// One page of the tenant's nodes (see `node_list`): the registry is
    /// walked from the cursor on, and only the page's nodes are copied.
    pub fn list_nodes_page(
        &self,
        tenant: &str,
        query: &NodeQuery,
    ) -> Result<NodePage, ManagerError> {
        // Lock order as everywhere: registry, then the live map (read),
        // then one node's live data at a time.
        let registry = self.control.registry()?;
        let live = self.control.live_nodes()?;
        let nodes = registry.nodes_of_tenant(tenant, query.after.as_deref());
        let page = crate::node_list::page(nodes, tenant, query, |id| {
            live.get(&NodeKey::new(tenant, id))
                .is_some_and(|l| l.is_connected())
        });
        let nodes = page
            .nodes
            .into_iter()
            .map(|record| NodeView {
                record: record.clone(),
                live: live
                    .get(&record.key())
                    .map(|l| l.snapshot())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(NodePage {
            nodes,
            next_after: page.next_after,
        })
    }

    /// How many of the tenant's nodes (only `pool`'s members, if given) are
    /// in each state. Copies nothing.
    pub fn node_summary(
        &self,
        tenant: &str,
        pool: Option<&str>,
    ) -> Result<NodeCounts, ManagerError> {
        let registry = self.control.registry()?;
        let live = self.control.live_nodes()?;
        Ok(crate::node_list::count(
            registry.nodes_of_tenant(tenant, None),
            tenant,
            pool,
            |id| {
                live.get(&NodeKey::new(tenant, id))
                    .is_some_and(|l| l.is_connected())
            },
        ))
    }

    /// One of the tenant's nodes; another tenant's node is "not found".
    pub fn get_node(&self, tenant: &str, node_id: &str) -> Result<NodeView, ManagerError> {
        let record = self
            .control
            .registry()?
            .node_of_tenant(tenant, node_id)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(format!("node {node_id:?} not found")))?;
        self.view(&record)
    }
}
