//! `cloud-manager dev`: a manager plus K local agents, one command.
//!
//! Each agent is a separate process of this same binary (`cloud-manager
//! agent run ...`), so `cargo run -p cloud-manager -- dev` needs nothing
//! else built. Each agent leads its own process session (`setsid`), writes
//! its pid to `DIR/agents/dev-N/agent.pid` and logs to `agent.log` there;
//! `pkill -KILL -s <pid>` crashes one simulated machine as a whole. Ctrl-C
//! (or SIGTERM) stops every agent session, then the manager; agents also
//! exit by themselves if this process dies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::cli::DevArgs;
use crate::config::ManagerConfig;
use crate::manager::Manager;
use crate::model::Resources;
use crate::pool::{AppDef, OnDisconnect};
use crate::pool_ops::PoolRequest;

/// Name of the pool `dev` creates.
const DEMO_POOL: &str = "demo";

/// How long agents get to stop after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long start-up waits for every agent to connect.
const CONNECT_DEADLINE: Duration = Duration::from_secs(60);

struct DevAgent {
    node_id: String,
    dir: PathBuf,
    child: Child,
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config = ManagerConfig {
        listen: args.listen,
        data_dir: dir.clone(),
        ..ManagerConfig::default()
    };
    let tenant = config.default_tenant.clone();
    let shutdown = CancellationToken::new();
    edgepool_common::grpc::cancel_on_signals(shutdown.clone())?;

    let server = crate::server::build(config).await?;
    let addr = server.local_addr();
    let manager = server.manager();
    let manager_task = tokio::spawn(server.run(shutdown.clone()));
    let exe = std::env::current_exe().context("locating this executable")?;
    let manager_addr = addr.to_string();

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
    if result.is_ok() && !args.no_demo {
        result = create_demo_pool(&manager, &tenant, args.agents);
    }
    if result.is_ok() {
        result = write_edgectl_config(&dir, &manager_addr);
    }
    if result.is_ok() && !shutdown.is_cancelled() {
        print_banner(
            &dir,
            &manager_addr,
            &agents,
            !args.no_demo && args.agents >= 4,
        );
        supervise(&mut agents, &shutdown).await;
    }
    shutdown.cancel();
    stop_agents(&mut agents).await;
    let _ = manager_task.await;
    result
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
    let known = manager.get_node(tenant, &node_id).is_ok();
    if !(data.is_enrolled() && same_ca && known) {
        let (token, _) = manager.create_token(tenant, 600, BTreeMap::new())?;
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
    let log = std::fs::File::create(agent_dir.join("agent.log"))?;
    let child = Command::new(exe)
        .args([
            "agent",
            "run",
            "--new-session",
            "--exit-with-parent",
            "--data-dir",
        ])
        .arg(&agent_dir)
        .args(["--manager", manager_addr])
        // All dev agents share this machine's interfaces: count network
        // per app so one agent's traffic does not count against the others.
        .args(["--network-accounting", "process"])
        .args(["--peer-listen", &format!("127.0.1.{n}:{peer_port}")])
        .arg("--pid-file")
        .arg(agent_dir.join("agent.pid"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(DevAgent {
        node_id,
        dir: agent_dir,
        child,
    })
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

/// Reports agents that exit (for example after `pkill -s`) until shutdown.
async fn supervise(agents: &mut [DevAgent], shutdown: &CancellationToken) {
    let mut reported = vec![false; agents.len()];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (i, a) in agents.iter_mut().enumerate() {
            if !reported[i]
                && let Ok(Some(status)) = a.child.try_wait()
            {
                reported[i] = true;
                tracing::warn!(node = %a.node_id, %status, "agent exited; see {}", a.dir.join("agent.log").display());
            }
        }
    }
}

/// The demo pool: dev-1..dev-3 with sample apps, dev-4 left free as the
/// spare. Needs 4 agents; an existing `demo` pool is kept as it is.
fn create_demo_pool(manager: &Manager, tenant: &str, agents: u8) -> anyhow::Result<()> {
    if agents < 4 {
        tracing::info!("fewer than 4 agents: no demo pool (it needs 3 members and a spare)");
        return Ok(());
    }
    if manager.get_pool(tenant, DEMO_POOL).is_ok() {
        return Ok(());
    }
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
    };
    let apps = vec![
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
    ];
    manager.create_pool(
        tenant,
        PoolRequest {
            name: DEMO_POOL.into(),
            node_ids: vec!["dev-1".into(), "dev-2".into(), "dev-3".into()],
            apps,
            policy: None,
            spare_labels: BTreeMap::new(),
        },
    )?;
    Ok(())
}

/// `DIR/edgectl.toml`, which edgectl picks up from the current directory
/// (`./edgepool-dev/edgectl.toml`) or through `--config`.
fn write_edgectl_config(dir: &Path, addr: &str) -> anyhow::Result<()> {
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

/// Every process in session `sid` (an agent and all its apps).
fn session_members(sid: i32) -> Vec<i32> {
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

/// SIGTERM to every agent's session, then SIGKILL after the grace period.
async fn stop_agents(agents: &mut [DevAgent]) {
    let signal_all = |agents: &mut [DevAgent], sig: Signal| {
        for a in agents.iter_mut() {
            if let (Ok(None), Some(pid)) = (a.child.try_wait(), a.child.id()) {
                // The agent is its session's and process group's leader.
                let _ = killpg(Pid::from_raw(pid as i32), sig);
            }
        }
    };
    signal_all(agents, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline
        && agents
            .iter_mut()
            .any(|a| matches!(a.child.try_wait(), Ok(None)))
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal_all(agents, Signal::SIGKILL);
    for a in agents.iter_mut() {
        let sid = a.child.id().map(|p| p as i32);
        let _ = a.child.wait().await;
        // Apps live in their own process groups inside the agent's session:
        // whatever the agent did not stop goes now.
        if let Some(sid) = sid {
            for pid in session_members(sid) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn print_banner(dir: &Path, addr: &str, agents: &[DevAgent], demo: bool) {
    let d = dir.display();
    let creds = format!("-cacert {d}/ca.pem -cert {d}/tenant.pem -key {d}/tenant.key");
    let last = agents.last().map(|a| a.node_id.as_str()).unwrap_or("dev-1");
    let crash = agents
        .get(1)
        .or(agents.first())
        .map(|a| a.node_id.as_str())
        .unwrap_or("dev-1");
    println!(
        "\nedgepool dev is up: manager on {addr}, {n} agents (dev-1 .. {last}), data in {d}\n\
         \n\
         Try (grpcurl):\n  \
           grpcurl {creds} {addr} list\n  \
           grpcurl {creds} {addr} describe edge.v1.TenantService\n  \
           grpcurl {creds} {addr} edge.v1.TenantService/ListNodes\n  \
           grpcurl {creds} -d '{{\"node_id\": \"dev-1\"}}' {addr} edge.v1.TenantService/GetNode\n  \
           grpcurl {creds} -d '{{\"ttl_seconds\": 600}}' {addr} edge.v1.TenantService/CreateJoinToken\n\
         \n\
         {demo_text}\
         Crash a simulated machine (its agent and everything in its session):\n  \
           pkill -KILL -s $(cat {d}/agents/{crash}/agent.pid)\n\
         Agent logs: {d}/agents/dev-N/agent.log\n\
         Stop everything: Ctrl-C\n",
        n = agents.len(),
        demo_text = if demo {
            format!(
                "The demo pool (dev-1..dev-3 run its apps, dev-4 is the spare):\n  \
                   grpcurl {creds} -d '{{\"name\": \"demo\"}}' {addr} edge.v1.TenantService/GetPool\n  \
                   edgectl pool get demo        (edgectl reads {d}/edgectl.toml when run from the parent directory)\n  \
                   edgectl events -f\n\n"
            )
        } else {
            String::new()
        },
    );
}
