//! The host's side of offloading, behind PeerService (`crate::peer` answers
//! `Offer` and `Release` with [`admit`] and [`release`]): only the pool
//! catalog's app of the caller's slot, exactly as the catalog has it, and
//! never in place of a guest already here; admission of a guest within the
//! caller's per-member bounds and this node's high watermarks with the
//! reservations of guests not measured yet, starting it and answering once
//! it runs, lease renewals, releases, and the lease check that stops a
//! guest its owner no longer renews ([`lease_loop`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::proto as pb;
use tokio_util::sync::CancellationToken;

use super::admission::{admitted_amounts, larger, over_member_bound, vet};
use super::offer::valid_offer_id;
use crate::clock::now_ms;
use crate::node::Shared;
use crate::offload_state::{Guest, MAX_LEASE_MS};
use crate::scheduler::{self, Amounts, Resource};

/// How long a peer waits for an admitted guest to run before it gives up.
const START_WAIT: Duration = Duration::from_secs(4);
/// Longest sleep of the lease check (it also wakes when a lease runs out
/// and when a guest is admitted).
const LEASE_POLL: Duration = Duration::from_secs(1);

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
    /// The caller's offer with this id (and this spec) is already here.
    Repeated,
    Admitted,
    /// A guest of this name runs here under another offer: it is not
    /// replaced. The slot that offered it.
    Taken(u32),
    /// The caller's guests would cross a per-member bound (why).
    OverMember(String),
    Refused(Resource),
}

/// The offered app, if the request's own fields are well formed (before
/// anything is looked up or locked).
pub fn offer_fields(req: &pb::OfferRequest) -> Result<&pb::AppSpec, tonic::Status> {
    let spec = req
        .app
        .as_ref()
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
    Ok(spec)
}

/// Peer side of `Offer`: admission, start, wait until it runs; or, with
/// `renew`, a lease renewal. A refusal is logged with its reason.
pub async fn admit(
    shared: &Shared,
    caller_slot: u32,
    req: pb::OfferRequest,
) -> Result<u32, tonic::Status> {
    let app = req.app.as_ref().map(|a| a.name.clone()).unwrap_or_default();
    let offer_id = req.offer_id.clone();
    let renew = req.renew;
    let reason = crate::metrics::resource_label(&req.reason);
    let answer = offer(shared, caller_slot, req).await;
    if let Err(e) = &answer {
        // Not the pool's app as the catalog has it, or not from a member.
        if !renew && e.code() == tonic::Code::PermissionDenied {
            shared.metrics.admission(reason, "denied");
        }
        // The caller chose the name and the id: logged escaped.
        tracing::warn!(app = ?app, caller_slot, offer_id = ?offer_id, renew, code = ?e.code(), reason = e.message(), "offer refused");
    }
    answer
}

async fn offer(
    shared: &Shared,
    caller_slot: u32,
    req: pb::OfferRequest,
) -> Result<u32, tonic::Status> {
    let spec = offer_fields(&req)?.clone();
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
    // Only the pool's own apps, each from its own slot, exactly as the
    // manager defined them: a member cannot make this node run anything
    // else (another argv, another environment, another member's app).
    vet(shared.catalog_app(&spec.name).as_ref(), caller_slot, &spec)
        .map_err(tonic::Status::permission_denied)?;
    let settings = shared.offload_settings();
    let lease_ms = match u64::from(req.lease_ms) {
        0 => settings.lease_ms(),
        l => l,
    };
    let usage = admitted_amounts(&spec, req.usage);
    let offer_id = req.offer_id.clone();
    if req.renew {
        return renew(shared, caller_slot, &spec, &offer_id, lease_ms, usage).await;
    }
    if shared.own_apps().iter().any(|a| a.name == spec.name) {
        return Err(tonic::Status::already_exists(format!(
            "{} is one of this node's own apps",
            spec.name
        )));
    }
    let env: BTreeMap<String, String> = spec.env.clone().into_iter().collect();
    let limits = crate::node::app_limits(&spec);
    let ours = |g: &Guest| g.from_slot == caller_slot && g.offer_id == offer_id;
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
        if let Some(g) = s.guests.get_mut(&spec.name) {
            // The same offer again (a retry after a lost answer) is
            // answered again; anything else would replace a running guest.
            admission = if ours(g) && g.command == spec.command && g.env == env {
                g.lease_until_ms = g.lease_until_ms.max(lease_until);
                Admission::Repeated
            } else {
                Admission::Taken(g.from_slot)
            };
            return;
        }
        let measured = shared.app_usage();
        let held: Vec<Amounts> = s
            .guests
            .values()
            .filter(|g| g.from_slot == caller_slot)
            .map(|g| larger(g.usage, measured.get(&g.name).copied().unwrap_or_default()))
            .collect();
        if let Some(why) = over_member_bound(&held, usage, capacity, settings.guest_limits) {
            admission = Admission::OverMember(why);
            return;
        }
        let reservations = s.reservations(&measured, None);
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
                limits,
                from_node: from.clone(),
                from_slot: caller_slot,
                offer_id: offer_id.clone(),
                lease_until_ms: lease_until,
                usage,
                admitted_at_ms: now,
            },
        );
    });
    let reason = crate::metrics::resource_label(&req.reason);
    let metrics = &shared.metrics;
    match &admission {
        Admission::Refused(over) => {
            metrics.admission(crate::metrics::resource_label(over.name()), "refused")
        }
        Admission::OverMember(_) => metrics.admission("guest_bound", "refused"),
        Admission::Taken(_) => metrics.admission(reason, "taken"),
        Admission::Repeated => {}
        Admission::Admitted => metrics.admission(reason, "admitted"),
    }
    match admission {
        Admission::Refused(over) => {
            return Err(tonic::Status::resource_exhausted(format!(
                "would cross this node's high watermark for {}",
                over.name()
            )));
        }
        Admission::OverMember(why) => {
            return Err(tonic::Status::resource_exhausted(why));
        }
        Admission::Taken(slot) => {
            return Err(tonic::Status::already_exists(format!(
                "{} already runs here as a guest of slot {slot} under another offer; \
                 it is not replaced until it is released or its lease ends",
                spec.name
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

/// A lease renewal of the caller's guest under `offer_id`: extends its
/// lease and follows a changed spec (already checked against the catalog:
/// the pool's apps after an update).
async fn renew(
    shared: &Shared,
    caller_slot: u32,
    spec: &pb::AppSpec,
    offer_id: &str,
    lease_ms: u64,
    usage: Amounts,
) -> Result<u32, tonic::Status> {
    let env: BTreeMap<String, String> = spec.env.clone().into_iter().collect();
    let limits = crate::node::app_limits(spec);
    let mut found = false;
    let mut changed = false;
    shared.update_offload(|s| {
        if let Some(g) = s
            .guests
            .get_mut(&spec.name)
            .filter(|g| g.from_slot == caller_slot && g.offer_id == offer_id)
        {
            found = true;
            g.lease_until_ms = g.lease_until_ms.max(now_ms().saturating_add(lease_ms));
            // The owner's group may have changed the app: follow it.
            if g.command != spec.command || g.env != env || g.limits != limits {
                g.command = spec.command.clone();
                g.env = env.clone();
                g.limits = limits;
                g.usage = larger(g.usage, usage);
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
    Ok(running_pid(shared, &spec.name).unwrap_or(0))
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
