//! The durable registry and its one writer.
//!
//! Three versions of the registry exist at any moment, all sharing their
//! unchanged rows (`table`), so each costs O(1) to copy:
//!
//! - **committed**: what the store holds. Readers (listings, assignments,
//!   app reports' first look) take an `Arc` of it without any lock
//!   (`ArcSwap`) and hold none while they read.
//! - **head**: committed plus every change prepared and sent to the writer
//!   but not yet committed. A change is *prepared* under the head lock:
//!   its closure runs on a copy of head, so changes see each other in the
//!   order they were prepared (no lost or doubled events); a refused
//!   change leaves head untouched.
//! - the change's own copy, which becomes head when the closure succeeds;
//!   its touched rows become a `WriteSet`.
//!
//! The writer thread is the only code that writes the store. It takes
//! every prepared change waiting (up to `MAX_BATCH`), commits them in one
//! transaction (one fsync for all: group commit), then makes the newest
//! one's copy committed and broadcasts their events, in seq order, and
//! only then answers the callers. If the commit fails, none of those
//! changes happened: head goes back to committed and every change prepared
//! on top of them fails too. So the registry that readers see changes only
//! after the store commit succeeded, a failed change leaves no trace, and
//! no async runtime thread ever waits on the disk (async callers await the
//! answer; blocking callers block their own thread).

use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use std::thread::JoinHandle;

use tokio::sync::{broadcast, oneshot};

use crate::events::EventRecord;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{Store, StoreError, WriteSet};

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 512;

pub struct Durable {
    committed: ArcSwap<Registry>,
    /// Held while a new committed registry is published and its events
    /// broadcast, and while a watch reads its backlog and subscribes
    /// (`with_subscription`): never by readers of `current`.
    publish: Mutex<()>,
    head: Mutex<Head>,
    events: broadcast::Sender<Arc<EventRecord>>,
    /// Commit durations and committed events (recorded by the writer
    /// thread, after each commit).
    metrics: Metrics,
}

struct Head {
    registry: Registry,
    /// Id of the newest prepared change.
    prepared: u64,
    /// Changes up to this id were prepared on top of a change whose commit
    /// failed: they fail too.
    failed_through: u64,
    /// To the writer thread; `None` once the manager is shutting down.
    jobs: Option<std_mpsc::Sender<Job>>,
}

struct Job {
    id: u64,
    writes: WriteSet,
    /// The registry with this change (and every one prepared before it).
    snapshot: Arc<Registry>,
    events: Vec<Arc<EventRecord>>,
    reply: Reply,
}

enum Reply {
    Blocking(std_mpsc::SyncSender<Result<(), StoreError>>),
    Async(oneshot::Sender<Result<(), StoreError>>),
}

impl Reply {
    fn send(self, r: Result<(), StoreError>) {
        // A caller that went away does not care.
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(r);
            }
            Reply::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// A prepared change on its way to the store.
pub enum Pending {
    Blocking(std_mpsc::Receiver<Result<(), StoreError>>),
    Async(oneshot::Receiver<Result<(), StoreError>>),
    /// The change touched nothing: there is nothing to wait for.
    Done,
}

impl Pending {
    /// Blocks this thread until the change is committed. Only for blocking
    /// threads (`spawn_blocking`, tests, start-up).
    pub fn wait(self) -> Result<(), StoreError> {
        match self {
            Pending::Blocking(rx) => rx.recv().unwrap_or_else(|_| Err(gone())),
            Pending::Async(rx) => rx.blocking_recv().unwrap_or_else(|_| Err(gone())),
            Pending::Done => Ok(()),
        }
    }

    /// Waits, without blocking the thread, until the change is committed.
    pub async fn done(self) -> Result<(), StoreError> {
        match self {
            Pending::Async(rx) => rx.await.unwrap_or_else(|_| Err(gone())),
            Pending::Blocking(rx) => {
                tokio::task::spawn_blocking(move || rx.recv().unwrap_or_else(|_| Err(gone())))
                    .await
                    .unwrap_or_else(|_| Err(gone()))
            }
            Pending::Done => Ok(()),
        }
    }
}

fn gone() -> StoreError {
    StoreError::Backend {
        path: "state.redb".into(),
        why: "the store writer has stopped".into(),
    }
}

/// The writer thread; dropping it lets the thread finish the changes it
/// has and waits for it (so the store's lock is released on return).
pub struct Writer {
    durable: Arc<Durable>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.durable.head().jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Durable {
    /// Starts the writer thread over `store`, whose saved state is
    /// `registry`.
    pub fn start(
        registry: Registry,
        store: Box<dyn Store>,
        events: broadcast::Sender<Arc<EventRecord>>,
    ) -> std::io::Result<(Arc<Durable>, Writer)> {
        Self::start_measured(registry, store, events, Metrics::default())
    }

    /// `start`, recording into `metrics`.
    pub fn start_measured(
        registry: Registry,
        store: Box<dyn Store>,
        events: broadcast::Sender<Arc<EventRecord>>,
        metrics: Metrics,
    ) -> std::io::Result<(Arc<Durable>, Writer)> {
        let (tx, rx) = std_mpsc::channel();
        let durable = Arc::new(Durable {
            committed: ArcSwap::from_pointee(registry.clone()),
            publish: Mutex::new(()),
            head: Mutex::new(Head {
                registry,
                prepared: 0,
                failed_through: 0,
                jobs: Some(tx),
            }),
            events,
            metrics,
        });
        let d = durable.clone();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || write_loop(&d, store.as_ref(), &rx))?;
        Ok((
            durable.clone(),
            Writer {
                durable,
                thread: Some(thread),
            },
        ))
    }

    /// The committed registry (no lock is held while it is read).
    pub fn current(&self) -> Arc<Registry> {
        self.committed.load_full()
    }

    /// Runs `f` on the committed registry and a new subscription to the
    /// broadcast, taken together: no event is broadcast in between, so the
    /// registry's events and the broadcast meet exactly.
    pub fn with_subscription<R>(
        &self,
        f: impl FnOnce(&Registry, broadcast::Receiver<Arc<EventRecord>>) -> R,
    ) -> R {
        let _publish = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        f(&self.committed.load(), self.events.subscribe())
    }

    fn head(&self) -> MutexGuard<'_, Head> {
        // A panic in a change's closure leaves head as it was (the closure
        // works on a copy), so a poisoned lock is still consistent.
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prepares a change: runs `f` on a copy of head and, if it succeeds
    /// and touched anything, hands the change to the writer. The caller
    /// then waits for the returned `Pending` before acting on the change.
    pub fn prepare<T, E: From<StoreError>>(
        &self,
        blocking: bool,
        f: impl FnOnce(&mut Registry) -> Result<T, E>,
    ) -> Result<(T, Pending), E> {
        let mut head = self.head();
        let mut next = head.registry.clone();
        next.clear_touched();
        let out = f(&mut next)?;
        let writes = WriteSet::of(&head.registry, &next)?;
        if writes.rows() == 0 && next.events.next_seq == head.registry.events.next_seq {
            return Ok((out, Pending::Done));
        }
        let events = next.events.recorded_after(head.registry.events.next_seq);
        next.clear_touched();
        let (reply, pending) = if blocking {
            let (tx, rx) = std_mpsc::sync_channel(1);
            (Reply::Blocking(tx), Pending::Blocking(rx))
        } else {
            let (tx, rx) = oneshot::channel();
            (Reply::Async(tx), Pending::Async(rx))
        };
        let id = head.prepared + 1;
        let job = Job {
            id,
            writes,
            snapshot: Arc::new(next.clone()),
            events,
            reply,
        };
        let sent = head.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
        if !sent {
            return Err(gone().into());
        }
        head.prepared = id;
        head.registry = next;
        Ok((out, pending))
    }
}

fn write_loop(durable: &Durable, store: &dyn Store, jobs: &std_mpsc::Receiver<Job>) {
    let max_rows = store.max_batch_rows();
    // A change that did not fit the last batch: it leads the next one.
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match jobs.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        // Up to MAX_BATCH changes and the store's row limit.
        let mut rows = first.writes.rows();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) if rows.saturating_add(j.writes.rows()) > max_rows => {
                    carried = Some(j);
                    break;
                }
                Ok(j) => {
                    rows += j.writes.rows();
                    batch.push(j);
                }
                Err(_) => break,
            }
        }
        let failed_through = durable.head().failed_through;
        let (doomed, batch): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|j| j.id <= failed_through);
        for j in doomed {
            j.reply.send(Err(StoreError::Backend {
                path: "state.redb".into(),
                why: "an earlier change it depends on could not be saved".into(),
            }));
        }
        let Some(newest) = batch.last().map(|j| j.snapshot.clone()) else {
            continue;
        };
        let writes: Vec<&WriteSet> = batch.iter().map(|j| &j.writes).collect();
        let started = std::time::Instant::now();
        let committed = store.commit(&writes);
        durable
            .metrics
            .store_commit
            .observe(started.elapsed().as_secs_f64());
        match committed {
            Ok(()) => {
                let publish = durable.publish.lock().unwrap_or_else(|p| p.into_inner());
                durable.committed.store(newest);
                // Under the lock that `with_subscription` reads under, and
                // in prepare order, which is seq order.
                for e in batch.iter().flat_map(|j| &j.events) {
                    // No subscribers is fine: events are also kept.
                    let _ = durable.events.send(e.clone());
                }
                for e in batch.iter().flat_map(|j| &j.events) {
                    durable.metrics.event_committed(e);
                }
                drop(publish);
                for j in batch {
                    j.reply.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, changes = batch.len(), "could not save registry changes");
                {
                    let mut head = durable.head();
                    head.registry = (*durable.current()).clone();
                    head.failed_through = head.prepared;
                }
                for j in batch {
                    j.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventKind;
    use crate::registry::TokenRecord;

    /// A store that fails every commit while `fail` is set.
    #[derive(Default)]
    struct Flaky {
        fail: Arc<std::sync::atomic::AtomicBool>,
        commits: Arc<Mutex<Vec<usize>>>,
    }

    impl Store for Flaky {
        fn load(&self) -> Result<Registry, StoreError> {
            Ok(Registry::default())
        }
        fn commit(&self, changes: &[&WriteSet]) -> Result<(), StoreError> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError::Encode("disk on fire".into()));
            }
            self.commits.lock().unwrap().push(changes.len());
            Ok(())
        }
    }

    fn token() -> TokenRecord {
        TokenRecord {
            tenant: "t".into(),
            labels: Default::default(),
            created_at_ms: 0,
            expires_at_ms: u64::MAX / 2,
            used_by: None,
        }
    }

    fn add(d: &Durable, name: &str) -> Result<(), StoreError> {
        let (_, p) = d.prepare(true, |r| {
            r.add_token(name, token(), 0);
            r.events.push(
                crate::events::EventRecord::new("t", "", EventKind::NodeEnrolled),
                1,
            );
            Ok::<_, StoreError>(())
        })?;
        p.wait()
    }

    #[test]
    fn a_committed_change_is_seen_and_broadcast_after_the_commit() {
        let store = Flaky::default();
        let (tx, mut rx) = broadcast::channel(16);
        let (d, _w) = Durable::start(Registry::default(), Box::new(store), tx).unwrap();
        add(&d, "ept_a").unwrap();
        assert_eq!(d.current().tokens.len(), 1);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
    }

    #[test]
    fn a_refused_or_failed_change_leaves_no_trace() {
        let store = Flaky::default();
        let fail = store.fail.clone();
        let (tx, mut rx) = broadcast::channel(16);
        let (d, _w) = Durable::start(Registry::default(), Box::new(store), tx).unwrap();
        // Refused by its closure.
        let refused = d.prepare(true, |r| {
            r.add_token("ept_x", token(), 0);
            Err::<(), _>(StoreError::Encode("no".into()))
        });
        assert!(refused.is_err());
        // Failed in the store.
        fail.store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(add(&d, "ept_a").is_err());
        assert_eq!(*d.current(), Registry::default());
        assert!(rx.try_recv().is_err());
        // Later changes start from the committed state again.
        fail.store(false, std::sync::atomic::Ordering::SeqCst);
        add(&d, "ept_b").unwrap();
        let r = d.current();
        assert_eq!(r.tokens.len(), 1);
        assert!(r.tokens.contains_key(&crate::registry::hash_token("ept_b")));
        assert_eq!(r.events.next_seq, 1);
    }

    #[test]
    fn concurrent_changes_are_group_committed_and_all_kept() {
        let store = Flaky::default();
        let commits = store.commits.clone();
        let (tx, _) = broadcast::channel(1024);
        let (d, w) = Durable::start(Registry::default(), Box::new(store), tx).unwrap();
        std::thread::scope(|s| {
            for t in 0..8 {
                let d = &d;
                s.spawn(move || {
                    for i in 0..50 {
                        add(d, &format!("ept_{t}_{i}")).unwrap();
                    }
                });
            }
        });
        let r = d.current();
        assert_eq!(r.tokens.len(), 400);
        assert_eq!(r.events.next_seq, 400);
        drop(w);
        let commits = commits.lock().unwrap();
        assert_eq!(commits.iter().sum::<usize>(), 400);
    }

    /// A store that takes at most 5 rows per commit and says what it got.
    #[derive(Default)]
    struct Small {
        rows: Arc<Mutex<Vec<usize>>>,
    }

    impl Store for Small {
        fn load(&self) -> Result<Registry, StoreError> {
            Ok(Registry::default())
        }
        fn commit(&self, changes: &[&WriteSet]) -> Result<(), StoreError> {
            let rows = changes.iter().map(|w| w.rows()).sum();
            self.rows.lock().unwrap().push(rows);
            Ok(())
        }
        fn max_batch_rows(&self) -> usize {
            5
        }
    }

    #[test]
    fn batches_stay_within_the_store_row_limit_and_lose_nothing() {
        let store = Small::default();
        let rows = store.rows.clone();
        let (tx, _) = broadcast::channel(1024);
        let (d, w) = Durable::start(Registry::default(), Box::new(store), tx).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let d = &d;
                s.spawn(move || {
                    for i in 0..40 {
                        // Two rows each: the token and the event.
                        add(d, &format!("ept_{t}_{i}")).unwrap();
                    }
                });
            }
        });
        assert_eq!(d.current().tokens.len(), 160);
        drop(w);
        let rows = rows.lock().unwrap();
        assert_eq!(rows.iter().sum::<usize>(), 320);
        assert!(rows.iter().all(|&r| r <= 5), "{rows:?}");
    }

    fn node(i: usize) -> crate::registry::NodeRecord {
        crate::registry::NodeRecord {
            node_id: format!("n{i:06}"),
            tenant: "t".into(),
            labels: Default::default(),
            cert_serial: "00".repeat(16),
            enrolled_at_ms: 0,
            state: crate::model::NodeState::Free,
            peer_address: "127.0.0.1:7444".into(),
            capacity: Default::default(),
            agent_version: "0.1.0".into(),
            hostname: "host".into(),
            cert_pem: "x".repeat(600),
            pool: String::new(),
            slot: 0,
        }
    }

    /// Time per change (redb with fsync) with 100 and 10,000 nodes, one
    /// writer at a time and eight at once. A measurement, not a check:
    /// `cargo test -p cloud-manager --release --lib -- --ignored --nocapture cost_per_change`.
    #[test]
    #[ignore = "measurement"]
    fn cost_per_change_by_fleet_size() {
        use std::time::Instant;
        for n in [100usize, 10_000] {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::RedbStore::open(dir.path()).unwrap();
            let mut r = Registry::default();
            for i in 0..n {
                r.nodes.insert(format!("n{i:06}"), node(i));
            }
            store
                .commit(&[&WriteSet::of(&Registry::default(), &r).unwrap()])
                .unwrap();
            r.clear_touched();
            let (d, _w) = Durable::start(r, Box::new(store), broadcast::channel(16).0).unwrap();
            let change = |i: usize| {
                let (_, p) = d
                    .prepare(true, |r| {
                        if let Some(node) = r.nodes.get_mut(&format!("n{:06}", i % n)) {
                            node.hostname = format!("h{i}");
                        }
                        r.events.push(
                            crate::events::EventRecord::new("t", "", EventKind::NodeEnrolled),
                            1,
                        );
                        Ok::<_, StoreError>(())
                    })
                    .unwrap();
                p.wait().unwrap();
            };
            let t = Instant::now();
            for i in 0..200 {
                change(i);
            }
            let one = t.elapsed() / 200;
            let t = Instant::now();
            std::thread::scope(|s| {
                for k in 0..8 {
                    let change = &change;
                    s.spawn(move || {
                        for i in 0..100 {
                            change(k * 1000 + i);
                        }
                    });
                }
            });
            let eight = t.elapsed() / 800;
            println!(
                "{n:>6} nodes: {one:?} per change one at a time, {eight:?} per change with 8 writers"
            );
        }
    }
}
