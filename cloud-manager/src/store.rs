//! Persistence of the manager's registry.
//!
//! `Store` is the one seam to the storage backend. The embedded default,
//! `RedbStore`, is a redb database (`state.redb` in the data directory):
//! pure Rust (no server, no C library to install), ACID transactions with
//! an fsync at each commit, and a crash at any point leaves the last
//! committed state. A change writes only the records it touched (one row
//! per token, node, pool and event, as JSON: its `WriteSet`, built from
//! the keys the change marked, never by comparing tables), so the cost of
//! a change does not grow with the fleet. Several changes can be committed
//! in one transaction (group commit, see `writer`). Nothing is written per
//! telemetry sample. Events are
//! keyed by their (global) seq; each tenant's `dropped_through` has its own
//! row, so a restarted manager still reports a loss it cannot replay.
//!
//! Pool rows hold the pool CA's private key, so they are sealed at rest
//! like in etcd (`sealing`: ChaCha20-Poly1305 with `DATA_DIR/store.key`,
//! 0600), on top of the file itself being owner-only. A store written
//! before rows were sealed is sealed in place when it is opened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::registry::Registry;
use crate::sealing::Sealer;

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {why}")]
    Backend { path: PathBuf, why: String },
    #[error("store {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error("could not encode a record: {0}")]
    Encode(String),
    #[error(
        "another cloud-manager is using {dir} (its store {path} is locked); stop it first, or give this one another --data-dir"
    )]
    Locked { dir: PathBuf, path: PathBuf },
}

pub trait Store: Send + Sync + 'static {
    /// The saved registry, or an empty one on first start.
    fn load(&self) -> Result<Registry, StoreError>;
    /// Durably applies `changes`, in order, in one transaction: all of
    /// them or none.
    fn commit(&self, changes: &[&WriteSet]) -> Result<(), StoreError>;
    /// Rows one `commit` may carry (the writer batches changes up to it;
    /// a single larger change is still handed over, for the store to
    /// refuse with its reason).
    fn max_batch_rows(&self) -> usize {
        usize::MAX
    }
}

/// Key and encoded row (`None`: removed) of one table.
pub(crate) type Rows = Vec<(String, Option<Vec<u8>>)>;

/// The rows one registry change writes, encoded: built from the keys the
/// change touched, so its size is the change's, never the fleet's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteSet {
    /// Key and new row (`None`: removed), per table.
    tokens: Rows,
    nodes: Rows,
    pools: Rows,
    /// Events recorded by the change.
    events: Vec<(u64, Vec<u8>)>,
    /// Events the change pushed out of their tenant's ring.
    events_removed: Vec<u64>,
    /// Tenants whose newest dropped seq moved.
    dropped: Vec<(String, u64)>,
    next_seq: u64,
}

impl WriteSet {
    /// What turns `before` into `after`, where `after` is `before` plus one
    /// change made since `Registry::clear_touched`.
    pub fn of(before: &Registry, after: &Registry) -> Result<WriteSet, StoreError> {
        fn rows<V: Clone + Serialize>(table: &crate::table::Table<V>) -> Result<Rows, StoreError> {
            table
                .touched()
                .map(|k| Ok((k.clone(), table.get(k).map(encode).transpose()?)))
                .collect()
        }
        let mut w = WriteSet {
            tokens: rows(&after.tokens)?,
            nodes: rows(&after.nodes)?,
            pools: rows(&after.pools)?,
            next_seq: after.events.next_seq,
            ..WriteSet::default()
        };
        for tenant in after.events.touched() {
            let Some(ring) = after.events.tenant(tenant) else {
                continue;
            };
            for e in ring
                .events
                .iter()
                .rev()
                .take_while(|e| e.seq > before.events.next_seq)
            {
                w.events.push((e.seq, encode(&**e)?));
            }
            let old = before.events.tenant(tenant);
            let old_dropped = old.map_or(0, |o| o.dropped_through);
            if let Some(old) = old {
                w.events_removed.extend(
                    old.events
                        .iter()
                        .take_while(|e| e.seq <= ring.dropped_through)
                        .map(|e| e.seq),
                );
            }
            if ring.dropped_through != old_dropped {
                w.dropped.push((tenant.clone(), ring.dropped_through));
            }
        }
        w.events.sort_by_key(|(seq, _)| *seq);
        Ok(w)
    }

    /// Key and new row (`None`: removed) per table: tokens, nodes, pools.
    pub(crate) fn tables(&self) -> [(&'static str, &Rows); 3] {
        [
            ("tokens", &self.tokens),
            ("nodes", &self.nodes),
            ("pools", &self.pools),
        ]
    }

    /// Events recorded by the change (seq, encoded).
    pub(crate) fn events(&self) -> &[(u64, Vec<u8>)] {
        &self.events
    }

    /// Seqs of events the change pushed out of their tenant's ring.
    pub(crate) fn events_removed(&self) -> &[u64] {
        &self.events_removed
    }

    /// Tenants whose newest dropped seq moved, and to what.
    pub(crate) fn dropped(&self) -> &[(String, u64)] {
        &self.dropped
    }

    /// The event counter after the change.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// How many rows it writes or removes (besides the seq counter).
    pub fn rows(&self) -> usize {
        self.tokens.len()
            + self.nodes.len()
            + self.pools.len()
            + self.events.len()
            + self.events_removed.len()
            + self.dropped.len()
    }
}

fn encode<T: Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Encode(e.to_string()))
}

const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
const POOLS: TableDefinition<&str, &[u8]> = TableDefinition::new("pools");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
/// Tenant -> the newest seq of its events that was dropped.
const EVENTS_DROPPED: TableDefinition<&str, u64> = TableDefinition::new("events_dropped");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_EVENT_SEQ: &str = "next_event_seq";
/// Events up to this seq are unknown for every tenant (see `EventLog::floor`).
/// Written once, when a store is first opened by a version with per-tenant
/// rings.
const EVENTS_FLOOR: &str = "events_floor";

pub struct RedbStore {
    db: redb::Database,
    path: PathBuf,
    sealer: Sealer,
}

/// The sealing name (associated data) of pool row `key`: a sealed row
/// opens only as the row it was written as.
fn pool_row_name(key: &str) -> String {
    format!("pools/{key}")
}

impl RedbStore {
    /// Opens (or creates) `state.redb` in `data_dir`. The database is
    /// locked: a second manager on the same directory fails here.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("state.redb");
        let sealer = Sealer::load_or_create(data_dir).map_err(|e| StoreError::Backend {
            path: path.clone(),
            why: e.to_string(),
        })?;
        // It holds the pool CAs' private keys: owner-only, made so before
        // redb writes anything, and made so again for a store from a
        // version that left it world-readable.
        let private = {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&path)
                .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
        };
        private.map_err(|e| StoreError::Backend {
            path: path.clone(),
            why: format!("cannot create it owner-only: {e}"),
        })?;
        let db = redb::Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked {
                dir: data_dir.to_path_buf(),
                path: path.clone(),
            },
            e => StoreError::Backend {
                path: path.clone(),
                why: e.to_string(),
            },
        })?;
        let mut store = RedbStore { db, path, sealer };
        // Create every table once so that readers never meet a missing one.
        store.write(|txn| {
            txn.open_table(TOKENS)?;
            txn.open_table(NODES)?;
            txn.open_table(POOLS)?;
            txn.open_table(EVENTS)?;
            txn.open_table(EVENTS_DROPPED)?;
            let mut meta = txn.open_table(META)?;
            if meta.get(EVENTS_FLOOR)?.is_none() {
                // A store from a version that kept one ring for all tenants
                // (or a new one): it does not say whose events it dropped,
                // so everything before its oldest kept event counts as lost
                // for every tenant.
                let events = txn.open_table(EVENTS)?;
                let floor = match events.first()? {
                    Some((seq, _)) => seq.value().saturating_sub(1),
                    None => meta.get(NEXT_EVENT_SEQ)?.map_or(0, |v| v.value()),
                };
                meta.insert(EVENTS_FLOOR, floor)?;
            }
            Ok(())
        })?;
        store.seal_plain_pool_rows()?;
        Ok(store)
    }

    /// Seals the pool rows a version before sealing wrote in the clear.
    fn seal_plain_pool_rows(&mut self) -> Result<(), StoreError> {
        let plain: Vec<(String, Vec<u8>)> = {
            let txn = self.db.begin_read().map_err(|e| self.backend(e))?;
            let table = txn.open_table(POOLS).map_err(|e| self.backend(e))?;
            let mut plain = Vec::new();
            for row in table.iter().map_err(|e| self.backend(e))? {
                let (k, v) = row.map_err(|e| self.backend(e))?;
                if !crate::sealing::is_sealed(v.value()) {
                    plain.push((k.value().to_string(), v.value().to_vec()));
                }
            }
            plain
        };
        if plain.is_empty() {
            return Ok(());
        }
        self.write(|txn| {
            let mut pools = txn.open_table(POOLS)?;
            for (k, v) in &plain {
                let sealed = self.sealer.seal(&pool_row_name(k), v);
                pools.insert(k.as_str(), sealed.as_slice())?;
            }
            Ok(())
        })?;
        // The old pages with the keys in the clear are free now; compaction
        // moves live pages down and cuts the file, dropping most of them.
        if let Err(e) = self.db.compact() {
            tracing::warn!(error = %e, "could not compact the store after sealing it");
        }
        tracing::info!(rows = plain.len(), path = %self.path.display(), "sealed pool rows written in the clear by an older version");
        Ok(())
    }

    fn backend(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.path.clone(),
            why: e.to_string(),
        }
    }

    fn corrupt(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            why: e.to_string(),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.backend(e))?;
        f(&txn).map_err(|e| self.backend(e))?;
        txn.commit().map_err(|e| self.backend(e))
    }

    /// Every row of `def`; `sealed` rows are opened first.
    fn read_map<V: DeserializeOwned>(
        &self,
        txn: &redb::ReadTransaction,
        def: TableDefinition<&str, &[u8]>,
        sealed: bool,
    ) -> Result<BTreeMap<String, V>, StoreError> {
        let table = txn.open_table(def).map_err(|e| self.backend(e))?;
        let mut out = BTreeMap::new();
        for row in table.iter().map_err(|e| self.backend(e))? {
            let (k, v) = row.map_err(|e| self.backend(e))?;
            let key = k.value().to_string();
            let value = if sealed {
                let plain = self
                    .sealer
                    .open(&pool_row_name(&key), v.value())
                    .map_err(|e| self.corrupt(e))?;
                serde_json::from_slice(&plain)
            } else {
                serde_json::from_slice(v.value())
            }
            .map_err(|e| self.corrupt(format!("{key}: {e}")))?;
            out.insert(key, value);
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn load(&self) -> Result<Registry, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.backend(e))?;
        let mut r = Registry {
            tokens: self.read_map(&txn, TOKENS, false)?.into_iter().collect(),
            nodes: self.read_map(&txn, NODES, false)?.into_iter().collect(),
            pools: self.read_map(&txn, POOLS, true)?.into_iter().collect(),
            ..Registry::default()
        };
        let events = txn.open_table(EVENTS).map_err(|e| self.backend(e))?;
        // Rows are in seq order, so every tenant's ring comes back in order.
        for row in events.iter().map_err(|e| self.backend(e))? {
            let (_, v) = row.map_err(|e| self.backend(e))?;
            r.events
                .restore(serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e))?);
        }
        let dropped = txn
            .open_table(EVENTS_DROPPED)
            .map_err(|e| self.backend(e))?;
        for row in dropped.iter().map_err(|e| self.backend(e))? {
            let (tenant, seq) = row.map_err(|e| self.backend(e))?;
            r.events.restore_dropped(tenant.value(), seq.value());
        }
        let meta = txn.open_table(META).map_err(|e| self.backend(e))?;
        let number = |key| -> Result<u64, StoreError> {
            Ok(meta
                .get(key)
                .map_err(|e| self.backend(e))?
                .map_or(0, |v| v.value()))
        };
        r.events.next_seq = number(NEXT_EVENT_SEQ)?;
        r.events.floor = number(EVENTS_FLOOR)?;
        Ok(r)
    }

    fn commit(&self, changes: &[&WriteSet]) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut tokens = txn.open_table(TOKENS)?;
            let mut nodes = txn.open_table(NODES)?;
            let mut pools = txn.open_table(POOLS)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut dropped = txn.open_table(EVENTS_DROPPED)?;
            let mut next_seq = None;
            for w in changes {
                for (table, rows) in [(&mut tokens, &w.tokens), (&mut nodes, &w.nodes)] {
                    for (k, v) in rows {
                        match v {
                            Some(v) => table.insert(k.as_str(), v.as_slice())?,
                            None => table.remove(k.as_str())?,
                        };
                    }
                }
                for (k, v) in &w.pools {
                    match v {
                        Some(v) => {
                            let sealed = self.sealer.seal(&pool_row_name(k), v);
                            pools.insert(k.as_str(), sealed.as_slice())?
                        }
                        None => pools.remove(k.as_str())?,
                    };
                }
                for (seq, e) in &w.events {
                    events.insert(*seq, e.as_slice())?;
                }
                for seq in &w.events_removed {
                    events.remove(*seq)?;
                }
                for (tenant, seq) in &w.dropped {
                    dropped.insert(tenant.as_str(), *seq)?;
                }
                next_seq = Some(w.next_seq);
            }
            if let Some(seq) = next_seq {
                txn.open_table(META)?.insert(NEXT_EVENT_SEQ, seq)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventKind, EventRecord};
    use crate::registry::TokenRecord;
    use redb::ReadableTableMetadata;

    fn token(tenant: &str) -> TokenRecord {
        TokenRecord {
            tenant: tenant.into(),
            labels: Default::default(),
            created_at_ms: 1,
            expires_at_ms: u64::MAX / 2,
            used_by: None,
        }
    }

    /// Applies `f` to a copy of `current` and commits what it touched.
    fn change(store: &RedbStore, current: &mut Registry, f: impl FnOnce(&mut Registry)) {
        let mut next = current.clone();
        next.clear_touched();
        f(&mut next);
        let w = WriteSet::of(current, &next).unwrap();
        store.commit(&[&w]).unwrap();
        next.clear_touched();
        *current = next;
    }

    #[test]
    fn the_state_file_is_owner_only_even_if_it_was_not() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mode = || std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        drop(RedbStore::open(dir.path()).unwrap());
        assert_eq!(mode(), 0o600);
        // A store an earlier version left world-readable is closed down.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        assert_eq!(mode(), 0o600);
        assert_eq!(store.load().unwrap(), Registry::default());
    }

    /// The raw value of pool row `key` in the file.
    fn raw_pool_row(store: &RedbStore, key: &str) -> Vec<u8> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(POOLS).unwrap();
        table.get(key).unwrap().unwrap().value().to_vec()
    }

    #[test]
    fn pool_rows_are_sealed_at_rest_and_old_plain_rows_get_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = b"{\"key_pem\":\"-----BEGIN PRIVATE KEY-----\"}";
        let store = RedbStore::open(dir.path()).unwrap();
        // A row as a version before sealing wrote it.
        store
            .write(|txn| {
                txn.open_table(POOLS)?.insert("t/old", secret.as_slice())?;
                Ok(())
            })
            .unwrap();
        let w = WriteSet {
            pools: vec![("t/new".into(), Some(secret.to_vec()))],
            ..WriteSet::default()
        };
        store.commit(&[&w]).unwrap();
        assert!(is_sealed_as(&store, "t/new", secret));
        drop(store);
        let store = RedbStore::open(dir.path()).unwrap();
        assert!(is_sealed_as(&store, "t/old", secret));
        assert!(is_sealed_as(&store, "t/new", secret));
        drop(store);
        let file = std::fs::read(dir.path().join("state.redb")).unwrap();
        assert!(
            !file.windows(11).any(|w| w == b"PRIVATE KEY"),
            "a private key is in state.redb in the clear"
        );
        // Another manager's store.key cannot open the rows: a clear error.
        std::fs::write(
            dir.path().join("store.key"),
            format!("{}\n", "ab".repeat(32)),
        )
        .unwrap();
        let err = RedbStore::open(dir.path())
            .unwrap()
            .load()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("store.key"), "{err}");
    }

    fn is_sealed_as(store: &RedbStore, key: &str, plain: &[u8]) -> bool {
        let raw = raw_pool_row(store, key);
        crate::sealing::is_sealed(&raw)
            && store.sealer.open(&pool_row_name(key), &raw).unwrap() == plain
    }

    #[test]
    fn round_trip_of_changes_and_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut r = store.load().unwrap();
        assert_eq!(r, Registry::default());
        change(&store, &mut r, |r| {
            r.add_token("ept_a", token("t"), 0);
            r.add_token("ept_b", token("t"), 0);
            r.events
                .push(EventRecord::new("t", "p", EventKind::PoolCreated), 5);
        });
        change(&store, &mut r, |r| {
            r.tokens.remove(&crate::registry::hash_token("ept_a"));
            r.events
                .push(EventRecord::new("t", "p", EventKind::PoolDeleted), 6);
        });
        drop(store);
        // A new process sees exactly the last committed state.
        let reopened = RedbStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load().unwrap(), r);
    }

    #[test]
    fn a_change_writes_only_what_it_touched_whatever_the_fleet() {
        let mut r = Registry::default();
        for i in 0..5000 {
            r.nodes.insert(
                format!("n{i:05}"),
                crate::registry::NodeRecord {
                    node_id: format!("n{i:05}"),
                    tenant: "t".into(),
                    labels: Default::default(),
                    cert_serial: String::new(),
                    enrolled_at_ms: 0,
                    state: crate::model::NodeState::Free,
                    peer_address: String::new(),
                    capacity: Default::default(),
                    agent_version: String::new(),
                    hostname: String::new(),
                    cert_pem: String::new(),
                    pool: String::new(),
                    slot: 0,
                },
            );
        }
        r.clear_touched();
        let mut next = r.clone();
        if let Some(n) = next.nodes.get_mut("n00042") {
            n.hostname = "h".into();
        }
        next.events
            .push(EventRecord::new("t", "", EventKind::NodeEnrolled), 1);
        let w = WriteSet::of(&r, &next).unwrap();
        assert_eq!(w.rows(), 2, "{w:?}");
        assert_eq!(w.nodes[0].0, "n00042");
    }

    #[test]
    fn a_batch_commits_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let base = Registry::default();
        let mut one = base.clone();
        one.add_token("ept_a", token("t"), 0);
        let w1 = WriteSet::of(&base, &one).unwrap();
        one.clear_touched();
        let mut two = one.clone();
        two.add_token("ept_b", token("t"), 0);
        let w2 = WriteSet::of(&one, &two).unwrap();
        store.commit(&[&w1, &w2]).unwrap();
        assert_eq!(store.load().unwrap(), two);
    }

    #[test]
    fn each_tenant_trims_its_own_events_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut current = Registry::default();
        current.events.set_limit(3);
        let push = |tenant: &str, current: &mut Registry| {
            change(&store, current, |r| {
                r.events
                    .push(EventRecord::new(tenant, "", EventKind::NodeEnrolled), 1)
            });
        };
        push("quiet", &mut current);
        for _ in 0..10 {
            push("busy", &mut current);
        }
        let mut loaded = store.load().unwrap();
        loaded.events.set_limit(3);
        assert_eq!(loaded, current);
        assert_eq!(loaded.events.kept_after("busy"), 8);
        assert_eq!(loaded.events.kept("quiet").events.len(), 1);
        // Only the kept events have rows.
        let txn = store.db.begin_read().unwrap();
        assert_eq!(txn.open_table(EVENTS).unwrap().len().unwrap(), 4);
    }

    #[test]
    fn a_store_from_one_global_ring_counts_its_trimmed_events_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut r = Registry::default();
        change(&store, &mut r, |r| {
            for _ in 0..5 {
                r.events
                    .push(EventRecord::new("t", "", EventKind::NodeEnrolled), 1);
            }
        });
        // What an older version leaves: seqs 1 and 2 trimmed, no floor.
        store
            .write(|txn| {
                let mut events = txn.open_table(EVENTS)?;
                events.remove(1)?;
                events.remove(2)?;
                txn.open_table(META)?.remove(EVENTS_FLOOR)?;
                Ok(())
            })
            .unwrap();
        drop(store);
        let loaded = RedbStore::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(loaded.events.floor, 2);
        assert_eq!(loaded.events.since("t", 1).unwrap_err().oldest_kept, 3);
        assert_eq!(loaded.events.since("other", 1).unwrap_err().resume_after, 2);
        assert_eq!(loaded.events.since("t", 2).unwrap().events.len(), 3);
    }

    #[test]
    fn a_second_manager_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        assert!(RedbStore::open(dir.path()).is_err());
    }
}
