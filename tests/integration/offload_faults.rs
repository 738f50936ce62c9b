//! Offload under faults: no app runs on two nodes for longer than one
//! reconciliation interval (the offload lease), and none is lost. Each test
//! injects one fault with real agents (a lost `Offer` answer, a host that
//! crashes before answering and one that crashes after the move, a dropped
//! connection to the host, concurrent offers to one peer, a `Release` that
//! fails at first, an app removed while moved out) and checks from the
//! outside: a sampler reads the process table every 20 ms and records which
//! nodes run the moving app (by each process's working directory,
//! `<node dir>/apps/<app>`, so a process whose agent died still counts).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;
use pb::peer_service_client::PeerServiceClient;
use tonic::transport::Channel;

use crate::offload::{create, load, policy, sleeper};
use crate::pools::{Fleet, get_pool, wait_running};

/// The reconciliation interval (offload lease) the agents run with.
pub(crate) const LEASE: Duration = Duration::from_millis(3000);
/// Sampling, scheduling and process start/stop jitter allowed on top of it.
const SLACK: Duration = Duration::from_millis(700);

/// How to run one agent of the fleet.
#[derive(Clone, Default)]
pub(crate) struct NodeOpts {
    cpu: u64,
    env: Vec<(String, String)>,
    /// More `edge-agent run` flags.
    args: Vec<String>,
    /// Put the peer port behind a proxy that the test can cut.
    proxied: bool,
}

impl NodeOpts {
    pub(crate) fn cpu(cpu: u64) -> Self {
        NodeOpts {
            cpu,
            ..Default::default()
        }
    }

    fn fault(mut self, fault: &str) -> Self {
        self.env.push(("EDGEPOOL_FAULT".into(), fault.into()));
        self
    }

    pub(crate) fn arg(mut self, flag: &str, value: &str) -> Self {
        self.args.extend([flag.to_string(), value.to_string()]);
        self
    }

    fn proxied(mut self) -> Self {
        self.proxied = true;
        self
    }
}

/// A fleet whose agents listen on fixed peer ports (so a crashed agent
/// comes back on the same address), optionally behind a proxy.
pub(crate) struct FaultFleet {
    pub(crate) f: Fleet,
    opts: BTreeMap<String, NodeOpts>,
    listen: BTreeMap<String, SocketAddr>,
    proxies: BTreeMap<String, Proxy>,
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

impl FaultFleet {
    pub(crate) async fn start(nodes: &[NodeOpts]) -> FaultFleet {
        let tmp = TempDir::new().unwrap();
        let m = Manager::start(&tmp.path().join("m")).await;
        let mut ff = FaultFleet {
            f: Fleet {
                tmp,
                m,
                agents: BTreeMap::new(),
            },
            opts: BTreeMap::new(),
            listen: BTreeMap::new(),
            proxies: BTreeMap::new(),
        };
        for (i, o) in nodes.iter().enumerate() {
            let id = format!("node-{}", i + 1);
            let dir = enroll(&ff.f.m, ff.f.tmp.path(), &id).await;
            let listen = free_port();
            if o.proxied {
                ff.proxies.insert(id.clone(), Proxy::start(listen).await);
            }
            ff.listen.insert(id.clone(), listen);
            ff.opts.insert(id.clone(), o.clone());
            let p = ff.spawn(&dir, o);
            ff.f.agents.insert(id.clone(), (dir, p));
            wait_connected(&ff.f.m, &id).await;
        }
        ff
    }

    fn spawn(&self, dir: &AgentDir, o: &NodeOpts) -> Proc {
        static STARTS: AtomicUsize = AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, Ordering::Relaxed);
        let listen = self.listen[&dir.node_id];
        let mut cmd = Command::new(bin("edge-agent"));
        cmd.args(["run", "--new-session", "--data-dir"])
            .arg(&dir.dir)
            .args(edgepool_tests::sandbox_args(&dir.dir))
            .args(["--manager", &self.f.m.addr.to_string()])
            .args(["--peer-listen", &listen.to_string()])
            .args(["--reconnect-min-ms", "100", "--reconnect-max-ms", "1000"])
            .args(["--peer-probe-interval-ms", "300"])
            .args(["--scheduler-interval-ms", "300"])
            .args(["--network-accounting", "process"])
            .args(["--offload-lease-ms", &LEASE.as_millis().to_string()])
            .args(["--cpu-millis", &o.cpu.to_string()])
            .args(["--memory-mb", "100000", "--disk-mb", "100000"])
            .args(["--network-mbps", "100000"])
            .args(&o.args)
            .envs(o.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(p) = self.proxies.get(&dir.node_id) {
            cmd.args(["--peer-advertise", &p.addr.to_string()]);
        }
        let log = dir.dir.join(format!("fault-agent-{n}.log"));
        Proc::spawn_session(&dir.node_id, &mut cmd, &log)
    }

    /// Crashes the whole machine: the agent and every app it started.
    fn crash(&mut self, id: &str) {
        let (_, p) = self.f.agents.get_mut(id).expect("node");
        p.kill();
    }

    /// Starts a crashed node's agent again, without faults.
    async fn restart(&mut self, id: &str) {
        let dir = self.f.agents[id].0.clone();
        let mut o = self.opts[id].clone();
        o.env.clear();
        let p = self.spawn(&dir, &o);
        self.f.agents.insert(id.to_string(), (dir, p));
        wait_connected(&self.f.m, id).await;
    }

    /// Where the app with this tag runs in this fleet now.
    pub(crate) fn hosts(&self, tag: &str) -> Vec<String> {
        hosts(self.f.tmp.path(), tag)
    }

    /// Starts sampling where the app with this tag runs in this fleet.
    pub(crate) fn watch(&self, tag: &str) -> Placements {
        Placements::start(self.f.tmp.path(), tag)
    }

    /// Everything the node's agents logged so far.
    pub(crate) fn log(&self, id: &str) -> String {
        let dir = &self.f.agents[id].0.dir;
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.filter_map(Result::ok) {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("fault-agent-") {
                    out.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        out
    }

    /// The last lines its agents logged about offloading, for failures.
    fn tail(&self, id: &str) -> String {
        let log = self.log(id);
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("offload")
                    || l.contains("guest")
                    || l.contains("lease")
                    || l.contains("release")
                    || l.contains("offer")
                    || l.contains("home")
                    || l.contains("app")
            })
            .collect();
        format!(
            "--- {id} ---\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    }

    /// The node's persisted offload state.
    fn offload_state(&self, id: &str) -> serde_json::Value {
        let path = self.f.agents[id].0.dir.join("offload.json");
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }
}

/// The nodes of the fleet under `root` whose processes run the app with
/// this tag now (other tests on the machine may run apps of the same name).
fn hosts(root: &Path, tag: &str) -> Vec<String> {
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let suffix = format!("--tag {tag}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| cmdline(*pid).ends_with(&suffix))
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            !stat.contains(") Z ")
        })
        .filter_map(|pid| {
            // <node dir>-apps/<app>
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
            if !cwd.starts_with(&root) {
                return None;
            }
            let apps = cwd.parent()?.file_name()?.to_string_lossy().into_owned();
            Some(apps.strip_suffix("-apps")?.to_string())
        })
        .collect();
    out.sort();
    out
}

/// Samples of `hosts(root, tag)`, oldest first.
type Samples = Arc<Mutex<Vec<(Instant, Vec<String>)>>>;

/// Samples `hosts(root, tag)` every 20 ms until dropped.
pub(crate) struct Placements {
    root: PathBuf,
    tag: String,
    samples: Samples,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Placements {
    fn start(root: &Path, tag: &str) -> Placements {
        let samples: Samples = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, t, owned, r) = (
            samples.clone(),
            stop.clone(),
            tag.to_string(),
            root.to_path_buf(),
        );
        let thread = std::thread::spawn(move || {
            while !t.load(Ordering::SeqCst) {
                let h = hosts(&r, &owned);
                s.lock().unwrap().push((Instant::now(), h));
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Placements {
            root: root.to_path_buf(),
            tag: tag.to_string(),
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// The longest stretch since `since` in which `pred` held for every
    /// sample, from its first sample to the first sample where it no
    /// longer held (or the last sample).
    fn longest(&self, since: Instant, pred: impl Fn(&[String]) -> bool) -> Duration {
        let samples = self.samples.lock().unwrap();
        let mut best = Duration::ZERO;
        let mut start: Option<Instant> = None;
        for (t, h) in samples.iter().filter(|(t, _)| *t >= since) {
            match (pred(h), start) {
                (true, None) => start = Some(*t),
                (false, Some(s)) => {
                    best = best.max(*t - s);
                    start = None;
                }
                _ => {}
            }
        }
        if let (Some(s), Some((t, _))) = (start, samples.last()) {
            best = best.max(*t - s);
        }
        best
    }

    /// The longest time the app ran on two or more nodes at once.
    fn longest_twice(&self, since: Instant) -> Duration {
        self.longest(since, |h| h.len() >= 2)
    }

    /// The longest time the app ran nowhere, after it first ran.
    fn longest_nowhere(&self) -> Duration {
        let first = self
            .samples
            .lock()
            .unwrap()
            .iter()
            .find(|(_, h)| !h.is_empty())
            .map(|(t, _)| *t);
        first.map_or(Duration::ZERO, |t| self.longest(t, |h| h.is_empty()))
    }

    /// Whether any node of the fleet ever ran the app while sampled.
    pub(crate) fn ever_ran(&self) -> bool {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .any(|(_, h)| !h.is_empty())
    }

    /// Whether `node` ever ran the app since `since`.
    pub(crate) fn ever_on(&self, node: &str, since: Instant) -> bool {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .any(|(t, h)| *t >= since && h.iter().any(|n| n == node))
    }

    /// Waits until the app runs on exactly `node` and nowhere else.
    async fn wait_only_on(&self, node: &str, deadline: Duration) {
        eventually(
            &format!("{} to run on {node} only", self.tag),
            deadline,
            || async { (hosts(&self.root, &self.tag) == [node]).then_some(()) },
        )
        .await
    }

    /// The invariant: never on two nodes for longer than one
    /// reconciliation interval, and exactly one node in the end.
    fn check(&self, since: Instant, end_on: &str) {
        let twice = self.longest_twice(since);
        eprintln!(
            "{}: longest on two nodes {twice:?}, longest nowhere {:?}",
            self.tag,
            self.longest_nowhere()
        );
        assert!(
            twice <= LEASE + SLACK,
            "{} ran on two nodes for {twice:?} (lease {LEASE:?})",
            self.tag
        );
        assert_eq!(
            hosts(&self.root, &self.tag),
            [end_on],
            "{} at the end",
            self.tag
        );
    }
}

impl Drop for Placements {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// node-1 runs `burner` (offloadable) and `pad1` (pinned): 500 of 500
/// millicores, over high 0.8; moving `burner` brings it under low 0.5.
fn mover_apps() -> Vec<pb::AppSpec> {
    vec![
        load("burner", 1, &["--cpu", "350"], true, 0),
        load("pad1", 1, &["--cpu", "150"], false, 5),
        sleeper("i2", 2),
        sleeper("i3", 3),
    ]
}

fn cpu_policy() -> pb::Policy {
    policy("cpu", 0.8, 0.5, pb::TargetMode::Single, 1)
}

/// node-2 has the most headroom (1000 millicores), so the planner offers
/// to it first; node-3 (500) can take the burner too.
fn three(node2: NodeOpts) -> [NodeOpts; 3] {
    [NodeOpts::cpu(500), node2, NodeOpts::cpu(500)]
}

#[tokio::test]
async fn a_lost_offer_answer_leaves_no_second_copy() {
    let f = FaultFleet::start(&three(NodeOpts::cpu(1000).fault("drop-offer-answer"))).await;
    let start = Instant::now();
    let watch = f.watch("burner");
    create(&f.f, "lost", mover_apps(), cpu_policy()).await;
    // node-2 starts it, but its answer never arrives (twice: the owner
    // repeats the offer with the same id, which node-2 answers without a
    // second start): the owner asks node-2 to drop it and moves it to
    // node-3.
    watch.wait_only_on("node-3", Duration::from_secs(60)).await;
    assert!(
        watch.ever_on("node-2", start),
        "the faulty host never ran it"
    );
    let log2 = f.log("node-2");
    assert!(log2.contains("fault injected: dropping the offer's answer"));
    assert!(log2.contains("repeated offer: answering again"), "{log2}");
    assert!(
        log2.contains("released a guest"),
        "node-2 was not asked to drop it"
    );
    // And it stays that way for two more intervals.
    tokio::time::sleep(LEASE * 2).await;
    watch.check(start, "node-3");
    assert!(watch.longest_nowhere() < SLACK, "the app was lost");
}

#[tokio::test]
async fn a_host_that_crashes_before_answering_or_after_the_move_loses_nothing() {
    let mut f =
        FaultFleet::start(&three(NodeOpts::cpu(1000).fault("hold-offer-answer=4000"))).await;
    let start = Instant::now();
    let watch = f.watch("burner");
    create(&f.f, "crash", mover_apps(), cpu_policy()).await;
    // node-2 runs the guest and holds its answer: crash the machine now.
    eventually(
        "burner to start on node-2",
        Duration::from_secs(60),
        || async {
            f.hosts("burner")
                .contains(&"node-2".to_string())
                .then_some(())
        },
    )
    .await;
    f.crash("node-2");
    // The owner never stopped its copy, and moves it to node-3 instead.
    watch.wait_only_on("node-3", DEADLINE).await;
    // node-2 comes back with the guest in its saved state: the owner's
    // pending release reaches it, and the app stays on node-3 only.
    f.restart("node-2").await;
    eventually("node-1's release to node-2 confirmed", DEADLINE, || async {
        let s = f.offload_state("node-1");
        s["releases"]
            .as_array()
            .is_some_and(|r| r.is_empty())
            .then_some(())
    })
    .await;
    tokio::time::sleep(LEASE).await;
    watch.check(start, "node-3");
    assert!(watch.longest_nowhere() < SLACK, "the app was lost");

    // Now the host crashes after the move: renewals fail, and once the
    // lease surely ran out the owner runs the app at home again.
    let crashed = Instant::now();
    f.crash("node-3");
    watch
        .wait_only_on("node-1", LEASE + Duration::from_secs(5))
        .await;
    let back = crashed.elapsed();
    assert!(
        back >= LEASE.saturating_sub(Duration::from_millis(1500)),
        "taken back after {back:?}, before the lease could have ended"
    );
    tokio::time::sleep(LEASE).await;
    watch.check(start, "node-1");
    assert!(
        watch.longest_nowhere() < LEASE + Duration::from_secs(3),
        "down for {:?}",
        watch.longest_nowhere()
    );
    assert!(f.log("node-1").contains("no renewal for a whole lease"));
}

#[tokio::test]
async fn a_dropped_connection_to_the_host_brings_the_app_home_without_two_copies() {
    let f = FaultFleet::start(&three(NodeOpts::cpu(1000).proxied())).await;
    let start = Instant::now();
    let watch = f.watch("burner");
    create(&f.f, "drop", mover_apps(), cpu_policy()).await;
    watch.wait_only_on("node-2", Duration::from_secs(60)).await;
    // Renewals run: after two leases it is still there.
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(
        f.hosts("burner"),
        ["node-2"],
        "{}\n{}",
        f.tail("node-1"),
        f.tail("node-2")
    );
    // Cut every connection to node-2's peer port: node-2 stops the guest
    // when its lease ends, and node-1 runs it again once the lease surely
    // ended — never both at once.
    let cut = Instant::now();
    f.proxies["node-2"].cut();
    watch
        .wait_only_on("node-1", LEASE + Duration::from_secs(5))
        .await;
    assert!(f.log("node-2").contains("did not renew the guest's lease"));
    let twice = watch.longest_twice(cut);
    assert!(
        twice < Duration::from_millis(100),
        "two copies for {twice:?} after the cut"
    );
    let gap = watch.longest_nowhere();
    assert!(gap < LEASE, "down for {gap:?}");
    // The link comes back: nothing moves (the owner cools down).
    f.proxies["node-2"].restore();
    tokio::time::sleep(LEASE).await;
    watch.check(start, "node-1");
}

/// A PeerService client for member `to` that presents member `from`'s
/// certificate (the test plays that member).
pub(crate) async fn member_client(
    f: &Fleet,
    pool: &str,
    from: u32,
    to: u32,
) -> PeerServiceClient<Channel> {
    let p = get_pool(&f.m, pool).await;
    let member = |slot: u32| p.members.iter().find(|m| m.slot == slot).unwrap();
    let mut chain = edgepool_common::tls::certs_from_pem(&member(from).cert_pem, "m").unwrap();
    chain.extend(edgepool_common::tls::certs_from_pem(&p.ca_pem, "ca").unwrap());
    let key_path = f.agents[&member(from).node_id].0.dir.join("node.key");
    let key = edgepool_common::tls::read_key(&key_path).unwrap();
    let verifier = edgepool_common::tls::SpiffeServerVerifier::new(pool_roots(&p.ca_pem), |_| true);
    let config =
        edgepool_common::tls::client_config_with_verifier(verifier, Some((chain, key))).unwrap();
    let channel = edgepool_common::tls::channel(
        &member(to).peer_address,
        Arc::new(config),
        Duration::from_secs(5),
    )
    .unwrap();
    PeerServiceClient::new(channel)
}

fn offer(name: &str, home: u32, cpu: u64, offer_id: &str) -> pb::OfferRequest {
    pb::OfferRequest {
        app: Some(load(name, home, &[], true, 0)),
        usage: Some(pb::Resources {
            cpu_millis: cpu,
            ..Default::default()
        }),
        reason: "cpu".into(),
        offer_id: offer_id.into(),
        lease_ms: LEASE.as_millis() as u32,
        renew: false,
    }
}

#[tokio::test]
async fn concurrent_offers_to_one_peer_never_cross_its_high_watermark() {
    let f = FaultFleet::start(&[NodeOpts::cpu(500), NodeOpts::cpu(500), NodeOpts::cpu(500)]).await;
    // The offered apps are the pool's own (a peer runs nothing else), idle
    // at home on slots 1 and 3.
    let mut apps = vec![sleeper("i1", 1), sleeper("i2", 2), sleeper("i3", 3)];
    apps.extend(
        [("c1a", 1), ("c1b", 1), ("c3a", 3), ("c3b", 3)]
            .map(|(name, slot)| offer(name, slot, 0, "").app.expect("the offered spec")),
    );
    create(&f.f, "conc", apps, cpu_policy()).await;
    wait_running(&f.f.m, "conc").await;
    let on_node2 = |name: &str| f.hosts(name).iter().any(|n| n == "node-2");
    // Slots 1 and 3 offer node-2 (high 0.8 of 500 = 400 millicores) four
    // apps of 150 at once: no sample can measure any of them before the
    // others arrive, so only the reservations keep node-2 at or under 400.
    let mut c1 = member_client(&f.f, "conc", 1, 2).await;
    let mut c3 = member_client(&f.f, "conc", 3, 2).await;
    let (mut c1b, mut c3b) = (c1.clone(), c3.clone());
    let ids = ["a1", "a2", "a3", "a4"].map(|s| format!("{s:0>32}"));
    let (r1, r2, r3, r4) = tokio::join!(
        c1.offer(offer("c1a", 1, 150, &ids[0])),
        c1b.offer(offer("c1b", 1, 150, &ids[1])),
        c3.offer(offer("c3a", 3, 150, &ids[2])),
        c3b.offer(offer("c3b", 3, 150, &ids[3])),
    );
    let answered = Instant::now();
    let results = [("c1a", r1), ("c1b", r2), ("c3a", r3), ("c3b", r4)];
    let mut admitted = Vec::new();
    for (i, (name, r)) in results.into_iter().enumerate() {
        match r {
            Ok(a) => admitted.push((i, name, a.into_inner().pid)),
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{name}: {e}");
                assert!(e.message().contains("cpu"), "{e}");
            }
        }
    }
    assert_eq!(admitted.len(), 2, "admitted {admitted:?}");
    for name in ["c1a", "c1b", "c3a", "c3b"] {
        let admitted = admitted.iter().any(|(_, n, _)| *n == name);
        assert_eq!(on_node2(name), admitted, "{name}");
    }
    // The same offer again is the same guest: same pid, no second copy.
    let (i, name, pid) = admitted[0];
    let (client, home) = if name.starts_with("c1") {
        (&mut c1, 1)
    } else {
        (&mut c3, 3)
    };
    let again = client
        .offer(offer(name, home, 150, &ids[i]))
        .await
        .expect("repeated offer")
        .into_inner();
    assert_eq!(again.pid, pid);
    assert!(on_node2(name));
    let renewed = Instant::now();
    // A renewal under another id is not this guest's.
    let mut wrong = offer(name, home, 150, &"f".repeat(32));
    wrong.renew = true;
    let err = client.offer(wrong).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    // Nobody renews these guests: each stops when its lease ends.
    for (_, name, _) in &admitted {
        eventually(&format!("{name} to stop"), LEASE * 3, || async {
            (!on_node2(name)).then_some(())
        })
        .await;
    }
    let first_gone = answered.elapsed();
    assert!(
        first_gone >= LEASE.saturating_sub(Duration::from_millis(300)),
        "a guest stopped after {first_gone:?}, before its lease ended"
    );
    assert!(
        renewed.elapsed() <= LEASE + SLACK + Duration::from_millis(500),
        "the renewed guest outlived its lease: {:?}",
        renewed.elapsed()
    );
}

#[tokio::test]
async fn a_release_that_fails_at_first_is_retried_until_the_peer_stops_the_app() {
    let f = FaultFleet::start(&three(NodeOpts::cpu(1000).fault("fail-release=1"))).await;
    let start = Instant::now();
    let watch = f.watch("burner");
    let apps = || {
        vec![
            load("burner", 1, &["--cpu", "300"], true, 0),
            load("pad1", 1, &["--cpu", "200"], false, 5),
            sleeper("i2", 2),
            sleeper("i3", 3),
        ]
    };
    let mut p = policy("cpu", 0.8, 0.75, pb::TargetMode::Single, 1);
    p.return_home = true;
    p.return_home_seconds = 2;
    create(&f.f, "rel", apps(), p).await;
    watch.wait_only_on("node-2", Duration::from_secs(60)).await;
    // pad1 goes: the burner fits at home again and returns; node-2 refuses
    // the first Release, the owner retries, and node-2 stops its copy
    // (released, not expired).
    let mut without_pad = apps();
    without_pad.remove(1);
    f.f.m
        .tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "rel".into(),
            apps: without_pad,
        })
        .await
        .unwrap();
    watch.wait_only_on("node-1", DEADLINE).await;
    tokio::time::sleep(LEASE).await;
    watch.check(start, "node-1");
    assert!(watch.longest_nowhere() < SLACK, "the app was lost");
    let log2 = f.log("node-2");
    assert!(
        log2.contains("fault injected: refusing a release"),
        "{log2}"
    );
    assert!(log2.contains("released a guest"), "{log2}");
    assert!(
        !log2.contains("did not renew the guest's lease"),
        "the lease, not the retried release, stopped it: {log2}"
    );
    let log1 = f.log("node-1");
    assert!(log1.contains("release failed; retrying"), "{log1}");
    assert!(log1.contains("the peer released the app"), "{log1}");
    let s = f.offload_state("node-1");
    assert_eq!(s["releases"], serde_json::json!([]), "{s}");
}

#[tokio::test]
async fn an_app_removed_while_moved_out_stops_on_the_peer() {
    let f = FaultFleet::start(&three(NodeOpts::cpu(1000))).await;
    let start = Instant::now();
    let watch = f.watch("burner");
    create(&f.f, "rm", mover_apps(), cpu_policy()).await;
    watch.wait_only_on("node-2", Duration::from_secs(60)).await;
    let mut without = mover_apps();
    without.remove(0);
    f.f.m
        .tenant()
        .update_apps(pb::UpdateAppsRequest {
            pool: "rm".into(),
            apps: without,
        })
        .await
        .unwrap();
    let removed = Instant::now();
    eventually("burner to stop everywhere", LEASE + SLACK, || async {
        f.hosts("burner").is_empty().then_some(())
    })
    .await;
    assert!(f.log("node-2").contains("released a guest"));
    // And it does not come back anywhere.
    tokio::time::sleep(LEASE).await;
    assert!(f.hosts("burner").is_empty());
    assert!(!watch.ever_on("node-1", removed + Duration::from_millis(200)));
    assert!(watch.longest_twice(start) <= LEASE + SLACK);
    let s = f.offload_state("node-1");
    assert_eq!(s["moved_out"], serde_json::json!({}), "{s}");
    assert_eq!(s["releases"], serde_json::json!([]), "{s}");
}
