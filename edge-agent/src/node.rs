//! The agent's shared state: identity, membership, peer TLS, the app
//! runtime, and applying assignments from the manager.
//!
//! An assignment is applied in this order: persist it (so a restart or a
//! cloud outage keeps it), switch membership and the peer certificate, then
//! reconcile the apps. Applying the same assignment twice changes nothing,
//! and an assignment older than the current one for the same pool is
//! ignored.
//!
//! Which apps run (`sync_apps`) also depends on two gates:
//! - *held*: after a restart the saved assignment's apps are not started
//!   until the manager sends an assignment or a peer accepts our member
//!   certificate (so it is still current). A node whose slot moved away
//!   while it was down therefore never starts a second copy of its old
//!   group; apps still running from before are left alone until then.
//! - *isolated*: cut off from the manager and from every peer for longer
//!   than the isolation lease, apps whose `on_disconnect` is STOP are
//!   stopped (and started again when the node is back in touch: a peer
//!   accepting us or an assignment from the manager ends it at once).
//!
//! While the node has no stream to the manager, its member checks (peer
//! server and dialing client) apply the offline grace: a peer's expired
//! member certificate with the serial our membership holds passes for up
//! to the autonomy window after its expiry (`trust::OfflineGrace`), so the
//! pool keeps working through a cloud outage longer than its
//! certificates live, and a restarted agent is confirmed by its peers.
//!
//! Layering: the workers (the uplink, the peer server and prober, the
//! liveness loop, the offload loops, the measurer) depend on this module;
//! it depends only on modules below them (`membership`, `runtime`,
//! `state`, `heard`, `offload_state`, `resources`, `scheduler`, `clock`),
//! never on a worker, so the crate has no import cycles.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_common::trust::{IssuerVerifier, OfflineGrace, RootIssued};
use prost::Message;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::clock::now_ms;
use crate::heard::Heard;
use crate::membership::{Membership, MembershipError};
use crate::offload_state::{OffloadState, Settings, policy_of};
use crate::resources::Resources;
use crate::runtime::{AppSpec, AppState, Limits, Runtime};
use crate::state::{DataDir, NodeInfo};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("saving the assignment: {0}")]
    Save(std::io::Error),
    #[error("apps: {0}")]
    Runtime(String),
}

/// Result of the latest probe of one peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerStatus {
    pub slot: u32,
    pub node_id: String,
    pub reachable: bool,
    pub last_ok_ms: u64,
    pub error: String,
    /// The peer's capacity and need (scheduler units), from its answer.
    pub capacity: [u64; 5],
    pub need: [u64; 5],
}

pub struct Shared {
    pub info: NodeInfo,
    pub data: DataDir,
    pub root_ca: Vec<CertificateDer<'static>>,
    pub node_chain: Vec<CertificateDer<'static>>,
    node_key: PrivateKeyDer<'static>,
    pub runtime: Runtime,
    pub capacity: Resources,
    usage: Mutex<Resources>,
    membership: RwLock<Option<Arc<Membership>>>,
    /// Bumped on every membership change (the liveness loop waits on it).
    membership_changed: tokio::sync::watch::Sender<()>,
    /// When each other member was last heard from (`crate::heard`; the
    /// beat streams of `crate::liveness` record into it).
    pub heard: Heard,
    peer_tls: RwLock<Arc<rustls::ServerConfig>>,
    peers: Mutex<Vec<PeerStatus>>,
    applied: Mutex<Option<pb::Assignment>>,
    /// The bytes of `assignment.pb` as last written or read: the manager
    /// sends the whole assignment again on every stream, and an unchanged
    /// one is not written (and fsynced) again.
    saved: Mutex<Option<Vec<u8>>>,
    gates: Mutex<Gates>,
    offload: Mutex<OffloadState>,
    offload_settings: Settings,
    /// Wakes the offload reconciliation (a release to send, a changed group).
    offload_kick: tokio::sync::Notify,
    /// Wakes the lease check (a guest was admitted).
    lease_kick: tokio::sync::Notify,
    /// Each running app's usage as the scheduler measured it last.
    app_usage: Mutex<BTreeMap<String, [u64; 5]>>,
    need: Mutex<[u64; 5]>,
    interface_kbps: Mutex<u64>,
    /// Serialises reconciles coming from assignments, confirmations and
    /// isolation changes.
    sync: tokio::sync::Mutex<()>,
    /// The switch on every peer connection (edgepool-swarm only; see
    /// `edgepool_common::gate`).
    peer_gate: Option<edgepool_common::gate::Gate>,
    /// The agent's metric families (`crate::metrics`).
    pub metrics: crate::metrics::Metrics,
    /// The offline grace every member check of ours applies (on while we
    /// have no stream to the manager: `set_offline`).
    grace: OfflineGrace,
}

#[derive(Clone, Copy, Debug, Default)]
struct Gates {
    held: bool,
    isolated: bool,
}

/// Where an assignment comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Manager,
    /// Saved by an earlier run of the agent.
    Saved,
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|p| p.into_inner()).clone()
}

fn write<T>(l: &RwLock<T>, v: T) {
    *l.write().unwrap_or_else(|p| p.into_inner()) = v;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub fn new(
        info: NodeInfo,
        data: DataDir,
        root_ca: Vec<CertificateDer<'static>>,
        node_chain: Vec<CertificateDer<'static>>,
        node_key: PrivateKeyDer<'static>,
        runtime: Runtime,
        capacity: Resources,
    ) -> Result<Self, tls::TlsError> {
        let peer_tls =
            peer_server_config(&root_ca, node_chain.clone(), node_key.clone_key(), None)?;
        let offload = OffloadState::load(&data.dir);
        Ok(Shared {
            info,
            data,
            root_ca,
            node_chain,
            node_key,
            runtime,
            capacity,
            usage: Mutex::new(Resources::default()),
            membership: RwLock::new(None),
            membership_changed: tokio::sync::watch::Sender::new(()),
            heard: Heard::new(std::time::Duration::from_millis(600)),
            peer_tls: RwLock::new(Arc::new(peer_tls)),
            peers: Mutex::new(Vec::new()),
            applied: Mutex::new(None),
            saved: Mutex::new(None),
            gates: Mutex::new(Gates::default()),
            offload: Mutex::new(offload),
            offload_settings: Settings::default(),
            offload_kick: tokio::sync::Notify::new(),
            lease_kick: tokio::sync::Notify::new(),
            app_usage: Mutex::new(BTreeMap::new()),
            need: Mutex::new([0; 5]),
            interface_kbps: Mutex::new(0),
            sync: tokio::sync::Mutex::new(()),
            peer_gate: None,
            metrics: crate::metrics::Metrics::default(),
            grace: offline_grace(DEFAULT_AUTONOMY_WINDOW),
        })
    }

    /// Sets the autonomy window (before the agent runs; see
    /// `AgentConfig::autonomy_window_secs`).
    pub fn with_autonomy_window(mut self, window: std::time::Duration) -> Self {
        self.grace = offline_grace(window);
        self
    }

    pub fn autonomy_window(&self) -> std::time::Duration {
        self.grace.window()
    }

    /// Whether we have a stream to the manager: without one, peers' member
    /// certificates get the offline grace (`OfflineGrace`).
    pub fn set_offline(&self, offline: bool) {
        if self.grace.is_offline() != offline {
            tracing::info!(
                offline,
                window_secs = self.grace.window().as_secs(),
                "offline grace for expired member certificates of the held membership {}",
                if offline { "on" } else { "off" }
            );
        }
        self.grace.set_offline(offline);
    }

    pub fn membership(&self) -> Option<Arc<Membership>> {
        read(&self.membership)
    }

    pub fn peer_tls(&self) -> Arc<rustls::ServerConfig> {
        read(&self.peer_tls)
    }

    pub fn node_key(&self) -> PrivateKeyDer<'static> {
        self.node_key.clone_key()
    }

    pub fn set_usage(&self, usage: Resources) {
        *lock(&self.usage) = usage;
    }

    pub fn usage(&self) -> Resources {
        *lock(&self.usage)
    }

    /// The group's need as the scheduler computed it last (cpu millicores,
    /// memory MiB, disk MiB, network kbit/s, disk I/O KiB/s).
    pub fn set_need(&self, need: [u64; 5]) {
        *lock(&self.need) = need;
    }

    /// The need as measured, without admission reservations.
    pub fn measured_need(&self) -> [u64; 5] {
        *lock(&self.need)
    }

    /// The need peers see (Probe) and admission starts from: the measured
    /// need plus what is reserved for guests not measured yet.
    pub fn need(&self) -> [u64; 5] {
        let window = self.offload_settings.reservation.as_millis() as u64;
        let reservations = lock(&self.offload).reservations(&self.app_usage(), None);
        crate::scheduler::add(
            self.measured_need(),
            crate::scheduler::reserved(&reservations, now_ms(), window),
        )
    }

    /// Each app's usage from the scheduler's last sample.
    pub fn set_app_usage(&self, usage: BTreeMap<String, [u64; 5]>) {
        *lock(&self.app_usage) = usage;
    }

    pub fn app_usage(&self) -> BTreeMap<String, [u64; 5]> {
        lock(&self.app_usage).clone()
    }

    /// A member silent this long is published as unreachable.
    pub fn with_peer_suspect(mut self, suspect_after: std::time::Duration) -> Self {
        self.heard = Heard::new(suspect_after);
        self
    }

    /// Changes whenever the membership does.
    pub fn membership_changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.membership_changed.subscribe()
    }

    /// Resolves once the node is a pool member (at once if it is one);
    /// false if `shutdown` fired first. The workers that only act for a
    /// member wait here instead of waking on their timers: most nodes of
    /// a fleet are spares.
    pub async fn until_member(&self, shutdown: &tokio_util::sync::CancellationToken) -> bool {
        // Subscribed before the check: a change in between is not missed.
        let mut changes = self.membership_changes();
        while self.membership().is_none() {
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                changed = changes.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Puts every peer connection, made or accepted, behind `gate`.
    pub fn with_peer_gate(mut self, gate: Option<edgepool_common::gate::Gate>) -> Self {
        self.peer_gate = gate;
        self
    }

    pub fn peer_gate(&self) -> Option<edgepool_common::gate::Gate> {
        self.peer_gate.clone()
    }

    /// Replaces the offload settings (before the agent runs).
    pub fn with_offload_settings(mut self, settings: Settings) -> Self {
        self.offload_settings = settings;
        self
    }

    pub fn offload_settings(&self) -> &Settings {
        &self.offload_settings
    }

    /// Asks the offload reconciliation to run now.
    pub fn kick_leases(&self) {
        self.lease_kick.notify_one();
    }

    pub async fn guest_admitted(&self) {
        self.lease_kick.notified().await
    }

    pub fn kick_offload(&self) {
        self.offload_kick.notify_one();
    }

    /// Resolves when someone called [`Shared::kick_offload`].
    pub async fn offload_kicked(&self) {
        self.offload_kick.notified().await
    }

    pub fn set_interface_kbps(&self, kbps: u64) {
        *lock(&self.interface_kbps) = kbps;
    }

    pub fn interface_kbps(&self) -> u64 {
        *lock(&self.interface_kbps)
    }

    /// Capacity in scheduler units (network in kbit/s, disk I/O in KiB/s).
    pub fn capacity_amounts(&self) -> [u64; 5] {
        let c = self.capacity;
        [
            c.cpu_millis,
            c.memory_mb,
            c.disk_mb,
            c.network_mbps * 1000,
            c.disk_io_kbps,
        ]
    }

    pub fn offload_state(&self) -> OffloadState {
        lock(&self.offload).clone()
    }

    /// Reads the offload state without copying it.
    pub fn with_offload<R>(&self, f: impl FnOnce(&OffloadState) -> R) -> R {
        f(&lock(&self.offload))
    }

    /// Changes the offload state and saves it.
    pub fn update_offload(&self, f: impl FnOnce(&mut OffloadState)) {
        let mut s = lock(&self.offload);
        let before = s.clone();
        f(&mut s);
        // Most updates change nothing (every assignment prunes the state
        // to its members): only a change is written, and fsynced.
        if *s == before {
            return;
        }
        if let Err(e) = s.save(&self.data.dir) {
            tracing::warn!(error = %e, "could not save the offload state");
        }
    }

    /// The pool catalog's entry for `app` (from the applied assignment):
    /// the slot whose group holds it and its spec's digest.
    pub fn catalog_app(&self, app: &str) -> Option<pb::CatalogApp> {
        lock(&self.applied)
            .as_ref()
            .and_then(|a| a.catalog.iter().find(|c| c.name == app).cloned())
    }

    /// The apps of our group (from the applied assignment).
    pub fn own_apps(&self) -> Vec<pb::AppSpec> {
        lock(&self.applied)
            .as_ref()
            .map(|a| a.apps.clone())
            .unwrap_or_default()
    }

    pub fn policy(&self) -> Option<crate::scheduler::Policy> {
        let applied = lock(&self.applied);
        let a = applied.as_ref().filter(|a| !a.pool.is_empty())?;
        Some(policy_of(a.policy.as_ref()?))
    }

    pub fn return_home(&self) -> bool {
        lock(&self.applied)
            .as_ref()
            .and_then(|a| a.policy.as_ref())
            .is_some_and(|p| p.return_home)
    }

    pub fn return_home_ms(&self) -> u64 {
        lock(&self.applied)
            .as_ref()
            .and_then(|a| a.policy.as_ref())
            .map(|p| u64::from(p.return_home_seconds) * 1000)
            .unwrap_or(60_000)
    }

    /// (slot, capacity, need) of every peer that answered its last probe.
    pub fn peer_loads(&self) -> Vec<(u32, [u64; 5], [u64; 5])> {
        lock(&self.peers)
            .iter()
            .filter(|p| p.reachable)
            .map(|p| (p.slot, p.capacity, p.need))
            .collect()
    }

    pub fn set_peers(&self, peers: Vec<PeerStatus>) {
        *lock(&self.peers) = peers;
    }

    /// When a peer last accepted our member certificate (0: never).
    pub fn last_peer_ok_ms(&self) -> u64 {
        lock(&self.peers)
            .iter()
            .filter(|p| p.reachable)
            .map(|p| p.last_ok_ms)
            .max()
            .unwrap_or(0)
    }

    fn assignment_path(&self) -> std::path::PathBuf {
        self.data.dir.join("assignment.pb")
    }

    /// The assignment saved by the last run, if any.
    pub fn load_saved(&self) -> Option<pb::Assignment> {
        let bytes = std::fs::read(self.assignment_path()).ok()?;
        match pb::Assignment::decode(bytes.as_slice()) {
            Ok(a) => {
                *lock(&self.saved) = Some(bytes);
                Some(a)
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable saved assignment");
                None
            }
        }
    }

    /// Applies an assignment (see the module comment).
    pub async fn apply(&self, a: pb::Assignment, source: Source) -> Result<(), ApplyError> {
        if let Some(current) = lock(&self.applied).as_ref()
            && current.pool == a.pool
            && a.generation < current.generation
        {
            tracing::info!(pool = %a.pool, generation = a.generation, "ignoring an older assignment");
            return Ok(());
        }
        let node_cert = self
            .node_chain
            .first()
            .ok_or_else(|| ApplyError::Membership(MembershipError::WrongKey))?;
        let membership = Membership::from_assignment(&a, &self.info, node_cert)?;
        if source == Source::Manager {
            let bytes = a.encode_to_vec();
            if lock(&self.saved).as_deref() != Some(bytes.as_slice()) {
                // fsync on a blocking thread: a slow disk (an SD card) must
                // not hold the stream, the prober and the apps' watchers.
                let (path, b) = (self.assignment_path(), bytes.clone());
                tokio::task::spawn_blocking(move || {
                    edgepool_common::fsutil::write_private(&path, &b)
                })
                .await
                .map_err(|e| ApplyError::Save(std::io::Error::other(e)))?
                .map_err(ApplyError::Save)?;
                *lock(&self.saved) = Some(bytes);
            }
        }
        {
            let mut gates = lock(&self.gates);
            gates.held = source == Source::Saved && membership.is_some();
            // An assignment from the manager: we are in touch, whatever the
            // isolation loop saw last (it catches up within its tick).
            if source == Source::Manager {
                gates.isolated = false;
            }
        }
        let grace = self.grace.clone();
        let membership = membership.map(|mut m| {
            m.check = m.check.with_grace(grace);
            Arc::new(m)
        });
        let chain = match &membership {
            Some(m) => m.chain.clone(),
            None => self.node_chain.clone(),
        };
        let tls = peer_server_config(&self.root_ca, chain, self.node_key(), membership.clone())?;
        write(&self.peer_tls, Arc::new(tls));
        if membership.is_none() {
            self.set_peers(Vec::new());
        }
        let members: Vec<String> = a.members.iter().map(|m| m.node_id.clone()).collect();
        self.update_offload(|s| {
            if a.pool.is_empty() {
                *s = OffloadState::default();
            } else {
                s.retain_members(&members);
            }
        });
        write(&self.membership, membership);
        self.membership_changed.send_replace(());
        tracing::info!(pool = %a.pool, slot = a.slot, generation = a.generation, apps = a.apps.len(), ?source, "applying assignment");
        *lock(&self.applied) = Some(a);
        // Moved-out apps the group no longer lists are released at once.
        self.kick_offload();
        self.sync_apps().await
    }

    /// Makes the running apps match the applied assignment and the gates.
    pub async fn sync_apps(&self) -> Result<(), ApplyError> {
        let _one_at_a_time = self.sync.lock().await;
        let gates = *lock(&self.gates);
        if gates.held {
            return Ok(());
        }
        let offload = self.offload_state();
        let mut apps: Vec<AppSpec> = lock(&self.applied)
            .as_ref()
            .map(|a| {
                a.apps
                    .iter()
                    .filter(|app| {
                        !(gates.isolated && app.on_disconnect == pb::OnDisconnect::Stop as i32)
                    })
                    .filter(|app| !offload.moved_out.contains_key(&app.name))
                    .map(app_spec)
                    .collect()
            })
            .unwrap_or_default();
        // Guests run here for their owners (see `offload::host`); an app that is
        // now one of our own runs as ours.
        let own: Vec<String> = lock(&self.applied)
            .as_ref()
            .map(|a| a.apps.iter().map(|app| app.name.clone()).collect())
            .unwrap_or_default();
        apps.extend(
            offload
                .guests
                .values()
                .filter(|g| !own.contains(&g.name))
                .map(|g| AppSpec {
                    name: g.name.clone(),
                    command: g.command.clone(),
                    env: g.env.clone(),
                    // The pool's limits: the offered spec is the catalog's.
                    limits: g.limits,
                }),
        );
        self.runtime
            .reconcile(apps)
            .await
            .map_err(|e| ApplyError::Runtime(e.to_string()))
    }

    /// A peer accepted our member certificate: a held saved assignment is
    /// still current, so its apps may run.
    ///
    /// It also ends isolation at once: a peer reached us, and a reconcile
    /// that still saw the node isolated would stop (and the next one
    /// restart) the apps whose `on_disconnect` is STOP.
    pub async fn confirm_membership(&self) {
        let (was_held, was_isolated) = {
            let mut gates = lock(&self.gates);
            (
                std::mem::replace(&mut gates.held, false),
                std::mem::replace(&mut gates.isolated, false),
            )
        };
        if was_held {
            tracing::info!("a peer accepted our member certificate: starting the saved group");
        }
        if was_held || was_isolated {
            if let Err(e) = self.sync_apps().await {
                tracing::warn!(error = %e, "could not start the saved group");
            }
        }
    }

    /// Enters or leaves isolation (see the module comment).
    pub async fn set_isolated(&self, isolated: bool) {
        let changed = std::mem::replace(&mut lock(&self.gates).isolated, isolated) != isolated;
        if changed {
            if isolated {
                tracing::warn!(
                    "cut off from the manager and every peer: stopping apps whose on_disconnect is STOP"
                );
            } else {
                tracing::info!("back in touch: running the whole group again");
            }
            if let Err(e) = self.sync_apps().await {
                tracing::warn!(error = %e, "could not apply the isolation change");
            }
        }
    }

    /// What this node runs and reaches, for the manager.
    pub fn report(&self) -> pb::AppReport {
        let (pool, generation) = lock(&self.applied)
            .as_ref()
            .map(|a| (a.pool.clone(), a.generation))
            .unwrap_or_default();
        let slot = self.membership().map(|m| m.slot).unwrap_or(0);
        pb::AppReport {
            pool,
            generation,
            apps: self
                .runtime
                .status()
                .into_iter()
                .map(|s| pb::Placement {
                    app: s.name,
                    home_slot: slot,
                    host_node_id: self.info.node_id.clone(),
                    state: app_state(s.state) as i32,
                    pid: s.pid.unwrap_or(0),
                    restarts: s.restarts,
                    usage: Some(pb::Resources {
                        cpu_millis: s.usage.cpu_millis,
                        memory_mb: s.usage.memory_mb,
                        disk_mb: 0,
                        network_mbps: 0,
                        disk_io_kbps: (s.usage.disk_read_bytes_per_sec
                            + s.usage.disk_write_bytes_per_sec)
                            / 1024,
                    }),
                    last_exit: s.last_exit.unwrap_or_default(),
                    disk_read_bytes_per_sec: s.usage.disk_read_bytes_per_sec,
                    disk_write_bytes_per_sec: s.usage.disk_write_bytes_per_sec,
                })
                .collect(),
            peers: lock(&self.peers)
                .iter()
                .map(|p| pb::PeerReach {
                    slot: p.slot,
                    node_id: p.node_id.clone(),
                    reachable: p.reachable,
                    last_ok: (p.last_ok_ms > 0).then(|| prost_types::Timestamp {
                        seconds: (p.last_ok_ms / 1000) as i64,
                        nanos: ((p.last_ok_ms % 1000) * 1_000_000) as i32,
                    }),
                    error: p.error.clone(),
                })
                .collect(),
            offloads: self
                .offload_state()
                .records
                .iter()
                .map(|r| pb::OffloadRecord {
                    app: r.app.clone(),
                    from_node: r.from_node.clone(),
                    to_node: r.to_node.clone(),
                    to_slot: r.to_slot,
                    resource: r.resource.clone(),
                    utilisation: r.utilisation,
                    triggered_at: Some(ts(r.triggered_at_ms)),
                    running_at: Some(ts(r.running_at_ms)),
                })
                .collect(),
        }
    }
}

/// The default autonomy window: 72 h.
pub const DEFAULT_AUTONOMY_WINDOW: std::time::Duration = std::time::Duration::from_secs(259_200);

/// A grace of `window`, on from the start: an agent has no stream to the
/// manager until its uplink connects.
fn offline_grace(window: std::time::Duration) -> OfflineGrace {
    let grace = OfflineGrace::new(window);
    grace.set_offline(true);
    grace
}

fn ts(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Whether a member is isolated: no stream to the manager since
/// `link_down_since` and no peer accepted us since `last_peer_ok`, both
/// for longer than `lease_ms`.
pub fn isolated(now: u64, link_down_since: Option<u64>, last_peer_ok: u64, lease_ms: u64) -> bool {
    match link_down_since {
        None => false,
        Some(down) => now.saturating_sub(down.max(last_peer_ok)) > lease_ms,
    }
}

fn app_spec(a: &pb::AppSpec) -> AppSpec {
    AppSpec {
        name: a.name.clone(),
        command: a.command.clone(),
        env: a.env.clone().into_iter().collect(),
        limits: app_limits(a),
    }
}

/// `AppSpec.limits`, each field 0 or absent falling back to the request in
/// `resources`: an app that asks for 64 MiB is held to 64 MiB.
pub fn app_limits(a: &pb::AppSpec) -> Limits {
    let request = a.resources.unwrap_or_default();
    let limit = a.limits.unwrap_or_default();
    let pick = |limit: u64, request: u64| if limit > 0 { limit } else { request };
    Limits {
        cpu_millis: pick(limit.cpu_millis, request.cpu_millis),
        memory_mb: pick(limit.memory_mb, request.memory_mb),
    }
}

fn app_state(s: AppState) -> pb::AppState {
    match s {
        AppState::Starting => pb::AppState::Pending,
        AppState::Running => pb::AppState::Running,
        AppState::Backoff => pb::AppState::Backoff,
        AppState::Stopping | AppState::Stopped => pb::AppState::Stopped,
        AppState::Failed => pb::AppState::Failed,
    }
}

/// The peer port's TLS: present `chain` (the member certificate and pool
/// CA while a member, the node certificate otherwise) and require a client
/// certificate. A member certificate must come from our pool's CA and be
/// the current one of its slot in `membership` (checked in the handshake,
/// so a replaced, revoked or foreign member never gets a connection);
/// any other identity must be signed by the root itself (health and
/// reflection answer it; PeerService refuses it per RPC).
pub fn peer_server_config(
    root_ca: &[CertificateDer<'static>],
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    membership: Option<Arc<Membership>>,
) -> Result<rustls::ServerConfig, tls::TlsError> {
    let root = root_ca
        .first()
        .ok_or_else(|| tls::TlsError::NoCertificate {
            what: "root CA".into(),
        })?;
    let check = membership.as_ref().map(|m| m.check.clone());
    let verifier = IssuerVerifier::new(
        RootIssued::new(root)?,
        check,
        true,
        move |id, serial| match (id, &membership) {
            (Identity::Member { .. }, Some(m)) => m
                .authorize(id, serial)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            (Identity::Member { .. }, None) => Err("this node is not a pool member".into()),
            _ => Ok(()),
        },
    );
    tls::server_config_with_verifier(chain, key, verifier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_needs_both_links_gone_for_the_lease() {
        // Connected to the manager: never isolated.
        assert!(!isolated(100_000, None, 0, 10_000));
        // Manager gone 20 s, a peer reached 5 s ago: not isolated.
        assert!(!isolated(100_000, Some(80_000), 95_000, 10_000));
        // Manager gone 20 s, peers silent for 20 s: isolated.
        assert!(isolated(100_000, Some(80_000), 70_000, 10_000));
        // Manager gone only 5 s: not yet.
        assert!(!isolated(100_000, Some(95_000), 0, 10_000));
    }
}
