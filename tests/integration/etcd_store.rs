//! The manager on a real etcd (`--store etcd`): every record in etcd,
//! nothing in the data dir's state file, a pool survives a SIGKILL, a
//! second manager on the same prefix is refused, a manager that lost its
//! hold on the prefix writes nothing, and an etcd restart is survived.

use std::net::SocketAddr;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_tests::*;

use crate::pools::{Fleet, app, create_pool, get_pool, wait_running};

fn etcd_args(url: &str, prefix: &str) -> Vec<String> {
    [
        "--store",
        "etcd",
        "--etcd-endpoints",
        url,
        "--etcd-prefix",
        prefix,
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test]
async fn a_pool_on_etcd_survives_a_manager_kill() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = etcd_args(&etcd.url, "/ep-test");
    let mut f = Fleet::start(3, &strs(&args)).await;
    let apps = vec![
        app("a", &["sleep", "200001"]),
        app("b", &["sleep", "200002"]),
    ];
    create_pool(&f.m, "p", &["node-1", "node-2"], apps)
        .await
        .unwrap();
    let before = wait_running(&f.m, "p").await;

    // The records are in etcd, and no state file was made.
    let keys = etcd.keys("/ep-test/").await;
    for want in [
        "/ep-test/pools/default/p",
        "/ep-test/nodes/default/node-1",
        "/ep-test/nodes/default/node-3",
        "/ep-test/owner",
        "/ep-test/meta/next_event_seq",
    ] {
        assert!(keys.iter().any(|k| k == want), "{want} not in {keys:?}");
    }
    assert!(keys.iter().any(|k| k.starts_with("/ep-test/events/")));
    assert!(!f.m.dir.join("state.redb").exists());
    // The pool row holds the pool CA's private key: etcd sees it sealed.
    let value = etcd.value("/ep-test/pools/default/p").await.unwrap();
    assert!(value.starts_with(b"EPS1"));
    let text = String::from_utf8_lossy(&value);
    assert!(
        !text.contains("PRIVATE KEY") && !text.contains("node-1"),
        "{text}"
    );

    // SIGKILL: the owner key stays until its lease expires, but the
    // restarted manager (same host, same data dir) takes the prefix over at
    // once and finds everything as committed.
    let addr = f.m.addr;
    f.m.proc.kill();
    f.m = Manager::start_on(&f.m.dir, addr, &strs(&args)).await;
    let after = get_pool(&f.m, "p").await;
    assert_eq!(after.generation, before.generation);
    let members = |p: &pb::Pool| -> Vec<(u32, String)> {
        p.members
            .iter()
            .map(|m| (m.slot, m.node_id.clone()))
            .collect()
    };
    assert_eq!(members(&after), members(&before));
    assert_eq!(after.apps.len(), 2);
    // The agents come back and the apps were never restarted.
    let again = wait_running(&f.m, "p").await;
    let pids = |p: &pb::Pool| -> Vec<(String, u32)> {
        let mut v: Vec<_> = p
            .placements
            .iter()
            .map(|x| (x.app.clone(), x.pid))
            .collect();
        v.sort();
        v
    };
    assert_eq!(pids(&again), pids(&before));
    for id in ["node-1", "node-2", "node-3"] {
        wait_connected(&f.m, id).await;
    }
}

#[tokio::test]
async fn a_standby_replica_takes_over_when_the_leader_dies() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let mut args = etcd_args(&etcd.url, "/ep-two");
    args.extend(["--etcd-lease-ttl-seconds".to_string(), "2".to_string()]);
    let a_dir = tmp.path().join("a");
    let mut a = Manager::start_on(&a_dir, "127.0.0.1:0".parse().unwrap(), &strs(&args)).await;
    let node = enroll(&a, tmp.path(), "edge-1").await;

    // A second manager on the same prefix waits as a standby: it answers
    // health and says it does not lead.
    let b_dir = tmp.path().join("b");
    copy_replica_files(&a_dir, &b_dir);
    let mut cmd = std::process::Command::new(bin("cloud-manager"));
    cmd.args([
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&b_dir)
    .args(&args);
    let b_proc = Proc::spawn("standby", &mut cmd, &b_dir.join("b.log"));
    let b_addr: SocketAddr = eventually("the standby to listen", DEADLINE, || {
        let text = b_proc.log_text();
        let found = text
            .lines()
            .filter(|l| l.contains("waiting for the etcd prefix"))
            .find_map(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next()?.parse().ok());
        async move { found }
    })
    .await;
    let b = Manager {
        dir: b_dir.clone(),
        addr: b_addr,
        proc: b_proc,
    };
    let (a_addr, b_str) = (a.addr.to_string(), b_addr.to_string());
    assert_eq!(leader_status(&a_addr, &a.ca()).await, Some(1));
    eventually("the standby's health", DEADLINE, || {
        let (b, ca) = (b_str.clone(), a.ca());
        async move { (leader_status(&b, &ca).await == Some(2)).then_some(()) }
    })
    .await;

    // The standby takes tenant calls (it forwards them to the leader)...
    let listed = eventually("a tenant call through the standby", DEADLINE, || {
        let mut t = b.tenant();
        async move { list_nodes_with(&mut t, Default::default()).await.ok() }
    })
    .await;
    assert!(
        listed.concat().iter().any(|n| n.node_id == "edge-1"),
        "{listed:?}"
    );
    // ... a node enrolls through it ...
    let other = enroll(&b, tmp.path(), "edge-2").await;
    // ... and the caller is the certificate it presented: a header naming
    // another certificate changes nothing, sent to either replica (a tenant
    // posing as a node would be refused by TenantService).
    let node_der = tls::read_certs(&node.dir.join("node.pem")).unwrap()[0].clone();
    for m in [&a, &b] {
        let mut req = tonic::Request::new(pb::ListNodesRequest::default());
        req.metadata_mut().insert(
            "x-edgepool-forwarded-cert",
            edgepool_common::identity::hex(node_der.as_ref())
                .parse()
                .unwrap(),
        );
        let nodes = m
            .tenant()
            .list_nodes(req)
            .await
            .expect("tenant call with a forged header");
        assert!(nodes.into_inner().nodes.len() >= 2);
    }

    // An agent that knows both addresses, and one that knows only the
    // standby's: its stream reaches the leader through the standby.
    let mut cmd = std::process::Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&node.dir)
        .args(edgepool_tests::sandbox_args(&node.dir))
        .args(["--manager", &format!("{a_addr},{b_str}")])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"]);
    let _agent = Proc::spawn_session("edge-1", &mut cmd, &node.dir.join("agent.log"));
    let mut cmd = std::process::Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&other.dir)
        .args(edgepool_tests::sandbox_args(&other.dir))
        .args(["--manager", &b_str])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"]);
    let _other = Proc::spawn_session("edge-2", &mut cmd, &other.dir.join("agent.log"));
    wait_connected(&a, "edge-1").await;
    wait_connected(&a, "edge-2").await;
    // Its telemetry flows both ways through the standby: the leader sees
    // it as connected, with its usage, as seen from the standby too.
    let via_b = wait_connected(&b, "edge-2").await;
    assert!(via_b.capacity.is_some());

    // The leader dies (SIGKILL: its hold ends with its lease, 2 s): the
    // standby leads within 5 s, with everything the leader committed, and
    // the agent moves to it.
    a.proc.kill();
    let killed = std::time::Instant::now();
    eventually("the standby to lead", DEADLINE, || {
        let (b, ca) = (b_str.clone(), a.ca());
        async move { (leader_status(&b, &ca).await == Some(1)).then_some(()) }
    })
    .await;
    let took = killed.elapsed();
    let led = std::time::Instant::now();
    assert!(took < Duration::from_secs(5), "new leader after {took:?}");
    let n = wait_connected(&b, "edge-1").await;
    assert_eq!(n.node_id, "edge-1");
    // The agent is on the new leader within 5 s of it leading.
    assert!(
        led.elapsed() < Duration::from_secs(5),
        "agent back {:?} after the new leader",
        led.elapsed()
    );
    // So is the agent that knew only the standby's address.
    wait_connected(&b, "edge-2").await;
    drop(a);
}

#[tokio::test]
async fn a_manager_that_lost_the_prefix_writes_nothing() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = etcd_args(&etcd.url, "/ep-fence");
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &strs(&args),
    )
    .await;
    create_token(&mut m.tenant(), 60).await;
    assert_eq!(etcd.keys("/ep-fence/tokens/").await.len(), 1);

    // Its hold ends behind its back (as when its lease expires while it is
    // cut off from etcd) and another writer takes the prefix.
    let mut c = etcd.client().await;
    c.delete("/ep-fence/owner", None).await.unwrap();
    c.put("/ep-fence/owner", "someone else", None)
        .await
        .unwrap();

    let refused = m
        .tenant()
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: 60,
            ..Default::default()
        })
        .await;
    let status = refused.expect_err("a fenced manager wrote a token");
    // The details go to the log, not to the caller.
    assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    assert_eq!(etcd.keys("/ep-fence/tokens/").await.len(), 1);
    assert!(m.proc.log_text().contains("no longer holds the prefix"));
    // A deposed leader stops acting: it exits with an error.
    let mut m = m;
    let status = m.proc.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    assert!(
        m.proc
            .log_text()
            .contains("lost its hold on the etcd prefix")
    );
}

#[tokio::test]
async fn the_manager_rides_out_an_etcd_restart() {
    let tmp = TempDir::new().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = etcd_args(&etcd.url, "/ep-restart");
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &strs(&args),
    )
    .await;
    create_token(&mut m.tenant(), 60).await;
    etcd.restart().await;
    // Within the lease's TTL the hold survives the restart (etcd keeps
    // leases across restarts), and writes go through again.
    eventually("a write after the etcd restart", DEADLINE, || {
        let mut t = m.tenant();
        async move {
            t.create_join_token(pb::CreateJoinTokenRequest {
                ttl_seconds: 60,
                ..Default::default()
            })
            .await
            .ok()
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(etcd.keys("/ep-restart/tokens/").await.len() >= 2);
}

#[tokio::test]
async fn a_manager_with_another_store_key_is_refused_until_it_has_the_key() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = etcd_args(&etcd.url, "/ep-key");
    let mut first = Manager::start_on(
        &tmp.path().join("m1"),
        "127.0.0.1:0".parse().unwrap(),
        &strs(&args),
    )
    .await;
    create_token(&mut first.tenant(), 60).await;
    // Stopped, it gives the prefix back (at once, or when its lease ends).
    first.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(first.proc.wait_exit(Duration::from_secs(10)).is_some());
    eventually("the prefix to be free", DEADLINE, || {
        let etcd = &etcd;
        async move { etcd.keys("/ep-key/owner").await.is_empty().then_some(()) }
    })
    .await;

    // Another data dir has another store key: refused, and told why.
    let second_dir = tmp.path().join("m2");
    let serve = |dir: &std::path::Path| {
        run(std::process::Command::new(bin("cloud-manager"))
            .args([
                "serve",
                "--http-listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir)
            .args(&args))
    };
    let out = serve(&second_dir);
    assert!(!out.ok);
    assert!(out.stderr.contains("store.key"), "{}", out.stderr);
    // With the first manager's key (copied like ca.key) it starts and reads
    // what the first one wrote.
    copy_replica_files(&tmp.path().join("m1"), &second_dir);
    let second = Manager::start_on(&second_dir, "127.0.0.1:0".parse().unwrap(), &strs(&args)).await;
    // It writes where the first one did.
    create_token(&mut second.tenant(), 60).await;
    assert_eq!(etcd.keys("/ep-key/tokens/").await.len(), 2);
}

#[tokio::test]
async fn bench_store_prints_its_figures() {
    let out = run(std::process::Command::new(bin("bench-store")).args([
        "--writes",
        "20",
        "--concurrency",
        "2",
        "--kills",
        "1",
    ]));
    assert!(out.ok, "{}", out.stderr);
    let last = out.stdout.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON last line");
    for key in [
        "redb_p50_ms",
        "redb_p99_ms",
        "etcd_p50_ms",
        "etcd_p99_ms",
        "redb_concurrent_p99_ms",
        "etcd_concurrent_p99_ms",
        "leader_takeover_p50_ms",
        "leader_takeover_max_ms",
    ] {
        let ms = v[key].as_f64().unwrap_or(-1.0);
        assert!(ms > 0.0 && ms < 10_000.0, "{key} = {ms}");
    }
}

#[tokio::test]
async fn etcd_over_tls_with_client_certificates() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start_tls(&tmp.path().join("etcd")).await;
    let tls = etcd.tls.clone().unwrap();
    let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let mut args = etcd_args(&etcd.url, "/ep-tls");
    args.extend(["--etcd-ca-cert".to_string(), path(&tls.ca)]);
    let serve = |extra: &[String], dir: &str| {
        run(std::process::Command::new(bin("cloud-manager"))
            .args([
                "serve",
                "--http-listen",
                "127.0.0.1:0",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(tmp.path().join(dir))
            .args(extra))
    };
    // Without a client certificate etcd refuses the manager: it says so
    // and does not start.
    let out = serve(&args, "m-nocert");
    assert!(!out.ok);
    assert!(out.stderr.contains("etcd"), "{}", out.stderr);
    // Over http:// to a TLS port: refused too.
    let plain = etcd_args(&etcd.url.replace("https://", "http://"), "/ep-tls");
    let out = serve(&plain, "m-plain");
    assert!(!out.ok);
    assert!(etcd.keys("/ep-tls/").await.is_empty());

    args.extend([
        "--etcd-cert".to_string(),
        path(&tls.client_cert),
        "--etcd-key".to_string(),
        path(&tls.client_key),
    ]);
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &strs(&args),
    )
    .await;
    create_token(&mut m.tenant(), 60).await;
    assert_eq!(etcd.keys("/ep-tls/tokens/").await.len(), 1);
}

#[tokio::test]
async fn a_leader_cut_off_from_etcd_stops_before_another_leads() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let target: SocketAddr = etcd.url.trim_start_matches("http://").parse().unwrap();
    // The leader reaches etcd through a proxy that will drop everything.
    let proxy = Proxy::start(target).await;
    // The default lease (4 s): the leader stops a second before it could
    // have expired.
    let a_args = etcd_args(&format!("http://{}", proxy.addr), "/ep-cut");
    let a_dir = tmp.path().join("a");
    let a = Manager::start_on(&a_dir, "127.0.0.1:0".parse().unwrap(), &strs(&a_args)).await;
    let b_dir = tmp.path().join("b");
    copy_replica_files(&a_dir, &b_dir);
    let b_args = etcd_args(&etcd.url, "/ep-cut");
    let b_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cmd = std::process::Command::new(bin("cloud-manager"));
    cmd.args([
        "serve",
        "--http-listen",
        "127.0.0.1:0",
        "--listen",
        &b_addr.to_string(),
        "--data-dir",
    ])
    .arg(&b_dir)
    .args(&b_args);
    let _b = Proc::spawn("standby", &mut cmd, &b_dir.join("b.log"));
    let (a_str, b_str, ca) = (a.addr.to_string(), b_addr.to_string(), a.ca());
    eventually("the standby's health", DEADLINE, || {
        let (b, ca) = (b_str.clone(), ca.clone());
        async move { (leader_status(&b, &ca).await == Some(2)).then_some(()) }
    })
    .await;
    assert_eq!(leader_status(&a_str, &ca).await, Some(1));

    proxy.blackhole();
    let cut = std::time::Instant::now();
    let mut a_stopped = None;
    let mut b_leads = None;
    while cut.elapsed() < Duration::from_secs(20) && (a_stopped.is_none() || b_leads.is_none()) {
        if a_stopped.is_none() && leader_status(&a_str, &ca).await != Some(1) {
            a_stopped = Some(cut.elapsed());
        }
        if b_leads.is_none() && leader_status(&b_str, &ca).await == Some(1) {
            b_leads = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (a_stopped, b_leads) = (
        a_stopped.expect("the cut leader never stopped"),
        b_leads.expect("no new leader"),
    );
    assert!(
        a_stopped < b_leads,
        "the old leader stopped at {a_stopped:?}, the new one led at {b_leads:?}"
    );
    assert!(
        b_leads < Duration::from_secs(6),
        "new leader after {b_leads:?}"
    );
}
