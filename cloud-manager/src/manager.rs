//! The manager's core: durable registry + live connection state, with the
//! operations the transport handlers call. No tonic or prost here.
//!
//! Locking: the durable registry is read as an immutable snapshot (an
//! `Arc`, no lock held while reading) and changed only through `mutate`,
//! whose commit runs on the store writer's thread (`writer`); per-message
//! work (telemetry, heartbeats, app reports that change nothing) touches
//! only the sending node's own `LiveNode`, found once when its stream opens.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use edgepool_common::identity::Identity;

use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::ca::{Ca, CaError};
use crate::config::ManagerConfig;
use crate::events::{Backlog, EventKind, EventRecord, EventsDropped, Watch, WatchFrom};
use crate::model::{AppReport, Hello, NodeAssignment, NodeState, Sample, now_ms};
use crate::node_list::{NodeCounts, NodeQuery, shown_state};
use crate::pool::PoolError;
use crate::registry::{EnrollError, NodeRecord, Registry, TOKEN_BYTES, TOKEN_PREFIX, TokenRecord};
use crate::store::{Store, StoreError};
use crate::writer::{Durable, Writer};

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("invalid {field}: {why}")]
    Invalid { field: &'static str, why: String },
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    EventsDropped(#[from] EventsDropped),
    #[error("internal state lock poisoned")]
    Poisoned,
    #[error(transparent)]
    Transition(#[from] crate::node_state::InvalidTransition),
}

/// What a successful enrollment returns to the node.
#[derive(Clone, Debug)]
pub struct EnrollGrant {
    pub node_id: String,
    pub tenant: String,
    pub trust_domain: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub labels: BTreeMap<String, String>,
}

/// Requests the manager sends to one agent over its stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Does the agent still reach member `slot` (`node_id`) at `peer_address`?
    PeerCheck {
        request_id: u64,
        slot: u32,
        node_id: String,
        peer_address: String,
    },
    /// Are you running? The agent answers with a Pong of the same nonce.
    Ping { nonce: u64 },
}

/// Live (not persisted) state of one node's connection.
#[derive(Debug)]
pub struct LiveNode {
    inner: Mutex<LiveData>,
    /// The node's desired state; its stream session sends every new value.
    assign: watch::Sender<Option<Arc<NodeAssignment>>>,
    /// Commands for the node's current stream session, if it has one.
    commands: Mutex<Option<mpsc::Sender<Command>>>,
    /// Pings sent to this node and not answered yet, by nonce. Only this
    /// node's own stream can answer them.
    pings: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Woken whenever `conn_id` changes, so a replaced or ended session
    /// stops at once (`ended`).
    stream_change: tokio::sync::Notify,
}

impl Default for LiveNode {
    fn default() -> Self {
        LiveNode {
            inner: Mutex::new(LiveData::default()),
            assign: watch::channel(None).0,
            commands: Mutex::new(None),
            pings: Mutex::new(HashMap::new()),
            stream_change: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct LiveData {
    /// The open stream, if any; a newer stream replaces an older one.
    pub conn_id: Option<u64>,
    pub last_seen_ms: u64,
    pub sample: Option<Sample>,
    /// What the agent last said it runs.
    pub report: Option<AppReport>,
    /// When the last stream closed (0: never since the manager started).
    pub disconnected_at_ms: u64,
    /// The same two moments on the monotonic clock, for failure detection:
    /// a wall-clock jump must never make a node look silent.
    pub last_seen_at: Option<Instant>,
    pub disconnected_at: Option<Instant>,
}

impl LiveData {
    fn touch(&mut self) {
        self.last_seen_ms = now_ms();
        self.last_seen_at = Some(Instant::now());
    }
}

impl LiveNode {
    fn lock(&self) -> MutexGuard<'_, LiveData> {
        // A panic while holding this lock cannot leave LiveData inconsistent
        // (plain field writes), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `conn_id` is still the node's current stream.
    pub fn is_current(&self, conn_id: u64) -> bool {
        self.lock().conn_id == Some(conn_id)
    }

    /// Resolves once `conn_id` is no longer the node's current stream (a
    /// newer stream replaced it, or the manager ended it).
    pub async fn ended(&self, conn_id: u64) {
        loop {
            let changed = self.stream_change.notified();
            tokio::pin!(changed);
            // Registered before the check, so no change is missed.
            changed.as_mut().enable();
            if !self.is_current(conn_id) {
                return;
            }
            changed.await;
        }
    }

    pub fn seen(&self) {
        self.lock().touch();
    }

    pub fn record_sample(&self, sample: Sample) {
        let mut l = self.lock();
        l.touch();
        l.sample = Some(sample);
    }

    pub fn snapshot(&self) -> LiveData {
        self.lock().clone()
    }

    /// Whether the node has an open stream (without copying its live data).
    pub fn is_connected(&self) -> bool {
        self.lock().conn_id.is_some()
    }

    /// Stores a new report and returns the previous one.
    pub fn swap_report(&self, report: AppReport) -> Option<AppReport> {
        let mut l = self.lock();
        l.touch();
        l.report.replace(report)
    }

    /// Sends a Ping over the node's current stream and waits up to
    /// `timeout` for its Pong. False if there is no stream, the session is
    /// not keeping up, or no answer came in time.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let nonce = crate::random::u64();
        let (tx, rx) = oneshot::channel();
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(nonce, tx);
        let answered = self.send_command(Command::Ping { nonce })
            && tokio::time::timeout(timeout, rx)
                .await
                .is_ok_and(|r| r.is_ok());
        self.pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
        answered
    }

    /// A Pong from this node's stream.
    pub fn pong(&self, nonce: u64) {
        let waiter = self
            .pings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&nonce);
        if let Some(tx) = waiter {
            let _ = tx.send(());
        }
    }

    pub fn subscribe_assignment(&self) -> watch::Receiver<Option<Arc<NodeAssignment>>> {
        self.assign.subscribe()
    }

    pub(crate) fn set_assignment(&self, a: NodeAssignment) {
        self.assign.send_replace(Some(Arc::new(a)));
    }

    /// Attaches the command channel of a new stream session.
    pub fn set_commands(&self, tx: mpsc::Sender<Command>) {
        *self.commands.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Sends a command to the current session; false if there is none or
    /// it is not keeping up.
    pub fn send_command(&self, c: Command) -> bool {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|tx| tx.try_send(c).is_ok())
    }
}

/// A node as the tenant API shows it: durable record + live data.
#[derive(Clone, Debug)]
pub struct NodeView {
    pub record: NodeRecord,
    pub live: LiveData,
}

impl NodeView {
    /// The state the tenant sees (a member without its stream is SUSPECT).
    pub fn state(&self) -> NodeState {
        shown_state(self.record.state, self.live.conn_id.is_some())
    }
}

/// One page of `Manager::list_nodes_page`.
#[derive(Clone, Debug)]
pub struct NodePage {
    pub nodes: Vec<NodeView>,
    /// Where the next page starts (the last node id of this one), if more
    /// nodes match.
    pub next_after: Option<String>,
}

pub struct Manager {
    pub(crate) config: ManagerConfig,
    pub(crate) ca: Ca,
    /// The durable registry: committed snapshot, prepared head, writer.
    durable: Arc<Durable>,
    live: RwLock<HashMap<String, Arc<LiveNode>>>,
    next_conn: AtomicU64,
    /// Open peer checks: random id -> (the node asked, where its answer goes).
    checks: Mutex<HashMap<u64, (String, oneshot::Sender<crate::liveness::CheckAnswer>)>>,
    /// What members say of each other's liveness (see `failover`).
    pub(crate) liveness: crate::liveness::LivenessBook,
    /// Wakes the failure detector at once (a member was reported unreachable).
    pub(crate) detector_wake: tokio::sync::Notify,
    /// Members the failure detector must look at, and when (see
    /// `deadlines`): armed when a stream closes, a peer reports a member
    /// unreachable, or a node's assignment changes.
    pub(crate) watchlist: Mutex<crate::deadlines::DeadlineQueue>,
    /// Declared last: dropping the manager stops the writer after the rest.
    _writer: Writer,
}

impl Manager {
    pub fn new(config: ManagerConfig, ca: Ca, store: Box<dyn Store>) -> Result<Self, ManagerError> {
        let mut registry = store.load()?;
        registry.events.set_limit(config.events_per_tenant as usize);
        let (durable, writer) = Durable::start(registry, store, broadcast::channel(1024).0)
            .map_err(|e| StoreError::Backend {
                path: config.data_dir.join("state.redb"),
                why: format!("could not start the store writer: {e}"),
            })?;
        Ok(Manager {
            config,
            ca,
            durable,
            _writer: writer,
            live: RwLock::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            checks: Mutex::new(HashMap::new()),
            liveness: crate::liveness::LivenessBook::default(),
            detector_wake: tokio::sync::Notify::new(),
            watchlist: Mutex::new(crate::deadlines::DeadlineQueue::default()),
        })
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// The committed registry: an immutable snapshot, read without a lock.
    pub(crate) fn registry(&self) -> Result<Arc<Registry>, ManagerError> {
        Ok(self.durable.current())
    }

    /// Applies `f` to a copy of the registry (with every change prepared
    /// before it), has the writer commit the rows it touched, and returns
    /// once they are committed, the copy is current and its events are
    /// broadcast. If `f` or the store fails, nothing changes. Blocks the
    /// calling thread until the commit: for blocking threads only; async
    /// code uses `mutate_async`.
    pub(crate) fn mutate<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, ManagerError>,
    ) -> Result<T, ManagerError> {
        let (out, pending) = self.durable.prepare(true, f)?;
        pending.wait()?;
        Ok(out)
    }

    /// `mutate` for async code: waits for the commit without blocking the
    /// runtime thread. `f` itself runs at once (it must not do slow work:
    /// changes that sign certificates run on blocking threads).
    pub(crate) async fn mutate_async<T>(
        &self,
        f: impl FnOnce(&mut Registry) -> Result<T, ManagerError>,
    ) -> Result<T, ManagerError> {
        let (out, pending) = self.durable.prepare(false, f)?;
        pending.done().await?;
        Ok(out)
    }

    /// Registers a peer check sent to `asker`, under an unguessable id.
    pub(crate) fn register_check(
        &self,
        asker: &str,
        tx: oneshot::Sender<crate::liveness::CheckAnswer>,
    ) -> u64 {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let mut id = crate::random::u64();
        while id == 0 || checks.contains_key(&id) {
            id = crate::random::u64();
        }
        checks.insert(id, (asker.to_string(), tx));
        id
    }

    pub(crate) fn forget_check(&self, id: u64) {
        self.checks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// An agent's answer to a peer check. Only the node that was asked can
    /// answer it; an answer from any other node is dropped (and logged).
    pub fn answer_check(&self, from: &str, id: u64, answer: crate::liveness::CheckAnswer) {
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

    /// Starts following `tenant`'s events (only `pool`'s if not empty)
    /// from `from`. Fails with `EventsDropped` if `from` is a seq after
    /// which some of the tenant's events are no longer kept.
    pub fn watch_events(
        &self,
        tenant: &str,
        pool: &str,
        from: WatchFrom,
    ) -> Result<Watch, ManagerError> {
        // Subscribed together with the snapshot the backlog is read from:
        // the backlog and the live events meet exactly.
        self.durable.with_subscription(|r, live| {
            let (position, backlog) = match from {
                WatchFrom::Now => (
                    r.events.next_seq,
                    Backlog {
                        events: Vec::new(),
                        through: r.events.next_seq,
                    },
                ),
                WatchFrom::Kept { after } => {
                    let position = after.max(r.events.kept_after(tenant));
                    (position, r.events.kept_since(tenant, position))
                }
                WatchFrom::After(after) => (after, r.events.since(tenant, after)?),
            };
            Ok(Watch::new(tenant, pool, position, backlog, live))
        })
    }

    /// The next event of `watch`: `Ok(None)` when the manager is gone,
    /// `EventsDropped` when the watch fell so far behind that events it
    /// had not seen were dropped.
    pub async fn next_event(
        &self,
        watch: &mut Watch,
    ) -> Result<Option<Arc<EventRecord>>, ManagerError> {
        watch
            .next(|tenant, after| Ok(self.registry()?.events.since(tenant, after)?))
            .await
    }

    /// Creates a single-use join token for `tenant`. Returns the token and
    /// its expiry (ms since the epoch).
    pub async fn create_token(
        &self,
        tenant: &str,
        ttl_seconds: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<(String, u64), ManagerError> {
        let ttl = match ttl_seconds {
            0 => self.config.token_default_ttl_seconds,
            t if t > self.config.token_max_ttl_seconds => {
                return Err(ManagerError::Invalid {
                    field: "ttl_seconds",
                    why: format!(
                        "{t} is more than the maximum {}",
                        self.config.token_max_ttl_seconds
                    ),
                });
            }
            t => t,
        };
        validate_labels(&labels)?;
        let token = format!("{TOKEN_PREFIX}{}", crate::random::hex_token(TOKEN_BYTES));
        let now = now_ms();
        let expires = now + u64::from(ttl) * 1000;
        let record = TokenRecord {
            tenant: tenant.to_string(),
            labels,
            created_at_ms: now,
            expires_at_ms: expires,
            used_by: None,
        };
        self.mutate_async(|r| {
            r.add_token(&token, record, now);
            Ok(())
        })
        .await?;
        Ok((token, expires))
    }

    /// Redeems a join token: signs the node's CSR and records the node.
    ///
    /// A forced re-enrollment of a pool member also re-issues its member
    /// certificate for the new key and bumps the pool generation, in the
    /// same registry change; then the node's old stream is ended and every
    /// member gets the new assignment (`reissue_member_for_new_key`).
    pub fn enroll(
        &self,
        token: &str,
        node_id: &str,
        csr_pem: &str,
        force: bool,
    ) -> Result<EnrollGrant, ManagerError> {
        let validity = time::Duration::hours(i64::from(self.config.node_cert_validity_hours));
        let (grant, replaces, push) = self.mutate(|r| {
            let now = now_ms();
            let plan = r.plan_enroll(token, node_id, force, now)?;
            let identity = Identity::Node {
                domain: self.config.trust_domain.clone(),
                tenant: plan.tenant.clone(),
                node_id: plan.node_id.clone(),
            };
            let issued = self.ca.sign_node_csr(csr_pem, &identity, validity)?;
            r.apply_enroll(&plan, &issued.serial_hex, &issued.cert_pem, now);
            r.events.push(
                EventRecord::new(&plan.tenant, "", EventKind::NodeEnrolled)
                    .node(&plan.node_id, 0)
                    .message(if plan.replaces {
                        "enrolled again (--force)"
                    } else {
                        "enrolled"
                    }),
                now,
            );
            let push = if plan.replaces {
                self.reissue_member_for_new_key(r, &plan.node_id, &issued.cert_pem, now)?
            } else {
                Vec::new()
            };
            let grant = EnrollGrant {
                node_id: plan.node_id.clone(),
                tenant: plan.tenant.clone(),
                trust_domain: self.config.trust_domain.clone(),
                cert_pem: issued.cert_pem,
                ca_pem: self.ca.cert_pem().to_string(),
                labels: plan.labels,
            };
            Ok((grant, plan.replaces, push))
        })?;
        tracing::info!(node = %grant.node_id, tenant = %grant.tenant, force, "node enrolled");
        if replaces {
            // The old stream belongs to the replaced certificate: end it
            // before the new assignment (for the new key) goes out.
            self.end_stream(&grant.node_id)?;
        }
        self.push_assignments(push.iter().map(String::as_str))?;
        Ok(grant)
    }

    /// Checks that a verified node certificate is the node's current one:
    /// the node exists in that tenant and the serial matches (a certificate
    /// replaced by `join --force` stops working at once).
    pub fn authorize_node(
        &self,
        tenant: &str,
        node_id: &str,
        cert_serial: &str,
    ) -> Result<(), ManagerError> {
        let r = self.registry()?;
        match r.node_of_tenant(tenant, node_id) {
            Some(n) if n.cert_serial == cert_serial => Ok(()),
            Some(_) => Err(ManagerError::PermissionDenied(
                "this node certificate has been replaced".into(),
            )),
            None => Err(ManagerError::PermissionDenied(
                "no such enrolled node".into(),
            )),
        }
    }

    /// Registers a new stream for `node_id` (replacing an older one) and
    /// records its hello. Returns the connection id and the live handle.
    pub async fn open_stream(
        &self,
        node_id: &str,
        hello: &Hello,
    ) -> Result<(u64, Arc<LiveNode>), ManagerError> {
        let changed = self.registry()?.hello_changes(node_id, hello);
        let live = self.live_node(node_id)?;
        if changed {
            self.mutate_async(|r| {
                r.apply_hello(node_id, hello);
                Ok(())
            })
            .await?;
            // Peers learn the new peer address through the membership.
            self.push_pool_of(node_id)?;
        }
        // A failed node that comes back is fenced before it learns its
        // (now empty) assignment.
        self.fence_if_failed(node_id).await?;
        // The session sends this first thing (and every later change).
        live.set_assignment(self.assignment_for(node_id)?);
        let conn_id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        {
            let mut l = live.lock();
            l.conn_id = Some(conn_id);
            l.touch();
        }
        // An older session of this node ends now (not at its next message).
        live.stream_change.notify_waiters();
        tracing::info!(node = %node_id, conn_id, peer = %hello.peer_address, "agent connected");
        Ok((conn_id, live))
    }

    /// Marks the stream closed, unless a newer one already replaced it.
    pub fn close_stream(&self, node_id: &str, live: &LiveNode, conn_id: u64) {
        let mut l = live.lock();
        if l.conn_id == Some(conn_id) {
            l.conn_id = None;
            l.disconnected_at_ms = now_ms();
            l.disconnected_at = Some(Instant::now());
            drop(l);
            live.stream_change.notify_waiters();
            // What it said of its peers is no longer current.
            self.liveness.forget_reporter(node_id);
            // A member without its stream is suspect at once.
            self.watch_node(node_id, Instant::now());
            tracing::info!(node = %node_id, conn_id, "agent disconnected");
        }
    }

    /// Ends the node's current stream, if it has one, at once: its session
    /// stops (`LiveNode::ended`) and the agent must connect again, which a
    /// replaced certificate no longer can.
    pub(crate) fn end_stream(&self, node_id: &str) -> Result<(), ManagerError> {
        let live = self.live_node(node_id)?;
        let current = live.lock().conn_id;
        if let Some(conn_id) = current {
            tracing::info!(node = %node_id, conn_id, "ending the stream of a re-enrolled node");
            self.close_stream(node_id, &live, conn_id);
        }
        Ok(())
    }

    /// Has the failure detector look at `node_id` at `at` at the latest
    /// (at once if `at` has passed).
    pub(crate) fn watch_node(&self, node_id: &str, at: Instant) {
        self.watchlist
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .arm(node_id, at);
        if at <= Instant::now() {
            self.detector_wake.notify_one();
        }
    }

    /// The connection facts the failure detector needs (no copy of the
    /// node's samples or reports).
    pub(crate) fn health(&self, node_id: &str) -> Result<crate::liveness::Health, ManagerError> {
        Ok(self
            .live
            .read()
            .map_err(|_| ManagerError::Poisoned)?
            .get(node_id)
            .map(|l| {
                let l = l.lock();
                crate::liveness::Health {
                    connected: l.conn_id.is_some(),
                    last_seen: l.last_seen_at,
                    disconnected_at: l.disconnected_at,
                }
            })
            .unwrap_or_default())
    }

    pub(crate) fn live_node(&self, node_id: &str) -> Result<Arc<LiveNode>, ManagerError> {
        if let Some(l) = self
            .live
            .read()
            .map_err(|_| ManagerError::Poisoned)?
            .get(node_id)
        {
            return Ok(l.clone());
        }
        let mut map = self.live.write().map_err(|_| ManagerError::Poisoned)?;
        Ok(map.entry(node_id.to_string()).or_default().clone())
    }

    /// Live data of a node (default if it never connected).
    pub(crate) fn live_data(&self, node_id: &str) -> Result<LiveData, ManagerError> {
        Ok(self
            .live
            .read()
            .map_err(|_| ManagerError::Poisoned)?
            .get(node_id)
            .map(|l| l.snapshot())
            .unwrap_or_default())
    }

    fn view(&self, record: &NodeRecord) -> Result<NodeView, ManagerError> {
        let live = self.live_data(&record.node_id)?;
        Ok(NodeView {
            record: record.clone(),
            live,
        })
    }

    /// The tenant's nodes, ordered by id.
    pub fn list_nodes(&self, tenant: &str) -> Result<Vec<NodeView>, ManagerError> {
        let records: Vec<NodeRecord> = self
            .registry()?
            .nodes
            .values()
            .filter(|n| n.tenant == tenant)
            .cloned()
            .collect();
        records.iter().map(|r| self.view(r)).collect()
    }

    /// One page of the tenant's nodes (see `node_list`): the registry is
    /// walked from the cursor on, and only the page's nodes are copied.
    pub fn list_nodes_page(
        &self,
        tenant: &str,
        query: &NodeQuery,
    ) -> Result<NodePage, ManagerError> {
        // Lock order as everywhere: registry, then the live map (read),
        // then one node's live data at a time.
        let registry = self.registry()?;
        let live = self.live.read().map_err(|_| ManagerError::Poisoned)?;
        let nodes = registry.nodes.after(query.after.as_deref());
        let page = crate::node_list::page(nodes, tenant, query, |id| {
            live.get(id).is_some_and(|l| l.is_connected())
        });
        let nodes = page
            .nodes
            .into_iter()
            .map(|record| NodeView {
                record: record.clone(),
                live: live
                    .get(&record.node_id)
                    .map(|l| l.snapshot())
                    .unwrap_or_default(),
            })
            .collect();
        Ok(NodePage {
            nodes,
            next_after: page.next_after,
        })
    }

    /// How many of the tenant's nodes (only `pool`'s members, if given) are
    /// in each state. Copies nothing.
    pub fn node_summary(
        &self,
        tenant: &str,
        pool: Option<&str>,
    ) -> Result<NodeCounts, ManagerError> {
        let registry = self.registry()?;
        let live = self.live.read().map_err(|_| ManagerError::Poisoned)?;
        Ok(crate::node_list::count(
            registry.nodes.values(),
            tenant,
            pool,
            |id| live.get(id).is_some_and(|l| l.is_connected()),
        ))
    }

    /// One of the tenant's nodes; another tenant's node is "not found".
    pub fn get_node(&self, tenant: &str, node_id: &str) -> Result<NodeView, ManagerError> {
        let record = self
            .registry()?
            .node_of_tenant(tenant, node_id)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(format!("node {node_id:?} not found")))?;
        self.view(&record)
    }
}

/// Label keys are names (1-63 of `[a-z0-9-./]`); values at most 253 bytes.
fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), ManagerError> {
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'/' | b'_')
            });
        if !key_ok {
            return Err(ManagerError::Invalid {
                field: "labels",
                why: format!("label key {k:?} must be 1-63 characters of [a-z0-9-._/]"),
            });
        }
        if v.len() > 253 || v.chars().any(char::is_control) {
            return Err(ManagerError::Invalid {
                field: "labels",
                why: format!("label {k:?}: value must be at most 253 printable characters"),
            });
        }
    }
    Ok(())
}
