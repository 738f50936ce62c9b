//! The client side of the peer port: a PeerService client for one other
//! member of our pool, over mutual TLS with our member certificate, that
//! accepts only that member's certificate from the server. Used by the
//! prober and the manager's reach checks (`peer`), the beat streams
//! (`liveness`) and offers, renewals and releases (`offload`); it sits
//! below all of them and imports only the shared state and the membership.

use std::sync::Arc;
use std::time::Duration;

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use edgepool_common::tls;
use edgepool_common::trust::MemberServerVerifier;
use pb::peer_service_client::PeerServiceClient;
use tonic::transport::Channel;

use crate::membership::Membership;
use crate::node::Shared;

/// How long connecting to a peer may take; also the deadline of a probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for member `slot` of `m`'s pool, presenting our member
/// certificate and accepting only that member's certificate from the server.
pub fn peer_client(
    shared: &Shared,
    m: &Membership,
    slot: u32,
    address: &str,
) -> Result<PeerServiceClient<Channel>, tls::TlsError> {
    Ok(PeerServiceClient::new(peer_channel(
        shared, m, slot, address,
    )?))
}

/// A mutual-TLS channel to member `slot` (see `peer_client`).
fn peer_channel(
    shared: &Shared,
    m: &Membership,
    slot: u32,
    address: &str,
) -> Result<Channel, tls::TlsError> {
    let expected = Identity::Member {
        domain: m.domain.clone(),
        tenant: m.tenant.clone(),
        pool: m.pool.clone(),
        slot,
    };
    // The server must present the current certificate of exactly that
    // slot, from our pool's CA: a replaced, revoked or foreign certificate
    // fails the handshake.
    let serial = m
        .members
        .iter()
        .find(|p| p.slot == slot)
        .map(|p| p.cert_serial.clone())
        .unwrap_or_default();
    let verifier = MemberServerVerifier::new(m.check.clone(), expected, serial);
    let config =
        tls::client_config_with_verifier(verifier, Some((m.chain.clone(), shared.node_key())))?;
    tls::channel_gated(address, Arc::new(config), PROBE_TIMEOUT, shared.peer_gate())
}
