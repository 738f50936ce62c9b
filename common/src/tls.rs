//! rustls configurations and the TLS plumbing shared by both daemons.
//!
//! One crypto provider (ring) is used everywhere: rustls, tokio-rustls,
//! tonic and rcgen are all built with their `ring` feature only.
//!
//! Servers do not use tonic's `ServerTlsConfig`: they run their own rustls
//! acceptor and feed the handshaken streams to `serve_with_incoming`, so that
//! the client-certificate policy (optional on the manager, for `Enroll`;
//! required on the peer port) and live checks stay in our hands. tonic still
//! exposes the verified peer chain through `Request::peer_certs()`.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::server::TlsStream;

use crate::gate::{Gate, GateState, Gated};
use tonic::transport::{Channel, Endpoint, Uri};

/// Connections the kernel completes and queues for a listener before the
/// accept loop takes them. tokio's default (1024) overflows in a burst of
/// thousands of connections; then Linux drops the clients' final ACKs, and
/// an idle client stays half-open (connected on its side, unknown to us)
/// until the SYN-ACK retries end, past any timeout of ours. The kernel caps
/// it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a TCP listener on `addr` with `LISTEN_BACKLOG`.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: io::Error },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: no usable PEM private key found")]
    NoKey { what: String },
    #[error("bad PEM in {what}: {why}")]
    BadPem { what: String, why: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("invalid address {0:?}: expected HOST:PORT")]
    BadAddress(String),
    #[error("invalid CA fingerprint {0:?}: expected sha256:<64 hex digits>")]
    BadFingerprint(String),
}

/// The one crypto provider of the project.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM string.
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what: what.to_string(),
            why: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) in a PEM string.
pub fn key_from_pem(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::NoKey {
        what: what.to_string(),
    })
}

/// Reads a file as text, naming it in the error.
pub fn read_text(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    certs_from_pem(&read_text(path)?, &path.display().to_string())
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    key_from_pem(&read_text(path)?, &path.display().to_string())
}

/// A root store holding the given CA certificates.
pub fn roots(cas: &[CertificateDer<'static>]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for ca in cas {
        store.add(ca.clone())?;
    }
    Ok(store)
}

/// What a server asks of its clients.
pub enum ClientAuth {
    /// A client certificate chaining to these roots is required.
    Required(RootCertStore),
    /// Clients may present a certificate chaining to these roots, or none
    /// (each RPC then decides). A certificate that does not verify still
    /// fails the handshake.
    Optional(RootCertStore),
}

/// A server config speaking HTTP/2 only.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_auth: ClientAuth,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let verifier = match client_auth {
        ClientAuth::Required(roots) => {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()
        }
        ClientAuth::Optional(roots) => {
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .allow_unauthenticated()
                .build()
        }
    }
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A server config speaking HTTP/2 only, checking clients with `verifier`
/// (e.g. `trust::IssuerVerifier`).
pub fn server_config_with_verifier(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No session resumption: a resumed session skips the client
    // certificate check, so a certificate revoked (or a membership changed)
    // since would pass the handshake unchecked.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// A client config trusting `roots`, presenting `identity` if given.
pub fn client_config(
    roots: RootCertStore,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// SHA-256 of a DER certificate as `sha256:<hex>`, the form users pass to
/// `edge-agent join --ca-fingerprint`.
pub fn fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", crate::identity::hex(&Sha256::digest(der)))
}

/// Parses `sha256:<64 hex>` (colons between bytes are tolerated).
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let bad = || TlsError::BadFingerprint(s.to_string());
    let hex: String = s
        .strip_prefix("sha256:")
        .ok_or_else(bad)?
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Verifies a server by a pinned CA fingerprint instead of a CA file: the
/// server's chain must contain a certificate with that SHA-256, and the leaf
/// must verify against it as the only root. The matched CA is kept so the
/// caller can store it for later connections.
#[derive(Debug)]
pub struct FingerprintVerifier {
    fingerprint: [u8; 32],
    matched: Mutex<Option<CertificateDer<'static>>>,
}

impl FingerprintVerifier {
    pub fn new(fingerprint: [u8; 32]) -> Arc<Self> {
        Arc::new(FingerprintVerifier {
            fingerprint,
            matched: Mutex::new(None),
        })
    }

    /// The CA certificate that matched the fingerprint, after a handshake.
    pub fn matched_ca(&self) -> Option<CertificateDer<'static>> {
        self.matched.lock().ok().and_then(|m| m.clone())
    }
}

impl ServerCertVerifier for FingerprintVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| Sha256::digest(c.as_ref()).as_slice() == self.fingerprint)
            .ok_or_else(|| {
                rustls::Error::General(
                    "no certificate in the server's chain matches the CA fingerprint".into(),
                )
            })?
            .clone()
            .into_owned();
        let mut store = RootCertStore::empty();
        store.add(ca.clone())?;
        let inner =
            rustls::client::WebPkiServerVerifier::builder_with_provider(store.into(), provider())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verified =
            inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?;
        if let Ok(mut m) = self.matched.lock() {
            *m = Some(ca);
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// Verifies a server by its SPIFFE identity instead of a host name: the
/// chain must verify against `roots` (with the intermediates the server
/// sends, e.g. a pool CA) and the leaf's URI SAN must satisfy `accept`.
/// Used between pool members, whose certificates carry only a URI SAN.
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    accept: Box<dyn Fn(&crate::identity::Identity) -> bool + Send + Sync>,
}

impl std::fmt::Debug for SpiffeServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SpiffeServerVerifier")
    }
}

impl SpiffeServerVerifier {
    pub fn new(
        roots: RootCertStore,
        accept: impl Fn(&crate::identity::Identity) -> bool + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(SpiffeServerVerifier {
            roots: Arc::new(roots),
            accept: Box::new(accept),
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            provider().signature_verification_algorithms.all,
        )?;
        let identity = crate::identity::Identity::from_cert_der(end_entity.as_ref())
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if !(self.accept)(&identity) {
            return Err(rustls::Error::General(format!(
                "server certificate names {identity}, which is not the expected peer"
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signatures::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        signatures::schemes()
    }
}

/// A client config checking the server with `verifier` and presenting
/// `identity`.
pub fn client_config_with_verifier(
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// A client config that pins the server's CA by fingerprint.
pub fn pinned_client_config(verifier: Arc<FingerprintVerifier>) -> Result<ClientConfig, TlsError> {
    client_config_with_verifier(verifier, None)
}

/// Handshake signature checks shared by our custom verifiers: the standard
/// ones of the crypto provider.
mod signatures {
    use super::*;

    pub fn tls12(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub fn tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    pub fn schemes() -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Splits `HOST:PORT` (or `[V6]:PORT`) and returns the host as a TLS server
/// name: an IP address or a DNS name, checked against the server's SANs.
pub fn server_name_of(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = || TlsError::BadAddress(addr.to_string());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    port.parse::<u16>().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| bad())
}

/// The addresses of a manager given as `HOST:PORT[,HOST:PORT...]` (several
/// replicas, tried in turn), each checked; empty entries are skipped.
pub fn manager_addresses(list: &str) -> Result<Vec<String>, TlsError> {
    let addrs: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    if addrs.is_empty() {
        return Err(TlsError::BadAddress(list.to_string()));
    }
    for a in &addrs {
        server_name_of(a)?;
    }
    Ok(addrs)
}

/// Opens a gRPC channel to `addr` over TLS with the given client config.
/// Connects lazily, so a manager that is down is not an error here: the
/// first RPC fails with `Unavailable` instead.
pub fn channel(addr: &str, tls: Arc<ClientConfig>, timeout: Duration) -> Result<Channel, TlsError> {
    channel_gated(addr, tls, timeout, None)
}

/// `channel` with its connections behind `gate` (see `crate::gate`): a cut
/// gate refuses to dial, a paused one holds the bytes.
pub fn channel_gated(
    addr: &str,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    gate: Option<Gate>,
) -> Result<Channel, TlsError> {
    channel_from(addr, tls, timeout, gate, None)
}

/// `channel_gated` whose connections leave from `source` (any port) instead
/// of the address the kernel picks. Thousands of connections from one
/// address to one server make every `connect` search the used ephemeral
/// ports; a simulated fleet gives each virtual agent its own loopback
/// address instead.
pub fn channel_from(
    addr: &str,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    gate: Option<Gate>,
    source: Option<IpAddr>,
) -> Result<Channel, TlsError> {
    let server_name = server_name_of(addr)?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| TlsError::BadAddress(addr.to_string()))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let connector = TlsConnector::from(tls);
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
            let connector = connector.clone();
            let server_name = server_name.clone();
            let gate = gate.clone();
            async move {
                let authority = uri
                    .authority()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no authority"))?
                    .to_string();
                if gate.as_ref().is_some_and(|g| g.state() == GateState::Cut) {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        "connection cut (gate)",
                    ));
                }
                // Held until the handshake ends (a limited gate only).
                let _dial = match &gate {
                    Some(g) => g.dial_permit().await,
                    None => None,
                };
                let tcp = match source {
                    None => TcpStream::connect(authority).await?,
                    Some(ip) => connect_from(ip, &authority).await?,
                };
                tcp.set_nodelay(true)?;
                let tcp = Gated::new(tcp, gate.as_ref());
                let tls =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                        })??;
                Ok::<_, io::Error>(TokioIo::new(tls))
            }
        })),
    )
}

/// Connects to `authority` (host:port) from `source`, trying each of the
/// host's addresses of `source`'s family in turn.
async fn connect_from(source: IpAddr, authority: &str) -> io::Result<TcpStream> {
    let mut last = None;
    for to in tokio::net::lookup_host(authority).await? {
        if to.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if source.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(to).await {
            Ok(tcp) => return Ok(tcp),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            format!("{authority} has no address to reach from {source}"),
        )
    }))
}

/// Where a server gets its TLS config for each new connection.
pub type ConfigSource = Arc<dyn Fn() -> Arc<ServerConfig> + Send + Sync>;

/// A config source that never changes.
pub fn fixed(config: Arc<ServerConfig>) -> ConfigSource {
    Arc::new(move || config.clone())
}

/// How many TLS handshakes a server runs at once, and for how long each
/// may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Handshakes computing at once (after the client's hello; at least 1).
    pub max_handshakes: usize,
    /// A connection whose handshake is not finished this long after it was
    /// accepted is closed.
    pub handshake_timeout: Duration,
}

/// Accepted connections not yet handed to the server, per handshake slot
/// (at least `MIN_PENDING`): each costs a file descriptor and a small task
/// while it waits for its client's hello or for a slot.
pub const PENDING_PER_HANDSHAKE: usize = 16;
/// The least number of accepted connections a listener keeps waiting, so
/// that a few thousand silent connections (the cheapest flood there is)
/// are held open without turning anyone else away.
pub const MIN_PENDING: usize = 4096;
/// A connection that has not sent its whole ClientHello this long after it
/// was accepted may be closed to make room for a new one when the pending
/// connections are at their cap (never sooner than half the handshake
/// timeout). A client on any real network sends its hello one round trip
/// after connecting.
pub const SILENT_EVICTABLE_AFTER: Duration = Duration::from_secs(1);

impl AcceptLimits {
    pub fn new(max_handshakes: usize, handshake_timeout: Duration) -> Self {
        AcceptLimits {
            max_handshakes: max_handshakes.max(1),
            handshake_timeout,
        }
    }

    /// Accepted connections waiting at most: for a hello or for a slot.
    pub fn max_pending(&self) -> usize {
        self.max_handshakes
            .saturating_mul(PENDING_PER_HANDSHAKE)
            .max(MIN_PENDING)
    }

    fn evictable_after(&self) -> Duration {
        SILENT_EVICTABLE_AFTER.min(self.handshake_timeout / 2)
    }
}

/// Accepts TCP connections on `listener` and yields the ones whose TLS
/// handshake succeeds, for `serve_with_incoming`. Handshakes run in their own
/// tasks so a slow client cannot stall accepting; failed handshakes (no or
/// untrusted client certificate where one is required, wrong CA, garbage)
/// are logged at debug level and dropped. The stream ends when `stop` fires.
///
/// Two stages, so that silent clients cost no handshake slot:
/// - every accepted connection first waits for its client's whole
///   ClientHello, which costs no CPU; at most `limits.max_pending()`
///   connections are accepted and not yet served. At that cap the oldest
///   connection still without its hello after `SILENT_EVICTABLE_AFTER` is
///   closed to make room; when there is none (every pending client spoke:
///   a real reconnect storm), accepting pauses and new connections wait in
///   the kernel's listen queue.
/// - then it takes one of `limits.max_handshakes` slots for the rest of the
///   handshake (the signatures and certificate checks), held until the
///   stream is handed to the server. This shapes a reconnect storm (a fleet
///   coming back after a manager restart) into a steady flow.
///
/// Every connection not handed to the server within
/// `limits.handshake_timeout` of its accept is closed, so a slow or silent
/// client holds nothing for longer; thousands of them do not keep members
/// or tenants out.
///
/// After the handshake the client must send something (a legitimate HTTP/2
/// client sends its preface and acknowledges the server's settings) within
/// the handshake timeout too (`MustSpeak`), so a client that completes the
/// handshake and then says nothing does not keep its connection.
pub fn tls_incoming(
    listener: TcpListener,
    config: ConfigSource,
    limits: AcceptLimits,
    stop: tokio_util::sync::CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<MustSpeak<TcpStream>>, io::Error>> {
    incoming(listener, config, limits, stop, Some)
}

/// `tls_incoming` with the accepted connections behind `gate` (see
/// `crate::gate`): while it is cut, connections are dropped as accepted.
pub fn tls_incoming_gated(
    listener: TcpListener,
    config: ConfigSource,
    limits: AcceptLimits,
    stop: tokio_util::sync::CancellationToken,
    gate: Option<Gate>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<MustSpeak<Gated<TcpStream>>>, io::Error>>
{
    incoming(listener, config, limits, stop, move |tcp| match &gate {
        Some(g) if g.state() == GateState::Cut => None,
        g => Some(Gated::new(tcp, g.as_ref())),
    })
}

fn incoming<S>(
    listener: TcpListener,
    config: ConfigSource,
    limits: AcceptLimits,
    stop: tokio_util::sync::CancellationToken,
    wrap: impl Fn(TcpStream) -> Option<S> + Send + 'static,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<MustSpeak<S>>, io::Error>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes.max(1)));
    let book = Arc::new(Pending::new(limits.max_pending()));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                () = book.room(limits.evictable_after()) => {}
            }
            let accepted = tokio::select! {
                _ = stop.cancelled() => break,
                a = listener.accept() => a,
            };
            let (tcp, remote) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let Some(stream) = wrap(tcp) else {
                continue;
            };
            let stream = MustSpeak::new(stream);
            let entry = book.enter();
            let (config, slots, tx) = (config.clone(), slots.clone(), tx.clone());
            tokio::spawn(async move {
                let mut entry = entry;
                let evicted = entry.evicted.clone();
                let work = async {
                    let start = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        stream,
                    )
                    .await?;
                    if !entry.heard() {
                        return Err(io::Error::other("closed while silent"));
                    }
                    let slot = slots
                        .acquire_owned()
                        .await
                        .map_err(|_| io::Error::other("accept loop gone"))?;
                    // Taken per connection, so a new certificate applies at once.
                    let mut tls = start.into_stream(config()).await?;
                    tls.get_mut().0.expect_words(limits.handshake_timeout);
                    Ok::<_, io::Error>((tls, slot))
                };
                let done = tokio::select! {
                    _ = evicted.cancelled() => {
                        tracing::debug!(%remote, "silent connection closed to make room");
                        return;
                    }
                    done = tokio::time::timeout(limits.handshake_timeout, work) => done,
                };
                match done {
                    Ok(Ok((tls, slot))) => {
                        let _ = tx.send(Ok(tls)).await;
                        drop(slot);
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
                drop(entry);
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// An accepted socket whose client, once the TLS handshake is done
/// (`expect_words`), must send at least one more byte within a deadline:
/// until then a read that finds nothing waits at most until the deadline,
/// then fails (`TimedOut`), which closes the connection. Afterwards it only
/// passes reads and writes through.
pub struct MustSpeak<S> {
    inner: S,
    deadline: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> MustSpeak<S> {
    fn new(inner: S) -> Self {
        MustSpeak {
            inner,
            deadline: None,
        }
    }

    /// From now on, the client has `within` to send something.
    fn expect_words(&mut self, within: Duration) {
        self.deadline = Some(Box::pin(tokio::time::sleep(within)));
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for MustSpeak<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        match std::pin::Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.deadline = None;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let overdue = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if overdue {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing after the TLS handshake",
                    )))
                } else {
                    Poll::Pending
                }
            }
            other => other,
        }
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for MustSpeak<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for MustSpeak<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The accepted connections of one listener not yet handed to the server,
/// and which of them have not sent their ClientHello yet.
struct Pending {
    state: Mutex<PendingState>,
    /// Rung when a connection leaves the book.
    left: tokio::sync::Notify,
}

struct PendingState {
    max: usize,
    /// Accepted and not yet handed over (silent ones included).
    count: usize,
    /// Silent connections by accept order: when accepted, and how to close.
    silent:
        std::collections::BTreeMap<u64, (std::time::Instant, tokio_util::sync::CancellationToken)>,
    next: u64,
}

impl Pending {
    fn new(max: usize) -> Self {
        Pending {
            state: Mutex::new(PendingState {
                max: max.max(1),
                count: 0,
                silent: std::collections::BTreeMap::new(),
                next: 0,
            }),
            left: tokio::sync::Notify::new(),
        }
    }

    /// Returns when one more connection may be accepted: below the cap, or
    /// after closing the oldest connection silent for `evictable_after`.
    async fn room(&self, evictable_after: Duration) {
        loop {
            let wait = {
                let Ok(mut s) = self.state.lock() else {
                    return;
                };
                if s.count < s.max {
                    return;
                }
                match s
                    .silent
                    .first_key_value()
                    .map(|(id, (since, _))| (*id, since.elapsed()))
                {
                    Some((id, age)) if age >= evictable_after => {
                        if let Some((_, token)) = s.silent.remove(&id) {
                            token.cancel();
                        }
                        s.count -= 1;
                        return;
                    }
                    Some((_, age)) => evictable_after - age,
                    // Every pending client spoke: wait for one to leave.
                    None => Duration::from_secs(3600),
                }
            };
            tokio::select! {
                _ = self.left.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Books a connection just accepted, as silent.
    fn enter(self: &Arc<Self>) -> Entry {
        let evicted = tokio_util::sync::CancellationToken::new();
        let id = match self.state.lock() {
            Ok(mut s) => {
                let id = s.next;
                s.next += 1;
                s.count += 1;
                s.silent
                    .insert(id, (std::time::Instant::now(), evicted.clone()));
                Some(id)
            }
            Err(_) => None,
        };
        Entry {
            book: self.clone(),
            id,
            spoke: false,
            evicted,
        }
    }
}

/// One booked connection; leaves the book when dropped.
struct Entry {
    book: Arc<Pending>,
    id: Option<u64>,
    spoke: bool,
    evicted: tokio_util::sync::CancellationToken,
}

impl Entry {
    /// Marks the connection as having sent its hello; false if it was
    /// closed to make room meanwhile.
    fn heard(&mut self) -> bool {
        let (Some(id), Ok(mut s)) = (self.id, self.book.state.lock()) else {
            return false;
        };
        self.spoke = s.silent.remove(&id).is_some();
        self.spoke
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let Some(id) = self.id else {
            return;
        };
        if let Ok(mut s) = self.book.state.lock() {
            // Evicted entries were already taken off the count.
            let counted = s.silent.remove(&id).is_some() || self.spoke;
            if counted {
                s.count -= 1;
            }
        }
        self.book.left.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trip() {
        let fp = fingerprint(b"hello");
        let bytes = parse_fingerprint(&fp).unwrap();
        assert_eq!(format!("sha256:{}", crate::identity::hex(&bytes)), fp);
        assert!(parse_fingerprint("sha1:abcd").is_err());
        assert!(parse_fingerprint("sha256:zz").is_err());
    }

    #[test]
    fn manager_address_lists() {
        assert_eq!(
            manager_addresses("a:1, b:2,").unwrap(),
            vec!["a:1".to_string(), "b:2".to_string()]
        );
        assert!(manager_addresses("a:1,b").is_err());
        assert!(manager_addresses(" , ").is_err());
    }

    /// At the cap, the oldest connection silent long enough makes room;
    /// one that spoke never does, and leaving frees a place.
    #[tokio::test]
    async fn pending_connections_make_room_by_closing_the_oldest_silent_one() {
        let after = Duration::from_millis(100);
        let book = Arc::new(Pending::new(2));
        let first = book.enter();
        let mut second = book.enter();
        assert!(second.heard());
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), book.room(after))
            .await
            .expect("room once the silent one is old enough");
        assert!(started.elapsed() >= Duration::from_millis(80));
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled());
        drop(first);
        // One place left (the evicted one was taken off at once): a new
        // connection fills it; then only the one that spoke is pending
        // besides it, and nothing is old enough: no room until one leaves.
        let third = book.enter();
        let mut third = third;
        assert!(third.heard());
        let waiting = tokio::time::timeout(Duration::from_millis(300), book.room(after)).await;
        assert!(waiting.is_err(), "no silent connection to close");
        drop(second);
        tokio::time::timeout(Duration::from_secs(5), book.room(after))
            .await
            .expect("room once one left");
        drop(third);
        assert_eq!(book.state.lock().unwrap().count, 0);
    }

    #[test]
    fn server_names() {
        assert!(server_name_of("127.0.0.1:7443").is_ok());
        assert!(server_name_of("[::1]:7443").is_ok());
        assert!(server_name_of("manager.example.com:443").is_ok());
        assert!(server_name_of("127.0.0.1").is_err());
        assert!(server_name_of("host:notaport").is_err());
    }
}
