//! The peer gRPC server every agent runs (pool members talk to each other
//! here). For now it serves health and reflection; the TLS layer already
//! requires a client certificate from the same root CA.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = edgepool_common::grpc::reflection()?;
    let incoming = edgepool_common::tls::tls_incoming(listener, tls, shutdown.clone());
    let serve = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    };
    tokio::select! {
        r = serve => r?,
        _ = deadline => {}
    }
    Ok(())
}
