//! `edgepool-swarm`: 50 virtual agents in one process enroll with real
//! join tokens, keep their own streams, form a pool whose members beat each
//! other, and the manager fails over a member frozen through the control
//! socket. A second run on the same data dir connects without a single
//! token (cached credentials).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::pools::{app, create_pool, get_pool, wait_running};

const AGENTS: usize = 50;
const SLOW: Duration = Duration::from_secs(90);

/// Sends one control command; returns its data lines (panics on `error:`).
async fn control(socket: &Path, line: &str) -> Vec<String> {
    let conn = tokio::net::UnixStream::connect(socket)
        .await
        .expect("control socket");
    let (r, mut w) = conn.into_split();
    w.write_all(format!("{line}\n").as_bytes())
        .await
        .expect("write a command");
    let mut lines = BufReader::new(r).lines();
    let mut out = Vec::new();
    while let Some(l) = lines.next_line().await.expect("read the answer") {
        if l == "ok" {
            return out;
        }
        assert!(!l.starts_with("error"), "{line}: {l}");
        out.push(l);
    }
    panic!("{line}: the control socket closed before `ok`");
}

fn swarm(m: &Manager, data: &Path, log: &Path, tokens: bool) -> Proc {
    let mut cmd = Command::new(bin("edgepool-swarm"));
    cmd.args(["--agents", &AGENTS.to_string()])
        .args(["--manager", &m.addr.to_string()])
        .arg("--ca-cert")
        .arg(m.ca())
        .arg("--data-dir")
        .arg(data)
        .args(["--ramp-per-sec", "0", "--status-interval-ms", "1000"])
        .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"]);
    if tokens {
        cmd.arg("--tenant-cert")
            .arg(m.dir.join("tenant.pem"))
            .arg("--tenant-key")
            .arg(m.dir.join("tenant.key"));
    }
    Proc::spawn("edgepool-swarm", &mut cmd, log)
}

async fn connected_swarm_nodes(m: &Manager) -> Vec<pb::Node> {
    list_nodes(&mut m.tenant())
        .await
        .into_iter()
        .filter(|n| n.node_id.starts_with("swarm-") && n.connected)
        .collect()
}

async fn wait_all_connected(m: &Manager, swarm: &Proc) -> Vec<pb::Node> {
    eventually(&format!("{AGENTS} swarm nodes connected"), SLOW, || async {
        let nodes = connected_swarm_nodes(m).await;
        // Connected, and telemetry from the synthetic machine arrived.
        let ready = nodes
            .iter()
            .filter(|n| n.usage.as_ref().is_some_and(|u| u.memory_mb > 0))
            .count();
        assert!(
            !swarm.log_text().contains("virtual agent failed"),
            "{}",
            swarm.log_text()
        );
        (ready == AGENTS).then_some(nodes)
    })
    .await
}

#[tokio::test]
async fn a_swarm_connects_pools_and_a_frozen_member_fails_over() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("manager")).await;
    let data = tmp.path().join("swarm");
    let socket: PathBuf = data.join("control.sock");
    let mut first = swarm(&m, &data, &tmp.path().join("swarm-1.log"), true);

    let nodes = wait_all_connected(&m, &first).await;
    let capacity = nodes[0].capacity.unwrap_or_default();
    assert_eq!((capacity.cpu_millis, capacity.memory_mb), (4000, 8192));
    let status = control(&socket, "status").await;
    assert!(
        status[0].contains(&format!("connected={AGENTS}")),
        "{status:?}"
    );

    // A pool over three virtual nodes: assignments, simulated apps with
    // their fake pids in the app reports, peer beats between the members.
    let members = ["swarm-00000", "swarm-00001", "swarm-00002"];
    let apps: Vec<pb::AppSpec> = (0..6)
        .map(|i| {
            let mut a = app(&format!("s{i}"), &["sleep", "1000"]);
            a.slot = Some(i / 2 + 1);
            a
        })
        .collect();
    create_pool(&m, "swarm", &members, apps).await.unwrap();
    let before = wait_running(&m, "swarm").await;
    assert!(before.placements.iter().all(|p| p.pid >= 1 << 23));
    eventually("members reach each other", SLOW, || async {
        let mut all = true;
        for id in members {
            let n = get_node(&mut m.tenant(), id).await?;
            all &= n.peers.len() == 2 && n.peers.iter().all(|p| p.reachable);
        }
        all.then_some(())
    })
    .await;

    // Frozen: sockets open, no byte moves. The other members stop hearing
    // its beats, the manager's ping goes unanswered: the slot moves.
    control(&socket, "freeze swarm-00001").await;
    let listed = control(&socket, "list 1").await;
    assert!(listed[0].contains("frozen"), "{listed:?}");
    let after = eventually("slot 2 failed over", SLOW, || async {
        let p = get_pool(&m, "swarm").await;
        let holder = p.members.iter().find(|x| x.slot == 2)?.node_id.clone();
        let group_runs = p
            .placements
            .iter()
            .filter(|pl| pl.home_slot == 2)
            .all(|pl| pl.host_node_id == holder && pl.state() == pb::AppState::Running);
        (holder != "swarm-00001" && group_runs).then_some(p)
    })
    .await;
    assert!(after.members.iter().all(|x| x.node_id != "swarm-00001"));
    let old = get_node(&mut m.tenant(), "swarm-00001").await.unwrap();
    assert_eq!(old.state(), pb::NodeState::Failed);

    // Thawed, it comes back, is fenced and ends up free.
    control(&socket, "thaw swarm-00001").await;
    eventually("the thawed node free again", SLOW, || async {
        let n = get_node(&mut m.tenant(), "swarm-00001").await?;
        (n.state() == pb::NodeState::Free && n.connected).then_some(())
    })
    .await;

    // Killed: its stream ends at once.
    control(&socket, "kill 10").await;
    eventually("the killed node disconnected", SLOW, || async {
        let n = get_node(&mut m.tenant(), "swarm-00010").await?;
        (!n.connected).then_some(())
    })
    .await;
    first.kill();

    // A rerun on the same data dir has no token source at all: every
    // agent connects with its cached credentials.
    let second = swarm(&m, &data, &tmp.path().join("swarm-2.log"), false);
    wait_all_connected(&m, &second).await;
}
