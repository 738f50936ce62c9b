//! Persistence of the manager's registry.
//!
//! `Store` is the one seam to the storage backend. The embedded default,
//! `RedbStore`, is a redb database (`state.redb` in the data directory):
//! pure Rust (no server, no C library to install), ACID transactions with
//! an fsync at each commit, and a crash at any point leaves the last
//! committed state. Each change writes only the records that differ
//! between the registry before and after it (one row per token, node, pool
//! and event, as JSON), in one transaction, so the cost of a change does not
//! grow with the fleet. Nothing is written per telemetry sample. Events are
//! keyed by their (global) seq; each tenant's `dropped_through` has its own
//! row, so a restarted manager still reports a loss it cannot replay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::registry::Registry;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {why}")]
    Backend { path: PathBuf, why: String },
    #[error("store {path} is corrupt: {why}")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "another cloud-manager is using {dir} (its store {path} is locked); stop it first, or give this one another --data-dir"
    )]
    Locked { dir: PathBuf, path: PathBuf },
}

pub trait Store: Send + Sync + 'static {
    /// The saved registry, or an empty one on first start.
    fn load(&self) -> Result<Registry, StoreError>;
    /// Durably turns the saved `before` into `after` (atomically: all of
    /// the change or none of it).
    fn save(&self, before: &Registry, after: &Registry) -> Result<(), StoreError>;
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
}

impl RedbStore {
    /// Opens (or creates) `state.redb` in `data_dir`. The database is
    /// locked: a second manager on the same directory fails here.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let path = data_dir.join("state.redb");
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
        let store = RedbStore { db, path };
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
        Ok(store)
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

    fn read_map<V: DeserializeOwned>(
        &self,
        txn: &redb::ReadTransaction,
        def: TableDefinition<&str, &[u8]>,
    ) -> Result<BTreeMap<String, V>, StoreError> {
        let table = txn.open_table(def).map_err(|e| self.backend(e))?;
        let mut out = BTreeMap::new();
        for row in table.iter().map_err(|e| self.backend(e))? {
            let (k, v) = row.map_err(|e| self.backend(e))?;
            let value = serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e))?;
            out.insert(k.value().to_string(), value);
        }
        Ok(out)
    }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, redb::Error> {
    serde_json::to_vec(v).map_err(|e| redb::Error::Corrupted(e.to_string()))
}

/// Writes the rows of `after` that differ from `before`, removes the rows
/// that are gone.
fn write_diff<K, V>(
    table: &mut redb::Table<&str, &[u8]>,
    before: &BTreeMap<K, V>,
    after: &BTreeMap<K, V>,
) -> Result<(), redb::Error>
where
    K: AsRef<str> + Ord,
    V: Serialize + PartialEq,
{
    for (k, v) in after {
        if before.get(k) != Some(v) {
            table.insert(k.as_ref(), json(v)?.as_slice())?;
        }
    }
    for k in before.keys().filter(|k| !after.contains_key(*k)) {
        table.remove(k.as_ref())?;
    }
    Ok(())
}

impl Store for RedbStore {
    fn load(&self) -> Result<Registry, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.backend(e))?;
        let mut r = Registry {
            tokens: self.read_map(&txn, TOKENS)?.into_iter().collect(),
            nodes: self.read_map(&txn, NODES)?,
            pools: self.read_map(&txn, POOLS)?,
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

    fn save(&self, before: &Registry, after: &Registry) -> Result<(), StoreError> {
        self.write(|txn| {
            let tokens_before: BTreeMap<&String, _> = before.tokens.iter().collect();
            let tokens_after: BTreeMap<&String, _> = after.tokens.iter().collect();
            write_diff(&mut txn.open_table(TOKENS)?, &tokens_before, &tokens_after)?;
            write_diff(&mut txn.open_table(NODES)?, &before.nodes, &after.nodes)?;
            write_diff(&mut txn.open_table(POOLS)?, &before.pools, &after.pools)?;
            let mut events = txn.open_table(EVENTS)?;
            let mut dropped = txn.open_table(EVENTS_DROPPED)?;
            for (tenant, ring) in after.events.tenants() {
                let old = before.events.tenant(tenant);
                // A ring no change touched is the same allocation.
                if old.is_some_and(|o| std::sync::Arc::ptr_eq(o, ring)) {
                    continue;
                }
                for e in ring
                    .events
                    .iter()
                    .filter(|e| e.seq > before.events.next_seq)
                {
                    events.insert(e.seq, json(&**e)?.as_slice())?;
                }
                let Some(old) = old else {
                    if ring.dropped_through > 0 {
                        dropped.insert(tenant.as_str(), ring.dropped_through)?;
                    }
                    continue;
                };
                for e in old.events.iter().filter(|e| e.seq <= ring.dropped_through) {
                    events.remove(e.seq)?;
                }
                if ring.dropped_through != old.dropped_through {
                    dropped.insert(tenant.as_str(), ring.dropped_through)?;
                }
            }
            let mut meta = txn.open_table(META)?;
            meta.insert(NEXT_EVENT_SEQ, after.events.next_seq)?;
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

    #[test]
    fn round_trip_of_changes_and_empty_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let empty = store.load().unwrap();
        assert_eq!(empty, Registry::default());
        let mut r = Registry::default();
        r.add_token("ept_a", token("t"), 0);
        r.add_token("ept_b", token("t"), 0);
        r.events
            .push(EventRecord::new("t", "p", EventKind::PoolCreated), 5);
        store.save(&empty, &r).unwrap();
        let mut r2 = r.clone();
        r2.tokens.remove(&crate::registry::hash_token("ept_a"));
        r2.events
            .push(EventRecord::new("t", "p", EventKind::PoolDeleted), 6);
        store.save(&r, &r2).unwrap();
        drop(store);
        // A new process sees exactly the last committed state.
        let reopened = RedbStore::open(dir.path()).unwrap();
        assert_eq!(reopened.load().unwrap(), r2);
    }

    #[test]
    fn each_tenant_trims_its_own_events_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut before = Registry::default();
        before.events.set_limit(3);
        let change = |tenant: &str, before: &mut Registry| {
            let mut after = before.clone();
            after
                .events
                .push(EventRecord::new(tenant, "", EventKind::NodeEnrolled), 1);
            store.save(before, &after).unwrap();
            *before = after;
        };
        change("quiet", &mut before);
        for _ in 0..10 {
            change("busy", &mut before);
        }
        let mut loaded = store.load().unwrap();
        loaded.events.set_limit(3);
        assert_eq!(loaded, before);
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
        for _ in 0..5 {
            r.events
                .push(EventRecord::new("t", "", EventKind::NodeEnrolled), 1);
        }
        store.save(&Registry::default(), &r).unwrap();
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
