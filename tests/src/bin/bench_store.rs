//! Store benchmark: the latency of a tenant write (`CreateJoinToken`, one
//! row and one commit) on a manager whose state is in redb (`state.redb`,
//! fsync per commit) and on one whose state is in etcd (a real etcd on
//! loopback, started here: the Debian package `etcd-server`), one writer at
//! a time and `--concurrency` at once.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-store [--writes 300] [--concurrency 8]
//!
//! Then the leader's loss: two managers on the etcd prefix (a leader and a
//! standby replica), the leader SIGKILLed `--kills` times (default 5, the
//! killed one restarted as the next standby), timing each time until the
//! standby's health says it leads (`edge.v1.Leader` SERVING), with the
//! default lease TTL (`etcd_lease_ttl_seconds`, 4 s).
//!
//! Then node failovers (`--failover-rounds`, default 5): a member node
//! SIGKILLed with the leader in place, then a member node and the leader
//! SIGKILLed at the same moment, timing until the node's slot runs on a
//! spare (see `failovers`).
//!
//! Prints one line per store and load, then one JSON object (last line)
//! with `redb_p50_ms`, `redb_p99_ms`, `etcd_p50_ms`, `etcd_p99_ms` (one
//! writer), the same with `_concurrent` (`--concurrency` writers),
//! `leader_takeover_p50_ms`, `leader_takeover_max_ms`, `failover_p50_ms`,
//! `failover_max_ms`, `failover_during_takeover_p50_ms` and
//! `failover_during_takeover_max_ms`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::procstat::percentile;
use edgepool_tests::*;

struct Figures {
    p50: f64,
    p99: f64,
    c_p50: f64,
    c_p99: f64,
}

async fn one(m: &Manager) -> f64 {
    let mut t = m.tenant();
    let start = Instant::now();
    t.create_join_token(pb::CreateJoinTokenRequest {
        ttl_seconds: 60,
        ..Default::default()
    })
    .await
    .expect("CreateJoinToken");
    start.elapsed().as_secs_f64() * 1000.0
}

async fn measure(m: &Manager, writes: usize, concurrency: usize) -> Figures {
    // Warm the connection and the store.
    for _ in 0..10 {
        one(m).await;
    }
    let mut single = Vec::with_capacity(writes);
    for _ in 0..writes {
        single.push(one(m).await);
    }
    single.sort_by(|a, b| a.total_cmp(b));
    let per = writes.div_ceil(concurrency);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let m_addr = m.addr;
        let dir = m.dir.clone();
        tasks.spawn(async move {
            let client = tenant_client(
                &m_addr,
                &dir.join("ca.pem"),
                Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
            );
            let mut out = Vec::with_capacity(per);
            for _ in 0..per {
                let mut t = client.clone();
                let start = Instant::now();
                t.create_join_token(pb::CreateJoinTokenRequest {
                    ttl_seconds: 60,
                    ..Default::default()
                })
                .await
                .expect("CreateJoinToken");
                out.push(start.elapsed().as_secs_f64() * 1000.0);
            }
            out
        });
    }
    let mut many = Vec::new();
    while let Some(r) = tasks.join_next().await {
        many.extend(r.expect("writer task"));
    }
    many.sort_by(|a, b| a.total_cmp(b));
    Figures {
        p50: percentile(&single, 50.0),
        p99: percentile(&single, 99.0),
        c_p50: percentile(&many, 50.0),
        c_p99: percentile(&many, 99.0),
    }
}

/// A manager on the etcd prefix at a fixed address (leader or standby).
fn replica(dir: &Path, addr: &str, url: &str, n: usize) -> Proc {
    let mut cmd = std::process::Command::new(bin("cloud-manager"));
    cmd.args([
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--listen",
        addr,
        "--data-dir",
    ])
    .arg(dir)
    .args(["--store", "etcd", "--etcd-endpoints", url]);
    Proc::spawn(
        "cloud-manager",
        &mut cmd,
        &dir.join(format!("replica-{n}.log")),
    )
}

fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .expect("a free port")
}

async fn wait_status(addr: &str, ca: &Path, want: i32) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if leader_status(addr, ca).await == Some(want) {
            return Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} never reported edge.v1.Leader status {want}");
}

/// Kills the leader `kills` times; the time from each kill to the
/// standby's SERVING, sorted.
async fn takeovers(first: &Path, root: &Path, url: &str, kills: usize) -> Vec<f64> {
    let ca = first.join("ca.pem");
    let dirs: [PathBuf; 2] = [first.to_path_buf(), root.join("replica-b")];
    copy_replica_files(first, &dirs[1]);
    let addrs = [free_addr(), free_addr()];
    let mut procs = [Some(replica(&dirs[0], &addrs[0], url, 0)), None];
    wait_status(&addrs[0], &ca, 1).await;
    procs[1] = Some(replica(&dirs[1], &addrs[1], url, 1));
    wait_status(&addrs[1], &ca, 2).await;
    let mut times = Vec::new();
    let mut leader = 0;
    for k in 0..kills {
        let standby = 1 - leader;
        if let Some(mut p) = procs[leader].take() {
            p.kill();
        }
        let killed = Instant::now();
        let led = wait_status(&addrs[standby], &ca, 1).await;
        times.push((led - killed).as_secs_f64() * 1000.0);
        // The killed one comes back as the next standby.
        procs[leader] = Some(replica(&dirs[leader], &addrs[leader], url, 2 + k));
        wait_status(&addrs[leader], &ca, 2).await;
        leader = standby;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times
}

/// A sleeping app, as the tenant asks for it.
fn app(name: &str, secs: u64) -> pb::AppSpec {
    pb::AppSpec {
        name: name.into(),
        command: vec!["sleep".into(), secs.to_string()],
        resources: Some(pb::Resources {
            cpu_millis: 10,
            memory_mb: 8,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether pool `fo` has both slots on distinct connected nodes other than
/// `not`, each app running as one process on its slot's node.
async fn pool_settled(m: &Manager, apps: &[String], not: Option<&str>) -> bool {
    let Ok(p) = m
        .tenant()
        .get_pool(pb::GetPoolRequest { name: "fo".into() })
        .await
        .map(|r| r.into_inner())
    else {
        return false;
    };
    let holders: Vec<&str> = p.members.iter().map(|x| x.node_id.as_str()).collect();
    if holders.len() != 2 || holders[0] == holders[1] || not.is_some_and(|n| holders.contains(&n)) {
        return false;
    }
    p.placements.len() == apps.len()
        && p.placements.iter().all(|pl| {
            let home = p.members.iter().find(|x| x.slot == pl.home_slot);
            pl.state() == pb::AppState::Running
                && home.is_some_and(|h| h.node_id == pl.host_node_id)
        })
        && apps.iter().all(|a| processes_running(a).len() == 1)
}

/// Node failover while the leader is being replaced: two replicas on a
/// fresh prefix, four agents (given both addresses), a pool of two nodes
/// with one app each. Each round SIGKILLs the node holding slot 1 (agent
/// and app) and, with `kill_leader`, the leader at the same moment, and
/// times until slot 1 is held by another node with its app running, as
/// the surviving replica reports it and the process table shows. The
/// killed ones come back before the next round (the node as a spare).
async fn failovers(root: &Path, url: &str, rounds: usize, kill_leader: bool) -> Vec<f64> {
    let tag = if kill_leader { "with" } else { "without" };
    let dirs = [
        root.join(format!("fo-{tag}-a")),
        root.join(format!("fo-{tag}-b")),
    ];
    let addrs = [free_addr(), free_addr()];
    let prefix = format!("/bench-fo-{tag}");
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        url,
        "--etcd-prefix",
        &prefix,
    ];
    let parsed = |a: &str| a.parse().expect("addr");
    let mut reps: [Option<Manager>; 2] = [None, None];
    reps[0] = Some(Manager::start_replica(&dirs[0], parsed(&addrs[0]), &args, &[]).await);
    let ca = dirs[0].join("ca.pem");
    wait_status(&addrs[0], &ca, 1).await;
    copy_replica_files(&dirs[0], &dirs[1]);
    reps[1] = Some(Manager::start_replica(&dirs[1], parsed(&addrs[1]), &args, &[]).await);
    wait_status(&addrs[1], &ca, 2).await;
    let managers = addrs.join(",");
    let first = reps[0].as_ref().expect("replica");
    let mut agents = Vec::new();
    for i in 1..=4 {
        let dir = enroll(first, root, &format!("fo-{tag}-{i}")).await;
        agents.push((start_agent_on(&dir, &managers, &[]), dir));
    }
    for i in 1..=4 {
        wait_connected(first, &format!("fo-{tag}-{i}")).await;
    }
    let base = if kill_leader { 790_000 } else { 791_000 };
    let apps = [format!("sleep {}", base + 1), format!("sleep {}", base + 2)];
    first
        .tenant()
        .create_pool(pb::CreatePoolRequest {
            name: "fo".into(),
            node_ids: vec![format!("fo-{tag}-1"), format!("fo-{tag}-2")],
            apps: vec![app("f1", base + 1), app("f2", base + 2)],
            ..Default::default()
        })
        .await
        .expect("CreatePool");
    let mut leader = 0;
    let mut times = Vec::new();
    for round in 0..rounds {
        let m = reps[leader].as_ref().expect("leader");
        eventually("pool fo settled", Duration::from_secs(60), || async {
            pool_settled(m, &apps, None).await.then_some(())
        })
        .await;
        let holder = m
            .tenant()
            .get_pool(pb::GetPoolRequest { name: "fo".into() })
            .await
            .expect("GetPool")
            .into_inner()
            .members[0]
            .node_id
            .clone();
        let k: usize = holder
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .expect("node number");
        let (mut agent, dir) = agents.remove(k - 1);
        let start = Instant::now();
        agent.kill();
        let other = 1 - leader;
        if kill_leader && let Some(mut r) = reps[leader].take() {
            r.proc.kill();
        }
        let watcher = if kill_leader { other } else { leader };
        let w = reps[watcher].as_ref().expect("replica");
        eventually("slot 1 failed over", Duration::from_secs(120), || async {
            pool_settled(w, &apps, Some(&holder)).await.then_some(())
        })
        .await;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
        eprintln!(
            "bench-store: failover {tag} a leader kill, round {round}: {:.0} ms",
            times[times.len() - 1]
        );
        if kill_leader {
            reps[leader] = Some(
                Manager::start_replica(&dirs[leader], parsed(&addrs[leader]), &args, &[]).await,
            );
            wait_status(&addrs[leader], &ca, 2).await;
            leader = other;
        }
        agents.insert(k - 1, (start_agent_on(&dir, &managers, &[]), dir));
        let m = reps[leader].as_ref().expect("leader");
        wait_connected(m, &holder).await;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    times
}

fn print(name: &str, f: &Figures, concurrency: usize) {
    eprintln!(
        "bench-store: {name}: one writer p50 {:.2} ms p99 {:.2} ms; {concurrency} writers p50 {:.2} ms p99 {:.2} ms",
        f.p50, f.p99, f.c_p50, f.c_p99
    );
}

#[tokio::main]
async fn main() {
    let writes = number_arg("--writes", 300) as usize;
    let concurrency = (number_arg("--concurrency", 8) as usize).max(1);
    let mut tmp = TempDir::new().expect("temp dir");
    // EDGEPOOL_TEST_KEEP=1 keeps the logs.
    tmp.disable_cleanup(std::env::var_os("EDGEPOOL_TEST_KEEP").is_some());

    let redb = {
        let m = Manager::start(&tmp.path().join("redb")).await;
        measure(&m, writes, concurrency).await
    };
    print("redb", &redb, concurrency);

    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let etcd_dir = tmp.path().join("etcd-manager");
    let on_etcd = {
        let m = Manager::start_on(
            &etcd_dir,
            "127.0.0.1:0".parse().expect("addr"),
            &["--store", "etcd", "--etcd-endpoints", &etcd.url],
        )
        .await;
        let f = measure(&m, writes, concurrency).await;
        // A graceful stop: the prefix is free at once for the next phase.
        m.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let mut m = m;
        m.proc.wait_exit(Duration::from_secs(15));
        f
    };
    print("etcd", &on_etcd, concurrency);

    let kills = number_arg("--kills", 5) as usize;
    let took = takeovers(&etcd_dir, tmp.path(), &etcd.url, kills).await;
    eprintln!("bench-store: leader SIGKILLed {kills} times, a standby led after {took:.0?} ms");

    let rounds = number_arg("--failover-rounds", 5) as usize;
    let plain = failovers(tmp.path(), &etcd.url, rounds, false).await;
    eprintln!("bench-store: node failover, leader in place: {plain:.0?} ms");
    let during = failovers(tmp.path(), &etcd.url, rounds, true).await;
    eprintln!("bench-store: node failover while the leader is replaced: {during:.0?} ms");

    let r = |x: f64| (x * 100.0).round() / 100.0;
    println!(
        "{}",
        serde_json::json!({
            "writes": writes,
            "concurrency": concurrency,
            "redb_p50_ms": r(redb.p50),
            "redb_p99_ms": r(redb.p99),
            "redb_concurrent_p50_ms": r(redb.c_p50),
            "redb_concurrent_p99_ms": r(redb.c_p99),
            "etcd_p50_ms": r(on_etcd.p50),
            "etcd_p99_ms": r(on_etcd.p99),
            "etcd_concurrent_p50_ms": r(on_etcd.c_p50),
            "etcd_concurrent_p99_ms": r(on_etcd.c_p99),
            "leader_takeover_p50_ms": r(percentile(&took, 50.0)),
            "leader_takeover_max_ms": r(percentile(&took, 100.0)),
            "failover_p50_ms": r(percentile(&plain, 50.0)),
            "failover_max_ms": r(percentile(&plain, 100.0)),
            "failover_during_takeover_p50_ms": r(percentile(&during, 50.0)),
            "failover_during_takeover_max_ms": r(percentile(&during, 100.0)),
        })
    );
}
