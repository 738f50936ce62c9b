//! The agent's Prometheus metric families (`edgepool_*`): one `Metrics` per
//! agent, kept in `Shared` and recorded into where things happen (the
//! uplink, the prober, the offload scheduler and host). Recording is an
//! atomic add or a histogram observation. The apps' figures (by state,
//! restarts, CPU, memory) are read at scrape time from the latest app
//! report the measuring task published, so a scrape never measures
//! anything and never takes the runtime's locks.
//!
//! A leaf: it imports only the generated types.

use std::sync::Arc;

use edgepool_common::proto as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    pub peer_slot: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OffloadLabels {
    /// cpu, memory, disk, network, disk_io; or what bounded an admission
    /// (`guest_bound`), or `none`.
    pub resource: &'static str,
    pub outcome: &'static str,
}

type HistogramFamily = Family<SlotLabels, Histogram, fn() -> Histogram>;

fn rtt_buckets() -> Histogram {
    // 0.5 ms to about 2 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 13))
}

/// Every family the agent records into. Cloning shares the families.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Streams to the manager that ended and were dialled again.
    pub reconnects: Counter,
    /// Round trip of each answered `Probe`, by the peer's slot.
    pub probe_rtt: HistogramFamily,
    /// 1 when the latest probe of a peer was answered, else 0.
    pub peer_reachable: Family<SlotLabels, Gauge>,
    /// The owner's side: each app the scheduler planned to move, by the
    /// resource over its threshold and what became of it.
    pub offload_decisions: Family<OffloadLabels, Counter>,
    /// The host's side: offers (not renewals) by outcome.
    pub offload_admissions: Family<OffloadLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            reconnects: Counter::default(),
            probe_rtt: Family::new_with_constructor(rtt_buckets as fn() -> Histogram),
            peer_reachable: Family::default(),
            offload_decisions: Family::default(),
            offload_admissions: Family::default(),
        }
    }
}

/// The resource names the scheduler uses, as `'static` labels (anything
/// else: `other`, so a peer's offer cannot make up label values).
pub fn resource_label(name: &str) -> &'static str {
    ["cpu", "memory", "disk", "network", "disk_io"]
        .into_iter()
        .find(|r| *r == name)
        .unwrap_or("other")
}

impl Metrics {
    /// An offload decision of the owner's scheduler.
    pub fn decision(&self, resource: &str, outcome: &'static str) {
        self.offload_decisions
            .get_or_create(&OffloadLabels {
                resource: resource_label(resource),
                outcome,
            })
            .inc();
    }

    /// An admission decision of the host.
    pub fn admission(&self, resource: &'static str, outcome: &'static str) {
        self.offload_admissions
            .get_or_create(&OffloadLabels { resource, outcome })
            .inc();
    }

    /// The latest probe round: every current peer's reachability (peers no
    /// longer in the pool are dropped) and the answered probes' round trips.
    pub fn probed(&self, results: &[(u32, Option<f64>)]) {
        self.peer_reachable.clear();
        for (slot, rtt) in results {
            let labels = SlotLabels { peer_slot: *slot };
            self.peer_reachable
                .get_or_create(&labels)
                .set(i64::from(rtt.is_some()));
            if let Some(seconds) = rtt {
                self.probe_rtt.get_or_create(&labels).observe(*seconds);
            }
        }
    }

    /// The registry the `--metrics-listen` listener serves: these families
    /// and the apps' figures from `latest` (the newest app report).
    pub fn registry(&self, latest: LatestReport) -> Registry {
        let mut r = Registry::default();
        r.register(
            "edgepool_agent_stream_reconnects",
            "Streams to the manager that ended and were dialled again",
            self.reconnects.clone(),
        );
        r.register(
            "edgepool_peer_probe_rtt_seconds",
            "Round trip of answered peer probes, by the peer's slot",
            self.probe_rtt.clone(),
        );
        r.register(
            "edgepool_peer_reachable",
            "1 when the latest probe of the peer in this slot was answered, else 0",
            self.peer_reachable.clone(),
        );
        r.register(
            "edgepool_offload_decisions",
            "Apps the scheduler planned to move, by the resource over its threshold and outcome (moved, no_peer_took_it, no_peer_fits)",
            self.offload_decisions.clone(),
        );
        r.register(
            "edgepool_offload_admissions",
            "Offers from pool members, by outcome (admitted, refused, taken, denied) and the resource that refused",
            self.offload_admissions.clone(),
        );
        r.register_collector(Box::new(Apps(latest)));
        r
    }
}

/// Reads the newest app report (None before the first measurement).
pub type LatestReport = Arc<dyn Fn() -> Option<pb::AppReport> + Send + Sync>;

/// The apps' figures from the newest app report.
struct Apps(LatestReport);

impl std::fmt::Debug for Apps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Apps")
    }
}

const STATES: [(pb::AppState, &str); 5] = [
    (pb::AppState::Pending, "pending"),
    (pb::AppState::Running, "running"),
    (pb::AppState::Backoff, "backoff"),
    (pb::AppState::Stopped, "stopped"),
    (pb::AppState::Failed, "failed"),
];

impl Collector for Apps {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let report = (self.0)().unwrap_or_default();
        let mut by_state = [0i64; STATES.len()];
        for a in &report.apps {
            if let Some(i) = STATES.iter().position(|(s, _)| *s as i32 == a.state) {
                by_state[i] += 1;
            }
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_apps",
            "Apps this agent supervises (its group's and its guests'), by state",
            None,
            MetricType::Gauge,
        )?;
        for ((_, name), n) in STATES.iter().zip(by_state) {
            ConstGauge::new(n).encode(m.encode_family(&[("state", *name)])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_app_restarts",
            "Restarts of each app after it exited or failed to start",
            None,
            MetricType::Counter,
        )?;
        for a in &report.apps {
            ConstCounter::new(u64::from(a.restarts))
                .encode(m.encode_family(&[("app", a.app.as_str())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_app_cpu_cores",
            "CPU each app uses, in cores",
            None,
            MetricType::Gauge,
        )?;
        for a in &report.apps {
            let millis = a.usage.as_ref().map_or(0, |u| u.cpu_millis);
            ConstGauge::new(millis as f64 / 1000.0)
                .encode(m.encode_family(&[("app", a.app.as_str())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "edgepool_app_memory_bytes",
            "Memory each app uses (its cgroup's, else its processes' resident memory)",
            None,
            MetricType::Gauge,
        )?;
        for a in &report.apps {
            let mib = a.usage.as_ref().map_or(0, |u| u.memory_mb);
            ConstGauge::new(mib.saturating_mul(1024 * 1024) as i64)
                .encode(m.encode_family(&[("app", a.app.as_str())])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_every_family_and_the_apps() {
        let m = Metrics::default();
        m.reconnects.inc();
        m.probed(&[(2, Some(0.003)), (3, None)]);
        m.decision("cpu", "moved");
        m.admission("memory", "refused");
        let report = pb::AppReport {
            apps: vec![pb::Placement {
                app: "web".into(),
                state: pb::AppState::Running as i32,
                restarts: 2,
                usage: Some(pb::Resources {
                    cpu_millis: 250,
                    memory_mb: 3,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let registry = m.registry(Arc::new(move || Some(report.clone())));
        let text = edgepool_common::metrics::render(&registry).unwrap();
        for line in [
            "edgepool_agent_stream_reconnects_total 1",
            "edgepool_peer_reachable{peer_slot=\"2\"} 1",
            "edgepool_peer_reachable{peer_slot=\"3\"} 0",
            "edgepool_peer_probe_rtt_seconds_count{peer_slot=\"2\"} 1",
            "edgepool_offload_decisions_total{resource=\"cpu\",outcome=\"moved\"} 1",
            "edgepool_offload_admissions_total{resource=\"memory\",outcome=\"refused\"} 1",
            "edgepool_apps{state=\"running\"} 1",
            "edgepool_app_restarts_total{app=\"web\"} 2",
            "edgepool_app_cpu_cores{app=\"web\"} 0.25",
            "edgepool_app_memory_bytes{app=\"web\"} 3145728",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn a_peer_that_left_the_pool_is_dropped() {
        let m = Metrics::default();
        m.probed(&[(2, Some(0.001)), (3, Some(0.001))]);
        m.probed(&[(2, None)]);
        let registry = m.registry(Arc::new(|| None));
        let text = edgepool_common::metrics::render(&registry).unwrap();
        assert!(
            !text.contains("edgepool_peer_reachable{peer_slot=\"3\"}"),
            "{text}"
        );
    }
}
