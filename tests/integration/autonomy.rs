//! Edge autonomy past certificate lifetimes (issue 14): a pool whose
//! manager is black-holed for longer than its member certificates live
//! keeps working: members cut off from the manager accept each other's
//! expired certificates of the held membership (the offline grace, on both
//! sides of the handshake), an agent restarted mid-cut after its
//! certificate's expiry reaches its peers, is confirmed by them and
//! re-adopts its apps, `on_disconnect: STOP` apps never stop, and after
//! the heal the manager delivers renewed certificates with nothing
//! restarted.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::pools::{app, create_pool, get_pool, wait_running};

/// Member certificates live 20 s; the cut lasts 60 s.
const VALIDITY_SECS: &str = "20";
const CUT: Duration = Duration::from_secs(60);

fn ms(t: &Option<prost_types::Timestamp>) -> u64 {
    t.as_ref()
        .map(|t| t.seconds as u64 * 1000 + t.nanos as u64 / 1_000_000)
        .unwrap_or(0)
}

/// An app whose argv is unique to this run (`tag`), pinned to `slot`.
fn pinned(name: &str, tag: &str, slot: u32, stop: bool) -> pb::AppSpec {
    let mut a = app(name, &["sh", "-c", "sleep 1000000; :", tag]);
    a.slot = Some(slot);
    if stop {
        a.on_disconnect = pb::OnDisconnect::Stop as i32;
    }
    a
}

/// The pid running `command` if exactly one process does.
fn only(command: &str) -> Option<u32> {
    match processes_running(command).as_slice() {
        [pid] => Some(*pid as u32),
        _ => None,
    }
}

#[tokio::test]
async fn a_pool_outlives_its_certificates_and_a_reboot_while_the_cloud_is_cut() {
    let tmp = TempDir::new().unwrap();
    let tag = tmp
        .path()
        .file_name()
        .map(|n| format!("autonomy-{}", n.to_string_lossy()))
        .unwrap();
    let m = Manager::start_with_env(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &[],
        &[
            ("EDGEPOOL_MEMBER_CERT_VALIDITY_SECONDS", VALIDITY_SECS),
            ("EDGEPOOL_MEMBER_CERT_CHECK_MS", "500"),
        ],
    )
    .await;
    let proxy = Proxy::start(m.addr).await;
    let mut agents = BTreeMap::new();
    for i in 1..=3 {
        let id = format!("node-{i}");
        let dir = enroll(&m, tmp.path(), &id).await;
        let proc = start_agent(&dir, &proxy.addr, &[]);
        agents.insert(id, (dir, proc));
    }
    for id in agents.keys() {
        wait_connected(&m, id).await;
    }
    let apps = vec![
        pinned("s1", &format!("{tag}-s1"), 1, true),
        pinned("s2", &format!("{tag}-s2"), 2, true),
        pinned("s3", &format!("{tag}-s3"), 3, true),
        pinned("k3", &format!("{tag}-k3"), 3, false),
    ];
    let command = |name: &str| {
        apps.iter()
            .find(|a| a.name == name)
            .map(|a| a.command.join(" "))
            .unwrap()
    };
    create_pool(&m, "auto", &["node-1", "node-2", "node-3"], apps.clone())
        .await
        .unwrap();
    let before = wait_running(&m, "auto").await;
    let pids: BTreeMap<String, u32> = before
        .placements
        .iter()
        .map(|p| (p.app.clone(), p.pid))
        .collect();
    let serials: BTreeMap<u32, String> = before
        .members
        .iter()
        .map(|m| (m.slot, m.cert_serial.clone()))
        .collect();
    let latest_expiry = before
        .members
        .iter()
        .map(|m| ms(&m.cert_expires_at))
        .max()
        .unwrap();

    let before_cut = retained_events(&m, "auto", Duration::from_millis(300))
        .await
        .iter()
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);

    // The cloud is gone: every agent's manager link is black-holed.
    proxy.blackhole();
    let cut_at = Instant::now();
    // Watch the STOP apps of every node through the whole cut: each keeps
    // its one process, the same pid.
    let stop_apps = ["s1", "s2", "s3"];
    let check_stop_apps = |when: &str| {
        for name in stop_apps {
            assert_eq!(
                only(&command(name)),
                Some(pids[name]),
                "{name} is not running with its pid {when}"
            );
        }
    };
    // Until every member certificate has expired (plus a second).
    while now_ms() < latest_expiry + 1000 {
        check_stop_apps("before the certificates expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // node-3 reboots after its certificate expired: its agent dies (its
    // apps are left running, as after an agent crash) and k3 with it.
    let (dir3, old3) = agents.remove("node-3").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old3.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut old3 = old3;
    let _ = old3.child.wait();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids["k3"] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let new3 = start_agent(&dir3, &proxy.addr, &[]);
    // Its saved group waits for a confirmation; only a peer can give it
    // (the manager is cut off), which takes brand-new handshakes with
    // expired certificates both ways: k3 comes back, s3 is re-adopted.
    let k3 = eventually(
        "node-3 confirmed by a peer during the cut",
        DEADLINE,
        || async {
            check_stop_apps("after node-3's restart");
            only(&command("k3")).filter(|pid| *pid != pids["k3"])
        },
    )
    .await;
    assert!(
        new3.log_text()
            .contains("a peer accepted our member certificate"),
        "node-3 was not confirmed by a peer: {}",
        new3.log_text()
    );
    assert!(
        cut_at.elapsed() < CUT,
        "the test machine is too slow: node-3 was confirmed only {:?} into the cut",
        cut_at.elapsed()
    );
    // The rest of the cut: nothing stops, nothing restarts.
    while cut_at.elapsed() < CUT {
        check_stop_apps("during the cut");
        assert_eq!(
            only(&command("k3")),
            Some(k3),
            "k3 restarted during the cut"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The heal: renewed certificates and the current membership reach
    // every member, which then reach each other with them.
    proxy.restore();
    let healed_at = now_ms();
    let heal = Instant::now();
    let after = eventually("renewed certificates delivered", DEADLINE, || async {
        let p = get_pool(&m, "auto").await;
        let renewed = p.members.iter().all(|mb| {
            serials.get(&mb.slot) != Some(&mb.cert_serial) && ms(&mb.cert_expires_at) > now_ms()
        });
        if !renewed {
            return None;
        }
        for id in ["node-1", "node-2", "node-3"] {
            let n = get_node(&mut m.tenant(), id).await?;
            let reached = n.connected
                && n.peers.len() == 2
                && n.peers
                    .iter()
                    .all(|p| p.reachable && ms(&p.last_ok) > healed_at + 1000);
            if !reached {
                return None;
            }
        }
        Some(p)
    })
    .await;
    eprintln!("converged {:?} after the heal", heal.elapsed());
    // Nothing restarted: the same processes as before the cut (k3 as
    // restarted during it), each exactly once, and the manager shows them.
    check_stop_apps("after the heal");
    assert_eq!(only(&command("k3")), Some(k3));
    let shown = eventually("placements after the heal", DEADLINE, || async {
        let p = get_pool(&m, "auto").await;
        let now: BTreeMap<String, u32> = p
            .placements
            .iter()
            .map(|pl| (pl.app.clone(), pl.pid))
            .collect();
        (now.get("k3") == Some(&k3)).then_some(now)
    })
    .await;
    for name in stop_apps {
        assert_eq!(shown[name], pids[name], "{name} restarted");
    }
    assert_eq!(after.members.len(), 3);
    // The events say what happened: renewals, and k3's new process, and no
    // other app stopped or started since the cut began.
    let events = retained_events(&m, "auto", Duration::from_millis(300)).await;
    assert!(
        events
            .iter()
            .any(|e| e.kind() == pb::EventKind::CertRenewed && ms(&e.time) >= healed_at - 70_000),
        "no CERT_RENEWED: {events:?}"
    );
    let app_changes: Vec<(String, pb::EventKind)> = events
        .iter()
        .filter(|e| e.seq > before_cut)
        .filter(|e| {
            matches!(
                e.kind(),
                pb::EventKind::AppStarted | pb::EventKind::AppStopped | pb::EventKind::AppExited
            )
        })
        .map(|e| (e.app.clone(), e.kind()))
        .collect();
    assert!(
        app_changes.iter().all(|(app, _)| app == "k3"),
        "apps other than k3 stopped or started: {app_changes:?}"
    );
    assert!(
        app_changes.contains(&("k3".into(), pb::EventKind::AppStarted)),
        "k3's restart during the cut is not in the events: {app_changes:?}"
    );
    // Clean up node-3's first session (its apps were re-adopted) last.
    drop(new3);
    drop(old3);
    drop(agents);
}
