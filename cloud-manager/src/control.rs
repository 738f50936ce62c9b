//! The manager's shared core, which every component (`pools`, `failover`,
//! `enrollment`, `streams`, `nodes`) builds on: the configuration, the CA,
//! the durable registry with its single store writer, the events, and the
//! table of live nodes. It knows none of the components. No tonic or prost.
//!
//! Locking: the durable registry is read as an immutable snapshot (an
//! `Arc`, no lock held while reading) and changed only through `mutate`,
//! whose commit runs on the store writer's thread (`writer`); per-message
//! work (telemetry, heartbeats, app reports that change nothing) touches
//! only the sending node's own `LiveNode`, found once when its stream opens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use tokio::sync::broadcast;

use crate::ca::{Ca, CaError};
use crate::config::ManagerConfig;
use crate::events::{Backlog, EventRecord, EventsDropped, Watch, WatchFrom};
use crate::live::{LiveData, LiveNode};
use crate::metrics::Metrics;
use crate::node_key::NodeKey;
use crate::pool::PoolError;
use crate::registry::{EnrollError, Registry};
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

/// The live nodes by node key (an entry is made the first time a node is
/// looked up, and kept).
pub(crate) type LiveMap = HashMap<NodeKey, Arc<LiveNode>>;

pub struct Control {
    pub(crate) config: ManagerConfig,
    pub(crate) ca: Ca,
    /// The durable registry: committed snapshot, prepared head, writer.
    durable: Arc<Durable>,
    live: RwLock<LiveMap>,
    /// `DATA_DIR/revoked-certs`, for the failure detector: a member whose
    /// node certificate is revoked is failed over without its peers' word.
    revocations: crate::revocations::Revocations,
    /// The manager's metric families (`crate::metrics`).
    pub(crate) metrics: Metrics,
    /// Declared last: dropping the core stops the writer after the rest.
    /// `stop_writer` stops it earlier (a graceful shutdown).
    writer: Mutex<Option<Writer>>,
}

impl Control {
    /// Loads the registry from `store` and starts its writer.
    pub fn new(config: ManagerConfig, ca: Ca, store: Box<dyn Store>) -> Result<Self, ManagerError> {
        let mut registry = store.load()?;
        registry.events.set_limit(config.events_per_tenant as usize);
        let metrics = Metrics::default();
        let (durable, writer) =
            Durable::start_measured(registry, store, broadcast::channel(1024).0, metrics.clone())
                .map_err(|e| StoreError::Backend {
                path: config.data_dir.join("state.redb"),
                why: format!("could not start the store writer: {e}"),
            })?;
        // Node rows of a version that keyed nodes by id alone move to their
        // tenant's key, in one commit before anything else reads them.
        let (moved, pending) = durable.prepare(true, |r| Ok::<_, ManagerError>(r.rekey_nodes()))?;
        pending.wait()?;
        if moved > 0 {
            tracing::info!(nodes = moved, "node rows moved to per-tenant keys");
        }
        Ok(Control {
            ca,
            durable,
            metrics,
            writer: Mutex::new(Some(writer)),
            live: RwLock::new(HashMap::new()),
            revocations: crate::revocations::Revocations::new(&config.data_dir),
            config,
        })
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// The manager's metric families.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
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

    /// The connection facts the failure detector needs (no copy of the
    /// node's samples or reports).
    pub(crate) fn health(&self, node: &NodeKey) -> Result<crate::liveness::Health, ManagerError> {
        Ok(self
            .live
            .read()
            .map_err(|_| ManagerError::Poisoned)?
            .get(node)
            .map(|l| l.health())
            .unwrap_or_default())
    }

    /// Finishes the changes already handed to the store writer and stops
    /// it, closing the store (an etcd store gives its prefix back at once).
    /// Changes made afterwards fail. For the end of a graceful shutdown.
    pub(crate) fn stop_writer(&self) {
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(writer);
    }

    /// The node's live handle, made on first use.
    pub(crate) fn live_node(&self, node: &NodeKey) -> Result<Arc<LiveNode>, ManagerError> {
        if let Some(l) = self
            .live
            .read()
            .map_err(|_| ManagerError::Poisoned)?
            .get(node)
        {
            return Ok(l.clone());
        }
        let mut map = self.live.write().map_err(|_| ManagerError::Poisoned)?;
        Ok(map.entry(node.clone()).or_default().clone())
    }

    /// Live data of a node (default if it never connected).
    pub(crate) fn live_data(&self, node: &NodeKey) -> Result<LiveData, ManagerError> {
        Ok(self
            .live
            .read()
            .map_err(|_| ManagerError::Poisoned)?
            .get(node)
            .map(|l| l.snapshot())
            .unwrap_or_default())
    }

    /// Whether `node`'s current identity certificate has been revoked
    /// (`cloud-manager node revoke`).
    pub(crate) fn node_revoked(&self, node: &NodeKey) -> bool {
        self.registry()
            .ok()
            .and_then(|r| r.node(node).map(|n| n.cert_serial.clone()))
            .is_some_and(|serial| self.revocations.is_revoked(&serial))
    }

    /// The live map, read-locked: for walks over many nodes. Lock order as
    /// everywhere: registry first, then this, then one node's live data at
    /// a time.
    pub(crate) fn live_nodes(&self) -> Result<RwLockReadGuard<'_, LiveMap>, ManagerError> {
        self.live.read().map_err(|_| ManagerError::Poisoned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ManagerConfig;
    use crate::registry::{NodeRecord, Registry};
    use crate::store::{RedbStore, WriteSet};

    fn node(tenant: &str, id: &str) -> NodeRecord {
        NodeRecord {
            cert_serial: "ab".into(),
            enrolled_at_ms: 1,
            ..NodeRecord::free_for_tests(tenant, id)
        }
    }

    #[test]
    fn node_rows_of_an_older_version_move_to_per_tenant_keys_at_start() {
        let dir = tempfile::tempdir().unwrap();
        // Rows as a version with global node ids stored them.
        let store = RedbStore::open(dir.path()).unwrap();
        let mut old = Registry::default();
        old.nodes.insert("n1".into(), node("acme", "n1"));
        old.nodes.insert("n2".into(), node("other", "n2"));
        store
            .commit(&[&WriteSet::of(&Registry::default(), &old).unwrap()])
            .unwrap();
        drop(store);

        let config = ManagerConfig {
            data_dir: dir.path().to_path_buf(),
            ..ManagerConfig::default()
        };
        let ca = Ca::generate(&config.trust_domain).unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let control = Control::new(config, ca, Box::new(store)).unwrap();
        let r = control.registry().unwrap();
        let keys: Vec<&str> = r.nodes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["acme/n1", "other/n2"]);
        assert!(r.node_of_tenant("acme", "n1").is_some());
        drop(r);
        drop(control);

        // And durably so: the store holds only the new keys.
        let reopened = RedbStore::open(dir.path()).unwrap().load().unwrap();
        let keys: Vec<&str> = reopened.nodes.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["acme/n1", "other/n2"]);
    }
}
