//! Threshold scheduling on the node: measure the group's need, evaluate the
//! pool's policy on every sample, and move apps to peers (offload) on the
//! node's own decision, peer to peer, with or without the manager.
//!
//! State (persisted in `offload.json` so a restart keeps it):
//! - `moved_out`: our group's apps that run on a peer now (not here);
//! - `guests`: other members' apps we run for them.
//!
//! The apps that run here are `(our group - moved_out) + guests`. Guests are
//! never offloaded again (no A -> B -> C chains, no ping-pong); a moved app
//! is not moved again within the cooldown; the node itself does not trigger
//! again within the cooldown after an offload.
//!
//! Offload protocol (PeerService, mutual TLS, pool members only): `Offer`
//! (spec + measured usage) -> the peer admits only if it stays under its own
//! high watermarks, starts the app and answers once it runs -> we record it
//! as moved out and stop our copy. Any failure before the answer leaves the
//! app running here. Return home (policy flag): we start our copy first,
//! then `Release` the peer's.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::proto as pb;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::node::Shared;
use crate::scheduler::{self, Amounts, AppLoad, Evaluator, PeerLoad, Resource, Target, Watermarks};

const OFFER_TIMEOUT: Duration = Duration::from_secs(8);
/// Offload records kept for the manager (it deduplicates them).
const MAX_RECORDS: usize = 50;

/// A guest app (one of another member's apps that runs here).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guest {
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub from_node: String,
    pub from_slot: u32,
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OffloadState {
    pub moved_out: BTreeMap<String, MovedOut>,
    pub guests: BTreeMap<String, Guest>,
    /// Last move time per app (per-app cooldown).
    pub last_moved: BTreeMap<String, u64>,
    pub records: Vec<Record>,
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

    /// Forgets moves to, and guests from, nodes that left the pool: a moved
    /// app whose host left runs here again; a guest whose owner left is
    /// dropped (the owner's slot now runs the whole group elsewhere).
    pub fn retain_members(&mut self, members: &[String]) {
        self.moved_out.retain(|_, m| members.contains(&m.to_node));
        self.guests.retain(|_, g| members.contains(&g.from_node));
    }
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
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut total = 0u64;
    for pid in entries.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok()) {
        let in_group = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                rest.split_whitespace().nth(2)?.parse::<u32>().ok()
            })
            == Some(pgid);
        if !in_group {
            continue;
        }
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
        let usage = meter.measure(&shared, accounting);
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
            match offer(shared, m, slot, spec, app_usage, trigger.resource).await {
                Ok((node, _pid)) => {
                    let running_at = now_ms();
                    shared.update_offload(|s| {
                        s.moved_out.insert(
                            spec.name.clone(),
                            MovedOut {
                                to_node: node.clone(),
                                to_slot: slot,
                                at_ms: running_at,
                                usage: app_usage,
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
                    tracing::info!(app = %spec.name, to = %node, resource = trigger.resource.name(), "offloaded");
                    moved += 1;
                    break;
                }
                Err(e) => {
                    tracing::info!(app = %spec.name, slot, error = %e, "offer refused; trying another peer")
                }
            }
        }
    }
    moved
}

async fn offer(
    shared: &Shared,
    m: &crate::membership::Membership,
    slot: u32,
    spec: &pb::AppSpec,
    usage: Amounts,
    resource: Resource,
) -> Result<(String, u32), String> {
    let peer = m.others().find(|p| p.slot == slot).ok_or("no such peer")?;
    let mut client =
        crate::peer::peer_client(shared, m, slot, &peer.peer_address).map_err(|e| e.to_string())?;
    let req = pb::OfferRequest {
        app: Some(spec.clone()),
        usage: Some(pb::Resources {
            cpu_millis: usage[0],
            memory_mb: usage[1],
            disk_mb: usage[2],
            network_mbps: usage[3],
            disk_io_kbps: usage[4],
        }),
        reason: resource.name().to_string(),
    };
    let answer = tokio::time::timeout(OFFER_TIMEOUT, client.offer(req))
        .await
        .map_err(|_| "offer timed out".to_string())?
        .map_err(|s| s.message().to_string())?;
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
        // Start our copy first, then release the peer's.
        shared.update_offload(|s| {
            s.moved_out.remove(app);
        });
        if let Err(e) = shared.sync_apps().await {
            tracing::warn!(error = %e, "could not start the returning app");
            continue;
        }
        if let Some(peer) = m.others().find(|p| p.slot == out.to_slot)
            && let Ok(mut client) =
                crate::peer::peer_client(shared, m, peer.slot, &peer.peer_address)
            && let Err(e) = client
                .release(pb::ReleaseRequest { app: app.clone() })
                .await
        {
            tracing::warn!(%app, error = %e.message(), "peer did not release the app");
        }
        let now = now_ms();
        shared.update_offload(|s| {
            s.last_moved.insert(app.clone(), now);
            s.record(Record {
                app: app.clone(),
                from_node: out.to_node.clone(),
                to_node: shared.info.node_id.clone(),
                to_slot: m.slot,
                resource: "return-home".into(),
                utilisation: 0.0,
                triggered_at_ms: now,
                running_at_ms: now,
            });
        });
        tracing::info!(%app, from = %out.to_node, "returned home");
    }
}

/// Peer side of `Offer`: admission, start, wait until it runs.
pub async fn admit(
    shared: &Shared,
    caller_slot: u32,
    req: pb::OfferRequest,
) -> Result<u32, tonic::Status> {
    let spec = req
        .app
        .ok_or_else(|| tonic::Status::invalid_argument("app: required"))?;
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
    let need = shared.need();
    let capacity = shared.capacity_amounts();
    if !shared.offload_state().guests.contains_key(&spec.name)
        && let Some(over) = scheduler::over_high(need, capacity, &policy.marks, usage)
    {
        return Err(tonic::Status::resource_exhausted(format!(
            "would cross this node's high watermark for {}",
            over.name()
        )));
    }
    let guest = Guest {
        name: spec.name.clone(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        from_node: from,
        from_slot: caller_slot,
    };
    shared.update_offload(|s| {
        s.guests.insert(guest.name.clone(), guest.clone());
    });
    if let Err(e) = shared.sync_apps().await {
        shared.update_offload(|s| {
            s.guests.remove(&guest.name);
        });
        return Err(tonic::Status::internal(format!(
            "could not start {}: {e}",
            guest.name
        )));
    }
    let deadline = tokio::time::Instant::now() + OFFER_TIMEOUT / 2;
    loop {
        if let Some(pid) = shared
            .runtime
            .status()
            .into_iter()
            .find(|s| s.name == guest.name && s.state == crate::runtime::AppState::Running)
            .and_then(|s| s.pid)
        {
            return Ok(pid);
        }
        if tokio::time::Instant::now() >= deadline {
            shared.update_offload(|s| {
                s.guests.remove(&guest.name);
            });
            let _ = shared.sync_apps().await;
            return Err(tonic::Status::unavailable(format!(
                "{} did not start here",
                guest.name
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Peer side of `Release`: stop a guest of the caller.
pub async fn release(shared: &Shared, caller_slot: u32, app: &str) -> Result<(), tonic::Status> {
    let removed = {
        let mut removed = false;
        shared.update_offload(|s| {
            if s.guests
                .get(app)
                .is_some_and(|g| g.from_slot == caller_slot)
            {
                s.guests.remove(app);
                removed = true;
            }
        });
        removed
    };
    if !removed {
        return Err(tonic::Status::not_found(format!(
            "no guest {app:?} of this caller"
        )));
    }
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
}
