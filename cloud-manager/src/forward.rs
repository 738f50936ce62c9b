//! How a standby replica answers tenant and agent calls: it forwards them
//! to the leader.
//!
//! A standby holds no registry (the leader alone reads and writes the
//! state; see `etcd_store`). Every `TenantService` and `AgentService` call
//! that reaches a standby goes on, as the same HTTP/2 request (headers and
//! body frames, streamed both ways), to the leader's advertised address,
//! which the standby reads from the etcd owner key while it waits. On that
//! hop the standby presents its replica certificate
//! (`spiffe://<domain>/manager`, client auth, signed by the root itself and
//! made in memory) and checks that the leader shows a manager certificate
//! of the same root.
//!
//! The caller's verified client certificate travels in the
//! `x-edgepool-forwarded-cert` header (hex DER), and its address in
//! `x-edgepool-forwarded-for` (for the leader's per-source limit on
//! `Enroll`); a value a client sent is always replaced. The leader honours that header only on a connection
//! whose client is a replica, and then checks the forwarded identity
//! exactly as if its owner had called directly (`auth::caller`); without
//! it a forwarded call has no client certificate (`Enroll`).
//!
//! An agent's stream through a standby is one HTTP/2 stream end to end: it
//! ends when either hop ends, and the agent reconnects (to the next
//! address it knows). When the standby itself comes to lead, its forwarded
//! streams are closed and the agents come back to it or to another replica.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgepool_common::identity::{Identity, hex};
use edgepool_common::proto::{agent_service_server, tenant_service_server};
use edgepool_common::tls;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::server::NamedService;
use tonic::transport::Channel;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::ca::{Ca, CaFiles};

/// The header that carries a forwarded call's client certificate.
pub const FORWARDED_CERT: &str = "x-edgepool-forwarded-cert";
/// The header that carries a forwarded call's source address (the IP the
/// standby saw), for the leader's per-source limits (`Enroll`).
pub const FORWARDED_FOR: &str = "x-edgepool-forwarded-for";

/// A standby makes a new replica certificate (valid 30 days) this often.
const RENEW_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long connecting to the leader may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The standby's way to the current leader.
pub struct LeaderLink {
    /// The leader's advertised address (kept current while the standby
    /// waits; `None` while no manager leads).
    leader: Arc<Mutex<Option<String>>>,
    files: CaFiles,
    domain: String,
    current: Mutex<Option<Link>>,
}

struct Link {
    addr: String,
    channel: Channel,
    made: Instant,
}

impl LeaderLink {
    pub fn new(files: CaFiles, domain: &str, leader: Arc<Mutex<Option<String>>>) -> Arc<Self> {
        Arc::new(LeaderLink {
            leader,
            files,
            domain: domain.to_string(),
            current: Mutex::new(None),
        })
    }

    /// The leader's address and a channel to it (made again when the
    /// leader changed, or the replica certificate is due).
    fn channel(&self) -> Result<(String, Channel), Status> {
        let addr = self
            .leader
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .ok_or_else(|| {
                Status::unavailable(
                    "this manager is a standby replica and no manager leads at the moment; try again shortly or another address",
                )
            })?;
        let mut current = self
            .current
            .lock()
            .map_err(|_| Status::internal("standby forwarding state poisoned"))?;
        if let Some(link) = current.as_ref()
            && link.addr == addr
            && link.made.elapsed() < RENEW_AFTER
        {
            return Ok((addr, link.channel.clone()));
        }
        let config = replica_client_config(&self.files, &self.domain)
            .map_err(|e| Status::internal(format!("standby cannot forward: {e}")))?;
        let channel = tls::channel(&addr, Arc::new(config), CONNECT_TIMEOUT).map_err(|e| {
            Status::unavailable(format!("the leader's address {addr:?} is not usable: {e}"))
        })?;
        tracing::info!(leader = %addr, "standby: forwarding tenant and agent calls to the leader");
        *current = Some(Link {
            addr: addr.clone(),
            channel: channel.clone(),
            made: Instant::now(),
        });
        Ok((addr, channel))
    }
}

/// The TLS client config of the hop to the leader: a fresh replica
/// certificate, and a server that must be a manager of this root.
fn replica_client_config(files: &CaFiles, domain: &str) -> anyhow::Result<rustls::ClientConfig> {
    let ca = Ca::load(files, domain)?;
    let issued = ca.issue_replica_client()?;
    let chain = tls::certs_from_pem(&issued.cert_pem, "replica certificate")?;
    let key = tls::key_from_pem(&issued.key_pem, "replica key")?;
    let roots = tls::roots(&tls::certs_from_pem(ca.cert_pem(), "ca.pem")?)?;
    let domain = domain.to_string();
    let verifier = tls::SpiffeServerVerifier::new(
        roots,
        move |id| matches!(id, Identity::Manager { domain: d } if *d == domain),
    );
    Ok(tls::client_config_with_verifier(
        verifier,
        Some((chain, key)),
    )?)
}

/// The service names a standby forwards.
pub trait Forwarded {
    const NAME: &'static str;
}

pub struct Tenant;
impl Forwarded for Tenant {
    const NAME: &'static str = tenant_service_server::SERVICE_NAME;
}

pub struct Agent;
impl Forwarded for Agent {
    const NAME: &'static str = agent_service_server::SERVICE_NAME;
}

/// Every call of service `S` passed on to the leader.
pub struct Forward<S> {
    link: Arc<LeaderLink>,
    _service: PhantomData<fn() -> S>,
}

impl<S> Forward<S> {
    pub fn new(link: Arc<LeaderLink>) -> Self {
        Forward {
            link,
            _service: PhantomData,
        }
    }
}

impl<S> Clone for Forward<S> {
    fn clone(&self) -> Self {
        Forward::new(self.link.clone())
    }
}

impl<S: Forwarded> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Forward<S> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let link = self.link.clone();
        Box::pin(async move { Ok(forward(&link, request).await) })
    }
}

async fn forward(link: &LeaderLink, request: http::Request<Body>) -> http::Response<Body> {
    let (mut head, body) = request.into_parts();
    let info = head.extensions.get::<TlsConnectInfo<TcpConnectInfo>>();
    let cert = info
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().map(|c| hex(c.as_ref())));
    let source = info
        .and_then(|info| info.get_ref().remote_addr())
        .map(|a| a.ip().to_string());
    head.headers.remove(FORWARDED_CERT);
    head.headers.remove(FORWARDED_FOR);
    if let Some(cert) = cert
        && let Ok(value) = http::HeaderValue::from_str(&cert)
    {
        head.headers.insert(FORWARDED_CERT, value);
    }
    if let Some(source) = source
        && let Ok(value) = http::HeaderValue::from_str(&source)
    {
        head.headers.insert(FORWARDED_FOR, value);
    }
    // This side's connection details stay here.
    head.extensions = http::Extensions::new();
    let (addr, mut channel) = match link.channel() {
        Ok(x) => x,
        Err(status) => return status.into_http(),
    };
    let unreachable = |e: &dyn std::fmt::Display| {
        Status::unavailable(format!(
            "this standby cannot reach the leader at {addr}: {e}"
        ))
        .into_http()
    };
    if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
        return unreachable(&e);
    }
    match channel.call(http::Request::from_parts(head, body)).await {
        Ok(response) => response,
        Err(e) => unreachable(&e),
    }
}
