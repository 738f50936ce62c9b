//! Every RPC checks who is calling: hostile and misplaced certificates.

use std::path::{Path, PathBuf};

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
    let err = list_as(&m, Some((&no_uri.0, &no_uri.1))).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
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
