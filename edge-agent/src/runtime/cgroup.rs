//! One cgroup per app: its memory and CPU limits, its exact usage and its
//! OOM kills.
//!
//! cgroup v2 when the agent's own cgroup offers the `memory` and `cpu`
//! controllers: the agent moves itself into the leaf `<own>/agent` (a v2
//! cgroup with children may hold no processes), enables the controllers
//! and puts each app into `<own>/apps-<tag>/<app>`. Otherwise cgroup v1:
//! `<mount><own>/apps-<tag>/<app>` in each of the `memory`, `cpu` and
//! `cpuacct` hierarchies, `<own>` being the agent's path there. `<tag>`
//! tells apart the agents of one machine that share a cgroup (tests,
//! `cloud-manager dev`). The agent weighs more than all its apps together
//! (v2: `cpu.weight` 1000 for `<own>/agent` against 100 for the apps; v1:
//! the agent moves into `<own cpu>/agent-<tag>` with twice the
//! `cpu.shares` of its apps' parent, which has one ordinary process's
//! worth per CPU), so it stays
//! responsive when its apps saturate the CPU. Empty groups that killed
//! agents left behind are removed by the next agent that starts.
//!
//! When neither works (not root, read-only cgroup file system, no
//! delegation) one warning says so and apps run without limits; usage then
//! comes from /proc alone.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// The CFS period of the CPU limit (the kernel's default).
const CPU_PERIOD_US: u64 = 100_000;
/// CPU weight of the apps' parent (v2 `cpu.weight`, default 100) and of the
/// agent's leaf: the agent wins a contended CPU 10 to 1 against all apps.
const V2_APPS_WEIGHT: u32 = 100;
const V2_AGENT_WEIGHT: u32 = 1000;
/// v1 `cpu.shares` of one ordinary process. The apps' parent gets one per
/// CPU (all apps together weigh as much as one busy process per CPU, as
/// separate processes would on a machine shared with others), the agent's
/// own group (`agent-<tag>`, next to it) twice that.
const V1_SHARES_PER_CPU: u64 = 1024;

/// v1 `cpu.shares` of the apps' parent and of the agent's group.
fn v1_shares() -> (u64, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let apps = V1_SHARES_PER_CPU * cpus;
    (apps, 2 * apps)
}
/// How long rmdir of an app's cgroup is retried after its processes died
/// (the kernel frees a cgroup a moment after its last process is reaped).
const RMDIR_WAIT: Duration = Duration::from_secs(2);

/// The limits of one app; 0 = no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Limits {
    /// Thousandths of one core.
    pub cpu_millis: u64,
    /// MiB of memory (RAM; swap is not allowed on top where the kernel can
    /// say so).
    pub memory_mb: u64,
}

/// Counters of one app's cgroup (None: not available here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counters {
    pub cpu_usec: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
}

/// The cgroups of one runtime's apps.
#[derive(Debug)]
pub(super) enum Cgroups {
    /// No limits (see the module doc); the reason was logged.
    Off,
    V2 {
        apps: PathBuf,
    },
    V1(V1),
}

#[derive(Debug, Clone)]
pub(super) struct V1 {
    memory: PathBuf,
    cpu: PathBuf,
    /// Absent on kernels without cpuacct; the same path when co-mounted
    /// with cpu.
    cpuacct: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub(super) struct CgroupError {
    what: String,
    #[source]
    source: io::Error,
}

impl Cgroups {
    /// Sets up the apps' parent cgroup of this agent (see the module doc).
    /// Never fails: what does not work is logged once and leaves limits
    /// off.
    pub(super) fn setup(tag: &str) -> Cgroups {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let v2_error = match v2_root(&own, &mounts) {
            Some((mount, path)) => match setup_v2(&mount, &path, tag) {
                Ok(apps) => {
                    tracing::info!(cgroup = %apps.display(), "app cgroups: v2");
                    return Cgroups::V2 { apps };
                }
                Err(e) => Some(e),
            },
            None => None,
        };
        match setup_v1(&own, &mounts, tag) {
            Ok(v1) => {
                tracing::info!(memory = %v1.memory.display(), cpu = %v1.cpu.display(), "app cgroups: v1");
                let cgroups = Cgroups::V1(v1.clone());
                if let Some(agents) = v1.cpu.parent() {
                    for parent in cgroups.parents() {
                        remove_stale_siblings(parent, agents);
                    }
                }
                cgroups
            }
            Err(v1_error) => {
                let v2 = v2_error.map(|e| e.to_string()).unwrap_or_else(|| {
                    "no cgroup2 mount with the memory and cpu controllers".into()
                });
                tracing::warn!(
                    v2 = %v2,
                    v1 = %v1_error,
                    "no app cgroups: apps run WITHOUT memory and CPU limits \
                     (the agent needs root and a writable cgroup file system, \
                     or a delegated cgroup v2 subtree)"
                );
                Cgroups::Off
            }
        }
    }

    pub(super) fn enabled(&self) -> bool {
        !matches!(self, Cgroups::Off)
    }

    /// Creates (or reuses) the app's cgroup and sets its limits.
    pub(super) fn create(&self, app: &str, limits: Limits) -> Result<(), CgroupError> {
        match self {
            Cgroups::Off => return Ok(()),
            Cgroups::V2 { apps } => v2_parent(apps)?,
            Cgroups::V1(v1) => v1_parents(v1)?,
        }
        for dir in self.dirs(app) {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(CgroupError {
                        what: format!("creating {}", dir.display()),
                        source,
                    });
                }
            }
        }
        self.set_limits(app, limits)
    }

    /// Writes the limits of an existing app cgroup.
    pub(super) fn set_limits(&self, app: &str, limits: Limits) -> Result<(), CgroupError> {
        let memory = limits.memory_mb.saturating_mul(MIB);
        let quota = limits.cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000;
        match self {
            Cgroups::Off => Ok(()),
            Cgroups::V2 { apps } => {
                let dir = apps.join(app);
                let max = |v: u64| {
                    if v == 0 {
                        "max".to_string()
                    } else {
                        v.to_string()
                    }
                };
                write(&dir.join("memory.max"), &max(memory))?;
                // Without swap.max the limit would only push memory to swap.
                let swap = if memory == 0 { "max" } else { "0" };
                if let Err(e) = write(&dir.join("memory.swap.max"), swap) {
                    tracing::debug!(error = %e, "memory.swap.max not set");
                }
                // The kernel's minimum quota is 1 ms per period.
                let cpu = match quota {
                    0 => format!("max {CPU_PERIOD_US}"),
                    q => format!("{} {CPU_PERIOD_US}", q.max(1000)),
                };
                write(&dir.join("cpu.max"), &cpu)
            }
            Cgroups::V1(v1) => {
                let unlimited = |v: u64| {
                    if v == 0 {
                        "-1".to_string()
                    } else {
                        v.to_string()
                    }
                };
                write(
                    &v1.memory.join(app).join("memory.limit_in_bytes"),
                    &unlimited(memory),
                )?;
                let cpu = v1.cpu.join(app);
                write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                let quota = if quota == 0 { 0 } else { quota.max(1000) };
                write(&cpu.join("cpu.cfs_quota_us"), &unlimited(quota))
            }
        }
    }

    /// Moves `pid` (the whole process) into the app's cgroup.
    pub(super) fn add(&self, app: &str, pid: u32) -> Result<(), CgroupError> {
        for dir in self.dirs(app) {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Whether `pid` is in the app's cgroup (its memory one on v1).
    pub(super) fn contains(&self, app: &str, pid: u32) -> bool {
        let Some(dir) = self.dirs(app).into_iter().next() else {
            return false;
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|t| t.lines().any(|l| l.trim() == pid.to_string()))
            .unwrap_or(false)
    }

    pub(super) fn counters(&self, app: &str) -> Counters {
        match self {
            Cgroups::Off => Counters::default(),
            Cgroups::V2 { apps } => v2_counters(&apps.join(app)),
            Cgroups::V1(v1) => Counters {
                cpu_usec: v1
                    .cpuacct
                    .as_ref()
                    .and_then(|d| read_u64(&d.join(app).join("cpuacct.usage")))
                    .map(|ns| ns / 1000),
                memory_bytes: read_u64(&v1.memory.join(app).join("memory.usage_in_bytes")).map(
                    |used| {
                        let stat = std::fs::read_to_string(v1.memory.join(app).join("memory.stat"))
                            .unwrap_or_default();
                        used.saturating_sub(keyed(&stat, "total_inactive_file").unwrap_or(0))
                    },
                ),
                oom_kills: std::fs::read_to_string(v1.memory.join(app).join("memory.oom_control"))
                    .ok()
                    .and_then(|t| keyed(&t, "oom_kill")),
            },
        }
    }

    /// Removes the app's cgroup once its processes are gone (retried for
    /// a moment: the kernel frees it shortly after the last one died).
    pub(super) fn remove(&self, app: &str) {
        for dir in self.dirs(app) {
            remove_dir(&dir);
        }
    }

    /// Removes this agent's (empty) parents of the app cgroups: on a clean
    /// exit with every app stopped. One that still has a child stays.
    pub(super) fn remove_parents(&self) {
        for dir in self.parents() {
            if let Err(e) = std::fs::remove_dir(dir)
                && e.kind() != io::ErrorKind::NotFound
            {
                tracing::debug!(cgroup = %dir.display(), error = %e, "app cgroup parent kept");
            }
        }
    }

    /// The app cgroups that exist, by app name.
    pub(super) fn list(&self) -> Vec<String> {
        let Some(parent) = self.parents().into_iter().next() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(parent) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }

    fn parents(&self) -> Vec<&Path> {
        match self {
            Cgroups::Off => Vec::new(),
            Cgroups::V2 { apps } => vec![apps],
            Cgroups::V1(v1) => {
                let mut out = vec![v1.memory.as_path(), v1.cpu.as_path()];
                if let Some(acct) = &v1.cpuacct
                    && acct != &v1.cpu
                {
                    out.push(acct);
                }
                out
            }
        }
    }

    fn dirs(&self, app: &str) -> Vec<PathBuf> {
        self.parents().into_iter().map(|p| p.join(app)).collect()
    }
}

fn remove_dir(dir: &Path) {
    let deadline = Instant::now() + RMDIR_WAIT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(nix::libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "removing app cgroup failed");
                return;
            }
        }
    }
}

fn v2_counters(dir: &Path) -> Counters {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    Counters {
        cpu_usec: read("cpu.stat").and_then(|t| keyed(&t, "usage_usec")),
        // Like `docker stats`: without the page cache the kernel may drop
        // at once (which the app's own log writes would otherwise inflate).
        memory_bytes: read("memory.current")
            .and_then(|t| t.trim().parse::<u64>().ok())
            .map(|used| {
                let stat = read("memory.stat").unwrap_or_default();
                used.saturating_sub(keyed(&stat, "inactive_file").unwrap_or(0))
            }),
        oom_kills: read("memory.events").and_then(|t| keyed(&t, "oom_kill")),
    }
}

/// The value of `key` in a flat keyed file (`key value` lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError {
        what: format!("writing {value:?} to {}", path.display()),
        source,
    })
}

/// The agent's own v2 cgroup, as (mount point, path), when its parent
/// offers the memory and cpu controllers.
fn v2_root(own: &str, mounts: &str) -> Option<(PathBuf, String)> {
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim()
        .to_string();
    let mount = mount_points(mounts)
        .into_iter()
        .find(|(fstype, _, _)| fstype == "cgroup2")
        .map(|(_, mount, _)| mount)?;
    // The agent may have moved itself into `agent` before (an in-process
    // restart): its cgroup is then the parent's.
    let path = path
        .strip_suffix("/agent")
        .map(str::to_string)
        .unwrap_or(path);
    let controllers =
        std::fs::read_to_string(join_cgroup(&mount, &path).join("cgroup.controllers"))
            .unwrap_or_default();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    (has("memory") && has("cpu")).then_some((mount, path))
}

/// v2: `<own>/agent` for the agent, `<own>/apps-<tag>` for its apps.
fn setup_v2(mount: &Path, own: &str, tag: &str) -> Result<PathBuf, CgroupError> {
    let root = join_cgroup(mount, own);
    setup_v2_in(&root, tag, std::process::id())
}

/// The v2 layout under `root` (a temp dir in tests).
pub(super) fn setup_v2_in(root: &Path, tag: &str, pid: u32) -> Result<PathBuf, CgroupError> {
    let agent = root.join("agent");
    let apps = root.join(format!("apps-{tag}"));
    for dir in [&agent, &apps] {
        mkdir(dir)?;
    }
    write(&agent.join("cgroup.procs"), &pid.to_string())?;
    write(&root.join("cgroup.subtree_control"), "+memory +cpu")?;
    write(&agent.join("cpu.weight"), &V2_AGENT_WEIGHT.to_string())?;
    v2_parent(&apps)?;
    Ok(apps)
}

fn setup_v1(own: &str, mounts: &str, tag: &str) -> Result<V1, CgroupError> {
    let mounts = mount_points(mounts);
    let dir = |controller: &str| -> Option<PathBuf> {
        let (_, mount, _) = mounts
            .iter()
            .find(|(fstype, _, opts)| fstype == "cgroup" && opts.iter().any(|o| o == controller))?;
        let path = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == controller)
                .then(|| path.trim().to_string())
        })?;
        Some(join_cgroup(mount, &path).join(format!("apps-{tag}")))
    };
    let missing = |c: &str| CgroupError {
        what: format!("no cgroup v1 {c} hierarchy"),
        source: io::Error::from(io::ErrorKind::NotFound),
    };
    let v1 = V1 {
        memory: dir("memory").ok_or_else(|| missing("memory"))?,
        cpu: dir("cpu").ok_or_else(|| missing("cpu"))?,
        cpuacct: dir("cpuacct"),
    };
    v1_parents(&v1)?;
    // The agent's own group, for its higher weight. Without it the agent
    // still competes as an ordinary process: not fatal.
    if let Some(dir) = v1.cpu.parent() {
        let agent = dir.join(format!("agent-{tag}"));
        let moved = mkdir(&agent)
            .and_then(|()| write(&agent.join("cpu.shares"), &v1_shares().1.to_string()))
            .and_then(|()| write(&agent.join("cgroup.procs"), &std::process::id().to_string()));
        if let Err(e) = moved {
            tracing::warn!(error = %e, "the agent keeps its cpu cgroup (no higher weight than its apps)");
        }
    }
    Ok(v1)
}

/// Makes (again) the v1 parents of the app cgroups.
fn v1_parents(v1: &V1) -> Result<(), CgroupError> {
    mkdir(&v1.memory)?;
    mkdir(&v1.cpu)?;
    if let Some(acct) = &v1.cpuacct {
        mkdir(acct)?;
    }
    // Limits of children count for the whole subtree (fails, harmlessly,
    // once the parent has children or where the file does not exist).
    let _ = std::fs::write(v1.memory.join("memory.use_hierarchy"), "1");
    write(&v1.cpu.join("cpu.shares"), &v1_shares().0.to_string())
}

/// Makes (again) the v2 parent of the app cgroups.
fn v2_parent(apps: &Path) -> Result<(), CgroupError> {
    mkdir(apps)?;
    write(&apps.join("cgroup.subtree_control"), "+memory +cpu")?;
    write(&apps.join("cpu.weight"), &V2_APPS_WEIGHT.to_string())
}

/// v1: removes the app cgroups and agent groups of other agents on this
/// machine that were killed without cleaning up (tests, `cloud-manager
/// dev`). An agent is alive while its `agent-<tag>` group in the cpu
/// hierarchy (in `agents`) holds a process: its groups are left alone.
/// Only empty cgroups can be removed at all, so no process loses its own.
/// (v2 has no such sweep: one agent per delegated cgroup.)
fn remove_stale_siblings(parent: &Path, agents: &Path) {
    let (Some(dir), Some(ours)) = (parent.parent(), parent.file_name()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let stale = name != ours
            && name.to_str().is_some_and(|n| {
                n.strip_prefix("apps-")
                    .or_else(|| n.strip_prefix("agent-"))
                    .is_some_and(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
            });
        if !stale {
            continue;
        }
        let tag = name.to_string_lossy();
        let tag = tag.rsplit('-').next().unwrap_or_default();
        let alive =
            std::fs::read_to_string(agents.join(format!("agent-{tag}")).join("cgroup.procs"))
                .is_ok_and(|procs| !procs.trim().is_empty());
        if alive {
            continue;
        }
        let path = entry.path();
        if let Ok(apps) = std::fs::read_dir(&path) {
            for app in apps
                .flatten()
                .filter(|a| a.file_type().is_ok_and(|t| t.is_dir()))
            {
                let _ = std::fs::remove_dir(app.path());
            }
        }
        let _ = std::fs::remove_dir(&path);
    }
}

fn mkdir(dir: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError {
            what: format!("creating {}", dir.display()),
            source,
        }),
    }
}

fn join_cgroup(mount: &Path, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

/// (file system type, mount point, super options) of each mount.
fn mount_points(mountinfo: &str) -> Vec<(String, PathBuf, Vec<String>)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount = left.split_whitespace().nth(4)?;
            let mut right = right.split_whitespace();
            let fstype = right.next()?.to_string();
            let _source = right.next()?;
            let opts = right
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect();
            Some((fstype, PathBuf::from(unescape(mount)), opts))
        })
        .collect()
}

/// Mount points in mountinfo escape space, tab, newline and backslash as
/// `\ooo`.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temp dir laid out like a delegated cgroup2 directory.
    fn fake_v2() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory pids").unwrap();
        std::fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        root
    }

    #[test]
    fn v2_layout_limits_and_counters() {
        let root = fake_v2();
        let apps = setup_v2_in(root.path(), "t1", 4242).unwrap();
        assert_eq!(apps, root.path().join("apps-t1"));
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&root.path().join("agent/cgroup.procs")), "4242");
        assert_eq!(
            read(&root.path().join("cgroup.subtree_control")),
            "+memory +cpu"
        );
        assert_eq!(read(&apps.join("cgroup.subtree_control")), "+memory +cpu");
        assert_eq!(read(&root.path().join("agent/cpu.weight")), "1000");
        assert_eq!(read(&apps.join("cpu.weight")), "100");

        let cg = Cgroups::V2 { apps: apps.clone() };
        cg.create(
            "web",
            Limits {
                cpu_millis: 200,
                memory_mb: 64,
            },
        )
        .unwrap();
        let app = apps.join("web");
        assert_eq!(read(&app.join("memory.max")), (64 * MIB).to_string());
        assert_eq!(read(&app.join("memory.swap.max")), "0");
        assert_eq!(read(&app.join("cpu.max")), "20000 100000");
        cg.set_limits("web", Limits::default()).unwrap();
        assert_eq!(read(&app.join("memory.max")), "max");
        assert_eq!(read(&app.join("cpu.max")), "max 100000");
        // Below the kernel's minimum quota (1 ms per period).
        cg.set_limits(
            "web",
            Limits {
                cpu_millis: 1,
                memory_mb: 0,
            },
        )
        .unwrap();
        assert_eq!(read(&app.join("cpu.max")), "1000 100000");

        cg.add("web", 99).unwrap();
        assert!(cg.contains("web", 99));
        std::fs::write(app.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(app.join("memory.current"), "1148576\n").unwrap();
        std::fs::write(
            app.join("memory.stat"),
            "anon 1048576\ninactive_file 100000\n",
        )
        .unwrap();
        std::fs::write(
            app.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap();
        assert_eq!(
            cg.counters("web"),
            Counters {
                cpu_usec: Some(1500),
                memory_bytes: Some(MIB),
                oom_kills: Some(1),
            }
        );
        assert_eq!(cg.list(), ["web"]);
    }

    #[test]
    fn v2_root_needs_memory_and_cpu() {
        let root = fake_v2();
        let mounts = format!(
            "30 25 0:26 / {} rw,nosuid - cgroup2 cgroup2 rw\n",
            root.path().display()
        );
        let found = v2_root("0::/\n", &mounts).unwrap();
        assert_eq!(found, (root.path().to_path_buf(), "/".to_string()));
        std::fs::write(root.path().join("cgroup.controllers"), "pids").unwrap();
        assert!(v2_root("0::/\n", &mounts).is_none());
        assert!(v2_root("4:memory:/x\n", &mounts).is_none());
    }

    #[test]
    fn mountinfo_and_keyed_files_parse() {
        let info = "35 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                    36 30 0:31 / /sys/fs/my\\040dir rw - cgroup2 cgroup2 rw\n";
        let m = mount_points(info);
        assert_eq!(m[0].1, PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[0].2, ["rw", "cpu", "cpuacct"]);
        assert_eq!(m[1].1, PathBuf::from("/sys/fs/my dir"));
        assert_eq!(
            keyed("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n", "oom_kill"),
            Some(2)
        );
        assert_eq!(keyed("oom_kill_disable 0\n", "oom_kill"), None);
    }
}
