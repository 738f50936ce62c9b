//! Pieces every edgepool gRPC server shares.

use tokio_util::sync::CancellationToken;
use tonic_reflection::server::{v1, v1alpha};

/// gRPC metadata key of a retry hint in milliseconds, sent with
/// `RESOURCE_EXHAUSTED` (e.g. `Connect` while the manager is opening too
/// many agent streams at once). ASCII digits.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// The retry hint of `status`, if it carries one.
pub fn retry_after(status: &tonic::Status) -> Option<std::time::Duration> {
    let ms = status.metadata().get(RETRY_AFTER_MS)?.to_str().ok()?;
    ms.trim()
        .parse::<u64>()
        .ok()
        .map(std::time::Duration::from_millis)
}

/// A `RESOURCE_EXHAUSTED` status carrying `retry_after` twice: in the
/// message, for people, and as `retry-after-ms` metadata, for programs.
pub fn exhausted(what: &str, retry_after: std::time::Duration) -> tonic::Status {
    let ms = retry_after.as_millis().min(u128::from(u64::MAX)) as u64;
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(v) = tonic::metadata::MetadataValue::try_from(ms.to_string()) {
        metadata.insert(RETRY_AFTER_MS, v);
    }
    tonic::Status::with_metadata(
        tonic::Code::ResourceExhausted,
        format!("{what}; retry in {ms} ms"),
        metadata,
    )
}

/// The largest request message each service decodes (tonic's default is
/// 4 MiB for every service). A larger one is refused with OUT_OF_RANGE
/// from its length prefix, before its body is buffered.
pub mod max_request {
    /// `TenantService`: a pool of up to 1000 apps with their argv,
    /// environment and requests fits with room to spare.
    pub const TENANT: usize = 2 * 1024 * 1024;
    /// `AgentService`: `Enroll` (a CSR of at most 16 KiB) and each message
    /// of the agent's stream (an app report names at most 4096 apps).
    pub const AGENT: usize = 1024 * 1024;
    /// `PeerService`: probes, beats, and offers of one app.
    pub const PEER: usize = 256 * 1024;
    /// Health checks and reflection requests: a service or symbol name.
    pub const SMALL: usize = 16 * 1024;
}

/// The health service (and its reporter), its requests capped at
/// `max_request::SMALL`.
pub fn health() -> (
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    (
        reporter,
        server.max_decoding_message_size(max_request::SMALL),
    )
}

/// Server reflection for `edge.v1` and `grpc.health.v1`, in both protocol
/// versions: v1 for current clients, v1alpha for older grpcurl builds.
/// Requests are capped at `max_request::SMALL`.
#[allow(clippy::type_complexity)]
pub fn reflection() -> Result<
    (
        v1::ServerReflectionServer<impl v1::ServerReflection>,
        v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>,
    ),
    tonic_reflection::server::Error,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?
        .max_decoding_message_size(max_request::SMALL);
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?
        .max_decoding_message_size(max_request::SMALL);
    Ok((v1, v1alpha))
}

/// Cancels `token` on the first SIGINT or SIGTERM: the one place both
/// daemons handle signals.
pub fn cancel_on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = token.cancelled() => return,
        }
        token.cancel();
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_hint_round_trip() {
        let s = exhausted("busy", std::time::Duration::from_millis(750));
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.message(), "busy; retry in 750 ms");
        assert_eq!(retry_after(&s), Some(std::time::Duration::from_millis(750)));
        assert_eq!(retry_after(&tonic::Status::unavailable("x")), None);
    }
}
