//! The pool file (`pool.toml`) of `edgectl pool create -f` and
//! `edgectl pool apps -f`. Unknown keys are errors that name the key.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use edgepool_common::proto as pb;
use serde::Deserialize;

/// The format, shown by `edgectl pool create --help` (and documented at the
/// top of `cloud-manager/pool.example.toml`).
pub const FORMAT_HELP: &str = "\
The pool file (TOML; unknown keys are errors):

  name = \"web\"                        # 1-63 characters of [a-z0-9-]
  nodes = [\"dev-1\", \"dev-2\", \"dev-3\"]  # M >= 2 FREE nodes; nodes[i] gets slot i+1
  spare_labels = { zone = \"lab\" }     # optional: failover moves a slot only to a
                                      # FREE node carrying all these labels

  [policy]                            # optional, and so is every field in it; what
                                      # is left out takes the default shown here
  target = \"single\"                   # \"single\": all to the one member with the most
                                      # headroom; \"spread\": over all other members
  sustain_seconds = 10                # how long a threshold must be crossed
  cooldown_seconds = 60               # pause after an offload
  cpu = { high = 0.8, low = 0.6 }     # watermarks, fractions of capacity:
  memory = { high = 0.85, low = 0.7 } # 0 < low < high <= 1
  disk = { high = 0.9, low = 0.8 }
  network = { high = 0.8, low = 0.6 }
  disk_io = { high = 0.9, low = 0.8 } # disk read+write rate vs the node's
                                      # capacity.disk_io_kbps (0 there = not evaluated)
  return_home = false                 # bring offloaded apps back once their home
  return_home_seconds = 60            # node stayed under every `low` this long

  [[apps]]                            # N >= M apps
  name = \"api\"                        # 1-63 characters of [a-z0-9-_.], unique
  command = [\"sleep\", \"1000\"]         # argv; command[0] is looked up in PATH on the node
  env = { MODE = \"prod\" }             # optional
  resources = { cpu_millis = 100, memory_mb = 64, disk_mb = 0, network_mbps = 0, disk_io_kbps = 0 }
                                      # optional; what the app needs (millicores, MiB, MiB,
                                      # Mbit/s, KiB/s); all but disk_io_kbps are packed
                                      # against node capacity
  limits = { cpu_millis = 500, memory_mb = 128 }
                                      # optional; hard limits on the node (CPU
                                      # quota, memory cap: OOM-killed past it);
                                      # absent or 0 = the request is the limit
  priority = 0                        # optional; lower is offloaded first
  offloadable = true                  # optional, default true
  slot = 1                            # optional explicit group 1..M
  on_disconnect = \"keep\"              # optional: \"keep\" running or \"stop\" when the node
                                      # is cut off from the manager and every peer

`edgectl pool apps NAME -f FILE` uses only the [[apps]] of such a file
(`name` and `nodes` may then be left out), `edgectl policy set NAME -f FILE`
only its [policy]. See cloud-manager/pool.example.toml and docs/api.md.";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub name: Option<String>,
    #[serde(default)]
    pub nodes: Vec<String>,
    pub policy: Option<PolicyFile>,
    /// Failover only moves a slot to a FREE node carrying all these labels.
    #[serde(default)]
    pub spare_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub apps: Vec<AppFile>,
}

/// What an app does on a node cut off from the manager and every peer.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnDisconnectFile {
    #[default]
    Keep,
    Stop,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub target: Option<Target>,
    pub sustain_seconds: Option<u32>,
    pub cooldown_seconds: Option<u32>,
    pub cpu: Option<ThresholdFile>,
    pub memory: Option<ThresholdFile>,
    pub disk: Option<ThresholdFile>,
    pub network: Option<ThresholdFile>,
    /// Disk read+write rate against the node's disk I/O capacity.
    pub disk_io: Option<ThresholdFile>,
    /// Bring offloaded apps back home once the home node is calm again.
    pub return_home: Option<bool>,
    pub return_home_seconds: Option<u32>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    #[serde(alias = "SINGLE")]
    Single,
    #[serde(alias = "SPREAD")]
    Spread,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdFile {
    pub high: f64,
    pub low: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: ResourcesFile,
    /// Hard limits (absent or 0 in a field: the request is the limit).
    pub limits: Option<ResourcesFile>,
    #[serde(default)]
    pub priority: i32,
    #[serde(default = "yes")]
    pub offloadable: bool,
    pub slot: Option<u32>,
    #[serde(default)]
    pub artifact: String,
    #[serde(default)]
    pub on_disconnect: OnDisconnectFile,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    #[serde(default)]
    pub cpu_millis: u64,
    #[serde(default)]
    pub memory_mb: u64,
    #[serde(default)]
    pub disk_mb: u64,
    #[serde(default)]
    pub network_mbps: u64,
    #[serde(default)]
    pub disk_io_kbps: u64,
}

impl ResourcesFile {
    fn to_proto(self) -> pb::Resources {
        pb::Resources {
            cpu_millis: self.cpu_millis,
            memory_mb: self.memory_mb,
            disk_mb: self.disk_mb,
            network_mbps: self.network_mbps,
            disk_io_kbps: self.disk_io_kbps,
        }
    }
}

/// Parses a pool file's text.
pub fn parse(text: &str) -> Result<PoolFile, toml::de::Error> {
    toml::from_str(text)
}

/// Reads and parses a pool file; errors name the file (and the key).
pub fn load(path: &Path) -> anyhow::Result<PoolFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read pool file {}", path.display()))?;
    parse(&text).map_err(|e| anyhow::anyhow!("pool file {}: {e}", path.display()))
}

impl PoolFile {
    /// The `CreatePool` request; `name` and `nodes` are required here.
    pub fn create_request(&self, path: &Path) -> anyhow::Result<pb::CreatePoolRequest> {
        let Some(name) = self.name.clone().filter(|n| !n.is_empty()) else {
            bail!(
                "pool file {}: `name` is missing (e.g. name = \"web\")",
                path.display()
            );
        };
        if self.nodes.is_empty() {
            bail!(
                "pool file {}: `nodes` is missing or empty (e.g. nodes = [\"dev-1\", \"dev-2\"])",
                path.display()
            );
        }
        if self.apps.is_empty() {
            bail!(
                "pool file {}: no [[apps]] (a pool needs at least as many apps as nodes)",
                path.display()
            );
        }
        Ok(pb::CreatePoolRequest {
            name,
            node_ids: self.nodes.clone(),
            apps: self.app_specs(),
            policy: self.policy.as_ref().map(PolicyFile::to_proto),
            spare_labels: self.spare_labels.clone().into_iter().collect(),
        })
    }

    /// The apps as wire specs.
    pub fn app_specs(&self) -> Vec<pb::AppSpec> {
        self.apps.iter().map(AppFile::to_proto).collect()
    }
}

impl PolicyFile {
    /// Left-out fields stay unset (0 / absent), which the manager reads as
    /// "use the default".
    pub fn to_proto(&self) -> pb::Policy {
        let t = |t: Option<ThresholdFile>| {
            t.map(|t| pb::Threshold {
                high: t.high,
                low: t.low,
            })
        };
        pb::Policy {
            cpu: t(self.cpu),
            memory: t(self.memory),
            disk: t(self.disk),
            network: t(self.network),
            disk_io: t(self.disk_io),
            sustain_seconds: self.sustain_seconds.unwrap_or(0),
            cooldown_seconds: self.cooldown_seconds.unwrap_or(0),
            target: match self.target {
                None => pb::TargetMode::Unspecified,
                Some(Target::Single) => pb::TargetMode::Single,
                Some(Target::Spread) => pb::TargetMode::Spread,
            } as i32,
            version: 0,
            return_home: self.return_home.unwrap_or(false),
            return_home_seconds: self.return_home_seconds.unwrap_or(0),
        }
    }
}

impl AppFile {
    pub fn to_proto(&self) -> pb::AppSpec {
        pb::AppSpec {
            name: self.name.clone(),
            command: self.command.clone(),
            env: self.env.clone().into_iter().collect(),
            resources: Some(self.resources.to_proto()),
            limits: self.limits.map(|l| l.to_proto()),
            priority: self.priority,
            offloadable: self.offloadable,
            slot: self.slot,
            artifact: self.artifact.clone(),
            on_disconnect: match self.on_disconnect {
                OnDisconnectFile::Keep => pb::OnDisconnect::KeepRunning,
                OnDisconnectFile::Stop => pb::OnDisconnect::Stop,
            } as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "web"
nodes = ["dev-1", "dev-2", "dev-3"]
[policy]
target = "spread"
sustain_seconds = 5
cpu = { high = 0.9, low = 0.5 }
disk_io = { high = 0.7, low = 0.4 }
[[apps]]
name = "api"
command = ["sleep", "1000"]
env = { MODE = "prod" }
resources = { cpu_millis = 100, memory_mb = 64 }
priority = 3
slot = 2
[[apps]]
name = "worker"
command = ["sh", "-c", "sleep 1000"]
offloadable = false
"#;

    #[test]
    fn full_file_converts() {
        let f = parse(FULL).unwrap();
        let req = f.create_request(Path::new("p.toml")).unwrap();
        assert_eq!(req.name, "web");
        assert_eq!(req.node_ids, ["dev-1", "dev-2", "dev-3"]);
        let p = req.policy.unwrap();
        assert_eq!(p.target, pb::TargetMode::Spread as i32);
        assert_eq!(p.sustain_seconds, 5);
        assert_eq!(p.cooldown_seconds, 0);
        assert_eq!(p.cpu.map(|t| (t.high, t.low)), Some((0.9, 0.5)));
        assert!(p.memory.is_none());
        assert_eq!(p.disk_io.map(|t| (t.high, t.low)), Some((0.7, 0.4)));
        assert_eq!(req.apps.len(), 2);
        let a = &req.apps[0];
        assert_eq!(a.env.get("MODE").map(String::as_str), Some("prod"));
        assert_eq!(
            a.resources.map(|r| (r.cpu_millis, r.memory_mb, r.disk_mb)),
            Some((100, 64, 0))
        );
        assert_eq!((a.priority, a.offloadable, a.slot), (3, true, Some(2)));
        assert!(!req.apps[1].offloadable);
        assert_eq!(req.apps[1].slot, None);
    }

    #[test]
    fn unknown_keys_are_named_at_every_level() {
        for (text, key) in [
            ("name = \"p\"\ncolour = \"red\"\n", "colour"),
            ("[policy]\ntargett = \"single\"\n", "targett"),
            ("[policy]\ncpu = { high = 0.8, lo = 0.1 }\n", "lo"),
            (
                "[[apps]]\nname = \"a\"\ncommand = [\"x\"]\nrestart = \"always\"\n",
                "restart",
            ),
            (
                "[[apps]]\nname = \"a\"\ncommand = [\"x\"]\nresources = { gpus = 1 }\n",
                "gpus",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = parse("[policy]\ntarget = \"all\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("all"), "{err}");
    }

    #[test]
    fn create_needs_name_nodes_and_apps() {
        let f = parse("nodes = [\"a\", \"b\"]\n").unwrap();
        let err = f
            .create_request(Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`name`"), "{err}");
        let f = parse("name = \"p\"\n").unwrap();
        let err = f
            .create_request(Path::new("p.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("`nodes`"), "{err}");
        // `pool apps` needs only the apps.
        let f = parse("[[apps]]\nname = \"a\"\ncommand = [\"x\"]\n").unwrap();
        assert_eq!(f.app_specs().len(), 1);
    }

    /// Every key of the pool file: the sample in FORMAT_HELP and the
    /// comment at the top of pool.example.toml show them all.
    const KEYS: &[&str] = &[
        "name",
        "nodes",
        "spare_labels",
        "target",
        "sustain_seconds",
        "cooldown_seconds",
        "cpu",
        "memory",
        "disk",
        "network",
        "disk_io",
        "return_home",
        "return_home_seconds",
        "command",
        "env",
        "resources",
        "limits",
        "cpu_millis",
        "memory_mb",
        "disk_mb",
        "network_mbps",
        "disk_io_kbps",
        "priority",
        "offloadable",
        "slot",
        "on_disconnect",
    ];

    #[test]
    fn the_format_help_is_a_valid_pool_file_showing_every_key() {
        // The sample lines of the help, without their comments.
        let sample: String = FORMAT_HELP
            .lines()
            .filter(|l| l.starts_with("  "))
            .map(|l| format!("{}\n", l.split(" #").next().unwrap_or_default()))
            .collect();
        let f = parse(&sample).unwrap_or_else(|e| panic!("{e}\n{sample}"));
        // Exhaustive patterns: a new key does not compile until it is added
        // here, to KEYS and to the help.
        let PoolFile {
            name,
            nodes,
            policy,
            spare_labels,
            apps,
        } = f;
        assert!(name.is_some() && !nodes.is_empty() && !spare_labels.is_empty());
        let PolicyFile {
            target,
            sustain_seconds,
            cooldown_seconds,
            cpu,
            memory,
            disk,
            network,
            disk_io,
            return_home,
            return_home_seconds,
        } = policy.expect("[policy]");
        assert!(target.is_some() && sustain_seconds.is_some() && cooldown_seconds.is_some());
        assert!(cpu.is_some() && memory.is_some() && disk.is_some() && network.is_some());
        assert!(disk_io.is_some() && return_home.is_some() && return_home_seconds.is_some());
        let AppFile {
            name: _,
            command: _,
            env,
            resources: _,
            limits,
            priority: _,
            offloadable: _,
            slot,
            artifact: _, // not supported yet: deliberately not shown
            on_disconnect: _,
        } = &apps[0];
        assert!(!env.is_empty() && slot.is_some() && limits.is_some());
        for key in KEYS {
            assert!(
                sample.contains(&format!("{key} =")),
                "{key} missing from FORMAT_HELP"
            );
        }
        // The defaults the help shows are the manager's.
        let p = parse(&sample).unwrap().policy.unwrap();
        let d = cloud_manager::pool::PolicyDef::default();
        let t = |t: Option<ThresholdFile>| t.map(|t| (t.high, t.low));
        let m = |t: cloud_manager::pool::Threshold| Some((t.high, t.low));
        assert_eq!(t(p.cpu), m(d.cpu), "cpu");
        assert_eq!(t(p.memory), m(d.memory), "memory");
        assert_eq!(t(p.disk), m(d.disk), "disk");
        assert_eq!(t(p.network), m(d.network), "network");
        assert_eq!(t(p.disk_io), m(d.disk_io), "disk_io");
        assert_eq!(p.sustain_seconds, Some(d.sustain_seconds));
        assert_eq!(p.cooldown_seconds, Some(d.cooldown_seconds));
        assert_eq!(p.return_home, Some(d.return_home));
        assert_eq!(p.return_home_seconds, Some(d.return_home_seconds));
        assert!(matches!(p.target, Some(Target::Single)));
        assert_eq!(d.target, cloud_manager::pool::TargetMode::Single);
    }

    #[test]
    fn the_example_file_documents_every_key() {
        let text = include_str!("../../../pool.example.toml");
        for key in KEYS {
            assert!(
                text.contains(&format!("{key} =")),
                "{key} missing from pool.example.toml"
            );
        }
    }

    #[test]
    fn the_example_file_parses() {
        let text = include_str!("../../../pool.example.toml");
        let f = parse(text).unwrap();
        let req = f.create_request(Path::new("pool.example.toml")).unwrap();
        assert_eq!(req.node_ids, ["dev-1", "dev-2", "dev-3"]);
        assert!(req.apps.len() >= 4);
        for a in &req.apps {
            assert!(
                ["sleep", "sh"].contains(&a.command[0].as_str()),
                "{}",
                a.name
            );
        }
    }
}
