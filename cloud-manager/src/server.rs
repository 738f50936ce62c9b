//! Start-up and serving: `build()` prepares everything and binds, `run()`
//! serves until the shutdown token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use edgepool_common::grpc::max_request;
use edgepool_common::proto::agent_service_server::AgentServiceServer;
use edgepool_common::proto::tenant_service_server::TenantServiceServer;
use edgepool_common::tls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_api::AgentApi;
use crate::api::TenantApi;
use crate::auth::Trust;
use crate::ca::{self, Ca, CaFiles};
use crate::config::{ManagerConfig, StoreKind};
use crate::dashboard::{Dashboard, Links};
use crate::etcd_store::{EtcdOptions, EtcdStore};
use crate::forward::{self, Forwarded, LeaderLink};
use crate::manager::Manager;
use crate::store::{RedbStore, Store};

/// How long a graceful shutdown waits for connections to finish.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// A manager that is bound and ready to serve.
pub struct ManagerServer {
    manager: Arc<Manager>,
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    /// The rules client certificates must pass (at the handshake and per
    /// call).
    trust: Trust,
    /// Set when this manager no longer holds its etcd prefix (etcd store):
    /// it stops, so that another replica leads.
    lost: Option<Arc<AtomicBool>>,
    /// The web dashboard, bound (`http_listen`), unless it is off.
    dashboard: Option<Dashboard>,
    /// The Prometheus metrics listener (`metrics_listen`), bound.
    metrics: Option<(TcpListener, SocketAddr)>,
}

/// Binds the listener, then opens the store and loads or creates the CA.
///
/// The order matters for a clean failure: a taken port or a data dir that
/// another manager holds (its store is locked) is refused before anything
/// is written, so a failed start leaves no half-made CA behind.
pub async fn build(config: ManagerConfig) -> anyhow::Result<ManagerServer> {
    build_until(config, CancellationToken::new()).await
}

/// `build`, given up when `shutdown` fires (a standby replica waits in it
/// until it leads; see `open_store`). With `store = "etcd"` the CA and the
/// TLS config come first: a standby serves its health (`edge.v1.Leader`
/// NOT_SERVING) on the manager's port while it waits.
pub async fn build_until(
    config: ManagerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<ManagerServer> {
    config.validate()?;
    raise_fd_limit();
    let listen = config.listen;
    let listener = tls::listen(listen).with_context(|| {
        format!("cannot listen on {listen} (is another cloud-manager running? choose another address with --listen)")
    })?;
    let local_addr = listener.local_addr()?;
    let mut dashboard = match config.http_listen.addr() {
        None => None,
        Some(addr) => {
            Some(Dashboard::bind(addr, config.http_tls, &public_host(&config)).with_context(|| {
                format!("cannot listen on {addr} for the dashboard (taken? choose another address with --http-listen, or --http-listen off)")
            })?)
        }
    };
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let l = edgepool_common::metrics::bind(addr)
                .await
                .with_context(|| {
                    format!("cannot listen for metrics on {addr} (--metrics-listen)")
                })?;
            let bound = l.local_addr()?;
            Some((l, bound))
        }
        None => None,
    };
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let etcd = config.store == StoreKind::Etcd;
    let redb = if etcd {
        None
    } else {
        Some(open_store(&config, None).await?)
    };
    let files = CaFiles::new(&dir);
    if !files.ca_cert().exists() {
        let report = ca::init(
            &dir,
            &config.trust_domain,
            &config.server_names,
            &config.default_tenant,
            time::Duration::days(i64::from(ca::DEFAULT_TENANT_CERT_DAYS)),
            false,
        )?;
        tracing::info!(
            dir = %dir.display(),
            fingerprint = %report.fingerprint,
            "created a new root CA, server certificate and tenant bundle"
        );
    }
    let ca = Ca::load(&files, &config.trust_domain)?;
    let chain = tls::read_certs(&files.server_cert())?;
    let key = tls::read_key(&files.server_key())?;
    if let Some(d) = dashboard.as_mut().filter(|_| config.http_tls) {
        d.set_tls(chain.clone(), key.clone_key())
            .context("the dashboard's TLS configuration (http_tls)")?;
    }
    // Client certificates are optional on this port (Enroll has none);
    // one given must pass `Trust`'s issuer and revocation rules.
    let trust = Trust::new(&config.trust_domain, ca.cert_pem(), &config.data_dir)?;
    let tls_config = Arc::new(tls::server_config_with_verifier(
        chain,
        key,
        trust.verifier(),
    )?);
    let (listener, (store, lost)) = match redb {
        Some(opened) => (listener, opened),
        None => {
            // A standby until the prefix is ours: its port answers health
            // (and reflection) from a copy of the listening socket.
            tracing::info!(addr = %local_addr, "waiting for the etcd prefix (a standby while another manager leads); health on this address");
            let std = listener.into_std()?;
            let standby_listener = TcpListener::from_std(std.try_clone()?)?;
            let listener = TcpListener::from_std(std)?;
            let standby_stop = CancellationToken::new();
            let leader = Arc::new(std::sync::Mutex::new(None));
            let link = LeaderLink::new(files.clone(), &config.trust_domain, leader.clone());
            let mut standby = tokio::spawn(serve_standby(
                standby_listener,
                tls_config.clone(),
                link,
                standby_stop.clone(),
            ));
            let stop = Arc::new(AtomicBool::new(false));
            let watcher = tokio::spawn({
                let (stop, shutdown) = (stop.clone(), shutdown.clone());
                async move {
                    shutdown.cancelled().await;
                    stop.store(true, Ordering::Relaxed);
                }
            });
            let advertise = advertise_address(&config, local_addr);
            let opened = open_store(&config, Some((stop, leader, advertise))).await;
            watcher.abort();
            // Calls forwarded to the old leader end now; their clients
            // come back (here or to another replica).
            standby_stop.cancel();
            if tokio::time::timeout(Duration::from_secs(1), &mut standby)
                .await
                .is_err()
            {
                standby.abort();
            }
            (listener, opened?)
        }
    };
    let manager = Arc::new(Manager::new(config, ca, store)?);
    Ok(ManagerServer {
        manager,
        listener,
        local_addr,
        lost,
        metrics,
        tls: tls_config,
        trust,
        dashboard,
    })
}

/// The health service name that says whether this replica leads: SERVING
/// on the manager that holds the store, NOT_SERVING on a standby.
pub const LEADER_SERVICE: &str = "edge.v1.Leader";

/// Where the other replicas reach this manager: `advertise_address`, or
/// the listen address (this host's name with the port when it listens on
/// every address).
fn advertise_address(config: &ManagerConfig, local: SocketAddr) -> String {
    match &config.advertise_address {
        Some(a) => a.clone(),
        None if local.ip().is_unspecified() => {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into());
            format!("{host}:{}", local.port())
        }
        None => local.to_string(),
    }
}

/// The name links to the dashboard use when it listens on every address:
/// the first of `server_names` that is not a loopback name, else this
/// host's name.
fn public_host(config: &ManagerConfig) -> String {
    let local = ["localhost", "127.0.0.1", "::1"];
    match config
        .server_names
        .iter()
        .find(|n| !local.contains(&n.as_str()))
    {
        Some(n) if n.contains(':') => format!("[{n}]"),
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    }
}

/// What a standby replica serves while it waits to lead: health (with
/// `edge.v1.Leader` NOT_SERVING), reflection, and the tenant and agent
/// services, whose calls it forwards to the leader (see `forward`).
async fn serve_standby(
    listener: TcpListener,
    tls_config: Arc<rustls::ServerConfig>,
    link: Arc<LeaderLink>,
    stop: CancellationToken,
) {
    let (reporter, health) = edgepool_common::grpc::health();
    reporter
        .set_service_status(LEADER_SERVICE, tonic_health::ServingStatus::NotServing)
        .await;
    for name in [forward::Tenant::NAME, forward::Agent::NAME] {
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let Ok((reflection_v1, reflection_v1alpha)) = edgepool_common::grpc::reflection() else {
        return;
    };
    let incoming = tls::tls_incoming(
        listener,
        tls::fixed(tls_config),
        tls::AcceptLimits::new(64, Duration::from_secs(10)),
        stop.clone(),
    );
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(forward::Forward::<forward::Tenant>::new(link.clone()))
        .add_service(forward::Forward::<forward::Agent>::new(link))
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "standby health server stopped");
    }
}

/// How a standby waits for the etcd prefix: the flag that ends the wait,
/// where to keep the leader's address, and this manager's own.
type Standby = (Arc<AtomicBool>, LeaderSlot, String);
type LeaderSlot = Arc<std::sync::Mutex<Option<String>>>;

/// The store the config names: `state.redb` in the data dir, or etcd. For
/// etcd, `standby` given: wait as a standby while another manager holds the
/// prefix, until it is free (or the stop flag is set). Also returns the
/// flag set when the etcd hold is lost.
async fn open_store(
    config: &ManagerConfig,
    standby: Option<Standby>,
) -> anyhow::Result<(Box<dyn Store>, Option<Arc<AtomicBool>>)> {
    Ok(match config.store {
        StoreKind::Redb => (Box::new(RedbStore::open(&config.data_dir)?), None),
        StoreKind::Etcd => {
            let options = EtcdOptions {
                endpoints: config.etcd_endpoints.clone(),
                prefix: config.etcd_prefix.clone(),
                ca_cert: config.etcd_ca_cert.clone(),
                cert: config.etcd_cert.clone(),
                key: config.etcd_key.clone(),
                lease_ttl_seconds: config.etcd_lease_ttl_seconds,
                max_txn_ops: config.etcd_max_txn_ops,
                data_dir: config.data_dir.clone(),
                standby: standby.is_some(),
                advertise: standby
                    .as_ref()
                    .map(|s| s.2.clone())
                    .unwrap_or_else(|| config.listen.to_string()),
                stop: standby.as_ref().map(|s| s.0.clone()),
                leader: standby.map(|s| s.1),
            };
            // Connecting blocks (the client has its own runtime).
            let store = tokio::task::spawn_blocking(move || EtcdStore::open(&options)).await??;
            tracing::info!(
                endpoints = %config.etcd_endpoints.join(","),
                prefix = %config.etcd_prefix,
                "state kept in etcd"
            );
            let lost = store.lost_flag();
            (Box::new(store), Some(lost))
        }
    })
}

impl ManagerServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn manager(&self) -> Arc<Manager> {
        self.manager.clone()
    }

    /// Where the dashboard listens (None: off).
    pub fn dashboard_addr(&self) -> Option<SocketAddr> {
        self.dashboard.as_ref().map(Dashboard::local_addr)
    }

    /// What mints the dashboard's login links (None: off).
    pub fn dashboard_links(&self) -> Option<Arc<Links>> {
        self.dashboard.as_ref().map(Dashboard::links)
    }

    /// Where the metrics are served (`metrics_listen`), if they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|(_, a)| *a)
    }

    /// Serves until `shutdown` fires, then drains for at most 5 s.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.run_with_drain(shutdown, DRAIN_DEADLINE).await
    }

    /// Like `run`, with another drain deadline (`dev` stops in about 2 s:
    /// a client that stopped reading must not hold it longer).
    pub async fn run_with_drain(
        self,
        shutdown: CancellationToken,
        drain: Duration,
    ) -> anyhow::Result<()> {
        let tracker = TaskTracker::new();
        let (health_reporter, health) = edgepool_common::grpc::health();
        health_reporter
            .set_serving::<TenantServiceServer<TenantApi>>()
            .await;
        health_reporter
            .set_serving::<AgentServiceServer<AgentApi>>()
            .await;
        // This manager holds its store: it leads.
        health_reporter
            .set_service_status(LEADER_SERVICE, tonic_health::ServingStatus::Serving)
            .await;
        // A lost etcd hold: stop leading at once (another replica takes
        // over); the process ends with an error.
        let deposed = CancellationToken::new();
        if let Some(lost) = self.lost.clone() {
            let (reporter, shutdown, deposed) =
                (health_reporter.clone(), shutdown.clone(), deposed.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                    }
                    if lost.load(Ordering::Relaxed) {
                        reporter
                            .set_service_status(
                                LEADER_SERVICE,
                                tonic_health::ServingStatus::NotServing,
                            )
                            .await;
                        tracing::error!(
                            "lost the etcd prefix: this manager stops leading and exits"
                        );
                        deposed.cancel();
                        shutdown.cancel();
                        return;
                    }
                }
            });
        }
        let (reflection_v1, reflection_v1alpha) = edgepool_common::grpc::reflection()?;

        let tenant = TenantServiceServer::new(
            TenantApi::new(self.manager.clone(), self.trust.clone(), shutdown.clone())
                .with_dashboard(self.dashboard.as_ref().map(Dashboard::links)),
        )
        .max_decoding_message_size(max_request::TENANT);
        let agent = AgentServiceServer::new(AgentApi::new(
            self.manager.clone(),
            self.trust.clone(),
            shutdown.clone(),
            tracker.clone(),
        ))
        .max_decoding_message_size(max_request::AGENT);
        self.manager.start(&tracker, &shutdown);
        if let Some(dashboard) = self.dashboard {
            tracker.spawn(dashboard.run(self.manager.clone(), shutdown.clone()));
        }
        let config = self.manager.config();
        // `DATA_DIR/metrics.url` says where the metrics are (a stale one
        // goes when they are off).
        let metrics_addr = self.metrics.as_ref().map(|(_, a)| *a);
        if let Err(e) = edgepool_common::metrics::write_url_file(&config.data_dir, metrics_addr) {
            tracing::warn!(error = %e, "could not write {}", edgepool_common::metrics::URL_FILE);
        }
        if let Some((listener, addr)) = self.metrics {
            let registry = Arc::new(crate::scrape::registry(self.manager.clone()));
            let stop = shutdown.clone();
            tokio::spawn(async move {
                if let Err(e) = edgepool_common::metrics::serve(listener, registry, stop).await {
                    tracing::warn!(error = %e, "metrics listener stopped");
                }
            });
            tracing::info!(addr = %addr, url = %edgepool_common::metrics::url(addr), "metrics serving");
        }
        let limits = tls::AcceptLimits::new(
            config.max_concurrent_handshakes as usize,
            Duration::from_millis(u64::from(config.handshake_timeout_ms)),
        );
        let incoming = tls::tls_incoming(
            self.listener,
            tls::fixed(self.tls),
            limits,
            shutdown.clone(),
        );
        tracing::info!(addr = %self.local_addr, "manager serving");
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .layer(edgepool_common::metrics::RpcLayer::new(
                self.manager.control().metrics.rpc.clone(),
            ))
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(tenant)
            .add_service(agent)
            .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
        let deadline = async {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::select! {
            r = serve => r?,
            _ = deadline => tracing::warn!("drain deadline passed; closing remaining connections"),
        }
        tracker.close();
        let _ = tokio::time::timeout(drain.min(Duration::from_secs(1)), tracker.wait()).await;
        // The store closes now, not whenever the last reference goes (an
        // etcd store gives its prefix back to the next manager at once).
        let control = self.manager.clone();
        let _ = tokio::task::spawn_blocking(move || control.control().stop_writer()).await;
        tracing::info!("manager stopped");
        if deposed.is_cancelled() {
            anyhow::bail!(
                "this manager lost its hold on the etcd prefix (cut off from etcd, or stalled, longer than etcd_lease_ttl_seconds) and stopped; another replica leads"
            );
        }
        Ok(())
    }
}

/// One agent stream is one file descriptor: raise the soft limit to the
/// hard limit so a large fleet does not hit the usual 1024.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
}
