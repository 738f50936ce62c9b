//! Failover benchmark: the time from SIGKILL of a member's whole session
//! (agent and apps) to every app of its group running under the spare's
//! agent, seen directly in the process table (not through the API), with
//! the manager's default failure settings.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-failover [--runs 20]
//!
//! Each run: a pool of 3 members + 1 spare on loopback (real manager, real
//! agents, real processes), kill slot 2's session, time until slot 2's apps
//! run under the spare; then delete the pool, restart the killed agent and
//! wait until all 4 nodes are FREE again.

use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let runs = number_arg("--runs", 20) as usize;
    let tmp = TempDir::new().expect("tempdir");
    let m = Manager::start(&tmp.path().join("m")).await;
    let ids: Vec<String> = (1..=4).map(|i| format!("node-{i}")).collect();
    let mut agents = Vec::new();
    for id in &ids {
        let dir = enroll(&m, tmp.path(), id).await;
        let p = start_agent(&dir, &m.addr, &[]);
        agents.push((id.clone(), dir, p));
    }
    let mut times = Vec::new();
    for run in 0..runs {
        for id in &ids {
            eventually(
                "node free and connected",
                Duration::from_secs(60),
                || async {
                    let n = get_node(&mut m.tenant(), id).await?;
                    (n.connected && n.state() == pb::NodeState::Free).then_some(())
                },
            )
            .await;
        }
        // Members: the first three nodes in a rotating order; the last is the spare.
        let order: Vec<usize> = (0..4).map(|i| (i + run) % 4).collect();
        let members: Vec<String> = order[..3].iter().map(|i| ids[*i].clone()).collect();
        let spare = order[3];
        let cmd = |slot: u32| {
            vec![
                "sleep".to_string(),
                format!("{}", 800_000 + run as u32 * 10 + slot),
            ]
        };
        let apps: Vec<pb::AppSpec> = (1..=3)
            .map(|slot| pb::AppSpec {
                name: format!("a{slot}"),
                command: cmd(slot),
                slot: Some(slot),
                ..Default::default()
            })
            .collect();
        let pool = format!("bench-{run}");
        m.tenant()
            .create_pool(pb::CreatePoolRequest {
                name: pool.clone(),
                node_ids: members.clone(),
                apps,
                ..Default::default()
            })
            .await
            .expect("CreatePool");
        eventually("pool running", Duration::from_secs(60), || async {
            let p = m
                .tenant()
                .get_pool(pb::GetPoolRequest { name: pool.clone() })
                .await
                .ok()?
                .into_inner();
            p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running)
                .then_some(())
        })
        .await;

        let victim = order[1];
        let spare_pid = agents[spare].2.pid() as i64;
        let target_cmd = cmd(2).join(" ");
        let start = Instant::now();
        agents[victim].2.kill();
        loop {
            let moved = processes_running(&target_cmd)
                .into_iter()
                .any(|pid| stat_field(pid, 4) == Some(spare_pid));
            if moved {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "failover did not happen"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        println!(
            "run {:>2}: {} -> {}: {ms:.0} ms",
            run + 1,
            ids[victim],
            ids[spare]
        );
        times.push(ms);

        m.tenant()
            .delete_pool(pb::DeletePoolRequest { name: pool.clone() })
            .await
            .expect("DeletePool");
        let dir = agents[victim].1.clone();
        agents[victim].2 = start_agent(&dir, &m.addr, &[]);
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = percentile(&sorted, 50.0);
    println!(
        "bench-failover: {} runs, kill -> group running on the spare: median {median:.0} ms, p90 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms (defaults: failure_grace_ms 1000, failure_check_ms 200, peer confirmation on)",
        times.len(),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        sorted[0],
        sorted[sorted.len() - 1]
    );
}
