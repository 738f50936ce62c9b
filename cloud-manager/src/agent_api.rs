//! `AgentService`: enrollment and the per-agent stream (the hub).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use futures::Stream;
use pb::agent_message::Msg as Up;
use pb::agent_service_server::AgentService;
use pb::manager_message::Msg as Down;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{Trust, caller};
use crate::errors::to_status;
use crate::forward::FORWARDED_FOR;
use crate::live::{Command, LiveNode};
use crate::manager::Manager;
use crate::model::{AppReport, Hello, Sample};
use crate::node_key::NodeKey;
use crate::rate_limit::RateLimit;
use crate::registry::{EnrollError, token_well_formed};
use edgepool_common::identity::validate_name;

/// The agent must send its hello this soon after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream silent for this many heartbeat intervals is closed (catches
/// half-open TCP connections the kernel has not noticed yet). Long on
/// purpose: the failure detector, not this, judges a silent node (after
/// `heartbeat_timeout_ms`), and closing a stream that is only late (a busy
/// manager reads it late) costs a reconnect, a TLS handshake, which is more
/// load exactly when there is too much.
const SILENT_INTERVALS: u32 = 15;
/// Largest CSR accepted, in bytes.
const MAX_CSR_BYTES: usize = 16 * 1024;

pub struct AgentApi {
    manager: Arc<Manager>,
    trust: Trust,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    /// One permit per stream being opened (from the start of `Connect`
    /// until its hello is recorded): `max_concurrent_stream_opens`.
    opens: Arc<Semaphore>,
    /// The retry hint of a `Connect` refused for want of a permit.
    retry_after: Duration,
    /// `Enroll` calls per source address.
    enrolls: RateLimit,
}

impl AgentApi {
    pub fn new(
        manager: Arc<Manager>,
        trust: Trust,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let config = manager.config();
        let opens = Arc::new(Semaphore::new(
            (config.max_concurrent_stream_opens as usize).max(1),
        ));
        let retry_after = Duration::from_millis(u64::from(config.stream_open_retry_ms));
        let enrolls = RateLimit::new(config.enroll_rate_per_second, config.enroll_burst);
        AgentApi {
            manager,
            trust,
            shutdown,
            tracker,
            opens,
            retry_after,
            enrolls,
        }
    }
}

type DownStream = Pin<Box<dyn Stream<Item = Result<pb::ManagerMessage, Status>> + Send>>;

fn down(msg: Down) -> Result<pb::ManagerMessage, Status> {
    Ok(pb::ManagerMessage { msg: Some(msg) })
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    #[tracing::instrument(skip_all, fields(node_id))]
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        // Refused before any lock or copy of the registry: anyone may call
        // Enroll (no certificate needed), so its shape is checked first,
        // then how often this source calls.
        let source = source_address(&request, self.manager.trust_domain());
        let req = request.into_inner();
        tracing::Span::current().record("node_id", req.node_id.as_str());
        if !token_well_formed(&req.token) {
            return Err(to_status(EnrollError::MalformedToken.into()));
        }
        if let Err(e) = validate_name("node id", &req.node_id) {
            return Err(to_status(EnrollError::BadNodeId(e.to_string()).into()));
        }
        if req.csr_pem.len() > MAX_CSR_BYTES {
            return Err(Status::invalid_argument("csr_pem is too large"));
        }
        if let Some(ip) = source
            && let Err(wait) = self.enrolls.take(ip, std::time::Instant::now())
        {
            // Debug: a flood would otherwise flood the log too.
            tracing::debug!(source = %ip, "too many enrollments from one address; refused");
            return Err(edgepool_common::grpc::exhausted(
                "too many enrollments from this address",
                wait.max(Duration::from_millis(10)),
            ));
        }
        let manager = self.manager.clone();
        // Signing and the fsync'd state write are blocking work.
        let grant = tokio::task::spawn_blocking(move || {
            manager
                .enrollment()
                .enroll(&req.token, &req.node_id, &req.csr_pem, req.force)
        })
        .await
        .map_err(|_| Status::internal("internal error"))?
        .map_err(|e| {
            tracing::info!(error = %e, "enrollment refused");
            to_status(e)
        })?;
        Ok(Response::new(pb::EnrollResponse {
            node_id: grant.node_id,
            tenant: grant.tenant,
            trust_domain: grant.trust_domain,
            cert_pem: grant.cert_pem,
            ca_pem: grant.ca_pem,
            labels: grant.labels.into_iter().collect(),
        }))
    }

    type ConnectStream = DownStream;

    #[tracing::instrument(skip_all, fields(node_id))]
    async fn connect(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        // Taken first, so a storm of reconnects is refused before any work;
        // held until the hello is recorded, then the stream runs freely.
        let Ok(_opening) = self.opens.clone().try_acquire_owned() else {
            tracing::debug!("too many agent streams opening; refused");
            return Err(edgepool_common::grpc::exhausted(
                "the manager is opening too many agent streams",
                self.retry_after,
            ));
        };
        let caller = caller(&request, &self.trust)?;
        let Identity::Node {
            tenant, node_id, ..
        } = caller.identity
        else {
            return Err(Status::permission_denied(
                "Connect needs a node certificate (from edge-agent join)",
            ));
        };
        tracing::Span::current().record("node_id", node_id.as_str());
        self.manager
            .enrollment()
            .authorize_node(&tenant, &node_id, &caller.serial)
            .map_err(to_status)?;

        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??;
        let hello = match first.and_then(|m| m.msg) {
            Some(Up::Hello(h)) => Hello::from(h),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on Connect must be a hello",
                ));
            }
        };
        let node = NodeKey::new(&tenant, &node_id);
        let (conn_id, live) = self
            .manager
            .streams()
            .open_stream(&node, &hello)
            .await
            .map_err(to_status)?;

        let config = self.manager.config();
        let (tx, rx) = mpsc::channel(32);
        let welcome = Down::Welcome(pb::Welcome {
            node_id: node_id.clone(),
            tenant,
            telemetry_interval_ms: config.telemetry_interval_ms,
            heartbeat_interval_ms: config.heartbeat_interval_ms,
        });
        // The channel is fresh, so this cannot be full.
        let _ = tx.try_send(down(welcome));
        let silent_limit = Duration::from_millis(
            u64::from(
                config
                    .heartbeat_interval_ms
                    .max(config.telemetry_interval_ms),
            ) * u64::from(SILENT_INTERVALS),
        );
        let session = Session {
            _open: self.manager.control().metrics.stream_opened(),
            manager: self.manager.clone(),
            trust: self.trust.clone(),
            serial: caller.serial.clone(),
            node,
            conn_id,
            live,
            tx,
            silent_limit,
        };
        self.tracker
            .spawn(session.run(inbound, self.shutdown.clone()));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One agent's open stream, driven by a tracked task until the agent goes
/// away, falls silent, is replaced by a newer stream, or the manager stops.
struct Session {
    /// Counts this stream in `edgepool_agent_streams` while it lives.
    _open: crate::metrics::StreamGuard,
    manager: Arc<Manager>,
    /// The node certificate's rules and serial: a stream outlives its
    /// handshake, so the serial is looked up in the revocation list again
    /// every second (`cloud-manager node revoke` ends it).
    trust: Trust,
    serial: String,
    node: NodeKey,
    conn_id: u64,
    live: Arc<LiveNode>,
    tx: mpsc::Sender<Result<pb::ManagerMessage, Status>>,
    silent_limit: Duration,
}

impl Session {
    async fn run(self, mut inbound: Streaming<pb::AgentMessage>, shutdown: CancellationToken) {
        let mut assignments = self.live.subscribe_assignment();
        let (cmd_tx, mut commands) = mpsc::channel(16);
        self.live.set_commands(cmd_tx);
        // The current desired state goes out first, then every change.
        assignments.mark_changed();
        let mut recheck = tokio::time::interval(crate::api::REVOCATION_RECHECK);
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.tx.closed() => break,
                () = self.live.ended(self.conn_id) => break,
                _ = recheck.tick() => {
                    if self.trust.is_revoked(&self.serial) {
                        tracing::warn!(node = %self.node, serial = %self.serial, "node certificate revoked; ending its stream");
                        let msg = "this node certificate has been revoked";
                        let _ = self.tx.try_send(Err(Status::permission_denied(msg)));
                        break;
                    }
                    continue;
                }
                changed = assignments.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let current = assignments.borrow_and_update().clone();
                    if let Some(a) = current {
                        let msg = down(Down::Assignment(pb::Assignment::from(&*a)));
                        if self.tx.send(msg).await.is_err() {
                            break;
                        }
                    }
                    continue;
                }
                Some(command) = commands.recv() => {
                    let msg = match command {
                        Command::PeerCheck { request_id, slot, node_id, peer_address } => {
                            Down::PeerCheck(pb::PeerCheck { request_id, slot, node_id, peer_address })
                        }
                        Command::Ping { nonce } => Down::Ping(pb::Ping { nonce }),
                    };
                    if self.tx.send(down(msg)).await.is_err() {
                        break;
                    }
                    continue;
                }
                n = tokio::time::timeout(self.silent_limit, inbound.message()) => n,
            };
            let msg = match next {
                Err(_) => {
                    tracing::warn!(node = %self.node, "agent stream silent; closing it");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(node = %self.node, error = %e, "agent stream error");
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(m))) => m,
            };
            if !self.live.is_current(self.conn_id) {
                tracing::info!(node = %self.node, "stream replaced by a newer one");
                break;
            }
            let Some(up) = msg.msg else { continue };
            match handle_up(&self.manager, &self.node, &self.live, up).await {
                Reply::Nothing => {}
                Reply::Ack(seq) => {
                    // Acks are advisory: if the agent is not reading, drop them.
                    let _ = self
                        .tx
                        .try_send(down(Down::HeartbeatAck(pb::HeartbeatAck { seq })));
                }
                Reply::End(status) => {
                    let _ = self.tx.try_send(Err(status));
                    break;
                }
            }
        }
        self.manager
            .streams()
            .close_stream(&self.node, &self.live, self.conn_id);
    }
}

/// What the session does after one agent message.
pub(crate) enum Reply {
    Nothing,
    /// Acknowledge heartbeat `seq`.
    Ack(u64),
    /// End the stream with this status.
    End(Status),
}

/// Handles one message of an open agent stream (after its hello): the
/// whole per-message work, shared by `Session` and the fuzz harness.
pub(crate) async fn handle_up(manager: &Manager, node: &NodeKey, live: &LiveNode, up: Up) -> Reply {
    match up {
        Up::Telemetry(t) => {
            manager.control().metrics.telemetry.inc();
            live.record_sample(Sample::from(t))
        }
        Up::PeerCheckResult(r) => {
            let answer = crate::liveness::CheckAnswer {
                reachable: r.reachable,
                error: r.error.chars().take(256).collect(),
            };
            manager.failover().answer_check(node, r.request_id, answer);
        }
        Up::Pong(p) => {
            live.seen();
            live.pong(p.nonce);
        }
        Up::PeerLiveness(l) => {
            let peers = l
                .peers
                .into_iter()
                .map(|p| crate::liveness::PeerAlive {
                    slot: p.slot,
                    node_id: p.node_id,
                    reachable: p.reachable,
                    silent_ms: p.silent_ms,
                })
                .collect();
            manager.failover().record_liveness(node, peers);
        }
        Up::AppReport(r) => {
            manager
                .streams()
                .record_report(node, live, AppReport::from(r))
                .await;
        }
        Up::Heartbeat(h) => {
            live.seen();
            // A failed-over node heard from again on a stream that never
            // dropped (it was frozen, or cut and healed quickly) is fenced,
            // as if it had reconnected. Its app reports come only when they
            // change, so this is the sign of life to look at (a look at the
            // snapshot; work only for a failed node).
            if let Err(e) = manager.failover().fence_if_failed(node).await {
                tracing::warn!(%node, error = %e, "could not fence a failed node");
            }
            return Reply::Ack(h.seq);
        }
        Up::Hello(_) => return Reply::End(Status::invalid_argument("hello sent twice")),
    }
    Reply::Nothing
}

/// The caller's address, for per-source limits. A call that a standby
/// replica forwarded comes from the replica: then the address is the one
/// the replica saw, in `x-edgepool-forwarded-for`, honoured only on a
/// connection whose client certificate is a replica's (the only one,
/// signed by the root: see `auth`); a client cannot set it for itself.
fn source_address<T>(request: &Request<T>, domain: &str) -> Option<std::net::IpAddr> {
    let from_replica = request.peer_certs().is_some_and(|certs| {
        certs.len() == 1 && crate::auth::is_replica(certs[0].as_ref(), domain)
    });
    if from_replica {
        return request
            .metadata()
            .get(FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
    }
    request.remote_addr().map(|a| a.ip())
}
