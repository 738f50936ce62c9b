//! `edgepool-swarm`: a simulated fleet. N virtual edge agents in one
//! process, each the agent library's own code (enrollment with a real join
//! token and its own key and CSR, its own mutual-TLS stream, hello,
//! telemetry, heartbeats, app reports, assignments, peer server and
//! liveness beats at the real cadence) on a simulated machine: synthetic
//! usage, apps that "run" without processes. Kubernetes' kubemark "hollow
//! nodes" are the model. See docs/swarm.md.
//!
//!   edgepool-swarm --agents 1000 --manager 127.0.0.1:7443 --ca-cert ca.pem \
//!       --tenant-cert tenant.pem --tenant-key tenant.key --data-dir /tmp/swarm
//!
//! Control: one command per line on stdin or on the UNIX socket
//! DIR/control.sock (`help` lists them); a status line on stderr every
//! --status-interval-ms.

mod control;
mod fleet;
mod machine;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edge_agent::config::AgentConfig;
use edge_agent::join::ManagerTrust;
use edge_agent::runtime::AppUsage;
use edgepool_common::logging::{self, LogFormat};
use edgepool_common::proto::tenant_service_client::TenantServiceClient;
use edgepool_common::tls;
use tokio_util::sync::CancellationToken;

use crate::fleet::{Fleet, Settings, Tokens};
use crate::machine::Capacity;

#[derive(Debug, Parser)]
#[command(
    name = "edgepool-swarm",
    about = "A simulated fleet: N virtual edge agents (the agent's own code on a fake machine) in one process",
    after_help = crate::control::HELP
)]
struct Args {
    /// How many virtual agents.
    #[arg(long)]
    agents: usize,
    /// Manager address HOST:PORT.
    #[arg(long, env = "EDGEPOOL_SWARM_MANAGER")]
    manager: String,
    /// A join token (single use: one per agent that has to enroll). Repeat
    /// for several.
    #[arg(long = "token")]
    tokens: Vec<String>,
    /// A file with one join token per line.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// A tenant client certificate (with --tenant-key): the swarm makes
    /// one join token per agent it enrolls (TenantService.CreateJoinToken).
    #[arg(long, requires = "tenant_key")]
    tenant_cert: Option<PathBuf>,
    #[arg(long, requires = "tenant_cert")]
    tenant_key: Option<PathBuf>,
    /// The manager's root CA certificate (ca.pem).
    #[arg(
        long,
        conflicts_with = "ca_fingerprint",
        required_unless_present = "ca_fingerprint"
    )]
    ca_cert: Option<PathBuf>,
    /// Instead of --ca-cert: the root CA's fingerprint, sha256:<hex>.
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// Credentials are kept in DIR/agents/NNNNN (reruns skip enrollment
    /// unless the CA changed); the control socket is DIR/control.sock.
    #[arg(long)]
    data_dir: PathBuf,
    /// Node ids are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "swarm")]
    name_prefix: String,
    /// Enroll every agent again, cached credentials or not.
    #[arg(long)]
    reenroll: bool,
    /// Agents started per second (enrollment and first connection); 0 =
    /// all at once.
    #[arg(long, default_value_t = 200.0)]
    ramp_per_sec: f64,
    /// Agent i serves its peer port on 127.NET.(i/250).(i%250+1).
    #[arg(long, default_value_t = 77)]
    peer_net: u8,
    /// The peer port on every agent's address. 0: each binds an ephemeral
    /// port at start (one descriptor per agent); a fixed port is bound only
    /// when the agent becomes a pool member, so a fleet of N holds N fewer
    /// descriptors (needed for 10,000 under a 20,000 descriptor limit).
    #[arg(long, default_value_t = 0)]
    peer_port: u16,
    /// Every virtual machine's capacity.
    #[arg(long, default_value_t = 4000)]
    cpu_millis: u64,
    #[arg(long, default_value_t = 8192)]
    memory_mb: u64,
    #[arg(long, default_value_t = 100_000)]
    disk_mb: u64,
    #[arg(long, default_value_t = 1000)]
    network_mbps: u64,
    /// What each simulated app uses while it "runs".
    #[arg(long, default_value_t = 20)]
    app_cpu_millis: u64,
    #[arg(long, default_value_t = 16)]
    app_memory_mb: u64,
    /// Agent settings; the defaults are the real agent's.
    #[arg(long, default_value_t = 1000)]
    telemetry_interval_ms: u32,
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u32,
    #[arg(long, default_value_t = 2000)]
    peer_probe_interval_ms: u64,
    #[arg(long, default_value_t = 200)]
    peer_liveness_interval_ms: u64,
    #[arg(long, default_value_t = 600)]
    peer_suspect_ms: u64,
    #[arg(long, default_value_t = 200)]
    reconnect_min_ms: u64,
    #[arg(long, default_value_t = 10_000)]
    reconnect_max_ms: u64,
    /// How often the status line goes to stderr (0 = never).
    #[arg(long, default_value_t = 5000)]
    status_interval_ms: u64,
    /// TLS handshakes the virtual agents' outgoing connections run at once,
    /// all agents together (0: no limit). Others wait their turn (inside
    /// their connect timeout), so agents already connected keep their
    /// cadence while the rest of the fleet reconnects.
    #[arg(long, default_value_t = 64)]
    max_dials: usize,
    /// Worker threads of the one tokio runtime (0 = one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    // The agents' own logs are many and say the same thing N times: only
    // warnings by default (RUST_LOG overrides).
    logging::init(args.log_format, "warn,edgepool_swarm=info");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if args.threads > 0 {
        builder.worker_threads(args.threads);
    }
    let result = builder
        .build()
        .context("starting the tokio runtime")
        .and_then(|rt| {
            let r = rt.block_on(run(args));
            // A read of stdin blocks a thread until a line comes: do not
            // wait for it.
            rt.shutdown_timeout(Duration::from_millis(200));
            r
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgepool-swarm: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    raise_fd_limit(args.agents, args.peer_port);
    let settings = settings(&args)?;
    let tokens = tokens(&args)?;
    std::fs::create_dir_all(args.data_dir.join("agents"))
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let shutdown = CancellationToken::new();
    edgepool_common::grpc::cancel_on_signals(shutdown.clone())?;
    let fleet = Arc::new(Fleet::new(args.agents, settings, tokens, shutdown.clone()));

    let socket = args.data_dir.join("control.sock");
    let control = tokio::spawn({
        let (fleet, stop) = (fleet.clone(), shutdown.clone());
        async move {
            if let Err(e) = control::serve_socket(fleet, &socket, stop).await {
                tracing::error!(error = %e, path = %socket.display(), "control socket failed");
            }
        }
    });
    // stdin: an interactive console; its end (e.g. </dev/null) is not a
    // reason to stop.
    tokio::spawn(control::serve_lines(
        fleet.clone(),
        tokio::io::stdin(),
        tokio::io::stdout(),
        shutdown.clone(),
    ));
    tokio::spawn(report(
        fleet.clone(),
        Duration::from_millis(args.status_interval_ms),
        shutdown.clone(),
    ));
    eprintln!(
        "swarm: starting {} agents, {}/s, data in {}, control socket {}",
        args.agents,
        args.ramp_per_sec,
        args.data_dir.display(),
        args.data_dir.join("control.sock").display()
    );
    fleet.start_all(args.ramp_per_sec).await;
    shutdown.cancelled().await;
    eprintln!("swarm: stopping");
    let drained = tokio::time::timeout(Duration::from_secs(5), fleet.wait()).await;
    if drained.is_err() {
        eprintln!("swarm: some agents did not stop within 5 s");
    }
    let _ = control.await;
    Ok(())
}

/// The status line, and once, how long it took until all were connected.
async fn report(fleet: Arc<Fleet>, every: Duration, stop: CancellationToken) {
    let started = Instant::now();
    let mut all_seen = false;
    let mut last = Instant::now();
    // How late this task wakes up: the runtime's scheduling lag. A swarm
    // that lags seconds answers its manager and its peers late, whatever
    // the manager does, and its figures say more about this machine than
    // about the manager.
    let tick = Duration::from_millis(200);
    let mut max_lag = Duration::ZERO;
    loop {
        let slept = Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        max_lag = max_lag.max(slept.elapsed().saturating_sub(tick));
        if !all_seen && fleet.connected() == fleet.agents.len() {
            all_seen = true;
            eprintln!(
                "swarm: all {} agents connected after {:.1} s",
                fleet.agents.len(),
                started.elapsed().as_secs_f64()
            );
        }
        if !every.is_zero() && last.elapsed() >= every {
            last = Instant::now();
            eprintln!(
                "swarm: {} lag_max_ms={}",
                fleet.status_line(),
                max_lag.as_millis()
            );
            max_lag = Duration::ZERO;
        }
    }
}

fn settings(args: &Args) -> anyhow::Result<Settings> {
    let (trust, ca_fingerprint) = match (&args.ca_cert, &args.ca_fingerprint) {
        (Some(path), _) => {
            let certs = tls::read_certs(path)?;
            let fp = certs.first().map(|c| tls::fingerprint(c.as_ref()));
            (ManagerTrust::CaFile(path.clone()), fp)
        }
        (None, Some(fp)) => (ManagerTrust::Fingerprint(fp.clone()), Some(fp.clone())),
        (None, None) => anyhow::bail!("give --ca-cert or --ca-fingerprint"),
    };
    let agent = AgentConfig {
        telemetry_interval_ms: args.telemetry_interval_ms,
        heartbeat_interval_ms: args.heartbeat_interval_ms,
        peer_probe_interval_ms: args.peer_probe_interval_ms,
        peer_liveness_interval_ms: args.peer_liveness_interval_ms,
        peer_suspect_ms: args.peer_suspect_ms,
        reconnect_min_ms: args.reconnect_min_ms,
        reconnect_max_ms: args.reconnect_max_ms,
        manager: args.manager.clone(),
        ..AgentConfig::default()
    };
    // Bad settings stop here, before anything enrolls or binds.
    agent.validate()?;
    Ok(Settings {
        manager: args.manager.clone(),
        trust,
        ca_fingerprint,
        data_dir: args.data_dir.clone(),
        name_prefix: args.name_prefix.clone(),
        peer_net: args.peer_net,
        peer_port: args.peer_port,
        force_enroll: args.reenroll,
        capacity: Capacity {
            cpu_millis: args.cpu_millis,
            memory_mb: args.memory_mb,
            disk_mb: args.disk_mb,
            network_mbps: args.network_mbps,
        },
        app_usage: AppUsage {
            cpu_millis: args.app_cpu_millis,
            memory_mb: args.app_memory_mb,
            ..AppUsage::default()
        },
        max_dials: args.max_dials,
        agent,
    })
}

fn tokens(args: &Args) -> anyhow::Result<Tokens> {
    if let (Some(cert), Some(key)) = (&args.tenant_cert, &args.tenant_key) {
        let roots = match &args.ca_cert {
            Some(ca) => tls::roots(&tls::read_certs(ca)?)?,
            None => anyhow::bail!("--tenant-cert needs --ca-cert (to check the manager)"),
        };
        let identity = (tls::read_certs(cert)?, tls::read_key(key)?);
        let config = tls::client_config(roots, Some(identity))?;
        let channel = tls::channel(&args.manager, Arc::new(config), Duration::from_secs(10))?;
        return Ok(Tokens::Tenant(TenantServiceClient::new(channel)));
    }
    let mut list: VecDeque<String> = args.tokens.iter().cloned().collect();
    if let Some(path) = &args.token_file {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        list.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    Ok(Tokens::List(Mutex::new(list)))
}

/// Each agent holds a stream to the manager, a peer listener (with
/// `--peer-port 0`, or once it is a member) and, in a pool, connections to
/// the other members: raise the soft limit on open files to what that
/// needs (and the hard limit too, if we may).
fn raise_fd_limit(agents: usize, peer_port: u16) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let per_agent = if peer_port == 0 { 2 } else { 1 };
    let want = (agents as u64) * per_agent + 4096;
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        eprintln!("swarm: cannot read RLIMIT_NOFILE");
        return;
    };
    if soft >= want {
        return;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, want.max(hard)).is_ok() {
        eprintln!("swarm: raised the open-file limit from {soft} to {want}");
        return;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    eprintln!(
        "swarm: open-file limit is {hard} (hard), {agents} agents want about {want}; raise it (ulimit -Hn) or some agents will fail to connect"
    );
}
