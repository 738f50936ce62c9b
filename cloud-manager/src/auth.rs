//! Who is calling: read from the verified TLS client certificate only.

use edgepool_common::identity::{Identity, cert_serial_hex};
use tonic::{Request, Status};

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
pub fn caller<T>(request: &Request<T>, domain: &str) -> Result<Caller, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("this call needs a client certificate"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("this call needs a client certificate"))?;
    let identity = Identity::from_cert_der(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if identity.domain() != domain {
        return Err(Status::permission_denied(format!(
            "client certificate is for trust domain {:?}, not {domain:?}",
            identity.domain()
        )));
    }
    let serial = cert_serial_hex(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    Ok(Caller { identity, serial })
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
