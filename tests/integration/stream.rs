//! The agent stream: telemetry reaches the tenant API; reconnects.

use edgepool_tests::*;

#[tokio::test]
async fn telemetry_reaches_list_nodes() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "tele").await;
    let _a = start_agent(&agent, &m.addr, &[]);
    let tenant = m.tenant();
    let node = eventually("telemetry in ListNodes", DEADLINE, || {
        let mut t = tenant.clone();
        async move {
            list_nodes(&mut t)
                .await
                .into_iter()
                .find(|n| n.node_id == "tele" && n.connected && !n.disks.is_empty())
        }
    })
    .await;
    let cap = node.capacity.unwrap();
    let usage = node.usage.unwrap();
    assert!(cap.memory_mb > 0, "{cap:?}");
    assert!(cap.disk_mb > 0, "{cap:?}");
    assert!(cap.cpu_millis >= 1000, "{cap:?}");
    assert!(usage.cpu_millis <= cap.cpu_millis, "{usage:?} vs {cap:?}");
    assert!(usage.memory_mb > 0 && usage.memory_mb <= cap.memory_mb);
    assert!(usage.disk_mb > 0 && usage.disk_mb <= cap.disk_mb);
    assert!((0.0..=100.0).contains(&node.cpu_percent));
    assert!(node.last_seen.is_some());
    assert!(!node.peer_address.is_empty());

    // last_seen keeps moving while the agent runs.
    let first = node.last_seen.unwrap();
    eventually("last_seen to advance", DEADLINE, || {
        let mut t = m.tenant();
        async move {
            let n = get_node(&mut t, "tele").await?;
            let t = n.last_seen?;
            ((t.seconds, t.nanos) > (first.seconds, first.nanos)).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn agent_reconnects_after_manager_restart() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    let mut m = Manager::start(&dir).await;
    let agent = enroll(&m, tmp.path(), "back").await;
    let _a = start_agent(&agent, &m.addr, &[]);
    let connected = |addr, dir: std::path::PathBuf| async move {
        let mut t = tenant_client(
            &addr,
            &dir.join("ca.pem"),
            Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
        );
        get_node(&mut t, "back").await.filter(|n| n.connected)
    };
    eventually("agent connected", DEADLINE, || {
        connected(m.addr, dir.clone())
    })
    .await;

    // Crash the manager (SIGKILL: no goodbye on the stream) and restart it
    // on the same address with the same data dir.
    let addr = m.addr;
    m.proc.kill();
    let m2 = Manager::start_on(&dir, addr, &[]).await;
    let node = eventually("agent reconnected", DEADLINE, || {
        connected(m2.addr, dir.clone())
    })
    .await;
    assert_eq!(node.node_id, "back");
    assert!(m2.proc.log_text().contains("agent connected"));
    drop(m);
}

/// Heartbeats never wait for measuring: with every measurement taking 4 s
/// (fault injection), the node stays connected and the manager keeps
/// hearing from it every heartbeat (1 s), and telemetry still arrives.
#[tokio::test]
async fn heartbeats_do_not_wait_for_slow_sampling() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "slow").await;
    let mut cmd = std::process::Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&agent.dir)
        .args(edgepool_tests::sandbox_args(&agent.dir))
        .args(["--manager", &m.addr.to_string()])
        .args(["--peer-listen", "127.0.0.1:0"])
        .env("EDGEPOOL_FAULT", "slow-sampling");
    let a = Proc::spawn_session("slow", &mut cmd, &agent.dir.join("agent.log"));
    wait_connected(&m, "slow").await;
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    let mut worst = 0;
    let mut telemetry = false;
    while start.elapsed() < std::time::Duration::from_secs(12) {
        let n = get_node(&mut m.tenant(), "slow").await.expect("node");
        assert!(n.connected, "stream lost while sampling was slow");
        let seen = n.last_seen.expect("last_seen");
        let seen_ms = seen.seconds as u64 * 1000 + seen.nanos as u64 / 1_000_000;
        worst = worst.max(now_ms().saturating_sub(seen_ms));
        telemetry |= !n.disks.is_empty();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    assert!(
        worst < 2500,
        "the manager went {worst} ms without hearing from the agent"
    );
    assert!(telemetry, "no telemetry arrived");
    let log = a.log_text();
    assert!(
        !log.contains("stream to the manager failed") && !log.contains("reconnecting"),
        "{log}"
    );
}
