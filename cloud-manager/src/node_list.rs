//! Listing a tenant's nodes a page at a time and counting them by state
//! (pure: no I/O, no tonic or prost).
//!
//! Pages are cut from the tenant's range of the registry's node map
//! (`Registry::nodes_of_tenant`, ordered by node id): a page starts right
//! after the last node id of the previous one (a range of the ordered
//! map), so a page costs the nodes it walks past, not the whole fleet, and a node that enrolls while a client
//! pages through is either on a later page or (if its id sorts before the
//! cursor) not at all, never twice.

use crate::model::NodeState;
use crate::registry::NodeRecord;

/// Nodes per page when the request does not say.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page; larger requests are served this many.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Which of a tenant's nodes a listing returns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeQuery {
    /// Start after this node id (the previous page's last); `None` = first page.
    pub after: Option<String>,
    /// Nodes per page, 1..=MAX_PAGE_SIZE.
    pub page_size: usize,
    /// Only nodes shown in this state.
    pub state: Option<NodeState>,
    /// Only members of this pool.
    pub pool: Option<String>,
}

/// One page of records and, if more nodes match, where the next page starts.
#[derive(Debug, PartialEq, Eq)]
pub struct Page<'a> {
    pub nodes: Vec<&'a NodeRecord>,
    /// The last node id of this page, when at least one more node matches.
    pub next_after: Option<String>,
}

/// How many nodes are in each state (as shown), and how many are connected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    pub total: u32,
    pub connected: u32,
    pub free: u32,
    pub member: u32,
    pub suspect: u32,
    pub failed: u32,
    pub fenced: u32,
}

/// The state a tenant sees: a member whose stream is closed is SUSPECT
/// (derived, never stored; it is MEMBER again once it reconnects).
pub fn shown_state(stored: NodeState, connected: bool) -> NodeState {
    if stored == NodeState::Member && !connected {
        NodeState::Suspect
    } else {
        stored
    }
}

/// The page of `tenant`'s nodes that `query` asks for. `connected` tells
/// whether a node's stream is open; it is asked only for the nodes it
/// matters for (members, under a state filter).
///
/// `nodes` are the registry's nodes after `query.after`, in id order.
pub fn page<'a>(
    nodes: impl Iterator<Item = &'a NodeRecord>,
    tenant: &str,
    query: &NodeQuery,
    connected: impl Fn(&str) -> bool,
) -> Page<'a> {
    let size = query.page_size.clamp(1, MAX_PAGE_SIZE);
    let mut matching = nodes
        .filter(|n| n.tenant == tenant)
        .filter(|n| query.pool.as_ref().is_none_or(|p| n.pool == *p))
        .filter(|n| {
            query
                .state
                .is_none_or(|s| shown_state(n.state, connected(&n.node_id)) == s)
        });
    let page: Vec<&NodeRecord> = matching.by_ref().take(size).collect();
    // Look one match ahead, so that the last page carries no token.
    let next_after = match (matching.next(), page.last()) {
        (Some(_), Some(last)) => Some(last.node_id.clone()),
        _ => None,
    };
    Page {
        nodes: page,
        next_after,
    }
}

/// Counts `tenant`'s nodes (only `pool`'s members, if given) by state.
pub fn count<'a>(
    nodes: impl IntoIterator<Item = &'a NodeRecord>,
    tenant: &str,
    pool: Option<&str>,
    connected: impl Fn(&str) -> bool,
) -> NodeCounts {
    let mut c = NodeCounts::default();
    for n in nodes {
        if n.tenant != tenant || pool.is_some_and(|p| n.pool != p) {
            continue;
        }
        let up = connected(&n.node_id);
        c.total += 1;
        c.connected += u32::from(up);
        let slot = match shown_state(n.state, up) {
            NodeState::Free => &mut c.free,
            NodeState::Member => &mut c.member,
            NodeState::Suspect => &mut c.suspect,
            NodeState::Failed => &mut c.failed,
            NodeState::Fenced => &mut c.fenced,
        };
        *slot += 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::ops::Bound;

    fn node(id: &str, tenant: &str, state: NodeState, pool: &str) -> NodeRecord {
        NodeRecord {
            node_id: id.into(),
            tenant: tenant.into(),
            labels: BTreeMap::new(),
            cert_serial: String::new(),
            enrolled_at_ms: 0,
            state,
            peer_address: String::new(),
            capacity: Default::default(),
            agent_version: String::new(),
            hostname: String::new(),
            cert_pem: String::new(),
            pool: pool.into(),
            slot: 0,
        }
    }

    /// n-00 .. n-09 of tenant a (n-03/n-04 members of pool p, n-04 without
    /// a stream), interleaved with tenant b's nodes.
    fn from_cursor<'a>(
        nodes: &'a BTreeMap<String, NodeRecord>,
        q: &NodeQuery,
    ) -> impl Iterator<Item = &'a NodeRecord> {
        let start = match &q.after {
            Some(id) => Bound::Excluded(id.as_str()),
            None => Bound::Unbounded,
        };
        nodes
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(_, n)| n)
    }

    fn fleet() -> BTreeMap<String, NodeRecord> {
        let mut m = BTreeMap::new();
        for i in 0..10 {
            let (state, pool) = match i {
                3 | 4 => (NodeState::Member, "p"),
                7 => (NodeState::Failed, ""),
                _ => (NodeState::Free, ""),
            };
            let id = format!("n-{i:02}");
            m.insert(id.clone(), node(&id, "a", state, pool));
            let other = format!("n-{i:02}-b");
            m.insert(other.clone(), node(&other, "b", NodeState::Member, "p"));
        }
        m
    }

    fn up(id: &str) -> bool {
        id != "n-04"
    }

    fn ids(p: &Page) -> Vec<String> {
        p.nodes.iter().map(|n| n.node_id.clone()).collect()
    }

    #[test]
    fn pages_cover_the_tenants_nodes_once_in_order() {
        let nodes = fleet();
        let mut q = NodeQuery {
            page_size: 3,
            ..Default::default()
        };
        let mut seen = Vec::new();
        let mut pages = 0;
        loop {
            let p = page(from_cursor(&nodes, &q), "a", &q, up);
            seen.extend(ids(&p));
            pages += 1;
            match p.next_after {
                Some(after) => q.after = Some(after),
                None => break,
            }
        }
        let want: Vec<String> = (0..10).map(|i| format!("n-{i:02}")).collect();
        assert_eq!(seen, want);
        // 3 + 3 + 3 + 1: the last page is the one without a token.
        assert_eq!(pages, 4);
    }

    #[test]
    fn a_full_last_page_carries_no_token() {
        let nodes = fleet();
        let q = NodeQuery {
            page_size: 10,
            ..Default::default()
        };
        let p = page(from_cursor(&nodes, &q), "a", &q, up);
        assert_eq!(p.nodes.len(), 10);
        assert_eq!(p.next_after, None);
    }

    #[test]
    fn filters_by_shown_state_and_pool() {
        let nodes = fleet();
        let q = |state, pool: Option<&str>| NodeQuery {
            page_size: 100,
            state,
            pool: pool.map(String::from),
            ..Default::default()
        };
        let get = |query: NodeQuery| ids(&page(from_cursor(&nodes, &query), "a", &query, up));
        assert_eq!(get(q(Some(NodeState::Member), None)), ["n-03"]);
        assert_eq!(get(q(Some(NodeState::Suspect), None)), ["n-04"]);
        assert_eq!(get(q(Some(NodeState::Failed), None)), ["n-07"]);
        assert_eq!(get(q(None, Some("p"))), ["n-03", "n-04"]);
        assert_eq!(
            get(q(Some(NodeState::Free), Some("p"))),
            Vec::<String>::new()
        );
        assert_eq!(get(q(None, Some("none"))), Vec::<String>::new());
    }

    #[test]
    fn a_cursor_that_is_gone_or_foreign_still_pages_on() {
        let nodes = fleet();
        for after in ["n-05-gone", "n-05-b"] {
            let q = NodeQuery {
                after: Some(after.into()),
                page_size: 2,
                ..Default::default()
            };
            let p = page(from_cursor(&nodes, &q), "a", &q, up);
            assert_eq!(ids(&p), ["n-06", "n-07"]);
            assert_eq!(p.next_after.as_deref(), Some("n-07"));
        }
    }

    #[test]
    fn counts_by_shown_state_for_the_tenant_only() {
        let nodes = fleet();
        let c = count(nodes.values(), "a", None, up);
        assert_eq!(
            c,
            NodeCounts {
                total: 10,
                connected: 9,
                free: 7,
                member: 1,
                suspect: 1,
                failed: 1,
                fenced: 0,
            }
        );
        let c = count(nodes.values(), "a", Some("p"), up);
        assert_eq!((c.total, c.member, c.suspect), (2, 1, 1));
        assert_eq!(count(nodes.values(), "nobody", None, up).total, 0);
    }
}
