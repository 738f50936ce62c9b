//! Hostile load: thousands of idle or slow connections, oversized
//! requests, enrollment floods and a tenant fishing for another tenant's
//! node ids leave the daemons serving everyone else; tenants using the same
//! node ids never meet.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_tests::*;
use pb::agent_service_client::AgentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic_health::pb::health_client::HealthClient;

use crate::peers::{member_identity, probe_as};
use crate::pools::{Fleet, app, create_pool, get_pool, wait_running};

/// Connections each flood opens.
const FLOOD: usize = 2000;
/// The first bytes of a ClientHello (a handshake record announcing 200
/// bytes), never completed.
const HELLO_START: [u8; 11] = [
    0x16, 0x03, 0x01, 0x00, 0xc8, 0x01, 0x00, 0x00, 0xc4, 0x03, 0x03,
];

/// The test opens thousands of sockets: its soft open-file limit goes up
/// to the hard one.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    assert!(
        hard >= 3 * FLOOD as u64,
        "open-file hard limit {hard} is too low"
    );
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

/// Opens `n` TCP connections to `to` from `from` (any port), each writing
/// `first` (if any) and nothing more; returns them with when each was
/// connected.
async fn flood(to: SocketAddr, from: IpAddr, n: usize, first: &[u8]) -> Vec<(TcpStream, Instant)> {
    let mut out = Vec::with_capacity(n);
    let first = Arc::new(first.to_vec());
    for _ in 0..n / 250 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..250 {
            let first = first.clone();
            batch.spawn(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind(SocketAddr::new(from, 0)).unwrap();
                let mut tcp = tokio::time::timeout(DEADLINE, socket.connect(to))
                    .await
                    .expect("connect in time")
                    .expect("connect");
                let at = Instant::now();
                if !first.is_empty() {
                    tcp.write_all(&first).await.unwrap();
                }
                (tcp, at)
            });
        }
        out.extend(batch.join_all().await);
    }
    out
}

/// How long after its connect each connection was closed by the server
/// (read returns end of stream or an error); `None` if still open after
/// `within`.
async fn closed_after(conns: Vec<(TcpStream, Instant)>, within: Duration) -> Vec<Option<Duration>> {
    let mut waits = tokio::task::JoinSet::new();
    for (mut tcp, at) in conns {
        waits.spawn(async move {
            let mut buf = [0u8; 256];
            let deadline = tokio::time::Instant::now() + within;
            loop {
                match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
                    Err(_) => return None,
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(at.elapsed()),
                    // An alert before closing: keep reading.
                    Ok(Ok(_)) => {}
                }
            }
        });
    }
    waits.join_all().await
}

/// 2,000 connections that never send a ClientHello and 2,000 that send
/// part of one do not keep a tenant out (its call is answered at once,
/// not after the handshake timeout), and each of them is closed once the
/// handshake timeout has passed since its connect.
#[tokio::test]
async fn idle_and_slow_clients_neither_keep_tenants_out_nor_stay() {
    raise_fd_limit();
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &["--handshake-timeout-ms", "5000"],
    )
    .await;
    list_nodes(&mut m.tenant()).await;

    let idle = flood(m.addr, "127.0.0.2".parse().unwrap(), FLOOD, &[]).await;
    let slow = flood(m.addr, "127.0.0.3".parse().unwrap(), FLOOD, &HELLO_START).await;
    let asked = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(5),
        m.tenant().list_nodes(pb::ListNodesRequest::default()),
    )
    .await
    .expect("a tenant call answered at once while 4,000 connections hang")
    .expect("ListNodes");
    let answered = asked.elapsed();

    let within = Duration::from_secs(30);
    for (what, conns) in [("idle", idle), ("slow", slow)] {
        let closed = closed_after(conns, within).await;
        let open = closed.iter().filter(|c| c.is_none()).count();
        assert_eq!(
            open, 0,
            "{open} {what} connections still open after {within:?}"
        );
        let mut closed: Vec<Duration> = closed.into_iter().flatten().collect();
        closed.sort();
        // Closed by the timeout (5 s after the accept, which follows the
        // connect), not before.
        assert!(
            closed[0] >= Duration::from_millis(4900),
            "{what}: {:?}",
            closed[0]
        );
        assert!(
            closed[FLOOD - 1] < Duration::from_secs(25),
            "{what}: {:?}",
            closed[FLOOD - 1]
        );
    }
    // And the manager still answers.
    list_nodes(&mut m.tenant()).await;
    // Behind 4,000 silent clients holding slots (256 at a time, 5 s each)
    // it would have waited over a minute.
    assert!(answered < Duration::from_secs(5), "{answered:?}");
}

/// 2,000 idle TCP connections to an agent's peer port (from another
/// address) leave it serving its pool: another member's Probe with its
/// member certificate is answered at once. An oversized request on the
/// peer port is refused and the port keeps serving.
#[tokio::test]
async fn idle_connections_leave_a_peer_port_serving_members() {
    raise_fd_limit();
    let f = Fleet::start(2, &[]).await;
    create_pool(
        &f.m,
        "hostile",
        &["node-1", "node-2"],
        vec![
            app("h1", &["sleep", "731001"]),
            app("h2", &["sleep", "731002"]),
        ],
    )
    .await
    .unwrap();
    wait_running(&f.m, "hostile").await;
    let pool = get_pool(&f.m, "hostile").await;
    let target = pool.members.iter().find(|m| m.node_id == "node-1").unwrap();
    let address = get_node(&mut f.m.tenant(), "node-1")
        .await
        .unwrap()
        .peer_address;
    let peer: SocketAddr = address.parse().unwrap();
    let ca = pool.ca_pem.clone();

    let idle = flood(peer, "127.0.0.2".parse().unwrap(), FLOOD, &[]).await;
    let asked = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        probe_as(
            &ca,
            &address,
            "hostile",
            target.slot,
            Some(member_identity(&f, &pool, "node-2")),
        ),
    )
    .await
    .expect("a member's probe answered at once while 2,000 connections idle");
    assert!(answer.is_ok(), "{answer:?} after {:?}", asked.elapsed());

    // A health check with a 64 KiB service name: refused from its length,
    // and the port keeps serving.
    let config = peer_client_config(&ca, &f, &pool, "hostile", target.slot);
    let channel = tls::channel(&address, config, Duration::from_secs(5)).unwrap();
    let big = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(64 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(big.code(), tonic::Code::OutOfRange, "{big:?}");
    let again = probe_as(
        &ca,
        &address,
        "hostile",
        target.slot,
        Some(member_identity(&f, &pool, "node-2")),
    )
    .await;
    assert!(again.is_ok(), "{again:?}");
    drop(idle);
}

/// A client config for the peer port of member `slot` of `pool`, with
/// node-2's member identity.
fn peer_client_config(
    pool_ca_pem: &str,
    f: &Fleet,
    pool: &pb::Pool,
    name: &str,
    slot: u32,
) -> Arc<rustls::ClientConfig> {
    use edgepool_common::identity::Identity;
    let roots = pool_roots(pool_ca_pem);
    let name = name.to_string();
    let verifier = tls::SpiffeServerVerifier::new(
        roots,
        move |id| matches!(id, Identity::Member { pool: p, slot: s, .. } if *p == name && *s == slot),
    );
    Arc::new(
        tls::client_config_with_verifier(verifier, Some(member_identity(f, pool, "node-2")))
            .unwrap(),
    )
}

/// Requests above a service's limit are refused from their length prefix
/// (OUT_OF_RANGE) on every service of the manager, which keeps serving.
#[tokio::test]
async fn oversized_requests_are_refused_and_the_manager_keeps_serving() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let huge = "x".repeat(3 * 1024 * 1024);

    let pool = m
        .tenant()
        .create_pool(pb::CreatePoolRequest {
            name: "big".into(),
            apps: vec![app("a", &["sleep", &huge])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(pool.code(), tonic::Code::OutOfRange, "{pool:?}");

    let channel = tls::channel(&m.addr.to_string(), client_tls(&m.ca(), None), DEADLINE).unwrap();
    let enroll = AgentServiceClient::new(channel.clone())
        .enroll(pb::EnrollRequest {
            token: "ept_0".into(),
            node_id: "n".into(),
            csr_pem: "x".repeat(2 * 1024 * 1024),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(enroll.code(), tonic::Code::OutOfRange, "{enroll:?}");

    let health = HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(64 * 1024),
        })
        .await
        .unwrap_err();
    assert_eq!(health.code(), tonic::Code::OutOfRange, "{health:?}");

    // Still serving, and a request just under the tenant limit is decoded
    // (and judged on its content).
    list_nodes(&mut m.tenant()).await;
    let fits = m
        .tenant()
        .create_pool(pb::CreatePoolRequest {
            name: "fits".into(),
            apps: vec![app("a", &["sleep", &"x".repeat(1024 * 1024)])],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(fits.code(), tonic::Code::InvalidArgument, "{fits:?}");
}

/// An Enroll client whose connections leave from `source`.
fn enroll_client(m: &Manager, source: &str) -> AgentServiceClient<tonic::transport::Channel> {
    let channel = tls::channel_from(
        &m.addr.to_string(),
        client_tls(&m.ca(), None),
        DEADLINE,
        None,
        Some(source.parse().unwrap()),
    )
    .unwrap();
    AgentServiceClient::new(channel)
}

fn enroll_request(token: &str) -> pb::EnrollRequest {
    pb::EnrollRequest {
        token: token.into(),
        node_id: "guess".into(),
        csr_pem: "not a csr".into(),
        force: false,
    }
}

/// Malformed tokens are refused at once with INVALID_ARGUMENT (and do not
/// count); a burst of well-formed guesses from one address gets
/// RESOURCE_EXHAUSTED with a retry hint after `enroll_burst` calls, while
/// a node on another address enrolls.
#[tokio::test]
async fn malformed_tokens_are_refused_at_once_and_enroll_is_limited_per_address() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &["--enroll-rate-per-second", "1", "--enroll-burst", "3"],
    )
    .await;
    let mut guesser = enroll_client(&m, "127.0.0.2");
    let started = Instant::now();
    for token in [
        String::new(),
        "ept_".into(),
        "ept_xyz".into(),
        format!("ept_{}", "g".repeat(48)),
        format!("ept_{}", "0".repeat(47)),
        "x".repeat(100_000),
    ] {
        let e = guesser.enroll(enroll_request(&token)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("malformed"), "{e:?}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Well-formed guesses: the burst (3; a slow machine may refill one a
    // second meanwhile), then refused with a hint.
    let guess = format!("ept_{}", "0".repeat(48));
    let mut before = 0;
    let e = loop {
        let e = guesser.enroll(enroll_request(&guess)).await.unwrap_err();
        if e.code() != tonic::Code::Unauthenticated {
            break e;
        }
        before += 1;
        assert!(before < 10, "never limited");
    };
    assert!(before >= 3, "limited after {before} calls");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    let hint = edgepool_common::grpc::retry_after(&e).expect("retry hint");
    assert!(hint <= Duration::from_secs(1), "{hint:?}");

    // Another address is not affected: a real join (from 127.0.0.1).
    let token = m.token().await;
    let out = join(&m, &tmp.path().join("a"), "honest", &token, &[]);
    assert!(out.ok, "{}", out.stderr);
    // The guesser still waits for its bucket.
    let e = guesser.enroll(enroll_request(&guess)).await.unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::ResourceExhausted | tonic::Code::Unauthenticated
        ),
        "{e:?}"
    );
}

/// A second tenant learns nothing of the first tenant's node ids from any
/// TenantService call: they answer exactly as for an id nobody has.
#[tokio::test]
async fn another_tenants_node_ids_are_never_revealed() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    enroll(&m, tmp.path(), "secret-node").await;
    wait_connected_or_enrolled(&m, "secret-node").await;
    let mut other = m.other_tenant("nosy");
    let mine = create_token(&mut other, 600).await;
    let out = join(&m, &tmp.path().join("nosy-1"), "nosy-1", &mine, &[]);
    assert!(out.ok, "{}", out.stderr);

    let leaked = |what: &str, text: &str| {
        assert!(
            !text.contains("secret-node"),
            "{what} names secret-node: {text}"
        );
    };
    let nodes = list_nodes(&mut other).await;
    leaked("ListNodes", &format!("{nodes:?}"));
    assert_eq!(nodes.len(), 1);
    let summary = other
        .node_summary(pb::NodeSummaryRequest::default())
        .await
        .unwrap()
        .into_inner();
    leaked("NodeSummary", &format!("{summary:?}"));

    // Same answer for the other tenant's id as for an id nobody has.
    let same = |a: tonic::Status, b: tonic::Status| {
        assert_eq!(a.code(), b.code());
        assert_eq!(
            a.message().replace("secret-node", "ID"),
            b.message().replace("never-was", "ID")
        );
    };
    let get = |id: &'static str| {
        let mut c = other.clone();
        async move {
            c.get_node(pb::GetNodeRequest { node_id: id.into() })
                .await
                .unwrap_err()
        }
    };
    same(get("secret-node").await, get("never-was").await);
    let pool = |id: &'static str| {
        let mut c = other.clone();
        async move {
            c.create_pool(pb::CreatePoolRequest {
                name: format!("p-{id}"),
                node_ids: vec![id.into()],
                apps: vec![app("a", &["sleep", "731003"])],
                ..Default::default()
            })
            .await
            .unwrap_err()
        }
    };
    let (a, b) = (pool("secret-node").await, pool("never-was").await);
    same(a, b);
    let pools = other
        .list_pools(pb::ListPoolsRequest::default())
        .await
        .unwrap()
        .into_inner();
    leaked("ListPools", &format!("{pools:?}"));
    let mut events = other
        .watch_events(pb::WatchEventsRequest {
            from_start: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(Duration::from_secs(1), events.message()).await
    {
        seen.push(e);
    }
    assert!(!seen.is_empty(), "nosy-1's own enrollment is an event");
    leaked("WatchEvents", &format!("{seen:?}"));
}

/// Node ids are per tenant: another tenant enrolls the ids this one uses
/// exactly as it would fresh ones (nothing tells it they are used), gets
/// nodes of its own, and each tenant's pool on `node-1`/`node-2` runs and
/// fails over on its own: a crash of the other tenant's `node-1` moves its
/// slot to its spare and leaves this tenant's `node-1` and pool untouched.
#[tokio::test]
async fn tenants_may_use_the_same_node_ids_and_never_meet() {
    let f = Fleet::start(2, &[]).await;
    let mut other = f.m.other_tenant("twin");
    let mut twins = Vec::new();
    for id in ["node-1", "node-2", "node-3"] {
        let token = create_token(&mut other, 600).await;
        let dir = f.tmp.path().join(format!("twin-{id}"));
        let out = join(&f.m, &dir, id, &token, &[]);
        assert!(out.ok, "the other tenant's {id} enrolls: {}", out.stderr);
        let agent = AgentDir {
            dir,
            node_id: id.to_string(),
        };
        let proc = start_agent(&agent, &f.m.addr, &[]);
        twins.push((agent, proc));
    }
    // Its own nodes again: without force, its own id is refused as usual.
    let token = create_token(&mut other, 600).await;
    let again = join(
        &f.m,
        &f.tmp.path().join("twin-again"),
        "node-1",
        &token,
        &[],
    );
    assert!(
        !again.ok && again.stderr.contains("already enrolled"),
        "{}",
        again.stderr
    );
    eventually("the other tenant's three nodes connected", DEADLINE, || {
        let mut c = other.clone();
        async move {
            let nodes = list_nodes(&mut c).await;
            (nodes.len() == 3 && nodes.iter().all(|n| n.connected)).then_some(())
        }
    })
    .await;
    let mine = list_nodes(&mut f.m.tenant()).await;
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(mine.iter().all(|n| n.connected), "{mine:?}");

    let apps = |base: u32| {
        (0..2)
            .map(|i| {
                let mut a = app(&format!("t{i}"), &["sleep", &format!("{}", base + i)]);
                a.slot = Some(i + 1);
                a
            })
            .collect::<Vec<_>>()
    };
    create_pool(&f.m, "p", &["node-1", "node-2"], apps(731_101))
        .await
        .unwrap();
    other
        .create_pool(pb::CreatePoolRequest {
            name: "p".into(),
            node_ids: vec!["node-1".into(), "node-2".into()],
            apps: apps(731_201),
            ..Default::default()
        })
        .await
        .unwrap();
    let before = wait_running(&f.m, "p").await;
    let theirs = |slot1: &'static str| {
        let c = other.clone();
        move || {
            let mut c = c.clone();
            async move {
                let p = c
                    .get_pool(pb::GetPoolRequest { name: "p".into() })
                    .await
                    .ok()?
                    .into_inner();
                let on = p.members.iter().find(|m| m.slot == 1)?.node_id.clone();
                let running = p
                    .placements
                    .iter()
                    .all(|pl| pl.state() == pb::AppState::Running && pl.pid != 0);
                (on == slot1 && running).then_some(p)
            }
        }
    };
    eventually("the other tenant's pool runs", DEADLINE, theirs("node-1")).await;
    // Each tenant's apps run under its own agents.
    for pl in &before.placements {
        let host = f.agent_pid(&pl.host_node_id) as i64;
        assert_eq!(stat_field(pl.pid as i32, 4), Some(host), "{}", pl.app);
    }

    // The other tenant's node-1 crashes (agent and apps).
    twins[0].1.kill();
    let moved = eventually(
        "the other tenant's slot 1 on its node-3",
        Duration::from_secs(60),
        theirs("node-3"),
    )
    .await;
    assert_eq!(moved.members[0].generation, 2);
    let twin3 = twins[2].1.pid() as i64;
    for pl in moved.placements.iter().filter(|pl| pl.home_slot == 1) {
        assert_eq!(stat_field(pl.pid as i32, 4), Some(twin3), "{}", pl.app);
    }

    // This tenant's pool saw nothing: same members, generations and pids,
    // its node-1 connected and a member, no failover event.
    let after = get_pool(&f.m, "p").await;
    assert_eq!(after.members, before.members);
    let pids = |p: &pb::Pool| {
        p.placements
            .iter()
            .map(|pl| (pl.app.clone(), pl.pid))
            .collect::<Vec<_>>()
    };
    assert_eq!(pids(&after), pids(&before));
    let node1 = get_node(&mut f.m.tenant(), "node-1").await.unwrap();
    assert!(
        node1.connected && node1.state() == pb::NodeState::Member,
        "{node1:?}"
    );
    let kinds: Vec<pb::EventKind> = retained_events(&f.m, "p", Duration::from_millis(500))
        .await
        .iter()
        .map(|e| e.kind())
        .collect();
    assert!(
        !kinds.contains(&pb::EventKind::FailoverStarted)
            && !kinds.contains(&pb::EventKind::NodeSuspect),
        "{kinds:?}"
    );
    for (_, p) in &mut twins {
        p.kill();
    }
}

/// Waits until `node` shows in the first tenant's listing.
async fn wait_connected_or_enrolled(m: &Manager, node: &str) {
    eventually(&format!("{node} listed"), DEADLINE, || {
        let mut t = m.tenant();
        let id = node.to_string();
        async move { get_node(&mut t, &id).await.map(|_| ()) }
    })
    .await;
}

/// An Enroll client for `addr` whose connections leave from `source`.
fn enroll_client_to(
    addr: SocketAddr,
    ca: &std::path::Path,
    source: &str,
) -> AgentServiceClient<tonic::transport::Channel> {
    let channel = tls::channel_from(
        &addr.to_string(),
        client_tls(ca, None),
        DEADLINE,
        None,
        Some(source.parse().unwrap()),
    )
    .unwrap();
    AgentServiceClient::new(channel)
}

/// Through a standby replica, the leader limits `Enroll` by the caller's
/// address (which the standby forwards), not by the standby's: one
/// caller's burst does not refuse another caller of the same standby, and
/// an `x-edgepool-forwarded-for` a client sends itself changes nothing.
#[tokio::test]
async fn enroll_through_a_standby_is_limited_by_the_callers_address() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        &etcd.url,
        "--etcd-prefix",
        "/ep-enroll-limit",
        "--enroll-rate-per-second",
        "1",
        "--enroll-burst",
        "2",
    ];
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let a = Manager::start_replica(&a_dir, free_addr(), &args, &[]).await;
    eventually("the first replica to lead", DEADLINE, || async {
        (leader_status(&a.addr.to_string(), &a.ca()).await == Some(1)).then_some(())
    })
    .await;
    copy_replica_files(&a_dir, &b_dir);
    let b = Manager::start_replica(&b_dir, free_addr(), &args, &[]).await;
    let ca = a.ca();
    let guess = format!("ept_{}", "0".repeat(48));
    let code = |c: &mut AgentServiceClient<tonic::transport::Channel>, forged: Option<&str>| {
        let mut c = c.clone();
        let mut req = tonic::Request::new(enroll_request(&guess));
        if let Some(f) = forged {
            req.metadata_mut()
                .insert("x-edgepool-forwarded-for", f.parse().unwrap());
        }
        async move { c.enroll(req).await.unwrap_err().code() }
    };

    // Through the standby from 127.0.0.2 (the first call may wait for the
    // standby to learn the leader's address).
    let mut first = enroll_client_to(b.addr, &ca, "127.0.0.2");
    eventually("a call forwarded to the leader", DEADLINE, || {
        let c = code(&mut first, None);
        async move { (c.await == tonic::Code::Unauthenticated).then_some(()) }
    })
    .await;
    // Calls take milliseconds and the bucket refills one call a second:
    // the burst is spent after about two calls.
    let mut before = 1;
    while code(&mut first, None).await == tonic::Code::Unauthenticated {
        before += 1;
        assert!(before < 10, "never limited");
    }
    assert!(before >= 2, "limited after {before} calls");
    // A forged address through the standby is replaced by the real one.
    assert_eq!(
        code(&mut first, Some("127.0.0.9")).await,
        tonic::Code::ResourceExhausted
    );
    // Another caller of the same standby has its own bucket.
    let mut second = enroll_client_to(b.addr, &ca, "127.0.0.3");
    assert_eq!(code(&mut second, None).await, tonic::Code::Unauthenticated);
    // Straight to the leader: the same bucket for 127.0.0.2, and a forged
    // header from a client (not a replica) is ignored.
    let mut direct = enroll_client_to(a.addr, &ca, "127.0.0.2");
    assert_eq!(
        code(&mut direct, Some("127.0.0.10")).await,
        tonic::Code::ResourceExhausted
    );
}

/// A client that completes the TLS handshake and then sends nothing (no
/// HTTP/2 preface) is closed after the handshake timeout too, while a
/// tenant's connection that goes quiet between calls is kept.
#[tokio::test]
async fn a_client_silent_after_its_handshake_is_closed() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &["--handshake-timeout-ms", "1000"],
    )
    .await;
    let mut tenant = m.tenant();
    list_nodes(&mut tenant).await;

    let (addr, config) = (m.addr, client_tls(&m.ca(), None));
    let closed = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).unwrap();
        }
        let done = Instant::now();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 1024];
        // The server's HTTP/2 settings come first; reading ends when the
        // server closes.
        while let Ok(n) = rustls::Stream::new(&mut tls, &mut tcp).read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        done.elapsed()
    })
    .await
    .unwrap();
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    assert!(closed < Duration::from_secs(10), "{closed:?}");

    // The tenant's channel, quiet for longer than the timeout, still works.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    list_nodes(&mut tenant).await;
}
