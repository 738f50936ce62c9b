//! The edgepool edge agent: enrollment, telemetry, the stream to the
//! manager and the peer server. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod clock;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod heard;
pub mod join;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod offload;
pub mod offload_state;
pub mod peer;
pub mod peer_client;
pub mod resources;
pub mod runtime;
pub mod scheduler;
pub mod state;
pub mod telemetry;
pub mod uplink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgepool_common::proto as pb;
use edgepool_common::tls;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::state::{DataDir, NodeInfo};
use crate::uplink::{LinkState, Uplink};

/// An agent that is bound and ready to run.
pub struct Agent {
    info: NodeInfo,
    shared: Arc<node::Shared>,
    uplink: Uplink,
    assignments: watch::Receiver<Option<pb::Assignment>>,
    /// None: bound only once the node becomes a pool member (a lazy peer
    /// server on a fixed port, see `Machine::lazy_peer_server`).
    peer_listener: Option<TcpListener>,
    peer_limits: tls::AcceptLimits,
    peer_addr: SocketAddr,
    lazy_peer_server: bool,
    link: watch::Receiver<LinkState>,
    probe_every: Duration,
    liveness_every: Duration,
    liveness_tx: watch::Sender<liveness::Liveness>,
    stop_apps_on_exit: bool,
    isolation_lease: Duration,
    scheduler_every: Duration,
    network_accounting: config::NetworkAccounting,
    reserve: [u64; 5],
    measurer: telemetry::Measurer,
    /// Asks the measurer for a measurement (and app report) now.
    measure_now: Arc<tokio::sync::Notify>,
    /// The metrics listener (`metrics_listen`), bound, and the registry it
    /// serves.
    metrics: Option<(
        TcpListener,
        SocketAddr,
        Arc<prometheus_client::registry::Registry>,
    )>,
    data_dir: std::path::PathBuf,
}

/// The machine under an agent. `Machine::default()` is the real one, what
/// `edge-agent run` uses: sysinfo measurements, apps as OS processes, the
/// host name, plain sockets. `edgepool-swarm` runs thousands of agents in
/// one process, each on a simulated machine (Kubernetes' kubemark "hollow
/// nodes": the agent's own code, a fake machine).
#[derive(Default)]
pub struct Machine {
    /// Where samples come from (None: this machine, with sysinfo).
    pub measure: Option<Box<dyn telemetry::Measure>>,
    /// The app runtime (None: OS processes under `data_dir/apps`).
    pub runtime: Option<runtime::Runtime>,
    /// The host name in the hello (None: this machine's).
    pub hostname: Option<String>,
    /// Switches on the connection to the manager and on the peer
    /// connections (see `edgepool_common::gate`; None: no switch).
    pub uplink_gate: Option<edgepool_common::gate::Gate>,
    pub peer_gate: Option<edgepool_common::gate::Gate>,
    /// The local address the stream to the manager leaves from (None: the
    /// kernel's pick). A simulated fleet gives each virtual agent its own,
    /// as separate machines would have: thousands of connections from one
    /// address to one port make every `connect` search the used ports.
    pub uplink_source: Option<std::net::IpAddr>,
    /// Build the peer server (tonic router, health, reflection, TLS
    /// acceptor) only once the node first becomes a pool member; no peer
    /// dials a node that is not a member. With a fixed `peer_listen` port
    /// the port too is bound only then (the advertised address is known
    /// without it), so a node that is never a member holds no descriptor
    /// for it; with port 0 it is bound at once to learn the port, and
    /// connections wait in the listen queue until the server is built. A
    /// simulated fleet sets it: most of its nodes are never members, and a
    /// server per node is most of what a virtual agent costs. False (the
    /// real agent): bound and served from the start.
    pub lazy_peer_server: bool,
}

/// The confinement of this agent's apps: the data dir made owner-only (no
/// app may traverse it to the keys), the run_as user resolved, the apps'
/// directory and cgroups set up.
fn app_sandbox(config: &AgentConfig) -> anyhow::Result<runtime::Sandbox> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} owner-only", config.data_dir.display()))?;
    let apps_dir = config.apps_dir();
    // Names this agent's app cgroups apart from those of other agents on
    // the machine (several in tests and `cloud-manager dev`).
    let tag = {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in apps_dir.as_os_str().as_encoded_bytes() {
            hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
        }
        format!("{hash:08x}")
    };
    Ok(runtime::Sandbox::new(&config.run_as, apps_dir, &tag)?)
}

/// Loads the identity, measures capacity and binds the peer port.
pub async fn build(config: AgentConfig) -> anyhow::Result<Agent> {
    raise_fd_limit();
    build_on(config, Machine::default()).await
}

/// Every peer-port connection waiting for its handshake is a file
/// descriptor (up to `tls::MIN_PENDING` of them under a flood of idle
/// connections): raise the soft limit to the hard limit, as the manager
/// does.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
}

/// `build` on the given machine (see [`Machine`]).
pub async fn build_on(config: AgentConfig, machine: Machine) -> anyhow::Result<Agent> {
    config.validate()?;
    let data = DataDir::new(&config.data_dir);
    let info = data.load_info()?;
    // Before anything binds: a run_as user that does not exist stops here.
    let sandbox = match machine.runtime {
        Some(_) => None,
        None => Some(app_sandbox(&config)?),
    };
    let ca = tls::read_certs(&data.ca())?;
    let chain = tls::read_certs(&data.cert())?;
    let key = tls::read_key(&data.key())?;
    let client_tls = tls::client_config(tls::roots(&ca)?, Some((chain.clone(), key.clone_key())))?;
    let manager = if config.manager.is_empty() {
        info.manager.clone()
    } else {
        config.manager.clone()
    };
    // Several replicas (`HOST:PORT,HOST:PORT`): the uplink moves to the
    // next one when its manager fails.
    let managers = tls::manager_addresses(&manager)?;
    let (peer_listener, peer_addr) = if machine.lazy_peer_server && config.peer_listen.port() != 0 {
        (None, config.peer_listen)
    } else {
        let l = bind_peer_port(config.peer_listen).await?;
        let addr = l.local_addr()?;
        (Some(l), addr)
    };
    let advertise = if !config.peer_advertise.is_empty() {
        config.peer_advertise.clone()
    } else if peer_addr.ip().is_unspecified() {
        let host = sysinfo::System::host_name().unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", peer_addr.port())
    } else {
        peer_addr.to_string()
    };
    let sampler: Box<dyn telemetry::Measure> = match machine.measure {
        Some(m) => m,
        None => {
            let interfaces = config.interfaces.clone();
            let overrides = config.capacity;
            Box::new(
                tokio::task::spawn_blocking(move || telemetry::Sampler::new(interfaces, overrides))
                    .await??,
            )
        }
    };
    let hello = pb::Hello {
        agent_version: edgepool_common::VERSION.to_string(),
        peer_address: advertise,
        capacity: Some(uplink::resources(sampler.capacity())),
        hostname: machine
            .hostname
            .unwrap_or_else(|| sysinfo::System::host_name().unwrap_or_default()),
    };
    let runtime = match (machine.runtime, sandbox) {
        (Some(runtime), _) => runtime,
        (None, Some(sandbox)) => runtime::Runtime::sandboxed(
            config.data_dir.join("apps"),
            runtime::RuntimeOptions::default(),
            sandbox,
        ),
        (None, None) => runtime::Runtime::new(
            config.data_dir.join("apps"),
            runtime::RuntimeOptions::default(),
        ),
    };
    let apps = runtime.clone();
    let shared = Arc::new(
        node::Shared::new(
            info.clone(),
            data,
            ca,
            chain,
            key,
            runtime,
            sampler.capacity(),
        )?
        .with_peer_suspect(Duration::from_millis(config.peer_suspect_ms))
        .with_offload_settings(
            offload_state::Settings::new(config.offload_lease_ms, config.scheduler_interval_ms)
                .with_guest_limits(offload_state::GuestLimits {
                    count: config.max_guests_per_member,
                    percent: config.max_guest_percent_per_member,
                }),
        )
        .with_peer_gate(machine.peer_gate)
        .with_autonomy_window(Duration::from_secs(config.autonomy_window_secs)),
    );
    let (measurer, measurements) = telemetry::measurer(sampler, shared.clone());
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = edgepool_common::metrics::bind(addr)
                .await
                .with_context(|| {
                    format!("cannot listen for metrics on {addr} (--metrics-listen)")
                })?;
            let bound = listener.local_addr()?;
            let reader = measurements.reader();
            let latest: metrics::LatestReport =
                Arc::new(move || reader.borrow().as_ref().map(|m| m.report.clone()));
            let registry = Arc::new(shared.metrics.registry(latest));
            Some((listener, bound, registry))
        }
        None => None,
    };
    let measure_now = measurements.asker();
    // An app that starts, runs or exits is reported at once.
    apps.on_change(measure_now.clone());
    let (state, link) = watch::channel(LinkState::Disconnected);
    let (liveness_tx, liveness) = watch::channel(liveness::Liveness::default());
    let (assign_tx, assignments) = watch::channel(None);
    let uplink = Uplink {
        shared: shared.clone(),
        assignments: assign_tx,
        manager,
        tls: Arc::new(client_tls),
        hello,
        managers,
        next_manager: 0,
        measurements,
        telemetry_interval: Duration::from_millis(u64::from(config.telemetry_interval_ms)),
        heartbeat_interval: Duration::from_millis(u64::from(config.heartbeat_interval_ms)),
        backoff: backoff::Backoff::new(
            Duration::from_millis(config.reconnect_min_ms),
            Duration::from_millis(config.reconnect_max_ms),
        ),
        state,
        liveness,
        gate: machine.uplink_gate,
        source: machine.uplink_source,
        keep: None,
    };
    Ok(Agent {
        info,
        shared,
        uplink,
        assignments,
        peer_listener,
        peer_limits: tls::AcceptLimits::new(
            config.peer_max_concurrent_handshakes as usize,
            Duration::from_millis(u64::from(config.peer_handshake_timeout_ms)),
        ),
        peer_addr,
        lazy_peer_server: machine.lazy_peer_server,
        link,
        probe_every: Duration::from_millis(config.peer_probe_interval_ms),
        liveness_every: Duration::from_millis(config.peer_liveness_interval_ms),
        liveness_tx,
        stop_apps_on_exit: config.stop_apps_on_exit,
        isolation_lease: Duration::from_millis(config.isolation_lease_ms),
        scheduler_every: Duration::from_millis(config.scheduler_interval_ms),
        network_accounting: config.network_accounting,
        measurer,
        measure_now,
        metrics,
        data_dir: config.data_dir.clone(),
        reserve: [
            config.reserve.cpu_millis,
            config.reserve.memory_mb,
            config.reserve.disk_mb,
            config.reserve.network_mbps * 1000,
            config.reserve.disk_io_kbps,
        ],
    })
}

impl Agent {
    pub fn node(&self) -> &NodeInfo {
        &self.info
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Where the metrics are served (`metrics_listen`), if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a, _)| *a)
    }

    /// Watches whether the stream to the manager is up.
    pub fn link(&self) -> watch::Receiver<LinkState> {
        self.link.clone()
    }

    /// Runs until `shutdown` fires.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(
            node = %self.info.node_id,
            tenant = %self.info.tenant,
            manager = %self.uplink.manager,
            peer = %self.peer_addr,
            "agent running"
        );
        let shared = self.shared.clone();
        // `DATA_DIR/metrics.url` says where the metrics are (a stale one
        // goes when they are off).
        let metrics_addr = self.metrics.as_ref().map(|(_, a, _)| *a);
        if let Err(e) = edgepool_common::metrics::write_url_file(&self.data_dir, metrics_addr) {
            tracing::warn!(error = %e, "could not write {}", edgepool_common::metrics::URL_FILE);
        }
        if let Some((listener, addr, registry)) = self.metrics {
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = edgepool_common::metrics::serve(listener, registry, stop).await {
                    tracing::warn!(error = %e, "metrics listener stopped");
                }
            });
            tracing::info!(addr = %addr, url = %edgepool_common::metrics::url(addr), "metrics serving");
        }
        // The saved assignment first: apps and membership come back even
        // when the manager is unreachable.
        if let Some(saved) = shared.load_saved()
            && let Err(e) = shared.apply(saved, node::Source::Saved).await
        {
            tracing::warn!(error = %e, "could not apply the saved assignment");
        }
        let peer = tokio::spawn(serve_peers(
            self.peer_listener,
            self.peer_addr,
            self.peer_limits,
            shared.clone(),
            self.lazy_peer_server,
            shutdown.clone(),
        ));
        let prober = tokio::spawn(peer::probe_loop(
            shared.clone(),
            self.probe_every,
            shutdown.clone(),
        ));
        let liveness = tokio::spawn(liveness::liveness_loop(
            shared.clone(),
            self.liveness_every,
            self.liveness_tx,
            shutdown.clone(),
        ));
        let applier = tokio::spawn(apply_loop(
            shared.clone(),
            self.assignments,
            self.measure_now,
        ));
        let measurer = tokio::spawn(self.measurer.run(shutdown.clone()));
        let scheduler = tokio::spawn(offload::scheduling::scheduler_loop(
            shared.clone(),
            self.scheduler_every,
            self.network_accounting,
            self.reserve,
            shutdown.clone(),
        ));
        let reconciler = tokio::spawn(offload::owner::reconcile_loop(
            shared.clone(),
            shutdown.clone(),
        ));
        let leases = tokio::spawn(offload::host::lease_loop(shared.clone(), shutdown.clone()));
        let isolation = tokio::spawn(isolation_loop(
            shared.clone(),
            self.link.clone(),
            self.isolation_lease,
            shutdown.clone(),
        ));
        self.uplink.run(shutdown.clone()).await;
        let _ = prober.await;
        let _ = liveness.await;
        let _ = isolation.await;
        let _ = scheduler.await;
        let _ = reconciler.await;
        let _ = leases.await;
        applier.abort();
        let _ = measurer.await;
        if self.stop_apps_on_exit {
            shared.runtime.stop_all().await;
        }
        match peer.await {
            Ok(r) => r?,
            Err(e) => anyhow::bail!("peer server task failed: {e}"),
        }
        tracing::info!("agent stopped");
        Ok(())
    }
}

async fn bind_peer_port(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    tls::listen(addr).with_context(|| format!("binding the peer port {addr}"))
}

/// Serves the peer port; with `lazy`, not before the node first becomes a
/// pool member (see `Machine::lazy_peer_server`), binding it then when it
/// was not bound yet (`listener` None: `addr`).
async fn serve_peers(
    listener: Option<TcpListener>,
    addr: SocketAddr,
    limits: tls::AcceptLimits,
    shared: Arc<node::Shared>,
    lazy: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if lazy && !shared.until_member(&shutdown).await {
        return Ok(());
    }
    let listener = match listener {
        Some(l) => l,
        None => bind_peer_port(addr).await?,
    };
    peer::serve(listener, limits, shared, shutdown).await
}

/// Applies the latest assignment from the manager, until the uplink ends.
/// One that a newer one replaced before it was applied is skipped (each is
/// the whole desired state); the stream never waits for this.
/// Applies each new assignment from the manager. One that differs from the
/// last one applied is measured and reported at once, not at the next
/// telemetry tick: a spare that just started a failed member's group says
/// so right away (the failover is done when the manager hears it).
async fn apply_loop(
    shared: Arc<node::Shared>,
    mut rx: watch::Receiver<Option<pb::Assignment>>,
    measure_now: Arc<tokio::sync::Notify>,
) {
    let mut last: Option<pb::Assignment> = None;
    while rx.changed().await.is_ok() {
        let latest = rx.borrow_and_update().clone();
        let Some(a) = latest else {
            continue;
        };
        let changed = last.as_ref() != Some(&a);
        match shared.apply(a.clone(), node::Source::Manager).await {
            Ok(()) if changed => {
                last = Some(a);
                measure_now.notify_one();
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "could not apply the assignment"),
        }
    }
}

/// Watches the links to the manager and the peers and moves the node in
/// and out of isolation (see `node::isolated`).
async fn isolation_loop(
    shared: Arc<node::Shared>,
    link: watch::Receiver<LinkState>,
    lease: Duration,
    shutdown: CancellationToken,
) {
    let now = clock::now_ms;
    let mut link = link;
    let mut down_since = Some(now());
    loop {
        // While the manager is connected nothing can change until the link
        // does; while it is not, the peers' answers age.
        let connected = *link.borrow_and_update() == LinkState::Connected && down_since.is_none();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)), if !connected => {}
            changed = link.changed(), if connected => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let t = now();
        down_since = match (*link.borrow(), down_since) {
            (LinkState::Connected, _) => None,
            (LinkState::Disconnected, None) => Some(t),
            (LinkState::Disconnected, since) => since,
        };
        shared.set_offline(down_since.is_some());
        let member = shared.membership().is_some();
        let iso = member
            && node::isolated(
                t,
                down_since,
                shared.last_peer_ok_ms(),
                lease.as_millis() as u64,
            );
        shared.set_isolated(iso).await;
    }
}
