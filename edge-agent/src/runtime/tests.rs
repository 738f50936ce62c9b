//! Tests of the app runtime: this module is compiled only under
//! #[cfg(test)] (see `mod tests;` in mod.rs), with real processes.

use super::*;

/// An apps_dir that kills whatever its app.json files record when the
/// test ends, so a failing assertion leaves no process behind.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn apps(&self) -> PathBuf {
        self.dir.path().join("apps")
    }

    fn runtime(&self, options: RuntimeOptions) -> Runtime {
        Runtime::new(self.apps(), options)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for name in app_dirs(&self.apps()) {
            if let Some(record) = AppRecord::read_live(&self.apps().join(name)) {
                signal_group(record.pid, Signal::SIGKILL);
            }
        }
    }
}

fn options() -> RuntimeOptions {
    RuntimeOptions {
        stop_grace: Duration::from_secs(2),
        restart_min: Duration::from_millis(50),
        restart_max: Duration::from_millis(400),
        log_check_interval: Duration::from_millis(100),
        ..RuntimeOptions::default()
    }
}

fn spec(name: &str, command: &[&str]) -> AppSpec {
    AppSpec {
        name: name.into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::new(),
        limits: Default::default(),
    }
}

fn with_env(mut spec: AppSpec, key: &str, value: &str) -> AppSpec {
    spec.env.insert(key.into(), value.into());
    spec
}

/// Polls `probe` every 50 ms for up to 10 s.
async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn app(rt: &Runtime, name: &str) -> Option<AppStatus> {
    rt.status().into_iter().find(|s| s.name == name)
}

async fn running_pid(rt: &Runtime, name: &str) -> u32 {
    eventually(&format!("{name} running"), || {
        app(rt, name).filter(|s| s.state == AppState::Running)?.pid
    })
    .await
}

fn alive(pid: u32) -> bool {
    procfs::stat(pid).is_some_and(|s| !s.is_dead())
}

/// Live processes whose argv is exactly `argv`.
fn count_processes(argv: &[&str]) -> usize {
    let wanted: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0".as_slice()].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .filter(|pid| alive(*pid))
        .count()
}

fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| procfs::stat(*pid).is_some_and(|s| s.pgrp == pgid as i32 && !s.is_dead()))
        .collect()
}

#[tokio::test]
async fn starts_apps_in_their_own_groups_with_logs() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    let a = with_env(
        spec(
            "a",
            &["sh", "-c", "echo \"$GREETING\"; pwd; exec sleep 1000"],
        ),
        "GREETING",
        "hello-a",
    );
    rt.reconcile(vec![a, spec("b", &["sleep", "1000"])])
        .await
        .unwrap();
    let pa = running_pid(&rt, "a").await;
    let pb = running_pid(&rt, "b").await;
    for pid in [pa, pb] {
        let stat = procfs::stat(pid).unwrap();
        assert_eq!(stat.pgrp, pid as i32, "app leads its own group");
        assert_ne!(stat.pgrp, nix::unistd::getpgrp().as_raw());
    }
    let cwd = fx.apps().join("a").canonicalize().unwrap();
    let out = eventually("stdout.log", || {
        let text = std::fs::read_to_string(fx.apps().join("a/stdout.log")).ok()?;
        text.contains(cwd.to_str()?).then_some(text)
    })
    .await;
    assert!(out.starts_with("hello-a\n"), "{out}");
    assert!(fx.apps().join("b/app.json").exists());
    rt.stop_all().await;
    assert!(!alive(pa) && !alive(pb));
    assert!(
        rt.status()
            .iter()
            .all(|s| s.state == AppState::Stopped && s.pid.is_none())
    );
    assert!(!fx.apps().join("b/app.json").exists());
}

#[tokio::test]
async fn removed_app_is_stopped_with_its_whole_group() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    let a = spec("a", &["sh", "-c", "sleep 1000 & wait"]);
    let b = spec("b", &["sleep", "1000"]);
    rt.reconcile(vec![a, b.clone()]).await.unwrap();
    let pa = running_pid(&rt, "a").await;
    let pb = running_pid(&rt, "b").await;
    let child = eventually("the child of a", || {
        group_members(pa).into_iter().find(|p| *p != pa)
    })
    .await;
    rt.reconcile(vec![b]).await.unwrap();
    assert!(!alive(pa) && !alive(child), "a and its child are gone");
    assert!(group_members(pa).is_empty());
    let names: Vec<String> = rt.status().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["b"]);
    assert_eq!(app(&rt, "b").unwrap().pid, Some(pb));
    rt.stop_all().await;
}

#[tokio::test]
async fn changed_env_restarts_only_that_app() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    let a = with_env(spec("a", &["sleep", "1000"]), "V", "1");
    let b = with_env(spec("b", &["sleep", "1000"]), "V", "1");
    rt.reconcile(vec![a.clone(), b.clone()]).await.unwrap();
    let pa = running_pid(&rt, "a").await;
    let pb = running_pid(&rt, "b").await;
    rt.reconcile(vec![a.clone(), b.clone()]).await.unwrap();
    assert_eq!(
        running_pid(&rt, "a").await,
        pa,
        "unchanged spec keeps its process"
    );
    let a2 = with_env(a, "V", "2");
    rt.reconcile(vec![a2, b]).await.unwrap();
    assert!(!alive(pa));
    let new_pa = running_pid(&rt, "a").await;
    assert_ne!(new_pa, pa);
    let environ = std::fs::read(format!("/proc/{new_pa}/environ")).unwrap();
    assert!(environ.split(|b| *b == 0).any(|kv| kv == b"V=2"));
    assert_eq!(running_pid(&rt, "b").await, pb);
    rt.stop_all().await;
}

#[tokio::test]
async fn exited_apps_are_restarted() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    let code = spec("code", &["sh", "-c", "sleep 0.1; exit 3"]);
    let killed = spec("killed", &["sh", "-c", "sleep 0.1; kill -9 $$"]);
    rt.reconcile(vec![code, killed]).await.unwrap();
    for (name, exit) in [("code", "exit status 3"), ("killed", "signal 9")] {
        eventually(&format!("{name} restarted"), || {
            app(&rt, name).filter(|s| s.restarts >= 1 && s.last_exit.as_deref() == Some(exit))
        })
        .await;
    }
    let missing = spec("missing", &["/nonexistent/program"]);
    rt.reconcile(vec![missing]).await.unwrap();
    let status = eventually("a failed start", || {
        app(&rt, "missing").filter(|s| s.last_exit.is_some())
    })
    .await;
    assert!(status.last_exit.unwrap().starts_with("start failed"));
    rt.stop_all().await;
}

#[tokio::test]
async fn new_runtime_adopts_and_kills_on_spec_change() {
    let fx = Fixture::new();
    let argv = ["sleep", "86423"];
    let first = fx.runtime(options());
    first.reconcile(vec![spec("a", &argv)]).await.unwrap();
    let pid = running_pid(&first, "a").await;
    // Dropping the runtime is what an agent crash looks like.
    drop(first);

    let second = fx.runtime(options());
    second.reconcile(vec![spec("a", &argv)]).await.unwrap();
    assert_eq!(app(&second, "a").unwrap().pid, Some(pid), "adopted");
    assert_eq!(app(&second, "a").unwrap().state, AppState::Running);
    assert_eq!(count_processes(&argv), 1, "no second copy");
    drop(second);

    let third = fx.runtime(options());
    let changed = with_env(spec("a", &argv), "V", "2");
    third.reconcile(vec![changed]).await.unwrap();
    assert!(!alive(pid), "old process killed on spec change");
    let new_pid = running_pid(&third, "a").await;
    assert_ne!(new_pid, pid);
    assert_eq!(count_processes(&argv), 1);
    drop(third);

    let fourth = fx.runtime(options());
    fourth.reconcile(Vec::new()).await.unwrap();
    assert!(!alive(new_pid), "unwanted leftover killed");
    assert_eq!(count_processes(&argv), 0);
}

#[tokio::test]
async fn adopted_app_is_restarted_when_it_dies() {
    let fx = Fixture::new();
    let first = fx.runtime(options());
    first
        .reconcile(vec![spec("a", &["sleep", "1000"])])
        .await
        .unwrap();
    let pid = running_pid(&first, "a").await;
    drop(first);
    let second = fx.runtime(options());
    second
        .reconcile(vec![spec("a", &["sleep", "1000"])])
        .await
        .unwrap();
    signal_group(pid, Signal::SIGKILL);
    let status = eventually("restart of the adopted app", || {
        app(&second, "a").filter(|s| s.restarts >= 1 && s.pid.is_some_and(|p| p != pid))
    })
    .await;
    assert!(status.last_exit.unwrap().contains("adopted"));
    second.stop_all().await;
}

#[tokio::test]
async fn logs_over_the_cap_are_rotated() {
    let fx = Fixture::new();
    let cap = 1000;
    let rt = fx.runtime(RuntimeOptions {
        log_cap_bytes: cap,
        ..options()
    });
    let script = "i=0; while [ $i -lt 200 ]; do echo line-$i-xxxxxxxxxxxxxxxxxxxx; \
                  echo err-$i-xxxxxxxxxxxxxxxxxxxx >&2; i=$((i+1)); done; exec sleep 1000";
    rt.reconcile(vec![spec("a", &["sh", "-c", script])])
        .await
        .unwrap();
    let dir = fx.apps().join("a");
    for (log, last) in [("stdout.log", "line-199-"), ("stderr.log", "err-199-")] {
        let current = dir.join(log);
        let rotated = dir.join(format!("{log}.1"));
        let (old, new) = eventually(&format!("{log} rotated"), || {
            let old = std::fs::read_to_string(&rotated).ok()?;
            let new = std::fs::read_to_string(&current).ok()?;
            let joined = format!("{old}{new}");
            (new.len() as u64 <= cap && joined.contains(last)).then_some((old, new))
        })
        .await;
        assert!(old.len() as u64 > cap, "{log}.1 holds the full log");
        assert!(new.len() as u64 <= cap);
    }
    rt.stop_all().await;
}

#[tokio::test]
async fn invalid_specs_are_refused_and_start_nothing() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    let good = spec("good", &["sleep", "1000"]);
    let long = "x".repeat(64);
    let cases = [
        spec("", &["true"]),
        spec("Bad", &["true"]),
        spec("-x", &["true"]),
        spec("a/b", &["true"]),
        spec("..", &["true"]),
        spec(&long, &["true"]),
        spec("empty", &[]),
        spec("noprog", &[""]),
        with_env(spec("badenv", &["true"]), "A=B", "1"),
        spec("good", &["true"]),
    ];
    for bad in cases {
        let name = bad.name.clone();
        let err = rt.reconcile(vec![good.clone(), bad]).await.unwrap_err();
        assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
    }
    assert!(rt.status().is_empty());
    assert!(app_dirs(&fx.apps()).is_empty());
    assert!(valid_name(&"x".repeat(63)) && valid_name("a-b_c.1"));
}

#[tokio::test]
async fn usage_shows_a_busy_app() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    rt.reconcile(vec![spec("busy", &["sh", "-c", "while :; do :; done"])])
        .await
        .unwrap();
    running_pid(&rt, "busy").await;
    let usage = eventually("cpu usage", || {
        app(&rt, "busy")
            .map(|s| s.usage)
            .filter(|u| u.cpu_millis > 100)
    })
    .await;
    assert!(usage.cpu_millis <= 1100 * num_cpus(), "{usage:?}");
    rt.stop_all().await;
    assert_eq!(app(&rt, "busy").unwrap().usage, AppUsage::default());
}

fn num_cpus() -> u64 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u64)
}

#[test]
fn parses_stat_with_awkward_command_names() {
    let text = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                987654 1000 100 18446744073709551615";
    let stat = procfs::parse_stat(text).unwrap();
    assert_eq!(
        stat,
        procfs::Stat {
            state: 'S',
            pgrp: 4242,
            start_time: 987654
        }
    );
    assert!(procfs::parse_stat("garbage").is_none());
}

#[test]
fn restart_delay_doubles_up_to_the_max() {
    let (min, max) = (Duration::from_millis(200), Duration::from_secs(10));
    let delays: Vec<u128> = (0..8)
        .map(|n| restart_delay(min, max, n).as_millis())
        .collect();
    assert_eq!(delays, [200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
    assert_eq!(restart_delay(min, max, u32::MAX), max);
}

#[test]
fn spec_hash_covers_command_and_env() {
    let base = spec("a", &["sleep", "1"]);
    assert_eq!(spec_hash(&base), spec_hash(&base.clone()));
    assert_ne!(spec_hash(&base), spec_hash(&spec("a", &["sleep", "2"])));
    assert_ne!(spec_hash(&base), spec_hash(&spec("a", &["sleep1"])));
    assert_ne!(
        spec_hash(&base),
        spec_hash(&with_env(base.clone(), "K", "V"))
    );
}

#[test]
fn rotation_copies_and_truncates() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stdout.log");
    std::fs::write(&log, "0123456789").unwrap();
    assert!(!rotate_if_over(&log, 10).unwrap());
    std::fs::write(&log, "0123456789a").unwrap();
    assert!(rotate_if_over(&log, 10).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("stdout.log.1")).unwrap(),
        "0123456789a"
    );
    assert_eq!(std::fs::metadata(&log).unwrap().len(), 0);
}

#[tokio::test]
async fn every_state_change_is_told() {
    let fx = Fixture::new();
    let rt = fx.runtime(options());
    let told = Arc::new(tokio::sync::Notify::new());
    rt.on_change(told.clone());
    rt.reconcile(vec![spec("t", &["sleep", "1001"])])
        .await
        .unwrap();
    // Told once it runs: waiting for the notice, then looking, finds it
    // running (a notice may come for Starting first; the next is Running).
    let running = async {
        loop {
            told.notified().await;
            if app(&rt, "t").is_some_and(|s| s.state == AppState::Running) {
                return;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .expect("no notice that the app runs");
    // And when it stops.
    rt.reconcile(vec![]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), told.notified())
        .await
        .expect("no notice that the app stopped");
    rt.stop_all().await;
}

/// The directory of `pid`'s cgroup in the hierarchy that holds `file`
/// (v1 memory or cpu, or v2).
fn cgroup_file(pid: u32, file: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let controller = file.split('.').next()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let dir = if controllers.is_empty() {
            PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'))
        } else if controllers.split(',').any(|c| c == controller) {
            PathBuf::from("/sys/fs/cgroup")
                .join(controllers)
                .join(path.trim_start_matches('/'))
        } else {
            return None;
        };
        let f = dir.join(file);
        f.exists().then_some(f)
    })
}

#[tokio::test]
async fn sandboxed_apps_get_a_cgroup_whose_limits_change_live_and_that_goes_with_them() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let fx = Fixture::new();
    std::fs::set_permissions(fx.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let tag = format!("t{}", std::process::id());
    let sandbox = Sandbox::new("nobody", fx.dir.path().join("work"), &tag).unwrap();
    if !sandbox.cgroups.enabled() {
        eprintln!("skipped: no writable cgroups");
        return;
    }
    let rt = Runtime::sandboxed(fx.apps(), options(), sandbox);
    let argv = ["sleep", "1000043"];
    let mut s = spec("cg", &argv);
    s.limits = Limits {
        cpu_millis: 100,
        memory_mb: 32,
    };
    rt.reconcile(vec![s.clone()]).await.unwrap();
    let pid = running_pid(&rt, "cg").await;
    let (limit, v1) = match cgroup_file(pid, "memory.limit_in_bytes") {
        Some(f) => (f, true),
        None => (cgroup_file(pid, "memory.max").unwrap(), false),
    };
    assert!(
        limit.to_string_lossy().contains(&format!("apps-{tag}/cg/")),
        "{limit:?}"
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    assert_eq!(read(&limit), (32u64 << 20).to_string());
    let quota = if v1 { "cpu.cfs_quota_us" } else { "cpu.max" };
    let cpu = cgroup_file(pid, quota).unwrap();
    assert!(read(&cpu).starts_with("10000"), "{}", read(&cpu));
    // The process runs as nobody, in its own working dir, with a clean env.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    assert!(
        status.contains(&format!("Uid:\t{0}\t{0}", nobody.uid)),
        "{status}"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let mut vars: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .filter_map(|v| String::from_utf8(v.to_vec()).ok())
        .collect();
    vars.sort();
    let home = fx.dir.path().join("work/cg");
    assert_eq!(
        vars,
        [
            format!("HOME={}", home.display()),
            format!("LANG={APP_LANG}"),
            format!("PATH={APP_PATH}"),
            // Set by the /bin/sh that holds the app until it is placed.
            format!("PWD={}", home.display()),
        ]
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        home
    );

    // New limits apply without a restart.
    s.limits.memory_mb = 48;
    rt.reconcile(vec![s.clone()]).await.unwrap();
    assert_eq!(read(&limit), (48u64 << 20).to_string());
    assert_eq!(running_pid(&rt, "cg").await, pid);

    // The cgroup goes with the app.
    let dir = limit.parent().unwrap().to_path_buf();
    rt.reconcile(vec![]).await.unwrap();
    assert!(!dir.exists(), "{dir:?} is left behind");
    assert_eq!(count_processes(&argv), 0);
    // And this runtime's parent when it stops.
    rt.stop_all().await;
    assert!(
        !dir.parent().unwrap().exists(),
        "{dir:?}'s parent is left behind"
    );
}
