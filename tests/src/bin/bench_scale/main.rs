//! Scale benchmark: a real manager (its own process) and a simulated fleet
//! of N virtual agents (`edgepool-swarm`, another process) at the agent's
//! default 1 Hz cadence.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-scale --agents 1000 [--seconds 60] [--pools P]
//!       [--members M] [--data-dir DIR]
//!
//! Steps: start the manager and the swarm, wait until NodeSummary counts
//! all N connected (`connect_all_s`, enrollment included); form P pools of
//! M free nodes; measure for `--seconds` (the manager's RSS, both
//! processes' CPU, and the latency of a tenant client calling GetPool,
//! GetNode and ListNodes with page_size 100); then fail slot 2's node of
//! one pool (five times, median: `failover_1_ms`) and of min(100, P)
//! pools at once (`failover_100_p99_ms`) by freezing it over the swarm's
//! control socket (its sockets stay open, nothing passes), timed until the
//! pool's FAILOVER_DONE arrives on WatchEvents; finally SIGKILL the
//! manager, start it again on the same data dir and port and time until
//! NodeSummary counts all N connected again (`reconnect_storm_s`).
//!
//! The last line on stdout is one JSON object with those figures. Every
//! process it starts is killed at the end, also when it fails (process
//! group kill on drop).

mod measure;
mod setup;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgepool_tests::Manager;
use edgepool_tests::procstat::percentile;

use crate::setup::Dir;

#[derive(Debug, Parser)]
#[command(
    name = "bench-scale",
    about = "A manager and a simulated fleet of N agents: memory, CPU, API latency, failover and reconnect storm"
)]
struct Args {
    /// Virtual agents in the swarm.
    #[arg(long)]
    agents: usize,
    /// Length of the steady-state measurement window (at least 60 unless
    /// --quick).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// A smoke run: allows a window shorter than 60 s.
    #[arg(long)]
    quick: bool,
    /// Pools formed over swarm nodes for the failover measurements
    /// (default: 103, or fewer so that at least half the fleet stays free
    /// as spares).
    #[arg(long)]
    pools: Option<usize>,
    /// Members per pool (one simulated app per slot).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Keep the manager's and the swarm's files here (DIR/manager,
    /// DIR/swarm) instead of a temporary dir; a rerun reuses the agents'
    /// credentials (no enrollment).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Agents the swarm starts per second.
    #[arg(long, default_value_t = 200.0)]
    ramp_per_sec: f64,
    /// Rounds per second of the API client (each round: GetPool, GetNode,
    /// ListNodes).
    #[arg(long, default_value_t = 10)]
    api_rounds_per_sec: u32,
}

/// The figures of the last line (names are fixed: checked from outside).
struct Figures {
    agents: usize,
    connect_all_s: f64,
    steady: measure::Steady,
    failover_1_ms: f64,
    failover_100_p99_ms: f64,
    /// None: the fleet did not reconnect within the deadline.
    reconnect_storm_s: Option<f64>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.agents < 2 * args.members.max(2) || args.members < 2 {
        eprintln!("bench-scale: --members must be >= 2 and --agents at least twice --members");
        return std::process::ExitCode::from(2);
    }
    if args.seconds < 60 && !args.quick {
        eprintln!("bench-scale: --seconds must be >= 60 (or give --quick for a smoke run)");
        return std::process::ExitCode::from(2);
    }
    raise_fd_limit();
    // On SIGINT/SIGTERM the run is dropped, and with it every process.
    let result = tokio::select! {
        r = run(&args) => r,
        _ = interrupted() => Err(anyhow::anyhow!("interrupted")),
    };
    match result {
        Ok(f) => {
            println!("{}", human(&f));
            println!("{}", json(&f));
            if f.reconnect_storm_s.is_some() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("bench-scale: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<Figures> {
    let dir = match &args.data_dir {
        Some(d) => Dir::Given(d.clone()),
        None => Dir::Temp(tempfile::TempDir::new()?),
    };
    let n = args.agents;
    // Thousands of enrollments from one address: no per-source limit.
    let unlimited = ["--enroll-rate-per-second", "0"];
    let mut m = Manager::start_on(
        &dir.path().join("manager"),
        "127.0.0.1:0".parse()?,
        &unlimited,
    )
    .await;
    eprintln!("bench-scale: manager on {}", m.addr);
    // Pools an earlier run on this data dir left go first, before any agent
    // connects: their members are not all coming back.
    let mut tenant = m.tenant();
    setup::delete_old_pools(&mut tenant).await?;
    let swarm_dir = dir.path().join("swarm");
    let started = Instant::now();
    let mut swarm = setup::start_swarm(&m, &swarm_dir, n, args.ramp_per_sec);
    let ramp = if args.ramp_per_sec > 0.0 {
        n as f64 / args.ramp_per_sec
    } else {
        0.0
    };
    let deadline = Duration::from_secs_f64(120.0 + 3.0 * ramp);
    let connect_all_s = setup::wait_all_connected(&m, &mut swarm, n, started, deadline).await?;
    eprintln!("bench-scale: all {n} agents connected after {connect_all_s:.1} s");

    let members = args.members;
    let pools = args.pools.unwrap_or(103).min(n / 2 / members).max(1);
    let names = setup::create_pools(&mut tenant, pools, members).await?;
    eprintln!(
        "bench-scale: {pools} pools of {members} running; measuring for {} s",
        args.seconds
    );
    let nodes: Vec<String> = (0..n).map(|i| format!("swarm-{i:05}")).collect();
    let steady = measure::steady(
        &m,
        &swarm,
        &names,
        &nodes,
        args.seconds,
        args.api_rounds_per_sec,
    )
    .await;
    eprintln!("bench-scale: steady state measured; failovers next");

    let socket = swarm_dir.join("control.sock");
    let mut events = measure::watch_failovers(&m).await?;
    let mut singles = Vec::new();
    for i in 0..5 {
        let pool = &names[i % names.len()];
        let t = measure::failover(&m, &socket, &mut events, std::slice::from_ref(pool)).await?;
        singles.extend(t);
    }
    singles.sort_by(|a, b| a.total_cmp(b));
    let k = names.len().min(100);
    let many = measure::failover(&m, &socket, &mut events, &names[..k]).await?;
    eprintln!(
        "bench-scale: failover of 1: {singles:.0?} ms; of {k} at once: median {:.0} ms, max {:.0} ms",
        percentile(&many, 50.0),
        percentile(&many, 100.0)
    );

    // The thawed nodes are fenced, then free, and connected again; then
    // the storm. A storm that does not end still leaves every other figure
    // (`reconnect_storm_s` null, exit status 1).
    let storm = async {
        setup::wait_all_connected(&m, &mut swarm, n, Instant::now(), Duration::from_secs(120))
            .await
            .context("before the reconnect storm")?;
        let addr = m.addr;
        let storm = Instant::now();
        m.proc.kill();
        m = Manager::start_on(&dir.path().join("manager"), addr, &unlimited).await;
        let s = setup::wait_all_connected(&m, &mut swarm, n, storm, Duration::from_secs(300))
            .await
            .context("reconnect storm")?;
        eprintln!("bench-scale: reconnect storm: all {n} connected again after {s:.1} s");
        anyhow::Ok(s)
    };
    let reconnect_storm_s = match storm.await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("bench-scale: {e:#}");
            None
        }
    };
    drop(swarm);
    drop(m);
    Ok(Figures {
        agents: n,
        connect_all_s,
        steady,
        failover_1_ms: percentile(&singles, 50.0),
        failover_100_p99_ms: percentile(&many, 99.0),
        reconnect_storm_s,
    })
}

fn json(f: &Figures) -> String {
    let s = &f.steady;
    let r = |x: f64, digits: i32| {
        let p = 10f64.powi(digits);
        (x * p).round() / p
    };
    serde_json::json!({
        "agents": f.agents,
        "connected": s.connected,
        "connect_all_s": r(f.connect_all_s, 1),
        "manager_rss_mib": r(s.manager_rss_mib, 1),
        "manager_cpu_cores": r(s.manager_cpu_cores, 3),
        "swarm_cpu_cores": r(s.swarm_cpu_cores, 3),
        "api_p50_ms": r(s.api_p50_ms, 2),
        "api_p99_ms": r(s.api_p99_ms, 2),
        "failover_1_ms": r(f.failover_1_ms, 0),
        "failover_100_p99_ms": r(f.failover_100_p99_ms, 0),
        "reconnect_storm_s": f.reconnect_storm_s.map(|x| r(x, 1)),
    })
    .to_string()
}

fn human(f: &Figures) -> String {
    let s = &f.steady;
    format!(
        "bench-scale --agents {}: swarm RSS {:.0} MiB (max), API {} calls ({} failed)",
        f.agents, s.swarm_rss_mib, s.api_calls, s.api_errors
    )
}

async fn interrupted() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// The manager holds a descriptor per agent, the swarm one or two: raise
/// the soft limit to the hard one; the children inherit it (the swarm
/// raises its own further when it may).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
