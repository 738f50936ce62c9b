//! Prometheus metrics of real daemons, scraped over HTTP from the URLs they
//! write to `DATA_DIR/metrics.url`: the exposition parses and has the
//! `edgepool_` families, and the values move with what happens (telemetry,
//! streams, calls, apps deployed, a failover, an offload).

use std::collections::BTreeMap;

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::offload::{agent_args, create, load, policy};
use crate::pools::{Fleet, app, create_pool, wait_running};

const METRICS: [&str; 2] = ["--metrics-listen", "127.0.0.1:0"];

/// A manager and `n` agents, all with metrics on.
async fn fleet(n: usize, agent_extra: &[String]) -> Fleet {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &METRICS,
    )
    .await;
    let mut args: Vec<&str> = agent_extra.iter().map(String::as_str).collect();
    args.extend(METRICS);
    let mut agents = BTreeMap::new();
    for i in 1..=n {
        let id = format!("node-{i}");
        let dir = enroll(&m, tmp.path(), &id).await;
        let p = start_agent(&dir, &m.addr, &args);
        agents.insert(id, (dir, p));
    }
    for id in agents.keys() {
        wait_connected(&m, id).await;
    }
    Fleet { tmp, m, agents }
}

fn agent_url(f: &Fleet, node: &str) -> String {
    metrics_url(&f.agents[node].0.dir)
}

/// Apps with a command line no other test (or other run) uses; slot 1's
/// hold 16 MiB each (`edgepool-load`), the others sleep.
fn unique_apps(prefix: &str) -> Vec<pb::AppSpec> {
    let run = std::process::id();
    let load = bin("edgepool-load").display().to_string();
    (0..6)
        .map(|i| {
            let name = format!("{prefix}{i}");
            let tag = format!("{name}-{run}");
            let mut a = if i < 2 {
                let mut a = app(&name, &[&load, "--memory", "16", "--tag", &tag]);
                // Its memory limit (the request) above what it holds.
                if let Some(r) = a.resources.as_mut() {
                    r.memory_mb = 64;
                }
                a
            } else {
                app(&name, &["sleep", &format!("79{run:07}{i}")])
            };
            a.slot = Some(i / 2 + 1);
            a
        })
        .collect()
}

#[tokio::test]
async fn manager_and_agent_metrics_move_with_telemetry_apps_and_a_failover() {
    let mut f = fleet(4, &[]).await;
    let murl = metrics_url(&f.m.dir);
    assert!(murl.starts_with("http://127.0.0.1:"), "{murl}");
    let first = scrape(&murl).await;
    for family in [
        "edgepool_telemetry_messages",
        "edgepool_agent_streams",
        "edgepool_rpc_duration_seconds",
        "edgepool_failovers",
        "edgepool_failover_duration_seconds",
        "edgepool_offloads",
        "edgepool_events",
        "edgepool_store_commit_duration_seconds",
        "edgepool_nodes",
        "edgepool_certificates_expiring",
        "edgepool_certificate_soonest_expiry_seconds",
        "edgepool_event_log_events",
        "edgepool_pools",
        "edgepool_pool_degraded_slots",
    ] {
        assert!(
            first.has_family(family),
            "{family} missing:\n{}",
            first.text
        );
    }
    assert_eq!(first.value("edgepool_agent_streams"), 4.0, "{}", first.text);
    assert_eq!(first.value("edgepool_nodes{state=\"free\"}"), 4.0);
    assert!(
        first.value("edgepool_rpc_duration_seconds_count{method=\"/edge.v1.AgentService/Enroll\",code=\"OK\"}")
            >= 4.0,
        "{}",
        first.text
    );
    assert_eq!(
        first.value("edgepool_certificates_expiring{kind=\"node\",within_days=\"+Inf\"}"),
        4.0
    );
    assert_eq!(
        first.value("edgepool_certificates_expiring{kind=\"root_ca\",within_days=\"+Inf\"}"),
        1.0
    );
    assert!(first.value("edgepool_store_commit_duration_seconds_count") >= 4.0);

    // Telemetry counts up (each agent sends one a second).
    let t0 = first.value("edgepool_telemetry_messages_total");
    scrape_until("telemetry to be counted", &murl, |s| {
        (s.value("edgepool_telemetry_messages_total") >= t0 + 4.0).then_some(())
    })
    .await;
    // A refused call is counted under its code.
    let missing =
        f.m.tenant()
            .get_node(pb::GetNodeRequest {
                node_id: "no-such-node".into(),
            })
            .await
            .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    scrape_until("GetNode NOT_FOUND counted", &murl, |s| {
        (s.value("edgepool_rpc_duration_seconds_count{method=\"/edge.v1.TenantService/GetNode\",code=\"NOT_FOUND\"}") >= 1.0)
            .then_some(())
    })
    .await;

    // Deploying apps shows on the agents: two apps per member running,
    // their memory, and the peers they probe.
    let apps = unique_apps("mf");
    create_pool(&f.m, "mx", &["node-1", "node-2", "node-3"], apps)
        .await
        .unwrap();
    wait_running(&f.m, "mx").await;
    let a1 = agent_url(&f, "node-1");
    let s = scrape_until("node-1 to run its 2 apps and reach its peers", &a1, |s| {
        (s.value("edgepool_apps{state=\"running\"}") == 2.0
            && s.value("edgepool_app_memory_bytes{app=\"mf0\"}") >= 8.0 * 1048576.0
            && s.value("edgepool_app_memory_bytes{app=\"mf1\"}") >= 8.0 * 1048576.0
            && s.value("edgepool_peer_reachable{peer_slot=\"2\"}") == 1.0
            && s.value("edgepool_peer_reachable{peer_slot=\"3\"}") == 1.0
            && s.value("edgepool_peer_probe_rtt_seconds_count{peer_slot=\"2\"}") >= 1.0)
            .then(|| s.clone())
    })
    .await;
    for app in ["mf0", "mf1"] {
        assert!(
            s.value(&format!("edgepool_app_memory_bytes{{app=\"{app}\"}}")) >= 8.0 * 1048576.0,
            "{app}: {}",
            s.text
        );
        assert!(
            s.samples
                .contains_key(&format!("edgepool_app_cpu_cores{{app=\"{app}\"}}"))
        );
        assert_eq!(
            s.value(&format!("edgepool_app_restarts_total{{app=\"{app}\"}}")),
            0.0
        );
    }
    let spare = scrape(&agent_url(&f, "node-4")).await;
    assert_eq!(spare.value("edgepool_apps{state=\"running\"}"), 0.0);
    let s = scrape(&murl).await;
    assert_eq!(s.value("edgepool_nodes{state=\"member\"}"), 3.0);
    assert_eq!(s.value("edgepool_pools"), 1.0);
    assert_eq!(
        s.value("edgepool_certificates_expiring{kind=\"member\",within_days=\"+Inf\"}"),
        3.0
    );
    // Member certificates last a day (renewed with a third left), node
    // certificates a year.
    assert_eq!(
        s.value("edgepool_certificates_expiring{kind=\"member\",within_days=\"1\"}"),
        3.0
    );
    assert_eq!(
        s.value("edgepool_certificates_expiring{kind=\"node\",within_days=\"90\"}"),
        0.0
    );
    let soonest = s.value("edgepool_certificate_soonest_expiry_seconds{kind=\"member\"}");
    assert!(soonest > 23.0 * 3600.0 && soonest <= 86_400.0, "{soonest}");
    assert!(s.value("edgepool_event_log_events") >= 1.0);
    assert_eq!(s.value("edgepool_failovers_total{outcome=\"moved\"}"), 0.0);

    // A real failover: crash node-2 (agent and apps); the spare takes slot 2.
    let (_dir2, mut proc2) = f.agents.remove("node-2").unwrap();
    proc2.kill();
    let s = scrape_until("the failover to be counted and finished", &murl, |s| {
        (s.value("edgepool_failovers_total{outcome=\"moved\"}") == 1.0
            && s.value("edgepool_failover_duration_seconds_count") == 1.0)
            .then(|| s.clone())
    })
    .await;
    let seconds = s.value("edgepool_failover_duration_seconds_sum");
    assert!(seconds > 0.0 && seconds < 30.0, "{seconds}");
    assert_eq!(
        s.value("edgepool_events_total{kind=\"FAILOVER_STARTED\"}"),
        1.0
    );
    assert_eq!(
        s.value("edgepool_events_total{kind=\"FAILOVER_DONE\"}"),
        1.0
    );
    assert_eq!(s.value("edgepool_nodes{state=\"failed\"}"), 1.0);
    assert_eq!(s.value("edgepool_agent_streams"), 3.0);
    scrape_until(
        "node-4 to run slot 2's apps",
        &agent_url(&f, "node-4"),
        |s| (s.value("edgepool_apps{state=\"running\"}") == 2.0).then_some(()),
    )
    .await;
    // The other members see slot 2 (now node-4) again.
    scrape_until("node-1 to reach slot 2 again", &a1, |s| {
        (s.value("edgepool_peer_reachable{peer_slot=\"2\"}") == 1.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_offload_is_counted_by_owner_host_and_manager() {
    let f = fleet(3, &agent_args(500, 100_000, 100_000, 100_000)).await;
    let run = std::process::id();
    let idle = pb::AppSpec {
        name: "mo-idle3".into(),
        command: vec!["sleep".into(), format!("78{run:07}1")],
        slot: Some(3),
        ..Default::default()
    };
    let apps = vec![
        load("mo-burner", 1, &["--cpu", "350"], true, 0),
        load("mo-pad1", 1, &["--cpu", "150"], false, 5),
        load("mo-busy2", 2, &["--cpu", "150"], false, 0),
        idle,
    ];
    create(
        &f,
        "mo",
        apps,
        policy("cpu", 0.8, 0.5, pb::TargetMode::Single, 1),
    )
    .await;
    // node-1 is over its CPU threshold and moves the burner to node-3 (the
    // peer with the most headroom), as in the offload tests.
    scrape_until(
        "node-1 to decide an offload",
        &agent_url(&f, "node-1"),
        |s| {
            (s.value("edgepool_offload_decisions_total{resource=\"cpu\",outcome=\"moved\"}") >= 1.0)
                .then_some(())
        },
    )
    .await;
    scrape_until("node-3 to admit a guest", &agent_url(&f, "node-3"), |s| {
        (s.value("edgepool_offload_admissions_total{resource=\"cpu\",outcome=\"admitted\"}") >= 1.0
            && s.value("edgepool_apps{state=\"running\"}") == 2.0)
            .then_some(())
    })
    .await;
    let manager = scrape_until(
        "the manager to count the offload",
        &metrics_url(&f.m.dir),
        |s| {
            (s.value("edgepool_offloads_total{resource=\"cpu\"}") >= 1.0
                && s.value("edgepool_events_total{kind=\"OFFLOAD\"}") >= 1.0)
                .then(|| s.clone())
        },
    )
    .await;

    // Every metric the Grafana dashboard queries is one these daemons
    // export (the owner and the host now have every agent family).
    let scrapes = [
        manager,
        scrape(&agent_url(&f, "node-1")).await,
        scrape(&agent_url(&f, "node-3")).await,
    ];
    let families = dashboard_families();
    assert!(families.len() >= 20, "{families:?}");
    for family in &families {
        assert!(
            scrapes.iter().any(|s| s.has_family(family)),
            "docs/grafana/edgepool.json uses {family}, which no daemon exports"
        );
    }
}

/// The metric families docs/grafana/edgepool.json queries (sample names
/// with `_total`, `_bucket`, `_count`, `_sum` taken off).
fn dashboard_families() -> std::collections::BTreeSet<String> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/edgepool.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["uid"], "edgepool");
    let mut families = std::collections::BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("edgepool_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let family = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        families.insert(family.to_string());
    }
    families
}

#[tokio::test]
async fn metrics_are_off_by_default_and_a_stale_url_file_goes() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("metrics.url"), "http://127.0.0.1:1/metrics\n").unwrap();
    let m = Manager::start(&dir).await;
    eventually("the stale metrics.url to go", DEADLINE, || async {
        (!m.dir.join("metrics.url").exists()).then_some(())
    })
    .await;
    assert!(!m.proc.log_text().contains("metrics serving"));
}

#[tokio::test]
async fn an_agent_counts_its_stream_reconnects() {
    let mut f = fleet(1, &[]).await;
    let url = agent_url(&f, "node-1");
    assert_eq!(
        scrape(&url)
            .await
            .value("edgepool_agent_stream_reconnects_total"),
        0.0
    );
    // The manager goes away and comes back on the same address: the agent
    // dials again, and its manager's new listener counts the new stream.
    let (addr, dir) = (f.m.addr, f.m.dir.clone());
    f.m.proc.kill();
    f.m = Manager::start_on(&dir, addr, &METRICS).await;
    wait_connected(&f.m, "node-1").await;
    scrape_until("the reconnect to be counted", &url, |s| {
        (s.value("edgepool_agent_stream_reconnects_total") >= 1.0).then_some(())
    })
    .await;
    scrape_until("the new stream", &metrics_url(&f.m.dir), |s| {
        (s.value("edgepool_agent_streams") == 1.0).then_some(())
    })
    .await;
}
