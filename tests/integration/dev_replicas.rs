//! `cloud-manager dev --replicas R --etcd URL`: R manager replica processes
//! on a real etcd, each in its own session with its pid and address in
//! DIR/managers/m-N/; one leads, the agents know every replica and follow
//! a new leader when the old one is killed.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    kill(Pid::from_raw(pid), None).is_ok() && !stat.contains(") Z ")
}

/// Kills the sessions of the pids it holds when dropped: the replicas and
/// agents that `dev` started (each leads its own session), even when the
/// test fails before `dev` stopped them.
struct Sessions(Vec<i32>);

impl Drop for Sessions {
    fn drop(&mut self) {
        for sid in &self.0 {
            for pid in session_members(*sid) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

fn read_pid(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn dev_command(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("cloud-manager"));
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--peer-port", "0"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir);
    cmd
}

/// The replicas' `edge.v1.Leader` health, in order m-1..m-R.
async fn statuses(addrs: &[String], ca: &std::path::Path) -> Vec<Option<i32>> {
    let mut v = Vec::new();
    for a in addrs {
        v.push(leader_status(a, ca).await);
    }
    v
}

async fn connected_dev_nodes(addr: &str, dir: &std::path::Path) -> Option<usize> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut t = tenant_client(
        &addr,
        &dir.join("ca.pem"),
        Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
    );
    let nodes = t
        .list_nodes(pb::ListNodesRequest::default())
        .await
        .ok()?
        .into_inner()
        .nodes;
    Some(
        nodes
            .iter()
            .filter(|n| n.node_id.starts_with("dev-") && n.connected)
            .count(),
    )
}

#[tokio::test]
async fn dev_replicas_run_on_etcd_and_survive_a_leader_kill() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let dir = tmp.path().join("dev");
    let mut cmd = dev_command(&dir, &["--replicas", "3", "--etcd", &etcd.url]);
    let mut dev = Proc::spawn("dev", &mut cmd, &tmp.path().join("dev.log"));
    let mut sessions = Sessions(Vec::new());
    eventually("dev banner", Duration::from_secs(90), || {
        let text = dev.log_text();
        let up = text.contains("edgepool dev is up");
        async move { up.then_some(()) }
    })
    .await;
    let banner = dev.log_text();
    assert!(banner.contains("3 manager replicas"), "{banner}");
    assert!(banner.contains("managers/m-N/manager.pid"), "{banner}");
    // The leader's dashboard link, in the banner and in DIR/dashboard.url.
    let link = std::fs::read_to_string(dir.join("dashboard.url")).unwrap();
    let link = link.trim();
    assert!(
        link.starts_with("http://127.0.0.1:") && link.contains("/login?token="),
        "{link}"
    );
    assert!(banner.contains(link), "{banner}");

    // Each replica: a live session leader with its pid and address in
    // DIR/managers/m-N/, listening there.
    let mut pids = Vec::new();
    let mut addrs = Vec::new();
    for n in 1..=3 {
        let m = dir.join(format!("managers/m-{n}"));
        let pid = read_pid(&m.join("manager.pid"));
        sessions.0.push(pid);
        assert!(alive(pid), "m-{n} (pid {pid}) is not running");
        let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).unwrap();
        assert_eq!(sid.as_raw(), pid, "m-{n} is not a session leader");
        assert!(cmdline(pid).contains("serve"), "{}", cmdline(pid));
        let addr = std::fs::read_to_string(m.join("addr")).unwrap();
        assert_eq!(addr.lines().count(), 1, "{addr:?}");
        let addr = addr.trim().to_string();
        let sa: SocketAddr = addr.parse().unwrap();
        std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("m-{n} at {addr}: {e}"));
        assert!(banner.contains(&addr), "{banner}");
        assert!(banner.contains(&format!("pid {pid}")), "{banner}");
        pids.push(pid);
        addrs.push(addr);
    }
    let ca = dir.join("ca.pem");
    for n in 1..=4 {
        let pid = read_pid(&dir.join(format!("agents/dev-{n}/agent.pid")));
        sessions.0.push(pid);
        // Every agent is given every replica.
        let line = cmdline(pid);
        assert!(
            line.contains(&format!("--manager {}", addrs.join(","))),
            "{line}"
        );
    }

    // Exactly one leads.
    let now = statuses(&addrs, &ca).await;
    let leaders: Vec<usize> = (0..3).filter(|i| now[*i] == Some(1)).collect();
    assert_eq!(leaders.len(), 1, "{now:?}");
    assert_eq!(now.iter().filter(|s| **s == Some(2)).count(), 2, "{now:?}");
    let leader = leaders[0];

    // The agents are connected and the demo pool exists, on the leader.
    assert_eq!(connected_dev_nodes(&addrs[leader], &dir).await, Some(4));
    let leader_sa: SocketAddr = addrs[leader].parse().unwrap();
    let mut tenant = tenant_client(
        &leader_sa,
        &ca,
        Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
    );
    let pool = tenant
        .get_pool(pb::GetPoolRequest {
            name: "demo".into(),
        })
        .await
        .expect("the demo pool")
        .into_inner();
    assert_eq!(pool.members.len(), 3);
    // edgectl as the banner says works against the replicas.
    let out = run(Command::new(dir.join("bin/edgectl"))
        .args(["node", "ls"])
        .current_dir("/"));
    assert!(
        out.ok && out.stdout.contains("dev-4"),
        "{}{}",
        out.stdout,
        out.stderr
    );

    // kill -9 the leader: another replica leads within 5 s, and the
    // agents are on it.
    kill(Pid::from_raw(pids[leader]), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let others: Vec<String> = (0..3)
        .filter(|i| *i != leader)
        .map(|i| addrs[i].clone())
        .collect();
    let new_leader = eventually("another replica to lead", Duration::from_secs(15), || {
        let (others, ca) = (others.clone(), ca.clone());
        async move {
            let now = statuses(&others, &ca).await;
            now.iter()
                .position(|s| *s == Some(1))
                .map(|i| others[i].clone())
        }
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(5), "new leader after {took:?}");
    eventually(
        "the agents on the new leader",
        Duration::from_secs(30),
        || {
            let (addr, dir) = (new_leader.clone(), dir.clone());
            async move { (connected_dev_nodes(&addr, &dir).await == Some(4)).then_some(()) }
        },
    )
    .await;
    // edgectl still works with the same config: whichever replica answers
    // first takes the call (a standby passes it to the new leader).
    let out = run(Command::new(dir.join("bin/edgectl"))
        .args(["node", "ls"])
        .current_dir("/"));
    assert!(
        out.ok && out.stdout.contains("dev-4"),
        "after the kill: {}{}",
        out.stdout,
        out.stderr
    );
    eventually("dev to report the exit", Duration::from_secs(5), || {
        let said = dev.log_text().contains("manager replica exited");
        async move { said.then_some(()) }
    })
    .await;

    // Ctrl-C stops every replica and agent.
    dev.signal(Signal::SIGINT);
    let (mut dev, status) = tokio::task::spawn_blocking(move || {
        let status = dev.wait_exit(Duration::from_secs(20));
        (dev, status)
    })
    .await
    .unwrap();
    let status = status.unwrap_or_else(|| panic!("dev did not stop on SIGINT: {}", dev.log_text()));
    assert!(
        status.success(),
        "dev exited with {status}: {}",
        dev.log_text()
    );
    dev.kill();
    let all = sessions.0.clone();
    eventually(
        "no orphaned replicas or agents",
        Duration::from_secs(10),
        || {
            let any = all.iter().any(|p| alive(*p));
            async move { (!any).then_some(()) }
        },
    )
    .await;
}

/// The replicas die with `dev` even when it is killed outright.
#[tokio::test]
async fn dev_replicas_exit_when_dev_is_killed() {
    let tmp = TempDir::new().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd")).await;
    let dir = tmp.path().join("dev");
    let mut cmd = dev_command(
        &dir,
        &["--replicas", "2", "--etcd", &etcd.url, "--agents", "1"],
    );
    let mut dev = Proc::spawn("dev", &mut cmd, &tmp.path().join("dev.log"));
    let mut sessions = Sessions(Vec::new());
    eventually("dev banner", Duration::from_secs(90), || {
        let up = dev.log_text().contains("edgepool dev is up");
        async move { up.then_some(()) }
    })
    .await;
    for n in 1..=2 {
        sessions
            .0
            .push(read_pid(&dir.join(format!("managers/m-{n}/manager.pid"))));
    }
    sessions
        .0
        .push(read_pid(&dir.join("agents/dev-1/agent.pid")));
    dev.kill();
    let all = sessions.0.clone();
    eventually("the replicas to exit", Duration::from_secs(15), || {
        let any = all.iter().any(|p| alive(*p));
        async move { (!any).then_some(()) }
    })
    .await;
}

#[test]
fn dev_replicas_refuses_bad_input() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("dev");
    let cases: [(&[&str], &str); 4] = [
        (&["--replicas", "3"], "--etcd"),
        (&["--etcd", "http://127.0.0.1:2379"], "--replicas"),
        (
            &["--replicas", "10", "--etcd", "http://127.0.0.1:2379"],
            "1..=9",
        ),
        (
            &["--replicas", "0", "--etcd", "http://127.0.0.1:2379"],
            "1..=9",
        ),
    ];
    for (args, says) in cases {
        let out = run(&mut dev_command(&dir, args));
        assert!(
            !out.ok && out.stderr.contains(says),
            "{args:?}: {}",
            out.stderr
        );
    }
    // Nothing listens on port 1: a clear error naming the URL, at once.
    let started = Instant::now();
    let out = run(&mut dev_command(
        &dir,
        &["--replicas", "2", "--etcd", "http://127.0.0.1:1"],
    ));
    assert!(
        !out.ok
            && out
                .stderr
                .contains("etcd at http://127.0.0.1:1 is not reachable"),
        "{}",
        out.stderr
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!dir.exists(), "{} made before etcd answered", dir.display());
}
