//! When each other member of the pool was last heard from (`Heard`): the
//! beat streams of `liveness` (those this node opens, and the `Answers` the
//! peer server serves) record signs of life here; the liveness loop reads
//! it. Kept in the shared state (`node::Shared::heard`); a leaf: imports
//! nothing from the crate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

/// One watched member: its slot and the serial of its member certificate.
pub type Member = (u32, String);

/// When each watched member was last heard from (a beat or an answer).
#[derive(Debug)]
pub struct Heard {
    at: Mutex<HashMap<Member, Instant>>,
    suspect_after: Duration,
    /// Wakes the loop: a member silent for `suspect_after` was heard again.
    revived: Notify,
}

impl Heard {
    pub fn new(suspect_after: Duration) -> Self {
        Heard {
            at: Mutex::new(HashMap::new()),
            suspect_after,
            revived: Notify::new(),
        }
    }

    /// Records a sign of life of member `slot` presenting the certificate
    /// with `serial`. Members not watched (not in our membership, or with
    /// another certificate) are ignored.
    pub fn record(&self, slot: u32, serial: &str) {
        let now = Instant::now();
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = at.iter_mut().find(|((s, c), _)| *s == slot && c == serial) {
            let was_silent = now.saturating_duration_since(*t) >= self.suspect_after;
            *t = now;
            if was_silent {
                self.revived.notify_one();
            }
        }
    }

    /// Watches exactly `members`: a member new to the set gets the full
    /// `suspect_after` before it can look silent.
    pub fn watch(&self, members: &[Member]) {
        let now = Instant::now();
        let mut at = self.at.lock().unwrap_or_else(|e| e.into_inner());
        at.retain(|k, _| members.contains(k));
        for m in members {
            at.entry(m.clone()).or_insert(now);
        }
    }

    /// When `member` was last heard from (None: not watched).
    pub fn last(&self, member: &Member) -> Option<Instant> {
        self.at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(member)
            .copied()
    }

    /// How long a member may be silent before it is published as
    /// unreachable.
    pub fn suspect_after(&self) -> Duration {
        self.suspect_after
    }

    /// Resolves when a member silent for `suspect_after` is heard again.
    pub fn revived(&self) -> Notified<'_> {
        self.revived.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn heard_tracks_only_watched_members_and_wakes_on_revival() {
        let heard = Heard::new(Duration::from_millis(200));
        heard.record(2, "aa");
        assert!(heard.last(&(2, "aa".into())).is_none(), "not watched yet");
        heard.watch(&[(2, "aa".into())]);
        let start = heard.last(&(2, "aa".into())).expect("watched");
        tokio::time::sleep(Duration::from_millis(20)).await;
        heard.record(2, "bb");
        assert_eq!(heard.last(&(2, "aa".into())), Some(start), "other serial");
        heard.record(2, "aa");
        assert!(heard.last(&(2, "aa".into())) > Some(start));
        // Heard within suspect_after: no wake-up.
        let woken = tokio::time::timeout(Duration::from_millis(1), heard.revived.notified());
        assert!(woken.await.is_err());
        tokio::time::sleep(Duration::from_millis(250)).await;
        heard.record(2, "aa");
        let woken = tokio::time::timeout(Duration::from_millis(1), heard.revived.notified());
        assert!(
            woken.await.is_ok(),
            "a silent member heard again wakes the loop"
        );
        heard.watch(&[(3, "cc".into())]);
        assert!(heard.last(&(2, "aa".into())).is_none(), "no longer watched");
    }
}
