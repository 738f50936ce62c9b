//! Start-up and serving: `build()` prepares everything and binds, `run()`
//! serves until the shutdown token fires.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgepool_common::proto::agent_service_server::AgentServiceServer;
use edgepool_common::proto::tenant_service_server::TenantServiceServer;
use edgepool_common::tls;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent_api::AgentApi;
use crate::api::TenantApi;
use crate::ca::{self, Ca, CaFiles};
use crate::config::{ManagerConfig, StoreKind};
use crate::etcd_store::{EtcdOptions, EtcdStore};
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
}

/// Binds the listener, then opens the store and loads or creates the CA.
///
/// The order matters for a clean failure: a taken port or a data dir that
/// another manager holds (its store is locked) is refused before anything
/// is written, so a failed start leaves no half-made CA behind.
pub async fn build(config: ManagerConfig) -> anyhow::Result<ManagerServer> {
    config.validate()?;
    raise_fd_limit();
    let listen = config.listen;
    let listener = TcpListener::bind(listen).await.with_context(|| {
        format!("cannot listen on {listen} (is another cloud-manager running? choose another address with --listen)")
    })?;
    let local_addr = listener.local_addr()?;
    let dir = config.data_dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let store = open_store(&config).await?;
    let files = CaFiles::new(&dir);
    if !files.ca_cert().exists() {
        let report = ca::init(
            &dir,
            &config.trust_domain,
            &config.server_names,
            &config.default_tenant,
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
    let roots = tls::roots(&tls::certs_from_pem(ca.cert_pem(), "ca.pem")?)?;
    let tls_config = tls::server_config(chain, key, tls::ClientAuth::Optional(roots))?;
    let manager = Arc::new(Manager::new(config, ca, store)?);
    Ok(ManagerServer {
        manager,
        listener,
        local_addr,
        tls: Arc::new(tls_config),
    })
}

/// The store the config names: `state.redb` in the data dir, or etcd.
async fn open_store(config: &ManagerConfig) -> anyhow::Result<Box<dyn Store>> {
    Ok(match config.store {
        StoreKind::Redb => Box::new(RedbStore::open(&config.data_dir)?),
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
            };
            // Connecting blocks (the client has its own runtime).
            let store = tokio::task::spawn_blocking(move || EtcdStore::open(&options)).await??;
            tracing::info!(
                endpoints = %config.etcd_endpoints.join(","),
                prefix = %config.etcd_prefix,
                "state kept in etcd"
            );
            Box::new(store)
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
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<TenantServiceServer<TenantApi>>()
            .await;
        health_reporter
            .set_serving::<AgentServiceServer<AgentApi>>()
            .await;
        let (reflection_v1, reflection_v1alpha) = edgepool_common::grpc::reflection()?;

        let tenant =
            TenantServiceServer::new(TenantApi::new(self.manager.clone(), shutdown.clone()));
        let agent = AgentServiceServer::new(AgentApi::new(
            self.manager.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        self.manager.start(&tracker, &shutdown);
        let config = self.manager.config();
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
