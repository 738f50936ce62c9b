//! The processes under test and how the benchmark drives them: the
//! manager, the swarm (started with the tenant bundle, so it mints its own
//! join tokens), the swarm's control socket, node counts and the pools.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgepool_common::proto as pb;
use edgepool_tests::{Manager, Proc, bin};
use pb::tenant_service_client::TenantServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tonic::transport::Channel;

/// Pool names start with this; a rerun on the same `--data-dir` deletes
/// the pools an earlier run left.
pub const POOL_PREFIX: &str = "scale-";

/// Starts `edgepool-swarm` with `agents` virtual agents in `dir`, at the
/// agent's default cadence.
pub fn start_swarm(m: &Manager, dir: &Path, agents: usize, ramp_per_sec: f64) -> Proc {
    std::fs::create_dir_all(dir).expect("swarm dir");
    let mut cmd = Command::new(bin("edgepool-swarm"));
    cmd.args(["--agents", &agents.to_string()])
        .args(["--manager", &m.addr.to_string()])
        .arg("--ca-cert")
        .arg(m.ca())
        .arg("--tenant-cert")
        .arg(m.dir.join("tenant.pem"))
        .arg("--tenant-key")
        .arg(m.dir.join("tenant.key"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--ramp-per-sec", &ramp_per_sec.to_string()])
        // A fixed peer port, bound only by pool members: one descriptor per
        // virtual agent fewer (10,000 agents fit a 20,000 limit).
        .args(["--peer-port", &free_port().to_string()])
        .args(["--status-interval-ms", "10000"])
        // The swarm's default: N agents' info lines say the same thing N
        // times.
        .env("RUST_LOG", "warn,edgepool_swarm=info");
    Proc::spawn("edgepool-swarm", &mut cmd, &dir.join("swarm.log"))
}

/// A port that is free right now (the kernel's pick on 127.0.0.1); the
/// swarm's agents bind it on their own 127.x addresses.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

/// Sends one command to the swarm's control socket; returns its data
/// lines, or the `error:` line as an error.
pub async fn control(socket: &Path, line: &str) -> anyhow::Result<Vec<String>> {
    let conn = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let (r, mut w) = conn.into_split();
    w.write_all(format!("{line}\n").as_bytes()).await?;
    let mut lines = BufReader::new(r).lines();
    let mut out = Vec::new();
    while let Some(l) = lines.next_line().await? {
        if l == "ok" {
            return Ok(out);
        }
        if let Some(why) = l.strip_prefix("error") {
            anyhow::bail!("swarm control `{line}`: {why}");
        }
        out.push(l);
    }
    anyhow::bail!("swarm control `{line}`: the socket closed before `ok`")
}

pub async fn summary(t: &mut TenantServiceClient<Channel>) -> Option<pb::NodeSummaryResponse> {
    t.node_summary(pb::NodeSummaryRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Polls NodeSummary every 250 ms (a summary walks the whole fleet; the
/// poll must not be a load of its own) until `agents` nodes are connected;
/// the time it took from `since`. Fails after `deadline`, or as soon as
/// the swarm exits.
pub async fn wait_all_connected(
    m: &Manager,
    swarm: &mut Proc,
    agents: usize,
    since: Instant,
    deadline: Duration,
) -> anyhow::Result<f64> {
    let mut tenant = m.tenant();
    let mut last = 0;
    loop {
        if let Some(s) = summary(&mut tenant).await {
            last = s.connected as usize;
            if last >= agents {
                return Ok(since.elapsed().as_secs_f64());
            }
        }
        if let Ok(Some(status)) = swarm.child.try_wait() {
            anyhow::bail!("the swarm exited ({status}); see {}", swarm.log.display());
        }
        if since.elapsed() > deadline {
            anyhow::bail!("only {last} of {agents} agents connected after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Deletes the pools an earlier run on the same data dir left.
pub async fn delete_old_pools(t: &mut TenantServiceClient<Channel>) -> anyhow::Result<()> {
    let pools = t
        .list_pools(pb::ListPoolsRequest::default())
        .await?
        .into_inner()
        .pools;
    for p in pools.iter().filter(|p| p.name.starts_with(POOL_PREFIX)) {
        t.delete_pool(pb::DeletePoolRequest {
            name: p.name.clone(),
        })
        .await
        .with_context(|| format!("deleting {}", p.name))?;
    }
    Ok(())
}

/// Free, connected nodes, in node id order.
async fn free_nodes(t: &mut TenantServiceClient<Channel>) -> anyhow::Result<Vec<String>> {
    let pages = edgepool_tests::list_nodes_with(
        t,
        pb::ListNodesRequest {
            page_size: 1000,
            state: pb::NodeState::Free as i32,
            ..Default::default()
        },
    )
    .await?;
    Ok(pages
        .into_iter()
        .flatten()
        .filter(|n| n.connected)
        .map(|n| n.node_id)
        .collect())
}

/// Creates `pools` pools of `members` free nodes each, one simulated app
/// per slot, and waits until every app runs. Returns the pool names.
pub async fn create_pools(
    t: &mut TenantServiceClient<Channel>,
    pools: usize,
    members: usize,
) -> anyhow::Result<Vec<String>> {
    let free = free_nodes(t).await?;
    anyhow::ensure!(
        free.len() >= pools * members,
        "{} free nodes, {pools} pools of {members} need {}",
        free.len(),
        pools * members
    );
    let mut names = Vec::new();
    for (p, nodes) in free.chunks(members).take(pools).enumerate() {
        let name = format!("{POOL_PREFIX}{p}");
        let apps = (1..=members as u32)
            .map(|slot| pb::AppSpec {
                name: format!("app-{slot}"),
                command: vec!["sleep".into(), "100000".into()],
                resources: Some(pb::Resources {
                    cpu_millis: 10,
                    memory_mb: 8,
                    ..Default::default()
                }),
                slot: Some(slot),
                ..Default::default()
            })
            .collect();
        t.create_pool(pb::CreatePoolRequest {
            name: name.clone(),
            node_ids: nodes.to_vec(),
            apps,
            ..Default::default()
        })
        .await
        .with_context(|| format!("CreatePool {name}"))?;
        names.push(name);
    }
    for name in &names {
        wait_pool_running(t, name, Duration::from_secs(120)).await?;
    }
    Ok(names)
}

/// Waits until every app of `pool` runs and no slot is degraded; returns
/// the pool.
pub async fn wait_pool_running(
    t: &mut TenantServiceClient<Channel>,
    pool: &str,
    deadline: Duration,
) -> anyhow::Result<pb::Pool> {
    let start = Instant::now();
    loop {
        if let Ok(p) = t
            .get_pool(pb::GetPoolRequest { name: pool.into() })
            .await
            .map(|r| r.into_inner())
            && p.degraded_slots.is_empty()
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running)
        {
            return Ok(p);
        }
        if start.elapsed() > deadline {
            anyhow::bail!("pool {pool} not running after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The node that holds `slot` of `pool` now.
pub async fn slot_node(
    t: &mut TenantServiceClient<Channel>,
    pool: &str,
    slot: u32,
) -> anyhow::Result<String> {
    let p = t
        .get_pool(pb::GetPoolRequest { name: pool.into() })
        .await?
        .into_inner();
    p.members
        .iter()
        .find(|m| m.slot == slot)
        .map(|m| m.node_id.clone())
        .with_context(|| format!("pool {pool} has no slot {slot}"))
}

/// Where the benchmark keeps its files: `--data-dir` or a temporary dir
/// (removed at the end).
pub enum Dir {
    Given(PathBuf),
    Temp(tempfile::TempDir),
}

impl Dir {
    pub fn path(&self) -> &Path {
        match self {
            Dir::Given(p) => p,
            Dir::Temp(t) => t.path(),
        }
    }
}
