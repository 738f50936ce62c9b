//! `DeadlineQueue`: the nodes the failure detector must look at, each with
//! the moment it must look (pure: no clock of its own, no I/O).
//!
//! Each node has at most one live deadline; arming it again earlier moves
//! it, arming it later is ignored (the earlier look re-arms it as needed).
//! A look costs O(log n) and a round costs the deadlines that passed, not
//! the nodes watched. Heartbeats do not touch the queue: when a deadline
//! passes, the detector reads the node's last-seen time and, if it was
//! heard from meanwhile, arms it again for `last_seen + timeout`. So a
//! healthy node is looked at about once per heartbeat timeout, a suspect
//! one every round until it is decided.
//!
//! `Watchlist` is the queue as the manager shares it: behind a lock, with
//! the bell that wakes the detector (the only part that reads the clock).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::Notify;

use crate::node_key::NodeKey;

/// Deadlines of nodes named by `K` (the manager's `NodeKey`).
#[derive(Debug)]
pub struct DeadlineQueue<K: Ord + Hash + Clone = NodeKey> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
    /// The live deadline of each armed node; heap entries that differ are
    /// stale and skipped.
    armed: HashMap<K, Instant>,
}

impl<K: Ord + Hash + Clone> Default for DeadlineQueue<K> {
    fn default() -> Self {
        DeadlineQueue {
            heap: BinaryHeap::new(),
            armed: HashMap::new(),
        }
    }
}

impl<K: Ord + Hash + Clone> DeadlineQueue<K> {
    /// Look at `node` at `at` at the latest.
    pub fn arm(&mut self, node: &K, at: Instant) {
        match self.armed.get_mut(node) {
            Some(t) if *t <= at => {}
            Some(t) => {
                *t = at;
                self.heap.push(Reverse((at, node.clone())));
            }
            None => {
                self.armed.insert(node.clone(), at);
                self.heap.push(Reverse((at, node.clone())));
            }
        }
    }

    /// The nodes whose deadline is at or before `now`, disarmed.
    pub fn pop_due(&mut self, now: Instant) -> Vec<K> {
        let mut due = Vec::new();
        while let Some(Reverse((at, _))) = self.heap.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((at, node))) = self.heap.pop() else {
                break;
            };
            if self.armed.get(&node) == Some(&at) {
                self.armed.remove(&node);
                due.push(node);
            }
        }
        due
    }

    /// How many nodes are armed.
    pub fn len(&self) -> usize {
        self.armed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }
}

/// The failure detector's watchlist: a `DeadlineQueue` under its own lock
/// (never taken per message), and the bell that wakes the detector when a
/// deadline is already due. The detector (`failover::Failover`) drains it;
/// `pools::Pools` arms it whenever it pushes an assignment (the node's
/// membership may have changed), without knowing the detector.
#[derive(Debug, Default)]
pub struct Watchlist {
    queue: Mutex<DeadlineQueue>,
    wake: Notify,
}

impl Watchlist {
    /// Has the failure detector look at `node` at `at` at the latest
    /// (at once if `at` has passed).
    pub fn watch(&self, node: &NodeKey, at: Instant) {
        self.queue().arm(node, at);
        if at <= Instant::now() {
            self.wake.notify_one();
        }
    }

    /// The queue itself, locked (for the detector).
    pub fn queue(&self) -> MutexGuard<'_, DeadlineQueue> {
        // Arming and popping leave the queue consistent at every step, so
        // a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolves when `watch` armed a deadline that was already due (at
    /// once if that happened since the last wait).
    pub async fn woken(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn k(s: &str) -> String {
        s.to_string()
    }

    #[test]
    fn due_nodes_come_out_once_in_deadline_order() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = DeadlineQueue::<String>::default();
        q.arm(&k("b"), ms(20));
        q.arm(&k("a"), ms(10));
        q.arm(&k("c"), ms(30));
        assert_eq!(q.pop_due(ms(5)), Vec::<String>::new());
        assert_eq!(q.pop_due(ms(20)), ["a", "b"]);
        assert_eq!(q.pop_due(ms(20)), Vec::<String>::new());
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn arming_earlier_moves_the_deadline_later_is_ignored() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = DeadlineQueue::<String>::default();
        q.arm(&k("a"), ms(100));
        q.arm(&k("a"), ms(10));
        q.arm(&k("a"), ms(500));
        assert_eq!(q.pop_due(ms(10)), ["a"]);
        // The stale entry at 100 does not bring it back.
        assert!(q.pop_due(ms(1000)).is_empty());
        assert!(q.is_empty());
    }

    #[test]
    fn a_round_costs_what_is_due_not_what_is_watched() {
        let t0 = Instant::now();
        let mut q = DeadlineQueue::<String>::default();
        for i in 0..10_000 {
            q.arm(&format!("n{i}"), t0 + Duration::from_secs(3));
        }
        q.arm(&k("suspect"), t0);
        assert_eq!(q.pop_due(t0), ["suspect"]);
        assert_eq!(q.heap.len(), 10_000);
    }
}
