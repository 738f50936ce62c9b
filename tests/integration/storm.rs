//! Reconnect storms are shaped: the manager runs at most
//! `max_concurrent_handshakes` TLS handshakes at once (counted from the
//! client's hello, so silent clients hold no slot; they time out), opens at most
//! `max_concurrent_stream_opens` agent streams at once (the others get
//! RESOURCE_EXHAUSTED with a retry hint), and agents come back by
//! themselves.

use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_tests::*;
use pb::agent_service_client::AgentServiceClient;
use tokio::io::AsyncReadExt;

/// Silent clients hold no handshake slot: with 2 slots and a 1 s
/// handshake timeout, 6 clients that connect and never speak are all
/// closed about 1 s after they connected (together, not in waves of two),
/// and a tenant call made meanwhile is answered at once.
#[tokio::test]
async fn silent_clients_hold_no_slot_and_time_out() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--max-concurrent-handshakes",
            "2",
            "--handshake-timeout-ms",
            "1000",
        ],
    )
    .await;
    // The manager answers while idle.
    list_nodes(&mut m.tenant()).await;

    let start = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..6 {
        let mut tcp = tokio::net::TcpStream::connect(m.addr).await.unwrap();
        silent.push(tokio::spawn(async move {
            // Never sends a ClientHello; returns when the manager closes.
            let mut buf = [0u8; 64];
            let _ = tokio::time::timeout(DEADLINE, tcp.read(&mut buf)).await;
            start.elapsed()
        }));
    }
    let mut tenant = m.tenant();
    let asked = Instant::now();
    let nodes = tokio::time::timeout(
        Duration::from_secs(15),
        tenant.list_nodes(pb::ListNodesRequest::default()),
    )
    .await
    .expect("tenant call answered while the port was flooded");
    nodes.expect("ListNodes");
    let answered = asked.elapsed();

    let mut closed = Vec::new();
    for s in silent {
        closed.push(s.await.unwrap());
    }
    closed.sort();
    // All six after about 1 s; with slots held by silent clients the last
    // two would wait for two rounds (about 3 s).
    assert!(closed[0] >= Duration::from_millis(900), "{closed:?}");
    assert!(closed[5] < Duration::from_millis(2500), "{closed:?}");
    // Queued behind them it would wait for their timeouts (about 3 s).
    assert!(answered < Duration::from_secs(2), "{answered:?}");
}

/// A Connect that holds the only stream-open slot (it never sends its
/// hello) makes the next Connect fail with RESOURCE_EXHAUSTED and a retry
/// hint, in the message and in `retry-after-ms`; a real agent refused that
/// way connects by itself once the slot is free.
#[tokio::test]
async fn connect_over_the_cap_is_refused_with_a_hint_and_the_agent_returns() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--max-concurrent-stream-opens",
            "1",
            "--stream-open-retry-ms",
            "300",
        ],
    )
    .await;
    let holder = enroll(&m, tmp.path(), "holder").await;
    let probe = enroll(&m, tmp.path(), "probe").await;
    let late = enroll(&m, tmp.path(), "late").await;
    let identity = |a: &AgentDir| (a.dir.join("node.pem"), a.dir.join("node.key"));

    // Opens Connect and sends nothing: the manager waits for the hello
    // (up to 10 s) while holding the slot. Opened again whenever it ends
    // (refused because a probe below held the slot, or the hello timeout).
    let (cert, key) = identity(&holder);
    let ch = tls::channel(
        &m.addr.to_string(),
        client_tls(&m.ca(), Some((&cert, &key))),
        DEADLINE,
    )
    .unwrap();
    let hold = tokio::spawn(async move {
        let mut client = AgentServiceClient::new(ch);
        loop {
            let _ = client
                .connect(tokio_stream::pending::<pb::AgentMessage>())
                .await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let (cert, key) = identity(&probe);
    let refused = eventually("a Connect refused for the cap", DEADLINE, || {
        let (addr, ca, cert, key) = (m.addr, m.ca(), cert.clone(), key.clone());
        async move {
            match open_agent_stream(&addr, &ca, Some((&cert, &key))).await {
                Err(s) if s.code() == tonic::Code::ResourceExhausted => Some(s),
                _ => None,
            }
        }
    })
    .await;
    assert!(
        refused.message().contains("retry in 300 ms"),
        "{}",
        refused.message()
    );
    assert_eq!(
        edgepool_common::grpc::retry_after(&refused),
        Some(Duration::from_millis(300))
    );

    // A real agent is refused the same way and waits as told.
    let a = start_agent(&late, &m.addr, &[]);
    eventually("the agent to be told to retry", DEADLINE, || {
        let busy = a.log_text().contains("manager busy opening streams");
        async move { busy.then_some(()) }
    })
    .await;
    assert!(
        !get_node(&mut m.tenant(), "late").await.unwrap().connected,
        "connected while the slot was taken"
    );
    // The slot frees (the holder goes away); the agent returns by itself.
    hold.abort();
    if tokio::time::timeout(DEADLINE, wait_connected(&m, "late"))
        .await
        .is_err()
    {
        panic!(
            "late did not connect\nagent:\n{}\nmanager:\n{}",
            a.log_text(),
            m.proc.log_text()
        );
    }
}

/// Five agents started together against a manager that opens one stream
/// and runs one handshake at a time all end up connected: refused ones
/// come back by themselves with jittered delays.
#[tokio::test]
async fn agents_started_together_all_connect_through_tiny_caps() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &[
            "--max-concurrent-stream-opens",
            "1",
            "--max-concurrent-handshakes",
            "1",
            "--stream-open-retry-ms",
            "200",
        ],
    )
    .await;
    let mut dirs = Vec::new();
    for i in 0..5 {
        dirs.push(enroll(&m, tmp.path(), &format!("crowd-{i}")).await);
    }
    let _agents: Vec<Proc> = dirs.iter().map(|d| start_agent(d, &m.addr, &[])).collect();
    for d in &dirs {
        wait_connected(&m, &d.node_id).await;
    }
    // The manager still answers its tenants.
    assert_eq!(list_nodes(&mut m.tenant()).await.len(), 5);
}
