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
//! Prints one line per store and load, then one JSON object (last line)
//! with `redb_p50_ms`, `redb_p99_ms`, `etcd_p50_ms`, `etcd_p99_ms` (one
//! writer), the same with `_concurrent` (`--concurrency` writers), and
//! `leader_takeover_p50_ms`, `leader_takeover_max_ms`.

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
    cmd.args(["serve", "--listen", addr, "--data-dir"])
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
    let tmp = TempDir::new().expect("temp dir");

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
        })
    );
}
