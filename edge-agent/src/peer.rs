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
//! Liveness: `Beat` streams between members, served here and kept by
//! `crate::liveness`. Offload: `Offer` and `Release` are answered by
//! `crate::offload::host` (`admit`, `release`).
//!
//! This is the top of the peer side: it depends on `liveness` and
//! `offload`, which dial other members through `crate::peer_client` and
//! never import this module.

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

use crate::clock::now_ms;
use crate::liveness::Answers;
use crate::membership::Membership;
use crate::node::{PeerStatus, Shared};
use crate::offload;
use crate::peer_client::{PROBE_TIMEOUT, peer_client};

pub async fn serve(
    listener: TcpListener,
    limits: tls::AcceptLimits,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health) = edgepool_common::grpc::health();
    reporter.set_serving::<PeerServiceServer<PeerApi>>().await;
    let (reflection_v1, reflection_v1alpha) = edgepool_common::grpc::reflection()?;
    let source_shared = shared.clone();
    let source: tls::ConfigSource = Arc::new(move || source_shared.peer_tls());
    let incoming = tls::tls_incoming_gated(
        listener,
        source,
        limits,
        shutdown.clone(),
        shared.peer_gate(),
    );
    let serve = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PeerServiceServer::new(PeerApi { shared })
                .max_decoding_message_size(edgepool_common::grpc::max_request::PEER),
        )
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
        self.caller(request).map(|c| (c.membership, c.slot))
    }

    /// Who the caller is, if it may use PeerService.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
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
        Ok(Caller {
            membership,
            slot,
            identity,
            serial,
        })
    }
}

/// An authorised PeerService caller.
struct Caller {
    membership: Arc<Membership>,
    slot: u32,
    identity: Identity,
    serial: String,
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
        let pid = offload::host::admit(&self.shared, caller_slot, request.into_inner()).await?;
        Ok(Response::new(pb::OfferResponse { pid }))
    }

    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (_, caller_slot) = self.authorize(&request)?;
        let r = request.into_inner();
        offload::host::release(&self.shared, caller_slot, &r.app, &r.offer_id).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    type BeatStream = Answers;

    async fn beat(
        &self,
        request: Request<tonic::Streaming<pb::BeatMessage>>,
    ) -> Result<Response<Self::BeatStream>, Status> {
        let c = self.caller(&request)?;
        Ok(Response::new(Answers::new(
            self.shared.clone(),
            request.into_inner(),
            c.identity,
            c.serial,
            c.slot,
        )))
    }
}

/// Probes every other member periodically until shutdown.
pub async fn probe_loop(shared: Arc<Shared>, every: Duration, shutdown: CancellationToken) {
    // Clients are kept per (slot, address, our serial, their serial) so a
    // new certificate or address gets a fresh connection.
    let mut clients: HashMap<(u32, String, String, String), PeerServiceClient<Channel>> =
        HashMap::new();
    let mut last_ok: HashMap<u32, u64> = HashMap::new();
    loop {
        // A node in no pool has nobody to probe: it waits to be a member.
        if shared.membership().is_none() {
            clients.clear();
            if !shared.until_member(&shutdown).await {
                return;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(m) = shared.membership() else {
            clients.clear();
            continue;
        };
        let mut results = Vec::new();
        // (slot, round trip of an answered probe) for the metrics.
        let mut rtts: Vec<(u32, Option<f64>)> = Vec::new();
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
                let sent = std::time::Instant::now();
                match tokio::time::timeout(PROBE_TIMEOUT, client.probe(pb::ProbeRequest {})).await {
                    Ok(Ok(answer)) => {
                        rtts.push((peer.slot, Some(sent.elapsed().as_secs_f64())));
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
            if !status.reachable {
                rtts.push((peer.slot, None));
            }
            results.push(status);
        }
        shared.metrics.probed(&rtts);
        let accepted = results.iter().any(|r| r.reachable);
        shared.set_peers(results);
        if accepted {
            shared.confirm_membership().await;
        }
    }
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
