//! Pools with real daemons and real processes: groups run as OS processes
//! under the right agent, state survives a manager crash, bad requests
//! change nothing, apps change and stop as asked.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;

pub fn app(name: &str, command: &[&str]) -> pb::AppSpec {
    pb::AppSpec {
        name: name.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        resources: Some(pb::Resources {
            cpu_millis: 10,
            memory_mb: 8,
            disk_mb: 0,
            network_mbps: 0,
            disk_io_kbps: 0,
        }),
        offloadable: true,
        ..Default::default()
    }
}

/// A manager with `n` enrolled, running, connected agents `node-1..node-n`.
pub struct Fleet {
    pub tmp: TempDir,
    pub m: Manager,
    pub agents: BTreeMap<String, (AgentDir, Proc)>,
}

impl Fleet {
    pub async fn start(n: usize, manager_args: &[&str]) -> Fleet {
        let tmp = TempDir::new().unwrap();
        let mdir = tmp.path().join("m");
        let m = Manager::start_on(&mdir, "127.0.0.1:0".parse().unwrap(), manager_args).await;
        let mut agents = BTreeMap::new();
        for i in 1..=n {
            let id = format!("node-{i}");
            let dir = enroll(&m, tmp.path(), &id).await;
            let proc = start_agent(&dir, &m.addr, &[]);
            agents.insert(id, (dir, proc));
        }
        for id in agents.keys() {
            wait_connected(&m, id).await;
        }
        Fleet { tmp, m, agents }
    }

    pub fn agent_pid(&self, node: &str) -> i32 {
        self.agents[node].1.pid()
    }
}

pub async fn create_pool(
    m: &Manager,
    name: &str,
    nodes: &[&str],
    apps: Vec<pb::AppSpec>,
) -> Result<pb::Pool, tonic::Status> {
    m.tenant()
        .create_pool(pb::CreatePoolRequest {
            name: name.into(),
            node_ids: nodes.iter().map(|s| s.to_string()).collect(),
            apps,
            policy: None,
            spare_labels: Default::default(),
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn get_pool(m: &Manager, name: &str) -> pb::Pool {
    m.tenant()
        .get_pool(pb::GetPoolRequest { name: name.into() })
        .await
        .expect("GetPool")
        .into_inner()
}

/// Waits until every placement of the pool runs (with a pid).
pub async fn wait_running(m: &Manager, name: &str) -> pb::Pool {
    eventually(&format!("all apps of {name} running"), DEADLINE, || async {
        let p = get_pool(m, name).await;
        p.placements
            .iter()
            .all(|pl| pl.state() == pb::AppState::Running && pl.pid != 0)
            .then_some(p)
    })
    .await
}

fn seven_apps() -> Vec<pb::AppSpec> {
    let mut apps: Vec<pb::AppSpec> = (1..=7)
        .map(|i| app(&format!("app-{i}"), &["sleep", &format!("{}", 100_000 + i)]))
        .collect();
    apps[6].slot = Some(2);
    apps
}

#[tokio::test]
async fn groups_run_as_processes_on_their_nodes_and_survive_a_manager_crash() {
    let mut f = Fleet::start(4, &[]).await;
    let created = create_pool(&f.m, "p", &["node-1", "node-2", "node-3"], seven_apps())
        .await
        .unwrap();
    assert_eq!(created.members.len(), 3);
    let pool = wait_running(&f.m, "p").await;

    // Group i on node i, checked in the process tree: each app's process is
    // a child of the agent of the member holding its slot, and runs the
    // app's command.
    let slot_node: BTreeMap<u32, String> = pool
        .members
        .iter()
        .map(|m| (m.slot, m.node_id.clone()))
        .collect();
    for (i, m) in pool.members.iter().enumerate() {
        assert_eq!(m.slot as usize, i + 1);
        assert_eq!(m.node_id, format!("node-{}", i + 1));
    }
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for pl in &pool.placements {
        let host = &slot_node[&pl.home_slot];
        assert_eq!(&pl.host_node_id, host, "{}", pl.app);
        let pid = pl.pid as i32;
        assert_eq!(
            stat_field(pid, 4),
            Some(f.agent_pid(host) as i64),
            "{} not under {host}'s agent",
            pl.app
        );
        let spec = pool.apps.iter().find(|a| a.name == pl.app).unwrap();
        assert_eq!(cmdline(pid), spec.command.join(" "));
        // Exactly one process per app on the whole machine.
        assert_eq!(
            processes_running(&spec.command.join(" ")).len(),
            1,
            "{}",
            pl.app
        );
        *per_node.entry(host.clone()).or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "every group non-empty: {per_node:?}");
    let explicit = pool.placements.iter().find(|p| p.app == "app-7").unwrap();
    assert_eq!(explicit.home_slot, 2);
    // The spare runs nothing and is still FREE.
    let spare = get_node(&mut f.m.tenant(), "node-4").await.unwrap();
    assert_eq!(spare.state(), pb::NodeState::Free);
    let spare_pid = f.agent_pid("node-4") as i64;
    assert!(
        pool.placements
            .iter()
            .all(|p| stat_field(p.pid as i32, 4) != Some(spare_pid))
    );
    for id in ["node-1", "node-2", "node-3"] {
        let n = get_node(&mut f.m.tenant(), id).await.unwrap();
        assert_eq!((n.state(), n.pool.as_str()), (pb::NodeState::Member, "p"));
    }

    // The chain: the pool CA verifies against the root with openssl, and
    // every member certificate against the pool CA with the members' own
    // check. openssl, like any RFC 5280 verifier, refuses the members
    // through the root: the pool CA's name constraint permits only its
    // pool's SPIFFE path, which such verifiers cannot apply.
    let dir = f.tmp.path();
    std::fs::write(dir.join("pool-ca.pem"), &pool.ca_pem).unwrap();
    let out = run(Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(f.m.ca())
        .arg(dir.join("pool-ca.pem")));
    assert!(
        out.ok && out.stdout.contains("OK"),
        "openssl verify pool CA: {}{}",
        out.stdout,
        out.stderr
    );
    let pool_ca = edgepool_common::tls::certs_from_pem(&pool.ca_pem, "pool CA").unwrap();
    let check = edgepool_common::trust::MemberCheck::new(
        &pool_ca[0],
        edgepool_common::trust::pool_prefix("edgepool.local", "default", "p"),
    )
    .unwrap();
    for m in &pool.members {
        let cert = dir.join(format!("member-{}.pem", m.slot));
        std::fs::write(&cert, &m.cert_pem).unwrap();
        let leaf = edgepool_common::tls::certs_from_pem(&m.cert_pem, "member").unwrap();
        let identity = check
            .server(&leaf[0], rustls::pki_types::UnixTime::now())
            .unwrap_or_else(|e| panic!("member {} does not verify: {e}", m.slot));
        assert!(
            matches!(identity, edgepool_common::identity::Identity::Member { slot, .. } if slot == m.slot)
        );
        let out = run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(f.m.ca())
            .arg("-untrusted")
            .arg(dir.join("pool-ca.pem"))
            .arg(&cert));
        assert!(
            !out.ok && out.stderr.contains("permitted subtree violation"),
            "openssl verify slot {}: {}{}",
            m.slot,
            out.stdout,
            out.stderr
        );
        // Not without the pool CA: the chain really goes through it.
        let out = run(Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(f.m.ca())
            .arg(&cert));
        assert!(!out.ok);
    }

    // kill -9 the manager and restart it: the pool is identical and no app
    // was restarted.
    let addr = f.m.addr;
    let mdir = f.m.dir.clone();
    f.m.proc.kill();
    f.m = Manager::start_on(&mdir, addr, &[]).await;
    let after = wait_running(&f.m, "p").await;
    let key = |p: &pb::Pool| {
        (
            p.ca_pem.clone(),
            p.generation,
            p.members.clone(),
            p.apps.clone(),
            p.placements
                .iter()
                .map(|pl| {
                    (
                        pl.app.clone(),
                        pl.home_slot,
                        pl.host_node_id.clone(),
                        pl.pid,
                        pl.restarts,
                    )
                })
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(key(&after), key(&pool));

    // The events were recorded durably: a replay from the start shows them.
    let mut events =
        f.m.tenant()
            .watch_events(pb::WatchEventsRequest {
                pool: "p".into(),
                after_seq: 0,
                from_start: true,
            })
            .await
            .unwrap()
            .into_inner();
    let mut kinds = Vec::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), events.message()).await
    {
        kinds.push(e.kind());
    }
    assert_eq!(
        kinds.first(),
        Some(&pb::EventKind::PoolCreated),
        "{kinds:?}"
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == pb::EventKind::AppStarted)
            .count(),
        7,
        "{kinds:?}"
    );
}

#[tokio::test]
async fn invalid_pool_requests_are_refused_and_change_nothing() {
    let f = Fleet::start(4, &[]).await;
    create_pool(
        &f.m,
        "existing",
        &["node-1", "node-2"],
        vec![
            app("e1", &["sleep", "200001"]),
            app("e2", &["sleep", "200002"]),
        ],
    )
    .await
    .unwrap();
    wait_running(&f.m, "existing").await;
    // Another tenant's node, to be named by this tenant.
    let mut other = f.m.other_tenant("other");
    let token = create_token(&mut other, 600).await;
    let out = join(&f.m, &f.tmp.path().join("theirs"), "theirs", &token, &[]);
    assert!(out.ok, "{}", out.stderr);
    let state_before = std::fs::read(f.m.dir.join("state.redb")).unwrap();
    let pools_before =
        f.m.tenant()
            .list_pools(pb::ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pools
            .len();

    let ok_apps = || vec![app("a", &["sleep", "1"]), app("b", &["sleep", "1"])];
    let req = |name: &str, nodes: &[&str], apps: Vec<pb::AppSpec>| pb::CreatePoolRequest {
        name: name.into(),
        node_ids: nodes.iter().map(|s| s.to_string()).collect(),
        apps,
        policy: None,
        spare_labels: Default::default(),
    };
    let mut big = ok_apps();
    big[0].resources = Some(pb::Resources {
        cpu_millis: 1_000_000_000,
        ..Default::default()
    });
    let mut dup = ok_apps();
    dup[1].name = "a".into();
    let mut empty_cmd = ok_apps();
    empty_cmd[0].command.clear();
    let mut bad_slot = ok_apps();
    bad_slot[1].slot = Some(3);
    let mut bad_policy = req("pol", &["node-3", "node-4"], ok_apps());
    bad_policy.policy = Some(pb::Policy {
        cpu: Some(pb::Threshold {
            high: 0.5,
            low: 0.9,
        }),
        ..Default::default()
    });
    use tonic::Code::{FailedPrecondition as FP, InvalidArgument as IA};
    let cases: Vec<(pb::CreatePoolRequest, tonic::Code, &str)> = vec![
        (req("", &["node-3", "node-4"], ok_apps()), IA, "name"),
        (
            req("Bad Name", &["node-3", "node-4"], ok_apps()),
            IA,
            "name",
        ),
        (
            req("existing", &["node-3", "node-4"], ok_apps()),
            FP,
            "name",
        ),
        (req("one", &["node-3"], ok_apps()), IA, "node_ids"),
        (
            req("dup", &["node-3", "node-3"], ok_apps()),
            IA,
            "node_ids[1]",
        ),
        (
            req("ghost", &["node-3", "nope"], ok_apps()),
            IA,
            "node_ids[1]",
        ),
        (
            req("steal", &["theirs", "node-3"], ok_apps()),
            IA,
            "node_ids[0]",
        ),
        (
            req("busy", &["node-1", "node-3"], ok_apps()),
            FP,
            "node_ids[0]",
        ),
        (
            req(
                "few",
                &["node-3", "node-4"],
                vec![app("a", &["sleep", "1"])],
            ),
            IA,
            "apps",
        ),
        (
            req("dupapp", &["node-3", "node-4"], dup),
            IA,
            "apps[1].name",
        ),
        (
            req("nocmd", &["node-3", "node-4"], empty_cmd),
            IA,
            "apps[0].command",
        ),
        (
            req("slot", &["node-3", "node-4"], bad_slot),
            IA,
            "apps[1].slot",
        ),
        (req("huge", &["node-3", "node-4"], big), FP, "apps"),
        (bad_policy, IA, "policy.cpu"),
    ];
    let n = cases.len();
    for (r, code, field) in cases {
        let name = r.name.clone();
        let err = f.m.tenant().create_pool(r).await.unwrap_err();
        assert_eq!(err.code(), code, "{name}: {err}");
        assert!(
            err.message().starts_with(field),
            "{name}: {:?} does not name {field}",
            err.message()
        );
    }
    // UpdateApps and DeletePool refusals too.
    let err =
        f.m.tenant()
            .update_apps(pb::UpdateAppsRequest {
                pool: "nope".into(),
                apps: ok_apps(),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let err =
        f.m.tenant()
            .update_apps(pb::UpdateAppsRequest {
                pool: "existing".into(),
                apps: vec![app("x", &[])],
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), IA, "{err}");
    let err =
        f.m.tenant()
            .delete_pool(pb::DeletePoolRequest {
                name: "nope".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    // Another tenant can neither see nor delete this tenant's pool.
    let err = other
        .delete_pool(pb::DeletePoolRequest {
            name: "existing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        other
            .list_pools(pb::ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pools
            .is_empty()
    );
    assert!(n >= 10);

    // Nothing changed: same durable state byte for byte, same pools, the
    // nodes named in refused requests are still free.
    assert!(
        std::fs::read(f.m.dir.join("state.redb")).unwrap() == state_before,
        "refused requests changed the store"
    );
    let pools =
        f.m.tenant()
            .list_pools(pb::ListPoolsRequest {})
            .await
            .unwrap()
            .into_inner()
            .pools;
    assert_eq!(pools.len(), pools_before);
    for id in ["node-3", "node-4"] {
        assert_eq!(
            get_node(&mut f.m.tenant(), id).await.unwrap().state(),
            pb::NodeState::Free
        );
    }
}

#[tokio::test]
async fn update_apps_restarts_only_what_changed_and_delete_stops_everything() {
    let f = Fleet::start(2, &[]).await;
    let apps = vec![
        app("keep", &["sleep", "300001"]),
        app("change", &["sleep", "300002"]),
        app("drop", &["sleep", "300003"]),
    ];
    create_pool(&f.m, "u", &["node-1", "node-2"], apps.clone())
        .await
        .unwrap();
    let before = wait_running(&f.m, "u").await;
    let pid = |p: &pb::Pool, app: &str| {
        p.placements
            .iter()
            .find(|pl| pl.app == app)
            .map(|pl| pl.pid)
            .unwrap_or(0)
    };

    let mut events =
        f.m.tenant()
            .watch_events(pb::WatchEventsRequest {
                pool: "u".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    let mut changed = apps[1].clone();
    changed.env.insert("MODE".into(), "two".into());
    let new_apps = vec![apps[0].clone(), changed, app("added", &["sleep", "300004"])];
    f.m.tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "u".into(),
            apps: new_apps,
        })
        .await
        .unwrap();
    let after = eventually("update applied", DEADLINE, || async {
        let p = get_pool(&f.m, "u").await;
        let ok = p.placements.len() == 3
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running && pl.pid != 0)
            && pid(&p, "change") != pid(&before, "change");
        ok.then_some(p)
    })
    .await;
    assert_eq!(
        pid(&after, "keep"),
        pid(&before, "keep"),
        "unchanged app was restarted"
    );
    assert!(
        processes_running("sleep 300003").is_empty(),
        "removed app still runs"
    );
    let env = std::fs::read(format!("/proc/{}/environ", pid(&after, "change"))).unwrap();
    assert!(String::from_utf8_lossy(&env).contains("MODE=two"));
    // Every process UpdateApps stopped has its APP_STOPPED, with its pid.
    for (app, old_pid) in [
        ("change", pid(&before, "change")),
        ("drop", pid(&before, "drop")),
    ] {
        wait_event(&f.m, "u", &format!("APP_STOPPED of {app}"), DEADLINE, |e| {
            e.kind() == pb::EventKind::AppStopped
                && e.app == app
                && e.message.starts_with(&format!("pid {old_pid}"))
        })
        .await;
    }
    // The watcher saw the update live.
    let mut kinds = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(2), events.message()).await
    {
        kinds.push(e.kind());
        if kinds.contains(&pb::EventKind::AppsUpdated) && kinds.contains(&pb::EventKind::AppStopped)
        {
            break;
        }
    }
    assert!(kinds.contains(&pb::EventKind::AppsUpdated), "{kinds:?}");

    f.m.tenant()
        .delete_pool(pb::DeletePoolRequest { name: "u".into() })
        .await
        .unwrap();
    eventually("apps stopped after DeletePool", DEADLINE, || async {
        let gone = ["sleep 300001", "sleep 300002", "sleep 300004"]
            .iter()
            .all(|c| processes_running(c).is_empty());
        gone.then_some(())
    })
    .await;
    for id in ["node-1", "node-2"] {
        let n = get_node(&mut f.m.tenant(), id).await.unwrap();
        assert_eq!((n.state(), n.pool.as_str()), (pb::NodeState::Free, ""));
    }
}

/// The README's UpdateApps example: `web` (free) and `db` (slot 2) shared
/// slot 2, `queue` was alone in slot 1 and is removed. `web` restarts
/// anyway (new command), so it moves into slot 1; `db` stays untouched.
#[tokio::test]
async fn update_apps_moves_a_restarting_app_into_an_emptied_group() {
    let f = Fleet::start(2, &[]).await;
    let mut db = app("db", &["sleep", "310001"]);
    db.slot = Some(2);
    let mut queue = app("queue", &["sleep", "310002"]);
    queue.resources = Some(pb::Resources {
        cpu_millis: 100,
        memory_mb: 64,
        ..Default::default()
    });
    let web = app("web", &["sleep", "310003"]);
    create_pool(
        &f.m,
        "shop",
        &["node-1", "node-2"],
        vec![web, db.clone(), queue],
    )
    .await
    .unwrap();
    let before = wait_running(&f.m, "shop").await;
    let placement = |p: &pb::Pool, app: &str| {
        p.placements
            .iter()
            .find(|pl| pl.app == app)
            .map(|pl| (pl.home_slot, pl.pid))
            .unwrap_or_default()
    };
    assert_eq!(
        placement(&before, "web").0,
        2,
        "the partitioner put web with db"
    );
    assert_eq!(placement(&before, "queue").0, 1);

    db.slot = None;
    let new_web = app("web", &["sleep", "310004"]);
    f.m.tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "shop".into(),
            apps: vec![new_web, db],
        })
        .await
        .expect("the README's UpdateApps is accepted");
    let after = eventually("web restarted in slot 1", DEADLINE, || async {
        let p = get_pool(&f.m, "shop").await;
        let ok = p.placements.len() == 2
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running && pl.pid != 0)
            && placement(&p, "web").0 == 1;
        ok.then_some(p)
    })
    .await;
    assert_eq!(
        placement(&after, "db"),
        placement(&before, "db"),
        "db was touched"
    );
    for (app, old_pid) in [
        ("web", placement(&before, "web").1),
        ("queue", placement(&before, "queue").1),
    ] {
        wait_event(
            &f.m,
            "shop",
            &format!("APP_STOPPED of {app}"),
            DEADLINE,
            |e| {
                e.kind() == pb::EventKind::AppStopped
                    && e.app == app
                    && e.message.starts_with(&format!("pid {old_pid}"))
            },
        )
        .await;
    }
    eventually("old processes gone", DEADLINE, || async {
        let gone = processes_running("sleep 310002").is_empty()
            && processes_running("sleep 310003").is_empty();
        gone.then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_restarted_agent_adopts_its_apps_without_duplicates() {
    let mut f = Fleet::start(2, &[]).await;
    create_pool(
        &f.m,
        "a",
        &["node-1", "node-2"],
        vec![
            app("x", &["sleep", "400001"]),
            app("y", &["sleep", "400002"]),
        ],
    )
    .await
    .unwrap();
    let before = wait_running(&f.m, "a").await;
    // Crash only the agent process of node-1 (not its session): its apps
    // keep running, orphaned.
    let (dir, proc) = f.agents.remove("node-1").unwrap();
    let agent_pid = proc.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut proc = proc;
    let _ = proc.child.wait();
    let orphan: Vec<u32> = before
        .placements
        .iter()
        .filter(|p| p.host_node_id == "node-1")
        .map(|p| p.pid)
        .collect();
    assert!(!orphan.is_empty());
    // Restart it with the manager unreachable at first is not needed here:
    // the saved assignment alone makes it adopt.
    let restarted = start_agent(&dir, &f.m.addr, &[]);
    let after = eventually("agent back with its apps", DEADLINE, || async {
        let p = get_pool(&f.m, "a").await;
        let n = get_node(&mut f.m.tenant(), "node-1").await?;
        (n.connected
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running))
        .then_some(p)
    })
    .await;
    for pl in after
        .placements
        .iter()
        .filter(|p| p.host_node_id == "node-1")
    {
        assert!(
            orphan.contains(&pl.pid),
            "{} was restarted instead of adopted",
            pl.app
        );
        let spec = after.apps.iter().find(|a| a.name == pl.app).unwrap();
        assert_eq!(
            processes_running(&spec.command.join(" ")).len(),
            1,
            "duplicate {}",
            pl.app
        );
    }
    // Clean up the orphans with the old session when the test ends.
    drop(proc);
    drop(restarted);
    for pid in orphan {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[tokio::test]
async fn update_policy_bumps_the_version_and_refuses_bad_policies() {
    let f = Fleet::start(2, &[]).await;
    create_pool(
        &f.m,
        "pol",
        &["node-1", "node-2"],
        vec![
            app("p1", &["sleep", "900001"]),
            app("p2", &["sleep", "900002"]),
        ],
    )
    .await
    .unwrap();
    let before = get_pool(&f.m, "pol").await;
    assert_eq!(before.policy.as_ref().unwrap().version, 1);
    let new = pb::Policy {
        cpu: Some(pb::Threshold {
            high: 0.7,
            low: 0.4,
        }),
        target: pb::TargetMode::Spread as i32,
        sustain_seconds: 5,
        ..Default::default()
    };
    let after =
        f.m.tenant()
            .update_policy(pb::UpdatePolicyRequest {
                pool: "pol".into(),
                policy: Some(new),
            })
            .await
            .unwrap()
            .into_inner();
    let p = after.policy.unwrap();
    assert_eq!(
        (p.version, p.target(), p.sustain_seconds),
        (2, pb::TargetMode::Spread, 5)
    );
    assert_eq!(p.cpu.unwrap().high, 0.7);
    // Refused: low above high; nothing changes.
    let bad = pb::Policy {
        memory: Some(pb::Threshold {
            high: 0.3,
            low: 0.6,
        }),
        ..Default::default()
    };
    let err =
        f.m.tenant()
            .update_policy(pb::UpdatePolicyRequest {
                pool: "pol".into(),
                policy: Some(bad),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("policy.memory"), "{err}");
    assert_eq!(get_pool(&f.m, "pol").await.policy.unwrap().version, 2);
    // Another tenant cannot touch it.
    let err =
        f.m.other_tenant("other")
            .update_policy(pb::UpdatePolicyRequest {
                pool: "pol".into(),
                policy: Some(pb::Policy::default()),
            })
            .await
            .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// Many nodes report at the same moment (every app of a 6-member pool
/// replaced at once): each stop and each start is recorded exactly once.
#[tokio::test]
async fn concurrent_reports_neither_lose_nor_duplicate_events() {
    let f = Fleet::start(6, &[]).await;
    let nodes: Vec<String> = (1..=6).map(|i| format!("node-{i}")).collect();
    let ids: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let spec = |i: u32, round: u32| {
        let mut a = app(
            &format!("c{i}"),
            &["sleep", &format!("{}", 330_000 + round * 100 + i)],
        );
        a.slot = Some(i / 2 + 1);
        a
    };
    create_pool(&f.m, "many", &ids, (0..12).map(|i| spec(i, 0)).collect())
        .await
        .unwrap();
    wait_running(&f.m, "many").await;
    let updated = retained_events(&f.m, "many", Duration::from_millis(300))
        .await
        .last()
        .map(|e| e.seq)
        .unwrap_or(0);
    f.m.tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "many".into(),
            apps: (0..12).map(|i| spec(i, 1)).collect(),
        })
        .await
        .unwrap();
    eventually("every app replaced", DEADLINE, || async {
        let p = get_pool(&f.m, "many").await;
        let done = (0..12).all(|i| processes_running(&format!("sleep {}", 330_100 + i)).len() == 1)
            && p.placements
                .iter()
                .all(|pl| pl.state() == pb::AppState::Running && pl.pid != 0);
        done.then_some(())
    })
    .await;
    // Reports keep coming every second: give them time to (not) add more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let events: Vec<pb::Event> = retained_events(&f.m, "many", Duration::from_millis(300))
        .await
        .into_iter()
        .filter(|e| e.seq > updated)
        .collect();
    for kind in [pb::EventKind::AppStopped, pb::EventKind::AppStarted] {
        let mut apps: Vec<&str> = events
            .iter()
            .filter(|e| e.kind() == kind)
            .map(|e| e.app.as_str())
            .collect();
        apps.sort();
        let mut want: Vec<String> = (0..12).map(|i| format!("c{i}")).collect();
        want.sort();
        assert_eq!(apps, want, "{kind:?} events: {events:#?}");
    }
}
