//! Several manager replicas on one real etcd: a leader killed in the middle
//! of a node failover (the next leader completes it, once), and rounds of
//! random replica kills while member nodes crash and come back (never two
//! owners of an app, no pool or app lost, every failover done).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::pools::{app, create_pool, get_pool};

fn replica_args(url: &str, prefix: &str) -> Vec<String> {
    [
        "--store",
        "etcd",
        "--etcd-endpoints",
        url,
        "--etcd-prefix",
        prefix,
        "--etcd-lease-ttl-seconds",
        "2",
        // Members that die while a new leader takes over are failed over
        // after this (the default 15 s suits a whole fleet coming back).
        "--startup-grace-ms",
        "2000",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The replica that says it leads, if exactly one of `replicas` does.
async fn the_leader(replicas: &[Option<Manager>]) -> Option<usize> {
    let mut leaders = Vec::new();
    for (i, r) in replicas.iter().enumerate() {
        if let Some(m) = r
            && leader_status(&m.addr.to_string(), &m.ca()).await == Some(1)
        {
            leaders.push(i);
        }
    }
    (leaders.len() == 1).then(|| leaders[0])
}

async fn wait_leads(m: &Manager) {
    eventually("the first replica to lead", DEADLINE, || async {
        (leader_status(&m.addr.to_string(), &m.ca()).await == Some(1)).then_some(())
    })
    .await;
}

fn count(events: &[pb::Event], kind: pb::EventKind) -> usize {
    events.iter().filter(|e| e.kind() == kind).count()
}

/// Every slot held by a distinct connected node other than `not`, and
/// every app running (one process) on its slot's node.
async fn settled(m: &Manager, pool: &str, apps: &[(String, String)], not: Option<&str>) -> bool {
    let Ok(p) = m
        .tenant()
        .get_pool(pb::GetPoolRequest { name: pool.into() })
        .await
        .map(|r| r.into_inner())
    else {
        return false;
    };
    let mut holders: Vec<&str> = p.members.iter().map(|x| x.node_id.as_str()).collect();
    holders.sort();
    holders.dedup();
    if holders.len() != p.members.len() || not.is_some_and(|n| holders.contains(&n)) {
        return false;
    }
    let mut t = m.tenant();
    for id in &holders {
        if !get_node(&mut t, id).await.is_some_and(|n| n.connected) {
            return false;
        }
    }
    apps.iter().all(|(name, cmd)| {
        let Some(pl) = p.placements.iter().find(|pl| pl.app == *name) else {
            return false;
        };
        let home = p.members.iter().find(|x| x.slot == pl.home_slot);
        pl.state() == pb::AppState::Running
            && home.is_some_and(|h| h.node_id == pl.host_node_id)
            && processes_running(cmd).len() == 1
    })
}

#[tokio::test]
async fn a_leader_killed_in_the_middle_of_a_failover_leaves_it_to_the_next_once() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = replica_args(&etcd.url, "/ep-mid");
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    // The leader dies right after it commits a failover, before it tells
    // any node.
    let mut a = Manager::start_replica(
        &a_dir,
        a_addr,
        &strs(&args),
        &[("EDGEPOOL_FAULT", "abort-after-failover-commit")],
    )
    .await;
    wait_leads(&a).await;
    copy_replica_files(&a_dir, &b_dir);
    let b = Manager::start_replica(&b_dir, b_addr, &strs(&args), &[]).await;
    let managers = format!("{a_addr},{b_addr}");
    let mut agents = BTreeMap::new();
    for i in 1..=3 {
        let id = format!("node-{i}");
        let dir = enroll(&a, tmp.path(), &id).await;
        let p = start_agent_on(&dir, &managers, &[]);
        agents.insert(id.clone(), p);
        wait_connected(&a, &id).await;
    }
    let apps = vec![
        ("m1".to_string(), "sleep 760001".to_string()),
        ("m2".to_string(), "sleep 760002".to_string()),
    ];
    create_pool(
        &a,
        "x",
        &["node-1", "node-2"],
        vec![
            app("m1", &["sleep", "760001"]),
            app("m2", &["sleep", "760002"]),
        ],
    )
    .await
    .unwrap();
    eventually("pool x running", DEADLINE, || async {
        settled(&a, "x", &apps, None).await.then_some(())
    })
    .await;
    let watch = OwnerWatch::start(apps.iter().map(|(_, c)| c.clone()).collect());

    // node-2 dies; the leader commits its failover and dies with it.
    let slot2 = get_pool(&a, "x").await.members[1].clone();
    assert_eq!(slot2.node_id, "node-2");
    agents.remove("node-2");
    let status = a
        .proc
        .wait_exit(Duration::from_secs(20))
        .expect("the leader did not abort after the failover commit");
    assert!(!status.success());
    assert!(a.proc.log_text().contains("failover committed"));

    // The standby leads and finishes that failover: slot 2 on node-3, its
    // app running there, the event log saying it started and ended once.
    eventually("the standby to lead", DEADLINE, || {
        let (b, ca) = (b_addr.to_string(), b.ca());
        async move { (leader_status(&b, &ca).await == Some(1)).then_some(()) }
    })
    .await;
    eventually("slot 2 done on node-3", DEADLINE, || async {
        settled(&b, "x", &apps, Some("node-2")).await.then_some(())
    })
    .await;
    let p = get_pool(&b, "x").await;
    assert_eq!(p.members[1].node_id, "node-3");
    assert_eq!(p.members[1].generation, slot2.generation + 1);
    eventually("FAILOVER_DONE", DEADLINE, || async {
        let e = retained_events(&b, "x", Duration::from_millis(300)).await;
        (count(&e, pb::EventKind::FailoverDone) >= 1).then_some(())
    })
    .await;
    // Nothing more happens to it later.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let e = retained_events(&b, "x", Duration::from_millis(300)).await;
    assert_eq!(count(&e, pb::EventKind::FailoverStarted), 1, "{e:?}");
    assert_eq!(count(&e, pb::EventKind::FailoverDone), 1, "{e:?}");
    assert_eq!(get_pool(&b, "x").await.generation, p.generation);
    assert!(
        watch.worst().values().all(|n| *n <= 1),
        "{:?}",
        watch.worst()
    );
    drop(agents);
}

/// Rounds (100, or `EDGEPOOL_REPLICA_ROUNDS`) of: kill -9 a random replica
/// of three (the leader a third of the time), restart it, and every fourth
/// round crash a random node (agent and apps), restarted two rounds later.
/// After each round the replicas settle on one leader and the pool on
/// distinct live members with every app running once; all along, no app
/// ever runs twice.
#[tokio::test]
async fn random_replica_kills_while_members_crash_lose_nothing() {
    let rounds: usize = std::env::var("EDGEPOOL_REPLICA_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut seed: u64 = std::env::var("EDGEPOOL_REPLICA_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
                | 1
        });
    eprintln!("replica soak: {rounds} rounds, EDGEPOOL_REPLICA_SEED={seed}");
    let mut random = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut tmp = TempDir::new().unwrap();
    // EDGEPOOL_TEST_KEEP=1 keeps the logs of a failed run.
    tmp.disable_cleanup(std::env::var_os("EDGEPOOL_TEST_KEEP").is_some());
    eprintln!("replica soak: in {}", tmp.path().display());
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = replica_args(&etcd.url, "/ep-soak");
    let addrs = [free_addr(), free_addr(), free_addr()];
    let dirs: Vec<PathBuf> = (1..=3).map(|i| tmp.path().join(format!("m-{i}"))).collect();
    let mut replicas: Vec<Option<Manager>> = vec![None, None, None];
    let first = Manager::start_replica(&dirs[0], addrs[0], &strs(&args), &[]).await;
    wait_leads(&first).await;
    replicas[0] = Some(first);
    for i in 1..3 {
        copy_replica_files(&dirs[0], &dirs[i]);
        replicas[i] = Some(Manager::start_replica(&dirs[i], addrs[i], &strs(&args), &[]).await);
    }
    let managers = addrs.map(|a| a.to_string()).join(",");
    let first = replicas[0].as_ref().expect("replica 1");
    let mut agent_dirs = Vec::new();
    let mut agents: Vec<Option<Proc>> = Vec::new();
    for i in 1..=6 {
        let dir = enroll(first, tmp.path(), &format!("node-{i}")).await;
        agents.push(Some(start_agent_on(&dir, &managers, &[])));
        agent_dirs.push(dir);
    }
    for i in 1..=6 {
        wait_connected(first, &format!("node-{i}")).await;
    }
    // Argv unique to this run: the owner watch counts processes by it.
    let base = 7_700_000 + (random(10_000) as u64) * 10;
    let apps: Vec<(String, String)> = (1..=3)
        .map(|i| (format!("s{i}"), format!("sleep {}", base + i)))
        .collect();
    create_pool(
        first,
        "soak",
        &["node-1", "node-2", "node-3"],
        apps.iter()
            .map(|(n, c)| {
                let argv: Vec<&str> = c.split(' ').collect();
                app(n, &argv)
            })
            .collect(),
    )
    .await
    .unwrap();
    eventually("pool running", DEADLINE, || async {
        settled(first, "soak", &apps, None).await.then_some(())
    })
    .await;
    let watch = OwnerWatch::start(apps.iter().map(|(_, c)| c.clone()).collect());

    let mut down: Option<(usize, usize)> = None;
    let (mut leader_kills, mut member_crashes, mut takeovers) = (0, 0, Vec::new());
    for round in 0..rounds {
        let leader = eventually("one leader", DEADLINE, || the_leader(&replicas)).await;
        // A node crashes (every fourth round, one at a time).
        if round % 4 == 1 && down.is_none() {
            let k = random(6);
            let id = format!("node-{}", k + 1);
            let m = replicas[leader].as_ref().expect("leader");
            if get_pool(m, "soak")
                .await
                .members
                .iter()
                .any(|x| x.node_id == id)
            {
                member_crashes += 1;
            }
            agents[k] = None;
            down = Some((k, round));
        }
        // A replica dies; a leader is there again (the same, or another
        // within the lease), and the dead one comes back as a standby.
        let victim = random(3);
        eprintln!(
            "round {round}: leader m-{}, killing m-{}, node down: {down:?}",
            leader + 1,
            victim + 1
        );
        replicas[victim] = None;
        let killed = Instant::now();
        let now_leader = eventually("a leader after the kill", DEADLINE, || {
            the_leader(&replicas)
        })
        .await;
        if victim == leader {
            leader_kills += 1;
            takeovers.push(killed.elapsed());
            assert_ne!(now_leader, victim);
            assert!(
                killed.elapsed() < Duration::from_secs(5),
                "round {round}: a new leader {:?} after the kill",
                killed.elapsed()
            );
        }
        replicas[victim] =
            Some(Manager::start_replica(&dirs[victim], addrs[victim], &strs(&args), &[]).await);
        if let Some((k, at)) = down
            && round >= at + 2
        {
            agents[k] = Some(start_agent_on(&agent_dirs[k], &managers, &[]));
            down = None;
        }
        let not = down.map(|(k, _)| format!("node-{}", k + 1));
        eventually(
            &format!("round {round} settled"),
            Duration::from_secs(60),
            || async {
                let l = the_leader(&replicas).await?;
                let m = replicas[l].as_ref()?;
                settled(m, "soak", &apps, not.as_deref())
                    .await
                    .then_some(())
            },
        )
        .await;
        assert!(
            watch.worst().values().all(|n| *n <= 1),
            "round {round}: an app ran twice: {:?}",
            watch.worst()
        );
    }
    // Every failover that started finished, none for a node that did not
    // crash, and the pool still has every app.
    let l = the_leader(&replicas).await.expect("a leader");
    let m = replicas[l].as_ref().expect("leader");
    let e = retained_events(m, "soak", Duration::from_millis(500)).await;
    let (started, done) = (
        count(&e, pb::EventKind::FailoverStarted),
        count(&e, pb::EventKind::FailoverDone),
    );
    takeovers.sort();
    eprintln!(
        "replica soak: {rounds} rounds, {leader_kills} leader kills (takeover median {:?}, max {:?}), {member_crashes} member crashes, {started} failovers started, {done} done",
        takeovers.get(takeovers.len() / 2),
        takeovers.last()
    );
    assert_eq!(started, done, "{e:?}");
    assert!(
        started <= member_crashes,
        "{started} failovers for {member_crashes} member crashes"
    );
    let p = get_pool(m, "soak").await;
    assert_eq!(p.apps.len(), 3);
    assert!(
        watch.worst().values().all(|n| *n == 1),
        "{:?}",
        watch.worst()
    );
    drop(agents);
    drop(replicas);
}
