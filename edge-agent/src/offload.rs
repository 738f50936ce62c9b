//! Threshold scheduling on the node: measure the group's need, evaluate the
//! pool's policy on every sample, and move apps to peers (offload) on the
//! node's own decision, peer to peer, with or without the manager.
//!
//! State (`crate::offload_state`, held by `node::Shared` and persisted in
//! `offload.json` so a restart keeps it):
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
//! succeeds. The peer server (`crate::peer`) answers `Offer` and `Release`
//! with [`admit`] and [`release`]; this module dials peers through
//! `crate::peer_client` and never imports the server.
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
use std::time::Duration;

use edgepool_common::proto as pb;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::config::NetworkAccounting;
use crate::node::Shared;
use crate::offload_state::{Guest, MAX_LEASE_MS, MovedOut, PendingRelease, Record};
use crate::peer_client::peer_client;
use crate::scheduler::{self, Amounts, AppLoad, Evaluator, PeerLoad, Resource};

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
            let disk_mb = shared
                .runtime
                .app_dirs(&s.name)
                .iter()
                .map(|d| dir_bytes(d))
                .sum::<u64>()
                / (1024 * 1024);
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
    // The last pass measured no app.
    let mut no_apps = false;
    loop {
        // A node in no pool that runs nothing has nothing to measure or
        // move: it waits to be a member (apps still stopping after it left
        // a pool are measured until they are gone).
        if no_apps && shared.membership().is_none() && !shared.until_member(&shutdown).await {
            return;
        }
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
        no_apps = usage.is_empty();
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
    let mut client = peer_client(shared, m, slot, &peer.peer_address)
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
        // Only a member has guests and moved-out apps to reconcile.
        if !shared.until_member(&shutdown).await {
            return;
        }
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
            Some(peer) => match peer_client(shared, m, peer.slot, &peer.peer_address) {
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
            },
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
}
