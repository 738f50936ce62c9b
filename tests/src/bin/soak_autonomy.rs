//! Autonomy soak (issue 14, not in CI): a pool of three real agents whose
//! manager is black-holed for `--cut-seconds` (default 3600) with member
//! certificates of `--cert-seconds` (default 60, so every certificate
//! expires early in the cut), load that makes node-1 offload apps to its
//! peers and take them back again and again during the cut, and node-3's
//! agent restarted at `--restart-at-seconds` into the cut (default: half
//! of it). Reports app restarts (expected 0), offloads, whether the STOP
//! apps kept their processes, and the time from the heal until every
//! member holds a renewed certificate and reaches every peer with it.
//!
//!   scripts/soak-autonomy.sh [--cut-seconds 3600] [--cert-seconds 60]
//!                            [--restart-at-seconds N]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;

fn ms(t: &Option<prost_types::Timestamp>) -> u64 {
    t.as_ref()
        .map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
        .unwrap_or(0)
}

/// An app of slot `slot` running `script` under `sh`, tagged with `tag`
/// (unique to this run) so the process table tells it apart.
fn shell_app(name: &str, slot: u32, script: &str, tag: &str, offloadable: bool) -> pb::AppSpec {
    pb::AppSpec {
        name: name.into(),
        command: vec!["sh".into(), "-c".into(), script.into(), tag.into()],
        slot: Some(slot),
        offloadable,
        ..Default::default()
    }
}

/// A burner that idles `idle` s, then burns `cpu` millicores for `burn` s,
/// forever (its process stays the same: only its child changes).
fn burner(name: &str, tag: &str, idle: u32, burn: u32, cpu: u32) -> pb::AppSpec {
    let load = bin("edgepool-load").display().to_string();
    let script =
        format!("while :; do sleep {idle}; {load} --cpu {cpu} --seconds {burn} --tag {tag}; done");
    shell_app(name, 1, &script, tag, true)
}

#[tokio::main]
async fn main() {
    let cut = Duration::from_secs(number_arg("--cut-seconds", 3600));
    let cert_seconds = number_arg("--cert-seconds", 60).to_string();
    let restart_at = Duration::from_secs(number_arg("--restart-at-seconds", cut.as_secs() / 2));
    let tmp = TempDir::new().expect("tempdir");
    let tag = tmp
        .path()
        .file_name()
        .map(|n| format!("soak-{}", n.to_string_lossy()))
        .unwrap_or_default();
    let m = Manager::start_with_env(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().expect("addr"),
        &[],
        &[
            ("EDGEPOOL_MEMBER_CERT_VALIDITY_SECONDS", &cert_seconds),
            ("EDGEPOOL_MEMBER_CERT_CHECK_MS", "1000"),
        ],
    )
    .await;
    let proxy = Proxy::start(m.addr).await;
    // 500 millicores each, so two hot burners (600) cross node-1's high
    // watermark (400) and one burner fits on a peer.
    let args = ["--cpu-millis", "500", "--network-accounting", "process"];
    let mut agents = BTreeMap::new();
    for i in 1..=3 {
        let id = format!("node-{i}");
        let dir = enroll(&m, tmp.path(), &id).await;
        let proc = start_agent(&dir, &proxy.addr, &args);
        agents.insert(id.clone(), (dir, proc));
        wait_connected(&m, &id).await;
    }
    let mut apps = vec![
        burner("b1", &format!("{tag}-b1"), 30, 30, 300),
        burner("b2", &format!("{tag}-b2"), 45, 40, 300),
        burner("b3", &format!("{tag}-b3"), 20, 25, 300),
    ];
    for slot in 1..=3 {
        let mut stop = shell_app(
            &format!("stop{slot}"),
            slot,
            "sleep 1000000; :",
            &format!("{tag}-stop{slot}"),
            false,
        );
        stop.on_disconnect = pb::OnDisconnect::Stop as i32;
        apps.push(stop);
    }
    let quiet = Some(pb::Threshold {
        high: 0.99,
        low: 0.98,
    });
    m.tenant()
        .create_pool(pb::CreatePoolRequest {
            name: "soak".into(),
            node_ids: agents.keys().cloned().collect(),
            apps: apps.clone(),
            policy: Some(pb::Policy {
                cpu: Some(pb::Threshold {
                    high: 0.8,
                    low: 0.7,
                }),
                memory: quiet,
                disk: quiet,
                network: quiet,
                sustain_seconds: 2,
                cooldown_seconds: 5,
                return_home: true,
                return_home_seconds: 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("CreatePool");
    let pool = |m: &Manager| {
        let mut t = m.tenant();
        async move {
            t.get_pool(pb::GetPoolRequest {
                name: "soak".into(),
            })
            .await
            .map(|r| r.into_inner())
            .ok()
        }
    };
    let before = eventually("the pool running", DEADLINE, || async {
        let p = pool(&m).await?;
        (p.placements.len() == apps.len()
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running && pl.pid != 0))
        .then_some(p)
    })
    .await;
    let stop_pids: BTreeMap<String, u32> = before
        .placements
        .iter()
        .filter(|p| p.app.starts_with("stop"))
        .map(|p| (p.app.clone(), p.pid))
        .collect();
    let serials: BTreeMap<u32, String> = before
        .members
        .iter()
        .map(|m| (m.slot, m.cert_serial.clone()))
        .collect();
    let last_seq = retained_events(&m, "soak", Duration::from_millis(300))
        .await
        .iter()
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);

    println!(
        "soak-autonomy: cut {} s, member certificates {cert_seconds} s, node-3's agent restarted {} s into the cut",
        cut.as_secs(),
        restart_at.as_secs()
    );
    // node-1 owns the burners: its log says each move and each return.
    let moves = |agents: &BTreeMap<String, (AgentDir, Proc)>| {
        let text = agents
            .get("node-1")
            .map(|(_, p)| p.log_text())
            .unwrap_or_default();
        let count = |what: &str| text.lines().filter(|l| l.contains(what)).count();
        (
            count(" offloaded "),
            count(" returned home"),
            count("taken back from the host"),
        )
    };
    let moves_before = moves(&agents);
    proxy.blackhole();
    let cut_at = Instant::now();
    let mut restarted = None;
    let mut stop_gaps = 0u64;
    let mut last_report = Instant::now();
    while cut_at.elapsed() < cut {
        for (name, pid) in &stop_pids {
            let cmd = apps
                .iter()
                .find(|a| &a.name == name)
                .map(|a| a.command.join(" "))
                .unwrap_or_default();
            if processes_running(&cmd) != [*pid as i32] {
                stop_gaps += 1;
                println!(
                    "  {:>5} s: {name} is not running as pid {pid}",
                    cut_at.elapsed().as_secs()
                );
            }
        }
        if restarted.is_none() && cut_at.elapsed() >= restart_at {
            let (dir, old) = agents.remove("node-3").expect("node-3");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(old.pid()),
                nix::sys::signal::Signal::SIGKILL,
            );
            let mut old = old;
            let _ = old.child.wait();
            let new = start_agent(&dir, &proxy.addr, &args);
            println!(
                "  {:>5} s: node-3's agent restarted",
                cut_at.elapsed().as_secs()
            );
            restarted = Some((old, new));
        }
        if last_report.elapsed() >= Duration::from_secs(300) {
            println!("  {:>5} s into the cut", cut_at.elapsed().as_secs());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if let Some((_, new)) = &restarted {
        let confirmed = new
            .log_text()
            .contains("a peer accepted our member certificate");
        println!("node-3 confirmed by a peer during the cut: {confirmed}");
    }

    let moves_in_cut = moves(&agents);
    proxy.restore();
    let healed_at = now_ms();
    let heal = Instant::now();
    let converged = eventually(
        "renewed certificates and every peer reached",
        Duration::from_secs(300),
        || async {
            let p = pool(&m).await?;
            let renewed = p.members.iter().all(|mb| {
                serials.get(&mb.slot) != Some(&mb.cert_serial) && ms(&mb.cert_expires_at) > now_ms()
            });
            if !renewed {
                return None;
            }
            for id in ["node-1", "node-2", "node-3"] {
                let n = get_node(&mut m.tenant(), id).await?;
                let reached = n.connected
                    && n.peers.len() == 2
                    && n.peers
                        .iter()
                        .all(|p| p.reachable && ms(&p.last_ok) > healed_at);
                if !reached {
                    return None;
                }
            }
            Some(p)
        },
    )
    .await;
    let converge = heal.elapsed();
    // Let the agents' reports of the cut reach the manager.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = pool(&m).await.unwrap_or(converged);
    let restarts: u32 = after.placements.iter().map(|p| p.restarts).sum();
    let stop_changed: Vec<&String> = stop_pids
        .iter()
        .filter(|(name, pid)| {
            !after
                .placements
                .iter()
                .any(|p| &p.app == *name && p.pid == **pid)
        })
        .map(|(name, _)| name)
        .collect();
    let events: Vec<pb::Event> = retained_events(&m, "soak", Duration::from_millis(500))
        .await
        .into_iter()
        .filter(|e| e.seq > last_seq)
        .collect();
    let count = |k: pb::EventKind| events.iter().filter(|e| e.kind() == k).count();
    let offloads = events
        .iter()
        .filter(|e| e.kind() == pb::EventKind::Offload && !e.message.contains("returned home"))
        .count();
    let returns = events
        .iter()
        .filter(|e| e.kind() == pb::EventKind::Offload && e.message.contains("returned home"))
        .count();
    println!(
        "app restarts (runtime counters): {restarts}; APP_EXITED events: {}; STOP apps with a new pid: {stop_changed:?}; STOP-app gaps seen in the cut: {stop_gaps}",
        count(pb::EventKind::AppExited)
    );
    println!(
        "offloads during the cut (node-1's log): {} moves, {} returns home, {} taken back after a failed renewal",
        moves_in_cut.0 - moves_before.0,
        moves_in_cut.1 - moves_before.1,
        moves_in_cut.2 - moves_before.2
    );
    println!(
        "OFFLOAD events since the cut began (reported after the heal; an agent keeps its last 50 records): {offloads} moves, {returns} returns home; CERT_RENEWED events: {}",
        count(pb::EventKind::CertRenewed)
    );
    println!(
        "converged {:.1} s after the heal (renewed certificates on every member, every peer reached with them)",
        converge.as_secs_f64()
    );
    drop(restarted);
    drop(agents);
}
