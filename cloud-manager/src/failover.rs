//! Failure detection and failover: moving slot i (certificate identity and
//! app group) from a failed node to a spare.
//!
//! Detection (pure, `suspect_since` / `has_failed`): a member is *suspect*
//! from the moment its stream dropped (or its heartbeats are overdue by
//! `heartbeat_timeout_ms`), and *failed* once it stayed suspect for
//! `failure_grace_ms`. After a manager restart every member gets the grace
//! from the restart on, so agents can reconnect first.
//!
//! Confirmation: before a failover the manager asks the other connected
//! members (over their streams) whether they still reach the suspect's
//! PeerService. If one does, the node is cut off from the cloud, not dead:
//! no failover, a NODE_SUSPECT event says so, and the question is asked
//! again later.
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use time::Duration as TimeDuration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::chain::issue_member;
use crate::events::{EventKind, EventRecord};
use crate::manager::{Command, Manager, ManagerError};
use crate::model::{NodeState, Resources, now_ms};
use crate::pool::{InFlight, MemberRecord, PoolRecord};

/// What the detector knows about a member's connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    pub connected: bool,
    pub last_seen_ms: u64,
    pub disconnected_at_ms: u64,
}

/// Since when the node has been suspect, or `None` if it is healthy.
pub fn suspect_since(
    h: Health,
    started_ms: u64,
    heartbeat_timeout_ms: u64,
    now: u64,
) -> Option<u64> {
    if h.connected && now.saturating_sub(h.last_seen_ms) <= heartbeat_timeout_ms {
        return None;
    }
    let since = if h.connected {
        h.last_seen_ms + heartbeat_timeout_ms
    } else {
        h.disconnected_at_ms.max(h.last_seen_ms)
    };
    Some(since.max(started_ms))
}

/// Whether a node suspect since `since` has failed by `now`.
pub fn has_failed(since: u64, grace_ms: u64, now: u64) -> bool {
    now.saturating_sub(since) >= grace_ms
}

/// A node that could take over a slot.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub node_id: String,
    pub free: bool,
    pub connected: bool,
    pub capacity: Resources,
    pub labels: BTreeMap<String, String>,
}

fn fits(need: Resources, cap: Resources) -> bool {
    need.cpu_millis <= cap.cpu_millis
        && need.memory_mb <= cap.memory_mb
        && need.disk_mb <= cap.disk_mb
        && need.network_mbps <= cap.network_mbps
}

/// The spare for a group needing `need`: a FREE, connected node carrying
/// every label in `selector` with room for the whole group. Ties go to the
/// lowest node id, so the choice is deterministic.
pub fn select_spare<'a>(
    candidates: &'a [Candidate],
    need: Resources,
    selector: &BTreeMap<String, String>,
) -> Option<&'a Candidate> {
    candidates
        .iter()
        .filter(|c| c.free && c.connected && fits(need, c.capacity))
        .filter(|c| selector.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
        .min_by(|a, b| a.node_id.cmp(&b.node_id))
}

/// A member's answer to "do you reach node X?".
#[derive(Clone, Debug)]
pub struct CheckAnswer {
    pub reachable: bool,
    pub error: String,
}

/// What `fail_over` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The slot moved to `to`; these nodes need their new assignment.
    Moved { to: String, push: Vec<String> },
    /// No suitable spare: the pool is degraded (event recorded once).
    Degraded,
    /// The slot is no longer held by that node (already handled).
    Stale,
}

/// Set `EDGEPOOL_FAULT=abort-after-failover-commit` to make the manager
/// abort right after a failover is committed and before anything is pushed
/// (used by the crash-safety test).
const FAULT_ENV: &str = "EDGEPOOL_FAULT";

impl Manager {
    /// Health of a node from its live state.
    pub fn health(&self, node_id: &str) -> Result<Health, ManagerError> {
        let live = self.live_data(node_id)?;
        Ok(Health {
            connected: live.conn_id.is_some(),
            last_seen_ms: live.last_seen_ms,
            disconnected_at_ms: live.disconnected_at_ms,
        })
    }

    /// Asks member `asker` whether it reaches `target` (slot, node, peer
    /// address). `None` if the asker is not connected or does not answer.
    pub async fn check_peer(
        &self,
        asker: &str,
        slot: u32,
        target: &str,
        address: &str,
        timeout: Duration,
    ) -> Option<CheckAnswer> {
        let live = self.live_node(asker).ok()?;
        let (tx, rx) = oneshot::channel();
        let id = self.register_check(tx);
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
        let validity = TimeDuration::seconds(i64::from(self.config.member_cert_validity_seconds));
        let outcome = self.mutate(|r| {
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
            let candidates: Vec<Candidate> = r
                .nodes
                .values()
                .filter(|n| n.tenant == tenant)
                .map(|n| Candidate {
                    node_id: n.node_id.clone(),
                    free: n.state == NodeState::Free,
                    connected: self.live_data(&n.node_id).is_ok_and(|l| l.conn_id.is_some()),
                    capacity: n.capacity,
                    labels: n.labels.clone(),
                })
                .collect();
            let now = now_ms();
            let Some(target) = select_spare(&candidates, need, &p.spare_labels).map(|c| c.node_id.clone()) else {
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
            let target_cert = r.nodes.get(&target).map(|n| n.cert_pem.clone()).unwrap_or_default();
            let p = r.pools.get_mut(&key).ok_or(ManagerError::Poisoned)?;
            let old = p.members[slot as usize - 1].clone();
            let identity = edgepool_common::identity::Identity::Member {
                domain: self.config.trust_domain.clone(),
                tenant: tenant.to_string(),
                pool: pool.to_string(),
                slot,
            };
            let cert = issue_member(&self.ca, &p.ca, &identity, &target_cert, validity)?;
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
            let push: Vec<String> = p.members.iter().map(|m| m.node_id.clone()).chain([node_id.to_string()]).collect();
            if let Some(n) = r.nodes.get_mut(node_id) {
                n.state = NodeState::Failed;
                n.pool.clear();
                n.slot = 0;
            }
            if let Some(n) = r.nodes.get_mut(&target) {
                n.state = NodeState::Member;
                n.pool = pool.to_string();
                n.slot = slot;
            }
            let started = EventRecord::new(tenant, pool, EventKind::FailoverStarted)
                .node(&target, slot)
                .message(format!("slot {slot}: {node_id} failed, moving its identity and {} apps to {target}", group.len()));
            r.events.push(started, now);
            let revoked = EventRecord::new(tenant, pool, EventKind::CertRevoked)
                .node(node_id, slot)
                .message(format!("member certificate {} of {node_id} revoked (generation {})", old.cert_serial, old.generation));
            r.events.push(revoked, now);
            Ok(Outcome::Moved { to: target, push })
        })?;
        if let Outcome::Moved { to, push } = &outcome {
            tracing::warn!(%tenant, %pool, slot, from = %node_id, %to, "failover committed");
            if std::env::var(FAULT_ENV).as_deref() == Ok("abort-after-failover-commit") {
                eprintln!("fault injection: aborting after the failover commit");
                std::process::abort();
            }
            self.push_assignments(push.iter().map(String::as_str))?;
        }
        Ok(outcome)
    }

    /// A node in FAILED state connected again: fence it (its assignment is
    /// empty, so it stops its old group).
    pub(crate) fn fence_if_failed(&self, node_id: &str) -> Result<(), ManagerError> {
        let failed = self
            .registry()?
            .nodes
            .get(node_id)
            .is_some_and(|n| n.state == NodeState::Failed);
        if !failed {
            return Ok(());
        }
        self.mutate(|r| {
            if let Some(n) = r.nodes.get_mut(node_id) {
                n.state = NodeState::Fenced;
                let e = EventRecord::new(&n.tenant, "", EventKind::NodeFenced)
                    .node(node_id, 0)
                    .message("failed node is back: told to stop its old group; FREE again once it runs nothing");
                r.events.push(e, now_ms());
            }
            Ok(())
        })
    }

    /// A fenced node reported that it runs nothing: it is FREE again.
    pub(crate) fn release_fenced(
        &self,
        node_id: &str,
        running_apps: usize,
    ) -> Result<(), ManagerError> {
        let fenced = self
            .registry()?
            .nodes
            .get(node_id)
            .is_some_and(|n| n.state == NodeState::Fenced);
        if !fenced || running_apps > 0 {
            return Ok(());
        }
        self.mutate(|r| {
            if let Some(n) = r.nodes.get_mut(node_id) {
                n.state = NodeState::Free;
                let e = EventRecord::new(&n.tenant, "", EventKind::NodeFreed)
                    .node(node_id, 0)
                    .message("fenced node stopped its old group and is FREE again");
                r.events.push(e, now_ms());
            }
            Ok(())
        })
    }
}

/// Per-member state of the detector between rounds.
#[derive(Default)]
struct Episode {
    announced: bool,
    next_check_ms: u64,
}

/// The detector: watches every pool member and fails over dead ones.
pub async fn detector_worker(manager: Arc<Manager>, shutdown: CancellationToken) {
    let cfg = manager.config().clone();
    let every = Duration::from_millis(u64::from(cfg.failure_check_ms));
    let started = now_ms();
    let mut episodes: HashMap<(String, u32), Episode> = HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let pools: Vec<PoolRecord> = match manager.registry() {
            Ok(r) => r.pools.values().cloned().collect(),
            Err(_) => continue,
        };
        let mut active = Vec::new();
        for pool in &pools {
            for m in &pool.members {
                let key = (format!("{}/{}", pool.tenant, pool.name), m.slot);
                let Ok(h) = manager.health(&m.node_id) else {
                    continue;
                };
                let now = now_ms();
                let Some(since) =
                    suspect_since(h, started, u64::from(cfg.heartbeat_timeout_ms), now)
                else {
                    continue;
                };
                active.push(key.clone());
                if !has_failed(since, u64::from(cfg.failure_grace_ms), now) {
                    continue;
                }
                let ep = episodes.entry(key).or_default();
                if now < ep.next_check_ms {
                    continue;
                }
                if cfg.peer_confirmation
                    && let Some(reached_by) = confirm(&manager, pool, m, &cfg).await
                {
                    ep.next_check_ms = now + u64::from(cfg.peer_recheck_ms);
                    if !ep.announced {
                        ep.announced = true;
                        record_cut_off(&manager, pool, m, &reached_by);
                    }
                    continue;
                }
                ep.next_check_ms = now + u64::from(cfg.failure_grace_ms);
                let (mgr, t, p, node, slot) = (
                    manager.clone(),
                    pool.tenant.clone(),
                    pool.name.clone(),
                    m.node_id.clone(),
                    m.slot,
                );
                match tokio::task::spawn_blocking(move || mgr.fail_over(&t, &p, slot, &node, since))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "failover failed"),
                    Err(e) => tracing::error!(error = %e, "failover task failed"),
                }
            }
        }
        episodes.retain(|k, _| active.contains(k));
    }
}

/// Asks the other connected members whether they reach `m`; returns who
/// does, or `None` if nobody does (or nobody could be asked).
async fn confirm(
    manager: &Arc<Manager>,
    pool: &PoolRecord,
    m: &MemberRecord,
    cfg: &crate::config::ManagerConfig,
) -> Option<Vec<String>> {
    let address = manager
        .registry()
        .ok()?
        .nodes
        .get(&m.node_id)
        .map(|n| n.peer_address.clone())?;
    let timeout = Duration::from_millis(u64::from(cfg.peer_check_timeout_ms));
    let asks = pool
        .members
        .iter()
        .filter(|o| o.node_id != m.node_id)
        .map(|o| {
            let manager = manager.clone();
            let (asker, target, address) = (o.node_id.clone(), m.node_id.clone(), address.clone());
            let slot = m.slot;
            async move {
                let answer = manager
                    .check_peer(&asker, slot, &target, &address, timeout)
                    .await;
                (asker, answer)
            }
        });
    let answers = futures::future::join_all(asks).await;
    let reached_by: Vec<String> = answers
        .into_iter()
        .filter(|(_, a)| a.as_ref().is_some_and(|a| a.reachable))
        .map(|(asker, _)| asker)
        .collect();
    (!reached_by.is_empty()).then_some(reached_by)
}

fn record_cut_off(manager: &Manager, pool: &PoolRecord, m: &MemberRecord, reached_by: &[String]) {
    let message = format!(
        "{} lost its link to the manager but is reached by {}: cut off from the cloud, not failed; no failover",
        m.node_id,
        reached_by.join(", ")
    );
    tracing::warn!(node = %m.node_id, pool = %pool.name, "{message}");
    let result = manager.mutate(|r| {
        let e = EventRecord::new(&pool.tenant, &pool.name, EventKind::NodeSuspect)
            .node(&m.node_id, m.slot)
            .message(message.clone());
        r.events.push(e, now_ms());
        Ok(())
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not record NODE_SUSPECT");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: u64 = 3000;

    fn h(connected: bool, last_seen: u64, disc: u64) -> Health {
        Health {
            connected,
            last_seen_ms: last_seen,
            disconnected_at_ms: disc,
        }
    }

    #[test]
    fn connected_and_fresh_is_healthy() {
        assert_eq!(suspect_since(h(true, 10_000, 0), 0, HB, 12_000), None);
        assert_eq!(suspect_since(h(true, 10_000, 0), 0, HB, 13_000), None);
    }

    #[test]
    fn overdue_heartbeats_make_a_connected_node_suspect() {
        assert_eq!(
            suspect_since(h(true, 10_000, 0), 0, HB, 13_001),
            Some(13_000)
        );
    }

    #[test]
    fn a_dropped_stream_is_suspect_at_once_and_failed_after_the_grace() {
        let since = suspect_since(h(false, 10_000, 10_200), 0, HB, 10_300).unwrap();
        assert_eq!(since, 10_200);
        assert!(!has_failed(since, 1000, 11_199));
        assert!(has_failed(since, 1000, 11_200));
    }

    #[test]
    fn after_a_manager_restart_the_grace_starts_at_the_restart() {
        // Never seen since the restart at 50_000.
        let since = suspect_since(h(false, 0, 0), 50_000, HB, 50_500).unwrap();
        assert_eq!(since, 50_000);
        assert!(!has_failed(since, 1000, 50_900));
        assert!(has_failed(since, 1000, 51_000));
    }

    fn cand(id: &str, free: bool, connected: bool, cpu: u64, labels: &[(&str, &str)]) -> Candidate {
        Candidate {
            node_id: id.into(),
            free,
            connected,
            capacity: Resources {
                cpu_millis: cpu,
                memory_mb: 1000,
                disk_mb: 1000,
                network_mbps: 100,
                disk_io_kbps: 0,
            },
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn spare_selection_is_free_connected_big_enough_labelled_and_deterministic() {
        let need = Resources {
            cpu_millis: 500,
            ..Resources::default()
        };
        let c = vec![
            cand("n5", true, true, 2000, &[("zone", "a")]),
            cand("n1", false, true, 2000, &[("zone", "a")]),
            cand("n2", true, false, 2000, &[("zone", "a")]),
            cand("n3", true, true, 100, &[("zone", "a")]),
            cand("n4", true, true, 2000, &[("zone", "b")]),
        ];
        let none = BTreeMap::new();
        assert_eq!(
            select_spare(&c, need, &none).map(|c| c.node_id.as_str()),
            Some("n4")
        );
        let zone_a: BTreeMap<String, String> = [("zone".to_string(), "a".to_string())].into();
        assert_eq!(
            select_spare(&c, need, &zone_a).map(|c| c.node_id.as_str()),
            Some("n5")
        );
        let zone_c: BTreeMap<String, String> = [("zone".to_string(), "c".to_string())].into();
        assert!(select_spare(&c, need, &zone_c).is_none());
    }
}
