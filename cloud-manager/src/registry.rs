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
    /// Keyed by node id, across all tenants.
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
    #[error("node id {0:?} is taken")]
    NodeIdTaken(String),
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
        let replaces = match self.nodes.get(node_id) {
            // A node id of another tenant is never replaced, even with force,
            // and the answer does not say whose it is.
            Some(n) if n.tenant != record.tenant => {
                return Err(EnrollError::NodeIdTaken(node_id.to_string()));
            }
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
        let previous = self.nodes.remove(&plan.node_id);
        let (state, pool, slot) = previous
            .map(|p| (p.state, p.pool, p.slot))
            .unwrap_or_default();
        self.nodes.insert(
            plan.node_id.clone(),
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
    pub fn hello_changes(&self, node_id: &str, hello: &Hello) -> bool {
        self.nodes.get(node_id).is_some_and(|n| {
            n.peer_address != hello.peer_address
                || n.capacity != hello.capacity
                || n.agent_version != hello.agent_version
                || n.hostname != hello.hostname
        })
    }

    /// Records what an agent reported in its hello.
    pub fn apply_hello(&mut self, node_id: &str, hello: &Hello) {
        if let Some(n) = self.nodes.get_mut(node_id) {
            n.peer_address = hello.peer_address.clone();
            n.capacity = hello.capacity;
            n.agent_version = hello.agent_version.clone();
            n.hostname = hello.hostname.clone();
        }
    }

    /// The node `node_id` if it belongs to `tenant`. Another tenant's node is
    /// reported exactly like a missing one.
    pub fn node_of_tenant(&self, tenant: &str, node_id: &str) -> Option<&NodeRecord> {
        self.nodes.get(node_id).filter(|n| n.tenant == tenant)
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
    fn re_enroll_needs_force_and_same_tenant() {
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
        assert_eq!(r.nodes["n1"].cert_serial, "bb");

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
        assert_eq!(
            r.plan_enroll(t3, "n1", true, 1),
            Err(EnrollError::NodeIdTaken("n1".into()))
        );
        assert!(r.node_of_tenant("other", "n1").is_none());
        assert!(r.node_of_tenant("acme", "n1").is_some());
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
