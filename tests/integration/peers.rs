//! Mutual trust inside a pool: every ordered pair of members completes a
//! peer RPC over mutual TLS with member certificates, and nobody else gets
//! in: a member of another pool, a free node, another tenant's node, a
//! client without a certificate, a replaced (renewed) certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_tests::*;
use pb::peer_service_client::PeerServiceClient;

use crate::pools::{Fleet, app, create_pool, get_pool, wait_running};

/// Calls Probe on `address` as the holder of `chain`+`key`, expecting the
/// server to be member `slot` of `pool`.
pub async fn probe_as(
    pool_ca_pem: &str,
    address: &str,
    pool: &str,
    slot: u32,
    identity: Option<(
        Vec<rustls::pki_types::CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    )>,
) -> Result<pb::ProbeResponse, tonic::Status> {
    let roots = pool_roots(pool_ca_pem);
    let pool = pool.to_string();
    let verifier = tls::SpiffeServerVerifier::new(
        roots,
        move |id| matches!(id, Identity::Member { pool: p, slot: s, .. } if *p == pool && *s == slot),
    );
    let config = tls::client_config_with_verifier(verifier, identity).unwrap();
    let channel = tls::channel(address, Arc::new(config), Duration::from_secs(5)).unwrap();
    PeerServiceClient::new(channel)
        .probe(pb::ProbeRequest {})
        .await
        .map(|r| r.into_inner())
}

/// The member identity of `node` in `pool` (member cert + pool CA + the
/// node's own key, read from its data dir).
pub(crate) fn member_identity(
    f: &Fleet,
    pool: &pb::Pool,
    node: &str,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let m = pool.members.iter().find(|m| m.node_id == node).unwrap();
    let mut chain = tls::certs_from_pem(&m.cert_pem, "member").unwrap();
    chain.extend(tls::certs_from_pem(&pool.ca_pem, "pool ca").unwrap());
    (
        chain,
        tls::read_key(&f.agents[node].0.dir.join("node.key")).unwrap(),
    )
}

fn node_identity(
    dir: &Path,
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    (
        tls::read_certs(&dir.join("node.pem")).unwrap(),
        tls::read_key(&dir.join("node.key")).unwrap(),
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Waits until every member of `pool` reports every other member reachable.
async fn wait_full_matrix(f: &Fleet, pool: &str, members: &[&str]) {
    eventually(&format!("full peer matrix of {pool}"), DEADLINE, || async {
        for id in members {
            let n = get_node(&mut f.m.tenant(), id).await?;
            let ok: Vec<&str> = n
                .peers
                .iter()
                .filter(|p| p.reachable)
                .map(|p| p.node_id.as_str())
                .collect();
            let others: Vec<&str> = members.iter().copied().filter(|m| m != id).collect();
            if ok != others {
                return None;
            }
        }
        Some(())
    })
    .await
}

#[tokio::test]
async fn members_trust_each_other_and_nobody_else() {
    let f = Fleet::start(5, &[]).await;
    let a = ["node-1", "node-2", "node-3"];
    create_pool(
        &f.m,
        "pa",
        &a,
        (1..=3)
            .map(|i| app(&format!("a{i}"), &["sleep", &format!("{}", 500_000 + i)]))
            .collect(),
    )
    .await
    .unwrap();
    create_pool(
        &f.m,
        "pb",
        &["node-4", "node-5"],
        vec![
            app("b1", &["sleep", "500011"]),
            app("b2", &["sleep", "500012"]),
        ],
    )
    .await
    .unwrap();
    // A free node and another tenant's node, both enrolled (certificates
    // from the same root CA), neither in pool pa.
    let free = enroll(&f.m, f.tmp.path(), "free-node").await;
    let mut other = f.m.other_tenant("other");
    let token = create_token(&mut other, 600).await;
    let out = join(&f.m, &f.tmp.path().join("theirs"), "theirs", &token, &[]);
    assert!(out.ok, "{}", out.stderr);

    // Every ordered pair of members completes a real agent-to-agent probe
    // (6 pairs in pa, 2 in pb).
    wait_full_matrix(&f, "pa", &a).await;
    wait_full_matrix(&f, "pb", &["node-4", "node-5"]).await;

    let pa = wait_running(&f.m, "pa").await;
    let pb_pool = get_pool(&f.m, "pb").await;
    let target = pa.members.iter().find(|m| m.slot == 1).unwrap();
    let addr = target.peer_address.clone();
    let ca = pa.ca_pem.clone();

    // Positive control: member 2 of pa calls member 1.
    let ok = probe_as(
        &ca,
        &addr,
        "pa",
        1,
        Some(member_identity(&f, &pa, "node-2")),
    )
    .await
    .unwrap();
    assert_eq!(
        (ok.node_id.as_str(), ok.slot, ok.caller_slot),
        ("node-1", 1, 2)
    );

    // A member of another pool (valid chain, same tenant, same root):
    // not from pa's CA, so refused in the handshake.
    let err = probe_as(
        &ca,
        &addr,
        "pa",
        1,
        Some(member_identity(&f, &pb_pool, "node-4")),
    )
    .await
    .unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
    // A free node's identity certificate.
    let err = probe_as(&ca, &addr, "pa", 1, Some(node_identity(&free.dir)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // Another tenant's node.
    let err = probe_as(
        &ca,
        &addr,
        "pa",
        1,
        Some(node_identity(&f.tmp.path().join("theirs"))),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // A tenant's API certificate.
    let tenant = (
        tls::read_certs(&f.m.dir.join("tenant.pem")).unwrap(),
        tls::read_key(&f.m.dir.join("tenant.key")).unwrap(),
    );
    let err = probe_as(&ca, &addr, "pa", 1, Some(tenant))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    // No certificate at all: refused in the handshake.
    let err = probe_as(&ca, &addr, "pa", 1, None).await.unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
    // The client side checks too: member 1's address does not pass as
    // member 3.
    let err = probe_as(
        &ca,
        &addr,
        "pa",
        3,
        Some(member_identity(&f, &pa, "node-2")),
    )
    .await
    .unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
}

#[tokio::test]
async fn member_certificates_are_renewed_and_old_ones_refused() {
    let f = Fleet::start(
        2,
        &[
            "--member-cert-validity-seconds",
            "6",
            "--member-cert-check-ms",
            "200",
        ],
    )
    .await;
    let nodes = ["node-1", "node-2"];
    create_pool(
        &f.m,
        "r",
        &nodes,
        vec![
            app("r1", &["sleep", "600001"]),
            app("r2", &["sleep", "600002"]),
        ],
    )
    .await
    .unwrap();
    let first = wait_running(&f.m, "r").await;
    wait_full_matrix(&f, "r", &nodes).await;
    let old_identity = member_identity(&f, &first, "node-2");
    let serial = |p: &pb::Pool, slot: u32| {
        p.members
            .iter()
            .find(|m| m.slot == slot)
            .unwrap()
            .cert_serial
            .clone()
    };
    // Renewed at a third of 6 s left, i.e. after about 4 s.
    let renewed = eventually(
        "member certificates renewed",
        Duration::from_secs(20),
        || async {
            let p = get_pool(&f.m, "r").await;
            (serial(&p, 1) != serial(&first, 1) && serial(&p, 2) != serial(&first, 2)).then_some(p)
        },
    )
    .await;
    assert!(
        renewed.members.iter().all(|m| m.generation == 1),
        "renewal is not a move"
    );
    // The renewed certificates are in use: the agents still reach each other
    // after the renewal (a successful probe newer than it).
    let renewed_at = now_ms();
    eventually("peers reach each other after renewal", DEADLINE, || async {
        let n = get_node(&mut f.m.tenant(), "node-1").await?;
        let p = n.peers.first()?;
        let ok = p.last_ok.as_ref()?;
        let ok_ms = ok.seconds as u64 * 1000 + ok.nanos as u64 / 1_000_000;
        (p.reachable && ok_ms > renewed_at).then_some(())
    })
    .await;
    // The replaced certificate of slot 2 is refused by slot 1, in the
    // handshake.
    let addr = renewed.members[0].peer_address.clone();
    let err = probe_as(&renewed.ca_pem, &addr, "r", 1, Some(old_identity))
        .await
        .unwrap_err();
    assert!(refused_at_tls(&err), "{err}");
}
