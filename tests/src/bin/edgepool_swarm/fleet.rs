//! The virtual agents: each is the agent library's own `build_on` + `run`
//! (enrollment with `join::join`, the uplink stream, assignments, the peer
//! server, liveness beats, the offload engine) on a simulated machine
//! (`crate::machine`), a simulated app runtime and two gates
//! (`edgepool_common::gate`) that the control interface switches.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context;
use edge_agent::config::AgentConfig;
use edge_agent::join::{JoinRequest, ManagerTrust};
use edge_agent::runtime::{AppUsage, Runtime};
use edge_agent::state::DataDir;
use edge_agent::uplink::LinkState;
use edgepool_common::gate::Gate;
use edgepool_common::proto as pb;
use edgepool_common::tls;
use pb::tenant_service_client::TenantServiceClient;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;

use crate::control::{Action, Command};
use crate::machine::{Capacity, Synthetic};

/// What every virtual agent is started with.
pub struct Settings {
    pub manager: String,
    pub trust: ManagerTrust,
    /// The CA the cached credentials must name (sha256:...); others re-enroll.
    pub ca_fingerprint: Option<String>,
    pub data_dir: PathBuf,
    pub name_prefix: String,
    /// Agent `i` binds its peer port on `127.<net>.<i / 250>.<i % 250 + 1>`.
    pub peer_net: u8,
    /// The peer port on that address (0: ephemeral, bound at start).
    pub peer_port: u16,
    pub force_enroll: bool,
    pub capacity: Capacity,
    pub app_usage: AppUsage,
    /// TLS handshakes the virtual agents' dials run at once, all agents
    /// together (0: no limit); see `edgepool_common::gate`.
    pub max_dials: usize,
    /// The agent config every virtual agent starts from (intervals,
    /// timeouts); data dir, manager and peer address are set per agent.
    pub agent: AgentConfig,
}

/// Where join tokens come from.
pub enum Tokens {
    /// Given tokens, used in order (each is single use).
    List(Mutex<VecDeque<String>>),
    /// Made per enrollment with `TenantService.CreateJoinToken`.
    Tenant(TenantServiceClient<Channel>),
}

impl Tokens {
    async fn next(&self) -> anyhow::Result<String> {
        match self {
            Tokens::List(list) => lock(list)
                .pop_front()
                .context("out of join tokens (give one --token, or a line of --token-file, per agent to enroll, or --tenant-cert/--tenant-key)"),
            Tokens::Tenant(client) => Ok(client
                .clone()
                .create_join_token(pb::CreateJoinTokenRequest {
                    ttl_seconds: 600,
                    labels: [("edgepool-swarm".to_string(), "true".to_string())].into(),
                })
                .await
                .context("CreateJoinToken")?
                .into_inner()
                .token),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Waiting,
    Enrolling,
    Running,
    Killed,
    Failed,
}

/// One virtual agent.
pub struct Virtual {
    pub index: usize,
    pub node_id: String,
    dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    phase: Phase,
    /// New ones on every start, so a killed run's connections stay cut.
    uplink_gate: Gate,
    peer_gate: Gate,
    frozen: bool,
    disconnected: bool,
    stop: CancellationToken,
    link: Option<watch::Receiver<LinkState>>,
    peer: Option<SocketAddr>,
    error: Option<String>,
}

impl Virtual {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn connected(&self) -> bool {
        let s = self.state();
        s.phase == Phase::Running
            && s.link
                .as_ref()
                .is_some_and(|l| *l.borrow() == LinkState::Connected)
    }

    /// Sets the gates from the flags: disconnected cuts the manager link,
    /// frozen holds both.
    fn apply_gates(s: &State) {
        if matches!(s.phase, Phase::Killed) {
            return;
        }
        match (s.disconnected, s.frozen) {
            (true, _) => s.uplink_gate.cut(),
            (false, true) => s.uplink_gate.pause(),
            (false, false) => s.uplink_gate.open(),
        }
        if s.frozen {
            s.peer_gate.pause();
        } else {
            s.peer_gate.open();
        }
    }
}

pub struct Fleet {
    pub agents: Vec<Arc<Virtual>>,
    ids: Vec<String>,
    settings: Arc<Settings>,
    tokens: Arc<Tokens>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    /// Shared by every gate (`Settings::max_dials`).
    dials: Option<Arc<tokio::sync::Semaphore>>,
}

/// A gate under the fleet's dial limit, if it has one.
fn gate(dials: &Option<Arc<tokio::sync::Semaphore>>) -> Gate {
    match dials {
        Some(d) => Gate::limited(d.clone()),
        None => Gate::new(),
    }
}

impl Fleet {
    pub fn new(n: usize, settings: Settings, tokens: Tokens, shutdown: CancellationToken) -> Fleet {
        let dials = (settings.max_dials > 0)
            .then(|| Arc::new(tokio::sync::Semaphore::new(settings.max_dials)));
        let agents: Vec<Arc<Virtual>> = (0..n)
            .map(|i| {
                Arc::new(Virtual {
                    index: i,
                    node_id: format!("{}-{i:05}", settings.name_prefix),
                    dir: settings.data_dir.join("agents").join(format!("{i:05}")),
                    state: Mutex::new(State {
                        phase: Phase::Waiting,
                        uplink_gate: gate(&dials),
                        peer_gate: gate(&dials),
                        frozen: false,
                        disconnected: false,
                        stop: shutdown.child_token(),
                        link: None,
                        peer: None,
                        error: None,
                    }),
                })
            })
            .collect();
        Fleet {
            ids: agents.iter().map(|a| a.node_id.clone()).collect(),
            agents,
            settings: Arc::new(settings),
            tokens: Arc::new(tokens),
            tracker: TaskTracker::new(),
            shutdown,
            dials,
        }
    }

    /// Starts every agent, `per_sec` a second (0: all at once).
    pub async fn start_all(self: &Arc<Self>, per_sec: f64) {
        let gap = (per_sec > 0.0).then(|| Duration::from_secs_f64(1.0 / per_sec));
        let mut next = tokio::time::Instant::now();
        for v in &self.agents {
            if let Some(gap) = gap {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(next) => {}
                }
                next += gap;
            }
            self.spawn(v.clone());
        }
    }

    /// Starts one agent's task: enroll if needed, build, run until killed.
    fn spawn(&self, v: Arc<Virtual>) {
        let stop = {
            let mut s = v.state();
            s.phase = Phase::Enrolling;
            s.error = None;
            s.link = None;
            s.stop = self.shutdown.child_token();
            s.uplink_gate = gate(&self.dials);
            s.peer_gate = gate(&self.dials);
            Virtual::apply_gates(&s);
            s.stop.clone()
        };
        let (settings, tokens) = (self.settings.clone(), self.tokens.clone());
        self.tracker.spawn(async move {
            if let Err(e) = run_one(&v, &settings, &tokens, stop).await {
                tracing::warn!(agent = %v.node_id, error = %format!("{e:#}"), "virtual agent failed");
                let mut s = v.state();
                if s.phase != Phase::Killed {
                    s.phase = Phase::Failed;
                    s.error = Some(format!("{e:#}"));
                }
            }
        });
    }

    /// Waits for every agent task after `shutdown` fired.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    pub fn status_line(&self) -> String {
        let mut c = [0usize; 7];
        for v in &self.agents {
            let connected = v.connected();
            let s = v.state();
            c[0] += usize::from(s.phase == Phase::Running);
            c[1] += usize::from(connected);
            c[2] += usize::from(s.frozen);
            c[3] += usize::from(s.disconnected);
            c[4] += usize::from(s.phase == Phase::Killed);
            c[5] += usize::from(s.phase == Phase::Failed);
            c[6] += usize::from(matches!(s.phase, Phase::Waiting | Phase::Enrolling));
        }
        format!(
            "agents={} running={} connected={} frozen={} disconnected={} killed={} failed={} starting={}",
            self.agents.len(),
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            c[5],
            c[6]
        )
    }

    pub fn connected(&self) -> usize {
        self.agents.iter().filter(|v| v.connected()).count()
    }

    /// Runs a control command; returns its data lines.
    pub fn execute(&self, command: Command) -> Result<Vec<String>, String> {
        match command {
            Command::Status => Ok(vec![self.status_line()]),
            Command::Help => Ok(crate::control::HELP.lines().map(String::from).collect()),
            Command::List(targets) => {
                let which = crate::control::resolve(&targets, &self.ids)?;
                Ok(which.into_iter().map(|i| self.describe(i)).collect())
            }
            Command::Act(action, targets) => {
                let which = crate::control::resolve(&targets, &self.ids)?;
                for i in &which {
                    self.act(&self.agents[*i], action);
                }
                Ok(vec![
                    format!("{action:?} {} agent(s)", which.len()).to_lowercase(),
                ])
            }
        }
    }

    fn describe(&self, i: usize) -> String {
        let v = &self.agents[i];
        let connected = v.connected();
        let s = v.state();
        let mut flags = Vec::new();
        if s.frozen {
            flags.push("frozen");
        }
        if s.disconnected {
            flags.push("disconnected");
        }
        let mut line = format!(
            "{} {} {:?} {} {} {}",
            v.index,
            v.node_id,
            s.phase,
            if connected { "connected" } else { "down" },
            if flags.is_empty() {
                "-".to_string()
            } else {
                flags.join(",")
            },
            s.peer.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        )
        .to_lowercase();
        if let Some(e) = &s.error {
            line.push_str(&format!(" error={e:?}"));
        }
        line
    }

    fn act(&self, v: &Arc<Virtual>, action: Action) {
        let mut s = v.state();
        match action {
            Action::Kill => {
                if s.phase != Phase::Killed {
                    // Sockets first, so nothing says goodbye: like SIGKILL.
                    s.uplink_gate.cut();
                    s.peer_gate.cut();
                    s.stop.cancel();
                    s.phase = Phase::Killed;
                    s.link = None;
                }
                return;
            }
            Action::Start => {
                if matches!(s.phase, Phase::Killed | Phase::Failed) {
                    s.frozen = false;
                    s.disconnected = false;
                    drop(s);
                    self.spawn(v.clone());
                }
                return;
            }
            Action::Freeze => s.frozen = true,
            Action::Thaw => s.frozen = false,
            Action::Disconnect => s.disconnected = true,
            Action::Reconnect => s.disconnected = false,
        }
        Virtual::apply_gates(&s);
    }
}

/// Enrolls (unless credentials are cached), builds and runs one agent.
async fn run_one(
    v: &Virtual,
    settings: &Settings,
    tokens: &Tokens,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let data = DataDir::new(&v.dir);
    let cached = data.is_enrolled() && !settings.force_enroll && same_ca(&data, settings);
    if !cached {
        enroll(v, settings, tokens, &stop).await?;
    }
    let i = v.index;
    let ip = Ipv4Addr::new(127, settings.peer_net, (i / 250) as u8, (i % 250 + 1) as u8);
    let config = AgentConfig {
        data_dir: v.dir.clone(),
        manager: settings.manager.clone(),
        peer_listen: SocketAddr::from((ip, settings.peer_port)),
        ..settings.agent.clone()
    };
    let (uplink_gate, peer_gate) = {
        let s = v.state();
        (s.uplink_gate.clone(), s.peer_gate.clone())
    };
    let machine = edge_agent::Machine {
        measure: Some(Box::new(Synthetic::new(settings.capacity, i as u64 + 1))),
        runtime: Some(Runtime::simulated(settings.app_usage)),
        hostname: Some(v.node_id.clone()),
        uplink_gate: Some(uplink_gate),
        peer_gate: Some(peer_gate),
        // Its own address for the manager link too, as a machine of its own.
        uplink_source: Some(ip.into()),
        // Most virtual nodes are never pool members: no peer server until
        // one is (docs/swarm.md, Resources).
        lazy_peer_server: true,
    };
    let agent = edge_agent::build_on(config, machine).await?;
    {
        let mut s = v.state();
        if s.phase == Phase::Killed {
            return Ok(());
        }
        s.phase = Phase::Running;
        s.link = Some(agent.link());
        s.peer = Some(agent.peer_addr());
    }
    agent.run(stop).await
}

/// Enrolls with `join::join`, as `edge-agent join` would, and tries again
/// (with backoff, with the same given token or a new minted one) while the
/// manager cannot be reached: a manager busy enrolling thousands times a
/// handshake out now and then.
async fn enroll(
    v: &Virtual,
    settings: &Settings,
    tokens: &Tokens,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut backoff = edge_agent::backoff::Backoff::new(
        Duration::from_millis(settings.agent.reconnect_min_ms),
        Duration::from_millis(settings.agent.reconnect_max_ms),
    );
    let minted = matches!(tokens, Tokens::Tenant(_));
    let mut token: Option<String> = None;
    loop {
        // A minted token may have been redeemed before an answer was lost:
        // a new one each try. A given one is tried again.
        if token.is_none() || minted {
            match tokens.next().await {
                Ok(t) => token = Some(t),
                Err(e) if minted => {
                    tracing::debug!(agent = %v.node_id, error = %format!("{e:#}"), "no join token yet; trying again");
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(t) = &token {
            let result = edge_agent::join::join(JoinRequest {
                manager: settings.manager.clone(),
                token: t.clone(),
                trust: settings.trust.clone(),
                node_id: v.node_id.clone(),
                data_dir: v.dir.clone(),
                force: true,
            })
            .await;
            match result {
                Ok(_) => return Ok(()),
                Err(e @ edge_agent::join::JoinError::Unreachable { .. }) => {
                    tracing::debug!(agent = %v.node_id, error = %e, "enrollment failed; trying again");
                }
                Err(e) => return Err(e).with_context(|| format!("enrolling {}", v.node_id)),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => anyhow::bail!("stopped while enrolling"),
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// Whether the cached credentials were issued under the CA we were told
/// to trust (a new manager data dir means a new CA: enroll again).
fn same_ca(data: &DataDir, settings: &Settings) -> bool {
    let Some(want) = &settings.ca_fingerprint else {
        return true;
    };
    tls::read_certs(&data.ca())
        .ok()
        .and_then(|certs| certs.first().map(|c| tls::fingerprint(c.as_ref())))
        .is_some_and(|fp| fp.eq_ignore_ascii_case(want))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
