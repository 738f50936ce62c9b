//! `Enrollment`: join tokens, redeeming one (`enroll`: sign the node's
//! CSR, record the node) and checking that a node's certificate is its
//! current one (`authorize_node`). Its durable state (tokens, node records)
//! lives in the registry; it has no worker.

use std::collections::BTreeMap;
use std::sync::Arc;

use edgepool_common::identity::Identity;

use crate::control::{Control, ManagerError};
use crate::events::{EventKind, EventRecord};
use crate::model::now_ms;
use crate::node_key::NodeKey;
use crate::pools::Pools;
use crate::registry::{TOKEN_BYTES, TOKEN_PREFIX, TokenRecord};
use crate::streams::Streams;

/// What a successful enrollment returns to the node.
#[derive(Clone, Debug)]
pub struct EnrollGrant {
    pub node_id: String,
    pub tenant: String,
    pub trust_domain: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub labels: BTreeMap<String, String>,
}

/// The enrollment component. A forced re-enrollment of a pool member
/// re-issues its member certificate (`Pools`) and ends its old stream
/// (`Streams`).
pub struct Enrollment {
    control: Arc<Control>,
    pools: Arc<Pools>,
    streams: Arc<Streams>,
    /// When the next token's retention after expiry ends (0: not known
    /// yet): a new token prunes the old ones only from then on, so adding
    /// one does not walk them all.
    prune_due_ms: std::sync::atomic::AtomicU64,
}

impl Enrollment {
    pub fn new(control: Arc<Control>, pools: Arc<Pools>, streams: Arc<Streams>) -> Self {
        Enrollment {
            control,
            pools,
            streams,
            prune_due_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Creates a single-use join token for `tenant`. Returns the token and
    /// its expiry (ms since the epoch).
    pub async fn create_token(
        &self,
        tenant: &str,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<(String, u64), ManagerError> {
        let ttl = match ttl_seconds {
            0 => self.control.config.token_default_ttl_seconds,
            t if t > self.control.config.token_max_ttl_seconds => {
                return Err(ManagerError::Invalid {
                    field: "ttl_seconds",
                    why: format!(
                        "{t} is more than the maximum {}",
                        self.control.config.token_max_ttl_seconds
                    ),
                });
            }
            t => t,
        };
        validate_labels(&labels)?;
        let token = format!("{TOKEN_PREFIX}{}", crate::random::hex_token(TOKEN_BYTES));
        let now = now_ms();
        let expires = now + u64::from(ttl) * 1000;
        let record = TokenRecord {
            tenant: tenant.to_string(),
            labels,
            created_at_ms: now,
            expires_at_ms: expires,
            used_by: None,
        };
        use std::sync::atomic::Ordering;
        let gone = expires.saturating_add(crate::registry::TOKEN_RETENTION_MS);
        let prune = now >= self.prune_due_ms.load(Ordering::Relaxed);
        let next = self
            .control
            .mutate_async(|r| {
                r.insert_token(&token, record);
                Ok(prune.then(|| r.prune_tokens(now)))
            })
            .await?;
        match next {
            Some(next) => self.prune_due_ms.store(next.min(gone), Ordering::Relaxed),
            None => {
                self.prune_due_ms.fetch_min(gone, Ordering::Relaxed);
            }
        }
        Ok((token, expires))
    }

    /// Redeems a join token: signs the node's CSR and records the node.
    ///
    /// A forced re-enrollment of a pool member also re-issues its member
    /// certificate for the new key and bumps the pool generation, in the
    /// same registry change; then the node's old stream is ended and every
    /// member gets the new assignment (`Pools::reissue_member_for_new_key`).
    pub fn enroll(
        &self,
        token: &str,
        node_id: &str,
        csr_pem: &str,
        force: bool,
    ) -> Result<EnrollGrant, ManagerError> {
        let validity =
            time::Duration::hours(i64::from(self.control.config.node_cert_validity_hours));
        // Decided first on the committed registry, which takes no lock and
        // copies nothing: an unknown, used or expired token (a guess) is
        // refused without touching the head lock that every change takes.
        // The plan is made again under that lock, where it counts.
        self.control
            .registry()?
            .plan_enroll(token, node_id, force, now_ms())?;
        let (grant, replaces, push) = self.control.mutate(|r| {
            let now = now_ms();
            let plan = r.plan_enroll(token, node_id, force, now)?;
            let identity = Identity::Node {
                domain: self.control.config.trust_domain.clone(),
                tenant: plan.tenant.clone(),
                node_id: plan.node_id.clone(),
            };
            let issued = self
                .control
                .ca
                .sign_node_csr(csr_pem, &identity, validity)?;
            r.apply_enroll(&plan, &issued.serial_hex, &issued.cert_pem, now);
            r.events.push(
                EventRecord::new(&plan.tenant, "", EventKind::NodeEnrolled)
                    .node(&plan.node_id, 0)
                    .message(if plan.replaces {
                        "enrolled again (--force)"
                    } else {
                        "enrolled"
                    }),
                now,
            );
            let push = if plan.replaces {
                self.pools
                    .reissue_member_for_new_key(r, &plan.key(), &issued.cert_pem, now)?
            } else {
                Vec::new()
            };
            let grant = EnrollGrant {
                node_id: plan.node_id.clone(),
                tenant: plan.tenant.clone(),
                trust_domain: self.control.config.trust_domain.clone(),
                cert_pem: issued.cert_pem,
                ca_pem: self.control.ca.cert_pem().to_string(),
                labels: plan.labels,
            };
            Ok((grant, plan.replaces, push))
        })?;
        tracing::info!(node = %grant.node_id, tenant = %grant.tenant, force, "node enrolled");
        if replaces {
            // The old stream belongs to the replaced certificate: end it
            // before the new assignment (for the new key) goes out.
            self.streams
                .end_stream(&NodeKey::new(&grant.tenant, &grant.node_id))?;
        }
        self.pools.push_assignments(push)?;
        Ok(grant)
    }

    /// Checks that a verified node certificate is the node's current one:
    /// the node exists in that tenant and the serial matches (a certificate
    /// replaced by `join --force` stops working at once).
    pub fn authorize_node(
        &self,
        tenant: &str,
        node_id: &str,
        cert_serial: &str,
    ) -> Result<(), ManagerError> {
        let r = self.control.registry()?;
        match r.node_of_tenant(tenant, node_id) {
            Some(n) if n.cert_serial == cert_serial => Ok(()),
            Some(_) => Err(ManagerError::PermissionDenied(
                "this node certificate has been replaced".into(),
            )),
            None => Err(ManagerError::PermissionDenied(
                "no such enrolled node".into(),
            )),
        }
    }
}

/// Label keys are names (1-63 of `[a-z0-9-./]`); values at most 253 bytes.
fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ManagerError> {
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'/' | b'_')
            });
        if !key_ok {
            return Err(ManagerError::Invalid {
                field: "labels",
                why: format!("label key {k:?} must be 1-63 characters of [a-z0-9-._/]"),
            });
        }
        if v.len() > 253 || v.chars().any(char::is_control) {
            return Err(ManagerError::Invalid {
                field: "labels",
                why: format!("label {k:?}: value must be at most 253 printable characters"),
            });
        }
    }
    Ok(())
}
