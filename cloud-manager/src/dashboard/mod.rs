//! The manager's web dashboard (`http_listen`, default 127.0.0.1:7480): one
//! static page (`page.html`, embedded) and three endpoints it calls, all
//! read-only and scoped to one tenant:
//!
//! - `GET /login?token=T`: a login link's token (minted by
//!   `TenantService.CreateDashboardLogin`, i.e. `edgectl dashboard`) is
//!   exchanged for a session cookie (HttpOnly, SameSite=Strict, 12 h), then
//!   a redirect to `/`;
//! - `GET /api/state`: the tenant's nodes and pools as JSON, read from the
//!   committed registry and the live-node table (`Nodes`, `Pools`), the
//!   same read paths as `ListNodes` and `ListPools`: no lock of its own;
//! - `GET /api/events`: the tenant's events as Server-Sent Events, from the
//!   kept ones on (or after `Last-Event-ID`), then live (`Control::
//!   watch_events`, as `WatchEvents`).
//!
//! Every `/api` request must carry a session cookie for a tenant, and sees
//! only that tenant's records; no cookie, a forged or an expired one is 401.
//! The tokens are in `session`. A non-loopback address is refused unless
//! the dashboard is served over TLS (`http_tls`, the manager's own server
//! certificate): the link and the cookie are credentials (see
//! `config::check_http_listen`).

pub mod session;
mod view;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::events::WatchFrom;
use crate::manager::Manager;
use crate::model::now_ms;
use session::{Keys, Kind};

/// A login link's lifetime when the request does not say (seconds).
pub const LOGIN_TTL_DEFAULT_SECONDS: u32 = 120;
/// The longest lifetime a login link may ask for (seconds).
pub const LOGIN_TTL_MAX_SECONDS: u32 = 3600;
/// How long a session (the cookie) lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The session cookie's name.
pub const COOKIE: &str = "edgepool_session";
/// The page: HTML, CSS and JS in one file, no build step.
const PAGE: &str = include_str!("page.html");

/// Mints login links for the tenant API (`CreateDashboardLogin`).
pub struct Links {
    keys: Keys,
    /// `http://HOST:PORT` or `https://HOST:PORT`.
    base_url: String,
}

impl Links {
    /// A login link for `tenant`, valid for `ttl_seconds` (0: the default);
    /// with its expiry (Unix ms).
    pub fn login_url(&self, tenant: &str, ttl_seconds: u32) -> Result<(String, u64), String> {
        let ttl = match ttl_seconds {
            0 => LOGIN_TTL_DEFAULT_SECONDS,
            t if t > LOGIN_TTL_MAX_SECONDS => {
                return Err(format!("at most {LOGIN_TTL_MAX_SECONDS} seconds"));
            }
            t => t,
        };
        let expires = now_ms() + u64::from(ttl) * 1000;
        Ok((self.url_until(tenant, expires), expires))
    }

    /// A login link for `tenant` valid until `expires_ms` (`dev` makes one
    /// that lasts as long as it runs).
    pub fn url_until(&self, tenant: &str, expires_ms: u64) -> String {
        let token = self.keys.mint(Kind::Login, tenant, expires_ms);
        format!("{}/login?token={token}", self.base_url)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

/// The dashboard's listener, bound by `server::build` (a taken port fails
/// before anything is written) and served by `run`.
pub struct Dashboard {
    listener: TcpListener,
    local_addr: SocketAddr,
    tls: Option<Arc<rustls::ServerConfig>>,
    links: Arc<Links>,
}

impl Dashboard {
    /// Binds `addr`. `public_host` names the manager in links when `addr`
    /// is a wildcard address.
    pub fn bind(addr: SocketAddr, tls: bool, public_host: &str) -> std::io::Result<Dashboard> {
        let listener = edgepool_common::tls::listen(addr)?;
        let local_addr = listener.local_addr()?;
        let host = if local_addr.ip().is_unspecified() {
            format!("{public_host}:{}", local_addr.port())
        } else {
            local_addr.to_string()
        };
        let scheme = if tls { "https" } else { "http" };
        Ok(Dashboard {
            listener,
            local_addr,
            tls: None,
            links: Arc::new(Links {
                keys: Keys::random(),
                base_url: format!("{scheme}://{host}"),
            }),
        })
    }

    /// Serves over TLS with this certificate (`http_tls`).
    pub fn set_tls(
        &mut self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        self.tls = Some(Arc::new(config));
        Ok(())
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn links(&self) -> Arc<Links> {
        self.links.clone()
    }

    /// Serves until `shutdown`; open event streams end at once then.
    pub async fn run(self, manager: Arc<Manager>, shutdown: CancellationToken) {
        let secure = self.tls.is_some();
        let ctx = Arc::new(Ctx {
            manager,
            keys: self.links.clone(),
            secure,
            shutdown: shutdown.clone(),
        });
        let app = router(ctx);
        // (No `addr=` field: tools read the gRPC address from the first one.)
        tracing::info!(http = %self.local_addr, url = %self.links.base_url, "dashboard serving");
        let served = match self.tls {
            None => {
                axum::serve(self.listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
            Some(tls) => {
                let listener = tls_listener::TlsListener::start(self.listener, tls, &shutdown);
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
            }
        };
        if let Err(e) = served {
            tracing::warn!(error = %e, "dashboard server stopped");
        }
    }
}

mod tls_listener;

/// What the handlers share.
struct Ctx {
    manager: Arc<Manager>,
    keys: Arc<Links>,
    /// Served over TLS: the cookie is `Secure`.
    secure: bool,
    shutdown: CancellationToken,
}

fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route("/api/state", get(state))
        .route("/api/events", get(events))
        .with_state(ctx)
}

/// Headers of every answer: nothing cached, no referrer (a login link's
/// token must not leak), no framing.
fn guarded(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}

async fn index() -> Response {
    let mut r =
        guarded(([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response());
    // The page's script and style are inline; it loads nothing else and
    // talks only to this origin.
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    r
}

fn unauthorized(why: &str) -> Response {
    guarded(
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!(
                "not logged in: {why}. Run `edgectl dashboard` for a login link \
                 (`cloud-manager dev` writes one to DIR/dashboard.url).\n"
            ),
        )
            .into_response(),
    )
}

async fn login(State(ctx): State<Arc<Ctx>>, RawQuery(query): RawQuery) -> Response {
    let token = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="));
    let Some(token) = token else {
        return unauthorized("the link has no token");
    };
    let claims = match ctx.keys.keys.verify(Kind::Login, token, now_ms()) {
        Ok(c) => c,
        Err(e) => return unauthorized(&format!("login link refused ({e})")),
    };
    let session_ms = SESSION_TTL.as_millis() as u64;
    let session = ctx
        .keys
        .keys
        .mint(Kind::Session, &claims.tenant, now_ms() + session_ms);
    let cookie = format!(
        "{COOKIE}={session}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        session_ms / 1000,
        if ctx.secure { "; Secure" } else { "" }
    );
    tracing::info!(tenant = %claims.tenant, "dashboard login");
    let mut r = guarded((StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response());
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            r.headers_mut().insert(header::SET_COOKIE, v);
            r
        }
        Err(_) => unauthorized("internal error"),
    }
}

/// The session's tenant and expiry, or why there is none (answered 401).
fn session(ctx: &Ctx, headers: &HeaderMap) -> Result<session::Claims, String> {
    let token = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='));
    let Some(token) = token else {
        return Err("no session".into());
    };
    ctx.keys
        .keys
        .verify(Kind::Session, token, now_ms())
        .map_err(|e| format!("session refused ({e})"))
}

async fn state(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    let claims = match session(&ctx, &headers) {
        Ok(c) => c,
        Err(why) => return unauthorized(&why),
    };
    match view::state(&ctx.manager, &claims.tenant) {
        Ok(v) => {
            guarded(([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, "dashboard state");
            guarded((StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response())
        }
    }
}

async fn events(State(ctx): State<Arc<Ctx>>, headers: HeaderMap) -> Response {
    let claims = match session(&ctx, &headers) {
        Ok(c) => c,
        Err(why) => return unauthorized(&why),
    };
    // A reconnecting browser says where it was; otherwise everything kept.
    let after = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let mut watch =
        match ctx
            .manager
            .control()
            .watch_events(&claims.tenant, "", WatchFrom::Kept { after })
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "dashboard events");
                return guarded(
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal error\n").into_response(),
                );
            }
        };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let (manager, shutdown) = (ctx.manager.clone(), ctx.shutdown.clone());
    let ends = Duration::from_millis(claims.expires_ms.saturating_sub(now_ms()));
    tokio::spawn(async move {
        let expiry = tokio::time::sleep(ends);
        tokio::pin!(expiry);
        loop {
            let next = tokio::select! {
                next = manager.control().next_event(&mut watch) => next,
                _ = shutdown.cancelled() => break,
                _ = tx.closed() => break,
                // The session ended: so does its stream (the page's
                // reconnect is then refused).
                _ = &mut expiry => break,
            };
            let Ok(Some(e)) = next else { break };
            let event = SseEvent::default()
                .id(e.seq.to_string())
                .data(view::event(&e).to_string());
            if tx.send(Ok(event)).await.is_err() {
                break;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    guarded(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}
