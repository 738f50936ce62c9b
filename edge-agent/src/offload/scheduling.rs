//! The owner's scheduling loop: on every sample it measures the apps
//! (`meter`), evaluates the pool's policy (`crate::scheduler`), and when a
//! threshold is crossed plans moves and offers each app to a peer (`offer`)
//! until one takes it; when the node is calm again for long enough it brings
//! moved-out apps home. Renewing what moved and retrying releases is the
//! owner's reconciliation (`owner`), not this loop's.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::meter::Meter;
use super::offer::{Offer, OfferError, new_offer_id, offer_with_retry};
use crate::clock::now_ms;
use crate::config::NetworkAccounting;
use crate::membership::Membership;
use crate::node::Shared;
use crate::offload_state::{MovedOut, PendingRelease, Record};
use crate::scheduler::{self, Amounts, AppLoad, Evaluator, PeerLoad, Resource};

/// Runs the threshold policy until shutdown.
pub async fn scheduler_loop(
    shared: Arc<Shared>,
    every: Duration,
    accounting: NetworkAccounting,
    reserve: Amounts,
    shutdown: CancellationToken,
) {
    let mut evaluator = Evaluator::new();
    let mut meter = Meter::new();
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
                let usage = meter.measure(&shared.runtime, accounting);
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
                meter = Meter::new();
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
    m: &Membership,
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
        shared
            .metrics
            .decision(trigger.resource.name(), "no_peer_fits");
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
        let before = moved;
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
        let outcome = if moved > before {
            "moved"
        } else {
            "no_peer_took_it"
        };
        shared.metrics.decision(trigger.resource.name(), outcome);
    }
    moved
}

/// Brings moved-out apps back when there is room under `low` for them.
async fn return_home(
    shared: &Shared,
    m: &Membership,
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
