//! `bench-scale --quick`: a smoke run of the scale benchmark (30 virtual
//! agents, a short window) whose last line is the JSON object with exactly
//! the documented keys, every agent connected.

use std::process::Command;

use edgepool_tests::*;

const KEYS: [&str; 11] = [
    "agents",
    "connected",
    "connect_all_s",
    "manager_rss_mib",
    "manager_cpu_cores",
    "swarm_cpu_cores",
    "api_p50_ms",
    "api_p99_ms",
    "failover_1_ms",
    "failover_100_p99_ms",
    "reconnect_storm_s",
];

#[test]
fn bench_scale_quick_prints_its_figures_as_the_last_line() {
    let out = run(Command::new(bin("bench-scale")).args([
        "--agents",
        "30",
        "--seconds",
        "5",
        "--quick",
        "--members",
        "2",
        "--ramp-per-sec",
        "0",
    ]));
    assert!(
        out.ok,
        "bench-scale failed:\n{}\n{}",
        out.stdout, out.stderr
    );
    let last = out.stdout.lines().last().expect("a last line");
    let figures: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    let object = figures.as_object().expect("a JSON object");
    let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
    let mut want = KEYS.to_vec();
    keys.sort_unstable();
    want.sort_unstable();
    assert_eq!(keys, want, "{last}");
    assert_eq!(figures["agents"], 30, "{last}");
    assert_eq!(figures["connected"], 30, "{last}");
    for key in KEYS {
        let x = figures[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x >= 0.0, "{key} in {last}");
    }
    // The failovers really happened, through the manager's own detection.
    assert!(figures["failover_1_ms"].as_f64() > Some(100.0), "{last}");
}
