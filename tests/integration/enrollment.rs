//! Enrollment with join tokens, through the real `edge-agent join`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use edgepool_tests::*;

#[tokio::test]
async fn valid_token_enrolls_and_key_stays_private() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "edge-a").await;

    let key_mode = std::fs::metadata(agent.dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let cert = edgepool_common::tls::read_certs(&agent.dir.join("node.pem")).unwrap();
    assert_eq!(
        Identity::from_cert_der(cert[0].as_ref()).unwrap(),
        Identity::Node {
            domain: "edgepool.local".into(),
            tenant: "default".into(),
            node_id: "edge-a".into()
        }
    );
    // The private key never left the node: the manager's files do not hold it.
    let key = std::fs::read_to_string(agent.dir.join("node.key")).unwrap();
    for entry in std::fs::read_dir(&m.dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap_or_default();
        assert!(!text.contains(key.trim()));
    }
    let node = get_node(&mut m.tenant(), "edge-a")
        .await
        .expect("node listed");
    assert_eq!(node.state(), pb::NodeState::Free);
    assert_eq!(node.tenant, "default");
}

#[tokio::test]
async fn ca_fingerprint_works_instead_of_ca_file() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let ca = edgepool_common::tls::read_certs(&m.ca()).unwrap();
    let fp = edgepool_common::tls::fingerprint(ca[0].as_ref());
    let token = m.token().await;
    let dir = tmp.path().join("fp");
    let out = run(std::process::Command::new(bin("edge-agent"))
        .args(["join", "--manager", &m.addr.to_string(), "--token", &token])
        .args([
            "--ca-fingerprint",
            &fp,
            "--node-id",
            "fp-node",
            "--data-dir",
        ])
        .arg(&dir));
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(
        std::fs::read(dir.join("ca.pem")).unwrap(),
        std::fs::read(m.ca()).unwrap()
    );

    // A wrong fingerprint is refused before anything is sent.
    let token = m.token().await;
    let wrong = format!("sha256:{}", "00".repeat(32));
    let out = run(std::process::Command::new(bin("edge-agent"))
        .args(["join", "--manager", &m.addr.to_string(), "--token", &token])
        .args([
            "--ca-fingerprint",
            &wrong,
            "--node-id",
            "fp-bad",
            "--data-dir",
        ])
        .arg(tmp.path().join("fp-bad")));
    assert!(!out.ok);
    assert!(
        out.stderr.contains("is not the one --ca-fingerprint names")
            && !out.stderr.contains("cannot reach"),
        "{}",
        out.stderr
    );
    assert!(get_node(&mut m.tenant(), "fp-bad").await.is_none());
}

#[tokio::test]
async fn bad_tokens_are_refused_and_create_nothing() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    enroll(&m, tmp.path(), "owned").await;
    let mut tenant = m.tenant();
    let mut other = m.other_tenant("other");
    let before = list_nodes(&mut tenant).await.len();
    let state_before = std::fs::read(m.dir.join("state.redb")).unwrap();

    // Expired: a 1-second token, used after it ran out.
    let expired = create_token(&mut tenant, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // Reused: a token already redeemed.
    let used = m.token().await;
    let out = join(&m, &tmp.path().join("first"), "first", &used, &[]);
    assert!(out.ok, "{}", out.stderr);
    let before = before + 1;
    let state_before_cases = std::fs::read(m.dir.join("state.redb")).unwrap();
    assert!(
        state_before != state_before_cases,
        "a successful join must write"
    );

    let cases: [(&str, &str, &str, &[&str]); 4] = [
        ("expired", &expired, "expired", &[]),
        ("used", &used, "already used", &[]),
        ("malformed", "not-a-token", "malformed", &[]),
        (
            "unknown",
            "ept_0123456789abcdef0123456789abcdef0123456789abcdef",
            "not known",
            &[],
        ),
    ];
    for (node, token, why, extra) in cases {
        let dir = tmp.path().join(format!("refused-{node}"));
        let out = join(&m, &dir, node, token, extra);
        assert!(!out.ok, "{node}: join with a bad token succeeded");
        assert!(out.stderr.contains(why), "{node}: {}", out.stderr);
        assert!(!dir.join("node.pem").exists(), "{node}: certificate stored");
    }
    // Nothing was created or changed, for either tenant.
    assert_eq!(list_nodes(&mut tenant).await.len(), before);
    assert!(list_nodes(&mut other).await.is_empty());
    assert!(
        std::fs::read(m.dir.join("state.redb")).unwrap() == state_before_cases,
        "refused enrollments changed the store"
    );
    // The other tenant cannot see this tenant's node either.
    assert!(get_node(&mut other, "owned").await.is_none());
    assert!(get_node(&mut tenant, "owned").await.is_some());
}

#[tokio::test]
async fn re_enrolling_needs_force_and_revokes_the_old_certificate() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "again").await;
    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).unwrap();
    for f in ["node.pem", "node.key"] {
        std::fs::copy(agent.dir.join(f), old.join(f)).unwrap();
    }

    // Without --force: refused by the agent (data dir) and by the manager
    // (fresh data dir, same id).
    let token = m.token().await;
    let out = join(&m, &agent.dir, "again", &token, &[]);
    assert!(!out.ok && out.stderr.contains("--force"), "{}", out.stderr);
    let out = join(&m, &tmp.path().join("fresh"), "again", &token, &[]);
    assert!(
        !out.ok && out.stderr.contains("already enrolled"),
        "{}",
        out.stderr
    );

    // A live stream of the certificate about to be replaced.
    let (_, mut live) = agent_stream(
        &m.addr,
        &m.ca(),
        Some((&old.join("node.pem"), &old.join("node.key"))),
    )
    .await
    .unwrap();

    let out = join(&m, &agent.dir, "again", &token, &["--force"]);
    assert!(out.ok, "{}", out.stderr);
    // Its live stream is closed at once, not at its next message.
    stream_end(
        &mut live,
        Duration::from_secs(3),
        "the replaced certificate's stream",
    )
    .await;
    // The replaced certificate no longer opens the stream; the new one does.
    let err = open_agent_stream(
        &m.addr,
        &m.ca(),
        Some((&old.join("node.pem"), &old.join("node.key"))),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let ok = open_agent_stream(
        &m.addr,
        &m.ca(),
        Some((&agent.dir.join("node.pem"), &agent.dir.join("node.key"))),
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");
}

/// A member's identity: its member certificate and the pool CA, with the
/// node key from `key_path`.
fn member_chain(
    pool: &pb::Pool,
    slot: u32,
    key_path: &std::path::Path,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let m = pool.members.iter().find(|m| m.slot == slot).unwrap();
    let mut chain = edgepool_common::tls::certs_from_pem(&m.cert_pem, "member").unwrap();
    chain.extend(edgepool_common::tls::certs_from_pem(&pool.ca_pem, "pool ca").unwrap());
    (chain, edgepool_common::tls::read_key(key_path).unwrap())
}

fn ms_of(t: &prost_types::Timestamp) -> u64 {
    t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test]
async fn re_enrolling_a_member_reissues_its_certificate_and_its_group_runs_again() {
    use crate::pools::{Fleet, app, create_pool, get_pool, wait_running};
    // Slow heartbeats and telemetry (5 s), so that a stream closed only at
    // the old agent's next message would be seen to be late.
    let slow = [
        "--heartbeat-interval-ms",
        "5000",
        "--telemetry-interval-ms",
        "5000",
        "--heartbeat-timeout-ms",
        "15000",
    ];
    let mut f = Fleet::start(3, &slow).await;
    let apps: Vec<pb::AppSpec> = (1..=3)
        .map(|slot| {
            let mut a = app(
                &format!("re{slot}"),
                &["sleep", &format!("{}", 720_000 + slot)],
            );
            a.slot = Some(slot);
            a
        })
        .collect();
    create_pool(&f.m, "p", &["node-1", "node-2", "node-3"], apps.clone())
        .await
        .unwrap();
    let before = wait_running(&f.m, "p").await;
    let dir2 = f.agents["node-2"].0.dir.clone();
    let old_identity = member_chain(&before, 2, &dir2.join("node.key"));
    let old = before.members[1].clone();
    assert_eq!(old.node_id, "node-2");

    // `join --force` on the same data dir while the old agent still runs.
    let token = f.m.token().await;
    let log = f.agents["node-2"].1.log.clone();
    let out = join(&f.m, &dir2, "node-2", &token, &["--force"]);
    assert!(out.ok, "{}", out.stderr);
    let joined = std::time::Instant::now();

    // The old stream is closed at once (not at the old agent's next message
    // or after a silence timeout), and the old certificate cannot open
    // another.
    eventually("the old stream closed", Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("manager closed the stream").then_some(()) }
    })
    .await;
    let closed_after = joined.elapsed();
    assert!(
        closed_after < Duration::from_millis(500),
        "old stream closed only after {closed_after:?}"
    );
    eventually("the old certificate refused", DEADLINE, || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move { text.contains("has been replaced").then_some(()) }
    })
    .await;

    // In the same change: slot 2's member certificate is re-issued (for the
    // new key: see the probes below), member and pool generation + 1.
    let after = get_pool(&f.m, "p").await;
    let new = &after.members[1];
    assert_eq!((new.slot, new.node_id.as_str()), (2, "node-2"));
    assert_ne!(new.cert_serial, old.cert_serial);
    assert_eq!(new.generation, old.generation + 1);
    assert_eq!(after.generation, before.generation + 1);
    let renewed = retained_events(&f.m, "p", Duration::from_millis(300)).await;
    assert!(
        renewed
            .iter()
            .any(|e| e.kind() == pb::EventKind::CertRenewed
                && e.node_id == "node-2"
                && e.message.contains("join --force")),
        "{renewed:?}"
    );

    // Restart node-2 (its whole session, as a reboot would) with the new
    // identity: its group runs again within seconds, under the new agent.
    let (agent2, mut old_proc) = f.agents.remove("node-2").unwrap();
    old_proc.kill();
    let started = std::time::Instant::now();
    let proc2 = start_agent(&agent2, &f.m.addr, &[]);
    let agent_pid = proc2.pid() as i64;
    let cmd = apps[1].command.join(" ");
    eventually("slot 2's group running again", DEADLINE, || {
        let running = processes_running(&cmd)
            .into_iter()
            .any(|pid| stat_field(pid, 4) == Some(agent_pid));
        async move { running.then_some(()) }
    })
    .await;
    let took = started.elapsed();
    eprintln!(
        "old stream closed {closed_after:?} after join --force; group running {took:?} after the restart"
    );
    assert!(
        took < Duration::from_secs(5),
        "group ran again only after {took:?}"
    );
    f.agents.insert("node-2".into(), (agent2, proc2));

    // Peers accept the new member certificate (it is for the new key) and
    // refuse the old one; node-2 and its peers reach each other again.
    let current = wait_running(&f.m, "p").await;
    let addr1 = current.members[0].peer_address.clone();
    let new_identity = member_chain(&current, 2, &dir2.join("node.key"));
    crate::peers::probe_as(&current.ca_pem, &addr1, "p", 1, Some(new_identity))
        .await
        .expect("a peer refused the re-issued certificate");
    let err = crate::peers::probe_as(&current.ca_pem, &addr1, "p", 1, Some(old_identity))
        .await
        .unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
    let since = now_ms();
    eventually(
        "node-2 and its peers reach each other",
        DEADLINE,
        || async {
            for id in ["node-1", "node-2", "node-3"] {
                let n = get_node(&mut f.m.tenant(), id).await?;
                let fresh = n.peers.len() == 2
                    && n.peers.iter().all(|p| {
                        p.reachable && p.last_ok.as_ref().is_some_and(|t| ms_of(t) > since)
                    });
                if !fresh {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // The other groups were not touched.
    for slot in [1, 3] {
        let pids = |p: &pb::Pool| -> Vec<u32> {
            p.placements
                .iter()
                .filter(|pl| pl.home_slot == slot)
                .map(|pl| pl.pid)
                .collect()
        };
        assert_eq!(pids(&current), pids(&before), "slot {slot} apps restarted");
    }
}
