//! Durable registry of join tokens and enrolled nodes: pure state and
//! decisions, no I/O. The manager applies a change to a copy (O(1): the
//! tables are persistent maps, see `table`), commits the rows the change
//! touched through the `Store`, and only then makes the copy current, so a
//! refused or failed request changes nothing.

use std::collections::BTreeMap;

use edgepool_common::identity::validate_name;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::events::EventLog;
use crate::model::{Hello, NodeState, Resources};
use crate::node_key::NodeKey;
use crate::node_state::{InvalidTransition, NodeEvent, transition};
use crate::pool::PoolRecord;
use crate::table::Table;

/// Prefix of every join token, so a token pasted in the wrong place is easy
/// to recognise (and to grep out of logs).
pub const TOKEN_PREFIX: &str = "ept_";
/// Random bytes in a token (hex-encoded after the prefix).
pub const TOKEN_BYTES: usize = 24;
/// Used or expired tokens are kept this long after expiry so that a reuse is
/// answered "already used"/"expired" rather than "unknown".
pub(crate) const TOKEN_RETENTION_MS: u64 = 24 * 3600 * 1000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// The node that redeemed it; a token is single-use.
    pub used_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node_id: String,
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    /// Serial (hex) of the one identity certificate currently accepted.
    pub cert_serial: String,
    pub enrolled_at_ms: u64,
    pub state: NodeState,
    pub peer_address: String,
    pub capacity: Resources,
    pub agent_version: String,
    pub hostname: String,
    /// The node's identity certificate (PEM); member certificates are
    /// issued for its public key.
    #[serde(default)]
    pub cert_pem: String,
    /// Pool and slot while the node is a member.
    #[serde(default)]
    pub pool: String,
    #[serde(default)]
    pub slot: u32,
}

impl NodeRecord {
    /// A FREE node with nothing reported yet (unit tests).
    #[cfg(test)]
    pub(crate) fn free_for_tests(tenant: &str, node_id: &str) -> NodeRecord {
        NodeRecord {
            node_id: node_id.into(),
            tenant: tenant.into(),
            labels: BTreeMap::new(),
            cert_serial: String::new(),
            enrolled_at_ms: 0,
            state: NodeState::Free,
            peer_address: String::new(),
            capacity: Resources::default(),
            agent_version: String::new(),
            hostname: String::new(),
            cert_pem: String::new(),
            pool: String::new(),
            slot: 0,
        }
    }

    pub fn key(&self) -> NodeKey {
        NodeKey::new(&self.tenant, &self.node_id)
    }

    /// Moves the node through its lifecycle (`node_state::transition`, the
    /// only place `state` changes): `Join` makes it the member holding
    /// `slot` of `pool`; every other event leaves it in no pool.
    pub fn change(
        &mut self,
        event: NodeEvent,
        pool: &str,
        slot: u32,
    ) -> Result<(), InvalidTransition> {
        self.state = transition(self.state, event)?;
        if event == NodeEvent::Join {
            self.pool = pool.to_string();
            self.slot = slot;
        } else {
            self.pool.clear();
            self.slot = 0;
        }
        Ok(())
    }
}

/// Everything the manager must not lose. Cloning it is O(1) in the number
/// of tokens, nodes and pools (and O(tenants) for the event rings).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Registry {
    /// Keyed by SHA-256 (hex) of the token: the secret itself is never stored.
    pub tokens: Table<TokenRecord>,
    /// Keyed by `tenant/node_id` (`NodeKey`): node ids are per tenant.
    pub nodes: Table<NodeRecord>,
    /// Keyed by `tenant/name`.
    pub pools: Table<PoolRecord>,
    /// Stored row by row by the `Store` (see `events`), never as a whole.
    pub events: EventLog,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    #[error("join token is malformed (expected {TOKEN_PREFIX}<{} hex digits>)", TOKEN_BYTES * 2)]
    MalformedToken,
    #[error("join token is not known to this manager")]
    UnknownToken,
    #[error("join token has expired")]
    ExpiredToken,
    #[error("join token was already used (by node {0:?}); create a new one")]
    UsedToken(String),
    #[error("{0}")]
    BadNodeId(String),
    #[error(
        "node {0:?} is already enrolled; run join with --force to replace it (its old certificate stops working)"
    )]
    NodeExists(String),
}

/// What a valid enrollment will do, decided before anything is signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EnrollPlan {
    pub token_hash: String,
    pub tenant: String,
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    pub replaces: bool,
}

impl EnrollPlan {
    /// The enrolled node's key.
    pub fn key(&self) -> NodeKey {
        NodeKey::new(&self.tenant, &self.node_id)
    }
}

pub fn hash_token(token: &str) -> String {
    edgepool_common::identity::hex(&Sha256::digest(token.as_bytes()))
}

/// Checks the shape of a token without looking it up.
pub fn token_well_formed(token: &str) -> bool {
    token.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == TOKEN_BYTES * 2 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

impl Registry {
    /// Forgets which rows were touched: the start of a new change.
    pub fn clear_touched(&mut self) {
        self.tokens.clear_touched();
        self.nodes.clear_touched();
        self.pools.clear_touched();
        self.events.clear_touched();
    }

    /// Records a new token (given its secret) and drops long-dead ones.
    pub fn add_token(&mut self, token: &str, record: TokenRecord, now_ms: u64) {
        self.prune_tokens(now_ms);
        self.insert_token(token, record);
    }

    /// Records a token (by its hash), pruning nothing.
    pub fn insert_token(&mut self, token: &str, record: TokenRecord) {
        self.tokens.insert(hash_token(token), record);
    }

    /// Drops tokens whose retention after expiry is over; returns when the
    /// next one's is (u64::MAX if none is left). A walk over every token,
    /// so callers run it only when that time has come (`Enrollment`).
    pub fn prune_tokens(&mut self, now_ms: u64) -> u64 {
        let gone = |t: &TokenRecord| t.expires_at_ms.saturating_add(TOKEN_RETENTION_MS);
        self.tokens.retain(|_, t| gone(t) > now_ms);
        self.tokens.values().map(gone).min().unwrap_or(u64::MAX)
    }

    /// Decides whether `token` may enroll `node_id`. Changes nothing.
    pub fn plan_enroll(
        &self,
        token: &str,
        node_id: &str,
        force: bool,
        now_ms: u64,
    ) -> Result<EnrollPlan, EnrollError> {
        if !token_well_formed(token) {
            return Err(EnrollError::MalformedToken);
        }
        validate_name("node id", node_id).map_err(|e| EnrollError::BadNodeId(e.to_string()))?;
        let token_hash = hash_token(token);
        let record = self
            .tokens
            .get(&token_hash)
            .ok_or(EnrollError::UnknownToken)?;
        if let Some(by) = &record.used_by {
            return Err(EnrollError::UsedToken(by.clone()));
        }
        if now_ms >= record.expires_at_ms {
            return Err(EnrollError::ExpiredToken);
        }
        // Node ids are per tenant: only the token's own tenant's nodes count.
        let replaces = match self.node(&NodeKey::new(&record.tenant, node_id)) {
            Some(_) if !force => return Err(EnrollError::NodeExists(node_id.to_string())),
            Some(_) => true,
            None => false,
        };
        Ok(EnrollPlan {
            token_hash,
            tenant: record.tenant.clone(),
            node_id: node_id.to_string(),
            labels: record.labels.clone(),
            replaces,
        })
    }

    /// Applies a plan once the certificate is signed: the token is spent and
    /// the node (re)created with the new certificate serial.
    pub fn apply_enroll(
        &mut self,
        plan: &EnrollPlan,
        cert_serial: &str,
        cert_pem: &str,
        now_ms: u64,
    ) {
        if let Some(t) = self.tokens.get_mut(&plan.token_hash) {
            t.used_by = Some(plan.node_id.clone());
        }
        // A re-enrolled node keeps its pool membership (state, pool, slot).
        let key = plan.key();
        let previous = self.nodes.remove(key.as_str());
        let (state, pool, slot) = previous
            .map(|p| (p.state, p.pool, p.slot))
            .unwrap_or_default();
        self.nodes.insert(
            key.as_str().to_string(),
            NodeRecord {
                node_id: plan.node_id.clone(),
                tenant: plan.tenant.clone(),
                labels: plan.labels.clone(),
                cert_serial: cert_serial.to_string(),
                enrolled_at_ms: now_ms,
                state,
                peer_address: String::new(),
                capacity: Resources::default(),
                agent_version: String::new(),
                hostname: String::new(),
                cert_pem: cert_pem.to_string(),
                pool,
                slot,
            },
        );
    }

    /// Whether `hello` differs from what is recorded for `node_id` (so the
    /// caller persists only real changes, not every reconnect).
    pub fn hello_changes(&self, node: &NodeKey, hello: &Hello) -> bool {
        self.node(node).is_some_and(|n| {
            n.peer_address != hello.peer_address
                || n.capacity != hello.capacity
                || n.agent_version != hello.agent_version
                || n.hostname != hello.hostname
        })
    }

    /// Records what an agent reported in its hello.
    pub fn apply_hello(&mut self, node: &NodeKey, hello: &Hello) {
        if let Some(n) = self.node_mut(node) {
            n.peer_address = hello.peer_address.clone();
            n.capacity = hello.capacity;
            n.agent_version = hello.agent_version.clone();
            n.hostname = hello.hostname.clone();
        }
    }

    /// The node `node_id` of `tenant`: a tenant can name only its own
    /// nodes (another tenant's node of the same id is another node).
    pub fn node_of_tenant(&self, tenant: &str, node_id: &str) -> Option<&NodeRecord> {
        self.node(&NodeKey::new(tenant, node_id))
    }

    pub fn node(&self, key: &NodeKey) -> Option<&NodeRecord> {
        self.nodes.get(key.as_str())
    }

    /// The node, to change it (its row is written back).
    pub fn node_mut(&mut self, key: &NodeKey) -> Option<&mut NodeRecord> {
        self.nodes.get_mut(key.as_str())
    }

    /// `tenant`'s nodes after node id `after` (all for `None`), in id order:
    /// one range of the table, other tenants' rows never walked.
    pub fn nodes_of_tenant<'a>(
        &'a self,
        tenant: &'a str,
        after: Option<&str>,
    ) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        let start = match after {
            Some(id) => NodeKey::new(tenant, id).as_str().to_string(),
            None => NodeKey::tenant_prefix(tenant),
        };
        self.nodes
            .after_key(start)
            .take_while(move |n| n.tenant == tenant)
    }

    /// Moves node rows stored by a version that keyed them by node id
    /// alone to their `tenant/node_id` key. Returns how many moved.
    pub fn rekey_nodes(&mut self) -> usize {
        let moved: Vec<String> = self
            .nodes
            .iter()
            .filter(|(k, n)| k.as_str() != NodeKey::new(&n.tenant, &n.node_id).as_str())
            .map(|(k, _)| k.clone())
            .collect();
        for old in &moved {
            if let Some(n) = self.nodes.remove(old) {
                let key = NodeKey::new(&n.tenant, &n.node_id);
                self.nodes.insert(key.as_str().to_string(), n);
            }
        }
        moved.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "ept_000000000000000000000000000000000000000000000001";

    fn reg_with_token(tenant: &str, expires: u64) -> Registry {
        let mut r = Registry::default();
        r.add_token(
            T,
            TokenRecord {
                tenant: tenant.into(),
                labels: BTreeMap::new(),
                created_at_ms: 0,
                expires_at_ms: expires,
                used_by: None,
            },
            0,
        );
        r
    }

    #[test]
    fn token_is_single_use() {
        let mut r = reg_with_token("acme", 1000);
        let plan = r.plan_enroll(T, "n1", false, 10).unwrap();
        r.apply_enroll(&plan, "aa", "", 10);
        assert_eq!(
            r.plan_enroll(T, "n2", false, 11),
            Err(EnrollError::UsedToken("n1".into()))
        );
    }

    #[test]
    fn token_expires() {
        let r = reg_with_token("acme", 1000);
        assert!(r.plan_enroll(T, "n1", false, 999).is_ok());
        assert_eq!(
            r.plan_enroll(T, "n1", false, 1000),
            Err(EnrollError::ExpiredToken)
        );
    }

    #[test]
    fn malformed_and_unknown_tokens() {
        let r = reg_with_token("acme", 1000);
        assert_eq!(
            r.plan_enroll("hello", "n1", false, 0),
            Err(EnrollError::MalformedToken)
        );
        assert_eq!(
            r.plan_enroll(&T.replace("01", "02"), "n1", false, 0),
            Err(EnrollError::UnknownToken)
        );
    }

    #[test]
    fn planning_changes_nothing() {
        let r = reg_with_token("acme", 1000);
        let before = r.clone();
        let _ = r.plan_enroll(T, "n1", false, 0);
        let _ = r.plan_enroll(T, "BAD", false, 0);
        assert_eq!(r, before);
    }

    #[test]
    fn re_enroll_needs_force_and_ids_are_per_tenant() {
        let mut r = reg_with_token("acme", 1000);
        let plan = r.plan_enroll(T, "n1", false, 0).unwrap();
        r.apply_enroll(&plan, "aa", "", 0);
        let t2 = "ept_000000000000000000000000000000000000000000000002";
        r.add_token(
            t2,
            TokenRecord {
                tenant: "acme".into(),
                labels: BTreeMap::new(),
                created_at_ms: 0,
                expires_at_ms: 1000,
                used_by: None,
            },
            0,
        );
        assert_eq!(
            r.plan_enroll(t2, "n1", false, 1),
            Err(EnrollError::NodeExists("n1".into()))
        );
        let plan = r.plan_enroll(t2, "n1", true, 1).unwrap();
        assert!(plan.replaces);
        r.apply_enroll(&plan, "bb", "", 1);
        assert_eq!(r.nodes["acme/n1"].cert_serial, "bb");

        let t3 = "ept_000000000000000000000000000000000000000000000003";
        r.add_token(
            t3,
            TokenRecord {
                tenant: "other".into(),
                labels: BTreeMap::new(),
                created_at_ms: 0,
                expires_at_ms: 1000,
                used_by: None,
            },
            0,
        );
        // Another tenant's n1 is another node: enrolling it neither needs
        // force nor touches acme's n1.
        assert!(r.node_of_tenant("other", "n1").is_none());
        let plan = r.plan_enroll(t3, "n1", false, 1).unwrap();
        assert!(!plan.replaces);
        r.apply_enroll(&plan, "cc", "", 1);
        assert_eq!(r.node_of_tenant("other", "n1").unwrap().cert_serial, "cc");
        assert_eq!(r.node_of_tenant("acme", "n1").unwrap().cert_serial, "bb");
        let ids: Vec<_> = r
            .nodes_of_tenant("acme", None)
            .map(|n| &n.node_id)
            .collect();
        assert_eq!(ids, ["n1"]);
    }

    #[test]
    fn rows_keyed_by_node_id_alone_move_to_their_tenant_key() {
        let mut r = Registry::default();
        for (key, tenant, id) in [("n1", "acme", "n1"), ("other/n1", "other", "n1")] {
            let mut n = NodeRecord::free_for_tests(tenant, id);
            n.cert_serial = key.into();
            r.nodes.insert(key.into(), n);
        }
        r.clear_touched();
        assert_eq!(r.rekey_nodes(), 1);
        let keys: Vec<_> = r.nodes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["acme/n1", "other/n1"]);
        let touched: Vec<_> = r.nodes.touched().map(String::as_str).collect();
        assert_eq!(touched, ["acme/n1", "n1"]);
        assert_eq!(r.rekey_nodes(), 0);
    }

    #[test]
    fn bad_node_ids_are_refused() {
        let r = reg_with_token("acme", 1000);
        for id in ["", "UPPER", "has space", "-lead", "a/b", &"x".repeat(64)] {
            assert!(
                matches!(
                    r.plan_enroll(T, id, false, 0),
                    Err(EnrollError::BadNodeId(_))
                ),
                "{id:?}"
            );
        }
    }

    #[test]
    fn old_tokens_are_pruned() {
        let mut r = reg_with_token("acme", 1000);
        r.add_token(
            "ept_ffffffffffffffffffffffffffffffffffffffffffffffff",
            TokenRecord {
                tenant: "acme".into(),
                labels: BTreeMap::new(),
                created_at_ms: 0,
                expires_at_ms: u64::MAX,
                used_by: None,
            },
            1000 + TOKEN_RETENTION_MS,
        );
        assert_eq!(r.tokens.len(), 1);
    }
}
