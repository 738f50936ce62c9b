//! Entry points for the fuzz targets in `fuzz/` (not an API): each takes
//! untrusted bytes the way the manager receives them and runs them through
//! the same code a request takes, past the network and the TLS handshake.
//!
//! `Harness` is a real `Manager` (real CA, real registry, the real domain
//! code) whose store keeps nothing (`NullStore`), so a run costs no fsync;
//! three nodes of tenant `t` are enrolled first, so that requests naming
//! them get past "no such node" into the deeper checks.

use std::sync::Arc;

use edgepool_common::proto as pb;
use prost::Message;

use crate::agent_api::{Reply, handle_up};
use crate::ca::Ca;
use crate::config::ManagerConfig;
use crate::manager::Manager;
use crate::model::Hello;
use crate::node_key::NodeKey;
use crate::pool::PolicyDef;
use crate::pools::PoolRequest;
use crate::registry::Registry;
use crate::store::{Store, StoreError, WriteSet};

/// A store that keeps nothing: every commit succeeds.
struct NullStore;

impl Store for NullStore {
    fn load(&self) -> Result<Registry, StoreError> {
        Ok(Registry::default())
    }

    fn commit(&self, _changes: &[&WriteSet]) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The tenant whose requests the harness makes.
pub const TENANT: &str = "t";
/// Its enrolled nodes.
pub const NODES: [&str; 3] = ["n1", "n2", "n3"];

pub struct Harness {
    rt: tokio::runtime::Runtime,
    manager: Arc<Manager>,
}

impl Harness {
    /// A manager with `NODES` enrolled. Panics if that fails (a harness
    /// that cannot start is a broken build, not a finding).
    pub fn new() -> Harness {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let config = ManagerConfig {
            data_dir: std::env::temp_dir().join(format!("edgepool-fuzz-{}", std::process::id())),
            ..ManagerConfig::default()
        };
        let ca = Ca::generate(&config.trust_domain).expect("CA");
        let manager = Arc::new(Manager::new(config, ca, Box::new(NullStore)).expect("manager"));
        for node in NODES {
            let (token, _) = rt
                .block_on(
                    manager
                        .enrollment()
                        .create_token(TENANT, 600, Default::default()),
                )
                .expect("token");
            let key = rcgen::KeyPair::generate().expect("key");
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .and_then(|c| c.pem())
                .expect("csr");
            manager
                .enrollment()
                .enroll(&token, node, &csr, false)
                .expect("enroll");
            // Its capacity, as its first hello tells it.
            let hello = Hello::from(pb::Hello {
                agent_version: "fuzz".into(),
                peer_address: "127.0.0.1:7444".into(),
                capacity: Some(pb::Resources {
                    cpu_millis: 4000,
                    memory_mb: 8192,
                    disk_mb: 100_000,
                    network_mbps: 1000,
                    disk_io_kbps: 0,
                }),
                ..Default::default()
            });
            rt.block_on(async {
                let key = NodeKey::new(TENANT, node);
                let (conn, live) = manager.streams().open_stream(&key, &hello).await?;
                manager.streams().close_stream(&key, &live, conn);
                Ok::<_, crate::control::ManagerError>(())
            })
            .expect("hello");
        }
        Harness { rt, manager }
    }

    /// The manager (unit tests look at it after the harness made it).
    pub fn manager(&self) -> Arc<Manager> {
        self.manager.clone()
    }

    /// One agent stream: `data` is a sequence of length-delimited
    /// `AgentMessage`s, the first of which must be the hello; its first
    /// byte picks which enrolled node speaks.
    pub fn agent_stream(&self, data: &[u8]) {
        let Some((&pick, mut rest)) = data.split_first() else {
            return;
        };
        let node = &NodeKey::new(TENANT, NODES[usize::from(pick) % NODES.len()]);
        let Ok(first) = pb::AgentMessage::decode_length_delimited(&mut rest) else {
            return;
        };
        let Some(pb::agent_message::Msg::Hello(hello)) = first.msg else {
            return;
        };
        self.rt.block_on(async {
            let streams = self.manager.streams();
            let Ok((conn_id, live)) = streams.open_stream(node, &Hello::from(hello)).await else {
                return;
            };
            while !rest.is_empty() {
                let Ok(msg) = pb::AgentMessage::decode_length_delimited(&mut rest) else {
                    break;
                };
                let Some(up) = msg.msg else { continue };
                if let Reply::End(_) = handle_up(&self.manager, node, &live, up).await {
                    break;
                }
            }
            streams.close_stream(node, &live, conn_id);
        });
    }

    /// One TenantService or Enroll request: the first byte picks the
    /// method, the rest is its encoded request; it runs through the
    /// handler's conversions and the domain call, as tenant `TENANT`.
    pub fn tenant_request(&self, data: &[u8]) {
        let Some((&method, body)) = data.split_first() else {
            return;
        };
        let m = &self.manager;
        match method % 8 {
            0 => {
                if let Ok(req) = pb::CreatePoolRequest::decode(body) {
                    let _ = pool_request(req).map(|r| m.pools().create_pool(TENANT, r));
                }
            }
            1 => {
                if let Ok(req) = pb::UpdateAppsRequest::decode(body)
                    && let Ok(apps) = crate::api::apps_from(req.apps)
                {
                    let _ = m.pools().update_apps(TENANT, &req.pool, apps);
                }
            }
            2 => {
                if let Ok(req) = pb::UpdatePolicyRequest::decode(body)
                    && let Some(Ok(policy)) = req.policy.map(PolicyDef::try_from)
                {
                    let _ = m.pools().update_policy(TENANT, &req.pool, policy);
                }
            }
            3 => {
                if let Ok(req) = pb::ListNodesRequest::decode(body)
                    && let Ok(query) = crate::node_list::NodeQuery::try_from(req)
                {
                    let _ = m.nodes().list_nodes_page(TENANT, &query);
                }
            }
            4 => {
                if let Ok(req) = pb::CreateJoinTokenRequest::decode(body) {
                    let labels = req.labels.into_iter().collect();
                    let _ = self.rt.block_on(m.enrollment().create_token(
                        TENANT,
                        req.ttl_seconds,
                        labels,
                    ));
                }
            }
            5 => {
                if let Ok(req) = pb::EnrollRequest::decode(body) {
                    let _ =
                        m.enrollment()
                            .enroll(&req.token, &req.node_id, &req.csr_pem, req.force);
                }
            }
            6 => {
                if let Ok(req) = pb::GetNodeRequest::decode(body) {
                    let _ = m.nodes().get_node(TENANT, &req.node_id);
                }
            }
            _ => {
                if let Ok(req) = pb::DeletePoolRequest::decode(body) {
                    let _ = m.pools().get_pool(TENANT, &req.name);
                    let _ = m.pools().delete_pool(TENANT, &req.name);
                }
            }
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Harness::new()
    }
}

/// A CreatePool request as the handler converts it.
fn pool_request(req: pb::CreatePoolRequest) -> Result<PoolRequest, ()> {
    let policy = req
        .policy
        .map(PolicyDef::try_from)
        .transpose()
        .map_err(|_| ())?;
    Ok(PoolRequest {
        name: req.name,
        node_ids: req.node_ids,
        apps: crate::api::apps_from(req.apps).map_err(|_| ())?,
        policy,
        spare_labels: req.spare_labels.into_iter().collect(),
    })
}

/// A certificate, CSR or PEM text from outside: every parser the manager
/// runs on one.
pub fn certificates(ca: &Ca, data: &[u8]) {
    use edgepool_common::identity::{Identity, cert_serial_hex};
    let _ = Identity::from_cert_der(data);
    let _ = cert_serial_hex(data);
    let _ = edgepool_common::trust::permitted_uri(data);
    let text = String::from_utf8_lossy(data);
    let _ = edgepool_common::tls::certs_from_pem(&text, "fuzz");
    let _ = edgepool_common::tls::key_from_pem(&text, "fuzz");
    let node = Identity::Node {
        domain: ca.domain().to_string(),
        tenant: TENANT.into(),
        node_id: "n9".into(),
    };
    let _ = ca.sign_node_csr(&text, &node, time::Duration::hours(1));
    let _ = Identity::parse_uri(&text);
    let _ = crate::revocations::valid_serial(&text);
}

/// A manager config file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = ManagerConfig::from_toml(&text) {
        let _ = c.validate();
    }
}

/// Starting inputs for the fuzz targets (`scripts/fuzz.sh` writes them
/// into each target's corpus): one well-formed input per path, so the
/// fuzzer starts past the decoders.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use pb::agent_message::Msg;
    let mut out = Vec::new();
    let stream = |pick: u8, msgs: Vec<Msg>| {
        let mut data = vec![pick];
        for msg in msgs {
            let m = pb::AgentMessage { msg: Some(msg) };
            m.encode_length_delimited(&mut data).unwrap_or_default();
        }
        data
    };
    let hello = Msg::Hello(pb::Hello {
        agent_version: "seed".into(),
        peer_address: "127.0.0.1:7444".into(),
        capacity: Some(pb::Resources {
            cpu_millis: 2000,
            memory_mb: 1024,
            ..Default::default()
        }),
        ..Default::default()
    });
    let report = Msg::AppReport(pb::AppReport {
        pool: "p".into(),
        generation: 1,
        apps: vec![pb::Placement {
            app: "a".into(),
            pid: 42,
            ..Default::default()
        }],
        offloads: vec![pb::OffloadRecord {
            app: "a".into(),
            from_node: "n1".into(),
            to_node: "n2".into(),
            to_slot: 2,
            resource: "cpu".into(),
            ..Default::default()
        }],
        ..Default::default()
    });
    out.push((
        "agent_stream",
        stream(
            0,
            vec![
                hello.clone(),
                Msg::Telemetry(pb::Telemetry::default()),
                report,
                Msg::PeerLiveness(pb::PeerLiveness {
                    peers: vec![pb::PeerAlive {
                        slot: 2,
                        node_id: "n2".into(),
                        reachable: false,
                        silent_ms: 5000,
                    }],
                }),
                Msg::PeerCheckResult(pb::PeerCheckResult::default()),
                Msg::Pong(pb::Pong { nonce: 1 }),
                Msg::Heartbeat(pb::Heartbeat { seq: 1 }),
            ],
        ),
    ));
    out.push(("agent_stream", stream(1, vec![hello.clone(), hello])));
    let app = |name: &str| pb::AppSpec {
        name: name.into(),
        command: vec!["sleep".into(), "100".into()],
        resources: Some(pb::Resources {
            cpu_millis: 100,
            memory_mb: 64,
            ..Default::default()
        }),
        offloadable: true,
        ..Default::default()
    };
    let policy = pb::Policy {
        cpu: Some(pb::Threshold {
            high: 0.8,
            low: 0.5,
        }),
        sustain_seconds: 3,
        ..Default::default()
    };
    let request = |method: u8, msg: &dyn Fn(&mut Vec<u8>)| {
        let mut data = vec![method];
        msg(&mut data);
        data
    };
    let create = pb::CreatePoolRequest {
        name: "p".into(),
        node_ids: vec!["n1".into(), "n2".into()],
        apps: vec![app("a"), app("b"), app("c")],
        policy: Some(policy),
        ..Default::default()
    };
    let mut tenant = vec![
        request(0, &|d| create.encode(d).unwrap_or_default()),
        request(1, &|d| {
            pb::UpdateAppsRequest {
                pool: "p".into(),
                apps: vec![app("a"), app("d")],
            }
            .encode(d)
            .unwrap_or_default()
        }),
        request(2, &|d| {
            pb::UpdatePolicyRequest {
                pool: "p".into(),
                policy: Some(policy),
            }
            .encode(d)
            .unwrap_or_default()
        }),
        request(3, &|d| {
            pb::ListNodesRequest {
                page_size: 2,
                ..Default::default()
            }
            .encode(d)
            .unwrap_or_default()
        }),
        request(4, &|d| {
            pb::CreateJoinTokenRequest {
                ttl_seconds: 60,
                ..Default::default()
            }
            .encode(d)
            .unwrap_or_default()
        }),
        request(6, &|d| {
            pb::GetNodeRequest {
                node_id: "n1".into(),
            }
            .encode(d)
            .unwrap_or_default()
        }),
        request(7, &|d| {
            pb::DeletePoolRequest { name: "p".into() }
                .encode(d)
                .unwrap_or_default()
        }),
    ];
    if let Ok(key) = rcgen::KeyPair::generate()
        && let Ok(csr) = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
    {
        tenant.push(request(5, &|d| {
            pb::EnrollRequest {
                token: format!("ept_{}", "0".repeat(43)),
                node_id: "n9".into(),
                csr_pem: csr.clone(),
                force: false,
            }
            .encode(d)
            .unwrap_or_default()
        }));
        out.push(("certificates", csr.into_bytes()));
    }
    out.extend(tenant.into_iter().map(|t| ("tenant_requests", t)));
    if let Ok(ca) = Ca::generate("edgepool.local")
        && let Ok(bundle) = ca.issue_tenant_client(TENANT, "admin", time::Duration::days(1))
    {
        if let Ok(der) = edgepool_common::tls::certs_from_pem(&bundle.cert_pem, "seed") {
            out.push(("certificates", der[0].to_vec()));
        }
        out.push(("certificates", bundle.cert_pem.into_bytes()));
        out.push(("certificates", ca.cert_pem().as_bytes().to_vec()));
    }
    out.push((
        "certificates",
        b"spiffe://edgepool.local/tenant/t/pool/p/member/1".to_vec(),
    ));
    out.push((
        "config_files",
        include_str!("../manager.example.toml").as_bytes().to_vec(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delimited(msgs: &[pb::AgentMessage]) -> Vec<u8> {
        let mut out = vec![0];
        for m in msgs {
            m.encode_length_delimited(&mut out).unwrap();
        }
        out
    }

    /// The harness reaches the domain code: a well-formed pool request
    /// creates a pool, a stream with a hello connects the node, and junk
    /// is refused without a panic.
    #[test]
    fn the_entry_points_reach_the_domain_and_survive_junk() {
        let h = Harness::new();
        let req = pb::CreatePoolRequest {
            name: "p".into(),
            node_ids: vec!["n1".into(), "n2".into()],
            apps: ["a", "b"]
                .map(|name| pb::AppSpec {
                    name: name.into(),
                    command: vec!["sleep".into(), "1".into()],
                    ..Default::default()
                })
                .to_vec(),
            ..Default::default()
        };
        let made = pool_request(req.clone()).map(|r| h.manager.pools().create_pool(TENANT, r));
        assert!(matches!(made, Ok(Ok(_))), "{made:?}");
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                agent_version: "fuzz".into(),
                ..Default::default()
            })),
        };
        let beat = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat::default())),
        };
        h.agent_stream(&delimited(&[hello, beat]));
        for junk in [&b""[..], b"\x00", b"\x05\xff\xff\xff", b"\x00\x0a\x03abc"] {
            h.agent_stream(junk);
            h.tenant_request(junk);
            certificates(&Ca::generate("edgepool.local").unwrap(), junk);
            config(junk);
        }
        config(b"listen = \"127.0.0.1:1\"\nevents_per_tenant = 0\n");
    }

    /// Every seed runs through its target; with `EDGEPOOL_FUZZ_SEEDS_DIR`
    /// set (`scripts/fuzz.sh`), they are also written there, one directory
    /// per target.
    #[test]
    fn every_seed_runs() {
        let h = Harness::new();
        let ca = Ca::generate("edgepool.local").unwrap();
        let seeds = seeds();
        for target in [
            "agent_stream",
            "tenant_requests",
            "certificates",
            "config_files",
        ] {
            assert!(
                seeds.iter().any(|(t, _)| *t == target),
                "no seed for {target}"
            );
        }
        let out = std::env::var_os("EDGEPOOL_FUZZ_SEEDS_DIR").map(std::path::PathBuf::from);
        for (i, (target, data)) in seeds.iter().enumerate() {
            match *target {
                "agent_stream" => h.agent_stream(data),
                "tenant_requests" => h.tenant_request(data),
                "certificates" => certificates(&ca, data),
                _ => config(data),
            }
            if let Some(dir) = &out {
                let dir = dir.join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{i}")), data).unwrap();
            }
        }
    }
}
