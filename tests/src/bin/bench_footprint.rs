//! Footprint benchmark: runs a real `cloud-manager dev` fleet (manager + K
//! agents as separate processes), lets it settle, then samples /proc once a
//! second and prints the agents' and the manager's resident memory and CPU.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-footprint [--agents 4] [--seconds 30] [--warmup 5]
//!
//! The manager figure is the `dev` process: the manager plus the small dev
//! supervisor. The agents run as `cloud-manager agent run` (the same agent
//! library as the `edge-agent` binary).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgepool_tests::{Proc, TempDir, bin, eventually, number_arg};

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime in clock ticks.
fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn read_pid(p: &Path) -> Option<i32> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let agents = number_arg("--agents", 4);
    let seconds = number_arg("--seconds", 30);
    let warmup = number_arg("--warmup", 5);
    let ticks_per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;

    let tmp = TempDir::new().expect("tempdir");
    let dir = tmp.path().join("dev");
    let mut cmd = Command::new(bin("cloud-manager"));
    cmd.args([
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--peer-port",
        "0",
        "--agents",
    ])
    .arg(agents.to_string())
    .arg("--dir")
    .arg(&dir);
    let mut dev = Proc::spawn("dev", &mut cmd, &tmp.path().join("dev.log"));
    eventually("the dev fleet", Duration::from_secs(120), || {
        let up = dev.log_text().contains("edgepool dev is up");
        async move { up.then_some(()) }
    })
    .await;
    let agent_pids: Vec<i32> = (1..=agents)
        .filter_map(|n| read_pid(&dir.join(format!("agents/dev-{n}/agent.pid"))))
        .collect();
    assert_eq!(agent_pids.len() as u64, agents, "missing agent pid files");
    let manager_pid = dev.pid();

    tokio::time::sleep(Duration::from_secs(warmup)).await;
    let start = Instant::now();
    let cpu0: Vec<u64> = agent_pids.iter().filter_map(|p| cpu_ticks(*p)).collect();
    let mcpu0 = cpu_ticks(manager_pid).unwrap_or(0);
    let mut agent_rss = Vec::new();
    let mut manager_rss = Vec::new();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for p in &agent_pids {
            if let Some(r) = rss_kib(*p) {
                agent_rss.push(r as f64 / 1024.0);
            }
        }
        if let Some(r) = rss_kib(manager_pid) {
            manager_rss.push(r as f64 / 1024.0);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1: Vec<u64> = agent_pids.iter().filter_map(|p| cpu_ticks(*p)).collect();
    let mcpu1 = cpu_ticks(manager_pid).unwrap_or(0);
    let agent_cpu: Vec<f64> = cpu0
        .iter()
        .zip(&cpu1)
        .map(|(a, b)| (b - a) as f64 / ticks_per_sec / elapsed * 100.0)
        .collect();
    let manager_cpu = (mcpu1 - mcpu0) as f64 / ticks_per_sec / elapsed * 100.0;

    println!(
        "bench-footprint: {agents} agents, {seconds} s sampled after {warmup} s warm-up, telemetry every 1 s"
    );
    println!(
        "agent RSS    median {:.1} MiB  max {:.1} MiB  ({} samples)",
        median(agent_rss.clone()),
        agent_rss.iter().cloned().fold(0.0, f64::max),
        agent_rss.len()
    );
    println!(
        "agent CPU    median {:.2} % of one core  max {:.2} %",
        median(agent_cpu.clone()),
        agent_cpu.iter().cloned().fold(0.0, f64::max)
    );
    println!(
        "manager RSS  median {:.1} MiB  max {:.1} MiB  (with {agents} agents connected)",
        median(manager_rss.clone()),
        manager_rss.iter().cloned().fold(0.0, f64::max)
    );
    println!("manager CPU  {manager_cpu:.2} % of one core");

    dev.signal(nix::sys::signal::Signal::SIGINT);
    let _ = dev.wait_exit(Duration::from_secs(20));
}
