//! The stream to the manager (`AgentService.Connect`): hello, then
//! telemetry and heartbeats; reconnects with jittered backoff forever
//! (after a `RESOURCE_EXHAUSTED` with a retry hint: the hint plus jitter).

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_common::tls;
use pb::agent_message::Msg as Up;
use pb::agent_service_client::AgentServiceClient;
use pb::manager_message::Msg as Down;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::telemetry::{Measurements, Sample};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The manager is considered gone after this many heartbeat intervals
/// without any message from it.
const SILENT_INTERVALS: u32 = 5;
/// A manager's retry hint is followed up to this long (a wrong hint must
/// not park the agent for hours).
const MAX_RETRY_HINT: Duration = Duration::from_secs(60);
/// A session that lasted this long resets the backoff.
const STABLE_SESSION: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("manager refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("timed out connecting to the manager")]
    Timeout,
    #[error("the manager's first message was not a welcome")]
    NoWelcome,
    #[error("no message from the manager for {0:?}")]
    Silent(Duration),
    #[error("stream error: {0}")]
    Stream(tonic::Status),
}

/// Connection state others can watch (tests, logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    Disconnected,
    Connected,
}

pub struct Uplink {
    pub shared: Arc<crate::node::Shared>,
    /// The latest assignment from the manager, for the apply worker. A
    /// newer one replaces one not applied yet (each is the whole desired
    /// state), so the stream never waits for the app runtime.
    pub assignments: watch::Sender<Option<pb::Assignment>>,
    /// The managers as configured (for logs).
    pub manager: String,
    /// Each manager address (replicas): the stream goes to
    /// `managers[next_manager]`, and to the next one after a failure.
    pub managers: Vec<String>,
    pub next_manager: usize,
    pub tls: Arc<rustls::ClientConfig>,
    pub hello: pb::Hello,
    /// The measuring task: asked every telemetry interval, its results
    /// are sent when ready, so nothing on the stream waits for sampling.
    pub measurements: Measurements,
    pub telemetry_interval: Duration,
    pub heartbeat_interval: Duration,
    pub backoff: Backoff,
    pub state: watch::Sender<LinkState>,
    /// The liveness prober's view of the other members: sent to the manager
    /// on every change (`PeerLiveness`).
    pub liveness: watch::Receiver<crate::liveness::Liveness>,
    /// The switch on the connection to the manager (edgepool-swarm only;
    /// see `edgepool_common::gate`).
    pub gate: Option<edgepool_common::gate::Gate>,
    /// The local address the stream leaves from (None: the kernel's pick).
    pub source: Option<std::net::IpAddr>,
    /// The connection a busy manager turned a stream away on: the next
    /// try opens its stream on it instead of a new TLS handshake (a
    /// handshake is most of what a reconnect costs the manager).
    pub keep: Option<tonic::transport::Channel>,
}

enum End {
    Shutdown,
    Closed,
}

impl Uplink {
    /// Runs until `shutdown` fires.
    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            let started = Instant::now();
            let result = self.session(&shutdown).await;
            let _ = self.state.send(LinkState::Disconnected);
            let mut hint = None;
            let manager = self.current_manager().to_string();
            match result {
                Ok(End::Shutdown) => return,
                Ok(End::Closed) => {
                    tracing::warn!(%manager, "manager closed the stream");
                    self.next_manager += 1;
                }
                Err(UplinkError::Refused(s))
                    if s.code() == tonic::Code::ResourceExhausted
                        && edgepool_common::grpc::retry_after(&s).is_some() =>
                {
                    // A busy manager, not a fault: it says when to return
                    // (to the same one, on the same connection).
                    hint = edgepool_common::grpc::retry_after(&s);
                    tracing::info!(message = s.message(), "manager busy opening streams");
                }
                Err(e) => {
                    tracing::warn!(error = %e, %manager, "stream to the manager failed");
                    // Another replica, if there is one, next time.
                    self.next_manager += 1;
                }
            }
            if started.elapsed() >= STABLE_SESSION {
                self.backoff.reset();
            }
            let delay = match hint {
                Some(hint) => self.backoff.after_hint(hint.min(MAX_RETRY_HINT)),
                None => self.backoff.next_delay(),
            };
            tracing::info!(?delay, "reconnecting");
            self.shared.metrics.reconnects.inc();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// The manager address the next stream goes to.
    fn current_manager(&self) -> &str {
        match self.managers.len() {
            0 => &self.manager,
            n => &self.managers[self.next_manager % n],
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> Result<End, UplinkError> {
        let manager = self.current_manager().to_string();
        let channel = match self.keep.take() {
            Some(c) => c,
            None => tls::channel_from(
                &manager,
                self.tls.clone(),
                CONNECT_TIMEOUT,
                self.gate.clone(),
                self.source,
            )?,
        };
        let mut client = AgentServiceClient::new(channel.clone());
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        let up = |m: Up| pb::AgentMessage { msg: Some(m) };
        // Fresh channel: cannot be full.
        let _ = tx.try_send(up(Up::Hello(self.hello.clone())));
        let response = tokio::select! {
            _ = shutdown.cancelled() => return Ok(End::Shutdown),
            r = tokio::time::timeout(CONNECT_TIMEOUT, client.connect(ReceiverStream::new(rx))) => r,
        };
        let mut inbound = match response.map_err(|_| UplinkError::Timeout)? {
            Ok(r) => r.into_inner(),
            Err(s) => {
                if s.code() == tonic::Code::ResourceExhausted {
                    self.keep = Some(channel);
                }
                return Err(UplinkError::Refused(s));
            }
        };
        let welcome = match tokio::time::timeout(CONNECT_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(pb::ManagerMessage {
                msg: Some(Down::Welcome(w)),
            }))) => w,
            Ok(Err(s)) => return Err(UplinkError::Refused(s)),
            Err(_) => return Err(UplinkError::Timeout),
            _ => return Err(UplinkError::NoWelcome),
        };
        let _ = self.state.send(LinkState::Connected);
        tracing::info!(node = %welcome.node_id, tenant = %welcome.tenant, %manager, "connected to the manager");
        let pick = |ms: u32, default: Duration| {
            if ms >= 100 {
                Duration::from_millis(u64::from(ms))
            } else {
                default
            }
        };
        let telemetry_every = pick(welcome.telemetry_interval_ms, self.telemetry_interval);
        let heartbeat_every = pick(welcome.heartbeat_interval_ms, self.heartbeat_interval);
        let silent_limit = heartbeat_every.max(telemetry_every) * SILENT_INTERVALS;
        let mut telemetry = tokio::time::interval(telemetry_every);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut seq = 0u64;
        // The app report this stream carried last.
        let mut reported: Option<pb::AppReport> = None;
        // A new stream hears the current view at once if a member is down.
        if self.liveness.borrow().iter().any(|p| !p.reachable) {
            self.liveness.mark_changed();
        }
        // The prober is gone (the agent is stopping): stop watching it.
        let mut prober_gone = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                changed = self.liveness.changed(), if !prober_gone => {
                    if changed.is_err() {
                        prober_gone = true;
                        continue;
                    }
                    let peers = self.liveness.borrow_and_update().as_ref().clone();
                    // Never waits: a full queue means a stuck link (the
                    // silence check notices), and the prober repeats its
                    // view every second while a member is down.
                    let _ = tx.try_send(up(Up::PeerLiveness(pb::PeerLiveness { peers })));
                }
                // Only asks: the measurement arrives in the branch below.
                _ = telemetry.tick() => self.measurements.request(),
                Some(m) = self.measurements.next() => {
                    // Never waits: if the queue is full the link is stuck
                    // (the silence check notices) and the next measurement
                    // replaces this one.
                    let _ = tx.try_send(up(Up::Telemetry(to_proto(&m.sample))));
                    // A report only when it differs from the last one this
                    // stream carried (the first always goes): most nodes run
                    // nothing and would say so every second.
                    if reported.as_ref() != Some(&m.report)
                        && tx.try_send(up(Up::AppReport(m.report.clone()))).is_ok()
                    {
                        reported = Some(m.report.clone());
                    }
                    if tx.is_closed() {
                        return Ok(End::Closed);
                    }
                }
                _ = heartbeat.tick() => {
                    if last_heard.elapsed() > silent_limit {
                        return Err(UplinkError::Silent(silent_limit));
                    }
                    seq += 1;
                    // If the outbound queue is full the link is stuck; the
                    // silence check above will notice.
                    let _ = tx.try_send(up(Up::Heartbeat(pb::Heartbeat { seq })));
                }
                m = inbound.message() => match m {
                    Ok(Some(pb::ManagerMessage { msg: Some(Down::PeerCheck(c)) })) => {
                        last_heard = Instant::now();
                        let (shared, tx) = (self.shared.clone(), tx.clone());
                        tokio::spawn(async move {
                            let (reachable, error) = crate::peer::check(&shared, c.slot, &c.peer_address).await;
                            let result = pb::PeerCheckResult { request_id: c.request_id, reachable, error };
                            let _ = tx.send(up(Up::PeerCheckResult(result))).await;
                        });
                    }
                    Ok(Some(pb::ManagerMessage { msg: Some(Down::Ping(p)) })) => {
                        last_heard = Instant::now();
                        // Answered here, at once: this is how the manager
                        // tells a running node from a frozen one.
                        let _ = tx.try_send(up(Up::Pong(pb::Pong { nonce: p.nonce })));
                    }
                    Ok(Some(pb::ManagerMessage { msg: Some(Down::Assignment(a)) })) => {
                        last_heard = Instant::now();
                        self.assignments.send_replace(Some(a));
                    }
                    Ok(Some(_)) => last_heard = Instant::now(),
                    Ok(None) => return Ok(End::Closed),
                    Err(s) => return Err(UplinkError::Stream(s)),
                },
            }
        }
    }
}

fn to_proto(s: &Sample) -> pb::Telemetry {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pb::Telemetry {
        time: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
        usage: Some(resources(s.usage)),
        cpu_percent: s.cpu_percent,
        disks: s
            .disks
            .iter()
            .map(|d| pb::DiskStat {
                mount_point: d.mount_point.clone(),
                file_system: d.file_system.clone(),
                total_mb: d.total_mb,
                used_mb: d.used_mb,
                read_bytes_per_sec: d.read_bytes_per_sec,
                write_bytes_per_sec: d.write_bytes_per_sec,
            })
            .collect(),
        interfaces: s
            .interfaces
            .iter()
            .map(|i| pb::InterfaceStat {
                name: i.name.clone(),
                rx_bytes_per_sec: i.rx_bytes_per_sec,
                tx_bytes_per_sec: i.tx_bytes_per_sec,
                link_mbps: i.link_mbps,
            })
            .collect(),
    }
}

pub fn resources(r: crate::resources::Resources) -> pb::Resources {
    pb::Resources {
        cpu_millis: r.cpu_millis,
        memory_mb: r.memory_mb,
        disk_mb: r.disk_mb,
        network_mbps: r.network_mbps,
        disk_io_kbps: r.disk_io_kbps,
    }
}
