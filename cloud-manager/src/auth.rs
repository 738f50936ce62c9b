//! Who is calling: read from the verified TLS client certificate only.
//!
//! `Trust` holds the rules a client certificate must pass, at the TLS
//! handshake (`Trust::verifier`, the manager port's client verifier) and
//! again for every call (`caller`): tenant, node and manager identities
//! must be signed by the root itself (never by a pool CA key), member
//! identities are not accepted here at all, and a revoked tenant
//! certificate (`revocations`) is refused.

use std::path::Path;
use std::sync::Arc;

use edgepool_common::identity::Identity;
use edgepool_common::tls::{self, TlsError};
use edgepool_common::trust::{IssuerVerifier, RootIssued};
use rustls::pki_types::{CertificateDer, UnixTime};
use tonic::{Request, Status};

use crate::forward::FORWARDED_CERT;
use crate::revocations::Revocations;

/// The manager's rules for client certificates.
#[derive(Clone, Debug)]
pub struct Trust {
    domain: String,
    verifier: Arc<IssuerVerifier>,
    revocations: Arc<Revocations>,
}

impl Trust {
    /// Rules for the root CA `root_pem` of trust domain `domain`, with the
    /// revocation list of `data_dir`.
    pub fn new(domain: &str, root_pem: &str, data_dir: &Path) -> Result<Trust, TlsError> {
        let root = tls::certs_from_pem(root_pem, "root CA")?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::NoCertificate {
                what: "root CA".into(),
            })?;
        let revocations = Arc::new(Revocations::new(data_dir));
        let list = revocations.clone();
        let verifier = IssuerVerifier::new(
            RootIssued::new(&root)?,
            None,
            false,
            move |id, serial| match id {
                Identity::Tenant { .. } | Identity::Node { .. } if list.is_revoked(serial) => {
                    Err(format!("certificate {serial} ({id}) has been revoked"))
                }
                _ => Ok(()),
            },
        );
        Ok(Trust {
            domain: domain.to_string(),
            verifier,
            revocations,
        })
    }

    /// Whether the certificate with serial `serial` has been revoked since
    /// (for calls that outlive their handshake, like WatchEvents).
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revocations.is_revoked(serial)
    }

    /// The client-certificate verifier of the manager's port.
    pub fn verifier(&self) -> Arc<IssuerVerifier> {
        self.verifier.clone()
    }
}

/// The authenticated caller of an RPC.
#[derive(Clone, Debug)]
pub struct Caller {
    pub identity: Identity,
    /// Hex serial of the presented certificate.
    pub serial: String,
}

/// The caller's identity. The TLS handshake has already verified the chain
/// against the root CA (a certificate from another CA, or self-signed, never
/// gets this far); here we require that a certificate was presented and that
/// it names our trust domain.
///
/// A call a standby replica forwarded (see `forward`) comes on a connection
/// whose client is the replica: its certificate alone, a manager identity of
/// our domain (client auth, so never the server certificate; alone, so
/// signed by the root itself). Then the caller is the certificate in the
/// `x-edgepool-forwarded-cert` header, which the replica verified in its own
/// handshake, and it is checked here like any other; without the header
/// the call has no client certificate.
///
/// Whichever way it came, the certificate passes `Trust`'s rules here (the
/// handshake applied them to a direct caller already; a forwarded one was
/// checked by the replica, and is checked again by the leader).
pub fn caller<T>(request: &Request<T>, trust: &Trust) -> Result<Caller, Status> {
    let domain = trust.domain.as_str();
    let none = || Status::unauthenticated("this call needs a client certificate");
    let certs = request.peer_certs().ok_or_else(none)?;
    let leaf = certs.first().ok_or_else(none)?;
    let forwarded;
    let leaf: &[u8] = if certs.len() == 1 && is_replica(leaf.as_ref(), domain) {
        let value = request
            .metadata()
            .get(FORWARDED_CERT)
            .ok_or_else(none)?
            .to_str()
            .map_err(|_| Status::unauthenticated("forwarded client certificate is not text"))?;
        forwarded = unhex(value).ok_or_else(|| {
            Status::unauthenticated("forwarded client certificate is not hex DER")
        })?;
        &forwarded
    } else {
        leaf.as_ref()
    };
    let (identity, serial) = trust
        .verifier
        .check(&CertificateDer::from(leaf), UnixTime::now())
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if identity.domain() != domain {
        return Err(Status::permission_denied(format!(
            "client certificate is for trust domain {:?}, not {domain:?}",
            identity.domain()
        )));
    }
    Ok(Caller { identity, serial })
}

/// Whether `der` is a replica's certificate: the manager identity of
/// `domain`.
pub(crate) fn is_replica(der: &[u8], domain: &str) -> bool {
    matches!(Identity::from_cert_der(der), Ok(Identity::Manager { domain: d }) if d == domain)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 64 * 1024 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The tenant a tenant-API caller acts for.
pub fn tenant_caller<T>(request: &Request<T>, trust: &Trust) -> Result<String, Status> {
    match caller(request, trust)?.identity {
        Identity::Tenant { tenant, .. } => Ok(tenant),
        _ => Err(Status::permission_denied(
            "TenantService needs a tenant client certificate",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unhex_round_trips_and_refuses_garbage() {
        let bytes = vec![0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&edgepool_common::identity::hex(&bytes)), Some(bytes));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é1"), None);
    }
}
