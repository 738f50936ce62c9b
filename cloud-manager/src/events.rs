//! Events: what happened to the tenant's pools and nodes, in order.
//! Recorded in the registry (so they survive restarts; the newest
//! `MAX_EVENTS` are kept) and broadcast to `WatchEvents` streams.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// How many events the registry keeps.
pub const MAX_EVENTS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    PoolCreated,
    PoolDeleted,
    AppStarted,
    AppStopped,
    AppExited,
    AppsUpdated,
    NodeEnrolled,
    CertRenewed,
    NodeSuspect,
    FailoverStarted,
    FailoverDone,
    CertRevoked,
    PoolDegraded,
    NodeFenced,
    NodeFreed,
    Offload,
    PolicyUpdated,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: u64,
    pub at_ms: u64,
    pub tenant: String,
    pub pool: String,
    pub kind: EventKind,
    pub node_id: String,
    pub slot: u32,
    pub app: String,
    pub message: String,
}

impl EventRecord {
    /// A new event; `seq` and `at_ms` are set when it is recorded.
    pub fn new(tenant: &str, pool: &str, kind: EventKind) -> Self {
        EventRecord {
            seq: 0,
            at_ms: 0,
            tenant: tenant.to_string(),
            pool: pool.to_string(),
            kind,
            node_id: String::new(),
            slot: 0,
            app: String::new(),
            message: String::new(),
        }
    }

    pub fn node(mut self, node_id: &str, slot: u32) -> Self {
        self.node_id = node_id.to_string();
        self.slot = slot;
        self
    }

    pub fn app(mut self, app: &str) -> Self {
        self.app = app.to_string();
        self
    }

    pub fn message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }
}

/// The event log kept in the registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventLog {
    pub events: VecDeque<EventRecord>,
    pub next_seq: u64,
}

impl EventLog {
    pub fn push(&mut self, mut event: EventRecord, now_ms: u64) {
        self.next_seq += 1;
        event.seq = self.next_seq;
        event.at_ms = now_ms;
        self.events.push_back(event);
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Events with a sequence number above `after`.
    pub fn since(&self, after: u64) -> impl Iterator<Item = &EventRecord> {
        self.events.iter().filter(move |e| e.seq > after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_bounded_and_ordered() {
        let mut log = EventLog::default();
        for _ in 0..MAX_EVENTS + 10 {
            log.push(EventRecord::new("t", "p", EventKind::AppStarted), 1);
        }
        assert_eq!(log.events.len(), MAX_EVENTS);
        assert_eq!(log.events.front().map(|e| e.seq), Some(11));
        assert_eq!(log.since(MAX_EVENTS as u64 + 8).count(), 2);
    }
}
