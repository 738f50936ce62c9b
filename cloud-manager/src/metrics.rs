//! The manager's Prometheus metric families (`edgepool_*`), recorded where
//! things happen: one `Metrics` per manager, held by `Control` and reached
//! through it. Recording is an atomic add or a histogram observation; no
//! family is read on the data path. The figures derived from the registry
//! and the live table (nodes by state, certificates, the event log) are
//! computed at scrape time by `scrape`, which also builds the registry the
//! `--metrics-listen` listener serves.
//!
//! A leaf: it imports only `events` (the kinds it counts).

use edgepool_common::metrics::{RpcHistogram, rpc_histogram};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::events::{EventKind, EventRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// The resources an offload names (agents report them as text; anything
/// else is counted as `other`, so an agent cannot make up label values).
const RESOURCES: [&str; 6] = ["cpu", "memory", "disk", "network", "disk_io", "return-home"];

/// Every family the manager records into. Cloning shares the families.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Telemetry messages received on agent streams.
    pub telemetry: Counter,
    /// Agent streams open now (sessions between hello and close).
    pub streams: Gauge,
    /// gRPC calls by method and code (the server's `RpcLayer`).
    pub rpc: RpcHistogram,
    /// Failovers by outcome: `moved` (a spare took the slot) or `no_spare`
    /// (the pool is degraded, waiting for one).
    pub failovers: Family<OutcomeLabels, Counter>,
    /// From losing a member to its spare reporting the whole group running.
    pub failover_duration: Histogram,
    /// Offloads agents reported, by the resource that triggered them.
    pub offloads: Family<ResourceLabels, Counter>,
    /// Committed events by kind.
    pub events: Family<KindLabels, Counter>,
    /// Duration of one store commit (a batch of changes, one transaction).
    pub store_commit: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics::empty();
        // Every outcome and resource from 0, so that the series exist
        // (and `rate()` works) before the first failover or offload.
        for outcome in ["moved", "no_spare"] {
            let _ = m.failovers.get_or_create(&OutcomeLabels { outcome });
        }
        for resource in RESOURCES {
            let _ = m.offloads.get_or_create(&ResourceLabels { resource });
        }
        m
    }
}

impl Metrics {
    fn empty() -> Self {
        Metrics {
            telemetry: Counter::default(),
            streams: Gauge::default(),
            rpc: rpc_histogram(),
            failovers: Family::default(),
            // 0.1 s to about 100 s.
            failover_duration: Histogram::new(exponential_buckets(0.1, 2.0, 11)),
            offloads: Family::default(),
            events: Family::default(),
            // 0.1 ms to about 3 s.
            store_commit: Histogram::new(exponential_buckets(0.0001, 2.0, 15)),
        }
    }
}

impl Metrics {
    /// Registers every family in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "edgepool_telemetry_messages",
            "Telemetry messages received on agent streams",
            self.telemetry.clone(),
        );
        registry.register(
            "edgepool_agent_streams",
            "Agent streams open now",
            self.streams.clone(),
        );
        registry.register(
            "edgepool_rpc_duration_seconds",
            "gRPC calls served, by method and status code (a streaming call counts its whole life)",
            self.rpc.clone(),
        );
        registry.register(
            "edgepool_failovers",
            "Failovers by outcome: moved (a spare took the slot), no_spare (pool degraded)",
            self.failovers.clone(),
        );
        registry.register(
            "edgepool_failover_duration_seconds",
            "From losing a member to its spare running the whole group",
            self.failover_duration.clone(),
        );
        registry.register(
            "edgepool_offloads",
            "Offloads reported by agents, by the resource that triggered them (return-home: moved back)",
            self.offloads.clone(),
        );
        registry.register(
            "edgepool_events",
            "Events recorded, by kind",
            self.events.clone(),
        );
        registry.register(
            "edgepool_store_commit_duration_seconds",
            "Duration of one store commit (a batch of registry changes in one transaction)",
            self.store_commit.clone(),
        );
    }

    /// A committed event (the store writer calls this once per event, in
    /// seq order, after the commit).
    pub fn event_committed(&self, e: &EventRecord) {
        self.events
            .get_or_create(&KindLabels {
                kind: e.kind.as_str(),
            })
            .inc();
        let outcome = match e.kind {
            EventKind::FailoverStarted => "moved",
            EventKind::PoolDegraded => "no_spare",
            _ => return,
        };
        self.failovers
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// An offload recorded from an agent's report.
    pub fn offload(&self, resource: &str) {
        let resource = RESOURCES
            .iter()
            .find(|r| **r == resource)
            .copied()
            .unwrap_or("other");
        self.offloads
            .get_or_create(&ResourceLabels { resource })
            .inc();
    }

    /// A failover finished: the spare runs the group `ms` after the loss.
    pub fn failover_done(&self, ms: u64) {
        self.failover_duration.observe(ms as f64 / 1000.0);
    }

    /// Counts an open agent stream until the returned guard is dropped.
    pub fn stream_opened(&self) -> StreamGuard {
        self.streams.inc();
        StreamGuard(self.streams.clone())
    }
}

/// One open agent stream in `edgepool_agent_streams`.
pub struct StreamGuard(Gauge);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failovers_are_counted_from_committed_events() {
        let m = Metrics::default();
        m.event_committed(&EventRecord::new("t", "p", EventKind::FailoverStarted));
        m.event_committed(&EventRecord::new("t", "p", EventKind::PoolDegraded));
        m.event_committed(&EventRecord::new("t", "p", EventKind::AppStarted));
        let moved = m
            .failovers
            .get_or_create(&OutcomeLabels { outcome: "moved" })
            .get();
        assert_eq!(moved, 1);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let text = edgepool_common::metrics::render(&registry).unwrap();
        assert!(
            text.contains("edgepool_failovers_total{outcome=\"no_spare\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("edgepool_events_total{kind=\"APP_STARTED\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn an_unknown_resource_is_other() {
        let m = Metrics::default();
        m.offload("cpu");
        m.offload("made-up");
        assert_eq!(
            m.offloads
                .get_or_create(&ResourceLabels { resource: "other" })
                .get(),
            1
        );
    }
}
