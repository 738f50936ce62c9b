//! Threshold scheduling with real load: a node over a threshold moves apps
//! to peers on its own (SINGLE and SPREAD), for CPU, memory, disk space,
//! network and disk I/O, also while the manager is down, and a peer at its
//! own threshold refuses. The load comes from the real `edgepool-load` program.

use std::collections::BTreeMap;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::pools::{Fleet, get_pool, wait_running};

/// Capacities small enough for a test's load to cross thresholds; the
/// resources a test does not exercise get large capacities.
pub(crate) fn agent_args(cpu: u64, mem: u64, disk: u64, net: u64) -> Vec<String> {
    [
        ("--cpu-millis", cpu),
        ("--memory-mb", mem),
        ("--disk-mb", disk),
        ("--network-mbps", net),
        ("--scheduler-interval-ms", 300),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .chain(["--network-accounting".to_string(), "process".to_string()])
    .collect()
}

async fn fleet(n: usize, args: &[String]) -> Fleet {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agents = BTreeMap::new();
    for i in 1..=n {
        let id = format!("node-{i}");
        let dir = enroll(&m, tmp.path(), &id).await;
        let p = start_agent(&dir, &m.addr, &args);
        agents.insert(id.clone(), (dir, p));
        wait_connected(&m, &id).await;
    }
    Fleet { tmp, m, agents }
}

/// An app running `edgepool-load` with `args`, in `slot`.
pub(crate) fn load(
    name: &str,
    slot: u32,
    args: &[&str],
    offloadable: bool,
    priority: i32,
) -> pb::AppSpec {
    let mut command = vec![bin("edgepool-load").display().to_string()];
    command.extend(args.iter().map(|s| s.to_string()));
    command.push("--tag".into());
    command.push(name.into());
    pb::AppSpec {
        name: name.into(),
        command,
        slot: Some(slot),
        offloadable,
        priority,
        ..Default::default()
    }
}

pub(crate) fn sleeper(name: &str, slot: u32) -> pb::AppSpec {
    pb::AppSpec {
        name: name.into(),
        command: vec!["sleep".into(), "100000".into()],
        slot: Some(slot),
        ..Default::default()
    }
}

fn th(high: f64, low: f64) -> Option<pb::Threshold> {
    Some(pb::Threshold { high, low })
}

/// A policy watching `resource` (high/low), with the others out of the way.
pub(crate) fn policy(
    resource: &str,
    high: f64,
    low: f64,
    target: pb::TargetMode,
    sustain: u32,
) -> pb::Policy {
    let quiet = th(0.99, 0.98);
    let mut p = pb::Policy {
        cpu: quiet,
        memory: quiet,
        disk: quiet,
        network: quiet,
        disk_io: quiet,
        sustain_seconds: sustain,
        cooldown_seconds: 300,
        target: target as i32,
        ..Default::default()
    };
    let t = th(high, low);
    match resource {
        "cpu" => p.cpu = t,
        "memory" => p.memory = t,
        "disk" => p.disk = t,
        "disk_io" => p.disk_io = t,
        _ => p.network = t,
    }
    p
}

pub(crate) async fn create(f: &Fleet, name: &str, apps: Vec<pb::AppSpec>, policy: pb::Policy) {
    f.m.tenant()
        .create_pool(pb::CreatePoolRequest {
            name: name.into(),
            node_ids: vec!["node-1".into(), "node-2".into(), "node-3".into()],
            apps,
            policy: Some(policy),
            ..Default::default()
        })
        .await
        .expect("CreatePool");
}

/// The agent (node id) whose child runs the app with this tag.
fn host_of(f: &Fleet, tag: &str) -> Vec<String> {
    let by_pid: BTreeMap<i64, String> = f
        .agents
        .iter()
        .map(|(id, (_, p))| (p.pid() as i64, id.clone()))
        .collect();
    let suffix = format!("--tag {tag}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| cmdline(*pid).ends_with(&suffix))
        .filter_map(|pid| by_pid.get(&stat_field(pid, 4)?).cloned())
        .collect()
}

async fn wait_moved(f: &Fleet, tag: &str, to: &[&str]) -> String {
    eventually(
        &format!("{tag} to move to one of {to:?}"),
        Duration::from_secs(60),
        || async {
            let hosts = host_of(f, tag);
            (hosts.len() == 1 && to.contains(&hosts[0].as_str())).then(|| hosts[0].clone())
        },
    )
    .await
}

async fn offload_event(f: &Fleet, pool: &str, app: &str) -> pb::Event {
    wait_event(
        &f.m,
        pool,
        &format!("OFFLOAD event for {app}"),
        DEADLINE,
        |e| e.kind() == pb::EventKind::Offload && e.app == app,
    )
    .await
}

#[tokio::test]
async fn cpu_over_threshold_moves_an_app_to_the_peer_with_most_headroom() {
    let f = fleet(3, &agent_args(500, 100_000, 100_000, 100_000)).await;
    let apps = vec![
        load("burner", 1, &["--cpu", "350"], true, 0),
        load("pad1", 1, &["--cpu", "150"], false, 5),
        load("busy2", 2, &["--cpu", "150"], false, 0),
        sleeper("idle3", 3),
    ];
    create(
        &f,
        "cpu",
        apps,
        policy("cpu", 0.8, 0.5, pb::TargetMode::Single, 1),
    )
    .await;
    // node-1: 500/500 > 0.8 (a 100-millicore margin for noise). node-2 (150
    // used) would go to 500 > 400 with
    // the burner; node-3 (idle) has the most headroom.
    assert_eq!(wait_moved(&f, "burner", &["node-3"]).await, "node-3");
    let e = offload_event(&f, "cpu", "burner").await;
    assert_eq!(e.node_id, "node-3");
    assert!(e.message.contains("cpu"), "{}", e.message);
    // GetPool follows once the agents' next reports arrive.
    eventually("GetPool shows burner on node-3", DEADLINE, || async {
        let p = get_pool(&f.m, "cpu").await;
        let pl = p.placements.iter().find(|p| p.app == "burner")?;
        (pl.home_slot == 1 && pl.host_node_id == "node-3" && pl.state() == pb::AppState::Running)
            .then_some(())
    })
    .await;
    // The non-offloadable app stayed home.
    assert_eq!(host_of(&f, "pad1"), vec!["node-1"]);
}

#[tokio::test]
async fn spread_puts_apps_on_every_other_member() {
    let f = fleet(3, &agent_args(500, 100_000, 100_000, 100_000)).await;
    let apps = vec![
        load("m1", 1, &["--cpu", "130"], true, 0),
        load("m2", 1, &["--cpu", "130"], true, 0),
        load("m3", 1, &["--cpu", "130"], true, 1),
        load("pad", 1, &["--cpu", "120"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ];
    create(
        &f,
        "sp",
        apps,
        policy("cpu", 0.8, 0.6, pb::TargetMode::Spread, 1),
    )
    .await;
    // 510/500 over 0.8; down to low 300 takes two movers, one per peer.
    let a = wait_moved(&f, "m1", &["node-2", "node-3"]).await;
    let b = wait_moved(&f, "m2", &["node-2", "node-3"]).await;
    assert_ne!(a, b, "SPREAD put both apps on {a}");
    assert_eq!(host_of(&f, "m3"), vec!["node-1"], "moved more than needed");
}

#[tokio::test]
async fn memory_disk_and_network_thresholds_each_trigger() {
    // Memory: 450 MiB of 1000 over 0.4.
    let f = fleet(3, &agent_args(100_000, 1000, 100_000, 100_000)).await;
    let apps = vec![
        load("hog", 1, &["--memory", "350"], true, 0),
        load("mpad", 1, &["--memory", "100"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ];
    create(
        &f,
        "mem",
        apps,
        policy("memory", 0.4, 0.2, pb::TargetMode::Single, 1),
    )
    .await;
    wait_moved(&f, "hog", &["node-2", "node-3"]).await;
    assert!(
        offload_event(&f, "mem", "hog")
            .await
            .message
            .contains("memory")
    );
    drop(f);

    // Disk (space used by the app's directory): 90 MiB of 120 over 0.7.
    let f = fleet(3, &agent_args(100_000, 100_000, 120, 100_000)).await;
    let apps = vec![
        load("writer", 1, &["--disk", "70"], true, 0),
        load("dpad", 1, &["--disk", "20"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ];
    create(
        &f,
        "disk",
        apps,
        policy("disk", 0.7, 0.4, pb::TargetMode::Single, 1),
    )
    .await;
    wait_moved(&f, "writer", &["node-2", "node-3"]).await;
    assert!(
        offload_event(&f, "disk", "writer")
            .await
            .message
            .contains("disk")
    );
    drop(f);

    // Network (the app's socket traffic against a 4 Mbit/s link).
    let f = fleet(3, &agent_args(100_000, 100_000, 100_000, 4)).await;
    let apps = vec![
        load("sender", 1, &["--net", "375"], true, 0),
        load("npad", 1, &["--net", "50"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ];
    create(
        &f,
        "net",
        apps,
        policy("network", 0.8, 0.5, pb::TargetMode::Single, 1),
    )
    .await;
    wait_moved(&f, "sender", &["node-2", "node-3"]).await;
    assert!(
        offload_event(&f, "net", "sender")
            .await
            .message
            .contains("network")
    );
}

#[tokio::test]
async fn disk_io_threshold_triggers() {
    // Disk read+write rate of the apps' processes (/proc/<pid>/io, via
    // sysinfo) against a configured 4096 KiB/s: 3600 KiB/s is over 0.8.
    let mut args = agent_args(100_000, 100_000, 100_000, 100_000);
    args.extend(["--disk-io-kbps".to_string(), "4096".to_string()]);
    let f = fleet(3, &args).await;
    let apps = vec![
        load("churner", 1, &["--disk-io", "3000"], true, 0),
        load("iopad", 1, &["--disk-io", "600"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ];
    create(
        &f,
        "dio",
        apps,
        policy("disk_io", 0.8, 0.5, pb::TargetMode::Single, 1),
    )
    .await;
    let to = wait_moved(&f, "churner", &["node-2", "node-3"]).await;
    let e = offload_event(&f, "dio", "churner").await;
    assert_eq!(e.node_id, to);
    assert!(e.message.contains("disk_io"), "{}", e.message);
    // The pinned app stayed home, and the manager sees the rate it writes.
    assert_eq!(host_of(&f, "iopad"), vec!["node-1"]);
    eventually("GetPool shows iopad writing", DEADLINE, || async {
        let p = get_pool(&f.m, "dio").await;
        let pl = p.placements.iter().find(|p| p.app == "iopad")?;
        let kbps = pl.usage.as_ref()?.disk_io_kbps;
        (pl.disk_write_bytes_per_sec > 0 && kbps > 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn offloading_works_while_the_manager_is_down() {
    let mut f = fleet(3, &agent_args(500, 100_000, 100_000, 100_000)).await;
    let apps = vec![
        load("burner", 1, &["--cpu", "350"], true, 0),
        load("pad1", 1, &["--cpu", "150"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ];
    // A 4 s sustain window: the decision falls while the manager is down.
    create(
        &f,
        "away",
        apps,
        policy("cpu", 0.8, 0.5, pb::TargetMode::Single, 4),
    )
    .await;
    wait_running(&f.m, "away").await;
    let (addr, dir) = (f.m.addr, f.m.dir.clone());
    f.m.proc.kill();
    let host = wait_moved(&f, "burner", &["node-2", "node-3"]).await;
    // The manager comes back and learns the new placement from the agents.
    f.m = Manager::start_on(&dir, addr, &[]).await;
    let p = eventually("GetPool shows the offload", DEADLINE, || async {
        let p = get_pool(&f.m, "away").await;
        p.placements
            .iter()
            .any(|pl| {
                pl.app == "burner" && pl.host_node_id == host && pl.state() == pb::AppState::Running
            })
            .then_some(p)
    })
    .await;
    assert_eq!(
        p.placements
            .iter()
            .find(|pl| pl.app == "burner")
            .unwrap()
            .home_slot,
        1
    );
    offload_event(&f, "away", "burner").await;
    // The manager did not undo it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(host_of(&f, "burner"), vec![host]);
}

#[tokio::test]
async fn a_peer_at_its_threshold_refuses_and_the_app_stays() {
    let f = fleet(3, &agent_args(500, 100_000, 100_000, 100_000)).await;
    let apps = vec![
        load("burner", 1, &["--cpu", "300"], true, 0),
        load("pad1", 1, &["--cpu", "150"], false, 5),
        load("busy2", 2, &["--cpu", "250"], false, 0),
        load("busy3", 3, &["--cpu", "250"], false, 0),
    ];
    create(
        &f,
        "full",
        apps,
        policy("cpu", 0.8, 0.5, pb::TargetMode::Single, 1),
    )
    .await;
    wait_running(&f.m, "full").await;
    // Both peers would cross 400 with the burner: it stays home.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(host_of(&f, "burner"), vec!["node-1"]);

    // And a direct offer of the burner (exactly the pool's spec) to node-2
    // from member 1 is refused by admission.
    let pool = get_pool(&f.m, "full").await;
    let m1 = pool.members.iter().find(|m| m.slot == 1).unwrap();
    let mut chain = edgepool_common::tls::certs_from_pem(&m1.cert_pem, "m").unwrap();
    chain.extend(edgepool_common::tls::certs_from_pem(&pool.ca_pem, "ca").unwrap());
    let key = edgepool_common::tls::read_key(&f.agents["node-1"].0.dir.join("node.key")).unwrap();
    let addr = pool
        .members
        .iter()
        .find(|m| m.slot == 2)
        .unwrap()
        .peer_address
        .clone();
    let verifier =
        edgepool_common::tls::SpiffeServerVerifier::new(pool_roots(&pool.ca_pem), |_| true);
    let config =
        edgepool_common::tls::client_config_with_verifier(verifier, Some((chain, key))).unwrap();
    let channel =
        edgepool_common::tls::channel(&addr, std::sync::Arc::new(config), Duration::from_secs(5))
            .unwrap();
    let err = pb::peer_service_client::PeerServiceClient::new(channel)
        .offer(pb::OfferRequest {
            app: Some(load("burner", 1, &["--cpu", "300"], true, 0)),
            usage: Some(pb::Resources {
                cpu_millis: 300,
                ..Default::default()
            }),
            reason: "cpu".into(),
            offer_id: "0123456789abcdef0123456789abcdef".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("cpu"), "{err}");
    assert_eq!(
        host_of(&f, "burner"),
        vec!["node-1"],
        "a refused offer started the app"
    );
}

#[tokio::test]
async fn an_offloaded_app_returns_home_when_the_policy_asks() {
    let f = fleet(3, &agent_args(500, 100_000, 100_000, 100_000)).await;
    let apps = || {
        vec![
            load("burner", 1, &["--cpu", "300"], true, 0),
            load("pad1", 1, &["--cpu", "200"], false, 5),
            sleeper("i2", 2),
            sleeper("i3", 3),
        ]
    };
    let mut p = policy("cpu", 0.8, 0.75, pb::TargetMode::Single, 1);
    p.return_home = true;
    p.return_home_seconds = 2;
    create(&f, "rh", apps(), p).await;
    let away = wait_moved(&f, "burner", &["node-2", "node-3"]).await;
    // 500/500 was over 0.8; home is calm now (200 <= low 375) but the
    // burner (300) does not fit back under low with pad1 there: it stays away.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(host_of(&f, "burner"), vec![away.clone()]);
    // pad1 goes away: now it fits, and after 2 calm seconds it comes back.
    let mut without_pad = apps();
    without_pad.remove(1);
    f.m.tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "rh".into(),
            apps: without_pad,
        })
        .await
        .unwrap();
    wait_moved(&f, "burner", &["node-1"]).await;
    let e = wait_event(&f.m, "rh", "return-home OFFLOAD event", DEADLINE, |e| {
        e.kind() == pb::EventKind::Offload && e.message.contains("returned home")
    })
    .await;
    assert_eq!(e.app, "burner");
}

/// The environment of the process of agent `node` that runs the app with
/// this tag, if one does.
fn environ_of(f: &Fleet, tag: &str, node: &str) -> Option<String> {
    let agent = f.agents[node].1.pid() as i64;
    let suffix = format!("--tag {tag}");
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| cmdline(*pid).ends_with(&suffix))
        .find(|pid| stat_field(*pid, 4) == Some(agent))
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
        .map(|b| String::from_utf8_lossy(&b).replace('\0', "\n"))
}

#[tokio::test]
async fn a_moved_apps_changed_spec_is_followed_on_its_host_from_the_new_catalog() {
    // Memory (not CPU, which a busy machine may not give the load): 450 MiB
    // of 1000 over 0.4 moves the hog.
    let f = fleet(3, &agent_args(100_000, 1000, 100_000, 100_000)).await;
    let apps = || {
        vec![
            load("hog", 1, &["--memory", "350"], true, 0),
            load("mpad", 1, &["--memory", "100"], false, 5),
            sleeper("i2", 2),
            sleeper("i3", 3),
        ]
    };
    create(
        &f,
        "chg",
        apps(),
        policy("memory", 0.4, 0.2, pb::TargetMode::Single, 1),
    )
    .await;
    let host = wait_moved(&f, "hog", &["node-2", "node-3"]).await;
    // The tenant changes the moved app's environment: its owner renews with
    // the new spec, which the host accepts because its catalog (the pool
    // after the update) has it, and restarts the guest with it.
    let mut changed = apps();
    changed[0]
        .env
        .insert("EDGEPOOL_TEST_VERSION".into(), "2".into());
    f.m.tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "chg".into(),
            apps: changed,
        })
        .await
        .unwrap();
    eventually(
        "the guest to run with the new spec",
        Duration::from_secs(20),
        || async {
            environ_of(&f, "hog", &host)
                .is_some_and(|env| env.lines().any(|l| l == "EDGEPOOL_TEST_VERSION=2"))
                .then_some(())
        },
    )
    .await;
    // It stayed on its host: the update did not bring it home.
    assert_eq!(host_of(&f, "hog"), vec![host]);
}
