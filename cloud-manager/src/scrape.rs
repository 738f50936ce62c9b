//! The registry the manager's `--metrics-listen` listener serves: the
//! families of `metrics` plus `Fleet`, the figures computed at scrape time
//! from the committed registry (a lock-free snapshot) and the live table:
//! nodes by state, certificates by time to expiry, events kept.
//!
//! A scrape walks every node and pool once (O(fleet), like `NodeSummary`)
//! and holds the live table's read lock only to look up connections; the
//! data path never waits for it beyond that. Node certificates are parsed
//! once per serial and remembered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::manager::Manager;
use crate::model::{NodeState, now_ms};
use crate::node_list::shown_state;

/// The registry of a manager: its families and its fleet figures.
pub fn registry(manager: Arc<Manager>) -> Registry {
    let mut registry = Registry::default();
    manager.control().metrics.register(&mut registry);
    let root_expiry = not_after_of(manager.control().ca.cert_pem());
    registry.register_collector(Box::new(Fleet {
        manager,
        root_expiry,
        node_certs: Mutex::new(HashMap::new()),
    }));
    registry
}

/// The "within N days" buckets of `edgepool_certificates_expiring`.
const EXPIRY_DAYS: [(&str, i64); 5] = [
    ("1", 1),
    ("7", 7),
    ("30", 30),
    ("90", 90),
    ("+Inf", i64::MAX),
];

const STATES: [(NodeState, &str); 5] = [
    (NodeState::Free, "free"),
    (NodeState::Member, "member"),
    (NodeState::Suspect, "suspect"),
    (NodeState::Failed, "failed"),
    (NodeState::Fenced, "fenced"),
];

/// Figures computed at scrape time.
struct Fleet {
    manager: Arc<Manager>,
    /// The root CA's end (unix seconds), read once.
    root_expiry: Option<i64>,
    /// Node certificate serial -> its end (unix seconds).
    node_certs: Mutex<HashMap<String, i64>>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fleet")
    }
}

/// The end of a PEM certificate's validity, unix seconds.
fn not_after_of(pem: &str) -> Option<i64> {
    let der = edgepool_common::tls::certs_from_pem(pem, "certificate").ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.first()?.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Certificates of one kind: how many end within each bucket, and the
/// soonest end.
#[derive(Default)]
struct Expiries {
    within: [i64; EXPIRY_DAYS.len()],
    soonest: Option<i64>,
}

impl Expiries {
    fn add(&mut self, now_s: i64, end_s: i64) {
        let left = end_s - now_s;
        for (i, (_, days)) in EXPIRY_DAYS.iter().enumerate() {
            if left <= days.saturating_mul(86_400) {
                self.within[i] += 1;
            }
        }
        self.soonest = Some(self.soonest.map_or(left, |s| s.min(left)));
    }
}

impl Collector for Fleet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let control = self.manager.control();
        let Ok(r) = control.registry() else {
            return Ok(());
        };
        let now_s = (now_ms() / 1000) as i64;

        // Nodes by the state the API shows (a member without its stream
        // is SUSPECT).
        let mut by_state = [0i64; STATES.len()];
        {
            let live = control.live_nodes().map_err(|_| std::fmt::Error)?;
            for n in r.nodes.values() {
                let up = live.get(&n.key()).is_some_and(|l| l.health().connected);
                let shown = shown_state(n.state, up);
                if let Some(i) = STATES.iter().position(|(s, _)| *s == shown) {
                    by_state[i] += 1;
                }
            }
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_nodes",
            "Enrolled nodes by state (a member without its stream counts as suspect)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for ((_, name), count) in STATES.iter().zip(by_state) {
            ConstGauge::new(count).encode(m.encode_family(&[("state", *name)])?)?;
        }

        // Certificates by time to expiry.
        let mut kinds: Vec<(&str, Expiries)> = vec![
            ("root_ca", Expiries::default()),
            ("node", Expiries::default()),
            ("member", Expiries::default()),
        ];
        if let Some(end) = self.root_expiry {
            kinds[0].1.add(now_s, end);
        }
        {
            let mut cache = self.node_certs.lock().unwrap_or_else(|p| p.into_inner());
            let mut seen = HashMap::with_capacity(cache.len());
            for n in r.nodes.values() {
                let end = match cache.get(&n.cert_serial) {
                    Some(end) => Some(*end),
                    None => not_after_of(&n.cert_pem),
                };
                if let Some(end) = end {
                    kinds[1].1.add(now_s, end);
                    seen.insert(n.cert_serial.clone(), end);
                }
            }
            *cache = seen;
        }
        for p in r.pools.values() {
            for member in &p.members {
                kinds[2]
                    .1
                    .add(now_s, (member.cert_not_after_ms / 1000) as i64);
            }
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_certificates_expiring",
            "Certificates that end within within_days days (cumulative; +Inf: all), by kind",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (kind, e) in &kinds {
            for ((label, _), count) in EXPIRY_DAYS.iter().zip(e.within) {
                ConstGauge::new(count)
                    .encode(m.encode_family(&[("kind", *kind), ("within_days", *label)])?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_certificate_soonest_expiry_seconds",
            "Seconds until the first certificate of each kind ends (negative: already ended)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (kind, e) in &kinds {
            if let Some(s) = e.soonest {
                ConstGauge::new(s).encode(m.encode_family(&[("kind", *kind)])?)?;
            }
        }

        // The event log: events kept in every tenant's ring.
        let kept: usize = r.events.tenants().map(|(_, t)| t.events.len()).sum();
        let m = encoder.encode_descriptor(
            "edgepool_event_log_events",
            "Events kept in the event log (every tenant's ring)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(kept as i64).encode(m)?;

        let degraded: usize = r.pools.values().map(|p| p.degraded.len()).sum();
        let m = encoder.encode_descriptor(
            "edgepool_pools",
            "Pools",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(r.pools.len() as i64).encode(m)?;
        let m = encoder.encode_descriptor(
            "edgepool_pool_degraded_slots",
            "Pool slots waiting for a spare (their node failed and none was free)",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(degraded as i64).encode(m)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_parses_and_has_every_family() {
        let harness = crate::fuzzing::Harness::new();
        let text = edgepool_common::metrics::render(&registry(harness.manager())).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (key, value) = line.rsplit_once(' ').unwrap();
            assert!(key.starts_with("edgepool_"), "{line}");
            value.parse::<f64>().unwrap();
        }
        for family in [
            "edgepool_telemetry_messages counter",
            "edgepool_agent_streams gauge",
            // (edgepool_rpc_duration_seconds shows from the first call.)
            "edgepool_failovers counter",
            "edgepool_failover_duration_seconds histogram",
            "edgepool_offloads counter",
            "edgepool_events counter",
            "edgepool_store_commit_duration_seconds histogram",
            "edgepool_nodes gauge",
            "edgepool_certificates_expiring gauge",
            "edgepool_certificate_soonest_expiry_seconds gauge",
            "edgepool_event_log_events gauge",
            "edgepool_pools gauge",
            "edgepool_pool_degraded_slots gauge",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family}\n")),
                "{family}:\n{text}"
            );
        }
        // The harness enrolled three nodes, none connected now.
        for sample in [
            "edgepool_nodes{state=\"free\"} 3",
            "edgepool_certificates_expiring{kind=\"node\",within_days=\"+Inf\"} 3",
            "edgepool_certificates_expiring{kind=\"root_ca\",within_days=\"+Inf\"} 1",
            "edgepool_failovers_total{outcome=\"moved\"} 0",
            "edgepool_events_total{kind=\"NODE_ENROLLED\"} 3",
        ] {
            assert!(text.contains(sample), "{sample}:\n{text}");
        }
    }

    #[test]
    fn expiries_are_cumulative() {
        let mut e = Expiries::default();
        e.add(0, 3600);
        e.add(0, 10 * 86_400);
        e.add(0, 400 * 86_400);
        assert_eq!(e.within, [1, 1, 2, 2, 3]);
        assert_eq!(e.soonest, Some(3600));
    }
}
