//! ListNodes pages and filters, and NodeSummary, against a real manager and
//! real agents: every node exactly once and in order, filters by state and
//! pool, bad requests refused, another tenant's nodes never shown or
//! counted; and the same through edgectl and the grpcurl examples of
//! docs/api.md.

use std::path::Path;
use std::process::Command;

use edgepool_common::proto as pb;
use edgepool_tests::*;
use pb::tenant_service_client::TenantServiceClient;
use tonic::transport::Channel;

use crate::edgectl::edgectl;
use crate::grpcurl::grpcurl;
use crate::pools::{app, create_pool, wait_running};

/// dev-1 and dev-2 run agents and form pool `demo`; dev-3..dev-6 are
/// enrolled but never connect (FREE). Tenant `other` has dev-25 and dev-45,
/// whose ids sort between ours.
struct Listing {
    tmp: TempDir,
    m: Manager,
    other: TenantServiceClient<Channel>,
    agents: Vec<(String, Proc)>,
}

const MINE: [&str; 6] = ["dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "dev-6"];

async fn listing_fleet() -> Listing {
    let tmp = TempDir::new().unwrap();
    let m = Manager::start(&tmp.path().join("m")).await;
    let mut agents = Vec::new();
    for id in MINE {
        let dir = enroll(&m, tmp.path(), id).await;
        if id == "dev-1" || id == "dev-2" {
            agents.push((id.to_string(), start_agent(&dir, &m.addr, &[])));
        }
    }
    let mut other = m.other_tenant("other");
    for id in ["dev-25", "dev-45"] {
        let token = create_token(&mut other, 600).await;
        let out = join(&m, &tmp.path().join(id), id, &token, &[]);
        assert!(out.ok, "join {id}: {}", out.stderr);
    }
    for (id, _) in &agents {
        wait_connected(&m, id).await;
    }
    let apps = vec![
        app("a", &["sleep", "100001"]),
        app("b", &["sleep", "100002"]),
    ];
    create_pool(&m, "demo", &["dev-1", "dev-2"], apps)
        .await
        .expect("CreatePool");
    wait_running(&m, "demo").await;
    Listing {
        tmp,
        m,
        other,
        agents,
    }
}

fn req(page_size: i32, state: pb::NodeState, pool: &str) -> pb::ListNodesRequest {
    pb::ListNodesRequest {
        page_size,
        page_token: String::new(),
        state: state as i32,
        pool: pool.into(),
    }
}

/// The node ids of every page of `r`.
async fn pages(c: &mut TenantServiceClient<Channel>, r: pb::ListNodesRequest) -> Vec<Vec<String>> {
    list_nodes_with(c, r)
        .await
        .expect("ListNodes")
        .into_iter()
        .map(|p| p.into_iter().map(|n| n.node_id).collect())
        .collect()
}

async fn summary(c: &mut TenantServiceClient<Channel>, pool: &str) -> pb::NodeSummaryResponse {
    c.node_summary(pb::NodeSummaryRequest { pool: pool.into() })
        .await
        .expect("NodeSummary")
        .into_inner()
}

#[tokio::test]
async fn list_nodes_pages_filters_and_counts_only_the_callers_nodes() {
    use pb::NodeState::{Free, Member, Suspect, Unspecified};
    let mut f = listing_fleet().await;
    let mut t = f.m.tenant();

    // Pages of 2: each node once, in order; only the last page has no token.
    assert_eq!(
        pages(&mut t, req(2, Unspecified, "")).await,
        [["dev-1", "dev-2"], ["dev-3", "dev-4"], ["dev-5", "dev-6"]]
    );
    assert_eq!(
        pages(&mut t, req(4, Unspecified, "")).await,
        vec![
            vec!["dev-1", "dev-2", "dev-3", "dev-4"],
            vec!["dev-5", "dev-6"]
        ]
    );
    // The default page (100) and a too large one (served as 1000) hold all.
    for size in [0, 5000] {
        assert_eq!(pages(&mut t, req(size, Unspecified, "")).await, [MINE]);
    }

    // Filters, also across pages.
    assert_eq!(
        pages(&mut t, req(0, Member, "")).await,
        [["dev-1", "dev-2"]]
    );
    assert_eq!(
        pages(&mut t, req(1, Free, "")).await,
        [["dev-3"], ["dev-4"], ["dev-5"], ["dev-6"]]
    );
    assert_eq!(
        pages(&mut t, req(1, Unspecified, "demo")).await,
        [["dev-1"], ["dev-2"]]
    );
    for (state, pool) in [(Free, "demo"), (Unspecified, "nope"), (Suspect, "")] {
        assert_eq!(
            pages(&mut t, req(0, state, pool)).await,
            [Vec::<String>::new()],
            "{state:?} {pool:?}"
        );
    }

    // The other tenant sees only its two nodes, in pages and in counts,
    // even when it is handed a page token of ours.
    let mut other = f.other.clone();
    assert_eq!(
        pages(&mut other, req(1, Unspecified, "")).await,
        [["dev-25"], ["dev-45"]]
    );
    assert_eq!(
        pages(&mut other, req(0, Unspecified, "demo")).await,
        [Vec::<String>::new()]
    );
    let first = t
        .list_nodes(req(1, Unspecified, ""))
        .await
        .unwrap()
        .into_inner();
    let mut theirs = req(0, Unspecified, "");
    theirs.page_token = first.next_page_token;
    assert_eq!(pages(&mut other, theirs).await, [["dev-25", "dev-45"]]);
    let s = summary(&mut other, "").await;
    assert_eq!((s.total, s.free, s.connected, s.member), (2, 2, 0, 0));

    // Bad requests name the field.
    let bad = [
        (req(-1, Unspecified, ""), "page_size"),
        (
            pb::ListNodesRequest {
                page_token: "not-a-token".into(),
                ..Default::default()
            },
            "page_token",
        ),
        (
            pb::ListNodesRequest {
                state: 42,
                ..Default::default()
            },
            "state",
        ),
    ];
    for (r, field) in bad {
        let err = t.list_nodes(r).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(
            err.message().starts_with(&format!("invalid {field}: ")),
            "{err}"
        );
    }

    // Counts by state, of the tenant and of one pool.
    let s = summary(&mut t, "").await;
    assert_eq!(
        (s.total, s.connected, s.free, s.member, s.suspect),
        (6, 2, 4, 2, 0)
    );
    let s = summary(&mut t, "demo").await;
    assert_eq!((s.total, s.member, s.free), (2, 2, 0));

    // A member whose agent dies is SUSPECT (there is no connected spare to
    // fail over to, so it stays one), in the filter and in the counts.
    let (id, mut proc) = f.agents.pop().expect("agent");
    assert_eq!(id, "dev-2");
    proc.kill();
    let s = eventually("dev-2 suspect", DEADLINE, || {
        let mut t = t.clone();
        async move { Some(summary(&mut t, "").await).filter(|s| s.suspect == 1) }
    })
    .await;
    assert_eq!((s.total, s.connected, s.member), (6, 1, 1));
    assert_eq!(pages(&mut t, req(0, Suspect, "")).await, [["dev-2"]]);

    // Nodes that enroll while a client pages through: one whose id sorts
    // after the cursor is on a later page, one before it on none; no node
    // is listed twice.
    let first = t
        .list_nodes(req(2, Unspecified, ""))
        .await
        .unwrap()
        .into_inner();
    for id in ["dev-0", "dev-55"] {
        enroll(&f.m, f.tmp.path(), id).await;
    }
    let mut rest = req(2, Unspecified, "");
    rest.page_token = first.next_page_token;
    let mut seen: Vec<String> = first.nodes.into_iter().map(|n| n.node_id).collect();
    seen.extend(pages(&mut t, rest).await.into_iter().flatten());
    assert_eq!(
        seen,
        [
            "dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "dev-55", "dev-6"
        ]
    );
}

/// The `$G ...` command lines of one section of docs/api.md (continuation
/// lines joined).
fn doc_examples(section: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/api.md"))
        .expect("docs/api.md");
    let heading = format!("### `{section}`");
    let body = doc
        .split_once(&heading)
        .unwrap_or_else(|| panic!("no {heading} in docs/api.md"))
        .1;
    let body = body.split("\n### ").next().unwrap_or_default();
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in body.lines().map(str::trim) {
        let cmd = match current.take() {
            Some(head) => format!("{head} {line}"),
            None if line.starts_with("$G ") => line.to_string(),
            None => continue,
        };
        match cmd.strip_suffix('\\') {
            Some(head) => current = Some(head.trim_end().to_string()),
            None => out.push(cmd),
        }
    }
    out
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
}

fn node_ids(v: &serde_json::Value) -> Vec<String> {
    v["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["nodeId"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn edgectl_and_the_documented_grpcurl_examples_page_filter_and_count() {
    let f = listing_fleet().await;

    // edgectl, with a config file as `cloud-manager dev` writes it.
    let config = f.m.dir.join("edgectl.toml");
    std::fs::write(
        &config,
        format!(
            "manager = \"{}\"\nca_cert = \"ca.pem\"\ncert = \"tenant.pem\"\nkey = \"tenant.key\"\n",
            f.m.addr
        ),
    )
    .unwrap();
    let work = f.tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let ctl = |args: &[&str]| {
        let (out, _) = edgectl(Some(&config), &work, args);
        assert!(out.ok, "edgectl {args:?}: {}", out.stderr);
        out.stdout
    };
    let table_ids = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    };

    // Pages of 2 are followed to the end: all six, in order, none of the
    // other tenant's.
    assert_eq!(table_ids(&ctl(&["node", "ls", "--page-size", "2"])), MINE);
    let v = json(&ctl(&["node", "ls", "--state", "member", "-o", "json"]));
    assert_eq!(node_ids(&v), ["dev-1", "dev-2"]);
    assert_eq!(
        table_ids(&ctl(&["node", "ls", "--state", "FREE", "--page-size", "1"])),
        ["dev-3", "dev-4", "dev-5", "dev-6"]
    );
    assert_eq!(
        table_ids(&ctl(&["node", "ls", "--pool", "demo"])),
        ["dev-1", "dev-2"]
    );
    let out = ctl(&["node", "ls", "--pool", "demo", "--state", "free"]);
    assert!(
        out.starts_with("NODE ") && table_ids(&out).is_empty(),
        "{out}"
    );

    let out = ctl(&["node", "summary"]);
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        [
            vec![
                "TOTAL",
                "CONNECTED",
                "FREE",
                "MEMBER",
                "SUSPECT",
                "FAILED",
                "FENCED"
            ],
            vec!["6", "2", "4", "2", "0", "0", "0"],
        ],
        "{out}"
    );
    let v = json(&ctl(&["node", "summary", "--pool", "demo", "-o", "json"]));
    assert_eq!(
        v,
        serde_json::json!({"total": 2, "connected": 2, "free": 0, "member": 2,
                           "suspect": 0, "failed": 0, "fenced": 0})
    );
    let (out, code) = edgectl(Some(&config), &work, &["node", "ls", "--state", "up"]);
    assert_eq!(code, Some(2), "{}", out.stderr);

    // The grpcurl examples of docs/api.md, as written (only the address
    // differs); this fleet has the node ids and pool name they use.
    let d = &f.m.dir;
    let g = format!(
        "{} -cacert {} -cert {} -key {}",
        grpcurl().display(),
        d.join("ca.pem").display(),
        d.join("tenant.pem").display(),
        d.join("tenant.key").display()
    );
    let run_doc = |cmd: &str| {
        let cmd = cmd.replace("127.0.0.1:7443", &f.m.addr.to_string());
        let out = run(Command::new("sh").args(["-c", &cmd]).env("G", &g));
        assert!(out.ok, "{cmd}: {}", out.stderr);
        json(&out.stdout)
    };
    let list = doc_examples("TenantService/ListNodes");
    assert!(list.len() >= 3, "{list:?}");
    for cmd in &list {
        let v = run_doc(cmd);
        let ids = node_ids(&v);
        if cmd.contains("\"page_token\"") {
            assert_eq!(ids, ["dev-3", "dev-4"], "{cmd}");
        } else if cmd.contains("\"page_size\": 2") {
            assert_eq!(ids, ["dev-1", "dev-2"], "{cmd}");
            // The token the next example passes back.
            assert_eq!(v["nextPageToken"], "6465762d32", "{cmd}");
        } else if cmd.contains("\"state\": \"MEMBER\"") {
            assert_eq!(ids, ["dev-1", "dev-2"], "{cmd}");
        } else {
            assert_eq!(ids, MINE, "{cmd}");
        }
    }
    let sums = doc_examples("TenantService/NodeSummary");
    assert!(!sums.is_empty());
    for cmd in &sums {
        let v = run_doc(cmd);
        let want = if cmd.contains("demo") {
            serde_json::json!({"total": 2, "connected": 2, "member": 2})
        } else {
            serde_json::json!({"total": 6, "connected": 2, "free": 4, "member": 2})
        };
        assert_eq!(v, want, "{cmd}");
    }
}
