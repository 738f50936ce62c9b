//! Who is calling: read from the verified TLS client certificate only.

use edgepool_common::identity::{Identity, cert_serial_hex};
use tonic::{Request, Status};

use crate::forward::FORWARDED_CERT;

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
pub fn caller<T>(request: &Request<T>, domain: &str) -> Result<Caller, Status> {
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
    let identity = Identity::from_cert_der(leaf)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if identity.domain() != domain {
        return Err(Status::permission_denied(format!(
            "client certificate is for trust domain {:?}, not {domain:?}",
            identity.domain()
        )));
    }
    let serial = cert_serial_hex(leaf)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    Ok(Caller { identity, serial })
}

/// Whether `der` is a replica's certificate: the manager identity of
/// `domain`.
fn is_replica(der: &[u8], domain: &str) -> bool {
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
pub fn tenant_caller<T>(request: &Request<T>, domain: &str) -> Result<String, Status> {
    match caller(request, domain)?.identity {
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
