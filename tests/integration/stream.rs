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
