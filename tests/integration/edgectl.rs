//! The tenant CLI `edgectl` against a real manager and real agents: config
//! file resolution, table and JSON output, the pool file, errors and exit
//! codes.

use std::path::{Path, PathBuf};

use edgepool_tests::*;

/// Runs the real `edgectl` with only `config` as its settings (no EDGECTL_*
/// from the environment, no config found through the working directory or
/// HOME).
pub fn edgectl(config: Option<&Path>, cwd: &Path, args: &[&str]) -> (Output, Option<i32>) {
    let mut cmd = edgectl_command(cwd);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args);
    let out = cmd.output().expect("running edgectl");
    let code = out.status.code();
    (
        Output {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        code,
    )
}

fn pool_file(name: &str, nodes: &[&str], sleeps: &[u32], extra: &str) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("\"{n}\"")).collect();
    let mut text = format!(
        "name = \"{name}\"\nnodes = [{}]\n{extra}\n[policy]\ntarget = \"spread\"\ncpu = {{ high = 0.9, low = 0.5 }}\n",
        nodes.join(", ")
    );
    for (i, s) in sleeps.iter().enumerate() {
        text.push_str(&format!(
            "\n[[apps]]\nname = \"app-{}\"\ncommand = [\"sleep\", \"{s}\"]\n\
             resources = {{ cpu_millis = 10, memory_mb = 8 }}\n",
            i + 1
        ));
    }
    text
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

#[tokio::test]
async fn edgectl_manages_nodes_tokens_pools_and_events() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let ids = ["ctl-1", "ctl-2", "ctl-3"];
    let mut procs = Vec::new();
    for id in ids {
        let dir = enroll(&m, tmp.path(), id).await;
        procs.push(start_agent(&dir, &m.addr, &[]));
    }
    let tenant = m.tenant();
    for id in ids {
        eventually(&format!("{id} connected"), DEADLINE, || {
            let mut c = tenant.clone();
            async move { get_node(&mut c, id).await.filter(|n| n.connected) }
        })
        .await;
    }

    // A work dir with no config of its own: edgectl must not find one there.
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();

    // Without any settings: a clear error naming flag, env and config key.
    let (out, code) = edgectl(None, &work, &["node", "ls"]);
    assert_eq!(code, Some(1), "{}", out.stderr);
    assert!(
        out.stderr.contains("--ca-cert") && out.stderr.contains("EDGECTL_CA_CERT"),
        "{}",
        out.stderr
    );

    // The config file lives next to the credentials and names them
    // relative to itself (as `cloud-manager dev` writes it).
    let config: PathBuf = m.dir.join("edgectl.toml");
    std::fs::write(
        &config,
        format!(
            "manager = \"{}\"\nca_cert = \"ca.pem\"\ncert = \"tenant.pem\"\nkey = \"tenant.key\"\n",
            m.addr
        ),
    )
    .unwrap();
    let ctl = |args: &[&str]| edgectl(Some(&config), &work, args);

    // Nodes.
    let (out, _) = ctl(&["node", "ls"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.starts_with("NODE "), "{}", out.stdout);
    for id in ids {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} missing:\n{}", out.stdout));
        assert!(line.contains("FREE") && line.contains("yes"), "{line}");
    }
    let (out, _) = ctl(&["node", "ls", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    let v = json(&out.stdout);
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["nodes"][0]["state"], "FREE");
    assert!(v["nodes"][0]["capacity"]["cpuMillis"].as_u64() > Some(0));
    let (out, _) = ctl(&["node", "get", "ctl-2", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(json(&out.stdout)["nodeId"], "ctl-2");

    // Tokens.
    let (out, _) = ctl(&["token", "create", "--ttl", "600", "--label", "zone=a"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.lines().any(|l| l.starts_with("ept_")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("expires"), "{}", out.stdout);

    // A pool file with an unknown key fails, naming the key, and creates nothing.
    let bad = work.join("bad.toml");
    std::fs::write(
        &bad,
        pool_file(
            "shop",
            &["ctl-1", "ctl-2"],
            &[272_001, 272_002],
            "colour = \"red\"",
        ),
    )
    .unwrap();
    let (out, code) = ctl(&["pool", "create", "-f", bad.to_str().unwrap()]);
    assert!(!out.ok && code != Some(0));
    assert!(out.stderr.contains("colour"), "{}", out.stderr);
    let bad_app = work.join("bad-app.toml");
    std::fs::write(
        &bad_app,
        pool_file("shop", &["ctl-1", "ctl-2"], &[272_001, 272_002], "") + "restart = \"always\"\n",
    )
    .unwrap();
    let (out, _) = ctl(&["pool", "create", "-f", bad_app.to_str().unwrap()]);
    assert!(!out.ok && out.stderr.contains("restart"), "{}", out.stderr);

    // Create a pool of 2 nodes and 3 apps.
    let good = work.join("pool.toml");
    std::fs::write(
        &good,
        pool_file(
            "shop",
            &["ctl-1", "ctl-2"],
            &[271_001, 271_002, 271_003],
            "",
        ),
    )
    .unwrap();
    let (out, _) = ctl(&["pool", "create", "-f", good.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("shop") && out.stdout.contains("Placements"),
        "{}",
        out.stdout
    );

    let (out, _) = ctl(&["pool", "ls"]);
    assert!(out.ok, "{}", out.stderr);
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("shop "))
        .unwrap_or_else(|| panic!("pool missing:\n{}", out.stdout));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&cols[..3], ["shop", "2", "3"], "{line}");

    let (out, _) = ctl(&["pool", "get", "shop", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    let v = json(&out.stdout);
    assert_eq!(v["name"], "shop");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["placements"].as_array().map(Vec::len), Some(3), "{v}");
    assert_eq!(v["members"][0]["nodeId"], "ctl-1");
    assert_eq!(v["policy"]["target"], "SPREAD");

    // Eventually every app runs (as edgectl shows it).
    eventually("all placements running (edgectl)", DEADLINE, || {
        let (out, _) = ctl(&["pool", "get", "shop", "-o", "json"]);
        let v = json(&out.stdout);
        let all = v["placements"].as_array().is_some_and(|ps| {
            ps.iter()
                .all(|p| p["state"] == "APP_STATE_RUNNING" && p["pid"].as_u64() > Some(0))
        });
        async move { all.then_some(()) }
    })
    .await;
    let (out, _) = ctl(&["pool", "get", "shop"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("RUNNING") && out.stdout.contains("CERT-EXPIRES"),
        "{}",
        out.stdout
    );

    // Events: the retained POOL_CREATED of this pool, one JSON object per line.
    let (out, _) = ctl(&["events", "--pool", "shop", "--after", "1", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    let events: Vec<serde_json::Value> = out.stdout.lines().map(json).collect();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "POOL_CREATED" && e["pool"] == "shop"),
        "{}",
        out.stdout
    );
    assert!(events.iter().all(|e| e["pool"] == "shop"), "{}", out.stdout);
    let (out, _) = ctl(&["events", "--pool", "shop", "--after", "1"]);
    assert!(
        out.ok && out.stdout.starts_with("SEQ ") && out.stdout.contains("POOL_CREATED"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );

    // --from-start replays everything retained, from the first enrollment.
    let (out, _) = ctl(&["events", "--from-start", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    let events: Vec<serde_json::Value> = out.stdout.lines().map(json).collect();
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "NODE_ENROLLED" && e["nodeId"] == "ctl-1"),
        "{}",
        out.stdout
    );

    // Replace the apps: a 4th app joins.
    let more = work.join("more.toml");
    std::fs::write(
        &more,
        pool_file(
            "shop",
            &["ctl-1", "ctl-2"],
            &[271_001, 271_002, 271_003, 271_004],
            "",
        ),
    )
    .unwrap();
    let (out, _) = ctl(&[
        "pool",
        "apps",
        "shop",
        "-f",
        more.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(json(&out.stdout)["apps"].as_array().map(Vec::len), Some(4));

    // gRPC errors: `edgectl: <code>: <message>`, exit code 1.
    let (out, code) = ctl(&["pool", "get", "nope"]);
    assert_eq!(code, Some(1));
    assert!(
        out.stderr.starts_with("edgectl: NotFound: "),
        "{}",
        out.stderr
    );
    // Bad usage: exit code 2.
    let (_, code) = ctl(&["pool", "create"]);
    assert_eq!(code, Some(2));

    // Delete.
    let (out, _) = ctl(&["pool", "rm", "shop"]);
    assert!(out.ok, "{}", out.stderr);
    let (out, _) = ctl(&["pool", "ls"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        !out.stdout.lines().any(|l| l.starts_with("shop ")),
        "{}",
        out.stdout
    );
    drop(procs);
}

#[test]
fn edgectl_help_documents_the_pool_file_and_settings() {
    let (out, _) = edgectl(None, &std::env::temp_dir(), &["pool", "create", "--help"]);
    assert!(out.ok);
    for s in [
        "[[apps]]",
        "[policy]",
        "nodes",
        "offloadable",
        "spare_labels",
        "disk_io",
        "return_home",
        "return_home_seconds",
        "on_disconnect",
    ] {
        assert!(out.stdout.contains(s), "{s} missing:\n{}", out.stdout);
    }
    let (out, _) = edgectl(None, &std::env::temp_dir(), &["--help"]);
    for s in [
        "EDGECTL_CONFIG",
        "edgepool-dev/edgectl.toml",
        "--manager",
        "-o",
    ] {
        assert!(out.stdout.contains(s), "{s} missing:\n{}", out.stdout);
    }
}
