//! Threshold scheduling on the node: measure the group's need, evaluate the
//! pool's policy on every sample, and move apps to peers (offload) on the
//! node's own decision, peer to peer, with or without the manager.
//!
//! State (persisted in `offload.json` so a restart keeps it):
//! - `moved_out`: our group's apps that run on a peer now (not here), each
//!   with the id of its move (offer id) and when its host last confirmed it;
//! - `guests`: other members' apps we run for them, each with its owner's
//!   slot, offer id and lease;
//! - `releases`: copies a peer may still run that we asked it to stop and it
//!   has not confirmed stopping yet (retried until it does).
//!
//! The apps that run here are `(our group - moved_out) + guests`. Guests are
//! never offloaded again (no A -> B -> C chains, no ping-pong); a moved app
//! is not moved again within the cooldown; the node itself does not trigger
//! again within the cooldown after an offload.
//!
//! Offload protocol (PeerService, mutual TLS, pool members only): `Offer`
//! (spec, measured usage, a fresh random offer id, the lease) -> the peer
//! admits only if it stays under its own high watermarks counting what it
//! reserved for guests it has not measured yet, records the guest and starts
//! it (admission and record in one critical section), and answers once it
//! runs -> we record it as moved out and stop our copy. No answer (lost,
//! timed out, the peer crashed) is not a refusal: we repeat the offer once
//! with the same id (the peer answers again without a second start), then
//! ask the peer to drop it (`Release`, retried until confirmed) and try the
//! next peer; our copy kept running throughout. Return home (policy flag):
//! we start our copy first, then `Release` the peer's, retried until it
//! succeeds.
//!
//! Leases (the reconciliation interval, `offload_lease_ms`): every third of
//! it the owner renews each moved-out app at its host (`Offer` with `renew`,
//! the current spec) and retries pending releases. A host stops a guest
//! whose lease ran out; an owner that got no renewal through for a whole
//! lease (plus a margin) or is told the host no longer runs it runs the app
//! at home again. An app the owner's group no longer lists is released.
//! See ARCHITECTURE.md ("Threshold scheduling (offload)") for the
//! invariants.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use edgepool_common::proto as pb;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::node::Shared;
use crate::scheduler::{self, Amounts, AppLoad, Evaluator, PeerLoad, Resource, Target, Watermarks};

const OFFER_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a peer waits for an admitted guest to run before it gives up.
const START_WAIT: Duration = Duration::from_secs(4);
/// Longest wait for a renewal or a release answer.
const RECONCILE_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest sleep of the lease check (it also wakes when a lease runs out
/// and when a guest is admitted).
const LEASE_POLL: Duration = Duration::from_secs(1);
/// Added to a lease before an owner that could not renew runs the app at
/// home again: the host's lease check and the app's exit fit in it.
const TAKE_BACK_MARGIN_MS: u64 = 500;
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
    pub faults: Faults,
}

impl Settings {
    pub fn new(lease_ms: u64, scheduler_interval_ms: u64) -> Self {
        Settings {
            lease: Duration::from_millis(lease_ms),
            reservation: Duration::from_millis((4 * scheduler_interval_ms).max(5_000)),
            faults: Faults::from_env(),
        }
    }

    fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lease: Duration::from_millis(6_000),
            reservation: Duration::from_secs(5),
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
    fn refuse_release(&self) -> bool {
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
    fn returned_home(app: &str, host: &str, home: &str, slot: u32, now: u64) -> Record {
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

/// A fresh offer id: 128 random bits as 32 lowercase hex digits.
pub fn new_offer_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for an offer id: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn valid_offer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How the node's network use is measured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetworkAccounting {
    /// The measured interfaces' rx+tx rate (one agent per machine).
    #[default]
    Interface,
    /// Each app's socket I/O (its process group's read/written bytes that
    /// did not go to disk): for several agents on one machine.
    Process,
}

/// Per-app network accounting from /proc: bytes through read/write calls
/// (rchar + wchar) minus bytes that hit storage (read_bytes + write_bytes),
/// summed over the app's process group.
fn socket_bytes(pgid: u32) -> u64 {
    // The app leads its process group: its own process tree, not a walk of
    // every process on the machine.
    let mut total = 0u64;
    for pid in crate::runtime::process_tree(pgid) {
        let Ok(io) = std::fs::read_to_string(format!("/proc/{pid}/io")) else {
            continue;
        };
        let field = |name: &str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let chars = field("rchar:") + field("wchar:");
        let disk = field("read_bytes:") + field("write_bytes:");
        total += chars.saturating_sub(disk);
    }
    total
}

/// Bytes used by the files below `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

/// Measures per-app usage (cpu, memory, disk space, network, disk I/O
/// rate) between samples.
struct Meter {
    net: BTreeMap<String, (u64, u64)>,
}

impl Meter {
    fn measure(
        &mut self,
        shared: &Shared,
        accounting: NetworkAccounting,
    ) -> BTreeMap<String, Amounts> {
        let now = now_ms();
        let mut out = BTreeMap::new();
        for s in shared.runtime.status() {
            let Some(pid) = s.pid else { continue };
            let disk_mb = dir_bytes(&shared.data.dir.join("apps").join(&s.name)) / (1024 * 1024);
            let mut kbps = 0;
            if accounting == NetworkAccounting::Process {
                let bytes = socket_bytes(pid);
                if let Some((b0, t0)) = self.net.get(&s.name)
                    && now > *t0
                {
                    kbps = bytes.saturating_sub(*b0) * 8 / (now - t0);
                }
                self.net.insert(s.name.clone(), (bytes, now));
            }
            let disk_io_kbps =
                (s.usage.disk_read_bytes_per_sec + s.usage.disk_write_bytes_per_sec) / 1024;
            out.insert(
                s.name.clone(),
                [
                    s.usage.cpu_millis,
                    s.usage.memory_mb,
                    disk_mb,
                    kbps,
                    disk_io_kbps,
                ],
            );
        }
        self.net.retain(|k, _| out.contains_key(k));
        out
    }
}

/// Runs the threshold policy until shutdown.
pub async fn scheduler_loop(
    shared: Arc<Shared>,
    every: Duration,
    accounting: NetworkAccounting,
    reserve: Amounts,
    shutdown: CancellationToken,
) {
    let mut evaluator = Evaluator::new();
    let mut meter = Meter {
        net: BTreeMap::new(),
    };
    let mut calm_since: Option<u64> = None;
    let mut pool_key: Option<(String, u32)> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // Off the runtime thread: walking an app's files or reading /proc
        // must never hold up the stream, the beats or the peer server.
        let measured = tokio::task::spawn_blocking({
            let shared = shared.clone();
            move || {
                let usage = meter.measure(&shared, accounting);
                (meter, usage)
            }
        })
        .await;
        let usage = match measured {
            Ok((m, usage)) => {
                meter = m;
                usage
            }
            Err(e) => {
                tracing::warn!(error = %e, "measuring the apps failed");
                meter = Meter {
                    net: BTreeMap::new(),
                };
                continue;
            }
        };
        shared.set_app_usage(usage.clone());
        let mut need = scheduler::need(&usage.values().copied().collect::<Vec<_>>(), reserve);
        if accounting == NetworkAccounting::Interface {
            need[Resource::Network.index()] =
                shared.interface_kbps() + reserve[Resource::Network.index()];
        }
        shared.set_need(need);
        let (Some(m), Some(policy)) = (shared.membership(), shared.policy()) else {
            continue;
        };
        // A new pool (or a slot moved here) starts with fresh windows and
        // no cooldown from an earlier pool.
        if pool_key.as_ref() != Some(&(m.pool.clone(), m.slot)) {
            pool_key = Some((m.pool.clone(), m.slot));
            evaluator = Evaluator::new();
            calm_since = None;
        }
        let capacity = shared.capacity_amounts();
        let util = scheduler::utilisation(need, capacity);
        let now = now_ms();
        if let Some(trigger) = evaluator.observe(now, util, &policy) {
            let moved = offload(&shared, &m, trigger, need, capacity, &usage, &policy).await;
            if moved > 0 {
                evaluator.offloaded(now_ms());
            }
        }
        if shared.return_home() {
            let calm = util
                .iter()
                .zip(policy.marks.iter())
                .all(|(u, w)| *u <= w.low);
            calm_since = if calm { calm_since.or(Some(now)) } else { None };
            if calm_since.is_some_and(|t| now.saturating_sub(t) >= shared.return_home_ms()) {
                return_home(&shared, &m, need, capacity, &policy).await;
                calm_since = None;
            }
        }
    }
}

/// Plans and executes the moves for one trigger. Returns how many moved.
async fn offload(
    shared: &Shared,
    m: &crate::membership::Membership,
    trigger: scheduler::Trigger,
    need: Amounts,
    capacity: Amounts,
    usage: &BTreeMap<String, Amounts>,
    policy: &scheduler::Policy,
) -> usize {
    let state = shared.offload_state();
    let specs = shared.own_apps();
    let apps: Vec<AppLoad> = specs
        .iter()
        .filter(|a| !state.moved_out.contains_key(&a.name) && !state.guests.contains_key(&a.name))
        .filter_map(|a| {
            Some(AppLoad {
                name: a.name.clone(),
                usage: *usage.get(&a.name)?,
                priority: a.priority,
                offloadable: a.offloadable,
                moved_at_ms: state.last_moved.get(&a.name).copied(),
            })
        })
        .collect();
    let peers: Vec<PeerLoad> = shared
        .peer_loads()
        .into_iter()
        .map(|(slot, capacity, need)| PeerLoad {
            slot,
            capacity,
            need,
            marks: policy.marks,
        })
        .collect();
    let plan = scheduler::plan(
        trigger.resource,
        need,
        capacity,
        &apps,
        &peers,
        policy,
        now_ms(),
    );
    if plan.is_empty() {
        tracing::warn!(
            resource = trigger.resource.name(),
            utilisation = trigger.utilisation,
            "over the threshold but no peer can take an app"
        );
        return 0;
    }
    let lease_ms = shared.offload_settings().lease_ms();
    let mut moved = 0;
    for mv in plan {
        let Some(spec) = specs.iter().find(|a| a.name == mv.app) else {
            continue;
        };
        let app_usage = usage.get(&mv.app).copied().unwrap_or_default();
        // The planned peer first, then the others by headroom: a peer whose
        // load changed since its last probe refuses, and we try the next.
        let mut order = vec![mv.to_slot];
        order.extend(peers.iter().map(|p| p.slot).filter(|s| *s != mv.to_slot));
        for slot in order {
            // A peer that may still run an earlier copy is not offered the
            // app again before it confirms it stopped that one.
            if shared.offload_state().release_pending(&spec.name, slot) {
                continue;
            }
            let offer_id = match new_offer_id() {
                Ok(id) => id,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot offer");
                    return moved;
                }
            };
            let offer = Offer {
                spec,
                usage: app_usage,
                reason: trigger.resource.name(),
                offer_id: &offer_id,
                lease_ms,
            };
            match offer_with_retry(shared, m, slot, &offer).await {
                Ok(node) => {
                    let running_at = now_ms();
                    shared.update_offload(|s| {
                        s.moved_out.insert(
                            spec.name.clone(),
                            MovedOut {
                                to_node: node.clone(),
                                to_slot: slot,
                                at_ms: running_at,
                                usage: app_usage,
                                offer_id: offer_id.clone(),
                                lease_ms,
                                renewed_at_ms: running_at,
                            },
                        );
                        s.last_moved.insert(spec.name.clone(), running_at);
                        s.record(Record {
                            app: spec.name.clone(),
                            from_node: shared.info.node_id.clone(),
                            to_node: node.clone(),
                            to_slot: slot,
                            resource: trigger.resource.name().to_string(),
                            utilisation: trigger.utilisation,
                            triggered_at_ms: trigger.at_ms,
                            running_at_ms: running_at,
                        });
                    });
                    // Stop our copy only now that it runs there.
                    if let Err(e) = shared.sync_apps().await {
                        tracing::warn!(error = %e, "could not stop the offloaded copy");
                    }
                    tracing::info!(app = %spec.name, to = %node, %offer_id, resource = trigger.resource.name(), "offloaded");
                    moved += 1;
                    break;
                }
                Err(OfferError::Refused(_, e)) => {
                    tracing::info!(app = %spec.name, slot, error = %e, "offer refused; trying another peer")
                }
                Err(OfferError::Unanswered(e)) => {
                    // The peer may run it although we never heard so: ask it
                    // to drop it (retried until it confirms; its lease ends
                    // it anyway) and go on with our copy still running.
                    tracing::warn!(app = %spec.name, slot, %offer_id, error = %e, "no answer to the offer; asking the peer to drop it and trying another");
                    let to_node = m
                        .others()
                        .find(|p| p.slot == slot)
                        .map(|p| p.node_id.clone())
                        .unwrap_or_default();
                    shared.update_offload(|s| {
                        s.add_release(PendingRelease {
                            app: spec.name.clone(),
                            to_node,
                            to_slot: slot,
                            offer_id: offer_id.clone(),
                            since_ms: now_ms(),
                            attempts: 0,
                        })
                    });
                    shared.kick_offload();
                }
            }
        }
    }
    moved
}

/// One offer (or renewal) as sent to a peer.
struct Offer<'a> {
    spec: &'a pb::AppSpec,
    usage: Amounts,
    reason: &'a str,
    offer_id: &'a str,
    lease_ms: u64,
}

impl Offer<'_> {
    fn request(&self, renew: bool) -> pb::OfferRequest {
        pb::OfferRequest {
            app: Some(self.spec.clone()),
            usage: Some(pb::Resources {
                cpu_millis: self.usage[0],
                memory_mb: self.usage[1],
                disk_mb: self.usage[2],
                network_mbps: self.usage[3],
                disk_io_kbps: self.usage[4],
            }),
            reason: self.reason.to_string(),
            offer_id: self.offer_id.to_string(),
            lease_ms: self.lease_ms.min(MAX_LEASE_MS) as u32,
            renew,
        }
    }
}

/// How an offer failed.
#[derive(Debug)]
enum OfferError {
    /// The peer refused it (with this code), or it never left: nothing
    /// runs there.
    Refused(tonic::Code, String),
    /// No answer (lost, timed out, the peer went away): it may run there.
    Unanswered(String),
}

/// Whether a status proves the peer did not start the app: the refusals
/// the peer answers before starting anything.
fn refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::ResourceExhausted
            | tonic::Code::AlreadyExists
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::NotFound
            | tonic::Code::Unimplemented
    )
}

/// Offers once, and once more with the same offer id when the first try got
/// no answer (the peer answers a repeated id without starting twice).
async fn offer_with_retry(
    shared: &Shared,
    m: &crate::membership::Membership,
    slot: u32,
    offer: &Offer<'_>,
) -> Result<String, OfferError> {
    match send_offer(shared, m, slot, offer.request(false), OFFER_TIMEOUT).await {
        Err(OfferError::Unanswered(e)) => {
            tracing::info!(app = %offer.spec.name, slot, offer_id = offer.offer_id, error = %e, "no answer to the offer; repeating it");
            send_offer(shared, m, slot, offer.request(false), OFFER_TIMEOUT)
                .await
                .map(|(node, _)| node)
        }
        other => other.map(|(node, _)| node),
    }
}

async fn send_offer(
    shared: &Shared,
    m: &crate::membership::Membership,
    slot: u32,
    req: pb::OfferRequest,
    timeout: Duration,
) -> Result<(String, u32), OfferError> {
    let peer = m.others().find(|p| p.slot == slot).ok_or_else(|| {
        OfferError::Refused(tonic::Code::FailedPrecondition, "no such peer".into())
    })?;
    let mut client = crate::peer::peer_client(shared, m, slot, &peer.peer_address)
        .map_err(|e| OfferError::Refused(tonic::Code::FailedPrecondition, e.to_string()))?;
    let answer = tokio::time::timeout(timeout, client.offer(req))
        .await
        .map_err(|_| OfferError::Unanswered("offer timed out".into()))?
        .map_err(|s| {
            if refusal(s.code()) {
                OfferError::Refused(s.code(), s.message().to_string())
            } else {
                OfferError::Unanswered(format!("{}: {}", s.code(), s.message()))
            }
        })?;
    Ok((peer.node_id.clone(), answer.into_inner().pid))
}

/// Brings moved-out apps back when there is room under `low` for them.
async fn return_home(
    shared: &Shared,
    m: &crate::membership::Membership,
    need: Amounts,
    capacity: Amounts,
    policy: &scheduler::Policy,
) {
    let state = shared.offload_state();
    let mut planned = need;
    for (app, out) in &state.moved_out {
        let fits = Resource::ALL.iter().all(|r| {
            let i = r.index();
            let cap = capacity[i] as f64;
            !r.evaluated(capacity[i])
                || (planned[i] + out.usage[i]) as f64 <= policy.marks[i].low * cap
                || out.usage[i] == 0
        });
        if !fits {
            continue;
        }
        for (p, u) in planned.iter_mut().zip(out.usage) {
            *p += u;
        }
        // Start our copy first, then release the peer's: the release is
        // recorded with the change, so it is retried until the peer
        // confirms, also across a restart.
        let now = now_ms();
        let mut taken = false;
        shared.update_offload(|s| {
            taken = s.take_back(app, &out.offer_id, now).is_some();
            if taken {
                s.last_moved.insert(app.clone(), now);
                s.record(Record::returned_home(
                    app,
                    &out.to_node,
                    &shared.info.node_id,
                    m.slot,
                    now,
                ));
            }
        });
        if !taken {
            continue;
        }
        if let Err(e) = shared.sync_apps().await {
            tracing::warn!(error = %e, "could not start the returning app");
        }
        tracing::info!(%app, from = %out.to_node, "returned home");
        shared.kick_offload();
    }
}

/// Runs the owner's side of the leases until shutdown: every third of the
/// lease (or when kicked) renew every moved-out app at its host, take back
/// what the host no longer runs or what could not be renewed for a whole
/// lease, release what the group no longer lists, and retry releases.
pub async fn reconcile_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let every = (shared.offload_settings().lease / 3).max(Duration::from_millis(100));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = shared.offload_kicked() => {}
        }
        if let Some(m) = shared.membership() {
            reconcile(&shared, &m).await;
        }
    }
}

/// What a renewal found out.
enum Renewal {
    /// The host confirmed the lease; our clock when its answer came.
    Confirmed(u64),
    /// The host no longer runs the app under this move.
    Gone(String),
    /// No answer.
    Failed(String),
}

/// One reconciliation round of the owner (see [`reconcile_loop`]).
pub async fn reconcile(shared: &Arc<Shared>, m: &Arc<crate::membership::Membership>) {
    let own = shared.own_apps();
    let state = shared.offload_state();
    let mut taken_back = Vec::new();
    let mut renewals = tokio::task::JoinSet::new();
    for (app, out) in &state.moved_out {
        let spec = own.iter().find(|a| a.name == *app);
        match spec {
            None => taken_back.push((app.clone(), out.clone(), "no longer in the group")),
            Some(_) if out.offer_id.is_empty() => {
                taken_back.push((app.clone(), out.clone(), "moved by an older agent"))
            }
            Some(spec) => {
                let (shared, m, spec, out) = (shared.clone(), m.clone(), spec.clone(), out.clone());
                renewals.spawn(async move {
                    let offer = Offer {
                        spec: &spec,
                        usage: out.usage,
                        reason: "renew",
                        offer_id: &out.offer_id,
                        lease_ms: out.lease_ms,
                    };
                    let renewal = match send_offer(
                        &shared,
                        &m,
                        out.to_slot,
                        offer.request(true),
                        RECONCILE_RPC_TIMEOUT.min(shared.offload_settings().lease / 3),
                    )
                    .await
                    {
                        Ok(_) => Renewal::Confirmed(now_ms()),
                        // Only NOT_FOUND says the host dropped it; a
                        // refusal (e.g. a membership change it has not
                        // seen yet) is retried until the lease runs out.
                        Err(OfferError::Refused(tonic::Code::NotFound, e)) => Renewal::Gone(e),
                        Err(OfferError::Refused(_, e) | OfferError::Unanswered(e)) => {
                            Renewal::Failed(e)
                        }
                    };
                    (spec.name.clone(), out, renewal)
                });
            }
        }
    }
    while let Some(done) = renewals.join_next().await {
        let Ok((app, out, renewal)) = done else {
            continue;
        };
        match renewal {
            Renewal::Confirmed(at) => shared.update_offload(|s| {
                if let Some(o) = s.moved_out.get_mut(&app)
                    && o.offer_id == out.offer_id
                {
                    o.renewed_at_ms = at;
                }
            }),
            Renewal::Gone(e) => {
                tracing::warn!(%app, host = %out.to_node, error = %e, "the host no longer runs the app: running it here again");
                taken_back.push((app, out, "the host no longer runs it"));
            }
            Renewal::Failed(e) => {
                let deadline = out
                    .renewed_at_ms
                    .saturating_add(out.lease_ms)
                    .saturating_add(TAKE_BACK_MARGIN_MS);
                if now_ms() >= deadline {
                    tracing::warn!(%app, host = %out.to_node, error = %e, "no renewal for a whole lease: running the app here again");
                    taken_back.push((app, out, "its lease ran out at the host"));
                } else {
                    tracing::info!(%app, host = %out.to_node, error = %e, "lease renewal failed; retrying");
                }
            }
        }
    }
    if !taken_back.is_empty() {
        let now = now_ms();
        shared.update_offload(|s| {
            for (app, out, why) in &taken_back {
                if s.take_back(app, &out.offer_id, now).is_some() {
                    tracing::info!(%app, host = %out.to_node, why, "taken back from the host");
                    if own.iter().any(|a| a.name == *app) {
                        s.record(Record::returned_home(
                            app,
                            &out.to_node,
                            &shared.info.node_id,
                            m.slot,
                            now,
                        ));
                    }
                }
            }
        });
        if let Err(e) = shared.sync_apps().await {
            tracing::warn!(error = %e, "could not run the taken-back apps");
        }
    }
    release_pending(shared, m).await;
}

/// Sends every pending release once; confirmed ones are forgotten.
async fn release_pending(shared: &Shared, m: &crate::membership::Membership) {
    let pending = shared.offload_state().releases;
    for r in pending {
        // A host whose slot another node holds now got an assignment
        // without the pool and stops everything: nothing to release.
        let result = match m
            .others()
            .find(|p| p.slot == r.to_slot && p.node_id == r.to_node)
        {
            None => Ok(()),
            Some(peer) => {
                match crate::peer::peer_client(shared, m, peer.slot, &peer.peer_address) {
                    Err(e) => Err(e.to_string()),
                    Ok(mut client) => match tokio::time::timeout(
                        RECONCILE_RPC_TIMEOUT,
                        client.release(pb::ReleaseRequest {
                            app: r.app.clone(),
                            offer_id: r.offer_id.clone(),
                        }),
                    )
                    .await
                    {
                        Err(_) => Err("release timed out".to_string()),
                        Ok(Err(s)) if s.code() == tonic::Code::NotFound => Ok(()),
                        Ok(Err(s)) => Err(format!("{}: {}", s.code(), s.message())),
                        Ok(Ok(_)) => Ok(()),
                    },
                }
            }
        };
        let same = |x: &PendingRelease| {
            x.app == r.app && x.to_slot == r.to_slot && x.offer_id == r.offer_id
        };
        match result {
            Ok(()) => {
                tracing::info!(app = %r.app, host = %r.to_node, attempts = r.attempts + 1, "the peer released the app");
                shared.update_offload(|s| s.releases.retain(|x| !same(x)));
            }
            Err(e) => {
                let attempts = r.attempts + 1;
                if attempts.is_power_of_two() {
                    tracing::warn!(app = %r.app, host = %r.to_node, attempts, error = %e, "release failed; retrying");
                }
                shared.update_offload(|s| {
                    if let Some(x) = s.releases.iter_mut().find(|x| same(x)) {
                        x.attempts = attempts;
                    }
                });
            }
        }
    }
}

/// Runs the host's side of the leases until shutdown: guests whose lease
/// ran out stop.
pub async fn lease_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        // Until the first lease runs out, or a guest is admitted.
        let now = now_ms();
        let first = shared.with_offload(|s| s.guests.values().map(|g| g.lease_until_ms).min());
        let wait = first.map_or(LEASE_POLL, |t| {
            Duration::from_millis(t.saturating_sub(now)).min(LEASE_POLL)
        });
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = shared.guest_admitted() => {}
        }
        let now = now_ms();
        if !shared.with_offload(|s| s.guests.values().any(|g| g.lease_until_ms <= now)) {
            continue;
        }
        let mut expired = Vec::new();
        shared.update_offload(|s| expired = s.expire_guests(now));
        for g in &expired {
            tracing::warn!(app = %g.name, owner = %g.from_node, offer_id = %g.offer_id, "the owner did not renew the guest's lease: stopping it");
        }
        if let Err(e) = shared.sync_apps().await {
            tracing::warn!(error = %e, "could not stop the expired guests");
        }
    }
}

/// What admission decided for a new offer.
enum Admission {
    /// The caller's offer with this id is already here.
    Repeated,
    Admitted,
    Refused(Resource),
}

/// Peer side of `Offer`: admission, start, wait until it runs; or, with
/// `renew`, a lease renewal.
pub async fn admit(
    shared: &Shared,
    caller_slot: u32,
    req: pb::OfferRequest,
) -> Result<u32, tonic::Status> {
    let spec = req
        .app
        .ok_or_else(|| tonic::Status::invalid_argument("app: required"))?;
    if req.offer_id.is_empty() {
        return Err(tonic::Status::invalid_argument("offer_id: required"));
    }
    if !valid_offer_id(&req.offer_id) {
        return Err(tonic::Status::invalid_argument(
            "offer_id: at most 64 lowercase hex digits",
        ));
    }
    if u64::from(req.lease_ms) > MAX_LEASE_MS {
        return Err(tonic::Status::invalid_argument(format!(
            "lease_ms: at most {MAX_LEASE_MS}"
        )));
    }
    let m = shared
        .membership()
        .ok_or_else(|| tonic::Status::failed_precondition("not a pool member"))?;
    let policy = shared
        .policy()
        .ok_or_else(|| tonic::Status::failed_precondition("no policy"))?;
    let from = m
        .members
        .iter()
        .find(|p| p.slot == caller_slot)
        .map(|p| p.node_id.clone())
        .ok_or_else(|| tonic::Status::permission_denied("unknown caller slot"))?;
    let settings = shared.offload_settings();
    let lease_ms = match u64::from(req.lease_ms) {
        0 => settings.lease_ms(),
        l => l,
    };
    let env: BTreeMap<String, String> = spec.env.clone().into_iter().collect();
    let offer_id = req.offer_id.clone();
    let ours = |g: &Guest| g.from_slot == caller_slot && g.offer_id == offer_id;
    if req.renew {
        let mut found = false;
        let mut changed = false;
        shared.update_offload(|s| {
            if let Some(g) = s.guests.get_mut(&spec.name).filter(|g| ours(g)) {
                found = true;
                g.lease_until_ms = g.lease_until_ms.max(now_ms().saturating_add(lease_ms));
                // The owner's group may have changed the app: follow it.
                if g.command != spec.command || g.env != env {
                    g.command = spec.command.clone();
                    g.env = env.clone();
                    changed = true;
                }
            }
        });
        if !found {
            return Err(tonic::Status::not_found(format!(
                "no guest {:?} with offer {offer_id} of this caller",
                spec.name
            )));
        }
        if changed && let Err(e) = shared.sync_apps().await {
            return Err(tonic::Status::internal(format!(
                "could not restart {}: {e}",
                spec.name
            )));
        }
        return Ok(running_pid(shared, &spec.name).unwrap_or(0));
    }
    if shared.own_apps().iter().any(|a| a.name == spec.name) {
        return Err(tonic::Status::already_exists(format!(
            "{} is one of this node's own apps",
            spec.name
        )));
    }
    let u = req.usage.unwrap_or_default();
    let usage = [
        u.cpu_millis,
        u.memory_mb,
        u.disk_mb,
        u.network_mbps,
        u.disk_io_kbps,
    ];
    let capacity = shared.capacity_amounts();
    let window = settings.reservation.as_millis() as u64;
    // Admission and the guest's record in one critical section: a
    // concurrent offer sees this guest's reservation.
    let mut admission = Admission::Admitted;
    shared.update_offload(|s| {
        let now = now_ms();
        // While it starts the guest is safe from the lease check; its lease
        // proper starts when we answer.
        let lease_until = now
            .saturating_add(lease_ms)
            .saturating_add(START_WAIT.as_millis() as u64);
        if let Some(g) = s.guests.get_mut(&spec.name).filter(|g| ours(g)) {
            g.lease_until_ms = g.lease_until_ms.max(lease_until);
            admission = Admission::Repeated;
            return;
        }
        // Another move of the same app (an older offer of this caller, or
        // the app's previous owner) is replaced: its reservation and its
        // measurement are this app's.
        let reservations = s.reservations(&shared.app_usage(), Some(&spec.name));
        let need = scheduler::add(
            shared.measured_need(),
            scheduler::reserved(&reservations, now, window),
        );
        if let Some(over) = scheduler::over_high(need, capacity, &policy.marks, usage) {
            admission = Admission::Refused(over);
            return;
        }
        shared.kick_leases();
        s.guests.insert(
            spec.name.clone(),
            Guest {
                name: spec.name.clone(),
                command: spec.command.clone(),
                env: env.clone(),
                from_node: from.clone(),
                from_slot: caller_slot,
                offer_id: offer_id.clone(),
                lease_until_ms: lease_until,
                usage,
                admitted_at_ms: now,
            },
        );
    });
    match admission {
        Admission::Refused(over) => {
            return Err(tonic::Status::resource_exhausted(format!(
                "would cross this node's high watermark for {}",
                over.name()
            )));
        }
        Admission::Repeated => {
            tracing::info!(app = %spec.name, %offer_id, "repeated offer: answering again");
        }
        Admission::Admitted => {
            tracing::info!(app = %spec.name, %offer_id, owner = %from, "admitted a guest");
        }
    }
    let drop_guest = || {
        shared.update_offload(|s| {
            if s.guests.get(&spec.name).is_some_and(&ours) {
                s.guests.remove(&spec.name);
            }
        })
    };
    if let Err(e) = shared.sync_apps().await {
        drop_guest();
        let _ = shared.sync_apps().await;
        return Err(tonic::Status::internal(format!(
            "could not start {}: {e}",
            spec.name
        )));
    }
    let deadline = tokio::time::Instant::now() + START_WAIT;
    let pid = loop {
        if let Some(pid) = running_pid(shared, &spec.name) {
            break pid;
        }
        if tokio::time::Instant::now() >= deadline {
            drop_guest();
            let _ = shared.sync_apps().await;
            return Err(tonic::Status::unavailable(format!(
                "{} did not start here",
                spec.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(hold) = settings.faults.hold_offer_answer {
        tracing::warn!(app = %spec.name, ?hold, "fault injected: holding the offer's answer");
        tokio::time::sleep(hold).await;
    }
    // The lease proper starts with the answer.
    shared.update_offload(|s| {
        if let Some(g) = s.guests.get_mut(&spec.name).filter(|g| ours(g)) {
            g.lease_until_ms = now_ms().saturating_add(lease_ms);
        }
    });
    shared.kick_leases();
    if settings.faults.drop_offer_answer {
        tracing::warn!(app = %spec.name, %offer_id, "fault injected: dropping the offer's answer");
        return Err(tonic::Status::unavailable(
            "fault injected: the offer's answer was lost",
        ));
    }
    Ok(pid)
}

/// The pid of `app` if it runs here.
fn running_pid(shared: &Shared, app: &str) -> Option<u32> {
    shared
        .runtime
        .status()
        .into_iter()
        .find(|s| s.name == app && s.state == crate::runtime::AppState::Running)
        .and_then(|s| s.pid)
}

/// Peer side of `Release`: stop a guest of the caller. Idempotent: nothing
/// to stop is a success.
pub async fn release(
    shared: &Shared,
    caller_slot: u32,
    app: &str,
    offer_id: &str,
) -> Result<(), tonic::Status> {
    if shared.offload_settings().faults.refuse_release() {
        tracing::warn!(%app, "fault injected: refusing a release");
        return Err(tonic::Status::unavailable(
            "fault injected: release refused",
        ));
    }
    let mut removed = false;
    shared.update_offload(|s| {
        if s.guests.get(app).is_some_and(|g| {
            g.from_slot == caller_slot && (offer_id.is_empty() || g.offer_id == offer_id)
        }) {
            s.guests.remove(app);
            removed = true;
        }
    });
    if !removed {
        return Ok(());
    }
    tracing::info!(%app, "released a guest");
    shared
        .sync_apps()
        .await
        .map_err(|e| tonic::Status::internal(e.to_string()))
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
    fn offer_ids_are_128_random_bits_in_hex() {
        let a = new_offer_id().unwrap();
        let b = new_offer_id().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(valid_offer_id(&a));
        assert!(!valid_offer_id(""));
        assert!(!valid_offer_id("ABC"));
        assert!(!valid_offer_id(&"a".repeat(65)));
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
