//! `Pools`: the pool operations (create, read, delete, change apps and
//! policy), the desired state pushed to members (assignments), following
//! agents' app reports, and member certificate renewals with the worker
//! that runs them. Every change goes through `Control::mutate` (validated
//! on a copy, persisted, then swapped in), so a refused request changes
//! nothing. Each push arms the failure detector's watchlist (`Watchlist`),
//! which `Pools` shares with `failover` without depending on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sha2::Digest;

use edgepool_common::identity::{Identity, validate_name};
use time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chain::{issue_member, issue_pool_ca};
use crate::control::{Control, ManagerError};
use crate::deadlines::Watchlist;
use crate::events::{EventKind, EventRecord};
use crate::model::{
    AppReport, AppRun, AppRunState, MemberView, NodeAssignment, NodeState, PlacementView, PoolView,
    Resources, now_ms,
};
use crate::node_key::NodeKey;
use crate::node_state::NodeEvent;
use crate::pool::{
    AppDef, MemberRecord, PolicyDef, PoolError, PoolRecord, RunningApp, invalid, plan_groups,
    precondition, validate_apps, validate_policy,
};
use crate::registry::Registry;

/// A tenant's request for a new pool.
#[derive(Clone, Debug)]
pub struct PoolRequest {
    pub name: String,
    pub node_ids: Vec<String>,
    pub apps: Vec<AppDef>,
    pub policy: Option<PolicyDef>,
    pub spare_labels: BTreeMap<String, String>,
}

/// The pool component. Its durable state (pool records, members, running
/// apps) lives in the registry; it owns the renewal worker (`start`).
pub struct Pools {
    control: Arc<Control>,
    /// The failure detector's watchlist, armed at every push.
    watchlist: Arc<Watchlist>,
}

impl Pools {
    pub fn new(control: Arc<Control>, watchlist: Arc<Watchlist>) -> Self {
        Pools { control, watchlist }
    }

    /// Starts the member-certificate renewal worker on `tracker`, until
    /// `shutdown` fires.
    pub fn start(self: &Arc<Self>, tracker: &TaskTracker, shutdown: CancellationToken) {
        tracker.spawn(renewal_worker(self.clone(), shutdown));
    }

    fn member_validity(&self) -> Duration {
        Duration::seconds(i64::from(self.control.config.member_cert_validity_seconds))
    }

    /// Creates a pool: validates, partitions the apps, issues the pool CA
    /// and the M member certificates, and pushes each member its slot.
    pub fn create_pool(&self, tenant: &str, req: PoolRequest) -> Result<PoolView, ManagerError> {
        let record = self.control.mutate(|r| {
            let record = self.build_pool(r, tenant, &req)?;
            for m in &record.members {
                if let Some(n) = r.node_mut(&NodeKey::new(tenant, &m.node_id)) {
                    n.change(NodeEvent::Join, &record.name, m.slot)?;
                }
            }
            r.events.push(
                EventRecord::new(tenant, &record.name, EventKind::PoolCreated).message(format!(
                    "{} members, {} apps",
                    record.members.len(),
                    record.apps.len()
                )),
                now_ms(),
            );
            r.pools
                .insert(PoolRecord::key(tenant, &record.name), record.clone());
            Ok(record)
        })?;
        tracing::info!(%tenant, pool = %record.name, "pool created");
        self.push_assignments(record.member_keys())?;
        self.view_pool(&record)
    }

    /// Validates a create request against `r` and builds the record.
    fn build_pool(
        &self,
        r: &Registry,
        tenant: &str,
        req: &PoolRequest,
    ) -> Result<PoolRecord, ManagerError> {
        validate_name("pool name", &req.name).map_err(|e| invalid("name", e.to_string()))?;
        if r.pools.contains_key(&PoolRecord::key(tenant, &req.name)) {
            return Err(precondition("name", format!("pool {:?} already exists", req.name)).into());
        }
        let m = req.node_ids.len();
        if m < 2 {
            return Err(invalid(
                "node_ids",
                format!("a pool needs at least 2 nodes, got {m}"),
            )
            .into());
        }
        let mut capacities = Vec::with_capacity(m);
        let mut seen = BTreeSet::new();
        for (i, id) in req.node_ids.iter().enumerate() {
            let field = format!("node_ids[{i}]");
            if !seen.insert(id.as_str()) {
                return Err(invalid(field, format!("node {id:?} is listed twice")).into());
            }
            let node = r
                .node_of_tenant(tenant, id)
                .ok_or_else(|| invalid(field.clone(), format!("no node {id:?}")))?;
            if node.state != NodeState::Free {
                let why = format!(
                    "node {id:?} is not free ({:?} in pool {:?})",
                    node.state, node.pool
                );
                return Err(precondition(field, why).into());
            }
            if node.capacity == Resources::default() {
                let why = format!(
                    "node {id:?} has not reported its capacity yet (is its agent running?)"
                );
                return Err(precondition(field, why).into());
            }
            if node.cert_pem.is_empty() {
                let why = format!(
                    "node {id:?} must enroll again (join --force) to get member certificates"
                );
                return Err(precondition(field, why).into());
            }
            capacities.push(node.capacity);
        }
        validate_apps(&req.apps, m)?;
        let mut policy = req.policy.clone().unwrap_or_default();
        validate_policy(&policy)?;
        policy.version = 1;
        let groups = plan_groups(&req.apps, &capacities, &BTreeMap::new(), &BTreeSet::new())?;
        let ca = issue_pool_ca(&self.control.ca, tenant, &req.name)?;
        let mut members = Vec::with_capacity(m);
        for (i, id) in req.node_ids.iter().enumerate() {
            let slot = i as u32 + 1;
            let node_cert = r
                .node_of_tenant(tenant, id)
                .map(|n| n.cert_pem.as_str())
                .unwrap_or_default();
            let identity = self.member_identity(tenant, &req.name, slot);
            let cert = issue_member(
                &self.control.ca,
                &ca,
                &identity,
                node_cert,
                self.member_validity(),
            )?;
            members.push(MemberRecord {
                slot,
                node_id: id.clone(),
                cert_pem: cert.cert_pem,
                cert_serial: cert.serial_hex,
                cert_not_after_ms: cert.not_after_ms,
                generation: 1,
            });
        }
        Ok(PoolRecord {
            name: req.name.clone(),
            tenant: tenant.to_string(),
            ca,
            members,
            apps: req.apps.clone(),
            groups,
            policy,
            generation: 1,
            created_at_ms: now_ms(),
            running: BTreeMap::new(),
            spare_labels: req.spare_labels.clone(),
            degraded: BTreeSet::new(),
            inflight: Vec::new(),
            offloads_seen: BTreeMap::new(),
        })
    }

    fn member_identity(&self, tenant: &str, pool: &str, slot: u32) -> Identity {
        Identity::Member {
            domain: self.control.config.trust_domain.clone(),
            tenant: tenant.to_string(),
            pool: pool.to_string(),
            slot,
        }
    }

    fn pool_record(&self, tenant: &str, name: &str) -> Result<PoolRecord, ManagerError> {
        self.control
            .registry()?
            .pools
            .get(&PoolRecord::key(tenant, name))
            .cloned()
            .ok_or_else(|| PoolError::NotFound(name.to_string()).into())
    }

    pub fn get_pool(&self, tenant: &str, name: &str) -> Result<PoolView, ManagerError> {
        let record = self.pool_record(tenant, name)?;
        self.view_pool(&record)
    }

    pub fn list_pools(&self, tenant: &str) -> Result<Vec<PoolView>, ManagerError> {
        let records: Vec<PoolRecord> = self
            .control
            .registry()?
            .pools
            .values()
            .filter(|p| p.tenant == tenant)
            .cloned()
            .collect();
        records.iter().map(|p| self.view_pool(p)).collect()
    }

    /// Deletes a pool: its members are freed and told to stop everything.
    pub fn delete_pool(&self, tenant: &str, name: &str) -> Result<(), ManagerError> {
        let record = self.control.mutate(|r| {
            let record = r
                .pools
                .remove(&PoolRecord::key(tenant, name))
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            for m in &record.members {
                if let Some(n) = r.node_mut(&NodeKey::new(tenant, &m.node_id))
                    && n.pool == record.name
                {
                    n.change(NodeEvent::Leave, "", 0)?;
                }
            }
            r.events.push(
                EventRecord::new(tenant, name, EventKind::PoolDeleted),
                now_ms(),
            );
            Ok(record)
        })?;
        tracing::info!(%tenant, pool = %name, "pool deleted");
        self.push_assignments(record.member_keys())
    }

    /// Replaces a pool's apps. Apps that keep their name keep their group
    /// (unless they ask for another slot); new apps are bin-packed. Agents
    /// restart only apps whose spec changed.
    pub fn update_apps(
        &self,
        tenant: &str,
        name: &str,
        apps: Vec<AppDef>,
    ) -> Result<PoolView, ManagerError> {
        let record = self.control.mutate(|r| {
            let key = PoolRecord::key(tenant, name);
            let mut record = r
                .pools
                .get(&key)
                .cloned()
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            validate_apps(&apps, record.members.len())?;
            let capacities: Vec<Resources> = record
                .members
                .iter()
                .map(|m| {
                    r.node_of_tenant(tenant, &m.node_id)
                        .map(|n| n.capacity)
                        .unwrap_or_default()
                })
                .collect();
            // Apps whose spec changes restart anyway: they are the first to
            // move if the kept placement leaves a group empty.
            // (The slot is where it runs, not what it runs.)
            let spec = |a: &AppDef| AppDef {
                slot: None,
                ..a.clone()
            };
            let changed: BTreeSet<String> = apps
                .iter()
                .filter(|a| !record.apps.iter().any(|o| spec(o) == spec(a)))
                .map(|a| a.name.clone())
                .collect();
            let groups = plan_groups(&apps, &capacities, &record.groups, &changed)?;
            let before: BTreeSet<&str> = record.apps.iter().map(|a| a.name.as_str()).collect();
            let after: BTreeSet<&str> = apps.iter().map(|a| a.name.as_str()).collect();
            let message = format!(
                "{} apps: {} added, {} removed",
                apps.len(),
                after.difference(&before).count(),
                before.difference(&after).count()
            );
            record.apps = apps;
            record.groups = groups;
            record.generation += 1;
            r.events.push(
                EventRecord::new(tenant, name, EventKind::AppsUpdated).message(message),
                now_ms(),
            );
            r.pools.insert(key, record.clone());
            Ok(record)
        })?;
        self.push_assignments(record.member_keys())?;
        self.view_pool(&record)
    }

    /// Replaces a pool's policy (version + 1) and pushes it to every member.
    pub fn update_policy(
        &self,
        tenant: &str,
        name: &str,
        mut policy: PolicyDef,
    ) -> Result<PoolView, ManagerError> {
        validate_policy(&policy)?;
        let record = self.control.mutate(|r| {
            let key = PoolRecord::key(tenant, name);
            let p = r
                .pools
                .get_mut(&key)
                .ok_or_else(|| PoolError::NotFound(name.to_string()))?;
            policy.version = p.policy.version + 1;
            p.policy = policy;
            let record = p.clone();
            r.events.push(
                EventRecord::new(tenant, name, EventKind::PolicyUpdated)
                    .message(format!("policy version {}", record.policy.version)),
                now_ms(),
            );
            Ok(record)
        })?;
        self.push_assignments(record.member_keys())?;
        self.view_pool(&record)
    }

    /// The desired state of `node` (an empty pool if it is no member).
    pub fn assignment_for(&self, node: &NodeKey) -> Result<NodeAssignment, ManagerError> {
        let r = self.control.registry()?;
        let Some(node) = r.node(node).filter(|n| !n.pool.is_empty()) else {
            return Ok(NodeAssignment::default());
        };
        let Some(pool) = r.pools.get(&PoolRecord::key(&node.tenant, &node.pool)) else {
            return Ok(NodeAssignment::default());
        };
        let Some(me) = pool.member_of(&node.node_id) else {
            return Ok(NodeAssignment::default());
        };
        Ok(NodeAssignment {
            pool: pool.name.clone(),
            slot: me.slot,
            generation: pool.generation,
            apps: pool.group(me.slot),
            member_cert_pem: me.cert_pem.clone(),
            pool_ca_pem: pool.ca.cert_pem.clone(),
            members: members_view(&r, pool),
            policy: Some(pool.policy.clone()),
            catalog: pool
                .apps
                .iter()
                .filter_map(|a| Some((*pool.groups.get(&a.name)?, a.clone())))
                .collect(),
        })
    }

    /// Recomputes and pushes the desired state of each node.
    pub(crate) fn push_assignments(
        &self,
        nodes: impl IntoIterator<Item = NodeKey>,
    ) -> Result<(), ManagerError> {
        for node in nodes {
            let a = self.assignment_for(&node)?;
            self.control.live_node(&node)?.set_assignment(a);
            // Its membership may have changed: the failure detector looks
            // at it again (and starts or stops watching it).
            self.watchlist.watch(&node, std::time::Instant::now());
        }
        Ok(())
    }

    /// Pushes the desired state to every member of `node`'s pool.
    pub(crate) fn push_pool_of(&self, node: &NodeKey) -> Result<(), ManagerError> {
        let members: Vec<NodeKey> = {
            let r = self.control.registry()?;
            let Some(node) = r.node(node).filter(|n| !n.pool.is_empty()) else {
                return Ok(());
            };
            r.pools
                .get(&PoolRecord::key(&node.tenant, &node.pool))
                .map(|p| p.member_keys().collect())
                .unwrap_or_default()
        };
        self.push_assignments(members)
    }

    fn view_pool(&self, record: &PoolRecord) -> Result<PoolView, ManagerError> {
        let members = members_view(&*self.control.registry()?, record);
        // Every member's latest report: an app runs where a report shows it
        // running (its home member, or the peer it was offloaded to).
        let mut reports = Vec::with_capacity(members.len());
        for m in &members {
            let report = self
                .control
                .live_data(&NodeKey::new(&record.tenant, &m.node_id))?
                .report
                .filter(|rep| rep.pool == record.name);
            reports.push((m.node_id.clone(), report));
        }
        let mut placements = Vec::with_capacity(record.apps.len());
        for app in &record.apps {
            let home_slot = record.groups.get(&app.name).copied().unwrap_or_default();
            let home = members
                .iter()
                .find(|m| m.slot == home_slot)
                .map(|m| m.node_id.clone())
                .unwrap_or_default();
            let find = |node: &str| {
                reports
                    .iter()
                    .filter(|(n, _)| n == node)
                    .filter_map(|(_, r)| r.as_ref())
                    .flat_map(|r| r.apps.iter())
                    .find(|a| a.name == app.name)
                    .cloned()
            };
            let elsewhere = reports.iter().find_map(|(n, r)| {
                let run = r
                    .as_ref()?
                    .apps
                    .iter()
                    .find(|a| a.name == app.name && a.state == AppRunState::Running)?;
                (*n != home).then(|| (n.clone(), run.clone()))
            });
            let (host, run) = match (find(&home), elsewhere) {
                (Some(run), _) if run.state == AppRunState::Running => (home.clone(), run),
                (_, Some((node, run))) => (node, run),
                (Some(run), None) => (home.clone(), run),
                (None, None) => (
                    home.clone(),
                    AppRun {
                        name: app.name.clone(),
                        ..AppRun::default()
                    },
                ),
            };
            placements.push(PlacementView {
                app: app.name.clone(),
                home_slot,
                host_node_id: host,
                run,
            });
        }
        Ok(PoolView {
            name: record.name.clone(),
            tenant: record.tenant.clone(),
            ca_pem: record.ca.cert_pem.clone(),
            members,
            apps: record.apps.clone(),
            placements,
            policy: record.policy.clone(),
            generation: record.generation,
            created_at_ms: record.created_at_ms,
            spare_labels: record.spare_labels.clone(),
            degraded: record.degraded.clone(),
        })
    }

    /// Follows an agent's app report (`previous` is the one before it, as
    /// `streams` kept it for `GetPool`): records APP_STARTED / APP_STOPPED /
    /// APP_EXITED, offloads and FAILOVER_DONE when something changed.
    pub async fn record_report(
        &self,
        node: &NodeKey,
        report: AppReport,
        previous: Option<AppReport>,
    ) {
        let node_id = node.node_id();
        // A cheap look at the committed snapshot first, without any lock
        // (most reports change nothing), then the real work inside
        // `mutate`, computed from the registry as it is there (with every
        // change prepared before it): reports of several nodes can arrive
        // at once, and each must see the others' changes (no lost or
        // doubled events).
        let changed = match self.control.registry() {
            Ok(r) => report_changes(&r, node, &report, previous.as_ref()).is_some(),
            Err(_) => false,
        };
        if !changed {
            return;
        }
        // What the metrics count once the change is committed: the
        // offloads' resources and a finished failover's duration.
        let result = self.control.mutate_async(|r| {
            let mut counted: (Vec<String>, Option<u64>) = (Vec::new(), None);
            let Some(c) = report_changes(r, node, &report, previous.as_ref()) else {
                return Ok(counted);
            };
            let (tenant, pool, slot) = (c.tenant, report.pool.clone(), c.slot);
            let now = now_ms();
            // App events first: a failover is done (and an offload shown)
            // once the apps it started are.
            for (kind, app, message) in c.apps.events {
                r.events.push(
                    EventRecord::new(&tenant, &pool, kind)
                        .node(node_id, slot)
                        .app(&app)
                        .message(message),
                    now,
                );
            }
            if let Some(p) = r.pools.get_mut(&PoolRecord::key(&tenant, &pool)) {
                p.running = c.apps.running;
                for o in &c.offloads {
                    let message = if o.resource == "return-home" {
                        format!("{} returned home from {} to {}", o.app, o.from_node, o.to_node)
                    } else {
                        format!(
                            "{} moved from {} to {} (slot {}): {} at {:.0}% of capacity; running there {} ms after the decision",
                            o.app,
                            o.from_node,
                            o.to_node,
                            o.to_slot,
                            o.resource,
                            o.utilisation * 100.0,
                            o.running_at_ms.saturating_sub(o.triggered_at_ms)
                        )
                    };
                    let e = EventRecord::new(&tenant, &pool, EventKind::Offload)
                        .node(&o.to_node, o.to_slot)
                        .app(&o.app)
                        .message(message);
                    r.events.push(e, now);
                    counted.0.push(o.resource.clone());
                    let newest = p.offloads_seen.entry(node_id.to_string()).or_default();
                    *newest = (*newest).max(o.triggered_at_ms);
                }
                if let Some((from, lost_at)) = &c.done {
                    p.inflight.retain(|f| !(f.slot == slot && f.node_id == node_id));
                    let e = EventRecord::new(&tenant, &pool, EventKind::FailoverDone)
                        .node(node_id, slot)
                        .message(format!(
                            "slot {slot} moved from {from} to {node_id}: its group runs there {} ms after the node was lost",
                            now.saturating_sub(*lost_at)
                        ));
                    r.events.push(e, now);
                    counted.1 = Some(now.saturating_sub(*lost_at));
                }
            }
            Ok(counted)
        })
        .await;
        match result {
            Ok((offloads, done)) => {
                let metrics = &self.control.metrics;
                for resource in &offloads {
                    metrics.offload(resource);
                }
                if let Some(ms) = done {
                    metrics.failover_done(ms);
                }
            }
            Err(e) => {
                tracing::warn!(%node, error = %e, "could not record app events")
            }
        }
    }

    /// Part of a forced re-enrollment (`join --force`), inside the same
    /// registry change: `node_id` now holds a new key (identity certificate
    /// `node_cert_pem`), so if it is a pool member its slot gets a member
    /// certificate for that key at once (same slot, member generation + 1,
    /// pool generation + 1; the old serial is refused by peers as soon as
    /// the new membership arrives). Returns the nodes whose assignment
    /// changed (every member of the pool), empty if it is no member.
    pub(crate) fn reissue_member_for_new_key(
        &self,
        r: &mut Registry,
        node: &NodeKey,
        node_cert_pem: &str,
        now: u64,
    ) -> Result<Vec<NodeKey>, ManagerError> {
        let node_id = node.node_id();
        let Some((tenant, pool)) = r
            .node(node)
            .filter(|n| !n.pool.is_empty())
            .map(|n| (n.tenant.clone(), n.pool.clone()))
        else {
            return Ok(Vec::new());
        };
        let Some(p) = r.pools.get_mut(&PoolRecord::key(&tenant, &pool)) else {
            return Ok(Vec::new());
        };
        let Some(m) = p.members.iter_mut().find(|m| m.node_id == node_id) else {
            return Ok(Vec::new());
        };
        let identity = self.member_identity(&tenant, &pool, m.slot);
        let cert = issue_member(
            &self.control.ca,
            &p.ca,
            &identity,
            node_cert_pem,
            self.member_validity(),
        )?;
        let old_serial = std::mem::replace(&mut m.cert_serial, cert.serial_hex);
        m.cert_pem = cert.cert_pem;
        m.cert_not_after_ms = cert.not_after_ms;
        m.generation += 1;
        let (slot, generation) = (m.slot, m.generation);
        p.generation += 1;
        let push = p.member_keys().collect();
        let e = EventRecord::new(&tenant, &pool, EventKind::CertRenewed)
            .node(node_id, slot)
            .message(format!(
                "member certificate of slot {slot} re-issued for {node_id}'s new key (join --force), generation {generation}; the old certificate {old_serial} is refused from now on"
            ));
        r.events.push(e, now);
        Ok(push)
    }

    /// Renews the member certificates that are due (`renew_at`), at most
    /// `RENEWALS_PER_PASS` of them, the most urgent first, and pushes the
    /// new membership to their pools. Returns how many were renewed.
    pub fn renew_member_certs(&self) -> Result<usize, ManagerError> {
        let validity_ms = u64::from(self.control.config.member_cert_validity_seconds) * 1000;
        let now = now_ms();
        let due = due_renewals(
            &*self.control.registry()?,
            validity_ms,
            now,
            RENEWALS_PER_PASS,
        );
        if due.is_empty() {
            return Ok(0);
        }
        let (count, nodes) = self.control.mutate(|r| {
            let now = now_ms();
            let mut count = 0;
            let mut nodes = BTreeSet::new();
            for (key, slot) in &due {
                let Some(pool) = r.pools.get_mut(key) else {
                    continue;
                };
                let Some(m) = pool
                    .members
                    .get_mut((*slot as usize).wrapping_sub(1))
                    .filter(|m| renew_at(m, validity_ms) <= now)
                else {
                    continue;
                };
                let identity = self.member_identity(&pool.tenant, &pool.name, m.slot);
                let node_cert = r
                    .nodes
                    .get(NodeKey::new(&pool.tenant, &m.node_id).as_str())
                    .map(|n| n.cert_pem.as_str())
                    .unwrap_or_default();
                let cert = issue_member(
                    &self.control.ca,
                    &pool.ca,
                    &identity,
                    node_cert,
                    self.member_validity(),
                )?;
                m.cert_pem = cert.cert_pem;
                m.cert_serial = cert.serial_hex;
                m.cert_not_after_ms = cert.not_after_ms;
                count += 1;
                let e = EventRecord::new(&pool.tenant, &pool.name, EventKind::CertRenewed)
                    .node(&m.node_id, m.slot);
                nodes.extend(pool.member_keys());
                r.events.push(e, now);
            }
            Ok((count, nodes))
        })?;
        self.push_assignments(nodes)?;
        Ok(count)
    }
}

/// Renews member certificates before they expire, for as long as the
/// manager runs.
async fn renewal_worker(pools: Arc<Pools>, shutdown: CancellationToken) {
    let every =
        std::time::Duration::from_millis(u64::from(pools.control.config().member_cert_check_ms));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let p = pools.clone();
        match tokio::task::spawn_blocking(move || p.renew_member_certs()).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(renewed = n, "member certificates renewed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "member certificate renewal failed"),
            Err(e) => tracing::warn!(error = %e, "member certificate renewal task failed"),
        }
    }
}

/// Most member certificates one renewal pass signs: a fleet whose
/// certificates all fall due together (pools created at once, a manager
/// that was down) is renewed over several passes, not in one burst.
pub const RENEWALS_PER_PASS: usize = 64;

/// When a member certificate is renewed (ms since the epoch): when a third
/// of its life is left, brought forward by up to a tenth of its life by an
/// amount that depends only on its serial. Certificates issued together
/// (a pool's members, pools created in one go) thus fall due spread over
/// that tenth, and a restarted manager computes the same moments.
pub fn renew_at(m: &MemberRecord, validity_ms: u64) -> u64 {
    let spread = validity_ms / 10;
    let jitter = if spread == 0 {
        0
    } else {
        let h = sha2::Sha256::digest(m.cert_serial.as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[..8]);
        u64::from_le_bytes(b) % spread
    };
    m.cert_not_after_ms
        .saturating_sub(validity_ms / 3)
        .saturating_sub(jitter)
}

/// The certificates due at `now`, most urgent first, at most `max`: (pool
/// key, slot).
pub fn due_renewals(r: &Registry, validity_ms: u64, now: u64, max: usize) -> Vec<(String, u32)> {
    let mut due: Vec<(u64, &String, u32)> = r
        .pools
        .iter()
        .flat_map(|(key, p)| {
            p.members
                .iter()
                .map(move |m| (renew_at(m, validity_ms), key, m.slot))
        })
        .filter(|(at, _, _)| *at <= now)
        .collect();
    due.sort();
    due.into_iter()
        .take(max)
        .map(|(_, key, slot)| (key.clone(), slot))
        .collect()
}

fn members_view(r: &Registry, pool: &PoolRecord) -> Vec<MemberView> {
    pool.members
        .iter()
        .map(|m| MemberView {
            slot: m.slot,
            node_id: m.node_id.clone(),
            cert_pem: m.cert_pem.clone(),
            cert_serial: m.cert_serial.clone(),
            cert_not_after_ms: m.cert_not_after_ms,
            generation: m.generation,
            peer_address: r
                .node_of_tenant(&pool.tenant, &m.node_id)
                .map(|n| n.peer_address.clone())
                .unwrap_or_default(),
        })
        .collect()
}

/// Everything one app report changes in the registry, or `None` if it
/// changes nothing (or the node is no member of the reported pool).
struct ReportChanges {
    tenant: String,
    slot: u32,
    apps: AppChanges,
    /// The failover to this node is done: (from node, lost at).
    done: Option<(String, u64)>,
    offloads: Vec<crate::model::OffloadRec>,
}

fn report_changes(
    r: &Registry,
    node: &NodeKey,
    report: &AppReport,
    previous: Option<&AppReport>,
) -> Option<ReportChanges> {
    let node_id = node.node_id();
    let n = r.node(node)?;
    let p = r.pools.get(&PoolRecord::key(&n.tenant, &report.pool))?;
    let slot = p.member_of(node_id)?.slot;
    let apps = app_changes(node_id, report, previous, &p.running);
    let done = p
        .inflight
        .iter()
        .find(|f| f.slot == slot && f.node_id == node_id)
        .filter(|_| {
            p.group(slot).iter().all(|a| {
                report.apps.iter().any(|run| {
                    run.name == a.name && run.state == AppRunState::Running && run.pid != 0
                })
            })
        })
        .map(|f| (f.from_node.clone(), f.lost_at_ms));
    let seen = p.offloads_seen.get(node_id).copied().unwrap_or(0);
    let offloads: Vec<crate::model::OffloadRec> = report
        .offloads
        .iter()
        .filter(|o| o.triggered_at_ms > seen)
        .cloned()
        .collect();
    if apps.events.is_empty() && apps.running == p.running && done.is_none() && offloads.is_empty()
    {
        return None;
    }
    Some(ReportChanges {
        tenant: p.tenant.clone(),
        slot,
        apps,
        done,
        offloads,
    })
}

/// What a new report changes: the running set of this node's apps and the
/// events to record.
struct AppChanges {
    running: BTreeMap<String, RunningApp>,
    events: Vec<(EventKind, String, String)>,
}

fn app_changes(
    node_id: &str,
    report: &AppReport,
    previous: Option<&AppReport>,
    running: &BTreeMap<String, RunningApp>,
) -> AppChanges {
    let mut next = running.clone();
    let mut events = Vec::new();
    for app in &report.apps {
        let known = running.get(&app.name).filter(|r| r.node_id == node_id);
        let before = previous.and_then(|p| p.apps.iter().find(|a| a.name == app.name));
        let crashed = before.is_some_and(|b| app.restarts > b.restarts);
        if crashed {
            events.push((
                EventKind::AppExited,
                app.name.clone(),
                app.last_exit.clone(),
            ));
        }
        if app.state == AppRunState::Running
            && app.pid != 0
            && known.map(|k| k.pid) != Some(app.pid)
        {
            // A new process under a name this node already ran. Unless the
            // old one exited by itself (APP_EXITED above), it was stopped to
            // be replaced (its spec changed): say so before the start.
            if let Some(k) = known
                && k.pid != 0
                && !crashed
            {
                events.push((
                    EventKind::AppStopped,
                    app.name.clone(),
                    format!("pid {} (replaced)", k.pid),
                ));
            }
            events.push((
                EventKind::AppStarted,
                app.name.clone(),
                format!("pid {}", app.pid),
            ));
            next.insert(
                app.name.clone(),
                RunningApp {
                    node_id: node_id.to_string(),
                    pid: app.pid,
                },
            );
        }
    }
    let still: BTreeSet<&str> = report
        .apps
        .iter()
        .filter(|a| !matches!(a.state, AppRunState::Stopped))
        .map(|a| a.name.as_str())
        .collect();
    let mut stopped: BTreeSet<&str> = BTreeSet::new();
    for (name, r) in running {
        if r.node_id == node_id && !still.contains(name.as_str()) {
            events.push((
                EventKind::AppStopped,
                name.clone(),
                format!("pid {}", r.pid),
            ));
            stopped.insert(name);
            next.remove(name);
        }
    }
    // An app this node ran in its previous report and runs no more, whose
    // name another node has taken over meanwhile (it moved to another slot,
    // or was offloaded): its process here stopped too.
    for app in previous.map(|p| p.apps.as_slice()).unwrap_or_default() {
        if app.pid != 0
            && !matches!(app.state, AppRunState::Stopped)
            && !still.contains(app.name.as_str())
            && !stopped.contains(app.name.as_str())
        {
            events.push((
                EventKind::AppStopped,
                app.name.clone(),
                format!("pid {}", app.pid),
            ));
        }
    }
    AppChanges {
        running: next,
        events,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 24 * 3600 * 1000;

    fn member(slot: u32, serial: &str, not_after: u64) -> MemberRecord {
        MemberRecord {
            slot,
            node_id: format!("n{slot}"),
            cert_pem: String::new(),
            cert_serial: serial.into(),
            cert_not_after_ms: not_after,
            generation: 1,
        }
    }

    #[test]
    fn renewals_are_spread_over_a_tenth_of_the_life_and_stable() {
        let not_after = 10 * DAY_MS;
        let at: Vec<u64> = (0..1000)
            .map(|i| renew_at(&member(1, &format!("{i:032x}"), not_after), DAY_MS))
            .collect();
        let latest = not_after - DAY_MS / 3;
        assert!(at.iter().all(|t| *t <= latest && *t > latest - DAY_MS / 10));
        // Spread out: 1000 certificates over 8640 seconds, rarely two in one.
        let distinct: BTreeSet<u64> = at.iter().map(|t| t / 1000).collect();
        assert!(distinct.len() > 900, "{}", distinct.len());
        // The same certificate falls due at the same moment every time.
        let m = member(1, "abcdef", not_after);
        assert_eq!(renew_at(&m, DAY_MS), renew_at(&m.clone(), DAY_MS));
    }

    #[test]
    fn one_pass_takes_at_most_its_bound_most_urgent_first() {
        let mut r = Registry::default();
        for p in 0..100u32 {
            let members = (1..=3)
                .map(|s| member(s, &format!("{p:04}{s}"), DAY_MS + u64::from(p) * 1000))
                .collect();
            let pool = PoolRecord {
                name: format!("p{p:03}"),
                tenant: "t".into(),
                ca: crate::chain::PoolCa {
                    cert_pem: String::new(),
                    key_pem: String::new(),
                },
                members,
                apps: Vec::new(),
                groups: BTreeMap::new(),
                policy: PolicyDef::default(),
                generation: 1,
                created_at_ms: 0,
                running: BTreeMap::new(),
                spare_labels: BTreeMap::new(),
                degraded: BTreeSet::new(),
                inflight: Vec::new(),
                offloads_seen: BTreeMap::new(),
            };
            r.pools.insert(PoolRecord::key("t", &pool.name), pool);
        }
        // Nothing is due early on; everything once the certificates expire.
        assert!(due_renewals(&r, DAY_MS, 0, RENEWALS_PER_PASS).is_empty());
        let due = due_renewals(&r, DAY_MS, 2 * DAY_MS, RENEWALS_PER_PASS);
        assert_eq!(due.len(), RENEWALS_PER_PASS);
        let first = &r.pools.get(&due[0].0).unwrap().members[due[0].1 as usize - 1];
        let all_due = due_renewals(&r, DAY_MS, 2 * DAY_MS, usize::MAX);
        assert_eq!(all_due.len(), 300);
        assert!(all_due.iter().all(|(k, s)| renew_at(
            &r.pools.get(k).unwrap().members[*s as usize - 1],
            DAY_MS
        ) >= renew_at(first, DAY_MS)));
    }
}
