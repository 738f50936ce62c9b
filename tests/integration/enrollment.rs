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
    // Another tenant's valid token cannot take over this tenant's node id.
    let others = create_token(&mut other, 600).await;
    let state_before_cases = std::fs::read(m.dir.join("state.redb")).unwrap();
    assert!(
        state_before != state_before_cases,
        "a successful join must write"
    );

    let cases: [(&str, &str, &str, &[&str]); 5] = [
        ("expired", &expired, "expired", &[]),
        ("used", &used, "already used", &[]),
        ("malformed", "not-a-token", "malformed", &[]),
        (
            "unknown",
            "ept_0123456789abcdef0123456789abcdef0123456789abcdef",
            "not known",
            &[],
        ),
        ("owned", &others, "taken", &["--force"]),
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

    let out = join(&m, &agent.dir, "again", &token, &["--force"]);
    assert!(out.ok, "{}", out.stderr);
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
