//! The app runtime: a supervisor of apps, each app a real OS process.
//!
//! Every app runs in its own process group. The runtime keeps what it
//! knows about an app in `state_dir/<name>/`: its stdout and stderr go
//! straight to files there opened with `O_APPEND` (not pipes), so an app
//! keeps running, and keeps logging, when the agent restarts; on every
//! start the runtime writes `app.json` there (pid, process start time,
//! spec hash), which a fresh runtime uses to adopt the processes the
//! previous agent left running instead of starting a second copy, and to
//! kill the ones that are no longer wanted. A sandboxed runtime (the
//! agent's; see `sandbox`) gives each app another working directory, one
//! the app owns, outside the agent's data dir, so that an app can neither
//! read the agent's keys nor rewrite its own `app.json`; it runs the app
//! as `run_as` with a clean environment, in a cgroup of its own with its
//! memory and CPU limits (see `cgroup`). An unsandboxed runtime (tests)
//! runs apps in `state_dir/<name>/` with the agent's environment.
//!
//! One supervisor task per app owns its process: it restarts the app with
//! exponential backoff when it exits by itself, and on request stops it by
//! signalling the whole process group (SIGTERM, then SIGKILL after the
//! grace period), so that nothing the app started is left behind.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What to run: one app, one command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSpec {
    pub name: String,
    /// `command[0]` is the program (looked up in PATH), the rest its arguments.
    pub command: Vec<String>,
    /// A sandboxed app's whole environment besides PATH, HOME and LANG
    /// (which it may override); added to the agent's own environment in an
    /// unsandboxed runtime.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Memory and CPU limits (cgroup); a change applies to the running
    /// process, without a restart.
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppState {
    /// The process is being spawned.
    Starting,
    /// The process runs (spawned by this runtime or adopted).
    Running,
    /// The process exited by itself; it is restarted after a delay.
    Backoff,
    /// The runtime is terminating the app's process group.
    Stopping,
    /// The app was stopped on request and is not restarted.
    Stopped,
    /// The last start failed (for example the program does not exist); it
    /// is retried after a delay, like an exit.
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub state: AppState,
    pub pid: Option<u32>,
    /// Restarts after exits or failed starts since this runtime took the app on.
    pub restarts: u32,
    /// How the last run ended: "exit status 3", "signal 9", ...
    pub last_exit: Option<String>,
    pub usage: AppUsage,
}

/// Resource use of an app's whole process tree.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppUsage {
    /// Thousandths of one core.
    pub cpu_millis: u64,
    /// Resident memory.
    pub memory_mb: u64,
    pub disk_read_bytes_per_sec: u64,
    pub disk_write_bytes_per_sec: u64,
}

#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Time between SIGTERM and SIGKILL when stopping an app.
    pub stop_grace: Duration,
    /// First restart delay; it doubles on every consecutive restart.
    pub restart_min: Duration,
    /// Upper bound of the restart delay.
    pub restart_max: Duration,
    /// stdout.log or stderr.log larger than this is rotated to `.1`.
    pub log_cap_bytes: u64,
    /// How often the log sizes are checked.
    pub log_check_interval: Duration,
    /// A run at least this long resets the restart delay to `restart_min`.
    pub backoff_reset_after: Duration,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            stop_grace: Duration::from_secs(5),
            restart_min: Duration::from_millis(200),
            restart_max: Duration::from_secs(10),
            log_cap_bytes: 8 * 1024 * 1024,
            log_check_interval: Duration::from_secs(2),
            backoff_reset_after: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("app {name:?}: invalid name (expected [a-z0-9][a-z0-9-_.]{{0,62}})")]
    InvalidName { name: String },
    #[error("app {app:?}: {reason}")]
    InvalidSpec { app: String, reason: String },
    #[error("app {app:?} is listed more than once")]
    Duplicate { app: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

/// The supervisor of all apps on this node. Clones share the same apps.
///
/// Dropping the last clone without `stop_all` ends supervision but leaves
/// the processes running, exactly as an agent crash would; a new runtime on
/// the same `apps_dir` adopts them.
///
/// [`Runtime::simulated`] is the app runtime of `edgepool-swarm`'s virtual
/// agents: the same interface, no processes (see `simulated`).
#[derive(Clone)]
pub struct Runtime {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Processes(Arc<Inner>),
    Simulated(Arc<simulated::Apps>),
}

impl Runtime {
    /// Every app gets `apps_dir/<name>/` as working directory, with
    /// stdout.log, stderr.log and app.json inside.
    pub fn new(apps_dir: PathBuf, options: RuntimeOptions) -> Self {
        Self::with_sandbox(apps_dir, options, None)
    }

    /// A runtime that confines its apps (see `sandbox`): `state_dir/<name>/`
    /// holds the agent's records (app.json, logs), the sandbox's
    /// `apps_dir/<name>/` is the app's working directory.
    pub fn sandboxed(state_dir: PathBuf, options: RuntimeOptions, sandbox: Sandbox) -> Self {
        Self::with_sandbox(state_dir, options, Some(sandbox))
    }

    fn with_sandbox(apps_dir: PathBuf, options: RuntimeOptions, sandbox: Option<Sandbox>) -> Self {
        Runtime {
            backend: Backend::Processes(Arc::new(Inner {
                apps_dir,
                sandbox: sandbox.map(Arc::new),
                cgroup_usage: Mutex::new(HashMap::new()),
                options,
                apps: Mutex::new(BTreeMap::new()),
                serial: tokio::sync::Mutex::new(()),
                usage: Mutex::new(usage::Sampler::new()),
                log_worker: Mutex::new(None),
                on_change: std::sync::OnceLock::new(),
            })),
        }
    }

    /// `notify` is told whenever an app changes state (started, running,
    /// exited, stopped): the agent then reports at once instead of at its
    /// next telemetry tick (a spare says its group runs as soon as it
    /// does). Set once; a simulated runtime's starts are immediate anyway.
    pub fn on_change(&self, notify: Arc<tokio::sync::Notify>) {
        if let Backend::Processes(inner) = &self.backend {
            let _ = inner.on_change.set(notify);
        }
    }

    /// Apps that "run" without an OS process: a start succeeds at once
    /// with a made-up pid (above any real pid), each running app reports
    /// `usage`, and nothing ever exits by itself.
    pub fn simulated(usage: AppUsage) -> Self {
        Runtime {
            backend: Backend::Simulated(Arc::new(simulated::Apps::new(usage))),
        }
    }

    /// Makes the set of running apps exactly `desired`: starts missing apps,
    /// stops apps not in the list and restarts an app only if its command or
    /// environment changed. Returns when the starts have been initiated and
    /// the stops have completed. An invalid spec refuses the whole list
    /// before anything changes.
    pub async fn reconcile(&self, desired: Vec<AppSpec>) -> Result<(), RuntimeError> {
        let desired = validate_all(desired)?;
        let inner = match &self.backend {
            Backend::Processes(inner) => inner,
            Backend::Simulated(apps) => {
                apps.reconcile(desired);
                return Ok(());
            }
        };
        let _serial = inner.serial.lock().await;
        inner.ensure_log_worker();
        std::fs::create_dir_all(&inner.apps_dir).map_err(|source| RuntimeError::Io {
            context: format!("creating {}", inner.apps_dir.display()),
            source,
        })?;
        inner.stop_unwanted(&desired).await;
        inner.update_limits(&desired);
        let mut adopted = inner.settle_leftovers(&desired).await;
        for (name, wanted) in desired {
            let adopt = adopted.remove(&name);
            inner.start(wanted, adopt);
        }
        Ok(())
    }

    /// Current status of every supervised app, sorted by name. Usage is
    /// measured at most every `USAGE_MIN_INTERVAL`; calls in between return
    /// the last measurement.
    pub fn status(&self) -> Vec<AppStatus> {
        let inner = match &self.backend {
            Backend::Processes(inner) => inner,
            Backend::Simulated(apps) => return apps.status(),
        };
        let snapshot: Vec<(String, Live)> = lock(&inner.apps)
            .iter()
            .map(|(name, entry)| (name.clone(), lock(&entry.live).clone()))
            .collect();
        let roots: Vec<u32> = snapshot.iter().filter_map(|(_, live)| live.pid).collect();
        let usage = inner.usage(&roots);
        snapshot
            .into_iter()
            .map(|(name, live)| AppStatus {
                usage: inner.cgroup_usage(
                    &name,
                    live.pid
                        .and_then(|pid| usage.get(&pid).copied())
                        .unwrap_or_default(),
                ),
                name,
                state: live.state,
                pid: live.pid,
                restarts: live.restarts,
                last_exit: live.last_exit,
            })
            .collect()
    }

    /// The directories that hold an app's files: its records and logs, and
    /// (sandboxed) its working directory. Their size is its disk use.
    pub fn app_dirs(&self, app: &str) -> Vec<PathBuf> {
        match &self.backend {
            Backend::Processes(inner) => {
                let mut dirs = vec![inner.apps_dir.join(app)];
                if let Some(sandbox) = &inner.sandbox {
                    dirs.push(sandbox.apps_dir.join(app));
                }
                dirs
            }
            Backend::Simulated(_) => Vec::new(),
        }
    }

    /// Stops every app (SIGTERM to its process group, SIGKILL after
    /// `stop_grace`) and waits. The apps stay listed as `Stopped`.
    pub async fn stop_all(&self) {
        let inner = match &self.backend {
            Backend::Processes(inner) => inner,
            Backend::Simulated(apps) => return apps.stop_all(),
        };
        let _serial = inner.serial.lock().await;
        let tasks: Vec<(String, JoinHandle<()>)> = lock(&inner.apps)
            .iter_mut()
            .filter_map(|(name, entry)| entry.cancel().map(|task| (name.clone(), task)))
            .collect();
        join_supervisors(tasks).await;
        // No app left: this agent's cgroup parents go too.
        if let Some(sandbox) = inner.sandbox.clone() {
            let removed = tokio::task::spawn_blocking(move || sandbox.cgroups.remove_parents());
            if let Err(e) = removed.await {
                tracing::warn!(error = %e, "removing the apps' cgroups failed");
            }
        }
    }
}

const STDOUT_LOG: &str = "stdout.log";
const STDERR_LOG: &str = "stderr.log";
const RECORD_FILE: &str = "app.json";
/// How often an adopted process (not our child, so no wait()) is checked.
const ADOPTED_POLL: Duration = Duration::from_millis(250);
/// How often a stopping process group is checked for remaining members.
const STOP_POLL: Duration = Duration::from_millis(50);
/// How long to wait for the kernel to finish off a group after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// CPU percentages over shorter windows are mostly noise, so usage is not
/// measured more often. (A refresh reads only the apps' own processes.)
const USAGE_MIN_INTERVAL: Duration = Duration::from_millis(500);

struct Inner {
    /// Where each app's records live (`<name>/app.json`, logs).
    apps_dir: PathBuf,
    sandbox: Option<Arc<Sandbox>>,
    /// CPU time per app cgroup at the last measurement (usec, when).
    cgroup_usage: Mutex<HashMap<String, CgroupSample>>,
    options: RuntimeOptions,
    apps: Mutex<BTreeMap<String, Entry>>,
    /// Serializes reconcile and stop_all, which await while stopping apps.
    serial: tokio::sync::Mutex<()>,
    usage: Mutex<usage::Sampler>,
    log_worker: Mutex<Option<JoinHandle<()>>>,
    /// Told whenever an app's state changes (see `Runtime::on_change`).
    on_change: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
}

/// One supervised app: what the runtime knows and the handle on its task.
struct Entry {
    spec_hash: String,
    limits: Limits,
    live: Arc<Mutex<Live>>,
    stop: CancellationToken,
    /// None once the supervisor has been asked to stop.
    task: Option<JoinHandle<()>>,
}

impl Entry {
    /// Asks the supervisor to stop and hands back its task to wait on.
    fn cancel(&mut self) -> Option<JoinHandle<()>> {
        self.stop.cancel();
        self.task.take()
    }
}

#[derive(Clone, Debug)]
struct Live {
    state: AppState,
    pid: Option<u32>,
    restarts: u32,
    last_exit: Option<String>,
}

/// What a wanted app looks like after validation.
struct Wanted {
    spec: AppSpec,
    hash: String,
}

impl Inner {
    /// Stops the supervised apps that are no longer wanted or whose spec
    /// changed, all at once, and waits for them.
    async fn stop_unwanted(&self, desired: &BTreeMap<String, Wanted>) {
        let tasks: Vec<(String, JoinHandle<()>)> = lock(&self.apps)
            .iter_mut()
            .filter(|(name, entry)| {
                desired
                    .get(*name)
                    .is_none_or(|wanted| wanted.hash != entry.spec_hash)
            })
            .filter_map(|(name, entry)| entry.cancel().map(|task| (name.clone(), task)))
            .collect();
        join_supervisors(tasks).await;
        lock(&self.apps).retain(|name, _| desired.contains_key(name));
        lock(&self.cgroup_usage).retain(|name, _| desired.contains_key(name));
    }

    /// Deals with processes recorded in `apps_dir/*/app.json` that this
    /// runtime does not supervise, which is what an agent restart leaves
    /// behind. A live one with the wanted spec is returned for adoption; a
    /// live one that is unwanted or has another spec is killed (and waited
    /// for) so that no app ever runs twice.
    async fn settle_leftovers(
        &self,
        desired: &BTreeMap<String, Wanted>,
    ) -> HashMap<String, Running> {
        let supervised: HashSet<String> = lock(&self.apps)
            .iter()
            .filter(|(_, entry)| entry.task.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        let mut adopted = HashMap::new();
        let mut kills = Vec::new();
        for name in app_dirs(&self.apps_dir) {
            let dir = self.apps_dir.join(&name);
            let Some(record) = (!supervised.contains(&name))
                .then(|| AppRecord::read_live(&dir))
                .flatten()
            else {
                continue;
            };
            let mut running = Running::Adopted {
                pid: record.pid,
                start_time: record.start_time,
            };
            if desired
                .get(&name)
                .is_some_and(|w| w.hash == record.spec_hash)
            {
                tracing::info!(app = %name, pid = record.pid, "adopting running app");
                adopted.insert(name, running);
                continue;
            }
            tracing::info!(app = %name, pid = record.pid, "stopping leftover app process");
            let grace = self.options.stop_grace;
            kills.push((
                name,
                tokio::spawn(async move {
                    running.stop(grace).await;
                    remove_record(&dir);
                }),
            ));
        }
        join_supervisors(kills).await;
        if let Some(sandbox) = &self.sandbox {
            let sandbox = sandbox.clone();
            let keep: HashSet<String> = supervised
                .into_iter()
                .chain(adopted.keys().cloned())
                .collect();
            let adopt: Vec<(String, u32, Limits)> = adopted
                .iter()
                .filter_map(|(name, r)| {
                    Some((name.clone(), r.pid(), desired.get(name)?.spec.limits))
                })
                .collect();
            let settled = tokio::task::spawn_blocking(move || {
                for (name, pid, limits) in adopt {
                    adopt_cgroup(&sandbox.cgroups, &name, pid, limits);
                }
                remove_stale_cgroups(&sandbox.cgroups, &keep);
            })
            .await;
            if let Err(e) = settled {
                tracing::warn!(error = %e, "settling app cgroups failed");
            }
        }
        adopted
    }

    /// Applies changed limits to the running apps (no restart needed).
    fn update_limits(&self, desired: &BTreeMap<String, Wanted>) {
        let mut apps = lock(&self.apps);
        for (name, entry) in apps.iter_mut() {
            let Some(wanted) = desired.get(name) else {
                continue;
            };
            if entry.limits == wanted.spec.limits {
                continue;
            }
            entry.limits = wanted.spec.limits;
            if let Some(sandbox) = &self.sandbox
                && sandbox.cgroups.enabled()
            {
                match sandbox.cgroups.set_limits(name, wanted.spec.limits) {
                    Ok(()) => {
                        tracing::info!(app = %name, limits = ?wanted.spec.limits, "app limits changed")
                    }
                    Err(e) => tracing::warn!(app = %name, error = %e, "changing app limits failed"),
                }
            }
        }
    }

    /// Starts supervising `wanted` unless it already is supervised.
    fn start(&self, wanted: Wanted, adopted: Option<Running>) {
        let mut apps = lock(&self.apps);
        if apps
            .get(&wanted.spec.name)
            .is_some_and(|e| e.task.is_some())
        {
            return;
        }
        let pid = adopted.as_ref().map(Running::pid);
        let live = Arc::new(Mutex::new(Live {
            state: match pid {
                Some(_) => AppState::Running,
                None => AppState::Starting,
            },
            pid,
            restarts: 0,
            last_exit: None,
        }));
        let stop = CancellationToken::new();
        let supervisor = Supervisor {
            dir: self.apps_dir.join(&wanted.spec.name),
            sandbox: self.sandbox.clone(),
            oom_baseline: Mutex::new(None),
            spec: wanted.spec.clone(),
            spec_hash: wanted.hash.clone(),
            options: self.options.clone(),
            live: live.clone(),
            stop: stop.clone(),
            on_change: self.on_change.get().cloned(),
        };
        let entry = Entry {
            spec_hash: wanted.hash,
            limits: wanted.spec.limits,
            live,
            stop,
            task: Some(tokio::spawn(supervisor.run(adopted))),
        };
        apps.insert(wanted.spec.name, entry);
    }

    fn usage(&self, roots: &[u32]) -> HashMap<u32, AppUsage> {
        lock(&self.usage).usage(roots)
    }

    /// `from_proc` with CPU and memory taken from the app's cgroup, when it
    /// has one: exact (every process the app ever started, whatever its
    /// group) and a few small reads.
    fn cgroup_usage(&self, app: &str, from_proc: AppUsage) -> AppUsage {
        let Some(sandbox) = self.sandbox.as_ref().filter(|s| s.cgroups.enabled()) else {
            return from_proc;
        };
        let mut samples = lock(&self.cgroup_usage);
        let now = Instant::now();
        let sample = samples.entry(app.to_string()).or_default();
        if sample
            .at
            .is_none_or(|at| now.duration_since(at) >= USAGE_MIN_INTERVAL)
        {
            let counters = sandbox.cgroups.counters(app);
            sample.update(counters, now);
        }
        AppUsage {
            cpu_millis: sample.cpu_millis.unwrap_or(from_proc.cpu_millis),
            memory_mb: sample.memory_mb.unwrap_or(from_proc.memory_mb),
            ..from_proc
        }
    }

    /// Starts the log size check on first use; `new` cannot, as it may be
    /// called outside a tokio runtime.
    fn ensure_log_worker(self: &Arc<Self>) {
        let mut slot = lock(&self.log_worker);
        if slot.is_none() {
            let every = self.options.log_check_interval;
            *slot = Some(tokio::spawn(log_worker(Arc::downgrade(self), every)));
        }
    }
}

impl Drop for Inner {
    /// Ends supervision without stopping the apps (see `Runtime`).
    fn drop(&mut self) {
        for entry in lock(&self.apps).values_mut() {
            if let Some(task) = entry.task.take() {
                task.abort();
            }
        }
        if let Some(task) = lock(&self.log_worker).take() {
            task.abort();
        }
    }
}

async fn join_supervisors(tasks: Vec<(String, JoinHandle<()>)>) {
    for (name, task) in tasks {
        if let Err(e) = task.await {
            tracing::error!(app = %name, error = %e, "app task failed");
        }
    }
}

/// Keeps stdout.log and stderr.log of every app under the size cap.
async fn log_worker(inner: Weak<Inner>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Holding only a weak reference lets the runtime be dropped.
        let Some(runtime) = inner.upgrade() else {
            return;
        };
        let dirs: Vec<PathBuf> = lock(&runtime.apps)
            .keys()
            .map(|name| runtime.apps_dir.join(name))
            .collect();
        let cap = runtime.options.log_cap_bytes;
        drop(runtime);
        let check = tokio::task::spawn_blocking(move || {
            for dir in dirs {
                for log in [STDOUT_LOG, STDERR_LOG] {
                    rotate_log(&dir.join(log), cap);
                }
            }
        });
        if let Err(e) = check.await {
            tracing::warn!(error = %e, "log size check failed");
        }
    }
}

fn rotate_log(path: &Path, cap: u64) {
    match rotate_if_over(path, cap) {
        Ok(true) => tracing::info!(log = %path.display(), "rotated app log"),
        Ok(false) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(log = %path.display(), error = %e, "rotating app log failed"),
    }
}

/// Copies the log to `<log>.1` and truncates it, when it exceeds `cap`.
/// Copy-and-truncate, not rename, because the app holds the file open and
/// keeps writing to it: with O_APPEND its next write lands at the new end
/// (0). Lines written between the copy and the truncation are lost; that
/// is the price of not restarting the app.
fn rotate_if_over(path: &Path, cap: u64) -> io::Result<bool> {
    if std::fs::metadata(path)?.len() <= cap {
        return Ok(false);
    }
    let mut rotated = path.as_os_str().to_owned();
    rotated.push(".1");
    std::fs::copy(path, &rotated)?;
    OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The task that owns one app's process.
struct Supervisor {
    spec: AppSpec,
    sandbox: Option<Arc<Sandbox>>,
    /// OOM kills in the app's cgroup before the current run started.
    oom_baseline: Mutex<Option<u64>>,
    spec_hash: String,
    dir: PathBuf,
    options: RuntimeOptions,
    live: Arc<Mutex<Live>>,
    stop: CancellationToken,
    on_change: Option<Arc<tokio::sync::Notify>>,
}

impl Supervisor {
    async fn run(self, mut adopted: Option<Running>) {
        let app = self.spec.name.clone();
        // Consecutive short runs, which make the restart delay grow.
        let mut failures = 0u32;
        loop {
            let next = match adopted.take() {
                Some(running) => {
                    *lock(&self.oom_baseline) = self.oom_kills().await;
                    Ok(running)
                }
                None => self.launch().await,
            };
            let mut running = match next {
                Ok(running) => running,
                Err(e) => {
                    tracing::warn!(app = %app, error = %e, "app failed to start");
                    self.update(|l| (l.state, l.last_exit) = (AppState::Failed, Some(e)));
                    if !self.backoff(&mut failures).await {
                        break;
                    }
                    continue;
                }
            };
            self.update(|l| (l.state, l.pid) = (AppState::Running, Some(running.pid())));
            let started = Instant::now();
            tokio::select! {
                exit = running.wait() => {
                    let exit = self.explain(exit).await;
                    tracing::warn!(app = %app, pid = running.pid(), exit = %exit, "app exited");
                    self.update(|l| (l.state, l.last_exit) = (AppState::Backoff, Some(exit)));
                    // Whatever the app left running in its group would
                    // otherwise live on next to the restarted copy.
                    running.stop(self.options.stop_grace).await;
                }
                () = self.stop.cancelled() => {
                    self.update(|l| l.state = AppState::Stopping);
                    tracing::info!(app = %app, pid = running.pid(), "stopping app");
                    running.stop(self.options.stop_grace).await;
                    break;
                }
            }
            if started.elapsed() >= self.options.backoff_reset_after {
                failures = 0;
            }
            if !self.backoff(&mut failures).await {
                break;
            }
        }
        self.update(|l| (l.state, l.pid) = (AppState::Stopped, None));
        remove_record(&self.dir);
        if let Some(sandbox) = self.sandbox.clone().filter(|s| s.cgroups.enabled()) {
            let name = app.clone();
            let removed = tokio::task::spawn_blocking(move || sandbox.cgroups.remove(&name)).await;
            if let Err(e) = removed {
                tracing::warn!(app = %app, error = %e, "removing the app cgroup failed");
            }
        }
        tracing::info!(app = %app, "app stopped");
    }

    /// The OOM kills in the app's cgroup so far (None: not known).
    async fn oom_kills(&self) -> Option<u64> {
        let sandbox = self.sandbox.clone().filter(|s| s.cgroups.enabled())?;
        let name = self.spec.name.clone();
        tokio::task::spawn_blocking(move || sandbox.cgroups.counters(&name).oom_kills)
            .await
            .ok()
            .flatten()
    }

    /// How the run ended, saying so when the kernel's OOM killer ended it
    /// (a kill in the app's cgroup since it started).
    async fn explain(&self, exit: String) -> String {
        let before = *lock(&self.oom_baseline);
        let (Some(before), Some(now)) = (before, self.oom_kills().await) else {
            return exit;
        };
        if now <= before {
            return exit;
        }
        format!(
            "killed by the kernel: out of memory (limit {} MiB; {exit})",
            self.spec.limits.memory_mb
        )
    }

    /// Spawns the app and records it in app.json for re-adoption.
    async fn launch(&self) -> Result<Running, String> {
        self.update(|l| (l.state, l.pid) = (AppState::Starting, None));
        // Before the start: an app may be killed at once. A cgroup not made
        // yet has had no kill.
        let before = match self.sandbox.as_ref().filter(|s| s.cgroups.enabled()) {
            Some(_) => Some(self.oom_kills().await.unwrap_or(0)),
            None => None,
        };
        *lock(&self.oom_baseline) = before;
        let (child, pid) = match &self.sandbox {
            None => spawn_app(&self.spec, &self.dir),
            Some(sandbox) => spawn_sandboxed(&self.spec, &self.dir, sandbox.clone()).await,
        }
        .map_err(|e| format!("start failed: {e}"))?;
        // The start time tells this process apart from a later one that
        // reuses the pid; it is set at fork and readable until reaped.
        let Some(stat) = procfs::stat(pid) else {
            tracing::warn!(app = %self.spec.name, pid, "no start time; the app cannot be re-adopted");
            return Ok(Running::Child { child, pid });
        };
        let record = AppRecord {
            pid,
            start_time: stat.start_time,
            spec_hash: self.spec_hash.clone(),
            command: self.spec.command.clone(),
        };
        let path = self.dir.join(RECORD_FILE);
        let written = tokio::task::spawn_blocking(move || record.write(&path)).await;
        if let Err(e) = written.map_err(io::Error::other).and_then(|r| r) {
            tracing::warn!(app = %self.spec.name, error = %e, "writing app.json failed");
        }
        Ok(Running::Child { child, pid })
    }

    /// Waits before the next start; false if the app is to stop instead.
    async fn backoff(&self, failures: &mut u32) -> bool {
        let delay = restart_delay(
            self.options.restart_min,
            self.options.restart_max,
            *failures,
        );
        *failures = failures.saturating_add(1);
        self.update(|l| l.pid = None);
        tokio::select! {
            () = tokio::time::sleep(delay) => {
                self.update(|l| l.restarts = l.restarts.saturating_add(1));
                true
            }
            () = self.stop.cancelled() => false,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Live)) {
        let changed = {
            let mut live = lock(&self.live);
            let before = live.state;
            change(&mut live);
            live.state != before
        };
        if changed && let Some(n) = &self.on_change {
            n.notify_one();
        }
    }
}

fn spawn_app(spec: &AppSpec, dir: &Path) -> io::Result<(Child, u32)> {
    std::fs::create_dir_all(dir)?;
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
    let mut command = Command::new(program);
    command
        .args(args)
        .envs(&spec.env)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(open_log(&dir.join(STDOUT_LOG))?)
        .stderr(open_log(&dir.join(STDERR_LOG))?)
        // Its own group, so that a stop reaches everything the app started.
        .process_group(0);
    let child = command.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("the spawned process has no pid"))?;
    Ok((child, pid))
}

fn open_log(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A running app process: our child, or adopted from a previous agent.
enum Running {
    Child { child: Child, pid: u32 },
    Adopted { pid: u32, start_time: u64 },
}

impl Running {
    /// Also the process group id: every app leads its own group.
    fn pid(&self) -> u32 {
        match self {
            Running::Child { pid, .. } | Running::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end and describes how it ended.
    async fn wait(&mut self) -> String {
        match self {
            Running::Child { child, pid } => match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => {
                    // Without wait() the process cannot be watched; kill it
                    // rather than risk a second copy after the restart.
                    signal_group(*pid, Signal::SIGKILL);
                    format!("wait failed: {e}")
                }
            },
            Running::Adopted { pid, start_time } => {
                while procfs::is_alive(*pid, *start_time) {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                "exited (status unknown: adopted process)".to_string()
            }
        }
    }

    /// SIGTERM to the process group, SIGKILL after `grace`, and waits until
    /// no process of the group is left.
    async fn stop(&mut self, grace: Duration) {
        let pgid = self.pid();
        signal_group(pgid, Signal::SIGTERM);
        if self.wait_group_gone(grace).await {
            return;
        }
        tracing::warn!(pgid, "process group outlived the grace period; killing it");
        signal_group(pgid, Signal::SIGKILL);
        if !self.wait_group_gone(KILL_WAIT).await {
            tracing::error!(pgid, "process group survived SIGKILL");
        }
    }

    async fn wait_group_gone(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            // Reaping our child keeps it from lingering as a zombie member.
            if let Running::Child { child, .. } = self
                && let Err(e) = child.try_wait()
            {
                tracing::debug!(error = %e, "try_wait failed");
            }
            if !procfs::group_alive(self.pid()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => status.to_string(),
    }
}

fn signal_group(pgid: u32, signal: Signal) {
    let Some(target) = group_target(pgid) else {
        tracing::warn!(pgid, "refusing to signal this process group");
        return;
    };
    match killpg(target, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, %signal, error = %e, "signalling process group failed"),
    }
}

/// Never 0 or 1 (our own group, init) nor the agent's own group: a corrupt
/// app.json must not let the agent kill itself.
fn group_target(pgid: u32) -> Option<Pid> {
    let raw = i32::try_from(pgid).ok().filter(|p| *p > 1)?;
    let pid = Pid::from_raw(raw);
    (pid != nix::unistd::getpgrp()).then_some(pid)
}

/// The restart delay after `failures` consecutive short runs.
fn restart_delay(min: Duration, max: Duration, failures: u32) -> Duration {
    let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
    min.saturating_mul(factor).min(max.max(min))
}

/// app.json: what a later agent needs to recognise the process.
#[derive(Debug, Serialize, Deserialize)]
struct AppRecord {
    pid: u32,
    /// Field 22 of /proc/<pid>/stat, in clock ticks since boot.
    start_time: u64,
    spec_hash: String,
    /// For people reading the file; the environment is left out because it
    /// may hold secrets.
    command: Vec<String>,
}

impl AppRecord {
    fn write(&self, path: &Path) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        edgepool_common::fsutil::write_public(path, &bytes)
    }

    /// The record in `dir`, if its process is still the one recorded.
    fn read_live(dir: &Path) -> Option<AppRecord> {
        let path = dir.join(RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "reading app record failed");
                return None;
            }
        };
        let record: AppRecord = match serde_json::from_slice(&bytes) {
            Ok(record) => record,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable app record");
                return None;
            }
        };
        let ours = group_target(record.pid).is_some();
        (ours && procfs::is_alive(record.pid, record.start_time)).then_some(record)
    }
}

fn remove_record(dir: &Path) {
    match std::fs::remove_file(dir.join(RECORD_FILE)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "removing app.json failed"),
    }
}

/// Names of the app directories under `apps_dir`.
fn app_dirs(apps_dir: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(apps_dir) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(dir = %apps_dir.display(), error = %e, "listing apps failed");
            return Vec::new();
        }
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| valid_name(name))
        .collect()
}

fn validate_all(desired: Vec<AppSpec>) -> Result<BTreeMap<String, Wanted>, RuntimeError> {
    let mut wanted = BTreeMap::new();
    for spec in desired {
        validate(&spec)?;
        let name = spec.name.clone();
        let hash = spec_hash(&spec);
        if wanted.insert(name.clone(), Wanted { spec, hash }).is_some() {
            return Err(RuntimeError::Duplicate { app: name });
        }
    }
    Ok(wanted)
}

fn validate(spec: &AppSpec) -> Result<(), RuntimeError> {
    if !valid_name(&spec.name) {
        return Err(RuntimeError::InvalidName {
            name: spec.name.clone(),
        });
    }
    let invalid = |reason: String| {
        Err(RuntimeError::InvalidSpec {
            app: spec.name.clone(),
            reason,
        })
    };
    match spec.command.first() {
        None => return invalid("empty command".into()),
        Some(program) if program.is_empty() => return invalid("empty program name".into()),
        Some(_) => {}
    }
    if spec.command.iter().any(|arg| arg.contains('\0')) {
        return invalid("command contains a NUL byte".into());
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains(['=', '\0']) {
            return invalid(format!("invalid environment variable name {key:?}"));
        }
        if value.contains('\0') {
            return invalid(format!("environment variable {key} contains a NUL byte"));
        }
    }
    Ok(())
}

/// `[a-z0-9][a-z0-9-_.]{0,62}`: safe as a directory name, never `.`/`..`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    first_ok
        && name.len() <= 63
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

/// FNV-1a over the length-prefixed command and environment. Hand-rolled
/// because it must stay the same across agent builds (std's hasher makes
/// no such promise), or an upgrade would restart every app.
fn spec_hash(spec: &AppSpec) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for byte in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for arg in &spec.command {
        feed(arg.as_bytes());
    }
    feed(b"env");
    for (key, value) in &spec.env {
        feed(key.as_bytes());
        feed(value.as_bytes());
    }
    format!("{hash:016x}")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent even if a holder
    // panicked, so poisoning is ignored rather than spread.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

mod cgroup;
mod measure;
mod procfs;
mod sandbox;
mod simulated;
mod usage;

pub use cgroup::Limits;
pub use measure::MeasuredUsage;
pub use sandbox::{APP_LANG, APP_PATH, AppUser, Sandbox, SandboxError};
use sandbox::{CgroupSample, adopt_cgroup, remove_stale_cgroups, spawn as spawn_sandboxed};

pub use usage::process_tree;

#[cfg(test)]
mod tests;
