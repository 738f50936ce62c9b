//! What `bench-scale` measures: the steady-state window (a tenant client's
//! API latency, the manager's memory, both processes' CPU), failover times
//! (freeze over the swarm's control socket -> FAILOVER_DONE on WatchEvents)
//! and the reconnect storm after a SIGKILLed manager.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgepool_common::proto as pb;
use edgepool_tests::procstat::{CpuWindow, percentile, rss_kib};
use edgepool_tests::{Manager, Proc};
use pb::tenant_service_client::TenantServiceClient;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::setup;

/// The steady-state window's figures.
pub struct Steady {
    pub connected: usize,
    pub manager_rss_mib: f64,
    pub manager_cpu_cores: f64,
    pub swarm_cpu_cores: f64,
    pub swarm_rss_mib: f64,
    pub api_p50_ms: f64,
    pub api_p99_ms: f64,
    pub api_calls: usize,
    pub api_errors: usize,
}

/// Measures for `seconds`: RSS once a second (the manager's largest
/// sample is reported), CPU time over the window, and a tenant client
/// calling GetPool, GetNode and ListNodes (page_size 100, walking the
/// pages) `rounds_per_sec` times a second each.
pub async fn steady(
    m: &Manager,
    swarm: &Proc,
    pools: &[String],
    nodes: &[String],
    seconds: u64,
    rounds_per_sec: u32,
) -> Steady {
    let stop = CancellationToken::new();
    let api = tokio::spawn(api_load(
        m.tenant(),
        pools.to_vec(),
        nodes.to_vec(),
        rounds_per_sec,
        stop.clone(),
    ));
    let (manager_cpu, swarm_cpu) = (
        CpuWindow::start(m.proc.pid()),
        CpuWindow::start(swarm.pid()),
    );
    let (mut manager_rss, mut swarm_rss) = (0u64, 0u64);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1)).await;
        manager_rss = manager_rss.max(rss_kib(m.proc.pid()).unwrap_or(0));
        swarm_rss = swarm_rss.max(rss_kib(swarm.pid()).unwrap_or(0));
    }
    let (manager_cpu_cores, swarm_cpu_cores) = (manager_cpu.cores(), swarm_cpu.cores());
    stop.cancel();
    let (mut latencies, api_errors) = api.await.unwrap_or_default();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let connected = setup::summary(&mut m.tenant())
        .await
        .map_or(0, |s| s.connected as usize);
    Steady {
        connected,
        manager_rss_mib: manager_rss as f64 / 1024.0,
        manager_cpu_cores,
        swarm_cpu_cores,
        swarm_rss_mib: swarm_rss as f64 / 1024.0,
        api_p50_ms: percentile(&latencies, 50.0),
        api_p99_ms: percentile(&latencies, 99.0),
        api_calls: latencies.len(),
        api_errors,
    }
}

/// The API client: returns every successful call's latency (ms) and how
/// many calls failed.
async fn api_load(
    mut t: TenantServiceClient<Channel>,
    pools: Vec<String>,
    nodes: Vec<String>,
    rounds_per_sec: u32,
    stop: CancellationToken,
) -> (Vec<f64>, usize) {
    let mut every = tokio::time::interval(Duration::from_secs_f64(
        1.0 / f64::from(rounds_per_sec.max(1)),
    ));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut latencies, mut errors, mut page_token) = (Vec::new(), 0, String::new());
    for round in 0usize.. {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = every.tick() => {}
        }
        let mut timed = |ok: bool, since: Instant| {
            if ok {
                latencies.push(since.elapsed().as_secs_f64() * 1000.0);
            } else {
                errors += 1;
            }
        };
        if !pools.is_empty() {
            let name = pools[round % pools.len()].clone();
            let at = Instant::now();
            let ok = t.get_pool(pb::GetPoolRequest { name }).await.is_ok();
            timed(ok, at);
        }
        let node_id = nodes[round % nodes.len()].clone();
        let at = Instant::now();
        let ok = t.get_node(pb::GetNodeRequest { node_id }).await.is_ok();
        timed(ok, at);
        let at = Instant::now();
        let page = t
            .list_nodes(pb::ListNodesRequest {
                page_size: 100,
                page_token: std::mem::take(&mut page_token),
                ..Default::default()
            })
            .await;
        timed(page.is_ok(), at);
        if let Ok(page) = page {
            page_token = page.into_inner().next_page_token;
        }
    }
    (latencies, errors)
}

/// FAILOVER_DONE events as they arrive on a WatchEvents stream of all the
/// tenant's events: (pool, when received).
pub async fn watch_failovers(
    m: &Manager,
) -> anyhow::Result<mpsc::UnboundedReceiver<(String, Instant)>> {
    let mut stream = m
        .tenant()
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .context("WatchEvents")?
        .into_inner();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some(e)) = stream.message().await {
            if e.kind() == pb::EventKind::FailoverDone && tx.send((e.pool, Instant::now())).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

/// Freezes slot 2's node of every pool in `pools` with one control
/// command (so they fail at the same moment), waits for each pool's
/// FAILOVER_DONE, thaws the frozen nodes and waits until each pool runs
/// again. Returns each failover's time in ms, from just before the freeze
/// command was sent.
pub async fn failover(
    m: &Manager,
    socket: &Path,
    events: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    pools: &[String],
) -> anyhow::Result<Vec<f64>> {
    let mut t = m.tenant();
    for p in pools {
        setup::wait_pool_running(&mut t, p, Duration::from_secs(120)).await?;
    }
    let mut victims = Vec::new();
    for p in pools {
        victims.push(setup::slot_node(&mut t, p, 2).await?);
    }
    // Let the members' beats settle on the current membership (as
    // bench-failover does), and forget older events.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    while events.try_recv().is_ok() {}
    let mut pending: BTreeSet<&str> = pools.iter().map(String::as_str).collect();
    let start = Instant::now();
    setup::control(socket, &format!("freeze {}", victims.join(","))).await?;
    let mut times = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !pending.is_empty() {
        let Ok(Some((pool, at))) = tokio::time::timeout_at(deadline, events.recv()).await else {
            let _ = setup::control(socket, &format!("thaw {}", victims.join(","))).await;
            anyhow::bail!(
                "{} of {} failovers not done within 60 s",
                pending.len(),
                pools.len()
            );
        };
        if pending.remove(pool.as_str()) {
            times.push(at.duration_since(start).as_secs_f64() * 1000.0);
        }
    }
    setup::control(socket, &format!("thaw {}", victims.join(","))).await?;
    for p in pools {
        setup::wait_pool_running(&mut t, p, Duration::from_secs(120)).await?;
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times)
}
