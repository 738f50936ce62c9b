//! Footprint benchmark, two modes.
//!
//! Dev fleet (default): runs a real `cloud-manager dev` fleet (manager + K
//! agents as separate processes), lets it settle, then samples /proc once a
//! second and prints the agents' and the manager's resident memory and CPU.
//!
//!   cargo build --release --workspace --bins
//!   target/release/bench-footprint [--agents 4] [--seconds 30] [--warmup 5]
//!
//! The manager figure is the `dev` process: the manager plus the small dev
//! supervisor. The agents run as `cloud-manager agent run` (the same agent
//! library as the `edge-agent` binary).
//!
//! Apps (`--apps N`): a real manager and two real `edge-agent`s with their
//! default settings (telemetry, heartbeats and scheduler at 1 Hz), and a
//! pool whose N apps (`sleep` processes) all run on node-1 (node-2 runs one
//! more, as every group must be non-empty). Prints node-1's agent RSS and
//! CPU with its N apps running, then starts `--idle-procs M` unrelated idle
//! processes (`sleep 600`, in one process group that is killed at the end,
//! also on failure) and prints the agent's CPU again.
//!
//!   target/release/bench-footprint --apps 10 --idle-procs 1500 [--seconds 30] [--warmup 5]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::procstat::{cpu_ticks, rss_kib, ticks_per_sec};
use edgepool_tests::{
    AgentDir, DEADLINE, Proc, TempDir, bin, enroll, eventually, number_arg, wait_connected,
};

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

/// RSS samples (MiB, one a second) and CPU (% of one core over the window)
/// of `pid` for `seconds`.
async fn measure(pid: i32, seconds: u64) -> (Vec<f64>, f64) {
    let start = Instant::now();
    let cpu0 = cpu_ticks(pid).unwrap_or(0);
    let mut rss = Vec::new();
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(r) = rss_kib(pid) {
            rss.push(r as f64 / 1024.0);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu1 = cpu_ticks(pid).unwrap_or(cpu0);
    let cpu = cpu1.saturating_sub(cpu0) as f64 / ticks_per_sec() / elapsed * 100.0;
    (rss, cpu)
}

fn max(v: &[f64]) -> f64 {
    v.iter().cloned().fold(0.0, f64::max)
}

/// Live processes in process group `pgid`.
fn group_size(pgid: i32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| edgepool_tests::stat_field(*pid, 5) == Some(i64::from(pgid)))
        .count()
}

/// An agent with its default settings (only the ports and the manager
/// address given), in its own session, killed with its apps on drop.
fn start_default_agent(agent: &AgentDir, manager: &std::net::SocketAddr) -> Proc {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&agent.dir)
        .args(["--manager", &manager.to_string()])
        .args(["--peer-listen", "127.0.0.1:0"]);
    Proc::spawn_session(&agent.node_id, &mut cmd, &agent.dir.join("agent.log"))
}

async fn apps_mode(apps: u64, idle: u64, seconds: u64, warmup: u64) {
    let tmp = TempDir::new().expect("tempdir");
    let m = edgepool_tests::Manager::start(&tmp.path().join("m")).await;
    let mut agents = Vec::new();
    for id in ["node-1", "node-2"] {
        let dir = enroll(&m, tmp.path(), id).await;
        agents.push(start_default_agent(&dir, &m.addr));
        wait_connected(&m, id).await;
    }
    let app = |name: String, arg: u64, slot: u32| pb::AppSpec {
        name,
        command: vec!["sleep".into(), arg.to_string()],
        resources: Some(pb::Resources {
            cpu_millis: 1,
            memory_mb: 1,
            ..Default::default()
        }),
        slot: Some(slot),
        ..Default::default()
    };
    let mut specs: Vec<pb::AppSpec> = (1..=apps)
        .map(|i| app(format!("app-{i}"), 900_000 + i, 1))
        .collect();
    specs.push(app("other".into(), 900_999, 2));
    m.tenant()
        .create_pool(pb::CreatePoolRequest {
            name: "bench".into(),
            node_ids: vec!["node-1".into(), "node-2".into()],
            apps: specs,
            ..Default::default()
        })
        .await
        .expect("CreatePool");
    eventually("every app running", DEADLINE, || async {
        let p = m
            .tenant()
            .get_pool(pb::GetPoolRequest {
                name: "bench".into(),
            })
            .await
            .ok()?
            .into_inner();
        let n = p
            .placements
            .iter()
            .filter(|pl| pl.state() == pb::AppState::Running && pl.pid != 0)
            .count();
        (n as u64 == apps + 1).then_some(())
    })
    .await;
    let agent = agents[0].pid();
    let procs = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter(|e| {
                e.as_ref().is_ok_and(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
            })
            .count()
        })
        .unwrap_or(0);
    tokio::time::sleep(Duration::from_secs(warmup)).await;
    let (rss, cpu) = measure(agent, seconds).await;
    println!(
        "bench-footprint: agent with {apps} apps running ({procs} processes on the machine), {seconds} s sampled after {warmup} s warm-up, default settings (1 Hz)"
    );
    println!(
        "agent RSS    median {:.1} MiB  max {:.1} MiB  ({} samples)",
        median(rss.clone()),
        max(&rss),
        rss.len()
    );
    println!("agent CPU    {cpu:.2} % of one core");
    if idle == 0 {
        return;
    }

    // Unrelated idle processes, all in the group of one shell: dropping
    // `crowd` (also when this panics) kills the whole group.
    let mut sh = Command::new("sh");
    sh.args([
        "-c",
        &format!("i=0; while [ $i -lt {idle} ]; do sleep 600 & i=$((i+1)); done; wait"),
    ]);
    let crowd = Proc::spawn("idle-procs", &mut sh, &tmp.path().join("idle.log"));
    let pgid = crowd.pid();
    eventually(
        &format!("{idle} idle processes"),
        Duration::from_secs(120),
        || {
            let n = group_size(pgid);
            async move { (n as u64 > idle).then_some(()) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(warmup)).await;
    let (rss2, cpu2) = measure(agent, seconds).await;
    println!(
        "with {idle} more idle processes ({} processes on the machine):",
        procs as u64 + idle + 1
    );
    println!(
        "agent RSS    median {:.1} MiB  max {:.1} MiB",
        median(rss2.clone()),
        max(&rss2)
    );
    println!("agent CPU    {cpu2:.2} % of one core");
    drop(crowd);
    drop(agents);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let agents = number_arg("--agents", 4);
    let seconds = number_arg("--seconds", 30);
    let warmup = number_arg("--warmup", 5);
    let apps = number_arg("--apps", 0);
    if apps > 0 {
        apps_mode(apps, number_arg("--idle-procs", 0), seconds, warmup).await;
        return;
    }
    let ticks_per_sec = ticks_per_sec();

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
