//! Several manager addresses (replicas): `edge-agent join`, `edge-agent run`
//! and edgectl take `HOST:PORT,HOST:PORT`, use one that answers, and the
//! agent's stream moves to the next address when its manager goes away.

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use edgepool_tests::*;

/// An address where nothing listens (a port bound and let go).
fn dead_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

#[tokio::test]
async fn agent_and_edgectl_use_the_manager_that_answers_and_move_when_it_goes() {
    let tmp = TempDir::new().unwrap();
    let mdir = tmp.path().join("m");
    let mut m = Manager::start(&mdir).await;
    let dead = dead_addr();

    // join: the first address does not answer, the second does.
    let dir = tmp.path().join("edge-1");
    let token = m.token().await;
    let list = format!("{dead},{}", m.addr);
    let out = run(Command::new(bin("edge-agent"))
        .args(["join", "--manager", &list, "--token", &token, "--ca-cert"])
        .arg(m.ca())
        .args(["--node-id", "edge-1", "--data-dir"])
        .arg(&dir));
    assert!(out.ok, "join: {}", out.stderr);

    // run, with the list `join` recorded (no --manager): connects.
    let other = dead_addr();
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&dir)
        .args(edgepool_tests::sandbox_args(&dir))
        .args(["--manager", &format!("{},{other}", m.addr)])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(["--reconnect-min-ms", "200", "--reconnect-max-ms", "1000"]);
    let agent = Proc::spawn_session("edge-1", &mut cmd, &dir.join("agent.log"));
    wait_connected(&m, "edge-1").await;

    // edgectl with a dead first address.
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let out = edgectl_command(&home)
        .args(["--manager", &format!("{dead},{}", m.addr), "--ca-cert"])
        .arg(m.ca())
        .arg("--cert")
        .arg(mdir.join("tenant.pem"))
        .arg("--key")
        .arg(mdir.join("tenant.key"))
        .args(["node", "ls"])
        .output()
        .expect("edgectl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("edge-1"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The manager goes; the same state comes back at the agent's second
    // address (another replica): the agent is there within 5 s.
    m.proc.kill();
    m = Manager::start_on(&mdir, other, &[]).await;
    let back = Instant::now();
    wait_connected(&m, "edge-1").await;
    assert!(
        back.elapsed() < Duration::from_secs(5),
        "reconnected after {:?}",
        back.elapsed()
    );
    assert!(agent.log_text().contains(&other.to_string()));
}
