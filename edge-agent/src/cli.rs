//! Command line of `edge-agent` (also reachable as `cloud-manager agent`,
//! which `cloud-manager dev` uses to run local agents).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use edgepool_common::logging::{self, LogFormat};
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::join::{JoinRequest, ManagerTrust};

#[derive(Debug, Parser)]
#[command(
    name = "edge-agent",
    version,
    about = "edgepool edge agent: runs on each edge machine, enrolls with the cloud manager, \
             reports resource usage and runs the apps of its pool slot",
    long_about = None,
    after_help = "Typical use:\n  edge-agent join --manager HOST:7443 --token ept_... --ca-cert ca.pem --data-dir /var/lib/edge-agent\n  edge-agent run --data-dir /var/lib/edge-agent"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this machine: make a key pair here, send a CSR with a join
    /// token to the manager, store the signed node certificate.
    Join(JoinArgs),
    /// Run the agent: connect to the manager with the node certificate,
    /// report telemetry, serve the peer port. Stops on SIGINT/SIGTERM.
    Run(Box<RunArgs>),
}

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Manager address HOST:PORT (the host must be in its certificate), or
    /// several replicas' comma-separated (tried in turn).
    #[arg(long, env = "EDGE_AGENT_MANAGER")]
    pub manager: String,
    /// Join token from `TenantService.CreateJoinToken` (single use).
    #[arg(long, env = "EDGE_AGENT_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The manager's root CA certificate (ca.pem).
    #[arg(
        long,
        conflicts_with = "ca_fingerprint",
        required_unless_present = "ca_fingerprint"
    )]
    pub ca_cert: Option<PathBuf>,
    /// Instead of --ca-cert: the root CA's fingerprint, `sha256:<hex>`, as
    /// printed by `cloud-manager init`.
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// Node id to enroll as (default: the host name, sanitised).
    #[arg(long, env = "EDGE_AGENT_NODE_ID")]
    pub node_id: Option<String>,
    /// Data directory for the key and certificates.
    #[arg(
        long,
        env = "EDGE_AGENT_DATA_DIR",
        default_value = "/var/lib/edge-agent"
    )]
    pub data_dir: PathBuf,
    /// Enroll again even if this data dir, or the manager, already knows this
    /// node: a new key and certificate replace the old ones, which stop
    /// working at once. Never takes over another tenant's node id.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file (see agent.example.toml); flags override it.
    #[arg(long, short, env = "EDGE_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (from join).
    #[arg(long, env = "EDGE_AGENT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Parent of the apps' working directories (default `<data-dir>-apps`).
    #[arg(long, env = "EDGE_AGENT_APPS_DIR")]
    pub apps_dir: Option<PathBuf>,
    /// User the apps run as when the agent runs as root (default
    /// edgepool-app; empty = root).
    #[arg(long, env = "EDGE_AGENT_RUN_AS")]
    pub run_as: Option<String>,
    /// Manager address HOST:PORT, or several replicas' comma-separated: the
    /// stream moves to the next one when its manager fails (default: what
    /// join used).
    #[arg(long, env = "EDGE_AGENT_MANAGER")]
    pub manager: Option<String>,
    /// Peer gRPC listen address (default 0.0.0.0:7444).
    #[arg(long, env = "EDGE_AGENT_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Address peers should dial, if not the listen address.
    #[arg(long, env = "EDGE_AGENT_PEER_ADVERTISE")]
    pub peer_advertise: Option<String>,
    /// Telemetry period in ms until the manager says otherwise (default 1000).
    #[arg(long, env = "EDGE_AGENT_TELEMETRY_INTERVAL_MS")]
    pub telemetry_interval_ms: Option<u32>,
    /// Heartbeat period in ms until the manager says otherwise (default 1000).
    #[arg(long, env = "EDGE_AGENT_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u32>,
    /// Interface to measure (repeat for several; default all but lo).
    #[arg(
        long = "interface",
        env = "EDGE_AGENT_INTERFACES",
        value_delimiter = ','
    )]
    pub interfaces: Vec<String>,
    /// CPU capacity in millicores (0 or absent = detect: CPUs x 1000).
    #[arg(long, env = "EDGE_AGENT_CPU_MILLIS")]
    pub cpu_millis: Option<u64>,
    /// Memory capacity in MiB (0 or absent = detect: RAM).
    #[arg(long, env = "EDGE_AGENT_MEMORY_MB")]
    pub memory_mb: Option<u64>,
    /// Disk space capacity in MiB (0 or absent = detect: the sum of real
    /// file systems).
    #[arg(long, env = "EDGE_AGENT_DISK_MB")]
    pub disk_mb: Option<u64>,
    /// Network capacity in Mbit/s (0 or absent = detect: the measured
    /// interfaces' link speed, 1000 if none reports one).
    #[arg(long, env = "EDGE_AGENT_NETWORK_MBPS")]
    pub network_mbps: Option<u64>,
    /// Disk read+write rate capacity in KiB/s (0 or absent = unknown: the
    /// disk I/O threshold is not evaluated and any disk I/O is admitted;
    /// never detected).
    #[arg(long, env = "EDGE_AGENT_DISK_IO_KBPS")]
    pub disk_io_kbps: Option<u64>,
    /// First reconnect delay in ms (default 200).
    #[arg(long, env = "EDGE_AGENT_RECONNECT_MIN_MS")]
    pub reconnect_min_ms: Option<u64>,
    /// Largest reconnect delay in ms (default 10000; jittered exponential
    /// backoff in between).
    #[arg(long, env = "EDGE_AGENT_RECONNECT_MAX_MS")]
    pub reconnect_max_ms: Option<u64>,
    /// TLS handshakes in progress at once on the peer port (default 32).
    #[arg(long, env = "EDGE_AGENT_PEER_MAX_CONCURRENT_HANDSHAKES")]
    pub peer_max_concurrent_handshakes: Option<u32>,
    /// A peer-port TLS handshake not done in this time is dropped (ms,
    /// default 10000).
    #[arg(long, env = "EDGE_AGENT_PEER_HANDSHAKE_TIMEOUT_MS")]
    pub peer_handshake_timeout_ms: Option<u32>,
    /// How often pool members probe each other (ms, default 2000).
    #[arg(long, env = "EDGE_AGENT_PEER_PROBE_INTERVAL_MS")]
    pub peer_probe_interval_ms: Option<u64>,
    /// How often pool members check that each other answers (ms, default 200).
    #[arg(long, env = "EDGE_AGENT_PEER_LIVENESS_INTERVAL_MS")]
    pub peer_liveness_interval_ms: Option<u64>,
    /// A member silent this long is reported unreachable (ms, default 600).
    #[arg(long, env = "EDGE_AGENT_PEER_SUSPECT_MS")]
    pub peer_suspect_ms: Option<u64>,
    /// Stop the apps when the agent stops gracefully (true/false, default true).
    #[arg(long, env = "EDGE_AGENT_STOP_APPS_ON_EXIT")]
    pub stop_apps_on_exit: Option<bool>,
    /// How often the threshold policy is evaluated (ms, default 1000).
    #[arg(long, env = "EDGE_AGENT_SCHEDULER_INTERVAL_MS")]
    pub scheduler_interval_ms: Option<u64>,
    /// Offload reconciliation interval in ms: the lease of an offloaded app
    /// on its host (default 6000; see agent.example.toml).
    #[arg(long, env = "EDGE_AGENT_OFFLOAD_LEASE_MS")]
    pub offload_lease_ms: Option<u64>,
    /// Most guests one other member may run here at once (default 16).
    #[arg(long, env = "EDGE_AGENT_MAX_GUESTS_PER_MEMBER")]
    pub max_guests_per_member: Option<u32>,
    /// Largest percentage of each resource of this node's capacity one other
    /// member's guests may hold (default 90).
    #[arg(long, env = "EDGE_AGENT_MAX_GUEST_PERCENT_PER_MEMBER")]
    pub max_guest_percent_per_member: Option<u32>,
    /// Network accounting: interface (default) or process.
    #[arg(long, env = "EDGE_AGENT_NETWORK_ACCOUNTING")]
    pub network_accounting: Option<crate::config::NetworkAccounting>,
    /// Isolation lease in ms (default 10000; see agent.example.toml).
    #[arg(long, env = "EDGE_AGENT_ISOLATION_LEASE_MS")]
    pub isolation_lease_ms: Option<u64>,
    /// Autonomy window in seconds (default 259200, 72 h; see
    /// agent.example.toml).
    #[arg(long, env = "EDGE_AGENT_AUTONOMY_WINDOW_SECS")]
    pub autonomy_window_secs: Option<u64>,
    /// Log format: plain (default) or json (RUST_LOG sets the filter).
    #[arg(long, env = "EDGE_AGENT_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Serve Prometheus metrics (plain HTTP, GET /metrics) on this address
    /// (default: off; no TLS or authentication, so keep it on loopback or a
    /// monitoring network; port 0 = any free port). The URL is written to
    /// DATA_DIR/metrics.url.
    #[arg(long, env = "EDGE_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Write the agent's pid here once it runs.
    #[arg(long, env = "EDGE_AGENT_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    /// Start a new process session (used by `cloud-manager dev`, so that
    /// `pkill -s` on the pid crashes this simulated machine as a whole).
    #[arg(long, hide = true)]
    pub new_session: bool,
    /// Exit when the parent process goes away (used by `cloud-manager dev`).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,
}

impl RunArgs {
    /// The config file (or defaults) with flags and env applied on top.
    pub fn resolve(&self) -> anyhow::Result<AgentConfig> {
        let mut c = match &self.config {
            Some(p) => AgentConfig::from_file(p)?,
            None => AgentConfig::default(),
        };
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.apps_dir {
            c.apps_dir = v.clone();
        }
        if let Some(v) = &self.run_as {
            c.run_as = v.clone();
        }
        if let Some(v) = &self.manager {
            c.manager = v.clone();
        }
        if let Some(v) = self.peer_listen {
            c.peer_listen = v;
        }
        if let Some(v) = &self.peer_advertise {
            c.peer_advertise = v.clone();
        }
        if let Some(v) = self.telemetry_interval_ms {
            c.telemetry_interval_ms = v;
        }
        if let Some(v) = self.heartbeat_interval_ms {
            c.heartbeat_interval_ms = v;
        }
        if !self.interfaces.is_empty() {
            c.interfaces = self.interfaces.clone();
        }
        for (flag, field) in [
            (self.cpu_millis, &mut c.capacity.cpu_millis),
            (self.memory_mb, &mut c.capacity.memory_mb),
            (self.disk_mb, &mut c.capacity.disk_mb),
            (self.network_mbps, &mut c.capacity.network_mbps),
            (self.disk_io_kbps, &mut c.capacity.disk_io_kbps),
        ] {
            if let Some(v) = flag {
                *field = v;
            }
        }
        if let Some(v) = self.reconnect_min_ms {
            c.reconnect_min_ms = v;
        }
        if let Some(v) = self.reconnect_max_ms {
            c.reconnect_max_ms = v;
        }
        if let Some(v) = self.peer_max_concurrent_handshakes {
            c.peer_max_concurrent_handshakes = v;
        }
        if let Some(v) = self.peer_handshake_timeout_ms {
            c.peer_handshake_timeout_ms = v;
        }
        if let Some(v) = self.peer_probe_interval_ms {
            c.peer_probe_interval_ms = v;
        }
        if let Some(v) = self.peer_liveness_interval_ms {
            c.peer_liveness_interval_ms = v;
        }
        if let Some(v) = self.peer_suspect_ms {
            c.peer_suspect_ms = v;
        }
        if let Some(v) = self.stop_apps_on_exit {
            c.stop_apps_on_exit = v;
        }
        if let Some(v) = self.isolation_lease_ms {
            c.isolation_lease_ms = v;
        }
        if let Some(v) = self.autonomy_window_secs {
            c.autonomy_window_secs = v;
        }
        if let Some(v) = self.scheduler_interval_ms {
            c.scheduler_interval_ms = v;
        }
        if let Some(v) = self.offload_lease_ms {
            c.offload_lease_ms = v;
        }
        if let Some(v) = self.max_guests_per_member {
            c.max_guests_per_member = v;
        }
        if let Some(v) = self.max_guest_percent_per_member {
            c.max_guest_percent_per_member = v;
        }
        if let Some(v) = self.network_accounting {
            c.network_accounting = v;
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = self.metrics_listen {
            c.metrics_listen = Some(v);
        }
        c.validate()?;
        Ok(c)
    }
}

/// Runs a parsed command line; the exit code says how it went.
pub fn main(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Join(args) => {
            logging::init(LogFormat::Plain, "warn");
            runtime().and_then(|rt| rt.block_on(join(args)))
        }
        Command::Run(args) => run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn join(args: JoinArgs) -> anyhow::Result<()> {
    let trust = match (args.ca_cert, args.ca_fingerprint) {
        (Some(path), None) => ManagerTrust::CaFile(path),
        (None, Some(fp)) => ManagerTrust::Fingerprint(fp),
        _ => anyhow::bail!("give exactly one of --ca-cert and --ca-fingerprint"),
    };
    let node_id = args.node_id.unwrap_or_else(crate::join::default_node_id);
    let info = crate::join::join(JoinRequest {
        manager: args.manager,
        token: args.token,
        trust,
        node_id,
        data_dir: args.data_dir.clone(),
        force: args.force,
    })
    .await?;
    println!(
        "enrolled node {} (tenant {}) with the manager at {}; identity stored in {}",
        info.node_id,
        info.tenant,
        info.manager,
        args.data_dir.display()
    );
    Ok(())
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Bad config exits here, before anything binds.
    let config = args.resolve()?;
    logging::init(config.log_format, "info");
    if args.new_session {
        nix::unistd::setsid()?;
    }
    let parent = nix::unistd::getppid();
    if let Some(p) = &args.pid_file {
        edgepool_common::fsutil::write_public(p, format!("{}\n", std::process::id()).as_bytes())?;
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        edgepool_common::grpc::cancel_on_signals(shutdown.clone())?;
        if args.exit_with_parent {
            let token = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    if nix::unistd::getppid() != parent {
                        tracing::warn!("parent process is gone: shutting down");
                        token.cancel();
                        return;
                    }
                }
            });
        }
        let agent = crate::build(config).await?;
        agent.run(shutdown).await
    })
}
