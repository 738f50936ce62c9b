//! The install flow of docs/install.md, on loopback with the built binaries
//! and the configs the Debian packages ship: `cloud-manager init` for a
//! server name, `serve --config`, edgectl set up in ~/.config/edgectl, a
//! join token per node, `edge-agent join --ca-fingerprint`, two agents with
//! their peer ports on two 127.0.x addresses, and a pool of the two.

use std::path::{Path, PathBuf};
use std::process::Command;

use edgepool_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repository root")
        .to_path_buf()
}

/// The real `edgectl` as an operator runs it: settings only from
/// `$HOME/.config/edgectl/config.toml`.
fn edgectl(home: &Path, args: &[&str]) -> Output {
    run(edgectl_command(home).args(args))
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.ok, "edgectl failed:\n{}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout))
}

#[tokio::test]
async fn install_flow_init_serve_token_join_with_fingerprint_and_pool() {
    let tmp = TempDir::new().unwrap();

    // Cloud side: init with the name agents dial (the public name; here
    // localhost), then print the fingerprint again from the data dir.
    let data = tmp.path().join("var-lib-edgepool");
    let out = run(Command::new(bin("cloud-manager"))
        .args(["init", "--data-dir"])
        .arg(&data)
        .args(["--server-name", "localhost"]));
    assert!(out.ok, "init: {}", out.stderr);
    let fingerprint = out
        .stdout
        .lines()
        .filter(|l| l.contains("CA fingerprint"))
        .flat_map(str::split_whitespace)
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_else(|| panic!("no CA fingerprint in init's output:\n{}", out.stdout))
        .to_string();
    let out = run(Command::new(bin("cloud-manager"))
        .args(["fingerprint", "--data-dir"])
        .arg(&data));
    assert!(out.ok, "fingerprint: {}", out.stderr);
    assert_eq!(out.stdout.trim(), fingerprint);

    // serve with the packaged /etc/edgepool/manager.toml; the flags stand
    // in for its listen address and data dir.
    let manager_toml = repo().join("packaging/cloud-manager/manager.toml");
    let m = Manager::start_on(
        &data,
        "127.0.0.1:0".parse().unwrap(),
        &["--config", manager_toml.to_str().unwrap()],
    )
    .await;
    let manager = format!("localhost:{}", m.addr.port());

    // edgectl for the operator: the tenant bundle from the data dir, and a
    // config file naming it relative to itself.
    let home = tmp.path().join("home");
    let conf = home.join(".config/edgectl");
    std::fs::create_dir_all(&conf).unwrap();
    for f in ["ca.pem", "tenant.pem", "tenant.key"] {
        std::fs::copy(data.join(f), conf.join(f)).unwrap();
    }
    std::fs::write(
        conf.join("config.toml"),
        format!(
            "manager = \"{manager}\"\nca_cert = \"ca.pem\"\ncert = \"tenant.pem\"\nkey = \"tenant.key\"\n"
        ),
    )
    .unwrap();

    // Edge side, twice: a token, join with the fingerprint (no ca.pem
    // copied), then run with the packaged agent.toml.
    let agent_toml = repo().join("packaging/edge-agent/agent.toml");
    let nodes = [("edge-01", "127.0.2.1"), ("edge-02", "127.0.3.1")];
    let mut agents = Vec::new();
    for (node, ip) in nodes {
        let v = json(&edgectl(
            &home,
            &["token", "create", "--ttl", "600", "-o", "json"],
        ));
        let token = v["token"].as_str().expect("token").to_string();
        assert!(token.starts_with("ept_"), "{v}");

        let dir = tmp.path().join(node);
        let out = run(Command::new(bin("edge-agent"))
            .args(["join", "--manager", &manager, "--token", &token])
            .args(["--ca-fingerprint", &fingerprint, "--node-id", node])
            .arg("--data-dir")
            .arg(&dir));
        assert!(out.ok, "join {node}: {}", out.stderr);
        // What edge-agent.service waits for (ConditionPathExists).
        assert!(dir.join("node.json").exists());
        assert!(dir.join("ca.pem").exists());

        // The manager address is the one join recorded (agent.toml leaves
        // it empty); the peer port gets its own loopback address.
        let mut cmd = Command::new(bin("edge-agent"));
        cmd.args(["run", "--new-session", "--config"])
            .arg(&agent_toml)
            .arg("--data-dir")
            .arg(&dir)
            .args(edgepool_tests::sandbox_args(&dir))
            .args(["--peer-listen", &format!("{ip}:0")])
            .args(["--network-accounting", "process"])
            .args(["--peer-probe-interval-ms", "300"]);
        let log = tmp.path().join(format!("{node}.log"));
        agents.push(Proc::spawn_session(node, &mut cmd, &log));
    }
    for (node, ip) in nodes {
        let n = wait_connected(&m, node).await;
        assert!(
            n.peer_address.starts_with(&format!("{ip}:")),
            "{node} advertises {}",
            n.peer_address
        );
    }
    let v = json(&edgectl(&home, &["node", "ls", "-o", "json"]));
    let listed: Vec<&str> = v["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["nodeId"].as_str())
        .collect();
    assert_eq!(listed, ["edge-01", "edge-02"], "{v}");

    // A pool of the two nodes.
    let pool = home.join("pool.toml");
    std::fs::write(
        &pool,
        "name = \"shop\"\nnodes = [\"edge-01\", \"edge-02\"]\n\n\
         [[apps]]\nname = \"web\"\ncommand = [\"sleep\", \"273001\"]\n\
         resources = { cpu_millis = 10, memory_mb = 8 }\n\n\
         [[apps]]\nname = \"worker\"\ncommand = [\"sleep\", \"273002\"]\n\
         resources = { cpu_millis = 10, memory_mb = 8 }\n",
    )
    .unwrap();
    let out = edgectl(&home, &["pool", "create", "-f", pool.to_str().unwrap()]);
    assert!(out.ok, "pool create: {}", out.stderr);

    let v = eventually(
        "both apps running and the peers reaching each other",
        DEADLINE,
        || {
            let v = json(&edgectl(&home, &["pool", "get", "shop", "-o", "json"]));
            let running = v["placements"].as_array().is_some_and(|ps| {
                ps.len() == 2
                    && ps
                        .iter()
                        .all(|p| p["state"] == "APP_STATE_RUNNING" && p["pid"].as_u64() > Some(0))
            });
            let reach = nodes.iter().all(|&(node, _)| {
                let n = json(&edgectl(&home, &["node", "get", node, "-o", "json"]));
                n["peers"]
                    .as_array()
                    .is_some_and(|ps| !ps.is_empty() && ps.iter().all(|p| p["reachable"] == true))
            });
            async move { (running && reach).then_some(v) }
        },
    )
    .await;
    let members: Vec<&str> = v["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m["nodeId"].as_str())
        .collect();
    assert_eq!(members, ["edge-01", "edge-02"], "{v}");
    for cmd in ["sleep 273001", "sleep 273002"] {
        assert_eq!(processes_running(cmd).len(), 1, "{cmd}");
    }
    drop(agents);
}
