//! Who may issue which identity, checked during the TLS handshake.
//!
//! The root CA issues tenant, node and manager identities itself; a pool's
//! CA (an intermediate signed by the root, `cloud-manager` `chain`) issues
//! only the member identities of its own pool. A plain chain check against
//! the root would accept anything any pool CA key signed, so:
//!
//! - A tenant, node or manager certificate must be signed by the root
//!   itself: it is verified with the root as the only anchor and no
//!   intermediates (`RootIssued`).
//! - A member certificate must be signed by its pool's CA: it is verified
//!   with that pool CA as the only anchor (`member_roots`), and its SPIFFE
//!   ID must lie under the pool CA's permitted URI (`permitted_uri`).
//!
//! Pool CAs carry a critical name-constraints extension permitting only
//! their pool's SPIFFE path (`pool_name_constraints`). RFC 5280 constrains
//! URIs by host only, so generic verifiers cannot apply a path; webpki
//! refuses every URI name under a URI constraint. Either way a certificate
//! a pool CA key signed is refused by every verifier that builds a path
//! through that pool CA to the root: only `member_roots` (which takes the
//! pool CA itself as the anchor and checks the path prefix here) accepts
//! member certificates, and only for the pool it was given.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

use crate::identity::{Identity, cert_serial_hex};
use crate::tls::{TlsError, provider};

/// OID of the X.509 name-constraints extension.
pub const NAME_CONSTRAINTS_OID: &[u64] = &[2, 5, 29, 30];

/// The SPIFFE path prefix a pool's CA may issue under:
/// `spiffe://<domain>/tenant/<t>/pool/<p>/`.
pub fn pool_prefix(domain: &str, tenant: &str, pool: &str) -> String {
    format!("spiffe://{domain}/tenant/{tenant}/pool/{pool}/")
}

/// DER content of a name-constraints extension permitting only URIs
/// starting with `prefix` (`permittedSubtrees [0] { GeneralSubtree { base
/// uniformResourceIdentifier [6] prefix } }`).
pub fn pool_name_constraints(prefix: &str) -> Vec<u8> {
    let uri = der(0x86, prefix.as_bytes());
    let subtree = der(0x30, &uri);
    let permitted = der(0xa0, &subtree);
    der(0x30, &permitted)
}

/// One DER element: tag, length (short or long form), content.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The URI a CA certificate's name constraints permit, if it has exactly
/// one permitted URI subtree and nothing else.
pub fn permitted_uri(ca: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(ca).ok()?;
    let nc = cert.name_constraints().ok()??;
    if nc.value.excluded_subtrees.is_some() {
        return None;
    }
    match nc.value.permitted_subtrees.as_deref()? {
        [one] => match &one.base {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// A root store whose only anchor is `pool_ca`, with its name constraints
/// taken off the anchor (webpki would refuse every URI name under them;
/// `MemberCheck` applies them as a path prefix instead).
pub fn member_roots(pool_ca: &CertificateDer<'_>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    store.add(pool_ca.clone().into_owned())?;
    for anchor in &mut store.roots {
        anchor.name_constraints = None;
    }
    Ok(store)
}

/// Checks that a certificate was signed by the root itself.
#[derive(Clone, Debug)]
pub struct RootIssued {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl RootIssued {
    pub fn new(root: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let mut store = RootCertStore::empty();
        store.add(root.clone().into_owned())?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(RootIssued { verifier })
    }

    /// Whether `leaf`, a client certificate, was issued by the root (no
    /// intermediate) and is valid at `now`.
    pub fn check(&self, leaf: &CertificateDer<'_>, now: UnixTime) -> Result<(), rustls::Error> {
        self.verifier.verify_client_cert(leaf, &[], now).map(|_| ())
    }

    fn subjects(&self) -> &[DistinguishedName] {
        self.verifier.root_hint_subjects()
    }
}

/// The offline grace for expired member certificates: while `offline` is
/// set (the member holding it has no stream to the manager), a member
/// certificate that expired at most `window` ago is verified as of its own
/// `notAfter` instead of now. Everything else is still checked: the pool
/// CA's signature and validity, the pool's name prefix, and (by the caller,
/// which always does it) the slot and the serial of the held membership.
/// Connected to the manager, or past the window, an expired certificate is
/// refused as usual.
#[derive(Clone, Debug)]
pub struct OfflineGrace {
    offline: Arc<AtomicBool>,
    window: Duration,
}

impl OfflineGrace {
    /// A grace of `window`, off until `set_offline(true)`.
    pub fn new(window: Duration) -> Self {
        OfflineGrace {
            offline: Arc::new(AtomicBool::new(false)),
            window,
        }
    }

    /// Turns the grace on (cut off from the manager) or off. Every
    /// `MemberCheck` holding a clone of this grace follows at once.
    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::Relaxed);
    }

    pub fn is_offline(&self) -> bool {
        self.offline.load(Ordering::Relaxed)
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// The time to verify `leaf` at: `now`, or the certificate's own
    /// `notAfter` if it expired within the window while offline.
    pub fn verify_time(&self, leaf: &CertificateDer<'_>, now: UnixTime) -> UnixTime {
        if !self.is_offline() {
            return now;
        }
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
            return now;
        };
        let Ok(not_after) = u64::try_from(cert.validity().not_after.timestamp()) else {
            return now;
        };
        let now_secs = now.as_secs();
        if now_secs > not_after && now_secs - not_after <= self.window.as_secs() {
            UnixTime::since_unix_epoch(Duration::from_secs(not_after))
        } else {
            now
        }
    }
}

/// Checks that a member certificate was issued by one pool's CA and names
/// a member of that pool.
#[derive(Clone, Debug)]
pub struct MemberCheck {
    client: Arc<dyn ClientCertVerifier>,
    roots: Arc<RootCertStore>,
    prefix: String,
    grace: Option<OfflineGrace>,
}

impl MemberCheck {
    /// For the pool whose CA is `pool_ca` and whose SPIFFE prefix is
    /// `prefix` (`pool_prefix`). A pool CA that carries a URI constraint
    /// must permit exactly that prefix.
    pub fn new(pool_ca: &CertificateDer<'_>, prefix: String) -> Result<Self, TlsError> {
        if let Some(permitted) = permitted_uri(pool_ca.as_ref())
            && permitted != prefix
        {
            return Err(TlsError::Verifier(format!(
                "the pool CA permits {permitted:?}, not this pool's {prefix:?}"
            )));
        }
        let roots = Arc::new(member_roots(pool_ca)?);
        let client = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        Ok(MemberCheck {
            client,
            roots,
            prefix,
            grace: None,
        })
    }

    /// The same check with an offline grace for expired certificates. Only
    /// for checks whose caller then requires the serial of the held
    /// membership (`IssuerVerifier` with the membership as `admit`,
    /// `MemberServerVerifier`): the grace is for members we already know.
    pub fn with_grace(mut self, grace: OfflineGrace) -> Self {
        self.grace = Some(grace);
        self
    }

    fn at(&self, leaf: &CertificateDer<'_>, now: UnixTime) -> UnixTime {
        match &self.grace {
            Some(g) => g.verify_time(leaf, now),
            None => now,
        }
    }

    /// The member identity of `leaf`, a client certificate, if the pool CA
    /// issued it for a name of its pool.
    pub fn client(
        &self,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<Identity, rustls::Error> {
        self.client
            .verify_client_cert(leaf, &[], self.at(leaf, now))?;
        self.identity(leaf)
    }

    /// The member identity of `leaf`, a server certificate, if the pool CA
    /// issued it for a name of its pool.
    pub fn server(
        &self,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<Identity, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(leaf)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            &[],
            self.at(leaf, now),
            provider().signature_verification_algorithms.all,
        )?;
        self.identity(leaf)
    }

    fn identity(&self, leaf: &CertificateDer<'_>) -> Result<Identity, rustls::Error> {
        let identity = Identity::from_cert_der(leaf.as_ref())
            .map_err(|e| rustls::Error::General(format!("member certificate: {e}")))?;
        if !matches!(identity, Identity::Member { .. })
            || !identity.to_uri().starts_with(&self.prefix)
        {
            return Err(rustls::Error::General(format!(
                "{identity} is not a member name this pool CA may issue"
            )));
        }
        Ok(identity)
    }

    fn subjects(&self) -> &[DistinguishedName] {
        self.client.root_hint_subjects()
    }
}

/// What a server decides about a verified client, given its identity and
/// certificate serial (e.g. membership or a revocation list).
pub type Admit = dyn Fn(&Identity, &str) -> Result<(), String> + Send + Sync;

/// A client-certificate verifier that applies the issuer rules: member
/// identities through `member` (refused when there is none), every other
/// identity through the root alone; then `admit`.
pub struct IssuerVerifier {
    root: RootIssued,
    member: Option<MemberCheck>,
    mandatory: bool,
    subjects: Vec<DistinguishedName>,
    admit: Box<Admit>,
}

impl std::fmt::Debug for IssuerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IssuerVerifier")
    }
}

impl IssuerVerifier {
    /// `mandatory`: whether a client must present a certificate.
    pub fn new(
        root: RootIssued,
        member: Option<MemberCheck>,
        mandatory: bool,
        admit: impl Fn(&Identity, &str) -> Result<(), String> + Send + Sync + 'static,
    ) -> Arc<Self> {
        let mut subjects = root.subjects().to_vec();
        if let Some(m) = &member {
            subjects.extend_from_slice(m.subjects());
        }
        Arc::new(IssuerVerifier {
            root,
            member,
            mandatory,
            subjects,
            admit: Box::new(admit),
        })
    }

    /// The identity and serial of `leaf` if it passes every rule.
    pub fn check(
        &self,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(Identity, String), rustls::Error> {
        let identity = Identity::from_cert_der(leaf.as_ref())
            .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        if let Identity::Member { .. } = identity {
            let Some(member) = &self.member else {
                return Err(rustls::Error::General(format!(
                    "{identity}: member certificates are accepted only by the members of their pool"
                )));
            };
            member.client(leaf, now)?;
        } else {
            self.root.check(leaf, now)?;
        }
        let serial = cert_serial_hex(leaf.as_ref())
            .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        (self.admit)(&identity, &serial).map_err(rustls::Error::General)?;
        Ok((identity, serial))
    }
}

impl ClientCertVerifier for IssuerVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.subjects
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.root
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.root
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.root.verifier.supported_verify_schemes()
    }
}

/// A server verifier for one member of a pool: the certificate must be
/// issued by the pool's CA (`MemberCheck`), name exactly `expected`, and
/// carry the serial the membership holds for it (a replaced or revoked
/// member certificate fails the handshake).
#[derive(Debug)]
pub struct MemberServerVerifier {
    check: MemberCheck,
    expected: Identity,
    serial: String,
}

impl MemberServerVerifier {
    pub fn new(check: MemberCheck, expected: Identity, serial: String) -> Arc<Self> {
        Arc::new(MemberServerVerifier {
            check,
            expected,
            serial,
        })
    }
}

impl rustls::client::danger::ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let identity = self.check.server(end_entity, now)?;
        if identity != self.expected {
            return Err(rustls::Error::General(format!(
                "server certificate names {identity}, which is not the expected peer {}",
                self.expected
            )));
        }
        let serial = cert_serial_hex(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if serial != self.serial {
            return Err(rustls::Error::General(format!(
                "the certificate of {identity} has been replaced or revoked (serial {serial}, the membership holds {})",
                self.serial
            )));
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check.client.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.check.client.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.check.client.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed TLS session would skip the client certificate check (and
    /// with it revocation and membership): servers keep no sessions.
    #[test]
    fn servers_with_an_issuer_verifier_never_resume_sessions() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        let verifier =
            IssuerVerifier::new(RootIssued::new(root.der()).unwrap(), None, false, |_, _| {
                Ok(())
            });
        let config = crate::tls::server_config_with_verifier(
            vec![root.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            verifier,
        )
        .unwrap();
        assert!(!config.session_storage.can_cache());
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.ticketer.enabled());
    }

    #[test]
    fn der_lengths_use_the_long_form_past_127_bytes() {
        assert_eq!(der(0x86, b"ab"), vec![0x86, 2, b'a', b'b']);
        let long = der(0x86, &[b'x'; 200]);
        assert_eq!(&long[..3], &[0x86, 0x81, 200]);
        assert_eq!(long.len(), 203);
        let longer = der(0x30, &[0; 300]);
        assert_eq!(&longer[..4], &[0x30, 0x82, 0x01, 0x2c]);
    }
}
