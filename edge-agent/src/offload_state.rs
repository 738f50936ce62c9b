//! The offload state and settings, below the offload engine (`offload`)
//! and the shared state (`node::Shared`, which holds them): what moved
//! where, the guests, the pending releases and the records for the manager
//! (`OffloadState`, persisted in `offload.json`), the offload settings with
//! the faults a test injects (`EDGEPOOL_FAULT`), the largest lease an offer
//! may ask for, and the scheduler's view of a pool policy. Plain data: no
//! workers, no peer calls (see `offload` for the protocol and the
//! invariants).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use edgepool_common::proto as pb;
use serde::{Deserialize, Serialize};

use crate::scheduler::{self, Amounts, Target, Watermarks};

/// Largest lease an offer may ask for.
pub const MAX_LEASE_MS: u64 = 3_600_000;
/// Offload records kept for the manager (it deduplicates them).
const MAX_RECORDS: usize = 50;
/// The environment variable that injects faults (tests only).
const FAULT_ENV: &str = "EDGEPOOL_FAULT";

/// Offload settings of this agent.
#[derive(Debug)]
pub struct Settings {
    /// The reconciliation interval: the lease our offers ask for, and the
    /// one guests get when their owner asks for none.
    pub lease: Duration,
    /// How long admission keeps reserving a new guest's declared usage
    /// (until the scheduler has measured it).
    pub reservation: Duration,
    /// What one member may run here as guests.
    pub guest_limits: GuestLimits,
    pub faults: Faults,
}

/// Bounds on one member's guests on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestLimits {
    /// Guests at once.
    pub count: u32,
    /// Percent of each resource of this node's capacity.
    pub percent: u32,
}

impl Default for GuestLimits {
    fn default() -> Self {
        GuestLimits {
            count: 16,
            percent: 90,
        }
    }
}

impl Settings {
    pub fn new(lease_ms: u64, scheduler_interval_ms: u64) -> Self {
        Settings {
            lease: Duration::from_millis(lease_ms),
            reservation: Duration::from_millis((4 * scheduler_interval_ms).max(5_000)),
            guest_limits: GuestLimits::default(),
            faults: Faults::from_env(),
        }
    }

    pub fn with_guest_limits(mut self, guest_limits: GuestLimits) -> Self {
        self.guest_limits = guest_limits;
        self
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lease: Duration::from_millis(6_000),
            reservation: Duration::from_secs(5),
            guest_limits: GuestLimits::default(),
            faults: Faults::default(),
        }
    }
}

/// Faults a test injects with `EDGEPOOL_FAULT` (comma-separated):
/// - `drop-offer-answer`: after a new guest runs, answer the offer with
///   UNAVAILABLE as if the answer was lost (the guest keeps running);
/// - `hold-offer-answer=MS`: wait MS milliseconds after a new guest runs
///   before answering (time for a test to crash this node);
/// - `fail-release=N`: refuse the first N `Release` calls with UNAVAILABLE.
#[derive(Debug, Default)]
pub struct Faults {
    pub drop_offer_answer: bool,
    pub hold_offer_answer: Option<Duration>,
    pub fail_releases: AtomicU32,
}

impl Faults {
    pub fn from_env() -> Self {
        std::env::var(FAULT_ENV)
            .map(|v| Self::parse(&v))
            .unwrap_or_default()
    }

    pub fn parse(spec: &str) -> Self {
        let mut f = Faults::default();
        for item in spec.split(',').map(str::trim) {
            let (name, value) = item.split_once('=').unwrap_or((item, ""));
            match name {
                "drop-offer-answer" => f.drop_offer_answer = true,
                "hold-offer-answer" => {
                    f.hold_offer_answer =
                        Some(Duration::from_millis(value.parse().unwrap_or(5_000)))
                }
                "fail-release" => f.fail_releases = AtomicU32::new(value.parse().unwrap_or(1)),
                _ => {}
            }
        }
        f
    }

    /// Whether this Release is one the fault refuses.
    pub fn refuse_release(&self) -> bool {
        self.fail_releases
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// A guest app (one of another member's apps that runs here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// The memory and CPU limits of the app as its pool defines them (its
    /// spec is the catalog's), so a guest is held to them here too. Absent
    /// in state files of older agents: no limits.
    #[serde(default)]
    pub limits: crate::runtime::Limits,
    pub from_node: String,
    pub from_slot: u32,
    /// The owner's id of this move. Empty in state files of older agents:
    /// such a guest has no lease and stops.
    #[serde(default)]
    pub offer_id: String,
    /// When the lease ends (ms since the epoch, this node's clock) unless
    /// the owner renews it.
    #[serde(default)]
    pub lease_until_ms: u64,
    /// The usage the owner declared (reserved by admission until measured).
    #[serde(default, deserialize_with = "amounts_padded")]
    pub usage: Amounts,
    #[serde(default)]
    pub admitted_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovedOut {
    pub to_node: String,
    pub to_slot: u32,
    pub at_ms: u64,
    /// What the app used when it left (for the return-home check). Older
    /// state files hold four amounts; the missing ones read as 0.
    #[serde(deserialize_with = "amounts_padded")]
    pub usage: [u64; 5],
    /// The id of this move. Empty in state files of older agents: such an
    /// app is taken back home (its host cannot renew it).
    #[serde(default)]
    pub offer_id: String,
    /// The lease the host holds the app under (ms).
    #[serde(default)]
    pub lease_ms: u64,
    /// When the host last confirmed the app (our clock, when its answer
    /// arrived): its lease ends at the latest `lease_ms` after this.
    #[serde(default)]
    pub renewed_at_ms: u64,
}

/// A copy a peer may still run that we asked it to stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRelease {
    pub app: String,
    pub to_node: String,
    pub to_slot: u32,
    pub offer_id: String,
    pub since_ms: u64,
    #[serde(default)]
    pub attempts: u32,
}

/// Reads a list of up to five amounts, padding missing ones with 0.
fn amounts_padded<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Amounts, D::Error> {
    let v = Vec::<u64>::deserialize(d)?;
    if v.len() > 5 {
        return Err(serde::de::Error::invalid_length(
            v.len(),
            &"at most 5 amounts",
        ));
    }
    let mut out = [0; 5];
    out[..v.len()].copy_from_slice(&v);
    Ok(out)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub app: String,
    pub from_node: String,
    pub to_node: String,
    pub to_slot: u32,
    pub resource: String,
    pub utilisation: f64,
    pub triggered_at_ms: u64,
    pub running_at_ms: u64,
}

impl Record {
    /// `app` came back from `host` to this node (`home`, slot `slot`).
    pub fn returned_home(app: &str, host: &str, home: &str, slot: u32, now: u64) -> Record {
        Record {
            app: app.to_string(),
            from_node: host.to_string(),
            to_node: home.to_string(),
            to_slot: slot,
            resource: "return-home".into(),
            utilisation: 0.0,
            triggered_at_ms: now,
            running_at_ms: now,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OffloadState {
    pub moved_out: BTreeMap<String, MovedOut>,
    pub guests: BTreeMap<String, Guest>,
    /// Last move time per app (per-app cooldown).
    pub last_moved: BTreeMap<String, u64>,
    pub records: Vec<Record>,
    /// Releases not confirmed by the peer yet (retried until they are).
    #[serde(default)]
    pub releases: Vec<PendingRelease>,
}

impl OffloadState {
    pub fn load(dir: &Path) -> Self {
        std::fs::read(dir.join("offload.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        edgepool_common::fsutil::write_private(&dir.join("offload.json"), &bytes)
    }

    pub fn record(&mut self, r: Record) {
        self.records.push(r);
        let extra = self.records.len().saturating_sub(MAX_RECORDS);
        self.records.drain(..extra);
    }

    /// Forgets moves to, guests from and releases for nodes that left the
    /// pool: a moved app whose host left runs here again (the host got an
    /// assignment without the pool and stops everything); a guest whose
    /// owner left is dropped (the owner's slot now runs the whole group
    /// elsewhere).
    pub fn retain_members(&mut self, members: &[String]) {
        self.moved_out.retain(|_, m| members.contains(&m.to_node));
        self.guests.retain(|_, g| members.contains(&g.from_node));
        self.releases.retain(|r| members.contains(&r.to_node));
    }

    /// Whether we still wait for `slot` to confirm it stopped its copy of
    /// `app` (it is not offered the app again until then).
    pub fn release_pending(&self, app: &str, slot: u32) -> bool {
        self.releases
            .iter()
            .any(|r| r.app == app && r.to_slot == slot)
    }

    pub fn add_release(&mut self, r: PendingRelease) {
        if !self
            .releases
            .iter()
            .any(|x| x.app == r.app && x.to_slot == r.to_slot && x.offer_id == r.offer_id)
        {
            self.releases.push(r);
        }
    }

    /// Stops counting on the host of `app` for move `offer_id`: the app is
    /// ours to run again, and the host is asked to stop its copy until it
    /// confirms. None if the app is not moved out under that id.
    pub fn take_back(&mut self, app: &str, offer_id: &str, now_ms: u64) -> Option<MovedOut> {
        if self
            .moved_out
            .get(app)
            .is_none_or(|o| o.offer_id != offer_id)
        {
            return None;
        }
        let out = self.moved_out.remove(app)?;
        self.add_release(PendingRelease {
            app: app.to_string(),
            to_node: out.to_node.clone(),
            to_slot: out.to_slot,
            offer_id: out.offer_id.clone(),
            since_ms: now_ms,
            attempts: 0,
        });
        Some(out)
    }

    /// Removes the guests whose lease ended by `now_ms`; returns them.
    pub fn expire_guests(&mut self, now_ms: u64) -> Vec<Guest> {
        let expired: Vec<Guest> = self
            .guests
            .values()
            .filter(|g| g.lease_until_ms <= now_ms)
            .cloned()
            .collect();
        for g in &expired {
            self.guests.remove(&g.name);
        }
        expired
    }

    /// Admission reservations of the guests (but `except`), with their last
    /// measurement.
    pub fn reservations(
        &self,
        measured: &BTreeMap<String, Amounts>,
        except: Option<&str>,
    ) -> Vec<scheduler::Reservation> {
        self.guests
            .values()
            .filter(|g| Some(g.name.as_str()) != except)
            .map(|g| scheduler::Reservation {
                declared: g.usage,
                measured: measured.get(&g.name).copied().unwrap_or_default(),
                admitted_at_ms: g.admitted_at_ms,
            })
            .collect()
    }
}

/// The scheduler's view of a pool policy.
pub fn policy_of(p: &pb::Policy) -> scheduler::Policy {
    let w = |t: &Option<pb::Threshold>, d: (f64, f64)| {
        let (high, low) = t.as_ref().map(|t| (t.high, t.low)).unwrap_or(d);
        Watermarks { high, low }
    };
    scheduler::Policy {
        marks: [
            w(&p.cpu, (0.8, 0.6)),
            w(&p.memory, (0.85, 0.7)),
            w(&p.disk, (0.9, 0.8)),
            w(&p.network, (0.8, 0.6)),
            w(&p.disk_io, (0.9, 0.8)),
        ],
        sustain_ms: u64::from(p.sustain_seconds) * 1000,
        cooldown_ms: u64::from(p.cooldown_seconds) * 1000,
        target: if p.target == pb::TargetMode::Spread as i32 {
            Target::Spread
        } else {
            Target::Single
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_out_usage_of_an_older_state_file_is_padded() {
        let old = r#"{"to_node":"n2","to_slot":2,"at_ms":5,"usage":[1,2,3,4]}"#;
        let m: MovedOut = serde_json::from_str(old).unwrap();
        assert_eq!(m.usage, [1, 2, 3, 4, 0]);
        let new: MovedOut = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(new, m);
        let too_long = r#"{"to_node":"n2","to_slot":2,"at_ms":5,"usage":[1,2,3,4,5,6]}"#;
        assert!(serde_json::from_str::<MovedOut>(too_long).is_err());
    }

    #[test]
    fn state_files_of_older_agents_load_without_leases() {
        let old = r#"{"moved_out":{"a":{"to_node":"n2","to_slot":2,"at_ms":5,"usage":[1,2,3,4]}},
            "guests":{"g":{"name":"g","command":["sleep","9"],"env":{},"from_node":"n3","from_slot":3}},
            "last_moved":{},"records":[]}"#;
        let mut s: OffloadState = serde_json::from_str(old).unwrap();
        assert_eq!(s.moved_out["a"].offer_id, "");
        assert!(s.releases.is_empty());
        // A guest without a lease stops at the first check.
        let expired = s.expire_guests(1);
        assert_eq!(expired.len(), 1);
        assert!(s.guests.is_empty());
    }

    fn moved(offer_id: &str) -> MovedOut {
        MovedOut {
            to_node: "n2".into(),
            to_slot: 2,
            at_ms: 1,
            usage: [0; 5],
            offer_id: offer_id.into(),
            lease_ms: 1000,
            renewed_at_ms: 1,
        }
    }

    #[test]
    fn taking_back_records_a_release_once_and_only_for_the_same_move() {
        let mut s = OffloadState::default();
        s.moved_out.insert("a".into(), moved("aa"));
        assert!(s.take_back("a", "bb", 10).is_none(), "another move's id");
        assert!(s.moved_out.contains_key("a"));
        assert!(s.take_back("a", "aa", 10).is_some());
        assert!(s.moved_out.is_empty());
        assert!(s.release_pending("a", 2));
        assert!(!s.release_pending("a", 3));
        s.add_release(s.releases[0].clone());
        assert_eq!(s.releases.len(), 1, "the same release is kept once");
        // A host that left the pool has nothing left to release.
        s.retain_members(&["n3".into()]);
        assert!(s.releases.is_empty());
    }

    #[test]
    fn guests_expire_at_the_end_of_their_lease() {
        let mut s = OffloadState::default();
        for (name, until) in [("a", 100), ("b", 200)] {
            s.guests.insert(
                name.into(),
                Guest {
                    name: name.into(),
                    command: vec!["sleep".into()],
                    env: BTreeMap::new(),
                    limits: Default::default(),
                    from_node: "n1".into(),
                    from_slot: 1,
                    offer_id: "ab".into(),
                    lease_until_ms: until,
                    usage: [100, 0, 0, 0, 0],
                    admitted_at_ms: 50,
                },
            );
        }
        assert!(s.expire_guests(99).is_empty());
        let gone: Vec<String> = s.expire_guests(150).into_iter().map(|g| g.name).collect();
        assert_eq!(gone, ["a"]);
        let r = s.reservations(&BTreeMap::from([("b".to_string(), [40, 0, 0, 0, 0])]), None);
        assert_eq!(scheduler::reserved(&r, 60, 1_000), [60, 0, 0, 0, 0]);
        assert!(s.reservations(&BTreeMap::new(), Some("b")).is_empty());
    }

    #[test]
    fn faults_parse() {
        let f = Faults::parse("drop-offer-answer, fail-release=2,hold-offer-answer=300,unknown");
        assert!(f.drop_offer_answer);
        assert_eq!(f.hold_offer_answer, Some(Duration::from_millis(300)));
        assert!(f.refuse_release());
        assert!(f.refuse_release());
        assert!(!f.refuse_release());
        let none = Faults::parse("");
        assert!(!none.drop_offer_answer && !none.refuse_release());
    }
}
