//! Live (not persisted) state of each node's connection: the stream that
//! is open, the last sample and app report, the assignment its session
//! sends, and the commands and pings for that session. Per-message work
//! on an agent's stream touches only its own `LiveNode`. No registry, no
//! tonic or prost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::liveness::Health;
use crate::model::{AppReport, NodeAssignment, Sample, now_ms};

/// Requests the manager sends to one agent over its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Does the agent still reach member `slot` (`node_id`) at `peer_address`?
    PeerCheck {
        request_id: u64,
        slot: u32,
        node_id: String,
        peer_address: String,
    },
    /// Are you running? The agent answers with a Pong of the same nonce.
    Ping { nonce: u64 },
}

/// Live (not persisted) state of one node's connection.
#[derive(Debug)]
pub struct LiveNode {
    inner: Mutex<LiveData>,
    /// The node's desired state; its stream session sends every new value.
    assign: watch::Sender<Option<Arc<NodeAssignment>>>,
    /// Commands for the node's current stream session, if it has one.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    /// Pings sent to this node and not answered yet, by nonce. Only this
    /// node's own stream can answer them.
    pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Woken whenever `conn_id` changes, so a replaced or ended session
    /// stops at once (`ended`).
    stream_change: tokio::sync::Notify,
}

impl Default for LiveNode {
    fn default() -> Self {
        LiveNode {
            inner: Mutex::new(LiveData::default()),
            assign: watch::channel(None).0,
            commands: Mutex::new(None),
            pings: Mutex::new(HashMap::new()),
            stream_change: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LiveData {
    /// The open stream, if any; a newer stream replaces an older one.
    pub conn_id: Option<u64>,
    pub last_seen_ms: u64,
    pub sample: Option<Sample>,
    /// What the agent last said it runs.
    pub report: Option<AppReport>,
    /// When the last stream closed (0: never since the manager started).
    pub disconnected_at_ms: u64,
    /// The same two moments on the monotonic clock, for failure detection:
    /// a wall-clock jump must never make a node look silent.
    pub last_seen_at: Option<Instant>,
    pub disconnected_at: Option<Instant>,
}

impl LiveData {
    fn touch(&mut self) {
        self.last_seen_ms = now_ms();
        self.last_seen_at = Some(Instant::now());
    }
}

impl LiveNode {
    fn lock(&self) -> MutexGuard<'_, LiveData> {
        // A panic while holding this lock cannot leave LiveData inconsistent
        // (plain field writes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `conn_id` is still the node's current stream.
    pub fn is_current(&self, conn_id: u64) -> bool {
        self.lock().conn_id == Some(conn_id)
    }

    /// Resolves once `conn_id` is no longer the node's current stream (a
    /// newer stream replaced it, or the manager ended it).
    pub async fn ended(&self, conn_id: u64) {
        loop {
            let changed = self.stream_change.notified();
            tokio::pin!(changed);
            // Registered before the check, so no change is missed.
            changed.as_mut().enable();
            if !self.is_current(conn_id) {
                return;
            }
            changed.await;
        }
    }

    /// Makes `conn_id` the node's current stream (a newer stream replaces
    /// an older one); the older session, if any, ends at once.
    pub(crate) fn open(&self, conn_id: u64) {
        {
            let mut l = self.lock();
            l.conn_id = Some(conn_id);
            l.touch();
        }
        // An older session of this node ends now (not at its next message).
        self.stream_change.notify_waiters();
    }

    /// Marks `conn_id` closed, unless a newer stream already replaced it.
    /// True if it was the current stream (and is now closed).
    pub(crate) fn close(&self, conn_id: u64) -> bool {
        let mut l = self.lock();
        if l.conn_id != Some(conn_id) {
            return false;
        }
        l.conn_id = None;
        l.disconnected_at_ms = now_ms();
        l.disconnected_at = Some(Instant::now());
        drop(l);
        self.stream_change.notify_waiters();
        true
    }

    /// The node's current stream, if it has one.
    pub fn current_stream(&self) -> Option<u64> {
        self.lock().conn_id
    }

    /// The connection facts the failure detector needs (no copy of the
    /// node's samples or reports).
    pub fn health(&self) -> Health {
        let l = self.lock();
        Health {
            connected: l.conn_id.is_some(),
            last_seen: l.last_seen_at,
            disconnected_at: l.disconnected_at,
        }
    }

    pub fn seen(&self) {
        self.lock().touch();
    }

    pub fn record_sample(&self, sample: Sample) {
        let mut l = self.lock();
        l.touch();
        l.sample = Some(sample);
    }

    pub fn snapshot(&self) -> LiveData {
        self.lock().clone()
    }

    /// Whether the node has an open stream (without copying its live data).
    pub fn is_connected(&self) -> bool {
        self.lock().conn_id.is_some()
    }

    /// Stores a new report and returns the previous one.
    pub fn swap_report(&self, report: AppReport) -> Option<AppReport> {
        let mut l = self.lock();
        l.touch();
        l.report.replace(report)
    }

    /// Sends a Ping over the node's current stream and waits up to
    /// `timeout` for its Pong. False if there is no stream, the session is
    /// not keeping up, or no answer came in time.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let nonce = crate::random::u64();
        let (tx, rx) = oneshot::channel();
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce, tx);
        let answered = self.send_command(Command::Ping { nonce })
            && tokio::time::timeout(timeout, rx)
                .await
                .is_ok_and(|r| r.is_ok());
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
        answered
    }

    /// A Pong from this node's stream.
    pub fn pong(&self, nonce: u64) {
        let waiter = self
            .pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }

    pub fn subscribe_assignment(&self) -> watch::Receiver<Option<Arc<NodeAssignment>>> {
        self.assign.subscribe()
    }

    pub(crate) fn set_assignment(&self, a: NodeAssignment) {
        self.assign.send_replace(Some(Arc::new(a)));
    }

    /// Attaches the command channel of a new stream session.
    pub fn set_commands(&self, tx: mpsc::Sender<Command>) {
        *self.commands.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Sends a command to the current session; false if there is none or
    /// it is not keeping up.
    pub fn send_command(&self, c: Command) -> bool {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.try_send(c).is_ok())
    }
}
