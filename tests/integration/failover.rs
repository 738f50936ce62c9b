//! Failover with real processes: a crashed member's slot (identity and
//! group) moves to the spare, the old certificate is refused, the old node
//! is fenced when it comes back, a cut cloud link is not a failure, a
//! manager crash in the middle completes after restart, and no app ever
//! runs on two nodes at once.

use std::collections::BTreeMap;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::pools::{Fleet, app, create_pool, get_pool, wait_running};

/// Six apps, two per slot (explicit), with unique command lines.
fn six_apps(base: u32) -> Vec<pb::AppSpec> {
    (0..6)
        .map(|i| {
            let mut a = app(&format!("f{i}"), &["sleep", &format!("{}", base + i)]);
            a.slot = Some(i / 2 + 1);
            a
        })
        .collect()
}

fn commands(apps: &[pb::AppSpec]) -> Vec<String> {
    apps.iter().map(|a| a.command.join(" ")).collect()
}

async fn events_of(m: &Manager, pool: &str) -> Vec<pb::Event> {
    retained_events(m, pool, Duration::from_millis(300)).await
}

fn kinds(events: &[pb::Event]) -> Vec<pb::EventKind> {
    events.iter().map(|e| e.kind()).collect()
}

/// Waits until slot `slot` is held by `node` with its whole group running
/// there (checked in the process tree).
async fn wait_slot_on(f: &Fleet, pool: &str, slot: u32, node: &str) -> pb::Pool {
    let agent = f.agent_pid(node) as i64;
    eventually(
        &format!("slot {slot} running on {node}"),
        DEADLINE,
        || async {
            let p = get_pool(&f.m, pool).await;
            let m = p.members.iter().find(|m| m.slot == slot)?;
            let group: Vec<&pb::Placement> = p
                .placements
                .iter()
                .filter(|pl| pl.home_slot == slot)
                .collect();
            let ok = m.node_id == node
                && group.iter().all(|pl| {
                    pl.host_node_id == node
                        && pl.state() == pb::AppState::Running
                        && stat_field(pl.pid as i32, 4) == Some(agent)
                });
            ok.then_some(p)
        },
    )
    .await
}

#[tokio::test]
async fn a_crashed_member_moves_to_the_spare_and_is_fenced_when_it_returns() {
    let mut f = Fleet::start(4, &[]).await;
    let apps = six_apps(700_000);
    let watch = OwnerWatch::start(commands(&apps));
    create_pool(&f.m, "p", &["node-1", "node-2", "node-3"], apps.clone())
        .await
        .unwrap();
    let before = wait_running(&f.m, "p").await;
    let old = before.members[1].clone();
    assert_eq!(old.node_id, "node-2");
    // node-2's old member identity (certificate + its own key), kept for later.
    let dir2 = f.agents["node-2"].0.dir.clone();
    let mut old_chain = edgepool_common::tls::certs_from_pem(&old.cert_pem, "m").unwrap();
    old_chain.extend(edgepool_common::tls::certs_from_pem(&before.ca_pem, "ca").unwrap());
    let old_key = edgepool_common::tls::read_key(&dir2.join("node.key")).unwrap();

    // Crash the whole simulated machine: agent and apps.
    let (agent2, mut proc2) = f.agents.remove("node-2").unwrap();
    proc2.kill();
    let after = wait_slot_on(&f, "p", 2, "node-4").await;
    let new = &after.members[1];
    assert_eq!(new.node_id, "node-4");
    assert_ne!(new.cert_serial, old.cert_serial);
    assert_eq!(new.generation, old.generation + 1);
    assert!(after.generation > before.generation);
    // The other slots did not move and their apps were not restarted.
    for slot in [1, 3] {
        let pid = |p: &pb::Pool| -> Vec<u32> {
            p.placements
                .iter()
                .filter(|pl| pl.home_slot == slot)
                .map(|pl| pl.pid)
                .collect()
        };
        assert_eq!(pid(&after), pid(&before), "slot {slot} apps restarted");
    }
    let n2 = get_node(&mut f.m.tenant(), "node-2").await.unwrap();
    assert_eq!(n2.state(), pb::NodeState::Failed);
    eventually("FAILOVER_DONE", DEADLINE, || async {
        kinds(&events_of(&f.m, "p").await)
            .contains(&pb::EventKind::FailoverDone)
            .then_some(())
    })
    .await;
    let ev = events_of(&f.m, "p").await;
    let k = kinds(&ev);
    for want in [
        pb::EventKind::FailoverStarted,
        pb::EventKind::CertRevoked,
        pb::EventKind::FailoverDone,
    ] {
        assert!(k.contains(&want), "{want:?} missing from {k:?}");
    }
    let done = ev
        .iter()
        .find(|e| e.kind() == pb::EventKind::FailoverDone)
        .unwrap();
    assert!(done.message.contains(" ms after"), "{}", done.message);

    // Peers refuse the old certificate of slot 2 from now on.
    let addr = after.members[0].peer_address.clone();
    let err = crate::peers::probe_as(&after.ca_pem, &addr, "p", 1, Some((old_chain, old_key)))
        .await
        .unwrap_err();
    assert!(refused_at_tls(&err), "{err}");

    // The crashed node comes back: fenced, runs none of its old apps, then FREE.
    let back = start_agent(&agent2, &f.m.addr, &[]);
    let back_pid = back.pid() as i64;
    eventually("node-2 fenced and then free", DEADLINE, || async {
        let n = get_node(&mut f.m.tenant(), "node-2").await?;
        (n.connected && n.state() == pb::NodeState::Free).then_some(())
    })
    .await;
    let all = events_of(&f.m, "").await;
    assert!(
        kinds(&all).contains(&pb::EventKind::NodeFenced),
        "{:?}",
        kinds(&all)
    );
    for c in commands(&apps) {
        for pid in processes_running(&c) {
            assert_ne!(stat_field(pid, 4), Some(back_pid), "fenced node runs {c}");
        }
    }
    // Never two owners, at any sample, through all of it.
    let worst = watch.worst();
    assert!(
        worst.values().all(|n| *n <= 1),
        "an app ran twice: {worst:?}"
    );
    assert_eq!(worst.len(), 6);
    drop(back);
}

#[tokio::test]
async fn a_cut_cloud_link_is_not_a_failure() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let proxy = Proxy::start(m.addr).await;
    let mut procs = BTreeMap::new();
    for i in 1..=4 {
        let id = format!("node-{i}");
        let dir = enroll(&m, tmp.path(), &id).await;
        // node-2 talks to the manager through the proxy only.
        let via = if i == 2 { proxy.addr } else { m.addr };
        procs.insert(id.clone(), start_agent(&dir, &via, &[]));
        wait_connected(&m, &id).await;
    }
    let apps = six_apps(710_000);
    let watch = OwnerWatch::start(commands(&apps));
    create_pool(&m, "c", &["node-1", "node-2", "node-3"], apps)
        .await
        .unwrap();
    let before = wait_running(&m, "c").await;

    proxy.cut();
    eventually(
        "NODE_SUSPECT saying node-2 is reachable by peers",
        DEADLINE,
        || async {
            let ev = events_of(&m, "c").await;
            ev.iter()
                .find(|e| e.kind() == pb::EventKind::NodeSuspect && e.node_id == "node-2")
                .map(|e| assert!(e.message.contains("reached by"), "{}", e.message))
        },
    )
    .await;
    let n2 = get_node(&mut m.tenant(), "node-2").await.unwrap();
    assert_eq!(n2.state(), pb::NodeState::Suspect);
    // Well past the grace: still no failover, nothing moved or restarted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = get_pool(&m, "c").await;
    assert_eq!(during.members, before.members);
    assert_eq!(during.generation, before.generation);
    assert!(!kinds(&events_of(&m, "c").await).contains(&pb::EventKind::FailoverStarted));
    for pl in before
        .placements
        .iter()
        .filter(|p| p.host_node_id == "node-2")
    {
        assert!(
            std::path::Path::new(&format!("/proc/{}", pl.pid)).exists(),
            "{} stopped",
            pl.app
        );
    }

    // The link comes back: same member, same apps.
    proxy.restore();
    let after = eventually("node-2 back", DEADLINE, || async {
        let n = get_node(&mut m.tenant(), "node-2").await?;
        let p = get_pool(&m, "c").await;
        (n.connected
            && n.state() == pb::NodeState::Member
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running))
        .then_some(p)
    })
    .await;
    let pids = |p: &pb::Pool| {
        p.placements
            .iter()
            .map(|pl| (pl.app.clone(), pl.pid))
            .collect::<Vec<_>>()
    };
    assert_eq!(pids(&after), pids(&before));
    assert!(watch.worst().values().all(|n| *n <= 1));
}

#[tokio::test]
async fn a_manager_crash_in_the_middle_of_a_failover_completes_after_restart() {
    let tmp = TempDir::new().unwrap();
    let mdir = tmp.path().join("m");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let m = Manager::start_with_env(
        &mdir,
        addr,
        &[],
        &[("EDGEPOOL_FAULT", "abort-after-failover-commit")],
    )
    .await;
    let mut f = Fleet {
        tmp,
        m,
        agents: BTreeMap::new(),
    };
    for i in 1..=3 {
        let id = format!("node-{i}");
        let dir = enroll(&f.m, f.tmp.path(), &id).await;
        let p = start_agent(&dir, &f.m.addr, &[]);
        f.agents.insert(id.clone(), (dir, p));
        wait_connected(&f.m, &id).await;
    }
    create_pool(
        &f.m,
        "x",
        &["node-1", "node-2"],
        vec![
            app("x1", &["sleep", "720001"]),
            app("x2", &["sleep", "720002"]),
        ],
    )
    .await
    .unwrap();
    wait_running(&f.m, "x").await;
    let (_, mut p2) = f.agents.remove("node-2").unwrap();
    p2.kill();
    // The manager commits the failover, then dies before pushing anything.
    let status =
        f.m.proc
            .wait_exit(Duration::from_secs(20))
            .expect("manager did not abort");
    assert!(!status.success());
    assert!(f.m.proc.log_text().contains("failover committed"));
    // Restarted without the fault, it completes the failover.
    f.m = Manager::start_on(&mdir, addr, &[]).await;
    let slot_of = |p: &pb::Pool, app: &str| {
        p.placements
            .iter()
            .find(|pl| pl.app == app)
            .map(|pl| pl.home_slot)
    };
    let p = get_pool(&f.m, "x").await;
    let moved = slot_of(&p, "x2").unwrap_or(2);
    wait_slot_on(&f, "x", moved, "node-3").await;
    eventually("FAILOVER_DONE after the restart", DEADLINE, || async {
        kinds(&events_of(&f.m, "x").await)
            .contains(&pb::EventKind::FailoverDone)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn without_a_spare_the_pool_is_degraded_until_a_node_is_free() {
    let mut f = Fleet::start(2, &[]).await;
    create_pool(
        &f.m,
        "d",
        &["node-1", "node-2"],
        vec![
            app("d1", &["sleep", "730001"]),
            app("d2", &["sleep", "730002"]),
        ],
    )
    .await
    .unwrap();
    wait_running(&f.m, "d").await;
    let (_, mut p2) = f.agents.remove("node-2").unwrap();
    p2.kill();
    let degraded = eventually("pool degraded", DEADLINE, || async {
        let p = get_pool(&f.m, "d").await;
        (p.degraded_slots == vec![2]).then_some(p)
    })
    .await;
    assert_eq!(degraded.members[1].node_id, "node-2");
    assert!(kinds(&events_of(&f.m, "d").await).contains(&pb::EventKind::PoolDegraded));
    // A new node joins: the failover runs at once.
    let dir = enroll(&f.m, f.tmp.path(), "node-9").await;
    let p9 = start_agent(&dir, &f.m.addr, &[]);
    f.agents.insert("node-9".into(), (dir, p9));
    let p = wait_slot_on(&f, "d", 2, "node-9").await;
    assert!(p.degraded_slots.is_empty());
}

#[tokio::test]
async fn an_isolated_node_stops_only_the_apps_that_ask_for_it() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let proxy = Proxy::start(m.addr).await;
    let d1 = enroll(&m, tmp.path(), "node-1").await;
    let d2 = enroll(&m, tmp.path(), "node-2").await;
    let mut p1 = start_agent(&d1, &m.addr, &[]);
    let _p2 = start_agent(&d2, &proxy.addr, &["--isolation-lease-ms", "1000"]);
    wait_connected(&m, "node-1").await;
    wait_connected(&m, "node-2").await;
    let mut stop = app("stopper", &["sleep", "740001"]);
    stop.slot = Some(2);
    stop.on_disconnect = pb::OnDisconnect::Stop as i32;
    let mut keep = app("keeper", &["sleep", "740002"]);
    keep.slot = Some(2);
    create_pool(
        &m,
        "i",
        &["node-1", "node-2"],
        vec![app("one", &["sleep", "740003"]), stop, keep],
    )
    .await
    .unwrap();
    wait_running(&m, "i").await;
    // node-2 loses the manager (proxy) and its only peer (node-1 dies).
    p1.kill();
    proxy.cut();
    eventually(
        "the STOP app stopped on the isolated node",
        DEADLINE,
        || async { processes_running("sleep 740001").is_empty().then_some(()) },
    )
    .await;
    assert_eq!(
        processes_running("sleep 740002").len(),
        1,
        "KEEP_RUNNING app was stopped"
    );
    // Back in touch with the manager: the STOP app runs again.
    proxy.restore();
    eventually("the STOP app back", DEADLINE, || async {
        (processes_running("sleep 740001").len() == 1).then_some(())
    })
    .await;
}

/// A manager config file with `body` (TOML) in `dir`; its path as an
/// argument.
fn config_file(dir: &std::path::Path, body: &str) -> String {
    let path = dir.join("manager.toml");
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

/// So many members silent at once is taken for the manager's own problem:
/// with 2 of 3 members crashed (>= failover_pause_percent 50 and >=
/// failover_pause_min_members 2) nobody is failed over and NODE_SUSPECT says
/// why; once one of them is back, the other is failed over.
#[tokio::test]
async fn many_members_silent_at_once_pause_failovers() {
    let cfg_dir = TempDir::new().unwrap();
    let cfg = config_file(
        cfg_dir.path(),
        "failover_pause_percent = 50\nfailover_pause_min_members = 2\n",
    );
    let mut f = Fleet::start(5, &["--config", &cfg]).await;
    create_pool(
        &f.m,
        "p",
        &["node-1", "node-2", "node-3"],
        six_apps(730_000),
    )
    .await
    .unwrap();
    wait_running(&f.m, "p").await;
    let (dir2, mut p2) = f.agents.remove("node-2").unwrap();
    let (_dir3, mut p3) = f.agents.remove("node-3").unwrap();
    p2.kill();
    p3.kill();
    eventually("NODE_SUSPECT: failovers paused", DEADLINE, || async {
        events_of(&f.m, "p")
            .await
            .iter()
            .any(|e| {
                e.kind() == pb::EventKind::NodeSuspect && e.message.contains("failovers paused")
            })
            .then_some(())
    })
    .await;
    // Well past the grace and a recheck: still nobody failed over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let k = kinds(&events_of(&f.m, "p").await);
    assert!(
        !k.contains(&pb::EventKind::FailoverStarted),
        "failed over while paused: {k:?}"
    );
    let p = get_pool(&f.m, "p").await;
    let holders: Vec<&str> = p.members.iter().map(|m| m.node_id.as_str()).collect();
    assert_eq!(holders, ["node-1", "node-2", "node-3"]);
    // node-2 is back: 1 of 3 silent, under the threshold: node-3's slot
    // moves to the first spare.
    let back = start_agent(&dir2, &f.m.addr, &[]);
    f.agents.insert("node-2".into(), (dir2, back));
    wait_slot_on(&f, "p", 3, "node-4").await;
    let p = get_pool(&f.m, "p").await;
    assert_eq!(p.members[1].node_id, "node-2", "node-2 kept its slot");
}

/// A restarted manager gives its fleet `startup_grace_ms` to come back
/// before it fails anyone over on its own word, but not to a member its
/// reconnected peers report unreachable: a member that died while the
/// manager was down is failed over within the grace once its peer is back;
/// the others keep their slots.
#[tokio::test]
async fn a_restarted_manager_fails_over_a_member_its_peers_lost_within_the_grace() {
    let cfg_dir = TempDir::new().unwrap();
    let cfg = config_file(cfg_dir.path(), "startup_grace_ms = 8000\n");
    let mut f = Fleet::start(3, &["--config", &cfg]).await;
    let addr = f.m.addr;
    create_pool(
        &f.m,
        "g",
        &["node-1", "node-2"],
        vec![
            app("g1", &["sleep", "740001"]),
            app("g2", &["sleep", "740002"]),
        ],
    )
    .await
    .unwrap();
    wait_running(&f.m, "g").await;
    f.m.proc.kill();
    let (_d2, mut p2) = f.agents.remove("node-2").unwrap();
    p2.kill();
    let mdir = f.m.dir.clone();
    f.m = Manager::start_on(&mdir, addr, &["--config", &cfg]).await;
    let restarted = std::time::Instant::now();
    wait_connected(&f.m, "node-1").await;
    // node-1 is back and cannot reach node-2: its slot moves to node-3
    // well within the 8 s grace; node-1 keeps its own.
    let p = wait_slot_on(&f, "g", 2, "node-3").await;
    assert!(
        restarted.elapsed() < Duration::from_millis(7000),
        "failed over {:?} after the restart",
        restarted.elapsed()
    );
    assert_eq!(p.members[0].node_id, "node-1");
}
