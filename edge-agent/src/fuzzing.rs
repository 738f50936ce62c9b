//! Entry points for the fuzz targets in `fuzz/` (not an API): PeerService
//! requests as a member receives them, and the assignment a node parses its
//! membership from.

use std::sync::LazyLock;

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use prost::Message;
use rustls::pki_types::CertificateDer;

use crate::membership::Membership;
use crate::offload::admission::{admitted_amounts, over_member_bound, vet};
use crate::offload::host::offer_fields;
use crate::offload_state::GuestLimits;
use crate::state::NodeInfo;

/// A node certificate to parse assignments against (any certificate: its
/// key is what a member certificate must match).
static NODE_CERT: LazyLock<Option<CertificateDer<'static>>> = LazyLock::new(|| {
    let key = rcgen::KeyPair::generate().ok()?;
    let cert = rcgen::CertificateParams::default().self_signed(&key).ok()?;
    Some(cert.der().clone())
});

/// The app of the catalog the offers are checked against.
pub fn catalog_app() -> pb::AppSpec {
    pb::AppSpec {
        name: "web".into(),
        command: vec!["sleep".into(), "100".into()],
        env: [("MODE".to_string(), "fast".to_string())].into(),
        resources: Some(pb::Resources {
            cpu_millis: 300,
            memory_mb: 64,
            ..Default::default()
        }),
        offloadable: true,
        ..Default::default()
    }
}

static CATALOG: LazyLock<Vec<pb::CatalogApp>> = LazyLock::new(|| {
    vec![pb::CatalogApp {
        name: "web".into(),
        slot: 1,
        digest: edgepool_common::catalog::app_digest(&catalog_app()).to_vec(),
    }]
});

fn info() -> NodeInfo {
    NodeInfo {
        node_id: "n1".into(),
        tenant: "t".into(),
        trust_domain: "edgepool.local".into(),
        manager: "127.0.0.1:7443".into(),
    }
}

/// The first byte picks what `data` is: an assignment, an offer (its own
/// fields, then the admission rules against `CATALOG` as if slot 1
/// offered it), a release, or a certificate's identity.
pub fn peer_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let (Ok(a), Some(cert)) = (pb::Assignment::decode(body), NODE_CERT.as_ref()) {
                let _ = Membership::from_assignment(&a, &info(), cert);
            }
        }
        1 => {
            if let Ok(req) = pb::OfferRequest::decode(body)
                && let Ok(spec) = offer_fields(&req)
            {
                let entry = CATALOG.iter().find(|c| c.name == spec.name);
                let _ = vet(entry, 1, spec);
                let amounts = admitted_amounts(spec, req.usage);
                let capacity = [2000, 4096, 100_000, 1_000_000, 0];
                let _ = over_member_bound(&[amounts], amounts, capacity, GuestLimits::default());
            }
        }
        2 => {
            let _ = pb::ReleaseRequest::decode(body);
        }
        _ => {
            if let Ok(identity) = Identity::from_cert_der(body) {
                let _ = Identity::parse_uri(&identity.to_uri());
            }
        }
    }
}

/// Starting inputs for `peer_requests` (see `cloud_manager::fuzzing`).
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let with = |kind: u8, msg: &dyn Fn(&mut Vec<u8>)| {
        let mut data = vec![kind];
        msg(&mut data);
        ("peer_requests", data)
    };
    let offer = pb::OfferRequest {
        app: Some(catalog_app()),
        usage: Some(pb::Resources {
            cpu_millis: 250,
            ..Default::default()
        }),
        reason: "cpu".into(),
        offer_id: "0123456789abcdef0123456789abcdef".into(),
        lease_ms: 30_000,
        renew: false,
    };
    vec![
        with(0, &|d| {
            pb::Assignment {
                pool: "p".into(),
                slot: 1,
                generation: 1,
                apps: vec![catalog_app()],
                catalog: CATALOG.clone(),
                ..Default::default()
            }
            .encode(d)
            .unwrap_or_default()
        }),
        with(1, &|d| offer.encode(d).unwrap_or_default()),
        with(2, &|d| {
            pb::ReleaseRequest {
                app: "web".into(),
                offer_id: offer.offer_id.clone(),
            }
            .encode(d)
            .unwrap_or_default()
        }),
        with(3, &|d| {
            d.extend_from_slice(NODE_CERT.as_deref().unwrap_or_default())
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The catalog's own app passes `vet`; every seed and some junk run
    /// without a panic; with `EDGEPOOL_FUZZ_SEEDS_DIR` set the seeds are
    /// written there (`scripts/fuzz.sh`).
    #[test]
    fn every_seed_runs() {
        assert!(vet(CATALOG.first(), 1, &catalog_app()).is_ok());
        let out = std::env::var_os("EDGEPOOL_FUZZ_SEEDS_DIR").map(std::path::PathBuf::from);
        for (i, (target, data)) in seeds().iter().enumerate() {
            peer_request(data);
            if let Some(dir) = &out {
                let dir = dir.join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("agent-seed-{i}")), data).unwrap();
            }
        }
        for junk in [&b""[..], b"\x01", b"\x01\x0a\xff", b"\x00\x0a\x01p"] {
            peer_request(junk);
        }
    }
}
