//! `edge-agent join`: make a key pair here, send a CSR with the join token
//! to `AgentService.Enroll` over server-authenticated TLS, store the result.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_common::tls;
use pb::agent_service_client::AgentServiceClient;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::state::{DataDir, NodeInfo};

/// How the manager's certificate is checked during join.
#[derive(Clone, Debug)]
pub enum ManagerTrust {
    /// A copy of the root CA certificate (`ca.pem` from the manager).
    CaFile(PathBuf),
    /// The root CA's SHA-256 fingerprint (`sha256:…`, printed by
    /// `cloud-manager init`); the CA itself is then taken from the
    /// server's chain and stored.
    Fingerprint(String),
}

#[derive(Clone, Debug)]
pub struct JoinRequest {
    pub manager: String,
    pub token: String,
    pub trust: ManagerTrust,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "{0} already holds an enrolled node; pass --force to enroll again (the old certificate stops working)"
    )]
    AlreadyEnrolled(PathBuf),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    #[error("the manager refused the enrollment: {0}")]
    Refused(String),
    #[error("cannot reach the manager at {addr}: {why}")]
    Unreachable { addr: String, why: String },
    #[error(
        "the manager at {addr} is not the one --ca-fingerprint names (wrong fingerprint, or another server answers there): {why}"
    )]
    UntrustedManager { addr: String, why: String },
    #[error("the manager's answer is unusable: {0}")]
    BadAnswer(String),
}

/// How long `join` waits in all for a manager that limits how often one
/// address may enroll (many nodes behind one address joining at once).
const MAX_BUSY_WAIT: Duration = Duration::from_secs(120);

/// Calls `Enroll`, waiting and calling again while the manager answers
/// RESOURCE_EXHAUSTED with a retry hint (its per-address limit), for at
/// most `MAX_BUSY_WAIT` in all. Nothing was used up by such an answer.
async fn enroll_when_allowed(
    mut client: AgentServiceClient<tonic::transport::Channel>,
    request: pb::EnrollRequest,
) -> Result<tonic::Response<pb::EnrollResponse>, tonic::Status> {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut waited = Duration::ZERO;
    loop {
        match client.enroll(request.clone()).await {
            Err(s) if s.code() == tonic::Code::ResourceExhausted && waited < MAX_BUSY_WAIT => {
                let Some(hint) = edgepool_common::grpc::retry_after(&s) else {
                    return Err(s);
                };
                let wait = backoff.after_hint(hint.min(Duration::from_secs(10)));
                tracing::info!(
                    wait_ms = wait.as_millis() as u64,
                    "the manager is busy enrolling; trying again"
                );
                tokio::time::sleep(wait).await;
                waited += wait;
            }
            other => return other,
        }
    }
}

/// Runs the enrollment and returns what was stored.
pub async fn join(req: JoinRequest) -> Result<NodeInfo, JoinError> {
    let data = DataDir::new(&req.data_dir);
    if data.is_enrolled() && !req.force {
        return Err(JoinError::AlreadyEnrolled(req.data_dir.clone()));
    }
    edgepool_common::identity::validate_name("node id", &req.node_id)
        .map_err(|e| JoinError::Refused(e.to_string()))?;
    data.create()?;

    // The key is made here and never leaves this machine: only the CSR
    // (public key + proof of possession) is sent.
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, req.node_id.clone());
    params.distinguished_name = dn;
    let csr_pem = params.serialize_request(&key)?.pem()?;

    let (client_config, pinned) = match &req.trust {
        ManagerTrust::CaFile(path) => {
            let roots = tls::roots(&tls::read_certs(path)?)?;
            (tls::client_config(roots, None)?, None)
        }
        ManagerTrust::Fingerprint(fp) => {
            let verifier = tls::FingerprintVerifier::new(tls::parse_fingerprint(fp)?);
            (tls::pinned_client_config(verifier.clone())?, Some(verifier))
        }
    };
    // Several replicas: each in turn, until one answers.
    let addrs = tls::manager_addresses(&req.manager)?;
    let client_config = Arc::new(client_config);
    let mut answer = None;
    let mut last = None;
    for addr in &addrs {
        let channel = tls::channel(addr, client_config.clone(), Duration::from_secs(10))?;
        let request = pb::EnrollRequest {
            token: req.token.clone(),
            node_id: req.node_id.clone(),
            csr_pem: csr_pem.clone(),
            force: req.force,
        };
        let result = enroll_when_allowed(AgentServiceClient::new(channel), request)
            .await
            .map_err(|s| match s.code() {
                // The TLS handshake failed on our side: the manager
                // answered, but with a CA that is not the one we were told
                // to trust.
                _ if s.message().contains("matches the CA fingerprint") => {
                    JoinError::UntrustedManager {
                        addr: addr.clone(),
                        why: s.message().to_string(),
                    }
                }
                tonic::Code::Unavailable | tonic::Code::Unknown => JoinError::Unreachable {
                    addr: addr.clone(),
                    why: s.message().to_string(),
                },
                _ => JoinError::Refused(s.message().to_string()),
            });
        match result {
            Ok(a) => {
                answer = Some(a.into_inner());
                break;
            }
            Err(e @ JoinError::Unreachable { .. }) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    let Some(answer) = answer else {
        return Err(last.unwrap_or_else(|| JoinError::Refused("no manager address".into())));
    };

    // Keep the CA we actually verified against when pinning by fingerprint,
    // not whatever the answer claims.
    let ca_pem = match (&req.trust, pinned) {
        (ManagerTrust::CaFile(path), _) => tls::read_text(path)?,
        (ManagerTrust::Fingerprint(_), Some(v)) => {
            let der = v
                .matched_ca()
                .ok_or_else(|| JoinError::BadAnswer("no CA matched the fingerprint".into()))?;
            pem_of_cert(der.as_ref())
        }
        (ManagerTrust::Fingerprint(_), None) => {
            return Err(JoinError::BadAnswer("pinned verifier missing".into()));
        }
    };
    let certs = tls::certs_from_pem(&answer.cert_pem, "certificate from the manager")?;
    let id = edgepool_common::identity::Identity::from_cert_der(certs[0].as_ref())
        .map_err(|e| JoinError::BadAnswer(e.to_string()))?;
    let info = NodeInfo {
        node_id: answer.node_id,
        tenant: answer.tenant,
        trust_domain: answer.trust_domain,
        manager: req.manager.clone(),
    };
    let expected = edgepool_common::identity::Identity::Node {
        domain: info.trust_domain.clone(),
        tenant: info.tenant.clone(),
        node_id: info.node_id.clone(),
    };
    if id != expected {
        return Err(JoinError::BadAnswer(format!(
            "certificate names {id}, expected {expected}"
        )));
    }
    data.save(&key.serialize_pem(), &answer.cert_pem, &ca_pem, &info)?;
    Ok(info)
}

fn pem_of_cert(der: &[u8]) -> String {
    let block = pem::Pem::new("CERTIFICATE", der.to_vec());
    pem::encode_config(
        &block,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Default node id: the host name, lower-cased, with anything outside
/// `[a-z0-9-]` replaced by `-`.
pub fn default_node_id() -> String {
    let host = sysinfo::System::host_name().unwrap_or_else(|_| "edge-node".to_string());
    let mut id: String = host
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    id = id.trim_matches('-').to_string();
    if id.is_empty() {
        "edge-node".into()
    } else {
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trips() {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["x".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = pem_of_cert(cert.der());
        let back = tls::certs_from_pem(&pem, "t").unwrap();
        assert_eq!(back[0].as_ref(), cert.der().as_ref());
    }

    #[test]
    fn default_node_id_is_a_valid_name() {
        let id = default_node_id();
        edgepool_common::identity::validate_name("node id", &id).unwrap();
    }
}
