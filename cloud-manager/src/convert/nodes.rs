//! `ListNodes` and `NodeSummary` requests and answers: page size, page
//! token and filters into a `NodeQuery`, counts into the summary.
//!
//! The page token is the hex encoding of the last node id of the previous
//! page. Clients treat it as opaque; the manager only checks that it
//! decodes to a well-formed node id (the node need not exist any more, and
//! a token never reveals anything the caller could not list).

use edgepool_common::identity::{hex, validate_name};
use edgepool_common::proto as pb;

use crate::control::ManagerError;
use crate::model::NodeState;
use crate::node_list::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, NodeCounts, NodeQuery};

/// The token that makes the next page start after `node_id`.
pub fn page_token(node_id: &str) -> String {
    hex(node_id.as_bytes())
}

/// The node id a page token carries.
fn token_node_id(token: &str) -> Result<String, ManagerError> {
    let bad = || {
        ManagerError::Invalid {
        field: "page_token",
        why: "not a next_page_token of ListNodes (pass it back unchanged, or empty for the first page)"
            .into(),
    }
    };
    if token.len() % 2 != 0 || token.len() > 2 * 63 || !token.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err(bad());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let id = String::from_utf8(bytes).map_err(|_| bad())?;
    validate_name("node id", &id).map_err(|_| bad())?;
    Ok(id)
}

/// A filter state from the wire: UNSPECIFIED means every state.
fn state_filter(value: i32) -> Result<Option<NodeState>, ManagerError> {
    match pb::NodeState::try_from(value) {
        Ok(pb::NodeState::Unspecified) => Ok(None),
        Ok(pb::NodeState::Free) => Ok(Some(NodeState::Free)),
        Ok(pb::NodeState::Member) => Ok(Some(NodeState::Member)),
        Ok(pb::NodeState::Suspect) => Ok(Some(NodeState::Suspect)),
        Ok(pb::NodeState::Failed) => Ok(Some(NodeState::Failed)),
        Ok(pb::NodeState::Fenced) => Ok(Some(NodeState::Fenced)),
        Err(_) => Err(ManagerError::Invalid {
            field: "state",
            why: format!("{value} is not a NodeState"),
        }),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl TryFrom<pb::ListNodesRequest> for NodeQuery {
    type Error = ManagerError;

    fn try_from(r: pb::ListNodesRequest) -> Result<Self, ManagerError> {
        // Larger pages are served as MAX_PAGE_SIZE (clients follow
        // next_page_token anyway), as AIP-158 recommends; only a negative
        // size is an error.
        let page_size = match usize::try_from(r.page_size) {
            Err(_) => {
                return Err(ManagerError::Invalid {
                    field: "page_size",
                    why: format!(
                        "{} is negative (0 = {DEFAULT_PAGE_SIZE}, at most {MAX_PAGE_SIZE})",
                        r.page_size
                    ),
                });
            }
            Ok(0) => DEFAULT_PAGE_SIZE,
            Ok(n) => n.min(MAX_PAGE_SIZE),
        };
        let after = match r.page_token.as_str() {
            "" => None,
            token => Some(token_node_id(token)?),
        };
        Ok(NodeQuery {
            after,
            page_size,
            state: state_filter(r.state)?,
            pool: non_empty(r.pool),
        })
    }
}

impl From<NodeCounts> for pb::NodeSummaryResponse {
    fn from(c: NodeCounts) -> Self {
        pb::NodeSummaryResponse {
            total: c.total,
            connected: c.connected,
            free: c.free,
            member: c.member,
            suspect: c.suspect,
            failed: c.failed,
            fenced: c.fenced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(r: pb::ListNodesRequest) -> Result<NodeQuery, String> {
        NodeQuery::try_from(r).map_err(|e| e.to_string())
    }

    #[test]
    fn tokens_round_trip() {
        for id in ["a", "dev-1", &"x".repeat(63)] {
            assert_eq!(token_node_id(&page_token(id)).unwrap(), id);
        }
    }

    #[test]
    fn malformed_tokens_name_the_field() {
        let too_long = page_token(&"x".repeat(64));
        for token in [
            "x",
            "zz",
            "abc",
            "+1",
            "é",
            "4142",
            "2d61",
            "c3",
            too_long.as_str(),
        ] {
            let e = token_node_id(token).unwrap_err().to_string();
            assert!(e.starts_with("invalid page_token: "), "{token}: {e}");
        }
    }

    #[test]
    fn page_size_defaults_caps_and_refuses_negative() {
        let size = |page_size| {
            query(pb::ListNodesRequest {
                page_size,
                ..Default::default()
            })
            .map(|q| q.page_size)
        };
        assert_eq!(size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(size(7), Ok(7));
        assert_eq!(size(1000), Ok(1000));
        assert_eq!(size(i32::MAX), Ok(MAX_PAGE_SIZE));
        let e = size(-1).unwrap_err();
        assert!(e.starts_with("invalid page_size: -1 is negative"), "{e}");
    }

    #[test]
    fn filters() {
        let q = query(pb::ListNodesRequest {
            page_token: page_token("n-1"),
            state: pb::NodeState::Suspect as i32,
            pool: "web".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(q.after.as_deref(), Some("n-1"));
        assert_eq!(q.state, Some(NodeState::Suspect));
        assert_eq!(q.pool.as_deref(), Some("web"));
        let q = query(pb::ListNodesRequest::default()).unwrap();
        assert_eq!((q.after, q.state, q.pool), (None, None, None));
        let e = query(pb::ListNodesRequest {
            state: 42,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e, "invalid state: 42 is not a NodeState");
    }
}
