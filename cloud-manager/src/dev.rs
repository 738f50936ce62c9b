//! `cloud-manager dev`: a manager plus K local agents, one command.
//!
//! Each agent is a separate process of this same binary (`cloud-manager
//! agent run ...`), so `cargo run -p cloud-manager -- dev` needs nothing
//! else built. Each agent leads its own process session (`setsid`), writes
//! its pid to `DIR/agents/dev-N/agent.pid` and logs to `agent.log` there;
//! `pkill -KILL -s <pid>` crashes one simulated machine as a whole, and
//! `cloud-manager dev --restart-agent dev-N` asks the running `dev` to
//! start it again (a request file in the agent's dir that the supervisor
//! answers). Ctrl-C (or SIGTERM) stops every agent session and the manager
//! together, within about 2 s; agents also exit by themselves if this
//! process dies.
//!
//! `DIR/bin/` gets two small scripts, `edgectl` and `cloud-manager`, that
//! run this same binary (edgectl is built into it) with `DIR/edgectl.toml`,
//! so `export PATH="DIR/bin:$PATH"` is the only install step.
//!
//! With `--replicas R --etcd URL` the manager is not in-process: R
//! `cloud-manager serve --store etcd` processes instead (`dev_replicas`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;
use crate::config::{HttpListen, ManagerConfig};
use crate::manager::Manager;
use crate::model::Resources;
use crate::pool::{AppDef, OnDisconnect};
use crate::pools::PoolRequest;

/// Name of the pool `dev` creates.
pub(crate) const DEMO_POOL: &str = "demo";

/// How long agents get to stop after SIGTERM before SIGKILL. Together with
/// the manager's drain (which runs at the same time) Ctrl-C ends
/// everything in about 2 s.
pub(crate) const STOP_GRACE: Duration = Duration::from_millis(1500);
/// How long the manager waits for connections to finish after Ctrl-C
/// (open event streams end at once; this bounds clients that stopped
/// reading).
const DRAIN: Duration = Duration::from_secs(1);
/// How long `--restart-agent` waits for the running `dev` to answer.
const RESTART_DEADLINE: Duration = Duration::from_secs(10);
/// The request file `--restart-agent` writes into the agent's dir, and the
/// answer the supervisor writes back.
const RESTART_REQUEST: &str = "restart.request";
const RESTART_ANSWER: &str = "restart.answer";
/// Where the dev manager and agents serve their metrics: loopback, any
/// free port (each writes its URL to `metrics.url` in its data dir).
pub(crate) const DEV_METRICS_LISTEN: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);
/// How long start-up waits for every agent to connect.
pub(crate) const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

pub(crate) struct DevAgent {
    pub(crate) node_id: String,
    pub(crate) dir: PathBuf,
    pub(crate) child: Child,
    /// How to start it again (`--restart-agent`).
    pub(crate) launch: Launch,
}

/// What starting one agent process needs.
#[derive(Clone)]
pub(crate) struct Launch {
    pub(crate) exe: PathBuf,
    /// One address, or several comma-separated (replicas).
    pub(crate) manager_addr: String,
    pub(crate) peer_listen: String,
    /// More `agent run` arguments.
    pub(crate) extra: Vec<String>,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if let Some(node) = &args.restart_agent {
        return request_restart(&args.dir, node).await;
    }
    let dir = args.dir.clone();
    let config = ManagerConfig {
        listen: args.listen,
        data_dir: dir.clone(),
        http_listen: HttpListen::At(dashboard_address(args.http_listen)),
        // Metrics on: `DIR/metrics.url` tells where.
        metrics_listen: Some(DEV_METRICS_LISTEN),
        ..ManagerConfig::default()
    };
    let tenant = config.default_tenant.clone();
    let shutdown = CancellationToken::new();
    edgepool_common::grpc::cancel_on_signals(shutdown.clone())?;

    // Binds first, then takes the store's lock: a taken port or a dir in
    // use by another manager fails here, before anything is written.
    let server = crate::server::build(config).await?;
    renew_tenant_bundle(&dir, &tenant)?;
    let addr = server.local_addr();
    let dashboard = write_dashboard_url(&dir, &server, &tenant)?;
    let manager = server.manager();
    let manager_task = tokio::spawn(server.run_with_drain(shutdown.clone(), DRAIN));
    let exe = std::env::current_exe().context("locating this executable")?;
    let manager_addr = addr.to_string();
    let pid_file = dir.join("dev.pid");
    edgepool_common::fsutil::write_public(
        &pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
    )?;
    edgepool_common::fsutil::write_public(
        &dir.join("manager.addr"),
        format!("{manager_addr}\n").as_bytes(),
    )?;

    let mut agents = Vec::new();
    let started = async {
        for n in 1..=args.agents {
            let agent = start_agent(
                &exe,
                &dir,
                &manager,
                &manager_addr,
                &tenant,
                n,
                args.peer_port,
            )
            .await
            .with_context(|| format!("starting agent dev-{n}"))?;
            agents.push(agent);
        }
        wait_connected(&manager, &tenant, args.agents.into(), &shutdown).await
    };
    let mut result = started.await;
    let mut demo = false;
    if result.is_ok() && !args.no_demo {
        // Signs certificates and commits: blocking work, off the runtime.
        let (m, t, n) = (manager.clone(), tenant.clone(), args.agents);
        let made = tokio::task::spawn_blocking(move || create_demo_pool(&m, &t, n))
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r);
        match made {
            Ok(Demo::Created) | Ok(Demo::Exists) => demo = true,
            Ok(Demo::Skipped(why)) => println!("no demo pool: {why}"),
            Err(e) => result = Err(e),
        }
    }
    if result.is_ok() {
        result = write_edgectl_config(&dir, &manager_addr);
    }
    if result.is_ok() {
        result = write_bin_scripts(&dir, &exe);
    }
    if result.is_ok() && !shutdown.is_cancelled() {
        let headline = format!("manager on {manager_addr}");
        let extra = format!(
            "The dashboard (nodes, pools, live events), logged in:\n  {dashboard}\n  \
             (also in {}/dashboard.url; `edgectl dashboard` prints a new link)\n\n",
            dir.display()
        );
        print_banner(&dir, &headline, &manager_addr, &agents, demo, &extra, false);
        supervise(&mut agents, &shutdown).await;
    }
    // Agents and manager stop together: the manager ends open event
    // streams with UNAVAILABLE while the agents stop their apps.
    shutdown.cancel();
    let started = Instant::now();
    let (_, _) = tokio::join!(stop_agents(&mut agents), manager_task);
    tracing::info!("stopped in {} ms", started.elapsed().as_millis());
    let _ = std::fs::remove_file(&pid_file);
    result
}

/// The dashboard's address: `wanted`, or a free port on 127.0.0.1 when
/// `wanted` is taken (say, by another dev), so that a second dev still
/// starts. (Checked by binding; a port taken in between fails the start.)
fn dashboard_address(wanted: SocketAddr) -> SocketAddr {
    if std::net::TcpListener::bind(wanted).is_ok() {
        return wanted;
    }
    tracing::info!("{wanted} is taken: the dashboard listens on a free port of 127.0.0.1");
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// How long the login link in `DIR/dashboard.url` is good for: as long as
/// the dev runs, in practice (its signing key dies with the process).
const DEV_LINK_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// Writes `DIR/dashboard.url` (0600: it logs in) and returns the URL.
fn write_dashboard_url(
    dir: &Path,
    server: &crate::server::ManagerServer,
    tenant: &str,
) -> anyhow::Result<String> {
    let links = server
        .dashboard_links()
        .context("internal: the dev manager has no dashboard")?;
    let url = links.url_until(tenant, crate::model::now_ms() + DEV_LINK_TTL_MS);
    let path = dir.join("dashboard.url");
    edgepool_common::fsutil::write_private(&path, format!("{url}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(url)
}

/// Enrolls agent N if needed and starts it in its own session.
async fn start_agent(
    exe: &Path,
    dir: &Path,
    manager: &Manager,
    manager_addr: &str,
    tenant: &str,
    n: u8,
    peer_port: u16,
) -> anyhow::Result<DevAgent> {
    let node_id = format!("dev-{n}");
    let agent_dir = dir.join("agents").join(&node_id);
    std::fs::create_dir_all(&agent_dir)?;
    let ca_pem = dir.join("ca.pem");
    let data = edge_agent::state::DataDir::new(&agent_dir);
    // Enroll again when the agent has no identity, when its CA is not this
    // manager's (the dir was re-initialised), or when the manager lost it.
    let same_ca = std::fs::read(data.ca()).ok() == std::fs::read(&ca_pem).ok();
    let known = manager.nodes().get_node(tenant, &node_id).is_ok();
    if !(data.is_enrolled() && same_ca && known) {
        let (token, _) = manager
            .enrollment()
            .create_token(tenant, 600, BTreeMap::new())
            .await?;
        let status = Command::new(exe)
            .args([
                "agent",
                "join",
                "--manager",
                manager_addr,
                "--token",
                &token,
            ])
            .arg("--ca-cert")
            .arg(&ca_pem)
            .args(["--node-id", &node_id, "--force", "--data-dir"])
            .arg(&agent_dir)
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "join of {node_id} failed ({status})");
    }
    let launch = Launch {
        exe: exe.to_path_buf(),
        manager_addr: manager_addr.to_string(),
        peer_listen: format!("127.0.1.{n}:{peer_port}"),
        extra: Vec::new(),
    };
    let child = spawn_agent(&launch, &agent_dir)?;
    Ok(DevAgent {
        node_id,
        dir: agent_dir,
        child,
        launch,
    })
}

/// As root, the dev agents run their apps as `nobody` (no package made
/// `edgepool-app` here), in working dirs under the temp dir: `DIR` may sit
/// where `nobody` cannot go (under /root, say). Not root: none needed.
fn sandbox_args(agent_dir: &Path) -> Vec<std::ffi::OsString> {
    if !nix::unistd::Uid::effective().is_root() {
        return Vec::new();
    }
    let abs = std::path::absolute(agent_dir).unwrap_or_else(|_| agent_dir.to_path_buf());
    let mut hash: u32 = 0x811c_9dc5;
    for byte in abs.as_os_str().as_encoded_bytes() {
        hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
    }
    let apps = std::env::temp_dir().join(format!("edgepool-dev-apps-{hash:08x}"));
    vec![
        "--run-as".into(),
        "nobody".into(),
        "--apps-dir".into(),
        apps.into_os_string(),
    ]
}

/// Starts one agent process in its own session. Its log is appended to
/// (a line marks each start), so a crashed agent's last words survive.
pub(crate) fn spawn_agent(launch: &Launch, agent_dir: &Path) -> anyhow::Result<Child> {
    use std::io::Write;
    let log_path = agent_dir.join("agent.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    writeln!(
        log,
        "---- cloud-manager dev: agent starting at {} (unix time) ----",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    )?;
    let child = Command::new(&launch.exe)
        .args([
            "agent",
            "run",
            "--new-session",
            "--exit-with-parent",
            "--data-dir",
        ])
        .arg(agent_dir)
        .args(sandbox_args(agent_dir))
        .args(["--manager", &launch.manager_addr])
        // All dev agents share this machine's interfaces: count network
        // per app so one agent's traffic does not count against the others.
        .args(["--network-accounting", "process"])
        .args(["--peer-listen", &launch.peer_listen])
        .arg("--metrics-listen")
        .arg(DEV_METRICS_LISTEN.to_string())
        .args(&launch.extra)
        .arg("--pid-file")
        .arg(agent_dir.join("agent.pid"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent process")?;
    Ok(child)
}

async fn wait_connected(
    manager: &Manager,
    tenant: &str,
    want: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        let up = manager
            .nodes()
            .list_nodes(tenant)?
            .iter()
            .filter(|n| n.record.node_id.starts_with("dev-") && n.live.conn_id.is_some())
            .count();
        if up >= want || shutdown.is_cancelled() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {up} of {want} agents connected within {CONNECT_DEADLINE:?}; see DIR/agents/*/agent.log"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reports agents that exit (for example after `pkill -s`) and answers
/// `--restart-agent` requests, until shutdown.
pub(crate) async fn supervise(agents: &mut [DevAgent], shutdown: &CancellationToken) {
    let mut reported = vec![false; agents.len()];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for (i, a) in agents.iter_mut().enumerate() {
            if !reported[i]
                && let Ok(Some(status)) = a.child.try_wait()
            {
                reported[i] = true;
                tracing::warn!(
                    node = %a.node_id,
                    %status,
                    "agent exited; see {}; start it again with `cloud-manager dev --restart-agent {}`",
                    a.dir.join("agent.log").display(),
                    a.node_id
                );
            }
            if a.dir.join(RESTART_REQUEST).exists() {
                let answer = restart(a);
                if answer.starts_with("restarted") {
                    reported[i] = false;
                }
                tracing::info!(node = %a.node_id, "{answer}");
                let _ = std::fs::remove_file(a.dir.join(RESTART_REQUEST));
                let _ = edgepool_common::fsutil::write_public(
                    &a.dir.join(RESTART_ANSWER),
                    format!("{answer}\n").as_bytes(),
                );
            }
        }
    }
}

/// Starts a dev agent again if it is not running; says what happened.
fn restart(a: &mut DevAgent) -> String {
    if let Ok(None) = a.child.try_wait() {
        return format!(
            "{} is still running (pid {}): nothing to do",
            a.node_id,
            a.child.id().unwrap_or(0)
        );
    }
    // Whatever the crashed agent left in its session goes first, so the
    // new agent re-adopts or starts its apps from a clean slate.
    if let Some(sid) = std::fs::read_to_string(a.dir.join("agent.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        for pid in session_members(sid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    match spawn_agent(&a.launch, &a.dir) {
        Ok(child) => {
            let pid = child.id().unwrap_or(0);
            a.child = child;
            format!("restarted {} (pid {pid})", a.node_id)
        }
        Err(e) => format!("could not restart {}: {e:#}", a.node_id),
    }
}

/// `cloud-manager dev --restart-agent NODE`: asks the `dev` running on
/// `dir` to start NODE again, and prints its answer.
async fn request_restart(dir: &Path, node: &str) -> anyhow::Result<()> {
    let running = std::fs::read_to_string(dir.join("dev.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|pid| nix::sys::signal::kill(Pid::from_raw(*pid), None).is_ok());
    let Some(dev_pid) = running else {
        anyhow::bail!(
            "no `cloud-manager dev` is running on {} (start it with `cloud-manager dev --data-dir {}`)",
            dir.display(),
            dir.display()
        );
    };
    let agent_dir = dir.join("agents").join(node);
    anyhow::ensure!(
        agent_dir.is_dir(),
        "{node} is not an agent of the dev fleet in {} (expected dev-1 .. dev-K)",
        dir.display()
    );
    let answer_path = agent_dir.join(RESTART_ANSWER);
    let _ = std::fs::remove_file(&answer_path);
    edgepool_common::fsutil::write_public(&agent_dir.join(RESTART_REQUEST), b"restart\n")?;
    let deadline = Instant::now() + RESTART_DEADLINE;
    loop {
        if let Ok(answer) = std::fs::read_to_string(&answer_path) {
            let _ = std::fs::remove_file(&answer_path);
            let answer = answer.trim();
            println!("{answer}");
            anyhow::ensure!(!answer.starts_with("could not"), "restart failed");
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = std::fs::remove_file(agent_dir.join(RESTART_REQUEST));
            anyhow::bail!("the dev (pid {dev_pid}) did not answer within {RESTART_DEADLINE:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What became of the demo pool.
pub(crate) enum Demo {
    Created,
    Exists,
    /// Not made, and why (one line for the user).
    Skipped(String),
}

/// The demo pool: dev-1..dev-3 with sample apps, dev-4 left free as the
/// spare. Needs 4 agents; an existing `demo` pool is kept as it is, and it
/// is not made when its nodes are taken (by the tenant's own pools).
fn create_demo_pool(manager: &Manager, tenant: &str, agents: u8) -> anyhow::Result<Demo> {
    if agents < 4 {
        return Ok(Demo::Skipped(
            "it needs 4 agents (3 members and a spare); run with --agents 4 or more".into(),
        ));
    }
    if manager.pools().get_pool(tenant, DEMO_POOL).is_ok() {
        return Ok(Demo::Exists);
    }
    let taken: Vec<String> = DEMO_NODES
        .iter()
        .filter_map(|id| {
            let n = manager.nodes().get_node(tenant, id).ok()?;
            (!n.record.pool.is_empty()).then(|| format!("{id} is in pool {:?}", n.record.pool))
        })
        .collect();
    if !taken.is_empty() {
        return Ok(Demo::Skipped(format!(
            "{} (your pools are kept; --no-demo silences this)",
            taken.join(", ")
        )));
    }
    manager.pools().create_pool(
        tenant,
        PoolRequest {
            name: DEMO_POOL.into(),
            node_ids: DEMO_NODES.iter().map(|n| n.to_string()).collect(),
            apps: demo_apps(),
            policy: None,
            spare_labels: BTreeMap::new(),
        },
    )?;
    Ok(Demo::Created)
}

/// The demo pool's members (dev-4 is its spare).
pub(crate) const DEMO_NODES: [&str; 3] = ["dev-1", "dev-2", "dev-3"];

/// The demo pool's sample apps.
pub(crate) fn demo_apps() -> Vec<AppDef> {
    let sh = |name: &str, script: &str| AppDef {
        name: name.to_string(),
        command: vec!["sh".into(), "-c".into(), script.to_string()],
        env: BTreeMap::new(),
        resources: Resources {
            cpu_millis: 50,
            memory_mb: 16,
            disk_mb: 1,
            network_mbps: 0,
            disk_io_kbps: 0,
        },
        priority: 0,
        offloadable: true,
        slot: None,
        artifact: String::new(),
        on_disconnect: OnDisconnect::KeepRunning,
        limits: None,
    };
    vec![
        sh(
            "web",
            "while :; do echo \"web: serving $(date +%T)\"; sleep 5; done",
        ),
        sh(
            "api",
            "while :; do echo \"api: ok $(date +%T)\"; sleep 5; done",
        ),
        sh(
            "worker",
            "while :; do echo \"worker: job done\"; sleep 3; done",
        ),
        sh("cache", "while :; do sleep 10; done"),
        sh(
            "metrics",
            "while :; do echo \"metrics: $(cat /proc/loadavg)\"; sleep 10; done",
        ),
    ]
}

/// `DIR/edgectl.toml`: what `DIR/bin/edgectl` uses, and what a plain
/// `edgectl` picks up from the current directory (`./edgepool-dev/`) or
/// through `--config`.
pub(crate) fn write_edgectl_config(dir: &Path, addr: &str) -> anyhow::Result<()> {
    let text = format!(
        "# Written by `cloud-manager dev`; paths are relative to this file.\n\
         manager = \"{addr}\"\n\
         ca_cert = \"ca.pem\"\n\
         cert = \"tenant.pem\"\n\
         key = \"tenant.key\"\n"
    );
    edgepool_common::fsutil::write_public(&dir.join("edgectl.toml"), text.as_bytes())?;
    Ok(())
}

/// `DIR/bin/edgectl` and `DIR/bin/cloud-manager`: scripts that run this
/// binary, so that `export PATH="DIR/bin:$PATH"` gives both commands with
/// nothing else built or installed. edgectl gets `DIR/edgectl.toml` unless
/// EDGECTL_CONFIG says otherwise.
pub(crate) fn write_bin_scripts(dir: &Path, exe: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let abs_dir = std::path::absolute(dir)?;
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let scripts = [
        (
            "edgectl",
            format!(
                "#!/bin/sh\n# Written by `cloud-manager dev`: edgectl with this dev fleet's settings.\n\
                 : \"${{EDGECTL_CONFIG:={config}}}\"\n\
                 export EDGECTL_CONFIG\n\
                 exec {exe} edgectl \"$@\"\n",
                config = abs_dir.join("edgectl.toml").display(),
                exe = quote(exe),
            ),
        ),
        (
            "cloud-manager",
            format!(
                "#!/bin/sh\n# Written by `cloud-manager dev`: the binary that runs this dev fleet.\n\
                 exec {exe} \"$@\"\n",
                exe = quote(exe),
            ),
        ),
    ];
    for (name, text) in scripts {
        let path = bin.join(name);
        edgepool_common::fsutil::write_public(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Every process in session `sid` (an agent and all its apps).
pub(crate) fn session_members(sid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split_whitespace().nth(3)?.parse::<i32>().ok()
                })
                == Some(sid)
        })
        .collect()
}

/// SIGTERM to each child's process group (each child leads its own
/// session), then SIGKILL to those still running after `STOP_GRACE`; all
/// are reaped. Returns their pids (their session ids), taken before.
pub(crate) async fn stop_sessions(children: &mut [&mut Child]) -> Vec<Option<i32>> {
    let sids: Vec<Option<i32>> = children.iter().map(|c| c.id().map(|p| p as i32)).collect();
    let signal_all = |children: &mut [&mut Child], sig: Signal| {
        for (c, sid) in children.iter_mut().zip(&sids) {
            if let (Ok(None), Some(pid)) = (c.try_wait(), sid) {
                let _ = killpg(Pid::from_raw(*pid), sig);
            }
        }
    };
    signal_all(children, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline
        && children
            .iter_mut()
            .any(|c| matches!(c.try_wait(), Ok(None)))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_all(children, Signal::SIGKILL);
    for c in children.iter_mut() {
        let _ = c.wait().await;
    }
    sids
}

/// Stops every agent's session (`stop_sessions`), then whatever its apps
/// left in it.
pub(crate) async fn stop_agents(agents: &mut [DevAgent]) {
    let mut children: Vec<&mut Child> = agents.iter_mut().map(|a| &mut a.child).collect();
    // Apps live in their own process groups inside the agent's session:
    // whatever the agent did not stop goes now.
    for sid in stop_sessions(&mut children).await.into_iter().flatten() {
        for pid in session_members(sid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// `headline` names the manager(s) in the first line, `addr` is the one the
/// examples dial, and `extra` (the dashboard's link, or the replicas'
/// text) goes before the crash example.
pub(crate) fn print_banner(
    dir: &Path,
    headline: &str,
    addr: &str,
    agents: &[DevAgent],
    demo: bool,
    extra: &str,
    replicas: bool,
) {
    let d = dir.display();
    let creds = format!("-cacert {d}/ca.pem -cert {d}/tenant.pem -key {d}/tenant.key");
    let bin = std::path::absolute(dir.join("bin"))
        .unwrap_or_else(|_| dir.join("bin"))
        .display()
        .to_string();
    let last = agents.last().map(|a| a.node_id.as_str()).unwrap_or("dev-1");
    let crash = agents
        .get(1)
        .or(agents.first())
        .map(|a| a.node_id.as_str())
        .unwrap_or("dev-1");
    println!(
        "\nedgepool dev is up: {headline}, {n} agents (dev-1 .. {last}), data in {d}\n\
         \n\
         Try (grpcurl):\n  \
           grpcurl {creds} {addr} list\n  \
           grpcurl {creds} {addr} describe edge.v1.TenantService\n  \
           grpcurl {creds} {addr} edge.v1.TenantService/ListNodes\n  \
           grpcurl {creds} -d '{{\"node_id\": \"dev-1\"}}' {addr} edge.v1.TenantService/GetNode\n  \
           grpcurl {creds} -d '{{\"ttl_seconds\": 600}}' {addr} edge.v1.TenantService/CreateJoinToken\n\
         \n\
         edgectl (the tenant CLI) and cloud-manager for this fleet, in any shell:\n  \
           export PATH=\"{bin}:$PATH\"\n  \
           edgectl node ls\n\
         \n\
         {demo_text}\
         {extra}\
         Crash a simulated machine (its agent and everything in its session), then start it again:\n  \
           pkill -KILL -s $(cat {d}/agents/{crash}/agent.pid)\n  \
           cloud-manager dev --data-dir {d} --restart-agent {crash}\n\
         Prometheus metrics: curl $(cat {d}/{metrics_url}) (agents: {d}/agents/dev-N/metrics.url)\n\
         Agent logs: {d}/agents/dev-N/agent.log\n\
         Stop everything: Ctrl-C\n",
        n = agents.len(),
        metrics_url = if !replicas {
            "metrics.url"
        } else {
            "managers/m-1/metrics.url"
        },
        demo_text = if demo {
            format!(
                "The demo pool (dev-1..dev-3 run its apps, dev-4 is the spare):\n  \
                   grpcurl {creds} -d '{{\"name\": \"demo\"}}' {addr} edge.v1.TenantService/GetPool\n  \
                   edgectl pool get demo\n  \
                   edgectl events -f\n\n"
            )
        } else {
            String::new()
        },
    );
}

/// A dev dir outlives its tenant certificate (30 days): issue it again when
/// it ends within a week, so `DIR/tenant.pem` always works.
pub(crate) fn renew_tenant_bundle(dir: &std::path::Path, tenant: &str) -> anyhow::Result<()> {
    let files = crate::ca::CaFiles::new(dir);
    let renewed = crate::ca::renew_tenant_bundle(
        &files,
        &ManagerConfig::default().trust_domain,
        tenant,
        time::Duration::days(7),
    )
    .with_context(|| format!("renewing {}", files.tenant_cert().display()))?;
    if renewed {
        tracing::info!(path = %files.tenant_cert().display(), "issued the tenant certificate again (the old one ended within a week)");
    }
    Ok(())
}
