//! The edgepool edge agent: enrollment, telemetry, the stream to the
//! manager and the peer server. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod cli;
pub mod config;
pub mod join;
pub mod peer;
pub mod runtime;
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
    uplink: Uplink,
    peer_listener: TcpListener,
    peer_addr: SocketAddr,
    peer_tls: Arc<rustls::ServerConfig>,
    link: watch::Receiver<LinkState>,
}

/// Loads the identity, measures capacity and binds the peer port.
pub async fn build(config: AgentConfig) -> anyhow::Result<Agent> {
    config.validate()?;
    let data = DataDir::new(&config.data_dir);
    let info = data.load_info()?;
    let ca = tls::read_certs(&data.ca())?;
    let chain = tls::read_certs(&data.cert())?;
    let key = tls::read_key(&data.key())?;
    let client_tls = tls::client_config(tls::roots(&ca)?, Some((chain.clone(), key.clone_key())))?;
    let peer_tls = tls::server_config(chain, key, tls::ClientAuth::Required(tls::roots(&ca)?))?;
    let manager = if config.manager.is_empty() {
        info.manager.clone()
    } else {
        config.manager.clone()
    };
    let peer_listener = TcpListener::bind(config.peer_listen)
        .await
        .with_context(|| format!("binding the peer port {}", config.peer_listen))?;
    let peer_addr = peer_listener.local_addr()?;
    let advertise = if !config.peer_advertise.is_empty() {
        config.peer_advertise.clone()
    } else if peer_addr.ip().is_unspecified() {
        let host = sysinfo::System::host_name().unwrap_or_else(|_| "localhost".into());
        format!("{host}:{}", peer_addr.port())
    } else {
        peer_addr.to_string()
    };
    let interfaces = config.interfaces.clone();
    let overrides = config.capacity;
    let sampler =
        tokio::task::spawn_blocking(move || telemetry::Sampler::new(interfaces, overrides))
            .await??;
    let hello = pb::Hello {
        agent_version: edgepool_common::VERSION.to_string(),
        peer_address: advertise,
        capacity: Some(uplink::resources(sampler.capacity())),
        hostname: sysinfo::System::host_name().unwrap_or_default(),
    };
    let (state, link) = watch::channel(LinkState::Disconnected);
    let uplink = Uplink {
        manager,
        tls: Arc::new(client_tls),
        hello,
        sampler: Some(sampler),
        telemetry_interval: Duration::from_millis(u64::from(config.telemetry_interval_ms)),
        heartbeat_interval: Duration::from_millis(u64::from(config.heartbeat_interval_ms)),
        backoff: backoff::Backoff::new(
            Duration::from_millis(config.reconnect_min_ms),
            Duration::from_millis(config.reconnect_max_ms),
        ),
        state,
    };
    Ok(Agent {
        info,
        uplink,
        peer_listener,
        peer_addr,
        peer_tls: Arc::new(peer_tls),
        link,
    })
}

impl Agent {
    pub fn node(&self) -> &NodeInfo {
        &self.info
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
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
        let peer = tokio::spawn(peer::serve(
            self.peer_listener,
            self.peer_tls,
            shutdown.clone(),
        ));
        self.uplink.run(shutdown.clone()).await;
        match peer.await {
            Ok(r) => r?,
            Err(e) => anyhow::bail!("peer server task failed: {e}"),
        }
        tracing::info!("agent stopped");
        Ok(())
    }
}
