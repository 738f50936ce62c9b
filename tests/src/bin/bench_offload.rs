//! Offload reaction benchmark: the time from the end of the sustain window
//! (the node's decision) to the app running on the peer (the peer's answer
//! to the offer, given only once its runtime shows the process running),
//! over repeated real episodes.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-offload [--runs 20]
//!
//! Each run: a pool of 3 agents (capacity overridden to 500 millicores so a
//! real `edgepool-load --cpu 300` plus `--cpu 150` crosses the 0.8 CPU
//! watermark), wait for the OFFLOAD event, check in the process table that
//! the app really runs under the target's agent, read the reaction time the
//! agent measured, delete the pool.

use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;

fn load(name: &str, slot: u32, cpu: &str, offloadable: bool) -> pb::AppSpec {
    pb::AppSpec {
        name: name.into(),
        command: vec![
            bin("edgepool-load").display().to_string(),
            "--cpu".into(),
            cpu.into(),
            "--tag".into(),
            name.into(),
        ],
        slot: Some(slot),
        offloadable,
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    let runs = number_arg("--runs", 20) as usize;
    let tmp = TempDir::new().expect("tempdir");
    let m = Manager::start(&tmp.path().join("m")).await;
    let args = [
        "--cpu-millis",
        "500",
        "--network-accounting",
        "process",
        "--scheduler-interval-ms",
        "200",
    ];
    let mut agents = Vec::new();
    for i in 1..=3 {
        let id = format!("node-{i}");
        let dir = enroll(&m, tmp.path(), &id).await;
        agents.push((id.clone(), start_agent(&dir, &m.addr, &args)));
        wait_connected(&m, &id).await;
    }
    let quiet = Some(pb::Threshold {
        high: 0.99,
        low: 0.98,
    });
    let mut times = Vec::new();
    for run in 0..runs {
        let pool = format!("o{run}");
        let tag = format!("burner{run}");
        let mut apps = vec![
            load(&tag, 1, "300", true),
            load(&format!("pad{run}"), 1, "150", false),
        ];
        for slot in [2, 3] {
            apps.push(pb::AppSpec {
                name: format!("idle{slot}-{run}"),
                command: vec!["sleep".into(), "100000".into()],
                slot: Some(slot),
                ..Default::default()
            });
        }
        m.tenant()
            .create_pool(pb::CreatePoolRequest {
                name: pool.clone(),
                node_ids: agents.iter().map(|(id, _)| id.clone()).collect(),
                apps,
                policy: Some(pb::Policy {
                    cpu: Some(pb::Threshold {
                        high: 0.8,
                        low: 0.5,
                    }),
                    memory: quiet,
                    disk: quiet,
                    network: quiet,
                    sustain_seconds: 1,
                    cooldown_seconds: 1,
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .expect("CreatePool");
        let event = wait_event(&m, &pool, "OFFLOAD", Duration::from_secs(60), |e| {
            e.kind() == pb::EventKind::Offload
        })
        .await;
        // Really there: the process runs under the target's agent.
        let target_pid = agents
            .iter()
            .find(|(id, _)| *id == event.node_id)
            .map(|(_, p)| p.pid() as i64);
        let suffix = format!("--tag {tag}");
        let found = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .any(|pid| cmdline(pid).ends_with(&suffix) && stat_field(pid, 4) == target_pid);
        assert!(
            found,
            "run {run}: the app is not under {}'s agent",
            event.node_id
        );
        let ms: f64 = event
            .message
            .split("running there ")
            .nth(1)
            .and_then(|r| r.split(" ms").next())
            .and_then(|n| n.parse().ok())
            .expect("reaction time in the OFFLOAD message");
        println!(
            "run {:>2}: node-1 -> {}: {ms:.0} ms",
            run + 1,
            event.node_id
        );
        times.push(ms);
        m.tenant()
            .delete_pool(pb::DeletePoolRequest { name: pool })
            .await
            .expect("DeletePool");
        for (id, _) in &agents {
            eventually("node free", Duration::from_secs(30), || async {
                let n = get_node(&mut m.tenant(), id).await?;
                (n.state() == pb::NodeState::Free).then_some(())
            })
            .await;
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        sorted[(((p / 100.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
    };
    println!(
        "bench-offload: {} runs, end of sustain window -> app running on the peer: median {:.0} ms, p90 {:.0} ms, max {:.0} ms, min {:.0} ms",
        sorted.len(),
        pct(50.0),
        pct(90.0),
        sorted[sorted.len() - 1],
        sorted[0]
    );
}
