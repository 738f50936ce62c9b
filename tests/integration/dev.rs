//! `cloud-manager dev` as a whole process: agents in their own sessions,
//! pid files, crash one machine with pkill -s, Ctrl-C stops everything.

use std::process::Command;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state too.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    kill(Pid::from_raw(pid), None).is_ok() && !stat.contains(") Z ")
}

/// `cloud-manager dev` on ephemeral ports with its data in `dir`.
fn dev_command(dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("cloud-manager"));
    cmd.args(["dev", "--listen", "127.0.0.1:0", "--peer-port", "0"])
        .args(["--http-listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--data-dir")
        .arg(dir);
    cmd
}

/// Waits for the banner of a `dev` run and returns the manager's address.
async fn dev_addr(dev: &Proc) -> std::net::SocketAddr {
    eventually("dev banner", Duration::from_secs(60), || {
        let addr = dev
            .log_text()
            .lines()
            .find_map(|l| l.split("manager on ").nth(1))
            .and_then(|rest| rest.split(',').next())
            .and_then(|a| a.parse().ok());
        async move { addr }
    })
    .await
}

/// `DIR/dashboard.url` (owner-only: it logs in) holds the banner's link,
/// and opening it gives a session that reads the dev tenant's nodes.
fn dashboard_url_logs_in(dir: &std::path::Path, banner: &str) {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("dashboard.url");
    let url = std::fs::read_to_string(&path).expect("DIR/dashboard.url");
    let url = url.trim();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(banner.contains(url), "the banner lacks {url}:\n{banner}");
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path_q) = rest.split_once('/').expect("path");
    assert!(host.starts_with("127.0.0.1:"), "{url}");
    let get = |path: &str, cookie: &str| {
        let mut s = std::net::TcpStream::connect(host).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{cookie}\r\n"
        )
        .unwrap();
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text
    };
    let login = get(&format!("/{path_q}"), "");
    assert!(login.starts_with("HTTP/1.1 303"), "{login}");
    let cookie = login
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .and_then(|c| c.split(';').next())
        .expect("session cookie");
    let state = get("/api/state", &format!("Cookie: {cookie}\r\n"));
    assert!(
        state.starts_with("HTTP/1.1 200") && state.contains("\"dev-1\""),
        "{state}"
    );
}

#[tokio::test]
async fn dev_runs_a_fleet_and_stops_it_cleanly() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("dev");
    let mut cmd = dev_command(&dir, &["--agents", "2"]);
    let mut dev = Proc::spawn("dev", &mut cmd, &tmp.path().join("dev.log"));
    let addr = dev_addr(&dev).await;
    let banner = dev.log_text();
    assert!(banner.contains("grpcurl -cacert"), "{banner}");
    assert!(banner.contains("pkill -KILL -s"), "{banner}");
    for f in ["ca.pem", "tenant.pem", "tenant.key"] {
        assert!(dir.join(f).exists(), "{f}");
    }
    dashboard_url_logs_in(&dir, &banner);

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

    // Metrics are on: DIR/metrics.url and DIR/agents/dev-N/metrics.url
    // hold URLs that scrape.
    assert!(banner.contains("metrics.url"), "{banner}");
    let murl = metrics_url(&dir);
    assert!(murl.starts_with("http://127.0.0.1:"), "{murl}");
    scrape_until("both dev agents' streams", &murl, |s| {
        (s.value("edgepool_agent_streams") == 2.0).then_some(())
    })
    .await;
    for n in 1..=2 {
        let url = metrics_url(&dir.join(format!("agents/dev-{n}")));
        let s = scrape(&url).await;
        assert!(s.has_family("edgepool_apps"), "dev-{n}: {}", s.text);
        assert!(
            s.has_family("edgepool_agent_stream_reconnects"),
            "dev-{n}: {}",
            s.text
        );
    }
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

    // The crashed machine comes back under dev's supervision, its log
    // appended to.
    let restart = |node: &str| {
        run(Command::new(bin("cloud-manager"))
            .args(["dev", "--restart-agent", node, "--data-dir"])
            .arg(&dir))
    };
    let out = restart("dev-2");
    assert!(
        out.ok && out.stdout.contains("restarted dev-2"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    eventually("dev-2 to reconnect", DEADLINE, || {
        let mut t = tenant.clone();
        async move { get_node(&mut t, "dev-2").await.filter(|n| n.connected) }
    })
    .await;
    let log = std::fs::read_to_string(dir.join("agents/dev-2/agent.log")).unwrap();
    assert_eq!(log.matches("agent starting").count(), 2, "{log}");
    let new_pid: i32 = std::fs::read_to_string(dir.join("agents/dev-2/agent.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_ne!(new_pid, pids[1]);
    pids.push(new_pid);
    let out = restart("dev-1");
    assert!(
        out.ok && out.stdout.contains("still running"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let out = restart("dev-9");
    assert!(
        !out.ok && out.stderr.contains("not an agent"),
        "{}",
        out.stderr
    );

    // Fewer than 4 agents: one line says why there is no demo pool.
    assert!(
        dev.log_text().contains("no demo pool: it needs 4 agents"),
        "{}",
        dev.log_text()
    );
    // edgectl as the banner says, for a dir that is not ./edgepool-dev,
    // run from anywhere.
    let out = run(Command::new(dir.join("bin/edgectl"))
        .args(["node", "ls"])
        .current_dir("/"));
    assert!(
        out.ok && out.stdout.contains("dev-2"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    assert!(dev.log_text().contains(&format!(
        "export PATH=\"{}:$PATH\"",
        dir.join("bin").display()
    )));
    // A second dev on the same dir is refused, naming the reason.
    let out = run(&mut dev_command(&dir, &[]));
    assert!(
        !out.ok && out.stderr.contains("another cloud-manager is using"),
        "{}",
        out.stderr
    );

    // Ctrl-C stops everything it started, within 2 s even with an event
    // stream open; the stream ends with UNAVAILABLE, not a broken link.
    let mut events = tenant
        .watch_events(edgepool_common::proto::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    // A client that keeps reading, as edgectl events -f does.
    let reader = tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.message()).await {
                Ok(Ok(Some(_))) => continue,
                other => return other,
            }
        }
    });
    let stopping = std::time::Instant::now();
    dev.signal(Signal::SIGINT);
    let (mut dev, status) = tokio::task::spawn_blocking(move || {
        let status = dev.wait_exit(Duration::from_secs(20));
        (dev, status)
    })
    .await
    .unwrap();
    let took = stopping.elapsed();
    let status = status.unwrap_or_else(|| panic!("dev did not stop on SIGINT: {}", dev.log_text()));
    assert!(status.success(), "dev exited with {status}");
    assert!(took < Duration::from_secs(2), "Ctrl-C took {took:?}");
    dev.kill();
    match reader.await.unwrap() {
        Ok(Err(status)) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status}"),
        other => panic!("the event stream did not end with a status: {other:?}"),
    }
    eventually("no orphaned agents", Duration::from_secs(10), || {
        let any = pids.iter().any(|p| alive(*p));
        async move { (!any).then_some(()) }
    })
    .await;
}

/// `dev` restarts on its dir whatever pools the tenant made: the demo pool
/// is made only when it is missing and its nodes are free, else one line
/// says why not; the tenant's own pool is kept.
#[tokio::test]
async fn dev_restarts_on_a_dir_whose_nodes_are_taken() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("dev");
    let start = |n: usize| {
        let log = tmp.path().join(format!("dev-{n}.log"));
        Proc::spawn("dev", &mut dev_command(&dir, &[]), &log)
    };
    let mut dev = start(1);
    let addr = dev_addr(&dev).await;
    assert!(
        dev.log_text().contains("The demo pool"),
        "{}",
        dev.log_text()
    );
    let mut tenant = tenant_client(
        &addr,
        &dir.join("ca.pem"),
        Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
    );
    // What the README's edgectl steps do: demo goes, a pool of one's own
    // takes dev-1..dev-3.
    tenant
        .delete_pool(pb::DeletePoolRequest {
            name: "demo".into(),
        })
        .await
        .unwrap();
    let app = |name: &str| pb::AppSpec {
        name: name.into(),
        command: vec!["sleep".into(), "320001".into()],
        ..Default::default()
    };
    eventually("demo's nodes free", DEADLINE, || {
        let mut t = tenant.clone();
        async move {
            let nodes = list_nodes(&mut t).await;
            nodes
                .iter()
                .all(|n| n.state() == pb::NodeState::Free)
                .then_some(())
        }
    })
    .await;
    tenant
        .create_pool(pb::CreatePoolRequest {
            name: "web".into(),
            node_ids: vec!["dev-1".into(), "dev-2".into(), "dev-3".into()],
            apps: vec![app("a"), app("b"), app("c")],
            ..Default::default()
        })
        .await
        .unwrap();
    dev.signal(Signal::SIGINT);
    assert!(
        dev.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );

    let mut dev = start(2);
    let addr = dev_addr(&dev).await;
    let text = dev.log_text();
    assert!(
        text.contains("no demo pool: dev-1 is in pool \"web\""),
        "{text}"
    );
    let mut tenant = tenant_client(
        &addr,
        &dir.join("ca.pem"),
        Some((&dir.join("tenant.pem"), &dir.join("tenant.key"))),
    );
    let pools = tenant
        .list_pools(pb::ListPoolsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = pools.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["web"]);
    dev.signal(Signal::SIGINT);
    assert!(
        dev.wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}
