//! Persistence of the manager's registry.
//!
//! `Store` is the one seam to the storage backend. The embedded default,
//! `RedbStore`, is a redb database (`state.redb` in the data directory):
//! pure Rust (no server, no C library to install), ACID transactions with
//! an fsync at each commit, and a crash at any point leaves the last
//! committed state. Each change writes only the records that differ
//! between the registry before and after it (one row per token, node, pool
//! and event, as JSON), in one transaction, so the cost of a change does not
//! grow with the fleet. Nothing is written per telemetry sample.

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
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_EVENT_SEQ: &str = "next_event_seq";

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
            txn.open_table(META)?;
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
        for row in events.iter().map_err(|e| self.backend(e))? {
            let (_, v) = row.map_err(|e| self.backend(e))?;
            r.events
                .events
                .push_back(serde_json::from_slice(v.value()).map_err(|e| self.corrupt(e))?);
        }
        let meta = txn.open_table(META).map_err(|e| self.backend(e))?;
        r.events.next_seq = meta
            .get(NEXT_EVENT_SEQ)
            .map_err(|e| self.backend(e))?
            .map(|v| v.value())
            .unwrap_or(0);
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
            for e in after.events.since(before.events.next_seq) {
                events.insert(e.seq, json(e)?.as_slice())?;
            }
            let oldest_kept = after
                .events
                .events
                .front()
                .map(|e| e.seq)
                .unwrap_or(u64::MAX);
            for e in before.events.events.iter().filter(|e| e.seq < oldest_kept) {
                events.remove(e.seq)?;
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
    use crate::events::{EventKind, EventRecord, MAX_EVENTS};
    use crate::registry::TokenRecord;

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
    fn trimmed_events_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        let mut before = Registry::default();
        for _ in 0..MAX_EVENTS {
            let mut after = before.clone();
            after
                .events
                .push(EventRecord::new("t", "", EventKind::NodeEnrolled), 1);
            store.save(&before, &after).unwrap();
            before = after;
        }
        let mut after = before.clone();
        after
            .events
            .push(EventRecord::new("t", "", EventKind::NodeEnrolled), 1);
        store.save(&before, &after).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.events.events.len(), MAX_EVENTS);
        assert_eq!(loaded, after);
    }

    #[test]
    fn a_second_manager_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        assert!(RedbStore::open(dir.path()).is_err());
    }
}
