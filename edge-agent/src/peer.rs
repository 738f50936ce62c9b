//! The peer gRPC server every agent runs, and the prober that checks the
//! other members' peer ports.
//!
//! Server: TLS requires a client certificate chaining to the root CA; then
//! every PeerService call is authorised against the current membership
//! (`Membership::authorize`): only the current member certificate of
//! another slot of our own pool passes. Health and reflection answer any
//! client that completes the handshake.
//!
//! Prober: every `peer_probe_interval`, each member calls `Probe` on every
//! other member with its member certificate, verifying that the server
//! presents the member certificate of exactly the expected slot. The results
//! go to the manager in the app report (and show in `GetNode.peers`).
//!
//! Liveness: every `peer_liveness_interval` (200 ms), each member asks every
//! other member's health service over a kept-open mutual-TLS connection
//! (one task per peer, so a frozen peer delays nobody else). Any answer is a
//! sign of life; a member with none for `peer_suspect_ms` is published as
//! unreachable, and the uplink tells the manager at once (`PeerLiveness`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::identity::{Identity, cert_serial_hex};
use edgepool_common::proto as pb;
use edgepool_common::tls;
use pb::peer_service_client::PeerServiceClient;
use pb::peer_service_server::{PeerService, PeerServiceServer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::membership::Membership;
use crate::node::{PeerStatus, Shared};

/// What the liveness prober publishes for the uplink: one entry per other
/// member (empty when not a member).
pub type Liveness = Arc<Vec<pb::PeerAlive>>;

/// While a member is unreachable, the view is published again this often
/// (a manager that missed it, or a new stream, still hears it).
const LIVENESS_REPEAT: Duration = Duration::from_secs(1);

const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<PeerServiceServer<PeerApi>>().await;
    let (reflection_v1, reflection_v1alpha) = edgepool_common::grpc::reflection()?;
    let source_shared = shared.clone();
    let source: tls::ConfigSource = Arc::new(move || source_shared.peer_tls());
    let incoming = tls::tls_incoming(listener, source, shutdown.clone());
    let serve = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(PeerServiceServer::new(PeerApi { shared }))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    tokio::select! {
        r = serve => r?,
        _ = deadline => {}
    }
    Ok(())
}

pub struct PeerApi {
    shared: Arc<Shared>,
}

impl PeerApi {
    /// The caller's slot, if it may use PeerService.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(Arc<Membership>, u32), Status> {
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("a member certificate is required"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("a member certificate is required"))?;
        let identity = Identity::from_cert_der(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        let serial = cert_serial_hex(leaf.as_ref())
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        let membership = self
            .shared
            .membership()
            .ok_or_else(|| Status::permission_denied("this node is not a pool member"))?;
        let slot = membership
            .authorize(&identity, &serial)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        Ok((membership, slot))
    }
}

#[tonic::async_trait]
impl PeerService for PeerApi {
    async fn probe(
        &self,
        request: Request<pb::ProbeRequest>,
    ) -> Result<Response<pb::ProbeResponse>, Status> {
        let (m, caller_slot) = self.authorize(&request)?;
        // Capacity and need in the scheduler's units (network in kbit/s,
        // disk I/O in KiB/s), so members compare like with like.
        let amounts = |a: [u64; 5]| pb::Resources {
            cpu_millis: a[0],
            memory_mb: a[1],
            disk_mb: a[2],
            network_mbps: a[3],
            disk_io_kbps: a[4],
        };
        Ok(Response::new(pb::ProbeResponse {
            node_id: self.shared.info.node_id.clone(),
            pool: m.pool.clone(),
            slot: m.slot,
            generation: m.generation,
            capacity: Some(amounts(self.shared.capacity_amounts())),
            usage: Some(amounts(self.shared.need())),
            caller_slot,
        }))
    }

    async fn offer(
        &self,
        request: Request<pb::OfferRequest>,
    ) -> Result<Response<pb::OfferResponse>, Status> {
        let (_, caller_slot) = self.authorize(&request)?;
        let pid = crate::offload::admit(&self.shared, caller_slot, request.into_inner()).await?;
        Ok(Response::new(pb::OfferResponse { pid }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (_, caller_slot) = self.authorize(&request)?;
        let r = request.into_inner();
        crate::offload::release(&self.shared, caller_slot, &r.app, &r.offer_id).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }
}

/// A client for member `slot` of `m`'s pool, presenting our member
/// certificate and accepting only that member's certificate from the server.
pub fn peer_client(
    shared: &Shared,
    m: &Membership,
    slot: u32,
    address: &str,
) -> Result<PeerServiceClient<Channel>, tls::TlsError> {
    Ok(PeerServiceClient::new(peer_channel(
        shared, m, slot, address,
    )?))
}

/// A mutual-TLS channel to member `slot` (see `peer_client`).
fn peer_channel(
    shared: &Shared,
    m: &Membership,
    slot: u32,
    address: &str,
) -> Result<Channel, tls::TlsError> {
    let expected = Identity::Member {
        domain: m.domain.clone(),
        tenant: m.tenant.clone(),
        pool: m.pool.clone(),
        slot,
    };
    let verifier =
        tls::SpiffeServerVerifier::new(tls::roots(&shared.root_ca)?, move |id| *id == expected);
    let config =
        tls::client_config_with_verifier(verifier, Some((m.chain.clone(), shared.node_key())))?;
    tls::channel(address, Arc::new(config), PROBE_TIMEOUT)
}

/// One other member as the liveness prober watches it: a new certificate
/// (ours or theirs) or address means a new connection and a new task.
type WatchKey = (u32, String, String, String, String);

/// Checks every other member's liveness until shutdown and publishes the
/// view on `out` (see the module comment).
pub async fn liveness_loop(
    shared: Arc<Shared>,
    every: Duration,
    suspect_after: Duration,
    out: tokio::sync::watch::Sender<Liveness>,
    shutdown: CancellationToken,
) {
    use std::time::Instant;
    let last_ok: Arc<std::sync::Mutex<HashMap<WatchKey, Instant>>> = Arc::default();
    let mut tasks: HashMap<WatchKey, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published: Vec<(u32, String, bool)> = Vec::new();
    let mut published_at = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let watched: Vec<(WatchKey, String)> = match shared.membership() {
            Some(m) => m
                .others()
                .map(|p| {
                    let key = (
                        p.slot,
                        p.node_id.clone(),
                        p.peer_address.clone(),
                        m.serial.clone(),
                        p.cert_serial.clone(),
                    );
                    (key, p.peer_address.clone())
                })
                .collect(),
            None => Vec::new(),
        };
        tasks.retain(|k, t| {
            let keep = watched.iter().any(|(w, _)| w == k);
            if !keep {
                t.abort();
            }
            keep
        });
        {
            let mut ok = last_ok.lock().unwrap_or_else(|e| e.into_inner());
            ok.retain(|k, _| watched.iter().any(|(w, _)| w == k));
            for (key, _) in &watched {
                // A member we just started watching gets the full
                // suspect_after before it can look silent.
                ok.entry(key.clone()).or_insert_with(Instant::now);
            }
        }
        if let Some(m) = shared.membership() {
            for (key, address) in &watched {
                if tasks.contains_key(key) {
                    continue;
                }
                let task = watch_peer(
                    shared.clone(),
                    m.clone(),
                    key.clone(),
                    address.clone(),
                    every,
                    last_ok.clone(),
                );
                tasks.insert(key.clone(), tokio::spawn(task));
            }
        }
        let now = Instant::now();
        let view: Vec<pb::PeerAlive> = {
            let ok = last_ok.lock().unwrap_or_else(|e| e.into_inner());
            watched
                .iter()
                .map(|(key, _)| {
                    let silent = ok
                        .get(key)
                        .map(|t| now.saturating_duration_since(*t))
                        .unwrap_or_default();
                    pb::PeerAlive {
                        slot: key.0,
                        node_id: key.1.clone(),
                        reachable: silent < suspect_after,
                        silent_ms: silent.as_millis() as u64,
                    }
                })
                .collect()
        };
        let state: Vec<(u32, String, bool)> = view
            .iter()
            .map(|p| (p.slot, p.node_id.clone(), p.reachable))
            .collect();
        let any_down = view.iter().any(|p| !p.reachable);
        let repeat = any_down && now.saturating_duration_since(published_at) >= LIVENESS_REPEAT;
        if state != published || repeat {
            for p in view.iter().filter(|p| !p.reachable) {
                if !published.contains(&(p.slot, p.node_id.clone(), false)) {
                    tracing::warn!(node = %p.node_id, slot = p.slot, silent_ms = p.silent_ms, "pool member does not answer");
                }
            }
            out.send_replace(Arc::new(view));
            published = state;
            published_at = now;
        }
    }
    for t in tasks.values() {
        t.abort();
    }
}

/// Asks one member's health service every `every`, recording each answer.
async fn watch_peer(
    shared: Arc<Shared>,
    m: Arc<Membership>,
    key: WatchKey,
    address: String,
    every: Duration,
    last_ok: Arc<std::sync::Mutex<HashMap<WatchKey, std::time::Instant>>>,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    // An answer later than this is not waited for: the next one is due.
    let timeout = (every * 2).max(Duration::from_millis(100));
    let mut client: Option<HealthClient<Channel>> = None;
    loop {
        let started = tokio::time::Instant::now();
        if client.is_none() {
            client = peer_channel(&shared, &m, key.0, &address)
                .ok()
                .map(HealthClient::new);
        }
        if let Some(c) = client.as_mut() {
            let request = HealthCheckRequest {
                service: String::new(),
            };
            match tokio::time::timeout(timeout, c.check(request)).await {
                // Any answer, even an error status, comes from a running
                // peer process.
                Ok(Ok(_)) => alive(&last_ok, &key),
                Ok(Err(status))
                    if !matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown
                    ) =>
                {
                    alive(&last_ok, &key)
                }
                Ok(Err(_)) => client = None,
                Err(_) => {}
            }
        }
        tokio::time::sleep_until(started + every).await;
    }
}

fn alive(last_ok: &std::sync::Mutex<HashMap<WatchKey, std::time::Instant>>, key: &WatchKey) {
    last_ok
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone(), std::time::Instant::now());
}

/// Probes every other member periodically until shutdown.
pub async fn probe_loop(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    // Clients are kept per (slot, address, our serial, their serial) so a
    // new certificate or address gets a fresh connection.
    let mut clients: HashMap<(u32, String, String, String), PeerServiceClient<Channel>> =
        HashMap::new();
    let mut last_ok: HashMap<u32, u64> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(m) = shared.membership() else {
            clients.clear();
            continue;
        };
        let mut results = Vec::new();
        for peer in m.others() {
            let key = (
                peer.slot,
                peer.peer_address.clone(),
                m.serial.clone(),
                peer.cert_serial.clone(),
            );
            let mut status = PeerStatus {
                slot: peer.slot,
                node_id: peer.node_id.clone(),
                ..PeerStatus::default()
            };
            if !clients.contains_key(&key) {
                clients.retain(|k, _| k.0 != peer.slot);
                match peer_client(&shared, &m, peer.slot, &peer.peer_address) {
                    Ok(c) => {
                        clients.insert(key.clone(), c);
                    }
                    Err(e) => status.error = e.to_string(),
                }
            }
            if let Some(client) = clients.get_mut(&key) {
                match tokio::time::timeout(PROBE_TIMEOUT, client.probe(pb::ProbeRequest {})).await {
                    Ok(Ok(answer)) => {
                        let a = answer.into_inner();
                        let amounts = |r: Option<pb::Resources>| {
                            let r = r.unwrap_or_default();
                            [
                                r.cpu_millis,
                                r.memory_mb,
                                r.disk_mb,
                                r.network_mbps,
                                r.disk_io_kbps,
                            ]
                        };
                        status.capacity = amounts(a.capacity);
                        status.need = amounts(a.usage);
                        status.reachable = true;
                        last_ok.insert(peer.slot, now_ms());
                    }
                    Ok(Err(e)) => status.error = e.message().to_string(),
                    Err(_) => status.error = "probe timed out".into(),
                }
            }
            status.last_ok_ms = last_ok.get(&peer.slot).copied().unwrap_or(0);
            results.push(status);
        }
        let accepted = results.iter().any(|r| r.reachable);
        shared.set_peers(results);
        if accepted {
            shared.confirm_membership().await;
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Answers the manager's "do you reach member `slot` at `address`?" with
/// a fresh probe.
pub async fn check(shared: &Shared, slot: u32, address: &str) -> (bool, String) {
    let Some(m) = shared.membership() else {
        return (false, "not a pool member".into());
    };
    let mut client = match peer_client(shared, &m, slot, address) {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    match tokio::time::timeout(PROBE_TIMEOUT, client.probe(pb::ProbeRequest {})).await {
        Ok(Ok(_)) => (true, String::new()),
        Ok(Err(e)) => (false, e.message().to_string()),
        Err(_) => (false, "probe timed out".into()),
    }
}
