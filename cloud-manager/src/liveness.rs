//! What members say about each other's liveness, and the rules that turn
//! their words into evidence. Pure: no network, no registry; the manager
//! keeps a `LivenessBook` and the failure detector (`failover`) asks it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::node_key::NodeKey;

/// What the detector knows about a member's connection (monotonic times).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub connected: bool,
    pub last_seen: Option<Instant>,
    pub disconnected_at: Option<Instant>,
}

/// One member's word on another member's liveness (`PeerLiveness`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerAlive {
    pub slot: u32,
    pub node_id: String,
    pub reachable: bool,
    pub silent_ms: u64,
}

/// A report as kept: what the reporter said, and when we heard it.
#[derive(Clone, Copy, Debug)]
struct Heard {
    reachable: bool,
    /// When the reporter last reached the target (received_at - silent).
    last_alive: Instant,
    received_at: Instant,
}

/// How long a member's report counts: agents repeat it every second while
/// a member is unreachable, so an older one is stale.
const REPORT_TTL: Duration = Duration::from_millis(2500);

/// What the members currently say about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerView {
    /// Nobody reports it unreachable (or someone recently reached it).
    Fine,
    /// These members cannot reach it; the most recent sign of life any of
    /// them had is `last_alive`.
    Unreachable {
        reporters: Vec<String>,
        last_alive: Instant,
    },
}

/// The members' reports about each other: target -> reporter -> report.
/// A report names its target by node id; the target is the node of that id
/// in the reporter's tenant (members of a pool share its tenant).
#[derive(Default)]
pub struct LivenessBook {
    reports: Mutex<HashMap<NodeKey, HashMap<NodeKey, Heard>>>,
}

impl LivenessBook {
    pub fn record(&self, reporter: &NodeKey, p: &PeerAlive, now: Instant) {
        let silent = Duration::from_millis(p.silent_ms.min(3_600_000));
        let heard = Heard {
            reachable: p.reachable,
            last_alive: now.checked_sub(silent).unwrap_or(now),
            received_at: now,
        };
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(NodeKey::new(reporter.tenant(), &p.node_id))
            .or_default()
            .insert(reporter.clone(), heard);
    }

    /// Drops what was said about `target`: it just took a slot, and what
    /// its new peers said of it in an earlier membership (as the node that
    /// failed, perhaps in the same slot) is about another life.
    pub fn forget_target(&self, target: &NodeKey) {
        self.reports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(target);
    }

    /// Drops what `reporter` said (its stream closed).
    pub fn forget_reporter(&self, reporter: &NodeKey) {
        let mut reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        for by in reports.values_mut() {
            by.remove(reporter);
        }
        reports.retain(|_, by| !by.is_empty());
    }

    /// What the current members `members` (other than `target`) say.
    pub fn view<K: std::borrow::Borrow<NodeKey>>(
        &self,
        target: &NodeKey,
        members: &[K],
        now: Instant,
    ) -> PeerView {
        let reports = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        let Some(by) = reports.get(target) else {
            return PeerView::Fine;
        };
        judge(
            by.iter()
                .filter(|(r, _)| *r != target && members.iter().any(|m| m.borrow() == *r))
                .map(|(r, h)| (r.node_id(), *h)),
            now,
        )
    }
}

/// The rule: unreachable iff at least one fresh report says so and no fresh
/// report says it is reachable.
fn judge<'a>(reports: impl Iterator<Item = (&'a str, Heard)>, now: Instant) -> PeerView {
    let mut reporters = Vec::new();
    let mut last_alive: Option<Instant> = None;
    for (reporter, h) in reports {
        if now.saturating_duration_since(h.received_at) > REPORT_TTL {
            continue;
        }
        if h.reachable {
            return PeerView::Fine;
        }
        reporters.push(reporter.to_string());
        last_alive = Some(last_alive.map_or(h.last_alive, |a| a.max(h.last_alive)));
    }
    match last_alive {
        Some(last_alive) => {
            reporters.sort();
            PeerView::Unreachable {
                reporters,
                last_alive,
            }
        }
        None => PeerView::Fine,
    }
}

/// A member's answer to "do you reach node X?".
#[derive(Clone, Debug)]
pub struct CheckAnswer {
    pub reachable: bool,
    pub error: String,
}

/// What the other members said about a member the manager lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Confirmation {
    /// At least one reached it.
    ReachedBy(Vec<String>),
    /// At least one answered that it cannot reach it, and none reached it.
    Unreachable,
    /// Nobody answered in time (or there was nobody to ask).
    Unknown,
}

/// The rule over the members' answers (`None`: no answer in time).
pub fn confirmation(answers: &[(String, Option<CheckAnswer>)]) -> Confirmation {
    let reached: Vec<String> = answers
        .iter()
        .filter(|(_, a)| a.as_ref().is_some_and(|a| a.reachable))
        .map(|(asker, _)| asker.clone())
        .collect();
    if !reached.is_empty() {
        return Confirmation::ReachedBy(reached);
    }
    if answers.iter().any(|(_, a)| a.is_some()) {
        Confirmation::Unreachable
    } else {
        Confirmation::Unknown
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn heard(t0: Instant, reachable: bool, at: u64, silent: u64) -> Heard {
        Heard {
            reachable,
            last_alive: t0 + ms(at) - ms(silent),
            received_at: t0 + ms(at),
        }
    }

    #[test]
    fn peers_must_agree_and_be_fresh() {
        let t0 = Instant::now() + ms(10_000);
        let now = t0 + ms(5_000);
        // One member cannot reach it, none says otherwise: unreachable.
        let v = judge([("a", heard(t0, false, 4_800, 700))].into_iter(), now);
        assert_eq!(
            v,
            PeerView::Unreachable {
                reporters: vec!["a".into()],
                last_alive: t0 + ms(4_100)
            }
        );
        // Another member recently reached it: fine.
        let v = judge(
            [
                ("a", heard(t0, false, 4_800, 700)),
                ("b", heard(t0, true, 4_900, 0)),
            ]
            .into_iter(),
            now,
        );
        assert_eq!(v, PeerView::Fine);
        // A stale report counts for nothing.
        let v = judge([("a", heard(t0, false, 1_000, 700))].into_iter(), now);
        assert_eq!(v, PeerView::Fine);
        // The latest sign of life of any reporter is what counts.
        let v = judge(
            [
                ("a", heard(t0, false, 4_800, 2_000)),
                ("b", heard(t0, false, 4_900, 600)),
            ]
            .into_iter(),
            now,
        );
        assert!(
            matches!(v, PeerView::Unreachable { last_alive, .. } if last_alive == t0 + ms(4_300))
        );
    }

    #[test]
    fn a_check_nobody_answers_is_unknown_never_down() {
        let yes = Some(CheckAnswer {
            reachable: true,
            error: String::new(),
        });
        let no = Some(CheckAnswer {
            reachable: false,
            error: "refused".into(),
        });
        assert_eq!(
            confirmation(&[("a".into(), None), ("b".into(), None)]),
            Confirmation::Unknown
        );
        assert_eq!(confirmation(&[]), Confirmation::Unknown);
        assert_eq!(
            confirmation(&[("a".into(), None), ("b".into(), no.clone())]),
            Confirmation::Unreachable
        );
        assert_eq!(
            confirmation(&[("a".into(), yes), ("b".into(), no)]),
            Confirmation::ReachedBy(vec!["a".into()])
        );
    }

    fn k(id: &str) -> NodeKey {
        NodeKey::new("t", id)
    }

    #[test]
    fn reports_are_kept_per_reporter_and_dropped_with_it() {
        let book = LivenessBook::default();
        let now = Instant::now();
        let [n1, n2, n3] = ["n1", "n2", "n3"].map(k);
        let p = PeerAlive {
            slot: 2,
            node_id: "n2".into(),
            reachable: false,
            silent_ms: 800,
        };
        book.record(&n1, &p, now);
        assert!(matches!(
            book.view(&n2, &[&n1, &n2, &n3], now),
            PeerView::Unreachable { .. }
        ));
        // Reporters outside the current membership do not count.
        assert_eq!(book.view(&n2, &[&n2, &n3], now), PeerView::Fine);
        // Nor does it say anything of another tenant's n2.
        let other = NodeKey::new("u", "n2");
        assert_eq!(book.view(&other, &[&n1, &other], now), PeerView::Fine);
        book.forget_reporter(&n1);
        assert_eq!(book.view(&n2, &[&n1, &n2, &n3], now), PeerView::Fine);
    }

    #[test]
    fn a_node_that_takes_a_slot_starts_with_a_clean_record() {
        let book = LivenessBook::default();
        let now = Instant::now();
        let [n1, n2, n3] = ["n1", "n2", "n3"].map(k);
        let p = PeerAlive {
            slot: 1,
            node_id: "n1".into(),
            reachable: false,
            silent_ms: 800,
        };
        book.record(&n2, &p, now);
        book.record(
            &n2,
            &PeerAlive {
                node_id: "n3".into(),
                ..p
            },
            now,
        );
        book.forget_target(&n1);
        assert_eq!(book.view(&n1, &[&n1, &n2], now), PeerView::Fine);
        assert!(matches!(
            book.view(&n3, &[&n2, &n3], now),
            PeerView::Unreachable { .. }
        ));
    }
}
