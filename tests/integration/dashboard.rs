//! The web dashboard and `edgectl top`: a real manager and real agents, a
//! real browser (headless chromium over the DevTools protocol) that sees a
//! crashed member's failover appear without a reload, and the dashboard's
//! authentication: no session, forged, expired and wrong-kind tokens are
//! 401, another tenant's session sees nothing of this tenant, and a
//! non-loopback address without TLS is refused at start.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use edgepool_common::proto as pb;
use edgepool_tests::browser::Browser;
use edgepool_tests::*;

use crate::edgectl::edgectl;
use crate::pools::{Fleet, app, create_pool, wait_running};

/// A plain HTTP/1.1 answer: status, head (lower-cased) and body.
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn parse(raw: &[u8]) -> Answer {
        let text = String::from_utf8_lossy(raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
        }
    }

    /// The session cookie a login answer sets (`edgepool_session=...`).
    fn session_cookie(&self) -> String {
        self.head
            .lines()
            .find_map(|l| l.strip_prefix("set-cookie: "))
            .and_then(|c| c.split(';').next())
            .unwrap_or_else(|| panic!("no cookie set:\n{}", self.head))
            .to_string()
    }
}

/// `GET path` on `base` (`http://HOST:PORT`) with an optional cookie;
/// reads until the server closes or `read_for` passes (event streams).
fn get(base: &str, path: &str, cookie: Option<&str>, read_for: Duration) -> Answer {
    let host = base.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).expect("connect to the dashboard");
    s.set_read_timeout(Some(read_for)).unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    // A server that closes at once (plain HTTP sent to the TLS port) may
    // break the pipe before the request is written: that reads as no answer.
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{cookie}\r\n"
    );
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    Answer::parse(&raw)
}

const QUICK: Duration = Duration::from_secs(10);

/// The path and query of a login URL (`http://HOST:PORT/login?token=...`).
fn path_of(url: &str) -> String {
    let rest = url.split("://").nth(1).expect("scheme");
    format!("/{}", rest.split_once('/').expect("path").1)
}

async fn login_url(
    client: &mut pb::tenant_service_client::TenantServiceClient<tonic::transport::Channel>,
    ttl: u32,
) -> String {
    client
        .create_dashboard_login(pb::CreateDashboardLoginRequest { ttl_seconds: ttl })
        .await
        .expect("CreateDashboardLogin")
        .into_inner()
        .url
}

/// Numbers for app command lines that no other run of this test shares.
fn unique_base() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    1_000_000 + u64::from(std::process::id()) * 1000 + nanos % 1000
}

#[tokio::test]
async fn the_dashboard_in_a_real_browser_shows_nodes_pools_and_a_failover_live() {
    let mut f = Fleet::start(4, &[]).await;
    let base = unique_base();
    let apps: Vec<pb::AppSpec> = (0..3u32)
        .map(|i| {
            let mut a = app(
                &format!("web{i}"),
                &["sleep", &format!("{}", base + u64::from(i))],
            );
            a.slot = Some(i + 1);
            a
        })
        .collect();
    create_pool(&f.m, "live", &["node-1", "node-2", "node-3"], apps)
        .await
        .unwrap();
    wait_running(&f.m, "live").await;
    let url = login_url(&mut f.m.tenant(), 120).await;

    let mut b = Browser::start(f.tmp.path());
    b.navigate(&url);
    let text = b.wait_text("nodes, the pool and its events", DEADLINE, |t| {
        ["node-1", "node-2", "node-3", "node-4"]
            .iter()
            .all(|n| t.contains(n))
            && t.contains("pool live")
            && t.contains("MEMBER")
            && t.contains("FREE")
            && t.contains("POOL_CREATED")
            && t.contains("APP_STARTED")
    });
    assert!(text.contains("tenant default"), "{text}");
    assert!(!text.contains("FAILOVER_DONE"), "{text}");
    // A mark in the page: still there after the failover means no reload.
    b.eval("window.edgepoolMark = 42");

    // Crash member node-2 (SIGKILL to the agent's whole session).
    let (_, mut agent2) = f.agents.remove("node-2").unwrap();
    agent2.kill();
    b.wait_text("the failover, live", Duration::from_secs(60), |t| {
        t.contains("FAILOVER_STARTED") && t.contains("FAILOVER_DONE")
    });
    let pools = b.eval("document.getElementById('pools').innerText");
    let pools = pools.as_str().unwrap_or_default();
    let slot2 = pools
        .lines()
        .find(|l| l.starts_with("2\t"))
        .unwrap_or_else(|| panic!("no slot 2 row:\n{pools}"));
    assert!(
        slot2.contains("node-4"),
        "slot 2 did not move to node-4: {slot2}"
    );
    assert_eq!(
        b.eval("window.edgepoolMark"),
        serde_json::json!(42),
        "the page was reloaded"
    );
    b.wait_text("node-2 failed", QUICK, |t| t.contains("FAILED"));

    let shot = bin_dir()
        .join("dashboard-screenshots")
        .join("dashboard-failover.png");
    b.screenshot(&shot);
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.len() > 10_000 && png.starts_with(b"\x89PNG"),
        "{}",
        shot.display()
    );
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test]
async fn the_dashboard_admits_only_its_tenants_sessions_and_edgectl_top_orders_by_usage() {
    let f = Fleet::start(3, &[]).await;
    let base = unique_base();
    let apps: Vec<pb::AppSpec> = (0..3u32)
        .map(|i| {
            app(
                &format!("a{i}"),
                &["sleep", &format!("{}", base + u64::from(i))],
            )
        })
        .collect();
    create_pool(&f.m, "tp", &["node-1", "node-2"], apps)
        .await
        .unwrap();
    wait_running(&f.m, "tp").await;
    let dash = f.m.dashboard_url().await;
    assert!(dash.starts_with("http://127.0.0.1:"), "{dash}");

    // edgectl with a config next to the credentials.
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
    let ctl = |args: &[&str]| edgectl(Some(&config), &work, args);

    // `edgectl dashboard` prints a link that logs in.
    let (out, _) = ctl(&["dashboard"]);
    assert!(out.ok, "{}", out.stderr);
    let link = out.stdout.trim().to_string();
    assert!(link.starts_with(&format!("{dash}/login?token=")), "{link}");
    let login = get(&dash, &path_of(&link), None, QUICK);
    assert_eq!(login.status, 303, "{}", login.body);
    assert!(
        login.head.contains("httponly") && login.head.contains("samesite=strict"),
        "{}",
        login.head
    );
    let cookie = login.session_cookie();
    let state = get(&dash, "/api/state", Some(&cookie), QUICK);
    assert_eq!(state.status, 200, "{}", state.body);
    let v: serde_json::Value = serde_json::from_str(&state.body).expect("state JSON");
    assert_eq!(v["tenant"], "default");
    let ids: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"]);
    assert_eq!(v["pools"][0]["name"], "tp");
    assert_eq!(v["pools"][0]["members"][1]["node"], "node-2");
    let events = get(&dash, "/api/events", Some(&cookie), Duration::from_secs(2));
    assert_eq!(events.status, 200);
    assert!(
        events.head.contains("text/event-stream") && events.body.contains("POOL_CREATED"),
        "{}",
        events.body
    );

    // No session, junk, a forged one (another tenant under the same MAC),
    // a login token used as a session: 401, on both data endpoints.
    let forged = cookie.replacen(".default.", ".other.", 1);
    let login_token = format!("edgepool_session={}", link.split("token=").nth(1).unwrap());
    for (what, c) in [
        ("no cookie", None),
        ("junk", Some("edgepool_session=hello")),
        ("forged", Some(forged.as_str())),
        ("login token as session", Some(login_token.as_str())),
    ] {
        for path in ["/api/state", "/api/events"] {
            let a = get(&dash, path, c, QUICK);
            assert_eq!(a.status, 401, "{what} {path}: {}", a.body);
            assert!(a.body.contains("not logged in"), "{what}: {}", a.body);
        }
    }
    // A login link that expired, and a forged one.
    let short = login_url(&mut f.m.tenant(), 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = get(&dash, &path_of(&short), None, QUICK);
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("expired"), "{}", a.body);
    let a = get(
        &dash,
        &path_of(&link.replacen(".default.", ".other.", 1)),
        None,
        QUICK,
    );
    assert_eq!(a.status, 401, "{}", a.body);
    let too_long =
        f.m.tenant()
            .create_dashboard_login(pb::CreateDashboardLoginRequest { ttl_seconds: 3601 })
            .await
            .unwrap_err();
    assert_eq!(too_long.code(), tonic::Code::InvalidArgument);

    // Another tenant's session sees none of this tenant's nodes, pools or
    // events.
    let other_link = login_url(&mut f.m.other_tenant("other"), 60).await;
    let other = get(&dash, &path_of(&other_link), None, QUICK).session_cookie();
    let state = get(&dash, "/api/state", Some(&other), QUICK);
    assert_eq!(state.status, 200);
    let v: serde_json::Value = serde_json::from_str(&state.body).unwrap();
    assert_eq!(v["tenant"], "other");
    assert_eq!(v["nodes"], serde_json::json!([]));
    assert_eq!(v["pools"], serde_json::json!([]));
    let events = get(&dash, "/api/events", Some(&other), Duration::from_secs(2));
    assert_eq!(events.status, 200);
    for secret in ["node-1", "tp", "POOL_CREATED"] {
        assert!(!events.body.contains(secret), "{secret}: {}", events.body);
    }

    // `edgectl top --once`: every node and app, busiest first.
    let (out, _) = ctl(&["top", "--once"]);
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout.contains("3 nodes (3 connected), 3 apps"),
        "{}",
        out.stdout
    );
    for name in ["node-1", "node-2", "node-3", "a0", "a1", "a2"] {
        assert!(out.stdout.contains(name), "{name}:\n{}", out.stdout);
    }
    assert!(
        out.stdout.contains("NODE ") && out.stdout.contains("APP "),
        "{}",
        out.stdout
    );
    let (out, _) = ctl(&["top", "--once", "-o", "json"]);
    assert!(out.ok, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("top JSON");
    let cpu: Vec<f64> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["cpuPercent"].as_f64().unwrap())
        .collect();
    assert_eq!(cpu.len(), 3);
    assert!(cpu.windows(2).all(|w| w[0] >= w[1]), "{cpu:?}");
    let apps = v["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 3);
    let app_cpu: Vec<u64> = apps
        .iter()
        .map(|a| a["usage"]["cpuMillis"].as_u64().unwrap())
        .collect();
    assert!(app_cpu.windows(2).all(|w| w[0] >= w[1]), "{app_cpu:?}");
    assert!(
        apps.iter()
            .all(|a| a["pool"] == "tp" && a["state"] == "APP_STATE_RUNNING"),
        "{apps:?}"
    );
}

#[tokio::test]
async fn a_dashboard_off_loopback_needs_tls_and_is_served_over_it() {
    let tmp = TempDir::new().unwrap();
    // Refused at start, before anything is written.
    let data = tmp.path().join("refused");
    let out = run(Command::new(bin("cloud-manager"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "0.0.0.0:0",
            "--data-dir",
        ])
        .arg(&data));
    assert!(!out.ok);
    assert!(
        out.stderr.contains("http_listen")
            && out.stderr.contains("not a loopback address")
            && out.stderr.contains("http_tls"),
        "{}",
        out.stderr
    );
    assert!(!data.exists(), "wrote {} before refusing", data.display());

    // With TLS (on loopback here: the tests listen on loopback only), the
    // dashboard is HTTPS with the manager's certificate, cookie `Secure`.
    let m = Manager::start_on(
        &tmp.path().join("m"),
        "127.0.0.1:0".parse().unwrap(),
        &["--http-listen", "127.0.0.1:0", "--http-tls", "true"],
    )
    .await;
    let url = m.dashboard_url().await;
    let addr = url.strip_prefix("https://").expect("https").to_string();
    let roots =
        edgepool_common::tls::roots(&edgepool_common::tls::read_certs(&m.ca()).unwrap()).unwrap();
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let https_get = |path: &str| -> Answer {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(tls.clone(), name).unwrap();
        let tcp = TcpStream::connect(&addr).unwrap();
        tcp.set_read_timeout(Some(QUICK)).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        Answer::parse(&raw)
    };
    assert_eq!(https_get("/api/state").status, 401);
    let link = login_url(&mut m.tenant(), 60).await;
    assert!(link.starts_with(&format!("{url}/login?token=")), "{link}");
    let login = https_get(&path_of(&link));
    assert_eq!(login.status, 303, "{}", login.body);
    assert!(login.head.contains("; secure"), "{}", login.head);
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = get(&format!("http://{addr}"), "/api/state", None, QUICK);
    assert_eq!(plain.status, 0, "{}", plain.head);
}
