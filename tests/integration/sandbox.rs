//! Hostile apps cannot break out (issue 12, item 1): as root, the agent runs
//! each app as an unprivileged user with a clean environment in a working
//! dir of its own, where it cannot read the node key (nor the manager's CA
//! key), and holds it to its memory and CPU limits in a cgroup of its own.
//! These tests need root (they run as root in CI); without it they return
//! at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::pools::{Fleet, create_pool, get_pool, wait_running};

fn root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// A token unique to this run, for the apps' argv (other builders run the
/// same tests on this machine).
fn unique(f: &Fleet) -> String {
    f.tmp
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// An app pinned to slot 1 (a pool has two nodes at least: `filler`
/// keeps slot 2 busy).
fn spec(name: &str, command: &[&str], cpu_millis: u64, memory_mb: u64) -> pb::AppSpec {
    pb::AppSpec {
        name: name.into(),
        slot: Some(1),
        command: command.iter().map(|s| s.to_string()).collect(),
        resources: Some(pb::Resources {
            cpu_millis,
            memory_mb,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The working dir of `app` on the agent with data dir `data`.
fn filler(tag: &str) -> pb::AppSpec {
    pb::AppSpec {
        slot: Some(2),
        ..spec(
            "filler",
            &["sh", "-c", &format!("exec sleep 610003 # {tag}")],
            10,
            16,
        )
    }
}

/// The data dir of the agent that runs `app`.
async fn host_dir(f: &Fleet, pool: &str, app: &str) -> PathBuf {
    let p = get_pool(&f.m, pool).await;
    let host = p
        .placements
        .iter()
        .find(|pl| pl.app == app)
        .map(|pl| pl.host_node_id.clone())
        .expect("placed");
    f.agents[&host].0.dir.clone()
}

fn workdir(data: &Path, app: &str) -> PathBuf {
    let mut dir = data.as_os_str().to_owned();
    dir.push("-apps");
    PathBuf::from(dir).join(app)
}

async fn file_in(dir: &Path, name: &str) -> String {
    let path = dir.join(name);
    eventually(&format!("{}", path.display()), DEADLINE, || async {
        std::fs::read_to_string(&path)
            .ok()
            .filter(|t| t.ends_with("END\n"))
    })
    .await
}

#[tokio::test]
async fn apps_run_unprivileged_with_a_clean_env_and_cannot_read_keys() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Fleet::start(2, &[]).await;
    let ca_key = f.tmp.path().join("m").join("ca.key");
    assert!(
        ca_key.exists(),
        "the manager's CA key is at {}",
        ca_key.display()
    );
    let tag = unique(&f);
    let slot1 = f.agents["node-1"].0.dir.clone();
    let data = slot1.clone();
    let reader = format!(
        "cat {key} >/dev/null 2>key.err; echo \"key=$?\" > out; \
         cat {ca} >/dev/null 2>>key.err; echo \"ca=$?\" >> out; \
         echo '{{}}' 2>>key.err > {record}; echo \"record=$?\" >> out; \
         echo \"uid=$(id -u) gid=$(id -g) groups=$(id -G) cwd=$(pwd)\" >> out; \
         echo END >> out; exec sleep 610001 # {tag}",
        key = data.join("node.key").display(),
        ca = ca_key.display(),
        record = data.join("apps/reader/app.json").display(),
    );
    let printer = format!("env > env.txt; echo END >> env.txt; exec sleep 610002 # {tag}");
    let mut env_app = spec("printer", &["sh", "-c", &printer], 10, 16);
    env_app.env = [("GREETING".to_string(), "hello".to_string())].into();
    create_pool(
        &f.m,
        "s",
        &["node-1", "node-2"],
        vec![
            spec("reader", &["sh", "-c", &reader], 10, 16),
            env_app,
            filler(&tag),
        ],
    )
    .await
    .unwrap();
    wait_running(&f.m, "s").await;
    assert_eq!(host_dir(&f, "s", "reader").await, data, "slot 1 is node-1");

    let dir = workdir(&data, "reader");
    let out = file_in(&dir, "out").await;
    let err = std::fs::read_to_string(dir.join("key.err")).unwrap_or_default();
    // EACCES: the data dir is owner-only, so the key is out of reach, and
    // the record the agent trusts on restart cannot be rewritten.
    assert!(out.contains("key=1\n"), "{out}\n{err}");
    assert!(out.contains("ca=1\n"), "{out}\n{err}");
    assert!(
        out.contains("record=") && !out.contains("record=0"),
        "{out}\n{err}"
    );
    assert_eq!(err.matches("Permission denied").count(), 3, "{err}");
    let nobody = nix::unistd::User::from_name(APP_USER).unwrap().unwrap();
    assert!(
        out.contains(&format!(
            "uid={} gid={} groups={} cwd={}",
            nobody.uid,
            nobody.gid,
            nobody.gid,
            dir.display()
        )),
        "{out}"
    );
    let meta = std::fs::metadata(&data).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(&dir).unwrap().uid(), nobody.uid.as_raw());

    // Only PATH, HOME, LANG and the app's own env (sh adds PWD, SHLVL, _):
    // nothing of the agent's environment (RUST_BACKTRACE, CARGO_*, ...).
    let env_dir = workdir(&data, "printer");
    let text = file_in(&env_dir, "env.txt").await;
    let env: BTreeMap<&str, &str> = text
        .lines()
        .filter(|l| *l != "END")
        .filter_map(|l| l.split_once('='))
        .collect();
    assert_eq!(
        env.get("PATH"),
        Some(&"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    );
    assert_eq!(env.get("HOME").copied(), env_dir.to_str());
    assert_eq!(env.get("LANG"), Some(&"C.UTF-8"));
    assert_eq!(env.get("GREETING"), Some(&"hello"));
    let extra: Vec<&&str> = env
        .keys()
        .filter(|k| !["PATH", "HOME", "LANG", "GREETING", "PWD", "SHLVL", "_"].contains(k))
        .collect();
    assert!(
        extra.is_empty(),
        "unexpected variables {extra:?} in\n{text}"
    );
}

#[tokio::test]
async fn apps_are_held_to_their_memory_and_cpu_limits() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let f = Fleet::start(2, &[]).await;
    let tag = unique(&f);
    // 200 MiB, every page written, with a 64 MiB request (= its limit).
    let hog = "import time; b = b'x' * (200 << 20); time.sleep(600)";
    let burner = format!("while :; do :; done # {tag}");
    create_pool(
        &f.m,
        "l",
        &["node-1", "node-2"],
        vec![
            spec("hog", &["python3", "-c", hog, &tag], 10, 64),
            spec("burner", &["sh", "-c", &burner], 200, 16),
            filler(&tag),
        ],
    )
    .await
    .unwrap();

    let e = wait_event(&f.m, "l", "APP_EXITED of hog", DEADLINE, |e| {
        e.kind() == pb::EventKind::AppExited && e.app == "hog"
    })
    .await;
    assert!(
        e.message
            .starts_with("killed by the kernel: out of memory (limit 64 MiB"),
        "{e:?}"
    );

    // The burner spins as fast as it may: its CPU time grows by about 0.2
    // s per second, not 1.
    let pid = eventually("burner running", DEADLINE, || async {
        get_pool(&f.m, "l")
            .await
            .placements
            .iter()
            .find(|p| p.app == "burner" && p.state() == pb::AppState::Running && p.pid != 0)
            .map(|p| p.pid as i32)
    })
    .await;
    let cpu_secs = |pid| {
        let ticks = stat_field(pid, 14).unwrap_or(0) + stat_field(pid, 15).unwrap_or(0);
        ticks as f64 / 100.0
    };
    let (t0, c0) = (Instant::now(), cpu_secs(pid));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let cores = (cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64();
    assert!(cores < 0.35, "the burner used {cores:.2} cores (limit 0.2)");
    assert!(cores > 0.05, "the burner hardly ran: {cores:.2} cores");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroup.contains("/apps-"), "{cgroup}");

    // The node reports the usage it reads from the cgroup.
    eventually("burner usage reported", DEADLINE, || async {
        get_pool(&f.m, "l")
            .await
            .placements
            .iter()
            .find(|p| p.app == "burner")
            .and_then(|p| p.usage)
            .filter(|u| (100..=350).contains(&u.cpu_millis))
    })
    .await;
}

#[tokio::test]
async fn an_agent_whose_run_as_user_does_not_exist_refuses_to_start() {
    if !root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let agent = enroll(&m, tmp.path(), "node-1").await;
    let mut cmd = std::process::Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&agent.dir)
        .args(["--manager", &m.addr.to_string()])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(["--run-as", "no-such-user-edgepool"]);
    let mut p = Proc::spawn_session("node-1", &mut cmd, &tmp.path().join("agent.log"));
    let status = tokio::task::spawn_blocking(move || {
        let status = p.wait_exit(DEADLINE);
        (status, p.log_text())
    });
    let (status, log) = status.await.unwrap();
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(
        log.contains("there is no user \"no-such-user-edgepool\"")
            && log.contains("run_as")
            && log.contains("--run-as"),
        "{log}"
    );
}
