//! The etcd backend of `Store` (`store = "etcd"`).
//!
//! Every durable record lives in etcd under one key prefix (default
//! `/edgepool`), as the same JSON rows `RedbStore` keeps:
//!
//! | key | value |
//! | --- | --- |
//! | `PREFIX/tokens/ID` | a join token |
//! | `PREFIX/nodes/TENANT/ID` | a node (node ids are per tenant) |
//! | `PREFIX/pools/TENANT/POOL` | a pool (with its CA key and certificates) |
//! | `PREFIX/events/SEQ` | an event (`SEQ` zero-padded to 20 digits: key order is seq order) |
//! | `PREFIX/events_dropped/TENANT` | the newest dropped seq of a tenant |
//! | `PREFIX/meta/next_event_seq`, `PREFIX/meta/events_floor` | counters (decimal) |
//! | `PREFIX/owner` | which manager writes (bound to its lease) |
//!
//! **One writer, fenced.** On open the manager takes `PREFIX/owner` with an
//! etcd lease (`etcd_lease_ttl_seconds`) that it keeps alive; another
//! manager on the same prefix waits as a standby (`EtcdOptions::standby`,
//! what `serve` uses) or is refused. The owner key names the host and data dir of its holder, and
//! the holder keeps an exclusive lock on `DATA_DIR/manager.lock`: a manager
//! restarted on the same host and data dir (after a crash that left the
//! key to its lease) knows the old holder is gone, and takes the prefix
//! over at once instead of waiting out the lease. Every commit is one etcd transaction conditioned on the owner
//! key still being the one this manager created (its create revision): a
//! manager whose lease expired (cut off from etcd, or stalled longer than
//! the TTL) can write nothing, even after another took over. A commit that
//! fails that condition is reported and leaves the registry as committed.
//!
//! **Secrets.** Pool rows hold the pool CA's private key: they are sealed
//! (`sealing`: ChaCha20-Poly1305, the key in `DATA_DIR/store.key`, never in
//! etcd) before they are written. `PREFIX/meta/key_check` is a sealed known
//! value, so a manager with another `store.key` is refused at start instead
//! of failing on the first pool it reads.
//!
//! **Limits.** etcd refuses a transaction with more operations than its
//! `--max-txn-ops` (128 by default): the writer batches changes up to
//! `etcd_max_txn_ops` rows (`Store::max_batch_rows`), and a single change
//! larger than that is refused with an error that says so. Values are
//! small (a pool with its CA key and member certificates is a few KB).
//!
//! The etcd client (the etcd-client crate, see `etcd`) runs on its own
//! runtime (one thread, `etcd-client`): `Store` is called from the writer
//! thread and at start-up, and blocks only the caller.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;

use etcd_client::{
    Client, Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse,
};

use crate::etcd;

use crate::registry::Registry;
use crate::sealing::Sealer;
use crate::store::{Store, StoreError, WriteSet};

/// How long one etcd request may take before the store gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows read per range request while loading.
const PAGE: i64 = 500;
/// Tables whose rows are sealed (they hold private keys).
const SEALED: &[&str] = &["pools"];
/// The known value sealed in `PREFIX/meta/key_check`.
const KEY_CHECK: &[u8] = b"edgepool store key";

/// Where etcd is and how to reach it (from the manager's config).
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, one or more.
    pub endpoints: Vec<String>,
    /// Every key starts with this (no trailing slash).
    pub prefix: String,
    /// CA certificate (PEM) that signed etcd's server certificate.
    pub ca_cert: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's client-cert auth.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// TTL of the owner lease (seconds).
    pub lease_ttl_seconds: u32,
    /// Operations one transaction may carry (etcd's `--max-txn-ops`).
    pub max_txn_ops: u32,
    /// The manager's data dir (`manager.lock` is taken there).
    pub data_dir: PathBuf,
    /// When another manager holds the prefix, wait (a standby replica)
    /// until it is free instead of failing.
    pub standby: bool,
    /// Set to give up waiting (shutdown).
    pub stop: Option<Arc<AtomicBool>>,
    /// `HOST:PORT` at which the other replicas reach this manager; written
    /// in the owner key while it leads.
    pub advertise: String,
    /// While waiting as a standby: kept set to the leader's advertised
    /// address (where the standby forwards calls), `None` while no
    /// manager leads.
    pub leader: Option<Arc<std::sync::Mutex<Option<String>>>>,
}

/// The advertised address in an owner key's value (`... addr HOST:PORT`).
pub fn holder_address(holder: &str) -> Option<&str> {
    holder
        .rsplit_once(" addr ")
        .map(|(_, a)| a.trim())
        .filter(|a| !a.is_empty())
}

pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    prefix: String,
    where_: PathBuf,
    owner_key: String,
    /// Create revision of our owner key: the fence of every commit.
    owner_revision: i64,
    lease: i64,
    /// The lease could not be kept alive (for the logs and errors).
    lost: Arc<AtomicBool>,
    max_txn_ops: usize,
    /// Held while the store is open (see the module comment).
    _lock: nix::fcntl::Flock<std::fs::File>,
    sealer: Arc<Sealer>,
}

impl EtcdStore {
    /// Connects, takes ownership of the prefix and starts keeping the
    /// lease alive. Blocks the calling thread (never call it on a runtime
    /// thread: use `spawn_blocking`).
    pub fn open(options: &EtcdOptions) -> Result<Self, StoreError> {
        let where_ = PathBuf::from(format!(
            "etcd {} {}",
            options.endpoints.join(","),
            options.prefix
        ));
        let backend = |why: String| StoreError::Backend {
            path: where_.clone(),
            why,
        };
        if options.endpoints.is_empty() {
            return Err(backend("no etcd endpoint given (--etcd-endpoints)".into()));
        }
        let lock_path = options.data_dir.join("manager.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| backend(format!("cannot open {}: {e}", lock_path.display())))?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| StoreError::Locked {
                dir: options.data_dir.clone(),
                path: lock_path.clone(),
            })?;
        let data_dir =
            std::fs::canonicalize(&options.data_dir).unwrap_or_else(|_| options.data_dir.clone());
        // What the owner key says: who holds the prefix, and (the part
        // before the pid) whether that is an earlier run of this manager.
        let ours = format!("host {} data dir {}", hostname(), data_dir.display());
        let me = format!(
            "{ours} pid {} addr {}",
            std::process::id(),
            options.advertise
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| backend(format!("starting the etcd client runtime: {e}")))?;
        let connect = etcd::Connect {
            endpoints: options.endpoints.clone(),
            ca_cert: options.ca_cert.clone(),
            cert: options.cert.clone(),
            key: options.key.clone(),
            timeout: REQUEST_TIMEOUT,
        };
        let client = block(&rt, async move { etcd::connect(&connect).await }).map_err(&backend)?;
        let prefix = options.prefix.trim_end_matches('/').to_string();
        let owner_key = format!("{prefix}/owner");
        let ttl = i64::from(options.lease_ttl_seconds.max(2));
        let mut announced = false;
        let opened = loop {
            let (key, mut c, me, ours) =
                (owner_key.clone(), client.clone(), me.clone(), ours.clone());
            let attempt = block(
                &rt,
                async move { take(&mut c, &key, &me, &ours, ttl).await },
            )
            .map_err(&backend)?;
            if let Some(leader) = &options.leader {
                let now = attempt
                    .as_ref()
                    .err()
                    .and_then(|h| holder_address(h))
                    .map(str::to_string);
                if let Ok(mut slot) = leader.lock() {
                    *slot = now;
                }
            }
            match attempt {
                Ok(taken) => break taken,
                Err(holder) if options.standby => {
                    if !announced {
                        tracing::info!(%holder, "standby: another manager leads this prefix; taking over when it goes");
                        announced = true;
                    }
                    if options
                        .stop
                        .as_ref()
                        .is_some_and(|s| s.load(Ordering::Relaxed))
                    {
                        return Err(backend("stopped while waiting to lead".into()));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
                Err(holder) => {
                    return Err(backend(format!(
                        "another manager holds this prefix ({holder}); stop it first or give this one another --etcd-prefix (its hold ends {ttl} s after it stops)"
                    )));
                }
            }
        };
        let (lease, owner_revision) = opened;
        // Only now (etcd answered, the prefix is ours) is anything made in
        // the data dir; a failure from here gives the prefix back.
        let sealed = Sealer::load_or_create(&options.data_dir)
            .map_err(|e| e.to_string())
            .map(Arc::new)
            .and_then(|sealer| {
                check_key(&rt, &client, &prefix, &owner_key, owner_revision, &sealer)
                    .map(|()| sealer)
            });
        let sealer = match sealed {
            Ok(s) => s,
            Err(why) => {
                let mut c = client.clone();
                let _ = block(&rt, async move { revoke(&mut c, lease).await });
                return Err(backend(why));
            }
        };
        let lost = Arc::new(AtomicBool::new(false));
        rt.spawn(keep_alive(
            client.clone(),
            lease,
            Duration::from_secs(ttl as u64),
            lost.clone(),
        ));
        Ok(EtcdStore {
            rt,
            client,
            prefix,
            where_,
            owner_key,
            owner_revision,
            lease,
            lost,
            max_txn_ops: options.max_txn_ops.max(2) as usize,
            _lock: lock,
            sealer,
        })
    }

    /// Set once this manager no longer holds the prefix (its lease expired
    /// or a commit found another owner): it must stop leading.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }

    fn backend(&self, why: impl std::fmt::Display) -> StoreError {
        StoreError::Backend {
            path: self.where_.clone(),
            why: why.to_string(),
        }
    }

    fn corrupt(&self, why: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt {
            path: self.where_.clone(),
            why: why.to_string(),
        }
    }

    /// Every row under `PREFIX/table/`, in key order (paged).
    fn rows(&self, table: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let start = format!("{}/{table}/", self.prefix);
        let client = self.client.clone();
        let from = start.clone();
        let kvs = block(
            &self.rt,
            async move { etcd::prefix(&client, &from, PAGE).await },
        )
        .map_err(|e| self.backend(e))?;
        Ok(kvs
            .into_iter()
            .map(|kv| {
                let (key, value) = kv.into_key_value();
                let key = String::from_utf8_lossy(&key);
                let id = key.strip_prefix(start.as_str()).unwrap_or(&key).to_string();
                (id, value)
            })
            .collect())
    }

    fn map<V: DeserializeOwned>(&self, table: &str) -> Result<BTreeMap<String, V>, StoreError> {
        self.rows(table)?
            .into_iter()
            .map(|(k, v)| {
                let v = if SEALED.contains(&table) {
                    self.sealer
                        .open(&self.key(table, &k), &v)
                        .map_err(|e| self.corrupt(e))?
                } else {
                    v
                };
                let value = serde_json::from_slice(&v)
                    .map_err(|e| self.corrupt(format!("{table}/{k}: {e}")))?;
                Ok((k, value))
            })
            .collect()
    }

    fn number(&self, name: &str) -> Result<u64, StoreError> {
        let rows = self.rows("meta")?;
        match rows.iter().find(|(k, _)| k == name) {
            None => Ok(0),
            Some((_, v)) => String::from_utf8_lossy(v)
                .trim()
                .parse()
                .map_err(|e| self.corrupt(format!("meta/{name}: {e}"))),
        }
    }

    fn key(&self, table: &str, id: &str) -> String {
        format!("{}/{table}/{id}", self.prefix)
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Give the prefix back at once instead of after the TTL.
        let (mut client, lease) = (self.client.clone(), self.lease);
        let _ = block(&self.rt, async move { revoke(&mut client, lease).await });
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Registry, StoreError> {
        let mut r = Registry {
            tokens: self.map("tokens")?.into_iter().collect(),
            nodes: self.map("nodes")?.into_iter().collect(),
            pools: self.map("pools")?.into_iter().collect(),
            ..Registry::default()
        };
        // Keys are zero-padded seqs: key order is seq order.
        for (k, v) in self.rows("events")? {
            let event =
                serde_json::from_slice(&v).map_err(|e| self.corrupt(format!("events/{k}: {e}")))?;
            r.events.restore(event);
        }
        for (tenant, v) in self.rows("events_dropped")? {
            let seq = String::from_utf8_lossy(&v)
                .trim()
                .parse()
                .map_err(|e| self.corrupt(format!("events_dropped/{tenant}: {e}")))?;
            r.events.restore_dropped(&tenant, seq);
        }
        r.events.next_seq = self.number("next_event_seq")?;
        r.events.floor = self.number("events_floor")?;
        Ok(r)
    }

    fn commit(&self, changes: &[&WriteSet]) -> Result<(), StoreError> {
        // One operation per key: etcd refuses a transaction that names a
        // key twice, and a later change in the batch wins anyway.
        let mut ops: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
        let mut next_seq = None;
        for w in changes {
            for (table, rows) in w.tables() {
                for (k, v) in rows {
                    let key = self.key(table, k);
                    let v = match v {
                        Some(v) if SEALED.contains(&table) => Some(self.sealer.seal(&key, v)),
                        v => v.clone(),
                    };
                    ops.insert(key, v);
                }
            }
            for (seq, e) in w.events() {
                ops.insert(self.key("events", &seq_key(*seq)), Some(e.clone()));
            }
            for seq in w.events_removed() {
                ops.insert(self.key("events", &seq_key(*seq)), None);
            }
            for (tenant, seq) in w.dropped() {
                ops.insert(
                    self.key("events_dropped", tenant),
                    Some(seq.to_string().into_bytes()),
                );
            }
            next_seq = Some(w.next_seq());
        }
        if let Some(seq) = next_seq {
            ops.insert(
                self.key("meta", "next_event_seq"),
                Some(seq.to_string().into_bytes()),
            );
        }
        if ops.len() > self.max_txn_ops {
            return Err(self.backend(format!(
                "one change writes {} keys, more than etcd_max_txn_ops ({}); raise etcd's --max-txn-ops and etcd_max_txn_ops together",
                ops.len(),
                self.max_txn_ops
            )));
        }
        let txn = Txn::new()
            .when([created_at(&self.owner_key, self.owner_revision)])
            .and_then(
                ops.into_iter()
                    .map(|(k, v)| match v {
                        Some(v) => TxnOp::put(k, v, None),
                        None => TxnOp::delete(k, None),
                    })
                    .collect::<Vec<_>>(),
            );
        let mut client = self.client.clone();
        let resp = block(&self.rt, async move { txn_(&mut client, txn).await })
            .map_err(|e| self.backend(e))?;
        if !resp.succeeded() {
            self.lost.store(true, Ordering::Relaxed);
            return Err(self.backend(
                "this manager no longer holds the prefix (its etcd lease expired: cut off from etcd or stalled longer than etcd_lease_ttl_seconds); nothing was written",
            ));
        }
        Ok(())
    }

    fn max_batch_rows(&self) -> usize {
        // One operation is the event counter.
        self.max_txn_ops.saturating_sub(1).max(1)
    }
}

/// One try at the prefix: `Ok(Ok((lease, revision)))` when it is ours,
/// `Ok(Err(holder))` when another manager holds it.
async fn take(
    c: &mut Client,
    key: &str,
    me: &str,
    ours: &str,
    ttl: i64,
) -> Result<Result<(i64, i64), String>, String> {
    let granted = c
        .lease_grant(ttl, None)
        .await
        .map_err(|e| format!("cannot reach etcd to take a lease: {e}"))?;
    if !granted.error().is_empty() {
        return Err(format!(
            "cannot reach etcd to take a lease: {}",
            granted.error()
        ));
    }
    let lease = granted.id();
    // Twice at most: the second try follows the removal of an earlier
    // run's key.
    for _ in 0..2 {
        let txn = Txn::new()
            .when([created_at(key, 0)])
            .and_then([TxnOp::put(
                key,
                me,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = txn_(c, txn)
            .await
            .map_err(|e| format!("cannot take the prefix: {e}"))?;
        if resp.succeeded() {
            return Ok(Ok((lease, resp.header().map_or(0, |h| h.revision()))));
        }
        let holder = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(got) => got
                    .kvs()
                    .first()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
                _ => None,
            })
            .unwrap_or_default();
        let earlier_run = holder
            .strip_prefix(ours)
            .is_some_and(|rest| rest.starts_with(" pid "));
        if !earlier_run {
            let _ = revoke(c, lease).await;
            return Ok(Err(holder));
        }
        // An earlier run of this manager (we hold its data dir's lock, so
        // it is gone): its key goes, if it is still that.
        tracing::info!(%holder, "taking the etcd prefix over from an earlier run");
        let txn = Txn::new()
            .when([Compare::value(key, CompareOp::Equal, holder.as_bytes())])
            .and_then([TxnOp::delete(key, None)]);
        txn_(c, txn)
            .await
            .map_err(|e| format!("cannot take the prefix over: {e}"))?;
    }
    let _ = revoke(c, lease).await;
    Err("the prefix changed hands while it was being taken; try again".into())
}

/// Checks this manager's store key against `PREFIX/meta/key_check`, or
/// writes the check (fenced like every write) when the prefix has none.
fn check_key(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    prefix: &str,
    owner_key: &str,
    owner_revision: i64,
    sealer: &Arc<Sealer>,
) -> Result<(), String> {
    let key = format!("{prefix}/meta/key_check");
    let (mut client, owner, sealer) = (client.clone(), owner_key.to_string(), sealer.clone());
    block(rt, async move {
        let got = client
            .get(key.as_str(), None)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(kv) = got.kvs().first() {
            return match sealer.open(&key, kv.value()) {
                Ok(v) if v == KEY_CHECK => Ok(()),
                _ => Err(format!(
                    "this data dir's store.key is not the key of the managers that wrote this prefix ({key} does not open with it): copy their store.key here"
                )),
            };
        }
        let txn = Txn::new()
            .when([created_at(&owner, owner_revision)])
            .and_then([TxnOp::put(key.as_str(), sealer.seal(&key, KEY_CHECK), None)]);
        txn_(&mut client, txn).await?;
        Ok(())
    })
}

/// `key`'s create revision is `revision` (0: the key does not exist).
fn created_at(key: &str, revision: i64) -> Compare {
    Compare::create_revision(key, CompareOp::Equal, revision)
}

async fn txn_(client: &mut Client, txn: Txn) -> Result<TxnResponse, String> {
    client.txn(txn).await.map_err(|e| e.to_string())
}

async fn revoke(client: &mut Client, lease: i64) -> Result<(), String> {
    client
        .lease_revoke(lease)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Runs `fut` on the store's runtime and blocks this thread for its result.
fn block<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    fut: impl Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let out = match tokio::time::timeout(REQUEST_TIMEOUT * 2, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer from etcd in {:?}", REQUEST_TIMEOUT * 2)),
        };
        let _ = tx.send(out);
    });
    rx.recv()
        .unwrap_or_else(|_| Err("the etcd client runtime stopped".into()))
}

/// Keeps the owner lease alive (a third of the TTL apart) until the
/// runtime stops; flags `lost` when the lease is gone, or when it may have
/// expired: the lease counts from the moment a renewal was *sent* (etcd
/// renewed it later than that), less a margin, so this manager stops
/// acting before etcd lets another one lead.
async fn keep_alive(client: Client, lease: i64, ttl: Duration, lost: Arc<AtomicBool>) {
    let every = ttl / 3;
    let margin = (ttl / 4).min(Duration::from_secs(1));
    // Granted just before this task started.
    let mut valid_until = tokio::time::Instant::now() + ttl.saturating_sub(margin);
    // One keep-alive stream while renewals are answered; a try that fails
    // or runs out of time drops it, so that a late answer is never taken
    // for the next renewal's.
    let mut stream = None;
    loop {
        let sent = tokio::time::Instant::now();
        // A try never runs past the lease as we know it.
        let budget = every.min(valid_until.saturating_duration_since(sent));
        if budget.is_zero() {
            break;
        }
        let renewed = tokio::time::timeout(budget, renew(&client, lease, ttl, &mut stream)).await;
        if !matches!(renewed, Ok(Ok(_))) {
            stream = None;
        }
        match renewed {
            Ok(Ok(left)) if left > 0 => {
                let left = Duration::from_secs(u64::try_from(left).unwrap_or(0));
                valid_until = sent + left.saturating_sub(margin);
                tokio::time::sleep_until((sent + every).min(valid_until)).await;
                continue;
            }
            // The lease is gone (expired, or revoked).
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) if tokio::time::Instant::now() < valid_until => {
                tracing::warn!(
                    left_ms = valid_until
                        .saturating_duration_since(tokio::time::Instant::now())
                        .as_millis() as u64,
                    "etcd lease keep-alive failed; retrying"
                );
                let pause = Duration::from_millis(200).min(every);
                tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(valid_until))
                    .await;
                continue;
            }
            Ok(Err(_)) | Err(_) => {}
        }
        break;
    }
    if !lost.swap(true, Ordering::Relaxed) {
        tracing::error!(
            lease,
            "lost the etcd lease: this manager can no longer write its state"
        );
    }
}

/// Renews `lease` once (over `stream`, opened on first use); its remaining
/// TTL in seconds (0 or less: it is gone).
async fn renew(
    client: &Client,
    lease: i64,
    ttl: Duration,
    stream: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
) -> Result<i64, String> {
    if let Some((keeper, answers)) = stream {
        keeper.keep_alive().await.map_err(|e| e.to_string())?;
        return match answers.message().await.map_err(|e| e.to_string())? {
            Some(r) => Ok(r.ttl()),
            None => Err("etcd ended the keep-alive stream".into()),
        };
    }
    // Opening the stream is a renewal: etcd-client reads its answer and
    // says only whether the lease is still there (a renewal sets it back
    // to its full TTL).
    match client.lease_client().keep_alive(lease).await {
        Ok(opened) => {
            *stream = Some(opened);
            Ok(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
        }
        Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(0),
        Err(e) => Err(e.to_string()),
    }
}

fn seq_key(seq: u64) -> String {
    format!("{seq:020}")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_keys_sort_as_numbers() {
        assert_eq!(seq_key(42), "00000000000000000042");
        assert!(seq_key(9) < seq_key(10));
    }
}
