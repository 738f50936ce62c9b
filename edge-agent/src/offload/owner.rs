//! The owner's side of the leases: every third of the lease (or when
//! kicked) renew every moved-out app at its host, take back what the host no
//! longer runs or what could not be renewed for a whole lease, release what
//! the group no longer lists, and retry pending releases until the host
//! confirms.

use std::sync::Arc;
use std::time::Duration;

use edgepool_common::proto as pb;
use tokio_util::sync::CancellationToken;

use super::offer::{Offer, OfferError, send_offer};
use crate::clock::now_ms;
use crate::membership::Membership;
use crate::node::Shared;
use crate::offload_state::{PendingRelease, Record};
use crate::peer_client::peer_client;

/// Longest wait for a renewal or a release answer.
const RECONCILE_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// Added to a lease before an owner that could not renew runs the app at
/// home again: the host's lease check and the app's exit fit in it.
const TAKE_BACK_MARGIN_MS: u64 = 500;

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
pub async fn reconcile(shared: &Arc<Shared>, m: &Arc<Membership>) {
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
async fn release_pending(shared: &Shared, m: &Membership) {
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
