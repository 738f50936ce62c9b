//! Failure detection and failover: moving slot i (certificate identity and
//! app group) from a failed node to a spare.
//!
//! Two ways to notice a failure, both on the monotonic clock (a wall-clock
//! jump changes nothing):
//!
//! - **Peers** (fast, for silent failures: a frozen machine, a cut cable).
//!   Pool members probe each other every few hundred milliseconds and report
//!   on their streams (`PeerLiveness`) as soon as a member stops answering.
//!   The manager treats that as a suspicion: it pings the suspect over the
//!   suspect's own stream. A member that its peers have not reached for
//!   `failure_grace_ms` and that does not answer the ping (or has no stream)
//!   is failed over. Peers that cannot reach a member that still answers
//!   the manager (a broken peer link) change nothing.
//! - **The manager's own view** (for members whose stream drops or whose
//!   heartbeats are overdue by `heartbeat_timeout_ms`): once suspect for
//!   `failure_grace_ms`, the other members are asked (`PeerCheck`) whether
//!   they still reach it. Failover needs at least one member answering
//!   "unreachable" and none "reachable"; a check that times out or is not
//!   answered is *unknown*, never *down*. So a manager cut off from its
//!   agents (no answers at all) fails nobody over, and a member cut off from
//!   the cloud but reached by its peers is only reported (NODE_SUSPECT).
//!
//! After a manager restart, or when the detector finds it was not running
//! for a while (the process was stopped, the machine starved it), every
//! member gets the whole timeout and grace again from that moment: time the
//! detector did not observe is not evidence.
//!
//! Decisions run concurrently (one task per suspect member), so K failures
//! at once take about as long as one.
//!
//! Migration is one registry change (one store transaction): the slot's new
//! member certificate (for the spare's key, generation + 1), the new member,
//! the old node FAILED and out of the pool, the events, and an in-flight
//! record. Only after it is committed are assignments pushed (the spare
//! gets the group, every member the new membership, so peers refuse the old
//! certificate). A crash before the commit leaves nothing done and the
//! detector fails over again after the restart; a crash after it is
//! completed by the level-triggered assignments when agents reconnect.
//! FAILOVER_DONE is recorded when the spare reports the whole group running.
//!
//! Fencing: a FAILED node that comes back is FENCED and gets an empty
//! assignment (stop everything); once it reports no running app it is FREE
//! again and can serve as a spare.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::Duration as TimeDuration;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chain::issue_member;
use crate::control::{Control, ManagerError};
use crate::deadlines::Watchlist;
use crate::events::{EventKind, EventRecord};
use crate::live::Command;
use crate::liveness::LivenessBook;
pub use crate::liveness::{CheckAnswer, Confirmation, PeerAlive, PeerView, confirmation};
use crate::model::{NodeState, Resources, now_ms};
use crate::node_key::NodeKey;
use crate::node_state::NodeEvent;
use crate::pool::{InFlight, MemberRecord, PoolRecord};
use crate::pools::Pools;
use crate::registry::Registry;

pub use crate::liveness::Health;

/// Since when the node has been suspect, or `None` if it is healthy.
/// `observed_from` is when the detector started observing (its start, or
/// the end of a stall): nothing before it counts.
pub fn suspect_since(
    h: Health,
    observed_from: Instant,
    heartbeat_timeout: Duration,
    now: Instant,
) -> Option<Instant> {
    let last_seen = h.last_seen.unwrap_or(observed_from).max(observed_from);
    if h.connected {
        let overdue = last_seen + heartbeat_timeout;
        return (now > overdue).then_some(overdue);
    }
    let dropped = h.disconnected_at.unwrap_or(observed_from);
    Some(dropped.max(last_seen))
}

/// Whether a node suspect since `since` has failed by `now`.
pub fn has_failed(since: Instant, grace: Duration, now: Instant) -> bool {
    now.saturating_duration_since(since) >= grace
}

/// A node that could take over a slot, as the registry has it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub node_id: &'a str,
    pub free: bool,
    pub capacity: Resources,
    pub labels: &'a BTreeMap<String, String>,
}

fn fits(need: Resources, cap: Resources) -> bool {
    need.cpu_millis <= cap.cpu_millis
        && need.memory_mb <= cap.memory_mb
        && need.disk_mb <= cap.disk_mb
        && need.network_mbps <= cap.network_mbps
}

/// The spare for a group needing `need`: a FREE node carrying every label
/// in `selector`, with room for the whole group, that is `connected`.
/// `candidates` come in node id order (the registry's), so the first fit
/// is the lowest id and the choice is deterministic; the walk stops there,
/// so it costs the nodes before the spare, not the fleet (and `connected`
/// is asked only of nodes that fit).
pub fn select_spare<'a>(
    candidates: impl IntoIterator<Item = Candidate<'a>>,
    need: Resources,
    selector: &BTreeMap<String, String>,
    connected: impl Fn(&str) -> bool,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .filter(|c| c.free && fits(need, c.capacity))
        .filter(|c| selector.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
        .find(|c| connected(c.node_id))
        .map(|c| c.node_id)
}

/// What `fail_over` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The slot moved to `to`; these nodes need their new assignment.
    Moved { to: NodeKey, push: Vec<NodeKey> },
    /// No suitable spare: the pool is degraded (event recorded once).
    Degraded,
    /// The slot is no longer held by that node (already handled).
    Stale,
}

/// Set `EDGEPOOL_FAULT=abort-after-failover-commit` to make the manager
/// abort right after a failover is committed and before anything is pushed
/// (used by the crash-safety test).
const FAULT_ENV: &str = "EDGEPOOL_FAULT";

/// The failover component: what members say of each other, the open peer
/// checks, the detector's watchlist, and the detector worker (`start`),
/// whose per-member episodes live on its own task. Moves slots through
/// `Pools` (which pushes the new assignments) and changes nodes through
/// `Control`.
pub struct Failover {
    control: Arc<Control>,
    pools: Arc<Pools>,
    /// Open peer checks: random id -> (the node asked, where its answer goes).
    checks: Mutex<HashMap<u64, (NodeKey, oneshot::Sender<CheckAnswer>)>>,
    /// What members say of each other's liveness.
    liveness: LivenessBook,
    /// Members the detector must look at, and when (see `deadlines`):
    /// armed when a stream closes, a peer reports a member unreachable, or
    /// a node's assignment is pushed (`Pools` holds the same watchlist).
    watchlist: Arc<Watchlist>,
    /// When this manager started (`startup_grace_ms` counts from here).
    started: Instant,
    /// The latest count of pool members not heard from: when, how many,
    /// of how many (see `paused`).
    unheard: Mutex<Option<(Instant, usize, usize)>>,
}

/// How long a count of unheard members is reused.
const UNHEARD_RECOUNT: Duration = Duration::from_millis(200);

impl Failover {
    pub fn new(control: Arc<Control>, pools: Arc<Pools>, watchlist: Arc<Watchlist>) -> Self {
        Failover {
            control,
            pools,
            checks: Mutex::new(HashMap::new()),
            liveness: LivenessBook::default(),
            watchlist,
            started: Instant::now(),
            unheard: Mutex::new(None),
        }
    }

    /// Why no member may be failed over now, if so: so many of them are
    /// not heard from at once (`failover_pause_percent`,
    /// `failover_pause_min_members`) that the manager's own network or
    /// load is the likelier cause than that many failures.
    fn paused(&self) -> Option<String> {
        let cfg = self.control.config();
        let (unheard, members) = self.unheard_members();
        let (percent, min) = (
            cfg.failover_pause_percent as usize,
            cfg.failover_pause_min_members as usize,
        );
        (unheard >= min && unheard * 100 >= members * percent).then(|| {
            format!(
                "{unheard} of {members} pool members are not heard from at once (failover_pause_percent {percent}, failover_pause_min_members {min}): taken for a problem on the manager's side, failovers paused"
            )
        })
    }

    /// How many pool members have no stream or overdue heartbeats, of how
    /// many members; counted at most every `UNHEARD_RECOUNT` (only when a
    /// failover is about to be decided, never per detector round).
    fn unheard_members(&self) -> (usize, usize) {
        let now = Instant::now();
        let mut cache = self.unheard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, unheard, members)) = *cache
            && now.saturating_duration_since(at) < UNHEARD_RECOUNT
        {
            return (unheard, members);
        }
        let timeout = Duration::from_millis(u64::from(self.control.config().heartbeat_timeout_ms));
        let Ok(r) = self.control.registry() else {
            return (0, 0);
        };
        let (mut unheard, mut members) = (0, 0);
        for (p, m) in r
            .pools
            .values()
            .flat_map(|p| p.members.iter().map(move |m| (p, m)))
        {
            members += 1;
            let heard = self
                .control
                .health(&NodeKey::new(&p.tenant, &m.node_id))
                .is_ok_and(|h| {
                    h.connected
                        && h.last_seen
                            .is_some_and(|t| now.saturating_duration_since(t) < timeout)
                });
            if !heard {
                unheard += 1;
            }
        }
        *cache = Some((now, unheard, members));
        (unheard, members)
    }

    /// Starts the failure detector on `tracker`, until `shutdown` fires.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        tracker.spawn(detector_worker(self.clone(), shutdown));
    }

    /// `node_id`'s stream closed: what it said of its peers is no longer
    /// current, and a member without its stream is suspect at once.
    pub(crate) fn stream_closed(&self, node: &NodeKey) {
        self.liveness.forget_reporter(node);
        self.watchlist.watch(node, Instant::now());
    }

    /// Registers a peer check sent to `asker`, under an unguessable id.
    fn register_check(&self, asker: &NodeKey, tx: oneshot::Sender<CheckAnswer>) -> u64 {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let mut id = crate::random::u64();
        while id == 0 || checks.contains_key(&id) {
            id = crate::random::u64();
        }
        checks.insert(id, (asker.clone(), tx));
        id
    }

    fn forget_check(&self, id: u64) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// An agent's answer to a peer check. Only the node that was asked can
    /// answer it; an answer from any other node is dropped (and logged).
    pub fn answer_check(&self, from: &NodeKey, id: u64, answer: CheckAnswer) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        match checks.get(&id) {
            Some((asker, _)) if asker == from => {
                if let Some((_, tx)) = checks.remove(&id) {
                    let _ = tx.send(answer);
                }
            }
            Some(_) => {
                tracing::warn!(node = %from, "dropped an answer to a peer check sent to another node")
            }
            None => tracing::debug!(node = %from, "answer to an unknown or expired peer check"),
        }
    }

    /// What `reporter` says of the other members of its pool. Entries about
    /// anything but a current member of the reporter's own pool (another
    /// pool, another tenant, a stale slot) are dropped: a node can only
    /// speak about its own pool.
    pub fn record_liveness(&self, reporter: &NodeKey, peers: Vec<PeerAlive>) {
        let accepted: Vec<PeerAlive> = {
            let Ok(r) = self.control.registry() else {
                return;
            };
            let Some(pool) = r
                .node(reporter)
                .filter(|n| !n.pool.is_empty())
                .and_then(|n| r.pools.get(&PoolRecord::key(&n.tenant, &n.pool)))
            else {
                return;
            };
            if pool.member_of(reporter.node_id()).is_none() {
                return;
            }
            peers
                .into_iter()
                .filter(|p| {
                    p.node_id != reporter.node_id()
                        && pool
                            .members
                            .get((p.slot as usize).wrapping_sub(1))
                            .is_some_and(|m| m.node_id == p.node_id)
                })
                .collect()
        };
        let now = Instant::now();
        for p in &accepted {
            self.liveness.record(reporter, p, now);
            if !p.reachable {
                self.watchlist
                    .watch(&NodeKey::new(reporter.tenant(), &p.node_id), now);
            }
        }
    }

    /// Asks member `asker` whether it reaches `target` (slot, node id in
    /// the asker's tenant, peer address). `None` if the asker is not
    /// connected or does not answer.
    pub async fn check_peer(
        &self,
        asker: &NodeKey,
        slot: u32,
        target: &str,
        address: &str,
        timeout: Duration,
    ) -> Option<CheckAnswer> {
        let live = self.control.live_node(asker).ok()?;
        let (tx, rx) = oneshot::channel();
        let id = self.register_check(asker, tx);
        let command = Command::PeerCheck {
            request_id: id,
            slot,
            node_id: target.to_string(),
            peer_address: address.to_string(),
        };
        if !live.send_command(command) {
            self.forget_check(id);
            return None;
        }
        let answer = tokio::time::timeout(timeout, rx).await.ok()?.ok();
        self.forget_check(id);
        answer
    }

    /// Moves `slot` of the pool from `node_id` (lost at `lost_at_ms`) to a
    /// spare, in one registry change.
    pub fn fail_over(
        &self,
        tenant: &str,
        pool: &str,
        slot: u32,
        node_id: &str,
        lost_at_ms: u64,
    ) -> Result<Outcome, ManagerError> {
        let validity =
            TimeDuration::seconds(i64::from(self.control.config.member_cert_validity_seconds));
        let outcome = self.control.mutate(|r| {
            let key = PoolRecord::key(tenant, pool);
            let Some(p) = r.pools.get(&key) else {
                return Ok(Outcome::Stale);
            };
            if p.members.get(slot as usize - 1).map(|m| m.node_id.as_str()) != Some(node_id) {
                return Ok(Outcome::Stale);
            }
            let need = p.group(slot).iter().fold(Resources::default(), |acc, a| Resources {
                cpu_millis: acc.cpu_millis + a.resources.cpu_millis,
                memory_mb: acc.memory_mb + a.resources.memory_mb,
                disk_mb: acc.disk_mb + a.resources.disk_mb,
                network_mbps: acc.network_mbps + a.resources.network_mbps,
                disk_io_kbps: acc.disk_io_kbps + a.resources.disk_io_kbps,
            });
            // The tenant's nodes in id order; only free ones can be spares.
            let candidates = r
                .nodes_of_tenant(tenant, None)
                .map(|n| Candidate {
                    node_id: &n.node_id,
                    free: n.state == NodeState::Free,
                    capacity: n.capacity,
                    labels: &n.labels,
                });
            let connected =
                |id: &str| self.control.health(&NodeKey::new(tenant, id)).is_ok_and(|h| h.connected);
            let now = now_ms();
            let Some(target) = select_spare(candidates, need, &p.spare_labels, connected).map(str::to_string) else {
                let p = r.pools.get_mut(&key).ok_or(ManagerError::Poisoned)?;
                if !p.degraded.insert(slot) {
                    return Ok(Outcome::Degraded);
                }
                let e = EventRecord::new(tenant, pool, EventKind::PoolDegraded)
                    .node(node_id, slot)
                    .message(format!("node {node_id} failed and no free node with room for group {slot} (needs {need:?}) is connected; waiting for one"));
                r.events.push(e, now);
                return Ok(Outcome::Degraded);
            };
            let (lost, target_key) = (NodeKey::new(tenant, node_id), NodeKey::new(tenant, &target));
            let target_cert = r.node(&target_key).map(|n| n.cert_pem.clone()).unwrap_or_default();
            let p = r.pools.get_mut(&key).ok_or(ManagerError::Poisoned)?;
            let old = p.members[slot as usize - 1].clone();
            let identity = edgepool_common::identity::Identity::Member {
                domain: self.control.config.trust_domain.clone(),
                tenant: tenant.to_string(),
                pool: pool.to_string(),
                slot,
            };
            let cert = issue_member(&self.control.ca, &p.ca, &identity, &target_cert, validity)?;
            p.members[slot as usize - 1] = MemberRecord {
                slot,
                node_id: target.clone(),
                cert_pem: cert.cert_pem,
                cert_serial: cert.serial_hex,
                cert_not_after_ms: cert.not_after_ms,
                generation: old.generation + 1,
            };
            p.generation += 1;
            p.degraded.remove(&slot);
            p.inflight.retain(|f| f.slot != slot);
            p.inflight.push(InFlight {
                slot,
                node_id: target.clone(),
                from_node: node_id.to_string(),
                lost_at_ms,
            });
            let group: Vec<String> = p.group(slot).iter().map(|a| a.name.clone()).collect();
            p.running.retain(|app, _| !group.contains(app));
            let push: Vec<NodeKey> = p.members.iter().map(|m| NodeKey::new(tenant, &m.node_id)).chain([lost.clone()]).collect();
            if let Some(n) = r.node_mut(&lost) {
                n.change(NodeEvent::Fail, "", 0)?;
            }
            if let Some(n) = r.node_mut(&target_key) {
                n.change(NodeEvent::Join, pool, slot)?;
            }
            let started = EventRecord::new(tenant, pool, EventKind::FailoverStarted)
                .node(&target, slot)
                .message(format!("slot {slot}: {node_id} failed, moving its identity and {} apps to {target}", group.len()));
            r.events.push(started, now);
            let revoked = EventRecord::new(tenant, pool, EventKind::CertRevoked)
                .node(node_id, slot)
                .message(format!("member certificate {} of {node_id} revoked (generation {})", old.cert_serial, old.generation));
            r.events.push(revoked, now);
            Ok(Outcome::Moved { to: target_key, push })
        })?;
        if let Outcome::Moved { to, push } = &outcome {
            tracing::warn!(%tenant, %pool, slot, from = %node_id, %to, "failover committed");
            self.liveness.forget_target(to);
            if std::env::var(FAULT_ENV).as_deref() == Ok("abort-after-failover-commit") {
                eprintln!("fault injection: aborting after the failover commit");
                std::process::abort();
            }
            self.pools.push_assignments(push.iter().cloned())?;
        }
        Ok(outcome)
    }

    /// A node in FAILED state connected again: fence it (its assignment is
    /// empty, so it stops its old group).
    pub(crate) async fn fence_if_failed(&self, node: &NodeKey) -> Result<(), ManagerError> {
        let failed = self
            .control
            .registry()?
            .node(node)
            .is_some_and(|n| n.state == NodeState::Failed);
        if !failed {
            return Ok(());
        }
        self.control.mutate_async(|r| {
            if let Some(n) = r.node_mut(node).filter(|n| n.state == NodeState::Failed) {
                n.change(NodeEvent::Return, "", 0)?;
                let e = EventRecord::new(&n.tenant, "", EventKind::NodeFenced)
                    .node(&n.node_id, 0)
                    .message("failed node is back: told to stop its old group; FREE again once it runs nothing");
                r.events.push(e, now_ms());
            }
            Ok(())
        })
        .await
    }

    /// An app report from `node_id`, which runs `running_apps` apps.
    pub(crate) async fn on_report(&self, node_id: &NodeKey, running_apps: usize) {
        // A failed-over node heard from again on a stream that never
        // dropped (it was frozen, or cut and healed quickly) is fenced just
        // as if it had reconnected.
        if let Err(e) = self.fence_if_failed(node_id).await {
            tracing::warn!(node = %node_id, error = %e, "could not fence a failed node");
        }
        if let Err(e) = self.release_fenced(node_id, running_apps).await {
            tracing::warn!(node = %node_id, error = %e, "could not release a fenced node");
        }
    }

    /// A fenced node reported that it runs nothing: it is FREE again.
    pub(crate) async fn release_fenced(
        &self,
        node: &NodeKey,
        running_apps: usize,
    ) -> Result<(), ManagerError> {
        let fenced = self
            .control
            .registry()?
            .node(node)
            .is_some_and(|n| n.state == NodeState::Fenced);
        if !fenced || running_apps > 0 {
            return Ok(());
        }
        self.control
            .mutate_async(|r| {
                if let Some(n) = r.node_mut(node).filter(|n| n.state == NodeState::Fenced) {
                    n.change(NodeEvent::Drained, "", 0)?;
                    let e = EventRecord::new(&n.tenant, "", EventKind::NodeFreed)
                        .node(&n.node_id, 0)
                        .message("fenced node stopped its old group and is FREE again");
                    r.events.push(e, now_ms());
                }
                Ok(())
            })
            .await
    }
}

/// Per-member state of the detector between rounds.
#[derive(Default)]
struct Episode {
    /// NODE_SUSPECT recorded for this episode.
    announced: bool,
    /// Do not look at it again before this.
    next_check: Option<Instant>,
}

/// What one decision task found.
#[derive(Debug)]
enum Verdict {
    /// It answered the manager's ping: running, whatever its peers say.
    Answered,
    /// Members still reach it: cut off from the cloud, not failed.
    ReachedBy,
    /// Nobody could tell (no member answered in time): not failed over.
    Unknown,
    /// Failed over (or found already handled, or the pool degraded).
    Handled,
}

/// How much later than planned a detector round may start before the
/// detector counts the gap as time it did not observe.
const STALL_SLACK: Duration = Duration::from_millis(1000);

/// The pool of `node` (tenant, name, members) if it is a current member.
fn membership<'r>(
    r: &'r Registry,
    node: &NodeKey,
) -> Option<(&'r str, &'r str, &'r [MemberRecord])> {
    let n = r.node(node).filter(|n| !n.pool.is_empty())?;
    let p = r.pools.get(&PoolRecord::key(&n.tenant, &n.pool))?;
    p.member_of(node.node_id())?;
    Some((&p.tenant, &p.name, &p.members))
}

/// The detector: watches pool members and fails over dead ones. Each
/// round looks only at the members whose deadline passed (`watchlist`)
/// and at the current suspects.
async fn detector_worker(failover: Arc<Failover>, shutdown: CancellationToken) {
    let cfg = failover.control.config().clone();
    let every = Duration::from_millis(u64::from(cfg.failure_check_ms));
    let heartbeat_timeout = Duration::from_millis(u64::from(cfg.heartbeat_timeout_ms));
    let grace = Duration::from_millis(u64::from(cfg.failure_grace_ms));
    let recheck = Duration::from_millis(u64::from(cfg.peer_recheck_ms));
    let mut observed_from = Instant::now();
    let mut last_round = Instant::now();
    let startup_grace = Duration::from_millis(u64::from(cfg.startup_grace_ms));
    let startup_until = failover.started + startup_grace;
    // Keyed by node key: the members under suspicion, what was decided
    // about them, and those being decided.
    let mut suspects: HashSet<NodeKey> = HashSet::new();
    let mut episodes: HashMap<NodeKey, Episode> = HashMap::new();
    let mut deciding: HashSet<NodeKey> = HashSet::new();
    let mut tasks: JoinSet<(NodeKey, Verdict)> = JoinSet::new();
    // Every member once at the start; from then on only what is armed.
    if let Ok(r) = failover.control.registry() {
        let mut w = failover.watchlist.queue();
        for p in r.pools.values() {
            for m in &p.members {
                w.arm(&NodeKey::new(&p.tenant, &m.node_id), observed_from);
            }
        }
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
            _ = failover.watchlist.woken() => {}
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Ok((key, verdict)) = done {
                    deciding.remove(&key);
                    let ep = episodes.entry(key).or_default();
                    if !matches!(verdict, Verdict::Handled) {
                        ep.next_check = Some(Instant::now() + recheck);
                    }
                }
                continue;
            }
        }
        let now = Instant::now();
        // Rounds are `every` apart: a much longer gap means this process
        // was not running (stopped, starved). What happened meanwhile was
        // not observed, so every member's clock starts again now.
        if now.saturating_duration_since(last_round) > every + STALL_SLACK {
            tracing::warn!(
                gap_ms = now.saturating_duration_since(last_round).as_millis() as u64,
                "failure detector was not running; restarting every member's timeout and grace"
            );
            observed_from = now;
            episodes.clear();
        }
        last_round = now;
        // Only the members whose deadline passed and the suspects: a
        // round costs what is due, not the fleet.
        let due = failover.watchlist.queue().pop_due(now);
        let Ok(r) = failover.control.registry() else {
            continue;
        };
        let look: BTreeSet<NodeKey> = due.into_iter().chain(suspects.iter().cloned()).collect();
        for node in look {
            let Some((tenant, pool, members)) = membership(&r, &node) else {
                // No member (any more): nothing to watch until it is one
                // again (`Pools::push_assignments` arms it then).
                suspects.remove(&node);
                continue;
            };
            let Some(m) = members.iter().find(|m| m.node_id == node.node_id()) else {
                continue;
            };
            let key = node.clone();
            let Ok(h) = failover.control.health(&node) else {
                continue;
            };
            let keys: Vec<NodeKey> = members
                .iter()
                .map(|m| NodeKey::new(tenant, &m.node_id))
                .collect();
            let peers = failover.liveness.view(&node, &keys, now);
            let own = suspect_since(h, observed_from, heartbeat_timeout, now);
            if own.is_none() && peers == PeerView::Fine {
                suspects.remove(&node);
                // Look again when its heartbeats could first be overdue.
                let seen = h.last_seen.unwrap_or(observed_from).max(observed_from);
                failover
                    .watchlist
                    .queue()
                    .arm(&node, seen + heartbeat_timeout + Duration::from_millis(1));
                continue;
            }
            suspects.insert(node.clone());
            if deciding.contains(&key) {
                continue;
            }
            // Not heard from since this manager started: still within the
            // time the fleet gets to come back (`startup_grace_ms`), unless
            // its peers (back on this manager) reached it lately and lost
            // it: a manager's start explains a missing stream, not a node
            // its peers lost. A peer link broken for longer (peers that
            // never reach it) is no news and waits like the rest.
            let lost_lately = match &peers {
                PeerView::Unreachable { last_alive, .. } => {
                    *last_alive + startup_grace >= failover.started
                }
                PeerView::Fine => false,
            };
            if h.last_seen.is_none() && now < startup_until && !lost_lately {
                continue;
            }
            let ep = episodes.entry(key.clone()).or_default();
            if ep.next_check.is_some_and(|t| now < t) {
                continue;
            }
            // Peers' path: decided at once (the ping runs while the
            // grace passes, counted from their last success and never
            // from before we were observing). Manager's path: after
            // the grace.
            let peers_deadline = match &peers {
                PeerView::Unreachable { last_alive, .. } => {
                    Some((*last_alive).max(observed_from) + grace)
                }
                PeerView::Fine => None,
            };
            let by_manager = own.is_some_and(|since| has_failed(since, grace, now));
            if peers_deadline.is_none() && !by_manager {
                continue;
            }
            let lost_at = match (&peers, own) {
                (PeerView::Unreachable { last_alive, .. }, _) => *last_alive,
                (PeerView::Fine, Some(since)) => since,
                (PeerView::Fine, None) => now,
            };
            let lost_at_ms =
                now_ms().saturating_sub(now.saturating_duration_since(lost_at).as_millis() as u64);
            let announce = !ep.announced;
            ep.announced = true;
            deciding.insert(key.clone());
            let job = Decision {
                failover: failover.clone(),
                tenant: tenant.to_string(),
                pool: pool.to_string(),
                member: m.clone(),
                members: members.to_vec(),
                peers_deadline,
                lost_at_ms,
                announce,
            };
            tasks.spawn(async move { (key, job.run().await) });
        }
        episodes.retain(|k, _| suspects.contains(k) || deciding.contains(k));
    }
}

/// One suspect member, decided on its own task.
struct Decision {
    failover: Arc<Failover>,
    tenant: String,
    pool: String,
    member: MemberRecord,
    members: Vec<MemberRecord>,
    /// Its peers cannot reach it: fail it over at this moment unless it
    /// answers the ping or a peer reaches it again first. `None`: only the
    /// manager lost it.
    peers_deadline: Option<Instant>,
    lost_at_ms: u64,
    /// First decision of this episode: record NODE_SUSPECT if it stays.
    announce: bool,
}

impl Decision {
    async fn run(self) -> Verdict {
        let cfg = self.failover.control.config().clone();
        let node = self.member.node_id.clone();
        let key = NodeKey::new(&self.tenant, &node);
        // An operator revoked its node certificate: it is out, whatever
        // its peers say (they may well still reach it).
        let revoked = self.failover.control.node_revoked(&key);
        if revoked {
            if self.announce {
                self.record_suspect(format!(
                    "{node}'s node certificate has been revoked: failing it over without asking its peers"
                ))
                .await;
            }
        } else if let Some(deadline) = self.peers_deadline {
            // Its peers cannot reach it. If it still answers the manager,
            // it runs: a broken peer link is not a failure. The answer
            // counts until the grace ends (a busy node answers late; a
            // frozen or cut one not at all).
            let asked = Instant::now();
            if let Ok(live) = self.failover.control.live_node(&key) {
                let timeout = Duration::from_millis(u64::from(cfg.ping_timeout_ms))
                    .max(deadline.saturating_duration_since(asked));
                if live.ping(timeout).await {
                    if self.announce {
                        self.record_suspect(format!(
                            "{node}'s peers cannot reach it, but it answers the manager: its peer links are broken; no failover"
                        )).await;
                    }
                    return Verdict::Answered;
                }
            }
            tokio::time::sleep_until(deadline.into()).await;
            // Still silent to its peers at the end of the grace, and to the
            // manager too (any message on its stream is a sign of life: a
            // slow machine answers late, it does not stop talking)?
            let now = Instant::now();
            let keys: Vec<NodeKey> = self
                .members
                .iter()
                .map(|m| NodeKey::new(&self.tenant, &m.node_id))
                .collect();
            if self.failover.liveness.view(&key, &keys, now) == PeerView::Fine {
                return Verdict::Answered;
            }
            let recent = Duration::from_millis(u64::from(cfg.ping_timeout_ms));
            if self.failover.control.health(&key).is_ok_and(|h| {
                h.connected
                    && h.last_seen
                        .is_some_and(|t| t >= asked || now.saturating_duration_since(t) < recent)
            }) {
                return Verdict::Answered;
            }
        } else if cfg.peer_confirmation {
            match confirm(
                &self.failover,
                &self.tenant,
                &self.members,
                &self.member,
                &cfg,
            )
            .await
            {
                Confirmation::Unreachable => {}
                Confirmation::ReachedBy(by) => {
                    if self.announce {
                        self.record_suspect(format!(
                            "{node} lost its link to the manager but is reached by {}: cut off from the cloud, not failed; no failover",
                            by.join(", ")
                        )).await;
                    }
                    return Verdict::ReachedBy;
                }
                Confirmation::Unknown => {
                    if self.announce {
                        self.record_suspect(format!(
                            "{node} lost its link to the manager and no other member could say whether it runs (no answer in time): not failing over without evidence"
                        )).await;
                    }
                    return Verdict::Unknown;
                }
            }
        }
        // Last look before acting: so many members silent at once is the
        // manager's own problem, not theirs.
        if let Some(why) = self.failover.paused() {
            if self.announce {
                self.record_suspect(format!("{node} looks failed, but {why}"))
                    .await;
            }
            return Verdict::Unknown;
        }
        let (failover, t, p, slot, since) = (
            self.failover.clone(),
            self.tenant.clone(),
            self.pool.clone(),
            self.member.slot,
            self.lost_at_ms,
        );
        match tokio::task::spawn_blocking(move || failover.fail_over(&t, &p, slot, &node, since))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "failover failed"),
            Err(e) => tracing::error!(error = %e, "failover task failed"),
        }
        Verdict::Handled
    }

    async fn record_suspect(&self, message: String) {
        tracing::warn!(node = %self.member.node_id, pool = %self.pool, "{message}");
        let result = self
            .failover
            .control
            .mutate_async(|r| {
                let e = EventRecord::new(&self.tenant, &self.pool, EventKind::NodeSuspect)
                    .node(&self.member.node_id, self.member.slot)
                    .message(message.clone());
                r.events.push(e, now_ms());
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not record NODE_SUSPECT");
        }
    }
}

/// Asks the other connected members whether they reach `m`.
async fn confirm(
    failover: &Arc<Failover>,
    tenant: &str,
    members: &[MemberRecord],
    m: &MemberRecord,
    cfg: &crate::config::ManagerConfig,
) -> Confirmation {
    let Some(address) = failover.control.registry().ok().and_then(|r| {
        r.node_of_tenant(tenant, &m.node_id)
            .map(|n| n.peer_address.clone())
    }) else {
        return Confirmation::Unknown;
    };
    let timeout = Duration::from_millis(u64::from(cfg.peer_check_timeout_ms));
    let asks = members.iter().filter(|o| o.node_id != m.node_id).map(|o| {
        let failover = failover.clone();
        let asker = NodeKey::new(tenant, &o.node_id);
        let (target, address) = (m.node_id.clone(), address.clone());
        let slot = m.slot;
        async move {
            let answer = failover
                .check_peer(&asker, slot, &target, &address, timeout)
                .await;
            (asker.node_id().to_string(), answer)
        }
    });
    let answers = futures::future::join_all(asks).await;
    confirmation(&answers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(3000);
    const GRACE: Duration = Duration::from_millis(1000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn h(t0: Instant, connected: bool, last_seen: u64, disc: Option<u64>) -> Health {
        Health {
            connected,
            last_seen: Some(t0 + ms(last_seen)),
            disconnected_at: disc.map(|d| t0 + ms(d)),
        }
    }

    #[test]
    fn connected_and_fresh_is_healthy() {
        let t0 = Instant::now();
        assert_eq!(
            suspect_since(h(t0, true, 10_000, None), t0, HB, t0 + ms(12_000)),
            None
        );
        assert_eq!(
            suspect_since(h(t0, true, 10_000, None), t0, HB, t0 + ms(13_000)),
            None
        );
    }

    #[test]
    fn overdue_heartbeats_make_a_connected_node_suspect() {
        let t0 = Instant::now();
        assert_eq!(
            suspect_since(h(t0, true, 10_000, None), t0, HB, t0 + ms(13_001)),
            Some(t0 + ms(13_000))
        );
    }

    #[test]
    fn a_dropped_stream_is_suspect_at_once_and_failed_after_the_grace() {
        let t0 = Instant::now();
        let since =
            suspect_since(h(t0, false, 10_000, Some(10_200)), t0, HB, t0 + ms(10_300)).unwrap();
        assert_eq!(since, t0 + ms(10_200));
        assert!(!has_failed(since, GRACE, t0 + ms(11_199)));
        assert!(has_failed(since, GRACE, t0 + ms(11_200)));
    }

    #[test]
    fn time_not_observed_is_not_evidence() {
        // After a restart at 50 s, or a stall that ended then, a node last
        // seen long before gets the whole timeout and grace from 50 s on.
        let t0 = Instant::now();
        let observed = t0 + ms(50_000);
        let stale = h(t0, true, 1_000, None);
        assert_eq!(suspect_since(stale, observed, HB, t0 + ms(52_000)), None);
        let since = suspect_since(stale, observed, HB, t0 + ms(53_500)).unwrap();
        assert_eq!(since, t0 + ms(53_000));
        let never = Health::default();
        let since = suspect_since(never, observed, HB, t0 + ms(50_500)).unwrap();
        assert_eq!(since, observed);
        assert!(!has_failed(since, GRACE, t0 + ms(50_900)));
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn cand<'a>(
        id: &'a str,
        free: bool,
        cpu: u64,
        labels: &'a BTreeMap<String, String>,
    ) -> Candidate<'a> {
        Candidate {
            node_id: id,
            free,
            capacity: Resources {
                cpu_millis: cpu,
                memory_mb: 1000,
                disk_mb: 1000,
                network_mbps: 100,
                disk_io_kbps: 0,
            },
            labels,
        }
    }

    #[test]
    fn spare_selection_is_free_connected_big_enough_labelled_and_deterministic() {
        let need = Resources {
            cpu_millis: 500,
            ..Resources::default()
        };
        let (a, b) = (labels(&[("zone", "a")]), labels(&[("zone", "b")]));
        // In node id order, as the registry walks them.
        let c = [
            cand("n1", false, 2000, &a),
            cand("n2", true, 2000, &a),
            cand("n3", true, 100, &a),
            cand("n4", true, 2000, &b),
            cand("n5", true, 2000, &a),
            cand("n6", true, 2000, &b),
        ];
        let connected = |id: &str| id != "n2";
        let none = BTreeMap::new();
        assert_eq!(select_spare(c, need, &none, connected), Some("n4"));
        assert_eq!(select_spare(c, need, &a, connected), Some("n5"));
        assert!(select_spare(c, need, &labels(&[("zone", "c")]), connected).is_none());
        // The walk stops at the spare: nodes after it are never looked at.
        let asked = std::cell::RefCell::new(Vec::new());
        let spy = |id: &str| {
            asked.borrow_mut().push(id.to_string());
            id != "n2"
        };
        assert_eq!(select_spare(c, need, &none, spy), Some("n4"));
        assert_eq!(*asked.borrow(), ["n2", "n4"]);
    }
}
