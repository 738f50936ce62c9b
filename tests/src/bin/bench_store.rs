//! Store benchmark: the latency of a tenant write (`CreateJoinToken`, one
//! row and one commit) on a manager whose state is in redb (`state.redb`,
//! fsync per commit) and on one whose state is in etcd (a real etcd on
//! loopback, started here: the Debian package `etcd-server`), one writer at
//! a time and `--concurrency` at once.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-store [--writes 300] [--concurrency 8]
//!
//! Prints one line per store and load, then one JSON object (last line)
//! with `redb_p50_ms`, `redb_p99_ms`, `etcd_p50_ms`, `etcd_p99_ms` (one
//! writer) and the same with `_concurrent` (`--concurrency` writers).

use std::time::Instant;

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
    let on_etcd = {
        let m = Manager::start_on(
            &tmp.path().join("etcd-manager"),
            "127.0.0.1:0".parse().expect("addr"),
            &["--store", "etcd", "--etcd-endpoints", &etcd.url],
        )
        .await;
        measure(&m, writes, concurrency).await
    };
    print("etcd", &on_etcd, concurrency);

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
        })
    );
}
