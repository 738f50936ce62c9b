//! Support for the integration tests and benchmarks: start the real
//! `cloud-manager` and `edge-agent` binaries on loopback with ephemeral
//! ports, talk to them over real mutual TLS, and kill every process at the
//! end (also when a test fails: `Drop` kills the process group).
//!
//! The binaries are taken from the cargo target directory next to the test
//! executable (or `EDGEPOOL_BIN_DIR`); `scripts/test.sh` builds them first.

pub mod browser;
pub mod procstat;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_common::tls;
use pb::agent_service_client::AgentServiceClient;
use pb::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

pub use tempfile::TempDir;

/// Default deadline for "eventually" conditions.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Directory holding the built binaries.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("EDGEPOOL_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/integration-<hash> or target/<profile>/bench-footprint
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} not found: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        p.display()
    );
    p
}

/// The real `edgectl`, run in `home` (also its `HOME`) with no `EDGECTL_*`
/// setting inherited from the environment: it sees only what the caller
/// gives it.
pub fn edgectl_command(home: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin("edgectl"));
    for var in [
        "EDGECTL_MANAGER",
        "EDGECTL_CA_CERT",
        "EDGECTL_CERT",
        "EDGECTL_KEY",
        "EDGECTL_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.current_dir(home).env("HOME", home);
    cmd
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process in its own process group (or, for agents, its own
/// session), killed (group or session and all) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// The process made itself a session leader: kill the whole session.
    pub session: bool,
}

/// Every process whose session id is `sid`.
pub fn session_members(sid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| stat_field(*pid, 6) == Some(sid as i64))
        .collect()
}

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat, for n >= 3.
pub fn stat_field(pid: i32, n: usize) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(n - 3)?.parse().ok()
}

/// The command line of a process, arguments joined by spaces.
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Live (non-zombie) processes whose command line is exactly `cmd`.
pub fn processes_running(cmd: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| cmdline(*pid) == cmd)
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") Z ")
        })
        .collect()
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        Self::spawn_inner(name, cmd, log, false)
    }

    /// For a program started with `--new-session` (it calls setsid itself).
    pub fn spawn_session(name: &str, cmd: &mut Command, log: &Path) -> Proc {
        Self::spawn_inner(name, cmd, log, true)
    }

    fn spawn_inner(name: &str, cmd: &mut Command, log: &Path, session: bool) -> Proc {
        let file = std::fs::File::create(log).expect("log file");
        // Info logs unless the caller chose a filter.
        if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
            cmd.env("RUST_LOG", "info");
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log clone"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
            session,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid()), sig);
    }

    /// SIGKILL to the whole group (or session), then reap.
    pub fn kill(&mut self) {
        let pid = self.pid();
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
        if self.session {
            for p in session_members(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Waits for exit up to `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Always: an agent that already exited may have left apps behind.
        self.kill();
    }
}

/// Output of a finished command.
pub struct Output {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("running command");
    Output {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running `cloud-manager serve` with its own data dir.
pub struct Manager {
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub proc: Proc,
}

impl Manager {
    /// Starts a manager on 127.0.0.1 with an ephemeral port, creating the
    /// CA in `dir` on first start.
    pub async fn start(dir: &Path) -> Manager {
        Self::start_on(dir, "127.0.0.1:0".parse().expect("addr"), &[]).await
    }

    pub async fn start_on(dir: &Path, listen: SocketAddr, extra: &[&str]) -> Manager {
        Self::start_with_env(dir, listen, extra, &[]).await
    }

    /// Like `start_on`, with extra environment variables (fault injection).
    pub async fn start_with_env(
        dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Manager {
        let mut proc = spawn_serve(dir, listen, extra, env);
        let addr = eventually("manager to listen", DEADLINE, || {
            let text = proc.log_text();
            let found = text
                .lines()
                .find_map(|l| l.split("manager serving addr=").nth(1))
                .and_then(|a| a.trim().parse::<SocketAddr>().ok());
            async move { found }
        })
        .await;
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!("manager exited ({status}): {}", proc.log_text());
        }
        Manager {
            dir: dir.to_path_buf(),
            addr,
            proc,
        }
    }

    /// Starts a replica, `cloud-manager serve --listen LISTEN` with `extra`
    /// (an etcd store): returns once it listens, as the leader or as a
    /// standby.
    pub async fn start_replica(
        dir: &Path,
        listen: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Manager {
        let mut proc = spawn_serve(dir, listen, extra, env);
        eventually("replica to listen", DEADLINE, || {
            let text = proc.log_text();
            let up =
                text.contains("manager serving") || text.contains("waiting for the etcd prefix");
            let exited = matches!(proc.child.try_wait(), Ok(Some(_)));
            assert!(!exited, "replica exited: {text}");
            async move { up.then_some(()) }
        })
        .await;
        Manager {
            dir: dir.to_path_buf(),
            addr: listen,
            proc,
        }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The dashboard's base URL (`http://127.0.0.1:PORT`), from its log
    /// line (`dashboard serving ... url=`).
    pub async fn dashboard_url(&self) -> String {
        eventually("the dashboard to listen", DEADLINE, || {
            let url = self
                .proc
                .log_text()
                .lines()
                .filter(|l| l.contains("dashboard serving"))
                .find_map(|l| l.split("url=").nth(1))
                .map(|u| u.split_whitespace().next().unwrap_or_default().to_string());
            async move { url }
        })
        .await
    }

    /// A tenant client with the default tenant's bundle.
    pub fn tenant(&self) -> TenantServiceClient<Channel> {
        tenant_client(
            &self.addr,
            &self.ca(),
            Some((&self.dir.join("tenant.pem"), &self.dir.join("tenant.key"))),
        )
    }

    /// Issues a bundle for another tenant and returns a client for it.
    pub fn other_tenant(&self, tenant: &str) -> TenantServiceClient<Channel> {
        let out = run(Command::new(bin("cloud-manager"))
            .args(["tenant-bundle", "--dir"])
            .arg(&self.dir)
            .args(["--tenant", tenant, "--out-dir"])
            .arg(&self.dir));
        assert!(out.ok, "tenant-bundle: {}", out.stderr);
        tenant_client(
            &self.addr,
            &self.ca(),
            Some((
                &self.dir.join(format!("{tenant}.pem")),
                &self.dir.join(format!("{tenant}.key")),
            )),
        )
    }

    pub async fn token(&self) -> String {
        create_token(&mut self.tenant(), 600).await
    }
}

pub async fn create_token(client: &mut TenantServiceClient<Channel>, ttl: u32) -> String {
    client
        .create_join_token(pb::CreateJoinTokenRequest {
            ttl_seconds: ttl,
            labels: Default::default(),
        })
        .await
        .expect("CreateJoinToken")
        .into_inner()
        .token
}

pub fn client_tls(ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let roots = tls::roots(&tls::read_certs(ca).expect("ca")).expect("roots");
    let identity = identity.map(|(c, k)| {
        (
            tls::read_certs(c).expect("cert"),
            tls::read_key(k).expect("key"),
        )
    });
    Arc::new(tls::client_config(roots, identity).expect("client config"))
}

/// A TenantService client trusting `ca`, presenting `identity` if given.
pub fn tenant_client(
    addr: &SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> TenantServiceClient<Channel> {
    let ch = tls::channel(&addr.to_string(), client_tls(ca, identity), DEADLINE).expect("channel");
    TenantServiceClient::new(ch)
}

/// Opens `AgentService.Connect` with the given identity and sends a hello;
/// returns the first answer (Welcome) or the error status.
pub async fn open_agent_stream(
    addr: &SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<pb::ManagerMessage, tonic::Status> {
    agent_stream(addr, ca, identity)
        .await
        .map(|(first, _)| first)
}

/// Like `open_agent_stream`, also returning the open stream.
pub async fn agent_stream(
    addr: &SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<(pb::ManagerMessage, tonic::Streaming<pb::ManagerMessage>), tonic::Status> {
    let ch = tls::channel(&addr.to_string(), client_tls(ca, identity), DEADLINE).expect("channel");
    let mut client = AgentServiceClient::new(ch);
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
            agent_version: "test".into(),
            ..Default::default()
        })),
    };
    // Keep the request stream open after the hello so the server does not
    // see an early end of stream.
    let outbound =
        tokio_stream::StreamExt::chain(tokio_stream::iter(vec![hello]), tokio_stream::pending());
    let mut inbound = client.connect(outbound).await?.into_inner();
    match inbound.message().await? {
        Some(m) => Ok((m, inbound)),
        None => Err(tonic::Status::unknown("stream ended without a message")),
    }
}

/// How a stream ended within `within`: `None` when it closed cleanly,
/// the status otherwise. Panics if it is still open then.
pub async fn stream_end<T>(
    stream: &mut tonic::Streaming<T>,
    within: Duration,
    what: &str,
) -> Option<tonic::Status> {
    tokio::time::timeout(within, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: still open after {within:?}"))
}

/// An enrolled agent's data dir (from the real `edge-agent join`).
#[derive(Clone, Debug)]
pub struct AgentDir {
    pub dir: PathBuf,
    pub node_id: String,
}

pub fn join(manager: &Manager, dir: &Path, node_id: &str, token: &str, extra: &[&str]) -> Output {
    run(Command::new(bin("edge-agent"))
        .args([
            "join",
            "--manager",
            &manager.addr.to_string(),
            "--token",
            token,
        ])
        .arg("--ca-cert")
        .arg(manager.ca())
        .args(["--node-id", node_id, "--data-dir"])
        .arg(dir)
        .args(extra))
}

pub async fn enroll(manager: &Manager, root: &Path, node_id: &str) -> AgentDir {
    let dir = root.join(node_id);
    let token = manager.token().await;
    let out = join(manager, &dir, node_id, &token, &[]);
    assert!(out.ok, "join {node_id}: {}", out.stderr);
    AgentDir {
        dir,
        node_id: node_id.to_string(),
    }
}

/// User the tests' agents run their apps as (when the tests run as root):
/// `nobody` exists everywhere, `edgepool-app` only where the package made it.
pub const APP_USER: &str = "nobody";

/// Sandbox flags of an `edge-agent run` on `data_dir`: apps run as
/// `APP_USER`, and the temp dirs above `data_dir` are made traversable
/// (not listable) so that `APP_USER` reaches its working directory
/// (`<data_dir>-apps/<app>`) and the programs and scripts a test puts
/// there. The data dir itself stays owner-only (the agent sees to it).
pub fn sandbox_args(data_dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = std::env::temp_dir();
    let mut dir = data_dir.parent();
    while let Some(d) = dir {
        if !d.starts_with(&tmp) || d == tmp {
            break;
        }
        if let Ok(m) = std::fs::metadata(d) {
            let mode = m.permissions().mode();
            let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode | 0o011));
        }
        dir = d.parent();
    }
    vec!["--run-as".into(), APP_USER.into()]
}

/// Starts `edge-agent run` for an enrolled data dir, in its own session
/// (so the agent and its apps are killed together at the end), with a
/// fast peer probe.
pub fn start_agent(agent: &AgentDir, manager_addr: &SocketAddr, extra: &[&str]) -> Proc {
    start_agent_on(agent, &manager_addr.to_string(), extra)
}

/// `start_agent` with a list of manager addresses (`a:1,b:2`).
pub fn start_agent_on(agent: &AgentDir, managers: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(bin("edge-agent"));
    cmd.args(["run", "--new-session", "--data-dir"])
        .arg(&agent.dir)
        .args(["--manager", managers])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"])
        .args(["--peer-probe-interval-ms", "300"])
        .args(sandbox_args(&agent.dir))
        .args(extra);
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = agent.dir.join(format!("agent-{n}.log"));
    Proc::spawn_session(&agent.node_id, &mut cmd, &log)
}

/// Waits until `node_id` is connected and has reported its capacity.
pub async fn wait_connected(m: &Manager, node_id: &str) -> pb::Node {
    eventually(&format!("{node_id} connected"), DEADLINE, || {
        let mut t = m.tenant();
        let id = node_id.to_string();
        async move {
            get_node(&mut t, &id)
                .await
                .filter(|n| n.connected && n.capacity.is_some_and(|c| c.memory_mb > 0))
        }
    })
    .await
}

/// The node as the tenant sees it, if it exists.
pub async fn get_node(client: &mut TenantServiceClient<Channel>, id: &str) -> Option<pb::Node> {
    client
        .get_node(pb::GetNodeRequest {
            node_id: id.to_string(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// All of the tenant's nodes (every page of ListNodes).
pub async fn list_nodes(client: &mut TenantServiceClient<Channel>) -> Vec<pb::Node> {
    list_nodes_with(client, pb::ListNodesRequest::default())
        .await
        .expect("ListNodes")
        .into_iter()
        .flatten()
        .collect()
}

/// ListNodes with `req`'s page size and filters, following
/// `next_page_token` to the last page: the pages, in order, or the first
/// error. Checks that only the last page lacks a token.
pub async fn list_nodes_with(
    client: &mut TenantServiceClient<Channel>,
    mut req: pb::ListNodesRequest,
) -> Result<Vec<Vec<pb::Node>>, tonic::Status> {
    let mut pages = Vec::new();
    loop {
        let page = client.list_nodes(req.clone()).await?.into_inner();
        pages.push(page.nodes);
        if page.next_page_token.is_empty() {
            return Ok(pages);
        }
        assert!(pages.len() < 10_000, "ListNodes pages never end");
        req.page_token = page.next_page_token;
    }
}

/// A TCP proxy on 127.0.0.1 in front of `target`, whose link can be cut
/// (every connection dropped, new ones closed at once) and restored: a
/// network partition between one agent and the manager, on loopback.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
    /// While true, connections stay open but carry nothing (a black hole:
    /// what a dropped route or a firewall that drops packets looks like).
    hole: Arc<tokio::sync::watch::Sender<bool>>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let hole = Arc::new(tokio::sync::watch::channel(false).0);
        let (c, k, h) = (cut.clone(), conns.clone(), hole.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if c.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let h = h.clone();
                let task = tokio::spawn(async move {
                    if let Ok(outbound) = tokio::net::TcpStream::connect(target).await {
                        let (ir, iw) = inbound.into_split();
                        let (or, ow) = outbound.into_split();
                        let up = pump(ir, ow, h.subscribe());
                        let down = pump(or, iw, h.subscribe());
                        let _ = tokio::join!(up, down);
                    }
                });
                k.lock().expect("proxy lock").push(task.abort_handle());
            }
        });
        Proxy {
            addr,
            cut,
            hole,
            conns,
            accept,
        }
    }

    /// Keeps every connection open but lets nothing through, old or new,
    /// until `restore` (nothing is lost: what was sent meanwhile arrives
    /// then, as TCP would retransmit it).
    pub fn blackhole(&self) {
        self.hole.send_replace(true);
    }

    /// Drops every connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("proxy lock").drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
        self.hole.send_replace(false);
    }
}

/// Copies `from` to `to`, holding everything while the proxy is a black hole.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut hole: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if hole.wait_for(|h| !*h).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        if hole.wait_for(|h| !*h).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Samples, every 20 ms until dropped, how many processes run each of the
/// given command lines, and remembers the worst: a check that no app ever
/// runs twice (two owners) during a test.
pub struct OwnerWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    worst: Arc<std::sync::Mutex<BTreeMap<String, usize>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OwnerWatch {
    pub fn start(commands: Vec<String>) -> OwnerWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let worst: Arc<std::sync::Mutex<BTreeMap<String, usize>>> = Arc::default();
        let (s, w) = (stop.clone(), worst.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::SeqCst) {
                for c in &commands {
                    let n = processes_running(c).len();
                    let mut w = w.lock().expect("watch lock");
                    let e = w.entry(c.clone()).or_default();
                    *e = (*e).max(n);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        OwnerWatch {
            stop,
            worst,
            thread: Some(thread),
        }
    }

    /// The largest number of simultaneous copies seen for each command.
    pub fn worst(&self) -> BTreeMap<String, usize> {
        self.worst.lock().expect("watch lock").clone()
    }
}

impl Drop for OwnerWatch {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether an RPC failed in the TLS handshake rather than in a handler: a
/// certificate refused there never reaches one. The client sees a transport
/// failure (the connection refused by an alert, or closed under the request
/// with TLS 1.3, where the client's certificate is checked after the client
/// already considers the handshake done); a status made by a handler never
/// carries a transport error as its source.
/// Trust anchors for verifying the members of the pool whose CA is
/// `pool_ca_pem` (`Pool.ca_pem`): the pool CA itself, as the agents use it.
pub fn pool_roots(pool_ca_pem: &str) -> rustls::RootCertStore {
    let ca = edgepool_common::tls::certs_from_pem(pool_ca_pem, "pool CA").unwrap();
    edgepool_common::trust::member_roots(&ca[0]).unwrap()
}

pub fn refused_at_tls(err: &tonic::Status) -> bool {
    let transport = std::error::Error::source(err)
        .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
    transport
        || matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled
        )
}

/// `cloud-manager serve --listen LISTEN --data-dir DIR EXTRA`, logging to
/// `DIR/manager-N.log` (N counts every start in this process).
fn spawn_serve(dir: &Path, listen: SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Proc {
    static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::fs::create_dir_all(dir).expect("manager dir");
    let log = dir.join(format!("manager-{n}.log"));
    let mut cmd = Command::new(bin("cloud-manager"));
    cmd.args(["serve", "--listen", &listen.to_string(), "--data-dir"])
        .arg(dir)
        .args(extra)
        .envs(env.iter().copied());
    // Tests run side by side: each dashboard on a free port unless the
    // test says where.
    if !extra.contains(&"--http-listen") {
        cmd.args(["--http-listen", "127.0.0.1:0"]);
    }
    Proc::spawn("cloud-manager", &mut cmd, &log)
}

/// A free loopback address (bound, then released) for a daemon that must
/// keep its address across restarts.
pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr")
}

/// Wall-clock milliseconds since the Unix epoch (to compare with the
/// timestamps the manager shows).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The number after flag `name` on the command line (benchmark programs).
pub fn number_arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The retained events of `pool` (all pools if empty), replayed from the
/// start; stops when none arrives for `quiet`.
pub async fn retained_events(m: &Manager, pool: &str, quiet: Duration) -> Vec<pb::Event> {
    let Ok(response) = m
        .tenant()
        .watch_events(pb::WatchEventsRequest {
            pool: pool.into(),
            from_start: true,
            ..Default::default()
        })
        .await
    else {
        return Vec::new();
    };
    let mut stream = response.into_inner();
    let mut out = Vec::new();
    while let Ok(Ok(Some(e))) = tokio::time::timeout(quiet, stream.message()).await {
        out.push(e);
    }
    out
}

/// Waits until a retained event of `pool` satisfies `wanted`.
pub async fn wait_event(
    m: &Manager,
    pool: &str,
    what: &str,
    deadline: Duration,
    wanted: impl Fn(&pb::Event) -> bool,
) -> pb::Event {
    eventually(what, deadline, || async {
        retained_events(m, pool, Duration::from_millis(200))
            .await
            .into_iter()
            .find(|e| wanted(e))
    })
    .await
}

/// A real etcd server (the Debian package `etcd-server`, which
/// `scripts/test.sh` installs) on 127.0.0.1 with free ports and its own data
/// dir; killed on drop.
pub struct Etcd {
    pub url: String,
    pub proc: Proc,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Set for an etcd that serves TLS and asks clients for certificates.
    pub tls: Option<EtcdTls>,
}

/// The files of a TLS etcd: its CA, and a client certificate it accepts.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl EtcdTls {
    /// A CA, a server certificate for 127.0.0.1 and a client certificate,
    /// written to `dir`.
    fn make(dir: &Path) -> EtcdTls {
        use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
        std::fs::create_dir_all(dir).expect("tls dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "etcd test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, server: bool| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            p.subject_alt_names
                .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
            p.extended_key_usages = if server {
                vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ]
            } else {
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            };
            let cert = p.signed_by(&key, &issuer).expect("leaf");
            let (c, k) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).expect("write cert");
            std::fs::write(&k, key.serialize_pem()).expect("write key");
            (c, k)
        };
        let ca_path = dir.join("etcd-ca.pem");
        std::fs::write(&ca_path, ca_cert.pem()).expect("write ca");
        let (server_cert, server_key) = leaf("etcd-server", true);
        let (client_cert, client_key) = leaf("etcd-client", false);
        EtcdTls {
            ca: ca_path,
            client_cert,
            client_key,
            server_cert,
            server_key,
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Etcd {
    pub async fn start(dir: &Path) -> Etcd {
        Self::start_with(dir, None).await
    }

    /// An etcd that serves TLS (`https://`) and accepts only clients with a
    /// certificate from its own CA (`--client-cert-auth`).
    pub async fn start_tls(dir: &Path) -> Etcd {
        let tls = EtcdTls::make(&dir.join("tls"));
        Self::start_with(dir, Some(tls)).await
    }

    async fn start_with(dir: &Path, tls: Option<EtcdTls>) -> Etcd {
        let (client_port, peer_port) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut etcd = Etcd {
            url: format!("{scheme}://127.0.0.1:{client_port}"),
            proc: Self::spawn(dir, client_port, peer_port, 0, tls.as_ref()),
            dir: dir.to_path_buf(),
            client_port,
            peer_port,
            tls,
        };
        etcd.wait_ready().await;
        etcd
    }

    fn spawn(
        dir: &Path,
        client_port: u16,
        peer_port: u16,
        n: usize,
        tls: Option<&EtcdTls>,
    ) -> Proc {
        let etcd = ["/usr/bin/etcd", "/usr/local/bin/etcd"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("etcd"));
        std::fs::create_dir_all(dir).expect("etcd dir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let mut cmd = Command::new(&etcd);
        if let Some(t) = tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        cmd.args(["--name", "test", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--log-level", "warn"]);
        Proc::spawn("etcd", &mut cmd, &dir.join(format!("etcd-{n}.log")))
    }

    /// Kills etcd (SIGKILL) and starts it again on the same ports and data.
    pub async fn restart(&mut self) {
        self.proc.kill();
        self.proc = Self::spawn(
            &self.dir,
            self.client_port,
            self.peer_port,
            1,
            self.tls.as_ref(),
        );
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let (url, tls) = (self.url.clone(), self.tls.clone());
        eventually("etcd to serve", DEADLINE, || {
            let (url, tls) = (url.clone(), tls.clone());
            async move {
                let mut c = connect_etcd(&url, tls.as_ref()).await;
                let one_key = etcd_client::GetOptions::new()
                    .with_limit(1)
                    .with_keys_only();
                c.get("/", Some(one_key)).await.ok().map(|_| ())
            }
        })
        .await;
        if let Ok(Some(status)) = self.proc.child.try_wait() {
            panic!(
                "etcd exited ({status}); is the etcd-server package installed? {}",
                self.proc.log_text()
            );
        }
    }

    /// An etcd-client client of this etcd.
    pub async fn client(&self) -> etcd_client::Client {
        connect_etcd(&self.url, self.tls.as_ref()).await
    }

    /// The value of `key`, if it exists.
    pub async fn value(&self, key: &str) -> Option<Vec<u8>> {
        let mut got = self
            .client()
            .await
            .get(key, None)
            .await
            .expect("etcd range");
        got.take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.into_key_value().1)
    }

    /// The keys under `prefix`.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        cloud_manager::etcd::prefix(&self.client().await, prefix, 1000)
            .await
            .expect("etcd range")
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect()
    }
}

/// `grpc.health.v1.Health/Check` of `edge.v1.Leader` on the manager at
/// `addr`: SERVING (1) on the leader, NOT_SERVING (2) on a standby, None
/// when nothing answers.
pub async fn leader_status(addr: &str, ca: &Path) -> Option<i32> {
    let tls = client_tls(ca, None);
    let ch = tls::channel(addr, tls, Duration::from_secs(2)).ok()?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    h.check(tonic_health::pb::HealthCheckRequest {
        service: "edge.v1.Leader".into(),
    })
    .await
    .ok()
    .map(|r| r.into_inner().status)
}

/// Makes `to` a replica's data dir: copies of `from`'s CA, server
/// certificate, tenant bundle and store key (what docs/install.md says to
/// copy to each replica).
pub fn copy_replica_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("replica dir");
    for f in [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "tenant.pem",
        "tenant.key",
        "store.key",
    ] {
        std::fs::copy(from.join(f), to.join(f)).expect("copying a replica file");
    }
}

async fn connect_etcd(url: &str, tls: Option<&EtcdTls>) -> etcd_client::Client {
    cloud_manager::etcd::connect(&cloud_manager::etcd::Connect {
        endpoints: vec![url.to_string()],
        timeout: Duration::from_secs(5),
        ca_cert: tls.map(|t| t.ca.clone()),
        cert: tls.map(|t| t.client_cert.clone()),
        key: tls.map(|t| t.client_key.clone()),
    })
    .await
    .expect("etcd client")
}

/// The memory limit of process `pid`'s cgroup in bytes (`memory.max` on
/// cgroup v2, `memory.limit_in_bytes` on v1), if it has one it can read.
pub fn cgroup_memory_limit(pid: u32) -> Option<u64> {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    let mount_of = |kind: &str, option: Option<&str>| {
        mounts.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3 && f[2] == kind && option.is_none_or(|o| f[3].split(',').any(|x| x == o)))
                .then(|| f[1].to_string())
        })
    };
    for line in groups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let root = mount_of("cgroup", Some("memory"))?;
            let v = std::fs::read_to_string(format!("{root}{path}/memory.limit_in_bytes")).ok()?;
            return v.trim().parse().ok();
        }
    }
    let path = groups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let root = mount_of("cgroup2", None)?;
    let v = std::fs::read_to_string(format!("{root}{path}/memory.max")).ok()?;
    v.trim().parse().ok()
}

/// The samples of one scrape of a metrics listener: `name{labels}` (as the
/// exposition writes it) -> value.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub samples: BTreeMap<String, f64>,
    pub text: String,
}

impl Scrape {
    /// The sample `key` (`name` or `name{a="b",...}`), 0 when absent.
    pub fn value(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    /// Whether a metric family of this name is declared (`# TYPE name ...`).
    pub fn has_family(&self, name: &str) -> bool {
        self.text
            .lines()
            .any(|l| l.strip_prefix("# TYPE ").and_then(|r| r.split(' ').next()) == Some(name))
    }
}

/// The URL in `DIR/metrics.url` (written by a daemon with metrics on).
pub fn metrics_url(dir: &Path) -> String {
    let path = dir.join("metrics.url");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// Parses an OpenMetrics text exposition; panics on a line that is not a
/// comment or `NAME[{LABELS}] VALUE`, or without the final `# EOF`.
pub fn parse_openmetrics(text: &str) -> BTreeMap<String, f64> {
    assert!(
        text.trim_end().ends_with("# EOF"),
        "no # EOF at the end:\n{text}"
    );
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number in: {line}"));
        let name = key.split('{').next().unwrap_or_default();
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in: {line}"
        );
        assert!(
            !key.contains('{') || key.ends_with('}'),
            "bad labels in: {line}"
        );
        samples.insert(key.to_string(), value);
    }
    samples
}

/// `GET URL` (plain `http://HOST:PORT/PATH`): the status code and the
/// body, or None when the listener cannot be reached.
pub async fn http_get(url: &str) -> Option<(u16, String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream =
        tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
            .await
            .ok()?
            .ok()?;
    let request = format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut raw))
        .await
        .ok()?
        .ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, head.to_string(), body.to_string()))
}

/// Scrapes a metrics listener; panics unless it answers 200 with a valid
/// OpenMetrics text exposition.
pub async fn scrape(url: &str) -> Scrape {
    let (code, head, body) = http_get(url)
        .await
        .unwrap_or_else(|| panic!("no answer from {url}"));
    assert_eq!(code, 200, "{url}: {head}\n{body}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{url}: {head}"
    );
    Scrape {
        samples: parse_openmetrics(&body),
        text: body,
    }
}

/// Scrapes `url` until `check` finds what it wants in a scrape.
pub async fn scrape_until<T>(
    what: &str,
    url: &str,
    mut check: impl FnMut(&Scrape) -> Option<T>,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = scrape(url).await;
        if let Some(v) = check(&s) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; last scrape of {url}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
