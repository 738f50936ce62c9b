//! Events: what happened to a tenant's pools and nodes, in order.
//!
//! Each tenant has its own ring of the newest `events_per_tenant` events
//! (kept in the registry, so they survive restarts), so a busy tenant never
//! pushes another tenant's events out. Sequence numbers are global to the
//! manager: they increase across all tenants, so one tenant's events have
//! increasing but not consecutive numbers, and a gap in them is never a
//! loss. A loss is told explicitly instead: every ring remembers the newest
//! seq it dropped (`dropped_through`), and a reader that asks for events
//! after an older seq gets `EventsDropped` (DATA_LOSS on the API), never a
//! silent skip. `Watch` follows a tenant's events live and falls back on the
//! ring when it lags behind the broadcast.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// How many events each tenant keeps unless configured otherwise.
pub const DEFAULT_EVENTS_PER_TENANT: usize = 1000;

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

impl EventKind {
    /// The kind's name as the API shows it (`FAILOVER_STARTED`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::PoolCreated => "POOL_CREATED",
            EventKind::PoolDeleted => "POOL_DELETED",
            EventKind::AppStarted => "APP_STARTED",
            EventKind::AppStopped => "APP_STOPPED",
            EventKind::AppExited => "APP_EXITED",
            EventKind::AppsUpdated => "APPS_UPDATED",
            EventKind::NodeEnrolled => "NODE_ENROLLED",
            EventKind::CertRenewed => "CERT_RENEWED",
            EventKind::NodeSuspect => "NODE_SUSPECT",
            EventKind::FailoverStarted => "FAILOVER_STARTED",
            EventKind::FailoverDone => "FAILOVER_DONE",
            EventKind::CertRevoked => "CERT_REVOKED",
            EventKind::PoolDegraded => "POOL_DEGRADED",
            EventKind::NodeFenced => "NODE_FENCED",
            EventKind::NodeFreed => "NODE_FREED",
            EventKind::Offload => "OFFLOAD",
            EventKind::PolicyUpdated => "POLICY_UPDATED",
        }
    }
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

/// A reader asked for events after `after`, but some of the tenant's events
/// after it are no longer kept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "events after seq {after} are no longer kept (the oldest event still kept is seq {oldest_kept}); \
     resume with after_seq={resume_after} to continue from it, knowing that events were missed"
)]
pub struct EventsDropped {
    /// What the reader asked for.
    pub after: u64,
    /// The tenant's oldest kept event (or the next seq if none is kept).
    pub oldest_kept: u64,
    /// Resuming after this loses nothing more: everything of the tenant
    /// after it is kept.
    pub resume_after: u64,
}

/// One tenant's ring.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantEvents {
    /// Oldest first; shared with broadcasts and readers, never copied.
    pub events: VecDeque<Arc<EventRecord>>,
    /// The newest seq of this tenant that was dropped (0 = none).
    pub dropped_through: u64,
}

/// Events of a tenant after some seq, read at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Backlog {
    pub events: Vec<Arc<EventRecord>>,
    /// The manager's newest seq at that moment: every event up to it is
    /// either in `events` or of no interest to the reader.
    pub through: u64,
}

/// The event rings kept in the registry. Cloning it (the registry is
/// cloned for every change) is O(1): the rings sit in a persistent map;
/// recording an event copies that tenant's ring of pointers only.
#[derive(Clone, Debug)]
pub struct EventLog {
    tenants: imbl::OrdMap<String, Arc<TenantEvents>>,
    /// Tenants whose ring changed since `clear_touched` (what the store
    /// writes).
    touched: BTreeSet<String>,
    /// The last seq given out (0 = none yet).
    pub next_seq: u64,
    /// Events up to this seq are unknown for every tenant: a store written
    /// by a version that kept one ring for all tenants does not say whose
    /// events it dropped.
    pub floor: u64,
    /// How many events each tenant keeps.
    limit: usize,
}

/// Equal rings and counters (what was touched is not state).
impl PartialEq for EventLog {
    fn eq(&self, other: &Self) -> bool {
        self.tenants == other.tenants
            && self.next_seq == other.next_seq
            && self.floor == other.floor
            && self.limit == other.limit
    }
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            tenants: imbl::OrdMap::new(),
            touched: BTreeSet::new(),
            next_seq: 0,
            floor: 0,
            limit: DEFAULT_EVENTS_PER_TENANT,
        }
    }
}

impl EventLog {
    /// Sets how many events each tenant keeps (at least one). A smaller
    /// bound takes effect at each tenant's next event.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.max(1);
    }

    /// Records `event` in its tenant's ring, dropping that tenant's oldest
    /// events beyond the bound.
    pub fn push(&mut self, mut event: EventRecord, now_ms: u64) {
        self.next_seq += 1;
        event.seq = self.next_seq;
        event.at_ms = now_ms;
        if !self.touched.contains(&event.tenant) {
            self.touched.insert(event.tenant.clone());
        }
        let ring = Arc::make_mut(self.tenants.entry(event.tenant.clone()).or_default());
        ring.events.push_back(Arc::new(event));
        while ring.events.len() > self.limit {
            if let Some(old) = ring.events.pop_front() {
                ring.dropped_through = old.seq;
            }
        }
    }

    /// Puts back an event read from the store (no bound applied, no seq
    /// given out).
    pub fn restore(&mut self, event: EventRecord) {
        let ring = Arc::make_mut(self.tenants.entry(event.tenant.clone()).or_default());
        ring.events.push_back(Arc::new(event));
    }

    /// Puts back a tenant's `dropped_through` read from the store.
    pub fn restore_dropped(&mut self, tenant: &str, dropped_through: u64) {
        Arc::make_mut(self.tenants.entry(tenant.to_string()).or_default()).dropped_through =
            dropped_through;
    }

    /// The tenants whose ring changed since `clear_touched`.
    pub fn touched(&self) -> impl Iterator<Item = &String> {
        self.touched.iter()
    }

    pub fn clear_touched(&mut self) {
        self.touched.clear();
    }

    /// Every tenant's ring.
    pub fn tenants(&self) -> impl Iterator<Item = (&String, &Arc<TenantEvents>)> {
        self.tenants.iter()
    }

    pub fn tenant(&self, tenant: &str) -> Option<&Arc<TenantEvents>> {
        self.tenants.get(tenant)
    }

    /// The seq after which every event of `tenant` is kept.
    pub fn kept_after(&self, tenant: &str) -> u64 {
        let dropped = self.tenants.get(tenant).map_or(0, |t| t.dropped_through);
        dropped.max(self.floor)
    }

    /// Every kept event of `tenant` (never a loss).
    pub fn kept(&self, tenant: &str) -> Backlog {
        self.collect(tenant, self.kept_after(tenant))
    }

    /// The kept events of `tenant` after `after` (never a loss).
    pub fn kept_since(&self, tenant: &str, after: u64) -> Backlog {
        self.collect(tenant, after.max(self.kept_after(tenant)))
    }

    /// The events of `tenant` after `after`, or `EventsDropped` if some of
    /// them are no longer kept.
    pub fn since(&self, tenant: &str, after: u64) -> Result<Backlog, EventsDropped> {
        let kept_after = self.kept_after(tenant);
        if after < kept_after {
            let oldest_kept = self
                .tenants
                .get(tenant)
                .and_then(|t| t.events.front())
                .map_or(self.next_seq + 1, |e| e.seq);
            return Err(EventsDropped {
                after,
                oldest_kept,
                resume_after: kept_after,
            });
        }
        Ok(self.collect(tenant, after))
    }

    fn collect(&self, tenant: &str, after: u64) -> Backlog {
        let events = match self.tenants.get(tenant) {
            Some(t) => {
                // The ring is ordered by seq: skip what is older by search.
                let start = t.events.partition_point(|e| e.seq <= after);
                t.events.range(start..).cloned().collect()
            }
            None => Vec::new(),
        };
        Backlog {
            events,
            through: self.next_seq,
        }
    }

    /// The events recorded after `seq` (of every tenant touched since
    /// `clear_touched`), in seq order: what a change recorded, to broadcast
    /// and to store. Costs the tenants and events the change touched.
    pub fn recorded_after(&self, seq: u64) -> Vec<Arc<EventRecord>> {
        if self.next_seq <= seq {
            return Vec::new();
        }
        let mut out: Vec<Arc<EventRecord>> = self
            .touched
            .iter()
            .filter_map(|t| self.tenants.get(t))
            .flat_map(|t| t.events.iter().rev().take_while(|e| e.seq > seq))
            .cloned()
            .collect();
        out.sort_by_key(|e| e.seq);
        out
    }
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchFrom {
    /// Only events recorded from now on.
    Now,
    /// Every kept event after this seq first (never a loss: what was
    /// dropped is skipped).
    Kept { after: u64 },
    /// The events after this seq first (a loss if some were dropped).
    After(u64),
}

/// A tenant's (or one pool's) events in order: a backlog read from the
/// rings, then the live broadcast. When the watcher lags so far behind the
/// broadcast that it missed messages, it reads the ring again from where it
/// was: if the tenant still keeps everything since, nothing is lost and the
/// watch goes on; if not, it ends with `EventsDropped`.
pub struct Watch {
    tenant: String,
    pool: String,
    live: broadcast::Receiver<Arc<EventRecord>>,
    backlog: VecDeque<Arc<EventRecord>>,
    /// Where the backlog ends: once it is sent, every event up to here is.
    backlog_through: u64,
    /// Every event of interest with a seq up to here was delivered.
    position: u64,
}

impl Watch {
    /// A watch that first delivers `backlog` (events after `position`)
    /// and then follows `live`, which must have been subscribed before the
    /// backlog was read.
    pub fn new(
        tenant: &str,
        pool: &str,
        position: u64,
        backlog: Backlog,
        live: broadcast::Receiver<Arc<EventRecord>>,
    ) -> Self {
        Watch {
            tenant: tenant.to_string(),
            pool: pool.to_string(),
            live,
            backlog: backlog.events.into(),
            backlog_through: backlog.through,
            position,
        }
    }

    /// The seq to resume after without missing anything delivered so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    fn wants(&self, e: &EventRecord) -> bool {
        e.tenant == self.tenant && (self.pool.is_empty() || e.pool == self.pool)
    }

    /// The next event; `Ok(None)` when the broadcast is closed. `catch_up`
    /// reads the tenant's ring after a seq (used only after a lag). Cancel
    /// safe: an event is only taken when it is returned.
    pub async fn next<E>(
        &mut self,
        mut catch_up: impl FnMut(&str, u64) -> Result<Backlog, E>,
    ) -> Result<Option<Arc<EventRecord>>, E> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                if e.seq > self.position && self.wants(&e) {
                    self.position = e.seq;
                    return Ok(Some(e));
                }
                continue;
            }
            self.position = self.position.max(self.backlog_through);
            match self.live.recv().await {
                Ok(e) => {
                    if e.seq <= self.position {
                        continue;
                    }
                    // The broadcast is in seq order: everything before this
                    // event was seen, whoever's it was.
                    self.position = e.seq;
                    if self.wants(&e) {
                        return Ok(Some(e));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Messages were missed; the ring has them unless the
                    // tenant dropped them too (then this is the loss).
                    let b = catch_up(&self.tenant, self.position)?;
                    self.backlog = b.events.into();
                    self.backlog_through = b.through;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_with(limit: usize) -> EventLog {
        let mut log = EventLog::default();
        log.set_limit(limit);
        log
    }

    fn push(log: &mut EventLog, tenant: &str, pool: &str) -> u64 {
        log.push(EventRecord::new(tenant, pool, EventKind::AppStarted), 1);
        log.next_seq
    }

    fn seqs(b: &Backlog) -> Vec<u64> {
        b.events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn each_tenant_keeps_its_newest_events() {
        let mut log = log_with(3);
        let quiet = push(&mut log, "quiet", "p");
        for _ in 0..10 {
            push(&mut log, "busy", "p");
        }
        // The busy tenant pushed out only its own events.
        assert_eq!(seqs(&log.kept("quiet")), vec![quiet]);
        assert_eq!(seqs(&log.kept("busy")), vec![9, 10, 11]);
        assert_eq!(log.kept_after("busy"), 8);
        assert_eq!(log.kept_after("quiet"), 0);
        assert_eq!(log.kept("busy").through, 11);
    }

    #[test]
    fn reading_after_a_dropped_event_is_a_loss_naming_the_oldest_kept() {
        let mut log = log_with(3);
        for _ in 0..5 {
            push(&mut log, "t", "p");
        }
        push(&mut log, "other", "p"); // 6
        push(&mut log, "t", "p"); // 7; t keeps 4, 5, 7
        let err = log.since("t", 2).unwrap_err();
        assert_eq!(
            err,
            EventsDropped {
                after: 2,
                oldest_kept: 4,
                resume_after: 3
            }
        );
        assert!(err.to_string().contains("oldest event still kept is seq 4"));
        assert!(err.to_string().contains("after_seq=3"));
        // Inside the window: exactly the newer events, with the other
        // tenant's seq 6 as a normal gap.
        assert_eq!(seqs(&log.since("t", 3).unwrap()), vec![4, 5, 7]);
        assert_eq!(seqs(&log.since("t", 5).unwrap()), vec![7]);
        assert_eq!(seqs(&log.since("t", 7).unwrap()), Vec::<u64>::new());
        // The quiet tenant lost nothing, whatever it asks.
        assert_eq!(seqs(&log.since("other", 0).unwrap()), vec![6]);
        // An unknown tenant has nothing and lost nothing.
        assert!(log.since("nobody", 0).unwrap().events.is_empty());
    }

    #[test]
    fn a_legacy_floor_is_a_loss_for_every_tenant() {
        let mut log = log_with(10);
        log.next_seq = 100;
        log.floor = 100;
        push(&mut log, "t", ""); // 101
        assert_eq!(log.since("t", 50).unwrap_err().resume_after, 100);
        assert_eq!(log.since("new", 50).unwrap_err().oldest_kept, 102);
        assert_eq!(seqs(&log.since("t", 100).unwrap()), vec![101]);
        assert_eq!(seqs(&log.kept("t")), vec![101]);
    }

    #[test]
    fn recorded_after_is_in_seq_order_across_tenants() {
        let mut log = log_with(2);
        push(&mut log, "a", "");
        let before = log.next_seq;
        push(&mut log, "b", "");
        push(&mut log, "a", "");
        push(&mut log, "c", "");
        let got: Vec<u64> = log.recorded_after(before).iter().map(|e| e.seq).collect();
        assert_eq!(got, vec![2, 3, 4]);
        assert!(log.recorded_after(log.next_seq).is_empty());
    }

    #[test]
    fn cloning_shares_the_rings_until_one_changes() {
        let mut log = log_with(5);
        push(&mut log, "a", "");
        push(&mut log, "b", "");
        let mut next = log.clone();
        push(&mut next, "a", "");
        let (a0, a1) = (log.tenant("a").unwrap(), next.tenant("a").unwrap());
        let (b0, b1) = (log.tenant("b").unwrap(), next.tenant("b").unwrap());
        assert!(!Arc::ptr_eq(a0, a1));
        assert!(Arc::ptr_eq(b0, b1));
    }

    /// A watch whose catch-up reads `log` as it is now.
    async fn next_of(
        w: &mut Watch,
        log: &EventLog,
    ) -> Result<Option<Arc<EventRecord>>, EventsDropped> {
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            w.next(|t, after| log.since(t, after)),
        )
        .await
        .expect("an event or an end")
    }

    fn send_new(log: &mut EventLog, tx: &broadcast::Sender<Arc<EventRecord>>, tenant: &str) {
        let before = log.next_seq;
        push(log, tenant, "p");
        for e in log.recorded_after(before) {
            let _ = tx.send(e);
        }
    }

    #[tokio::test]
    async fn a_watch_sends_backlog_then_live_without_duplicates() {
        let (tx, _) = broadcast::channel(16);
        let mut log = log_with(10);
        push(&mut log, "t", "p"); // 1
        push(&mut log, "t", "p"); // 2
        let rx = tx.subscribe();
        let mut w = Watch::new("t", "", 1, log.since("t", 1).unwrap(), rx);
        // Sent to the broadcast after the backlog was read but also in it:
        // must come once.
        let _ = tx.send(log.kept("t").events[1].clone());
        send_new(&mut log, &tx, "other"); // 3
        send_new(&mut log, &tx, "t"); // 4
        let got = [
            next_of(&mut w, &log).await.unwrap().unwrap().seq,
            next_of(&mut w, &log).await.unwrap().unwrap().seq,
        ];
        assert_eq!(got, [2, 4]);
        assert_eq!(w.position(), 4);
    }

    #[tokio::test]
    async fn a_lagging_watch_catches_up_from_the_ring() {
        let (tx, _) = broadcast::channel(2);
        let mut log = log_with(100);
        let mut w = Watch::new("t", "", 0, log.kept("t"), tx.subscribe());
        for i in 0..10 {
            send_new(&mut log, &tx, if i % 2 == 0 { "t" } else { "x" });
        }
        let mut got = Vec::new();
        while let Ok(Ok(Some(e))) = tokio::time::timeout(
            std::time::Duration::from_millis(100),
            w.next(|t, after| log.since(t, after)),
        )
        .await
        {
            got.push(e.seq);
        }
        assert_eq!(got, vec![1, 3, 5, 7, 9]);
    }

    #[tokio::test]
    async fn a_watch_whose_events_were_dropped_ends_with_the_loss() {
        let (tx, _) = broadcast::channel(2);
        let mut log = log_with(3);
        let mut w = Watch::new("t", "", 0, log.kept("t"), tx.subscribe());
        for _ in 0..10 {
            send_new(&mut log, &tx, "t");
        }
        let err = next_of(&mut w, &log).await.unwrap_err();
        assert_eq!(err.after, 0);
        assert_eq!(err.oldest_kept, 8);
        assert_eq!(err.resume_after, 7);
    }

    #[tokio::test]
    async fn a_pool_watch_skips_other_pools() {
        let (tx, _) = broadcast::channel(16);
        let mut log = log_with(10);
        let mut w = Watch::new("t", "web", 0, log.kept("t"), tx.subscribe());
        for pool in ["db", "web", "db"] {
            let before = log.next_seq;
            log.push(EventRecord::new("t", pool, EventKind::AppStarted), 1);
            for e in log.recorded_after(before) {
                let _ = tx.send(e);
            }
        }
        assert_eq!(next_of(&mut w, &log).await.unwrap().unwrap().seq, 2);
        drop(tx);
        assert_eq!(next_of(&mut w, &log).await.unwrap(), None);
        assert_eq!(w.position(), 3);
    }
}
