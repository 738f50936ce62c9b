//! Every RPC checks who is calling: hostile and misplaced certificates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType};

/// Writes `name.pem`/`name.key` for a client certificate with the given URI
/// SAN, signed by `issuer` (or self-signed when `None`).
fn make_cert(
    dir: &Path,
    name: &str,
    uri: Option<&str>,
    issuer: Option<&Issuer<'_, KeyPair>>,
) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    if let Some(u) = uri {
        params
            .subject_alt_names
            .push(SanType::URI(u.try_into().unwrap()));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let cert = match issuer {
        Some(i) => params.signed_by(&key, i).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn real_ca(manager_dir: &Path) -> Issuer<'static, KeyPair> {
    let key =
        KeyPair::from_pem(&std::fs::read_to_string(manager_dir.join("ca.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(manager_dir.join("ca.pem")).unwrap(),
        key,
    )
    .unwrap()
}

async fn list_as(m: &Manager, id: Option<(&Path, &Path)>) -> Result<Vec<pb::Node>, tonic::Status> {
    tenant_client(&m.addr, &m.ca(), id)
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .map(|r| r.into_inner().nodes)
}

#[tokio::test]
async fn hostile_certificates_are_refused_on_both_services() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    enroll(&m, tmp.path(), "victim").await;
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();

    // A second, unrelated CA with its own (perfectly valid-looking) bundle.
    let foreign = tmp.path().join("foreign");
    let out = run(std::process::Command::new(bin("cloud-manager"))
        .args(["init", "--dir"])
        .arg(&foreign));
    assert!(out.ok, "{}", out.stderr);

    let tenant_uri = "spiffe://edgepool.local/tenant/default/user/admin";
    let node_uri = "spiffe://edgepool.local/tenant/default/node/victim";
    let self_signed_tenant = make_cert(&certs, "ss-tenant", Some(tenant_uri), None);
    let self_signed_node = make_cert(&certs, "ss-node", Some(node_uri), None);
    let ca = real_ca(&m.dir);
    let wrong_domain = make_cert(
        &certs,
        "wrong-domain",
        Some("spiffe://evil.example/tenant/default/user/admin"),
        Some(&ca),
    );
    let no_uri = make_cert(&certs, "no-uri", None, Some(&ca));

    // TenantService.ListNodes
    let no_cert = list_as(&m, None).await.unwrap_err();
    assert_eq!(no_cert.code(), tonic::Code::Unauthenticated, "{no_cert}");
    for (what, (c, k)) in [
        ("self-signed", &self_signed_tenant),
        (
            "foreign CA",
            &(foreign.join("tenant.pem"), foreign.join("tenant.key")),
        ),
    ] {
        // Refused in the TLS handshake: the RPC never reaches a handler.
        let err = list_as(&m, Some((c, k))).await.unwrap_err();
        assert!(refused_at_tls(&err), "{what}: {err}");
    }
    let err = list_as(&m, Some((&wrong_domain.0, &wrong_domain.1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // No SPIFFE ID: not an identity at all, refused in the handshake.
    let err = list_as(&m, Some((&no_uri.0, &no_uri.1))).await.unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
    // A node certificate is not a tenant credential.
    let node_dir = tmp.path().join("victim");
    let err = list_as(
        &m,
        Some((&node_dir.join("node.pem"), &node_dir.join("node.key"))),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // AgentService.Connect
    let err = open_agent_stream(&m.addr, &m.ca(), None).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    for (what, (c, k)) in [
        ("self-signed", &self_signed_node),
        (
            "foreign CA",
            &(foreign.join("tenant.pem"), foreign.join("tenant.key")),
        ),
    ] {
        let err = open_agent_stream(&m.addr, &m.ca(), Some((c, k)))
            .await
            .unwrap_err();
        assert!(refused_at_tls(&err), "{what}: {err}");
    }
    // A tenant certificate is not a node credential.
    let err = open_agent_stream(
        &m.addr,
        &m.ca(),
        Some((&m.dir.join("tenant.pem"), &m.dir.join("tenant.key"))),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // A certificate from our CA naming a node that was never enrolled.
    let ghost = make_cert(
        &certs,
        "ghost",
        Some("spiffe://edgepool.local/tenant/default/node/ghost"),
        Some(&ca),
    );
    let err = open_agent_stream(&m.addr, &m.ca(), Some((&ghost.0, &ghost.1)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");

    // None of it created or changed anything.
    let nodes = list_nodes(&mut m.tenant()).await;
    assert_eq!(nodes.len(), 1);
    assert!(!nodes[0].connected);
}

/// A thief with a copy of the manager's store and `store.key` (so with a
/// pool CA's private key) mints tenant, node and manager identities and
/// presents them with the pool CA as intermediate: the chain is valid up
/// to the root, but only the root may issue those names, so the manager
/// refuses them in the handshake; a member name for another pool, or one
/// not in the membership, is refused by the members.
#[tokio::test]
async fn identities_minted_with_a_pool_ca_key_are_refused() {
    use crate::pools::{Fleet, app, create_pool, wait_running};
    let f = Fleet::start(2, &[]).await;
    create_pool(
        &f.m,
        "p",
        &["node-1", "node-2"],
        vec![
            app("k1", &["sleep", "700001"]),
            app("k2", &["sleep", "700002"]),
        ],
    )
    .await
    .unwrap();
    let pool = wait_running(&f.m, "p").await;
    let stolen = f.tmp.path().join("stolen");
    std::fs::create_dir_all(&stolen).unwrap();
    for file in ["state.redb", "store.key"] {
        std::fs::copy(f.m.dir.join(file), stolen.join(file)).unwrap();
    }
    use cloud_manager::store::Store;
    let registry = cloud_manager::store::RedbStore::open(&stolen)
        .unwrap()
        .load()
        .unwrap();
    let record = registry.pools.get("default/p").expect("pool row");
    assert_eq!(record.ca.cert_pem, pool.ca_pem);
    let issuer = Issuer::from_ca_cert_pem(
        &record.ca.cert_pem,
        KeyPair::from_pem(&record.ca.key_pem).unwrap(),
    )
    .unwrap();
    let certs = f.tmp.path().join("forged");
    std::fs::create_dir_all(&certs).unwrap();
    // Each forged certificate is sent with the pool CA after it, so the
    // chain to the root is complete.
    let forge = |name: &str, uri: &str| {
        let (c, k) = make_cert(&certs, name, Some(uri), Some(&issuer));
        let leaf = std::fs::read_to_string(&c).unwrap();
        std::fs::write(&c, format!("{leaf}{}", pool.ca_pem)).unwrap();
        (c, k)
    };
    for (name, uri) in [
        (
            "tenant",
            "spiffe://edgepool.local/tenant/default/user/admin",
        ),
        ("manager", "spiffe://edgepool.local/manager"),
        (
            "member",
            "spiffe://edgepool.local/tenant/default/pool/p/member/1",
        ),
    ] {
        let (c, k) = forge(name, uri);
        let err = list_as(&f.m, Some((&c, &k))).await.unwrap_err();
        assert!(refused_at_tls(&err), "{name}: {err}");
    }
    let (c, k) = forge("node", "spiffe://edgepool.local/tenant/default/node/node-1");
    let err = open_agent_stream(&f.m.addr, &f.m.ca(), Some((&c, &k)))
        .await
        .unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
    // On the peer port of member 1: a member name of another pool and a
    // member of this pool whose serial the membership does not hold.
    let addr = pool
        .members
        .iter()
        .find(|m| m.slot == 1)
        .unwrap()
        .peer_address
        .clone();
    for (name, uri) in [
        (
            "other-pool",
            "spiffe://edgepool.local/tenant/default/pool/q/member/2",
        ),
        (
            "unlisted",
            "spiffe://edgepool.local/tenant/default/pool/p/member/2",
        ),
    ] {
        let (c, k) = forge(name, uri);
        let identity = (
            edgepool_common::tls::read_certs(&c).unwrap(),
            edgepool_common::tls::read_key(&k).unwrap(),
        );
        let err = crate::peers::probe_as(&pool.ca_pem, &addr, "p", 1, Some(identity))
            .await
            .unwrap_err();
        assert!(refused_at_tls(&err), "{name}: {err}");
    }
    // The manager still serves the real tenant.
    assert_eq!(list_nodes(&mut f.m.tenant()).await.len(), 2);
}

#[tokio::test]
async fn a_tenant_sees_only_its_own_nodes() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    enroll(&m, tmp.path(), "mine").await;
    let mut other = m.other_tenant("other");
    let token = create_token(&mut other, 600).await;
    let out = join(&m, &tmp.path().join("theirs"), "theirs", &token, &[]);
    assert!(out.ok, "{}", out.stderr);

    let mine: Vec<String> = list_nodes(&mut m.tenant())
        .await
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    let theirs: Vec<String> = list_nodes(&mut other)
        .await
        .into_iter()
        .map(|n| n.node_id)
        .collect();
    assert_eq!(mine, vec!["mine"]);
    assert_eq!(theirs, vec!["theirs"]);
    let err = other
        .get_node(pb::GetNodeRequest {
            node_id: "mine".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// `cloud-manager node revoke`: the node's open stream ends within a
/// second or two, it cannot connect again, and its pool slot moves to the
/// spare although its peers still reach it.
#[tokio::test]
async fn a_revoked_node_certificate_ends_its_stream_and_its_slot_moves() {
    use crate::pools::{Fleet, app, create_pool, get_pool, wait_running};
    let f = Fleet::start(3, &[]).await;
    let apps = vec![
        app("r1", &["sleep", "731301"]),
        app("r2", &["sleep", "731302"]),
    ];
    create_pool(&f.m, "p", &["node-1", "node-2"], apps)
        .await
        .unwrap();
    wait_running(&f.m, "p").await;
    let revoke = |args: &[&str]| {
        run(std::process::Command::new(bin("cloud-manager"))
            .args(["node", "revoke", "--data-dir"])
            .arg(&f.m.dir)
            .args(args))
    };
    let list_file = f.m.dir.join("revoked-certs");
    let tenant_pem = f.m.dir.join("tenant.pem");
    let out = revoke(&["--cert", tenant_pem.to_str().unwrap()]);
    assert!(
        !out.ok && out.stderr.contains("not a node"),
        "{}",
        out.stderr
    );
    assert!(!list_file.exists());

    let node_pem = f.agents["node-1"].0.dir.join("node.pem");
    let out = revoke(&["--cert", node_pem.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
    eventually("node-1's stream ended", Duration::from_secs(5), || async {
        let n = get_node(&mut f.m.tenant(), "node-1").await?;
        (!n.connected).then_some(())
    })
    .await;
    // Its peers still reach it, yet its slot moves: it was revoked.
    eventually("slot 1 on node-3", Duration::from_secs(60), || async {
        let p = get_pool(&f.m, "p").await;
        let on = &p.members.iter().find(|m| m.slot == 1)?.node_id;
        let running = p
            .placements
            .iter()
            .filter(|pl| pl.home_slot == 1)
            .all(|pl| pl.host_node_id == "node-3" && pl.state() == pb::AppState::Running);
        (on == "node-3" && running).then_some(())
    })
    .await;
    // It stays out: every new handshake is refused.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let n = get_node(&mut f.m.tenant(), "node-1").await.unwrap();
    assert!(!n.connected, "{n:?}");
    // Its agent keeps trying, and every handshake is refused.
    let log = f.agents["node-1"].1.log_text();
    assert!(log.contains("received fatal alert"), "{log}");
}

/// `cloud-manager tenant revoke`: a revoked tenant certificate is refused
/// at the next handshake, its running WatchEvents ends, on a manager that
/// keeps running; other certificates of the tenant keep working; bad input
/// writes nothing.
#[tokio::test]
async fn a_revoked_tenant_certificate_is_refused_at_once() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let enrolled = enroll(&m, tmp.path(), "n1").await;
    let bob_dir = tmp.path().join("bob");
    let out = run(std::process::Command::new(bin("cloud-manager"))
        .args([
            "tenant-bundle",
            "--tenant",
            "default",
            "--user",
            "bob",
            "--data-dir",
        ])
        .arg(&m.dir)
        .arg("--out-dir")
        .arg(&bob_dir));
    assert!(out.ok, "{}", out.stderr);
    let bob = (bob_dir.join("default.pem"), bob_dir.join("default.key"));
    assert_eq!(list_as(&m, Some((&bob.0, &bob.1))).await.unwrap().len(), 1);

    // Bob watches events on a connection made before the revocation.
    let mut watch = tenant_client(&m.addr, &m.ca(), Some((&bob.0, &bob.1)))
        .watch_events(pb::WatchEventsRequest {
            from_start: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let revoke = |args: &[&str]| {
        run(std::process::Command::new(bin("cloud-manager"))
            .args(["tenant", "revoke", "--data-dir"])
            .arg(&m.dir)
            .args(args))
    };
    let list_file = m.dir.join("revoked-certs");
    // Bad input: refused with the reason, and nothing is written.
    for (args, why) in [
        (vec!["--serial", "zz"], "--serial"),
        (vec![], "--cert"),
        (
            vec!["--cert", enrolled.dir.join("node.pem").to_str().unwrap()],
            "not a tenant",
        ),
    ] {
        let out = revoke(&args);
        assert!(!out.ok, "{args:?} was accepted");
        assert!(out.stderr.contains(why), "{args:?}: {}", out.stderr);
        assert!(!list_file.exists(), "{args:?} wrote the revocation list");
    }
    let out = revoke(&["--cert", bob.0.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("revoked"), "{}", out.stdout);

    // A new connection with bob's certificate fails the handshake.
    let err = list_as(&m, Some((&bob.0, &bob.1))).await.unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
    // The running watch ends with PERMISSION_DENIED within seconds.
    let err = stream_end(
        &mut watch,
        Duration::from_secs(10),
        "the revoked certificate's watch",
    )
    .await
    .expect("the watch ended without saying why");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // The tenant's other certificate still works; revoking again is a no-op.
    assert_eq!(list_nodes(&mut m.tenant()).await.len(), 1);
    let again = revoke(&["--cert", bob.0.to_str().unwrap()]);
    assert!(
        again.ok && again.stdout.contains("already"),
        "{}",
        again.stdout
    );
}
