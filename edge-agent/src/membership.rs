//! Pool membership as the agent knows it, and the rule for who may call
//! this agent's PeerService. Pure logic: no network.
//!
//! Two agents trust each other iff both present a valid member certificate
//! issued by their pool's CA (checked by TLS with that pool CA as the only
//! anchor, `trust::MemberCheck`) for a name of the pool, for a slot that is
//! in the current membership with exactly that certificate serial (so a
//! replaced or revoked certificate stops working as soon as the new
//! membership arrives). Both ends check this during the handshake. An
//! expired certificate counts as valid only under the offline grace
//! (`trust::OfflineGrace`, set on `check` by `node`).

use edgepool_common::identity::{Identity, cert_serial_hex};
use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_common::trust::{MemberCheck, pool_prefix};
use rustls::pki_types::CertificateDer;

use crate::state::NodeInfo;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub slot: u32,
    pub node_id: String,
    pub cert_serial: String,
    pub peer_address: String,
}

/// This node's current place in a pool.
#[derive(Clone, Debug)]
pub struct Membership {
    pub domain: String,
    pub tenant: String,
    pub pool: String,
    pub slot: u32,
    pub generation: u64,
    /// Our member certificate followed by the pool CA: what we present.
    pub chain: Vec<CertificateDer<'static>>,
    pub serial: String,
    pub members: Vec<Peer>,
    /// Checks member certificates against this pool's CA.
    pub check: MemberCheck,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MembershipError {
    #[error("assignment: {0}")]
    BadCertificate(String),
    #[error("assignment: member certificate names {got}, expected {expected}")]
    WrongIdentity { got: String, expected: String },
    #[error("assignment: member certificate is not for this node's key")]
    WrongKey,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerDenied {
    #[error("this node is not a pool member")]
    NotMember,
    #[error("only members of pool {0:?} may call PeerService")]
    NotOurPool(String),
    #[error("slot {0} is not in the current membership")]
    UnknownSlot(u32),
    #[error("certificate of slot {0} has been replaced or revoked")]
    StaleCertificate(u32),
}

fn spki(der: &[u8]) -> Result<Vec<u8>, MembershipError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| MembershipError::BadCertificate(e.to_string()))?;
    Ok(cert.public_key().raw.to_vec())
}

impl Membership {
    /// Reads an assignment. `Ok(None)` means "not a member". The member
    /// certificate must name this node's slot and be for this node's key.
    pub fn from_assignment(
        a: &pb::Assignment,
        info: &NodeInfo,
        node_cert: &CertificateDer<'_>,
    ) -> Result<Option<Membership>, MembershipError> {
        if a.pool.is_empty() {
            return Ok(None);
        }
        let bad = |e: tls::TlsError| MembershipError::BadCertificate(e.to_string());
        let member = tls::certs_from_pem(&a.member_cert_pem, "member certificate").map_err(bad)?;
        let pool_ca = tls::certs_from_pem(&a.pool_ca_pem, "pool CA").map_err(bad)?;
        let got = Identity::from_cert_der(member[0].as_ref())
            .map_err(|e| MembershipError::BadCertificate(e.to_string()))?;
        let expected = Identity::Member {
            domain: info.trust_domain.clone(),
            tenant: info.tenant.clone(),
            pool: a.pool.clone(),
            slot: a.slot,
        };
        if got != expected {
            return Err(MembershipError::WrongIdentity {
                got: got.to_string(),
                expected: expected.to_string(),
            });
        }
        if spki(member[0].as_ref())? != spki(node_cert.as_ref())? {
            return Err(MembershipError::WrongKey);
        }
        let pool_ca_der = pool_ca
            .first()
            .ok_or_else(|| MembershipError::BadCertificate("pool CA: no certificate".into()))?;
        let check = MemberCheck::new(
            pool_ca_der,
            pool_prefix(&info.trust_domain, &info.tenant, &a.pool),
        )
        .map_err(|e| MembershipError::BadCertificate(e.to_string()))?;
        let serial = cert_serial_hex(member[0].as_ref())
            .map_err(|e| MembershipError::BadCertificate(e.to_string()))?;
        let members = a
            .members
            .iter()
            .map(|m| Peer {
                slot: m.slot,
                node_id: m.node_id.clone(),
                cert_serial: m.cert_serial.clone(),
                peer_address: m.peer_address.clone(),
            })
            .collect();
        let mut chain = vec![member[0].clone()];
        chain.extend(pool_ca);
        Ok(Some(Membership {
            domain: info.trust_domain.clone(),
            tenant: info.tenant.clone(),
            pool: a.pool.clone(),
            slot: a.slot,
            generation: a.generation,
            chain,
            serial,
            members,
            check,
        }))
    }

    /// Decides whether a caller presenting `caller` (from its verified
    /// certificate) with serial `serial` may use PeerService. Returns the
    /// caller's slot.
    pub fn authorize(&self, caller: &Identity, serial: &str) -> Result<u32, PeerDenied> {
        let Identity::Member {
            domain,
            tenant,
            pool,
            slot,
        } = caller
        else {
            return Err(PeerDenied::NotOurPool(self.pool.clone()));
        };
        if *domain != self.domain || *tenant != self.tenant || *pool != self.pool {
            return Err(PeerDenied::NotOurPool(self.pool.clone()));
        }
        let peer = self
            .members
            .iter()
            .find(|m| m.slot == *slot)
            .ok_or(PeerDenied::UnknownSlot(*slot))?;
        if peer.cert_serial != serial {
            return Err(PeerDenied::StaleCertificate(*slot));
        }
        Ok(*slot)
    }

    /// The other members (peers) of the pool.
    pub fn others(&self) -> impl Iterator<Item = &Peer> {
        self.members.iter().filter(move |m| m.slot != self.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership() -> Membership {
        Membership {
            domain: "d".into(),
            tenant: "t".into(),
            pool: "p".into(),
            slot: 1,
            generation: 1,
            chain: vec![],
            serial: "aa".into(),
            members: vec![
                Peer {
                    slot: 1,
                    node_id: "n1".into(),
                    cert_serial: "aa".into(),
                    peer_address: String::new(),
                },
                Peer {
                    slot: 2,
                    node_id: "n2".into(),
                    cert_serial: "bb".into(),
                    peer_address: String::new(),
                },
            ],
            check: check(),
        }
    }

    /// A check against a throw-away pool CA.
    fn check() -> MemberCheck {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        let ca = params.self_signed(&key).unwrap();
        MemberCheck::new(ca.der(), pool_prefix("d", "t", "p")).unwrap()
    }

    fn member(tenant: &str, pool: &str, slot: u32) -> Identity {
        Identity::Member {
            domain: "d".into(),
            tenant: tenant.into(),
            pool: pool.into(),
            slot,
        }
    }

    #[test]
    fn only_current_members_of_the_same_pool_pass() {
        let m = membership();
        assert_eq!(m.authorize(&member("t", "p", 2), "bb"), Ok(2));
        assert_eq!(
            m.authorize(&member("t", "p", 2), "old"),
            Err(PeerDenied::StaleCertificate(2))
        );
        assert_eq!(
            m.authorize(&member("t", "p", 3), "cc"),
            Err(PeerDenied::UnknownSlot(3))
        );
        assert!(m.authorize(&member("t", "other", 2), "bb").is_err());
        assert!(m.authorize(&member("u", "p", 2), "bb").is_err());
        let node = Identity::Node {
            domain: "d".into(),
            tenant: "t".into(),
            node_id: "n2".into(),
        };
        assert!(m.authorize(&node, "bb").is_err());
        let user = Identity::Tenant {
            domain: "d".into(),
            tenant: "t".into(),
            user: "admin".into(),
        };
        assert!(m.authorize(&user, "bb").is_err());
        let other_domain = Identity::Member {
            domain: "x".into(),
            tenant: "t".into(),
            pool: "p".into(),
            slot: 2,
        };
        assert!(m.authorize(&other_domain, "bb").is_err());
    }

    #[test]
    fn others_excludes_self() {
        let m = membership();
        let slots: Vec<u32> = m.others().map(|p| p.slot).collect();
        assert_eq!(slots, vec![2]);
    }
}
