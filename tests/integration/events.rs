//! Events are kept per tenant; a resume that asks for events no longer kept
//! ends with DATA_LOSS naming the oldest kept one; a resume inside the
//! window gets exactly the missed events; a watch ends when its client
//! goes away.

use std::path::Path;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::*;
use pb::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

/// Events kept per tenant in these tests.
const KEPT: &str = "3";

/// What a watch delivers until nothing arrives for 300 ms, and the status
/// it ended with, if it ended.
async fn watch(
    client: &mut TenantServiceClient<Channel>,
    req: pb::WatchEventsRequest,
) -> (Vec<u64>, Option<tonic::Status>) {
    let mut stream = match client.watch_events(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut seqs = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
            Err(_) | Ok(Ok(None)) => return (seqs, None),
            Ok(Ok(Some(e))) => seqs.push(e.seq),
            Ok(Err(status)) => return (seqs, Some(status)),
        }
    }
}

/// What a watch delivers when it must not fail.
async fn replay(
    client: &mut TenantServiceClient<Channel>,
    req: pb::WatchEventsRequest,
) -> Vec<u64> {
    let (seqs, end) = watch(client, req).await;
    if let Some(status) = end {
        panic!("the watch failed after {seqs:?}: {status:?}");
    }
    seqs
}

fn after(seq: u64) -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        after_seq: seq,
        ..Default::default()
    }
}

fn from_start() -> pb::WatchEventsRequest {
    pb::WatchEventsRequest {
        from_start: true,
        ..Default::default()
    }
}

/// Enrolls `node_id` into the tenant of `client` (one NODE_ENROLLED event).
async fn enroll_into(m: &Manager, client: &mut TenantServiceClient<Channel>, node_id: &str) {
    let token = create_token(client, 600).await;
    let dir = m.dir.join("nodes").join(node_id);
    let out = join(m, &dir, node_id, &token, &[]);
    assert!(out.ok, "join {node_id}: {}", out.stderr);
}

fn edgectl(m: &Manager, args: &[&str]) -> Output {
    let mut cmd = edgectl_command(&m.dir);
    let file = |name: &str| m.dir.join(name).display().to_string();
    cmd.args(["--manager", &m.addr.to_string()])
        .args(["--ca-cert", &file("ca.pem")])
        .args(["--cert", &file("tenant.pem"), "--key", &file("tenant.key")])
        .args(args);
    run(&mut cmd)
}

fn assert_data_loss(status: Option<tonic::Status>, oldest_kept: u64, resume_after: u64) {
    let status = status.expect("the watch to end with DATA_LOSS");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    let msg = status.message();
    assert!(
        msg.contains(&format!("oldest event still kept is seq {oldest_kept}"))
            && msg.contains(&format!("resume with after_seq={resume_after}")),
        "{msg}"
    );
}

#[tokio::test]
async fn events_are_kept_per_tenant_and_old_resumes_end_with_data_loss() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("m");
    let listen = "127.0.0.1:0".parse().unwrap();
    let m = Manager::start_on(&dir, listen, &["--events-per-tenant", KEPT]).await;
    let mut calm = m.other_tenant("calm");
    let mut busy = m.tenant();

    // calm: seq 1 and 2; the busy default tenant then records 3..=8 and
    // keeps only 6, 7, 8 (seq is global: calm's numbers are gaps to it).
    for n in ["calm-1", "calm-2"] {
        enroll_into(&m, &mut calm, n).await;
    }
    for i in 1..=6 {
        enroll_into(&m, &mut busy, &format!("busy-{i}")).await;
    }

    // The busy tenant pushed out only its own events.
    assert_eq!(replay(&mut calm, from_start()).await, [1, 2]);
    assert_eq!(replay(&mut busy, from_start()).await, [6, 7, 8]);
    // calm skipping seq 1 -> 2 is normal numbering, not a loss.
    assert_eq!(replay(&mut calm, after(1)).await, [2]);

    // A resume from before the window: DATA_LOSS naming the oldest kept
    // seq and the after_seq that continues from it; nothing is sent.
    let (seqs, end) = watch(&mut busy, after(4)).await;
    assert!(seqs.is_empty(), "{seqs:?}");
    assert_data_loss(end, 6, 5);
    // ... also with a pool filter (the loss is judged on the tenant).
    let (_, end) = watch(
        &mut busy,
        pb::WatchEventsRequest {
            pool: "any".into(),
            after_seq: 2,
            from_start: false,
        },
    )
    .await;
    assert_data_loss(end, 6, 5);
    // from_start with an old after_seq asks for what is kept: no loss.
    let req = pb::WatchEventsRequest {
        after_seq: 4,
        from_start: true,
        ..Default::default()
    };
    assert_eq!(replay(&mut busy, req).await, [6, 7, 8]);

    // Inside the window: exactly the missed events, then live ones, once.
    assert_eq!(replay(&mut busy, after(5)).await, [6, 7, 8]);
    let mut live = busy.watch_events(after(6)).await.unwrap().into_inner();
    enroll_into(&m, &mut busy, "busy-7").await; // seq 9: keeps 7, 8, 9
    let mut got = Vec::new();
    while let Ok(Ok(Some(e))) =
        tokio::time::timeout(Duration::from_millis(500), live.message()).await
    {
        got.push(e.seq);
    }
    assert_eq!(got, vec![7, 8, 9]);
    drop(live);

    // edgectl shows the loss and how to go on, and exits 1.
    let out = edgectl(&m, &["events", "--after", "5"]);
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr
            .contains("DataLoss: events after seq 5 are no longer kept")
            && out.stderr.contains("oldest event still kept is seq 7")
            && out.stderr.contains("`edgectl events --after 6`"),
        "{}",
        out.stderr
    );
    let out = edgectl(&m, &["events", "--after", "6", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 3, "{}", out.stdout);

    // A watch from "now" that the manager ends on shutdown names the
    // newest seq, so resuming with it misses nothing.
    let mut now = busy
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut m = m;
    m.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(DEADLINE, now.message())
        .await
        .expect("the watch to end on shutdown")
        .expect_err("UNAVAILABLE");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .contains("manager is shutting down; resume with after_seq=9"),
        "{status:?}"
    );
    assert!(m.proc.wait_exit(DEADLINE).is_some(), "manager did not stop");

    // After a restart the rings and what each tenant lost are the same.
    let addr = m.addr;
    drop(m);
    let m = Manager::start_on(&dir, addr, &["--events-per-tenant", KEPT]).await;
    let mut busy = m.tenant();
    let mut calm = m.other_tenant("calm");
    assert_data_loss(watch(&mut busy, after(5)).await.1, 7, 6);
    assert_eq!(replay(&mut busy, after(6)).await, [7, 8, 9]);
    assert_eq!(replay(&mut calm, from_start()).await, [1, 2]);
    // New events continue the numbering.
    enroll_into(&m, &mut calm, "calm-3").await;
    assert_eq!(replay(&mut calm, after(2)).await, [10]);
}

/// A watch whose events never come (a pool that does not exist) still ends
/// as soon as its client goes away, not at the next event.
#[tokio::test]
async fn a_watch_ends_when_its_client_goes_away() {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let mut client = m.tenant();
    let stream = client
        .watch_events(pb::WatchEventsRequest {
            pool: "no-such-pool".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ended(&m.proc.log, "no-such-pool"));
    drop(stream);
    drop(client);
    eventually("the watch task to end", DEADLINE, || async {
        ended(&m.proc.log, "no-such-pool").then_some(())
    })
    .await;
}

fn ended(log: &Path, pool: &str) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.contains("event watch ended")
                && l.contains(&format!("pool={pool}"))
                && l.contains("client gone")
        })
}
