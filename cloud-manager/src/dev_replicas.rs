//! `cloud-manager dev --replicas R --etcd URL`: R manager replicas on an
//! etcd the user started, plus the K local agents of `dev`.
//!
//! Each replica is a `cloud-manager serve --store etcd` process of this
//! same binary, leading its own process session, with its data dir in
//! `DIR/managers/m-N/` (`manager.pid`, `addr` with its HOST:PORT,
//! `manager.log`). They share the CA, server certificate, tenant bundle and
//! store key that `dev` makes in DIR (copied into each data dir) and one
//! etcd key prefix per dev data dir; one leads, the others wait as
//! standbys and take over when it dies. The agents are given every
//! replica's address; the tenant work of start-up (enrolling the agents,
//! the demo pool) goes over gRPC to whichever replica leads. Ctrl-C stops
//! the replicas with the agents; the replicas (like the agents) also exit
//! by themselves when this process dies.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgepool_common::proto as pb;
use edgepool_common::proto::tenant_service_client::TenantServiceClient;
use edgepool_common::tls;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::cli::DevArgs;
use crate::dev::{self, Demo, DevAgent, Launch};

/// TTL of the lease by which the leader holds the prefix: a standby leads
/// within about this long after the leader dies.
const LEASE_TTL_SECONDS: u32 = 3;
/// How long a replica gets to report its address.
const LISTEN_DEADLINE: Duration = Duration::from_secs(20);
/// How long start-up waits for a replica to lead (a previous `dev` killed
/// without Ctrl-C holds the prefix until its lease ends).
const LEADER_DEADLINE: Duration = Duration::from_secs(30);
/// How long the first look at etcd may take.
const ETCD_DEADLINE: Duration = Duration::from_secs(4);
/// Deadline of one tenant call during start-up.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The health service that says whether a replica leads.
const LEADER_SERVICE: &str = crate::server::LEADER_SERVICE;

/// One manager replica process.
struct Replica {
    /// m-N
    name: String,
    dir: PathBuf,
    /// HOST:PORT it listens on.
    addr: String,
    child: Child,
    pid: u32,
}

pub async fn run(args: DevArgs, replicas: u8, etcd: String) -> anyhow::Result<()> {
    let dir = args.dir.clone();
    let pid_file = dir.join("dev.pid");
    if let Some(other) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|pid| *pid != std::process::id() as i32 && alive(*pid) && is_dev(*pid))
    {
        anyhow::bail!(
            "another cloud-manager is using {} (`cloud-manager dev`, pid {other}); stop it first or choose another --data-dir",
            dir.display()
        );
    }
    let shutdown = CancellationToken::new();
    edgepool_common::grpc::cancel_on_signals(shutdown.clone())?;
    // Nothing is written before etcd answers.
    check_etcd(&etcd).await?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let prefix = prepare_dir(&dir)?;
    let exe = std::env::current_exe().context("locating this executable")?;
    edgepool_common::fsutil::write_public(
        &pid_file,
        format!("{}\n", std::process::id()).as_bytes(),
    )?;
    // The in-process manager's address file would name no manager here.
    let _ = std::fs::remove_file(dir.join("manager.addr"));

    let mut managers: Vec<Replica> = Vec::new();
    let mut agents: Vec<DevAgent> = Vec::new();
    let mut demo = false;
    let mut leader_addr = String::new();
    let mut dashboard = String::new();
    let started = async {
        for n in 1..=replicas {
            let r = start_replica(&exe, &dir, &args, &etcd, &prefix, n)
                .await
                .with_context(|| format!("starting manager replica m-{n}"))?;
            managers.push(r);
            if n == 1 {
                // m-1 leads first (unless an earlier dev still holds the
                // prefix): the others start as its standbys.
                let addrs = [managers[0].addr.clone()];
                let _ = find_leader(&dir, &addrs, LEADER_DEADLINE, &shutdown).await?;
            }
        }
        let addrs: Vec<String> = managers.iter().map(|m| m.addr.clone()).collect();
        leader_addr = find_leader(&dir, &addrs, LEADER_DEADLINE, &shutdown).await?;
        let mut tenant = tenant_client(&dir, &leader_addr)?;
        let all = addrs.join(",");
        for n in 1..=args.agents {
            let agent = start_agent(
                &exe,
                &dir,
                &mut tenant,
                &leader_addr,
                &all,
                n,
                args.peer_port,
            )
            .await
            .with_context(|| format!("starting agent dev-{n}"))?;
            agents.push(agent);
        }
        wait_connected(&mut tenant, args.agents.into(), &shutdown).await?;
        if !args.no_demo && !shutdown.is_cancelled() {
            match create_demo_pool(&mut tenant, args.agents).await? {
                Demo::Created | Demo::Exists => demo = true,
                Demo::Skipped(why) => println!("no demo pool: {why}"),
            }
        }
        dev::write_edgectl_config(&dir, &all)?;
        dev::write_bin_scripts(&dir, &exe)?;
        dashboard = write_dashboard_url(&dir, &mut tenant).await?;
        anyhow::Ok(())
    };
    let result = started.await;
    if result.is_ok() && !shutdown.is_cancelled() {
        print_banner(
            &dir,
            &etcd,
            &prefix,
            (&leader_addr, &dashboard),
            &managers,
            &agents,
            demo,
        );
        tokio::join!(
            dev::supervise(&mut agents, &shutdown),
            watch_replicas(&mut managers, &shutdown)
        );
    }
    shutdown.cancel();
    let started = Instant::now();
    tokio::join!(dev::stop_agents(&mut agents), stop_replicas(&mut managers));
    tracing::info!("stopped in {} ms", started.elapsed().as_millis());
    let _ = std::fs::remove_file(&pid_file);
    result
}

fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok() && !stat.contains(") Z ")
}

/// Whether `pid` runs `... dev ...` (not a reused pid).
fn is_dev(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).any(|arg| arg == b"dev"))
}

/// One read from etcd, so that an etcd that is not there is said at once.
async fn check_etcd(url: &str) -> anyhow::Result<()> {
    let endpoints: Vec<String> = url
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut client = crate::etcd::connect(&crate::etcd::Connect {
        endpoints,
        ca_cert: None,
        cert: None,
        key: None,
        timeout: ETCD_DEADLINE,
    })
    .await
    .map_err(|e| anyhow::anyhow!("--etcd: {e}"))?;
    let one_key = etcd_client::GetOptions::new()
        .with_limit(1)
        .with_keys_only();
    match tokio::time::timeout(ETCD_DEADLINE, client.get("/", Some(one_key))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => anyhow::bail!("etcd at {url} is not reachable: {e} (start etcd first)"),
        Err(_) => anyhow::bail!(
            "etcd at {url} is not reachable: no answer within {ETCD_DEADLINE:?} (start etcd first)"
        ),
    }
}

/// The CA, server certificate, tenant bundle and store key in DIR (made on
/// first start), shared by every replica. Returns the etcd prefix of this
/// dir: /edgepool-dev/ and the start of its CA's fingerprint, so another
/// dev dir (another CA, another store key) never meets its rows.
fn prepare_dir(dir: &Path) -> anyhow::Result<String> {
    let files = crate::ca::CaFiles::new(dir);
    if !files.ca_cert().exists() {
        crate::ca::init(
            dir,
            "edgepool.local",
            &[],
            "default",
            time::Duration::days(i64::from(crate::ca::DEFAULT_TENANT_CERT_DAYS)),
            false,
        )
        .with_context(|| format!("creating the CA in {}", dir.display()))?;
    }
    crate::dev::renew_tenant_bundle(dir, "default")?;
    crate::sealing::Sealer::load_or_create(dir)
        .with_context(|| format!("making the store key in {}", dir.display()))?;
    let pem = std::fs::read_to_string(files.ca_cert())
        .with_context(|| format!("reading {}", files.ca_cert().display()))?;
    let fingerprint = crate::ca::fingerprint_of_pem(&pem)?;
    let hex: String = fingerprint
        .trim_start_matches("sha256:")
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(16)
        .collect();
    Ok(format!("/edgepool-dev/{hex}"))
}

/// What every replica's data dir needs from DIR (docs/install.md, "State in
/// etcd"): keys 0600, the rest public.
const REPLICA_FILES: [(&str, bool); 7] = [
    ("ca.pem", false),
    ("ca.key", true),
    ("server.pem", false),
    ("server.key", true),
    ("tenant.pem", false),
    ("tenant.key", true),
    ("store.key", true),
];

/// Starts replica N in its own session and waits for its address.
async fn start_replica(
    exe: &Path,
    dir: &Path,
    args: &DevArgs,
    etcd: &str,
    prefix: &str,
    n: u8,
) -> anyhow::Result<Replica> {
    use std::io::Write;
    let name = format!("m-{n}");
    let mdir = dir.join("managers").join(&name);
    std::fs::create_dir_all(&mdir).with_context(|| format!("creating {}", mdir.display()))?;
    for (file, private) in REPLICA_FILES {
        let from = dir.join(file);
        let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        let to = mdir.join(file);
        if private {
            edgepool_common::fsutil::write_private(&to, &bytes)
        } else {
            edgepool_common::fsutil::write_public(&to, &bytes)
        }
        .with_context(|| format!("writing {}", to.display()))?;
    }
    let mut listen = args.listen;
    if listen.port() != 0 {
        let port = listen
            .port()
            .checked_add(u16::from(n) - 1)
            .context("--listen port too high for this many replicas")?;
        listen.set_port(port);
    }
    let log_path = mdir.join("manager.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
    writeln!(
        log,
        "---- cloud-manager dev: manager replica {name} starting at {} (unix time) ----",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    )?;
    // The address is read from the `addr=` of the replica's first
    // cloud_manager::server log line (info, plain): the standby line that
    // every etcd replica logs once it listens, or "manager serving".
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => format!("{v},cloud_manager::server=info"),
        _ => "info".to_string(),
    };
    let mut child = Command::new(exe)
        .args(["serve", "--new-session", "--exit-with-parent"])
        .args(["--listen", &listen.to_string()])
        .args(["--metrics-listen", &dev::DEV_METRICS_LISTEN.to_string()])
        .arg("--data-dir")
        .arg(&mdir)
        // Replicas share this host: each dashboard on a free port.
        .args(["--http-listen", "127.0.0.1:0"])
        .args(["--store", "etcd", "--etcd-endpoints", etcd])
        .args(["--etcd-prefix", prefix])
        .args([
            "--etcd-lease-ttl-seconds",
            &LEASE_TTL_SECONDS.to_string(),
            "--log-format",
            "plain",
        ])
        .env("RUST_LOG", filter)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the manager process")?;
    let pid = child.id().context("the manager process has no pid")?;
    let deadline = Instant::now() + LISTEN_DEADLINE;
    let addr = loop {
        let text = std::fs::read(&log_path).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(start as usize..).unwrap_or_default());
        let found = text
            .lines()
            .filter(|l| {
                l.contains("waiting for the etcd prefix")
                    || l.contains("manager serving")
                    || l.contains("cloud_manager::server")
            })
            .find_map(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .map(str::to_string);
        if let Some(addr) = found {
            break addr;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let tail: Vec<&str> = text.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "it exited ({status}); {}:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        if Instant::now() > deadline {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = child.wait().await;
            anyhow::bail!(
                "it did not report its address within {LISTEN_DEADLINE:?}; see {}",
                log_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    edgepool_common::fsutil::write_public(
        &mdir.join("manager.pid"),
        format!("{pid}\n").as_bytes(),
    )?;
    edgepool_common::fsutil::write_public(&mdir.join("addr"), format!("{addr}\n").as_bytes())?;
    Ok(Replica {
        name,
        dir: mdir,
        addr,
        child,
        pid,
    })
}

/// `edge.v1.Leader` health of the replica at `addr`: Some(true) when it
/// leads, Some(false) on a standby, None when it does not answer.
async fn leads(dir: &Path, addr: &str) -> Option<bool> {
    let roots = tls::roots(&tls::read_certs(&dir.join("ca.pem")).ok()?).ok()?;
    let config = tls::client_config(roots, None).ok()?;
    let channel = tls::channel(addr, Arc::new(config), Duration::from_secs(2)).ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: LEADER_SERVICE.into(),
    });
    request.set_timeout(Duration::from_secs(2));
    let status = health.check(request).await.ok()?.into_inner().status;
    Some(status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// The address of the replica that leads, asking each in turn until one
/// does or `deadline` passes.
async fn find_leader(
    dir: &Path,
    addrs: &[String],
    deadline: Duration,
    shutdown: &CancellationToken,
) -> anyhow::Result<String> {
    let until = Instant::now() + deadline;
    loop {
        for addr in addrs {
            if leads(dir, addr).await == Some(true) {
                return Ok(addr.clone());
            }
        }
        anyhow::ensure!(!shutdown.is_cancelled(), "stopped before a replica led");
        anyhow::ensure!(
            Instant::now() < until,
            "no manager replica leads after {deadline:?} (asked {}); see DIR/managers/m-*/manager.log",
            addrs.join(", ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A tenant client (DIR's tenant bundle) of the replica at `addr`.
fn tenant_client(dir: &Path, addr: &str) -> anyhow::Result<TenantServiceClient<Channel>> {
    let roots = tls::roots(&tls::read_certs(&dir.join("ca.pem"))?)?;
    let chain = tls::read_certs(&dir.join("tenant.pem"))?;
    let key = tls::read_key(&dir.join("tenant.key"))?;
    let config = tls::client_config(roots, Some((chain, key)))?;
    let channel = tls::channel(addr, Arc::new(config), CALL_TIMEOUT)?;
    Ok(TenantServiceClient::new(channel))
}

fn call<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// Enrolls agent N through the leader if needed and starts it in its own
/// session, with every replica's address.
async fn start_agent(
    exe: &Path,
    dir: &Path,
    tenant: &mut TenantServiceClient<Channel>,
    leader: &str,
    all: &str,
    n: u8,
    peer_port: u16,
) -> anyhow::Result<DevAgent> {
    let node_id = format!("dev-{n}");
    let agent_dir = dir.join("agents").join(&node_id);
    std::fs::create_dir_all(&agent_dir)?;
    let ca_pem = dir.join("ca.pem");
    let data = edge_agent::state::DataDir::new(&agent_dir);
    let same_ca = std::fs::read(data.ca()).ok() == std::fs::read(&ca_pem).ok();
    let known = match tenant
        .get_node(call(pb::GetNodeRequest {
            node_id: node_id.clone(),
        }))
        .await
    {
        Ok(_) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => return Err(anyhow::anyhow!("GetNode {node_id} on {leader}: {s}")),
    };
    if !(data.is_enrolled() && same_ca && known) {
        let token = tenant
            .create_join_token(call(pb::CreateJoinTokenRequest {
                ttl_seconds: 600,
                ..Default::default()
            }))
            .await
            .with_context(|| format!("CreateJoinToken on {leader}"))?
            .into_inner()
            .token;
        let status = Command::new(exe)
            .args(["agent", "join", "--manager", leader, "--token", &token])
            .arg("--ca-cert")
            .arg(&ca_pem)
            .args(["--node-id", &node_id, "--force", "--data-dir"])
            .arg(&agent_dir)
            .stdout(std::process::Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "join of {node_id} failed ({status})");
    }
    let launch = Launch {
        exe: exe.to_path_buf(),
        manager_addr: all.to_string(),
        peer_listen: format!("127.0.1.{n}:{peer_port}"),
        // A new leader is tried again soon, not after the 10 s backoff.
        extra: vec!["--reconnect-max-ms".into(), "1000".into()],
    };
    let child = dev::spawn_agent(&launch, &agent_dir)?;
    Ok(DevAgent {
        node_id,
        dir: agent_dir,
        child,
        launch,
    })
}

/// Every node of the tenant, page by page.
async fn all_nodes(tenant: &mut TenantServiceClient<Channel>) -> anyhow::Result<Vec<pb::Node>> {
    let mut nodes = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = tenant
            .list_nodes(call(pb::ListNodesRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            }))
            .await?
            .into_inner();
        nodes.extend(page.nodes);
        if page.next_page_token.is_empty() {
            return Ok(nodes);
        }
        page_token = page.next_page_token;
    }
}

async fn wait_connected(
    tenant: &mut TenantServiceClient<Channel>,
    want: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + dev::CONNECT_DEADLINE;
    loop {
        let up = all_nodes(tenant)
            .await?
            .iter()
            .filter(|n| n.node_id.starts_with("dev-") && n.connected)
            .count();
        if up >= want || shutdown.is_cancelled() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {up} of {want} agents connected within {:?}; see DIR/agents/*/agent.log",
            dev::CONNECT_DEADLINE
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The demo pool as `dev` makes it in-process (see `dev::create_demo_pool`),
/// through the leader's tenant API.
async fn create_demo_pool(
    tenant: &mut TenantServiceClient<Channel>,
    agents: u8,
) -> anyhow::Result<Demo> {
    if agents < 4 {
        return Ok(Demo::Skipped(
            "it needs 4 agents (3 members and a spare); run with --agents 4 or more".into(),
        ));
    }
    match tenant
        .get_pool(call(pb::GetPoolRequest {
            name: dev::DEMO_POOL.into(),
        }))
        .await
    {
        Ok(_) => return Ok(Demo::Exists),
        Err(s) if s.code() == tonic::Code::NotFound => {}
        Err(s) => return Err(anyhow::anyhow!("GetPool {}: {s}", dev::DEMO_POOL)),
    }
    let mut taken = Vec::new();
    for id in dev::DEMO_NODES {
        if let Ok(n) = tenant
            .get_node(call(pb::GetNodeRequest {
                node_id: id.to_string(),
            }))
            .await
        {
            let pool = n.into_inner().pool;
            if !pool.is_empty() {
                taken.push(format!("{id} is in pool {pool:?}"));
            }
        }
    }
    if !taken.is_empty() {
        return Ok(Demo::Skipped(format!(
            "{} (your pools are kept; --no-demo silences this)",
            taken.join(", ")
        )));
    }
    tenant
        .create_pool(call(pb::CreatePoolRequest {
            name: dev::DEMO_POOL.into(),
            node_ids: dev::DEMO_NODES.iter().map(|n| n.to_string()).collect(),
            apps: dev::demo_apps().iter().map(pb::AppSpec::from).collect(),
            ..Default::default()
        }))
        .await
        .context("creating the demo pool")?;
    Ok(Demo::Created)
}

/// Reports replicas that exit (killed, or deposed when cut off from etcd),
/// until shutdown.
async fn watch_replicas(managers: &mut [Replica], shutdown: &CancellationToken) {
    let mut reported = vec![false; managers.len()];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        for (i, m) in managers.iter_mut().enumerate() {
            if !reported[i]
                && let Ok(Some(status)) = m.child.try_wait()
            {
                reported[i] = true;
                tracing::warn!(
                    replica = %m.name,
                    %status,
                    "manager replica exited (a standby leads if one is left); see {}",
                    m.dir.join("manager.log").display()
                );
            }
        }
    }
}

/// Stops every replica's session (`dev::stop_sessions`) and removes its
/// pid file.
async fn stop_replicas(managers: &mut [Replica]) {
    let mut children: Vec<&mut Child> = managers.iter_mut().map(|m| &mut m.child).collect();
    dev::stop_sessions(&mut children).await;
    for m in managers.iter() {
        let _ = std::fs::remove_file(m.dir.join("manager.pid"));
    }
}

/// `DIR/dashboard.url` (0600): a login link to the leader's dashboard,
/// for the longest a link may last (an hour), from `CreateDashboardLogin`.
/// A replica that takes over signs with its own key: `edgectl dashboard`
/// then makes a new link.
async fn write_dashboard_url(
    dir: &Path,
    tenant: &mut TenantServiceClient<Channel>,
) -> anyhow::Result<String> {
    let url = tenant
        .create_dashboard_login(call(pb::CreateDashboardLoginRequest {
            ttl_seconds: crate::dashboard::LOGIN_TTL_MAX_SECONDS,
        }))
        .await
        .context("CreateDashboardLogin on the leader")?
        .into_inner()
        .url;
    let path = dir.join("dashboard.url");
    edgepool_common::fsutil::write_private(&path, format!("{url}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(url)
}

fn print_banner(
    dir: &Path,
    etcd: &str,
    prefix: &str,
    (leader, dashboard): (&str, &str),
    managers: &[Replica],
    agents: &[DevAgent],
    demo: bool,
) {
    let d = dir.display();
    let rows: Vec<String> = managers
        .iter()
        .map(|m| {
            format!(
                "  {}  {}  pid {}{}\n",
                m.name,
                m.addr,
                m.pid,
                if m.addr == leader {
                    "  (leads)"
                } else {
                    "  (standby)"
                }
            )
        })
        .collect();
    let first = managers.first().map(|m| m.addr.as_str()).unwrap_or(leader);
    let leader_name = managers
        .iter()
        .find(|m| m.addr == leader)
        .map(|m| m.name.as_str())
        .unwrap_or("m-1");
    let text = format!(
        "Manager replicas (`cloud-manager serve --store etcd` on {etcd}, prefix {prefix}); \
         replica N's pid is in {d}/managers/m-N/manager.pid, its address in \
         {d}/managers/m-N/addr, its log in {d}/managers/m-N/manager.log:\n\
         {rows}\
         Which one leads (edge.v1.Leader is SERVING on the leader, NOT_SERVING on a standby):\n  \
           grpcurl -cacert {d}/ca.pem -d '{{\"service\": \"edge.v1.Leader\"}}' {first} grpc.health.v1.Health/Check\n\
         Kill the leader: a standby leads within a few seconds and the agents follow it:\n  \
           kill -KILL $(cat {d}/managers/{leader_name}/manager.pid)\n\n\
         The leader's dashboard, logged in (the link lasts an hour and only while \
         this leader leads; `edgectl dashboard` makes a new one):\n  {dashboard}\n  \
         (also in {d}/dashboard.url)\n\n",
        rows = rows.concat(),
    );
    let headline = format!(
        "{} manager replicas (leader {leader_name} on {leader})",
        managers.len()
    );
    dev::print_banner(dir, &headline, leader, agents, demo, &text, true);
}
