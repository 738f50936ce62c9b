//! Pools in the domain: records, validation of tenant requests and the
//! planning of app groups. Pure: no I/O, no tonic or prost.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::chain::PoolCa;
use crate::node_key::NodeKey;
use crate::partition::{AppRequest, partition};
use crate::resources::Resources;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppDef {
    pub name: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    pub priority: i32,
    pub offloadable: bool,
    /// Explicit group asked for by the tenant.
    pub slot: Option<u32>,
    pub artifact: String,
    /// What an isolated node does with the app (see `OnDisconnect`).
    #[serde(default)]
    pub on_disconnect: OnDisconnect,
    /// Hard limits on the node (None or a 0 field: the request in
    /// `resources` is the limit). A nonzero field is >= its request.
    #[serde(default)]
    pub limits: Option<Resources>,
}

/// What a node cut off from the manager and from every peer for longer
/// than its isolation lease does with an app.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnDisconnect {
    #[default]
    KeepRunning,
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    pub high: f64,
    pub low: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TargetMode {
    #[default]
    Single,
    Spread,
}

/// Resource-threshold policy of a pool (evaluated by the agents).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyDef {
    pub cpu: Threshold,
    pub memory: Threshold,
    pub disk: Threshold,
    pub network: Threshold,
    /// Disk read+write rate against the node's disk I/O capacity (absent in
    /// pools stored before it existed: the default).
    #[serde(default = "default_disk_io")]
    pub disk_io: Threshold,
    pub sustain_seconds: u32,
    pub cooldown_seconds: u32,
    pub target: TargetMode,
    pub version: u64,
    /// Bring offloaded apps back once the home node stayed under `low`.
    #[serde(default)]
    pub return_home: bool,
    #[serde(default)]
    pub return_home_seconds: u32,
}

/// The default disk I/O thresholds (the same as for disk space).
fn default_disk_io() -> Threshold {
    Threshold {
        high: 0.9,
        low: 0.8,
    }
}

impl Default for PolicyDef {
    fn default() -> Self {
        PolicyDef {
            cpu: Threshold {
                high: 0.8,
                low: 0.6,
            },
            memory: Threshold {
                high: 0.85,
                low: 0.7,
            },
            disk: Threshold {
                high: 0.9,
                low: 0.8,
            },
            network: Threshold {
                high: 0.8,
                low: 0.6,
            },
            disk_io: default_disk_io(),
            sustain_seconds: 10,
            cooldown_seconds: 60,
            target: TargetMode::Single,
            version: 1,
            return_home: false,
            return_home_seconds: 60,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub slot: u32,
    pub node_id: String,
    pub cert_pem: String,
    pub cert_serial: String,
    pub cert_not_after_ms: u64,
    pub generation: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolRecord {
    pub name: String,
    pub tenant: String,
    pub ca: PoolCa,
    /// members[i] holds slot i + 1.
    pub members: Vec<MemberRecord>,
    pub apps: Vec<AppDef>,
    /// App name -> slot (its group).
    pub groups: BTreeMap<String, u32>,
    pub policy: PolicyDef,
    pub generation: u64,
    pub created_at_ms: u64,
    /// The last known process of each running app (from agent reports), so
    /// start/stop events survive a manager restart without being repeated.
    #[serde(default)]
    pub running: BTreeMap<String, RunningApp>,
    /// A spare must carry these labels to take over a slot.
    #[serde(default)]
    pub spare_labels: BTreeMap<String, String>,
    /// Slots whose node failed and no suitable spare was free yet.
    #[serde(default)]
    pub degraded: BTreeSet<u32>,
    /// Failovers whose target has not reported the whole group running yet.
    #[serde(default)]
    pub inflight: Vec<InFlight>,
    /// Per node: the decision time of the newest offload already recorded
    /// as an event (agents resend their records until they are seen).
    #[serde(default)]
    pub offloads_seen: BTreeMap<String, u64>,
}

/// A slot moved to `node_id`, waiting for its group to run there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    pub slot: u32,
    pub node_id: String,
    pub from_node: String,
    /// When the failed node was lost (start of the failover's clock).
    pub lost_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningApp {
    pub node_id: String,
    pub pid: u32,
}

impl PoolRecord {
    /// Key of a pool in the registry: pool names are unique per tenant.
    pub fn key(tenant: &str, name: &str) -> String {
        format!("{tenant}/{name}")
    }

    /// The keys of the members' nodes (all of the pool's tenant), in slot
    /// order.
    pub fn member_keys(&self) -> impl Iterator<Item = NodeKey> + '_ {
        self.members
            .iter()
            .map(|m| NodeKey::new(&self.tenant, &m.node_id))
    }

    pub fn member_of(&self, node_id: &str) -> Option<&MemberRecord> {
        self.members.iter().find(|m| m.node_id == node_id)
    }

    /// The apps of group `slot`, in pool order.
    pub fn group(&self, slot: u32) -> Vec<AppDef> {
        self.apps
            .iter()
            .filter(|a| self.groups.get(&a.name) == Some(&slot))
            .cloned()
            .collect()
    }
}

/// A refused pool request. `Invalid` is the request's own fault
/// (InvalidArgument); `Precondition` depends on current state
/// (FailedPrecondition). Both name the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("{field}: {why}")]
    Invalid { field: String, why: String },
    #[error("{field}: {why}")]
    Precondition { field: String, why: String },
    #[error("pool {0:?} not found")]
    NotFound(String),
}

pub(crate) fn invalid(field: impl Into<String>, why: impl Into<String>) -> PoolError {
    PoolError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

pub(crate) fn precondition(field: impl Into<String>, why: impl Into<String>) -> PoolError {
    PoolError::Precondition {
        field: field.into(),
        why: why.into(),
    }
}

/// App names: 1-63 characters of `[a-z0-9-_.]`, starting with a letter or
/// digit (they name directories on the nodes).
fn validate_app_name(field: &str, name: &str) -> Result<(), PoolError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} must be 1-63 characters of [a-z0-9-_.], starting with a letter or digit"
            ),
        ))
    }
}

/// Checks every app on its own and the set as a whole (for `m` slots).
pub fn validate_apps(apps: &[AppDef], m: usize) -> Result<(), PoolError> {
    if apps.len() < m {
        return Err(invalid(
            "apps",
            format!(
                "{} apps for {m} nodes: every node needs at least one app (N >= M)",
                apps.len()
            ),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, app) in apps.iter().enumerate() {
        validate_app_name(&format!("apps[{i}].name"), &app.name)?;
        if !names.insert(app.name.as_str()) {
            return Err(invalid(
                format!("apps[{i}].name"),
                format!("duplicate app name {:?}", app.name),
            ));
        }
        if app.command.is_empty() || app.command[0].is_empty() {
            return Err(invalid(
                format!("apps[{i}].command"),
                "must name a program (argv[0])",
            ));
        }
        if app.command.iter().any(|a| a.contains('\0')) {
            return Err(invalid(
                format!("apps[{i}].command"),
                "must not contain NUL bytes",
            ));
        }
        for (k, v) in &app.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(invalid(
                    format!("apps[{i}].env"),
                    format!("invalid variable {k:?}"),
                ));
            }
        }
        if !app.artifact.is_empty() {
            // Nothing can upload an artifact yet: refuse rather than run
            // the app without it.
            return Err(invalid(
                format!("apps[{i}].artifact"),
                "artifacts are not supported yet; leave it empty and name the program in `command`",
            ));
        }
        if let Some(limits) = &app.limits {
            validate_limits(i, limits, &app.resources)?;
        }
        if let Some(slot) = app.slot
            && (slot == 0 || slot as usize > m)
        {
            return Err(invalid(
                format!("apps[{i}].slot"),
                format!("{slot} is outside 1..={m}"),
            ));
        }
    }
    Ok(())
}

/// A limit below its request could never be met: refused, naming the field.
fn validate_limits(i: usize, limits: &Resources, request: &Resources) -> Result<(), PoolError> {
    for (field, limit, want) in [
        ("cpu_millis", limits.cpu_millis, request.cpu_millis),
        ("memory_mb", limits.memory_mb, request.memory_mb),
        ("disk_mb", limits.disk_mb, request.disk_mb),
        ("network_mbps", limits.network_mbps, request.network_mbps),
        ("disk_io_kbps", limits.disk_io_kbps, request.disk_io_kbps),
    ] {
        if limit != 0 && limit < want {
            return Err(invalid(
                format!("apps[{i}].limits.{field}"),
                format!(
                    "{limit} is below the request resources.{field} ({want}); a limit must be \
                     >= its request (or 0: the request is the limit)"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks a policy: for every resource 0 < low < high <= 1.
pub fn validate_policy(p: &PolicyDef) -> Result<(), PoolError> {
    for (name, t) in [
        ("cpu", p.cpu),
        ("memory", p.memory),
        ("disk", p.disk),
        ("network", p.network),
        ("disk_io", p.disk_io),
    ] {
        let ok = t.high.is_finite()
            && t.low.is_finite()
            && 0.0 < t.low
            && t.low < t.high
            && t.high <= 1.0;
        if !ok {
            return Err(invalid(
                format!("policy.{name}"),
                format!(
                    "need 0 < low < high <= 1, got low {} high {}",
                    t.low, t.high
                ),
            ));
        }
    }
    if p.cooldown_seconds > 24 * 3600 || p.sustain_seconds > 24 * 3600 {
        return Err(invalid(
            "policy",
            "sustain_seconds and cooldown_seconds must be at most 86400",
        ));
    }
    Ok(())
}

/// Decides the group of every app: apps with an explicit slot get it; apps
/// in `pinned` (already running in a slot) keep theirs when they can; the
/// rest are bin-packed against `capacities` (capacities[i] = slot i + 1).
///
/// Keeping every running app where it is can leave a slot empty (all of
/// its apps were removed). Then kept apps are let go one at a time, from
/// the most crowded slot first and, among those, apps in `changed` first
/// (they restart anyway), until the apps fit; an error names what is left
/// when only the explicit slots remain.
pub fn plan_groups(
    apps: &[AppDef],
    capacities: &[Resources],
    pinned: &BTreeMap<String, u32>,
    changed: &BTreeSet<String>,
) -> Result<BTreeMap<String, u32>, PoolError> {
    let mut kept: BTreeMap<String, u32> = apps
        .iter()
        .filter(|a| a.slot.is_none())
        .filter_map(|a| pinned.get(&a.name).map(|s| (a.name.clone(), *s)))
        .collect();
    loop {
        let requests: Vec<AppRequest> = apps
            .iter()
            .map(|a| AppRequest {
                name: a.name.clone(),
                request: a.resources,
                slot: a.slot.or_else(|| kept.get(&a.name).copied()),
            })
            .collect();
        match partition(&requests, capacities) {
            Ok(slots) => return Ok(apps.iter().map(|a| a.name.clone()).zip(slots).collect()),
            Err(e) => match unpin_one(&kept, changed) {
                Some(name) => {
                    kept.remove(&name);
                }
                None => {
                    return Err(precondition("apps", format!("cannot place the apps: {e}")));
                }
            },
        }
    }
}

/// The kept app to let move next: from a slot that keeps more than one app,
/// an app that restarts anyway, then by name (deterministic).
fn unpin_one(kept: &BTreeMap<String, u32>, changed: &BTreeSet<String>) -> Option<String> {
    let mut per_slot: BTreeMap<u32, usize> = BTreeMap::new();
    for slot in kept.values() {
        *per_slot.entry(*slot).or_default() += 1;
    }
    kept.iter()
        .min_by_key(|(name, slot)| {
            (
                per_slot.get(slot).copied().unwrap_or(0) <= 1,
                !changed.contains(*name),
                (*name).clone(),
            )
        })
        .map(|(name, _)| name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> AppDef {
        AppDef {
            name: name.into(),
            command: vec!["sleep".into(), "1000".into()],
            env: BTreeMap::new(),
            resources: Resources::default(),
            priority: 0,
            offloadable: true,
            slot: None,
            artifact: String::new(),
            on_disconnect: OnDisconnect::KeepRunning,
            limits: None,
        }
    }

    #[test]
    fn limits_below_the_request_are_refused_naming_the_field() {
        let asks = Resources {
            cpu_millis: 200,
            memory_mb: 64,
            ..Resources::default()
        };
        let limited = |cpu_millis, memory_mb| AppDef {
            resources: asks,
            limits: Some(Resources {
                cpu_millis,
                memory_mb,
                ..Resources::default()
            }),
            ..app("b")
        };
        match validate_apps(&[app("a"), limited(500, 32)], 2) {
            Err(PoolError::Invalid { field, why }) => {
                assert_eq!(field, "apps[1].limits.memory_mb");
                assert!(why.contains("64"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        match validate_apps(&[app("a"), limited(100, 0)], 2) {
            Err(PoolError::Invalid { field, .. }) => assert_eq!(field, "apps[1].limits.cpu_millis"),
            other => panic!("{other:?}"),
        }
        // 0 = the request; equal or above is fine.
        validate_apps(&[app("a"), limited(0, 64)], 2).unwrap();
        validate_apps(&[app("a"), limited(1000, 0)], 2).unwrap();
    }

    #[test]
    fn app_validation_names_the_field() {
        let cases: Vec<(Vec<AppDef>, &str)> = vec![
            (vec![app("a")], "apps"),
            (vec![app("a"), app("a")], "apps[1].name"),
            (vec![app("a"), app("B")], "apps[1].name"),
            (
                vec![
                    app("a"),
                    AppDef {
                        command: vec![],
                        ..app("b")
                    },
                ],
                "apps[1].command",
            ),
            (
                vec![
                    app("a"),
                    AppDef {
                        slot: Some(3),
                        ..app("b")
                    },
                ],
                "apps[1].slot",
            ),
            (
                vec![
                    app("a"),
                    AppDef {
                        slot: Some(0),
                        ..app("b")
                    },
                ],
                "apps[1].slot",
            ),
            (
                vec![
                    app("a"),
                    AppDef {
                        env: [("A=B".to_string(), "x".to_string())].into(),
                        ..app("b")
                    },
                ],
                "apps[1].env",
            ),
        ];
        for (apps, field) in cases {
            match validate_apps(&apps, 2) {
                Err(PoolError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        validate_apps(&[app("a"), app("b_1.x")], 2).unwrap();
    }

    #[test]
    fn artifacts_are_refused_until_they_can_be_uploaded() {
        let with_artifact = AppDef {
            artifact: "site.tar".into(),
            ..app("b")
        };
        match validate_apps(&[app("a"), with_artifact], 2) {
            Err(PoolError::Invalid { field, .. }) => assert_eq!(field, "apps[1].artifact"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn policy_validation() {
        validate_policy(&PolicyDef::default()).unwrap();
        let mut p = PolicyDef {
            memory: Threshold {
                high: 0.5,
                low: 0.6,
            },
            ..PolicyDef::default()
        };
        assert!(
            validate_policy(&p)
                .unwrap_err()
                .to_string()
                .contains("policy.memory")
        );
        p.memory = Threshold {
            high: 1.5,
            low: 0.6,
        };
        assert!(validate_policy(&p).is_err());
        p.memory = Threshold {
            high: f64::NAN,
            low: 0.6,
        };
        assert!(validate_policy(&p).is_err());
        p.memory = PolicyDef::default().memory;
        p.disk_io = Threshold {
            high: 0.7,
            low: 0.8,
        };
        assert!(
            validate_policy(&p)
                .unwrap_err()
                .to_string()
                .contains("policy.disk_io")
        );
    }

    #[test]
    fn policy_without_disk_io_loads_with_the_default() {
        let mut v = serde_json::to_value(PolicyDef::default()).unwrap();
        v.as_object_mut().unwrap().remove("disk_io");
        let p: PolicyDef = serde_json::from_value(v).unwrap();
        assert_eq!(p.disk_io, default_disk_io());
    }

    #[test]
    fn pinned_apps_keep_their_slot() {
        let cap = Resources {
            cpu_millis: 1000,
            memory_mb: 1000,
            disk_mb: 1000,
            network_mbps: 100,
            disk_io_kbps: 0,
        };
        let apps = vec![app("a"), app("b"), app("c")];
        let pinned: BTreeMap<String, u32> = [("a".to_string(), 2)].into();
        let groups = plan_groups(&apps, &[cap, cap], &pinned, &BTreeSet::new()).unwrap();
        assert_eq!(groups["a"], 2);
        assert_eq!(groups.len(), 3);
    }

    #[test]
    fn kept_apps_move_when_a_slot_would_be_empty() {
        let cap = Resources {
            cpu_millis: 1000,
            memory_mb: 1000,
            disk_mb: 1000,
            network_mbps: 100,
            disk_io_kbps: 0,
        };
        // web and db ran in slot 2, queue (now removed) alone in slot 1.
        let apps = vec![app("web"), app("db")];
        let pinned: BTreeMap<String, u32> = [
            ("web".to_string(), 2),
            ("db".to_string(), 2),
            ("queue".to_string(), 1),
        ]
        .into();
        // web restarts anyway (its spec changed): it is the one that moves.
        let changed: BTreeSet<String> = ["web".to_string()].into();
        let groups = plan_groups(&apps, &[cap, cap], &pinned, &changed).unwrap();
        assert_eq!(groups["db"], 2);
        assert_eq!(groups["web"], 1);
        // Without a changed app, one of them still moves: no empty slot.
        let groups = plan_groups(&apps, &[cap, cap], &pinned, &BTreeSet::new()).unwrap();
        assert_ne!(groups["db"], groups["web"]);
        // An explicit slot that leaves another slot empty is still refused.
        let pinned_apps = vec![
            AppDef {
                slot: Some(2),
                ..app("web")
            },
            AppDef {
                slot: Some(2),
                ..app("db")
            },
        ];
        let err = plan_groups(&pinned_apps, &[cap, cap], &pinned, &changed).unwrap_err();
        assert!(err.to_string().contains("cannot place the apps"), "{err}");
    }
}
