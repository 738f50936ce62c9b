//! Failover benchmark: the time from a member's failure to every app of its
//! group running under a spare's agent, seen directly in the process table
//! (not through the API), with the manager's and agents' default failure
//! settings.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-failover [--mode kill|freeze|cut] [--runs 20]
//!                                 [--pools 1] [--fail 1] [--members 3]
//!
//! Modes (what happens to slot 2's node of each failing pool):
//! - `kill`: SIGKILL to its whole session (agent and apps): sockets close at
//!   once, like a crashed process or a machine whose kernel resets them.
//! - `freeze`: SIGSTOP to its whole session: sockets stay open and nothing
//!   answers, like a kernel hang or a power cut seen from the network.
//! - `cut`: every byte to and from it is held (its link to the manager and
//!   its peer port both go through proxies that become black holes), like a
//!   pulled cable.
//!
//! Topology: `--pools` pools of `--members` members each, plus one spare per
//! pool; `--fail K` of the pools lose a member at the same moment (K
//! simultaneous failures). Each run creates the pools, fails the members,
//! times every failure, then heals the failed nodes (restart, SIGCONT or
//! restore), deletes the pools and waits until every node is FREE again.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::procstat::percentile;
use edgepool_tests::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

fn text_arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Kill,
    Freeze,
    Cut,
}

/// One agent: its enrolled dir, its process, and the proxies its manager
/// link and its peer port go through.
struct Node {
    id: String,
    dir: AgentDir,
    proc: Proc,
    uplink: Proxy,
    peer: Proxy,
    peer_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn spawn_agent(dir: &AgentDir, uplink: SocketAddr, peer_port: u16, peer_proxy: SocketAddr) -> Proc {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&dir.dir)
        .args(["--manager", &uplink.to_string()])
        .args(["--peer-listen", &format!("127.0.0.1:{peer_port}")])
        .args(["--peer-advertise", &peer_proxy.to_string()])
        .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"]);
    let log = dir.dir.join("agent.log");
    Proc::spawn_session(&dir.node_id, &mut cmd, &log)
}

#[tokio::main]
async fn main() {
    let mode = match text_arg("--mode", "kill").as_str() {
        "kill" => Mode::Kill,
        "freeze" => Mode::Freeze,
        "cut" => Mode::Cut,
        other => {
            eprintln!("bench-failover: --mode must be kill, freeze or cut (not {other:?})");
            std::process::exit(2);
        }
    };
    let runs = number_arg("--runs", 20) as usize;
    let pools = number_arg("--pools", 1).max(1) as usize;
    let fail = (number_arg("--fail", 1) as usize).clamp(1, pools);
    let members = number_arg("--members", 3).max(2) as usize;
    let tmp = TempDir::new().expect("tempdir");
    let m = Manager::start(&tmp.path().join("m")).await;
    let total = pools * (members + 1);
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..total {
        let id = format!("node-{:02}", i + 1);
        let dir = enroll(&m, tmp.path(), &id).await;
        let uplink = Proxy::start(m.addr).await;
        let peer_port = free_port();
        let peer = Proxy::start(SocketAddr::from(([127, 0, 0, 1], peer_port))).await;
        let proc = spawn_agent(&dir, uplink.addr, peer_port, peer.addr);
        nodes.push(Node {
            id,
            dir,
            proc,
            uplink,
            peer,
            peer_port,
        });
    }
    // Pool p: members p*members .. p*members+members-1; the spares are the
    // last `pools` nodes.
    let spare_pids = |nodes: &[Node]| -> Vec<i64> {
        nodes[pools * members..]
            .iter()
            .map(|n| n.proc.pid() as i64)
            .collect()
    };
    let mut times = Vec::new();
    for run in 0..runs {
        for n in &nodes {
            eventually(
                "node free and connected",
                Duration::from_secs(120),
                || async {
                    let x = get_node(&mut m.tenant(), &n.id).await?;
                    (x.connected && x.state() == pb::NodeState::Free).then_some(())
                },
            )
            .await;
        }
        let cmd =
            |pool: usize, slot: usize| format!("sleep {}", 800_000 + run * 1000 + pool * 10 + slot);
        for p in 0..pools {
            let apps: Vec<pb::AppSpec> = (1..=members)
                .map(|slot| pb::AppSpec {
                    name: format!("a{slot}"),
                    command: cmd(p, slot).split(' ').map(String::from).collect(),
                    slot: Some(slot as u32),
                    ..Default::default()
                })
                .collect();
            m.tenant()
                .create_pool(pb::CreatePoolRequest {
                    name: format!("bench-{run}-{p}"),
                    node_ids: (0..members)
                        .map(|i| nodes[p * members + i].id.clone())
                        .collect(),
                    apps,
                    ..Default::default()
                })
                .await
                .expect("CreatePool");
        }
        for p in 0..pools {
            let name = format!("bench-{run}-{p}");
            eventually("pool running", Duration::from_secs(60), || async {
                let x = m
                    .tenant()
                    .get_pool(pb::GetPoolRequest { name: name.clone() })
                    .await
                    .ok()?
                    .into_inner();
                x.placements
                    .iter()
                    .all(|pl| pl.state() == pb::AppState::Running)
                    .then_some(())
            })
            .await;
        }
        // Let the members' liveness probes settle on the new membership.
        tokio::time::sleep(Duration::from_millis(1500)).await;

        let victims: Vec<usize> = (0..fail).map(|p| p * members + 1).collect();
        let spares = spare_pids(&nodes);
        let start = Instant::now();
        for v in &victims {
            let n = &mut nodes[*v];
            match mode {
                Mode::Kill => n.proc.kill(),
                Mode::Freeze => {
                    let _ = killpg(Pid::from_raw(n.proc.pid()), Signal::SIGSTOP);
                }
                Mode::Cut => {
                    n.uplink.blackhole();
                    n.peer.blackhole();
                }
            }
        }
        let mut pending: BTreeMap<usize, String> = (0..fail).map(|p| (p, cmd(p, 2))).collect();
        let mut run_times = Vec::new();
        while !pending.is_empty() {
            pending.retain(|_, target| {
                let moved = processes_running(target)
                    .into_iter()
                    .any(|pid| stat_field(pid, 4).is_some_and(|pp| spares.contains(&pp)));
                if moved {
                    run_times.push(start.elapsed().as_secs_f64() * 1000.0);
                }
                !moved
            });
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "failover did not happen within 60 s ({} of {fail} pending)",
                pending.len()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        run_times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "run {:>2} ({mode:?}, {fail} at once): fastest {:.0} ms, slowest {:.0} ms",
            run + 1,
            run_times[0],
            run_times[run_times.len() - 1]
        );
        times.extend(run_times);

        // Heal the failed nodes: they come back, are fenced, stop their old
        // group and are FREE again.
        for v in &victims {
            let n = &mut nodes[*v];
            match mode {
                Mode::Kill => {
                    n.proc = spawn_agent(&n.dir, n.uplink.addr, n.peer_port, n.peer.addr);
                }
                Mode::Freeze => {
                    let _ = killpg(Pid::from_raw(n.proc.pid()), Signal::SIGCONT);
                }
                Mode::Cut => {
                    n.uplink.restore();
                    n.peer.restore();
                }
            }
        }
        for p in 0..pools {
            m.tenant()
                .delete_pool(pb::DeletePoolRequest {
                    name: format!("bench-{run}-{p}"),
                })
                .await
                .expect("DeletePool");
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    println!(
        "bench-failover --mode {}: {} failures ({runs} runs x {fail} at once, {pools} pools of {members}), failure -> group running on a spare: median {:.0} ms, p90 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms (default settings)",
        format!("{mode:?}").to_lowercase(),
        times.len(),
        percentile(&sorted, 50.0),
        percentile(&sorted, 90.0),
        percentile(&sorted, 99.0),
        sorted[0],
        sorted[sorted.len() - 1]
    );
}
