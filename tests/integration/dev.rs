//! `cloud-manager dev` as a whole process: agents in their own sessions,
//! pid files, crash one machine with pkill -s, Ctrl-C stops everything.

use std::process::Command;
use std::time::Duration;

use edgepool_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state too.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    kill(Pid::from_raw(pid), None).is_ok() && !stat.contains(") Z ")
}

#[tokio::test]
async fn dev_runs_a_fleet_and_stops_it_cleanly() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("dev");
    let mut cmd = Command::new(bin("cloud-manager"));
    cmd.args([
        "dev",
        "--agents",
        "2",
        "--listen",
        "127.0.0.1:0",
        "--peer-port",
        "0",
        "--dir",
    ])
    .arg(&dir);
    let mut dev = Proc::spawn("dev", &mut cmd, &tmp.path().join("dev.log"));

    let addr: std::net::SocketAddr = eventually("dev banner", Duration::from_secs(60), || {
        let text = dev.log_text();
        let addr = text
            .lines()
            .find_map(|l| l.split("manager on ").nth(1))
            .and_then(|rest| rest.split(',').next())
            .and_then(|a| a.parse().ok());
        async move { addr }
    })
    .await;
    let banner = dev.log_text();
    assert!(banner.contains("grpcurl -cacert"), "{banner}");
    assert!(banner.contains("pkill -KILL -s"), "{banner}");
    for f in ["ca.pem", "tenant.pem", "tenant.key"] {
        assert!(dir.join(f).exists(), "{f}");
    }

    let mut pids = Vec::new();
    for n in 1..=2 {
        let pid_file = dir.join(format!("agents/dev-{n}/agent.pid"));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Each agent leads its own session.
        let sid = nix::unistd::getsid(Some(Pid::from_raw(pid))).unwrap();
        assert_eq!(sid.as_raw(), pid, "dev-{n} is not a session leader");
        pids.push(pid);
    }
    let mut tenant = tenant_client(
        &addr,
        &dir.join("ca.pem"),
        Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
    );
    let nodes = list_nodes(&mut tenant).await;
    let ids: Vec<&str> = nodes.iter().map(|n| n.node_id.as_str()).collect();
    assert_eq!(ids, ["dev-1", "dev-2"]);
    assert!(nodes.iter().all(|n| n.connected));
    assert_eq!(nodes[1].peer_address.split(':').next(), Some("127.0.1.2"));

    // Crash simulated machine dev-2 as the README shows.
    let out = run(Command::new("pkill").args(["-KILL", "-s", &pids[1].to_string()]));
    assert!(out.ok, "pkill: {}", out.stderr);
    eventually("dev-2 to disconnect", DEADLINE, || {
        let mut t = tenant.clone();
        async move { get_node(&mut t, "dev-2").await.filter(|n| !n.connected) }
    })
    .await;

    // Ctrl-C stops everything it started.
    dev.signal(Signal::SIGINT);
    let status = dev
        .wait_exit(Duration::from_secs(20))
        .expect("dev did not stop on SIGINT");
    assert!(status.success(), "dev exited with {status}");
    eventually("no orphaned agents", Duration::from_secs(10), || {
        let any = pids.iter().any(|p| alive(*p));
        async move { (!any).then_some(()) }
    })
    .await;
}
