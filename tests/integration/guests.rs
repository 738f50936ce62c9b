//! A pool member cannot make another member run anything but the pool's own
//! apps: a peer admits an `Offer` only for an app of the pool's catalog (the
//! manager's, in every member's assignment) that belongs to the caller's
//! slot, with exactly the catalog's spec; a guest is never replaced by
//! another offer; one member's guests are bounded; and an app's declared
//! resources count even when the caller states a usage of 0. The test plays
//! a hostile member with that member's real certificate and key, against
//! real agents, and watches the process table: no process with a hostile
//! argv ever starts.

use std::time::{Duration, Instant};

use edgepool_common::proto as pb;
use edgepool_tests::*;

use crate::offload::{create, load, policy, sleeper};
use crate::offload_faults::{FaultFleet, NodeOpts, member_client};
use crate::pools::wait_running;

/// Long enough for the whole test: nobody renews these guests.
const TEST_LEASE_MS: u32 = 120_000;

fn offer(app: pb::AppSpec, offer_id: u8, renew: bool) -> pb::OfferRequest {
    pb::OfferRequest {
        app: Some(app),
        usage: Some(pb::Resources::default()),
        reason: "cpu".into(),
        offer_id: format!("{offer_id:032x}"),
        lease_ms: TEST_LEASE_MS,
        renew,
    }
}

/// The pool's apps: idle `edgepool-load`s, `big` declaring 900 millicores.
fn apps() -> Vec<pb::AppSpec> {
    let mut big = load("big", 1, &[], true, 0);
    big.resources = Some(pb::Resources {
        cpu_millis: 900,
        ..Default::default()
    });
    // t1 carries a memory limit, which a host applies to it as a guest.
    let mut t1 = load("t1", 1, &[], true, 0);
    t1.limits = Some(pb::Resources {
        memory_mb: 200,
        ..Default::default()
    });
    vec![
        t1,
        load("t1b", 1, &[], true, 0),
        load("t1c", 1, &[], true, 0),
        big,
        sleeper("t2", 2),
        load("t3", 3, &[], true, 0),
    ]
}

fn find(name: &str) -> pb::AppSpec {
    apps().into_iter().find(|a| a.name == name).unwrap()
}

/// `t1` as a hostile member would rewrite it: another program line.
fn t1_with_argv() -> pb::AppSpec {
    let mut a = find("t1");
    a.command = vec![
        bin("edgepool-load").display().to_string(),
        "--tag".into(),
        "evil".into(),
    ];
    a
}

#[tokio::test]
async fn a_member_makes_a_peer_run_only_the_pools_apps_of_its_own_slot() {
    // node-2 takes at most 2 guests from one member.
    let f = FaultFleet::start(&[
        NodeOpts::cpu(1000),
        NodeOpts::cpu(1000).arg("--max-guests-per-member", "2"),
        NodeOpts::cpu(1000),
    ])
    .await;
    let start = Instant::now();
    let evil = f.watch("evil");
    let t1_watch = f.watch("t1");
    let t1c_watch = f.watch("t1c");
    create(
        &f.f,
        "trust",
        apps(),
        policy("cpu", 0.8, 0.5, pb::TargetMode::Single, 1),
    )
    .await;
    wait_running(&f.f.m, "trust").await;
    // The test plays member 1 (and member 3) towards member 2.
    let mut c1 = member_client(&f.f, "trust", 1, 2).await;
    let mut c3 = member_client(&f.f, "trust", 3, 2).await;
    let denied = |r: Result<tonic::Response<pb::OfferResponse>, tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e}");
        e.message().to_string()
    };

    // An app the pool does not have.
    let mut intruder = t1_with_argv();
    intruder.name = "intruder".into();
    intruder.slot = Some(1);
    let msg = denied(
        c1.offer(offer(intruder, 1, false)).await,
        "not in the catalog",
    );
    assert!(
        msg.contains("\"intruder\" is not in the pool's catalog"),
        "{msg}"
    );
    // A pool app with another argv.
    let msg = denied(c1.offer(offer(t1_with_argv(), 2, false)).await, "argv");
    assert!(msg.contains("\"t1\": the offered spec differs"), "{msg}");
    // A pool app with another environment.
    let mut env = find("t1");
    env.env.insert("LD_PRELOAD".into(), "/tmp/evil.so".into());
    let msg = denied(c1.offer(offer(env.clone(), 3, false)).await, "env");
    assert!(msg.contains("\"t1\""), "{msg}");
    // Another member's app, exactly as the pool has it.
    let msg = denied(c1.offer(offer(find("t3"), 4, false)).await, "slot 3's app");
    assert!(msg.contains("belongs to slot 3"), "{msg}");
    // Stating a usage of 0 does not slip in an app that declares 900 of
    // node-2's 1000 millicores (high 0.8).
    let e = c1.offer(offer(find("big"), 5, false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("cpu"), "{e}");
    assert!(
        !t1_watch.ever_on("node-2", start),
        "a refused offer ran t1 on node-2"
    );

    // Positive control: member 1 offers its own t1, exactly the pool's.
    let pid = c1
        .offer(offer(find("t1"), 10, false))
        .await
        .expect("t1 admitted")
        .into_inner()
        .pid;
    assert!(f.hosts("t1").iter().any(|n| n == "node-2"));
    // The guest runs under the pool's limit for t1, as at home.
    assert_eq!(
        cgroup_memory_limit(pid),
        Some(200 << 20),
        "t1's guest is not held to its memory limit"
    );

    // The guest cannot be replaced: not by another offer of its owner...
    let e = c1.offer(offer(find("t1"), 11, false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e}");
    assert!(e.message().contains("t1"), "{e}");
    // ...nor by another member...
    let msg = denied(
        c3.offer(offer(find("t1"), 12, false)).await,
        "slot 3 offers t1",
    );
    assert!(msg.contains("belongs to slot 1"), "{msg}");
    // ...nor with another spec under its own offer id, offered or renewed.
    denied(
        c1.offer(offer(t1_with_argv(), 10, false)).await,
        "same id, argv",
    );
    denied(
        c1.offer(offer(t1_with_argv(), 10, true)).await,
        "renew, argv",
    );
    denied(c1.offer(offer(env, 10, true)).await, "renew, env");
    // Its exact renewal and its exact repetition still answer, same process.
    let renewed = c1
        .offer(offer(find("t1"), 10, true))
        .await
        .expect("renewal");
    assert_eq!(renewed.into_inner().pid, pid);
    let again = c1
        .offer(offer(find("t1"), 10, false))
        .await
        .expect("repeat");
    assert_eq!(again.into_inner().pid, pid);

    // At most 2 guests from one member on node-2.
    c1.offer(offer(find("t1b"), 20, false))
        .await
        .expect("second guest");
    let e = c1.offer(offer(find("t1c"), 21, false)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("already has 2 guests"), "{e}");

    // Let the sampler look a little longer: nothing hostile ever ran.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!evil.ever_ran(), "a process with the hostile argv ran");
    assert!(
        !t1c_watch.ever_on("node-2", start),
        "the guest over the bound ran"
    );
    assert_eq!(
        f.hosts("t1").iter().filter(|n| *n == "node-2").count(),
        1,
        "t1 runs once on node-2"
    );
    // The host logs every refusal with its reason.
    let log = f.log("node-2");
    for reason in [
        "is not in the pool's catalog",
        "the offered spec differs",
        "belongs to slot 3",
        "already has 2 guests",
    ] {
        assert!(log.contains(reason), "node-2 did not log {reason:?}");
    }
}
