//! What both daemons' Prometheus metrics share: the plain-HTTP listener of
//! `--metrics-listen` that serves `GET /metrics` (OpenMetrics text) from a
//! registry, and the tower layer that times every gRPC call by method and
//! status code. Each daemon owns its registry and its metric families (its
//! own `metrics` module); nothing here is global.
//!
//! Recording is an atomic add (counters, gauges) or a bucket search and two
//! atomic adds (histograms); a label set's first use takes the family's
//! write lock once. Nothing on the data path waits for a scrape: a scrape
//! reads the atomics, and the derived figures (a daemon's collectors) are
//! computed from snapshots, never under the data path's locks.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body as HttpBody, Frame, SizeHint};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codegen::Bytes;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The file, in a daemon's data dir, that holds the URL of its metrics
/// while the listener is on (`http://ADDR/metrics`).
pub const URL_FILE: &str = "metrics.url";

/// The URL that scrapes a listener bound to `addr`.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

/// Binds the metrics listener (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Writes `DIR/metrics.url` with the listener's URL, or removes a stale
/// one when metrics are off (`addr` None).
pub fn write_url_file(dir: &std::path::Path, addr: Option<SocketAddr>) -> std::io::Result<()> {
    let path = dir.join(URL_FILE);
    match addr {
        Some(a) => crate::fsutil::write_public(&path, format!("{}\n", url(a)).as_bytes()),
        None => match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The registry as OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Serves `GET /metrics` from `registry` on `listener` until `shutdown`
/// fires. Any other path is 404.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                match render(&registry) {
                    Ok(text) => (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text),
                    Err(_) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain")],
                        "could not encode the metrics\n".to_string(),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds `addr` and serves the registry on a task until `shutdown`; the
/// bound address, logged. The task ends with the token (a scrape in flight
/// is not waited for by the daemon's drain).
pub async fn start(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = serve(listener, registry, shutdown).await {
            tracing::warn!(error = %e, "metrics listener stopped");
        }
    });
    tracing::info!(addr = %bound, url = %url(bound), "metrics listening");
    Ok(bound)
}

/// Labels of `edgepool_rpc_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `/package.Service/Method` of a served method, or `other`.
    pub method: String,
    /// The gRPC status code name (`OK`, `NOT_FOUND`, ...), or `UNKNOWN`
    /// when the call ended without one (the client went away).
    pub code: String,
}

/// Per-method, per-code call durations.
pub type RpcHistogram = Family<RpcLabels, Histogram, fn() -> Histogram>;

/// Buckets of call durations, 1 ms to about 16 s.
pub fn rpc_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

/// A new, empty `RpcHistogram`.
pub fn rpc_histogram() -> RpcHistogram {
    Family::new_with_constructor(rpc_buckets as fn() -> Histogram)
}

/// The method paths a server serves (from the `edge.v1` descriptor set,
/// plus health and reflection): any other path is counted as `other`, so a
/// client cannot make up label values.
pub fn known_methods() -> HashSet<String> {
    use prost::Message;
    let mut known: HashSet<String> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if let Ok(set) = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET) {
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    known.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                }
            }
        }
    }
    known
}

/// A tower layer for a tonic server: observes every call's duration (until
/// its response ends, so a streaming call counts its whole life) under its
/// method and status code.
#[derive(Clone)]
pub struct RpcLayer {
    histogram: RpcHistogram,
    known: Arc<HashSet<String>>,
}

impl RpcLayer {
    pub fn new(histogram: RpcHistogram) -> Self {
        RpcLayer {
            histogram,
            known: Arc::new(known_methods()),
        }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcTimed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTimed {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service `RpcLayer` makes.
#[derive(Clone)]
pub struct RpcTimed<S> {
    inner: S,
    layer: RpcLayer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for RpcTimed<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let method = if self.layer.known.contains(path) {
            path.to_string()
        } else {
            "other".to_string()
        };
        let timer = CallTimer {
            histogram: self.layer.histogram.clone(),
            method,
            started: Instant::now(),
            done: false,
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let mut timer = timer;
            let response = call.await?;
            // A trailers-only answer (most errors) has its status here.
            if let Some(code) = grpc_status(response.headers()) {
                timer.finish(code);
                return Ok(response);
            }
            let (parts, body) = response.into_parts();
            let body = TimedBody { inner: body, timer };
            Ok(http::Response::from_parts(
                parts,
                tonic::body::Body::new(body),
            ))
        })
    }
}

/// Times one call; observed once, when its status is known or when it is
/// dropped without one.
struct CallTimer {
    histogram: RpcHistogram,
    method: String,
    started: Instant,
    done: bool,
}

impl CallTimer {
    fn finish(&mut self, code: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        self.histogram
            .get_or_create(&RpcLabels {
                method: std::mem::take(&mut self.method),
                code: code.to_string(),
            })
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.finish("UNKNOWN");
    }
}

/// A response body that observes its call when the trailers (with
/// `grpc-status`) go out.
struct TimedBody {
    inner: tonic::body::Body,
    timer: CallTimer,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    self.timer.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.timer.finish("INTERNAL"),
            Poll::Ready(None) => self.timer.finish("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The name of the `grpc-status` in `headers`, if there is one.
fn grpc_status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let n: i32 = value.to_str().ok()?.parse().ok()?;
    Some(code_name(n))
}

/// The canonical name of a gRPC status code.
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i).copied())
        .unwrap_or("UNKNOWN")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_hold_every_edge_service() {
        let known = known_methods();
        for m in [
            "/edge.v1.TenantService/ListNodes",
            "/edge.v1.AgentService/Connect",
            "/edge.v1.PeerService/Probe",
            "/grpc.health.v1.Health/Check",
        ] {
            assert!(known.contains(m), "{m} missing");
        }
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(5), "NOT_FOUND");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(99), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
    }

    #[tokio::test]
    async fn the_listener_serves_openmetrics_text() {
        let mut registry = Registry::default();
        let h = rpc_histogram();
        registry.register("edgepool_rpc_duration_seconds", "calls", h.clone());
        h.get_or_create(&RpcLabels {
            method: "/edge.v1.TenantService/ListNodes".into(),
            code: "OK".into(),
        })
        .observe(0.002);
        let shutdown = CancellationToken::new();
        let addr = start(
            "127.0.0.1:0".parse().unwrap(),
            Arc::new(registry),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        shutdown.cancel();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("application/openmetrics-text"), "{text}");
        assert!(
            text.contains("edgepool_rpc_duration_seconds_count{method=\"/edge.v1.TenantService/ListNodes\",code=\"OK\"} 1"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("# EOF"), "{text}");
    }
}
