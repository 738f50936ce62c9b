//! The owner's client side of `Offer`: one offer (or lease renewal) as sent
//! to a peer, sending it once or twice under the same offer id, and what a
//! failure means (refused: nothing runs there; unanswered: it may run
//! there). Offer ids are made and checked here.

use std::time::Duration;

use edgepool_common::proto as pb;

use crate::membership::Membership;
use crate::node::Shared;
use crate::offload_state::MAX_LEASE_MS;
use crate::peer_client::peer_client;
use crate::scheduler::Amounts;

/// Longest wait for a new offer's answer (the peer starts the app first).
const OFFER_TIMEOUT: Duration = Duration::from_secs(8);

/// A fresh offer id: 128 random bits as 32 lowercase hex digits.
pub fn new_offer_id() -> Result<String, String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| format!("no randomness for an offer id: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `id` has the form of an offer id (1 to 64 lowercase hex digits).
pub fn valid_offer_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One offer (or renewal) as sent to a peer.
pub struct Offer<'a> {
    pub spec: &'a pb::AppSpec,
    pub usage: Amounts,
    pub reason: &'a str,
    pub offer_id: &'a str,
    pub lease_ms: u64,
}

impl Offer<'_> {
    pub fn request(&self, renew: bool) -> pb::OfferRequest {
        pb::OfferRequest {
            app: Some(self.spec.clone()),
            usage: Some(pb::Resources {
                cpu_millis: self.usage[0],
                memory_mb: self.usage[1],
                disk_mb: self.usage[2],
                network_mbps: self.usage[3],
                disk_io_kbps: self.usage[4],
            }),
            reason: self.reason.to_string(),
            offer_id: self.offer_id.to_string(),
            lease_ms: self.lease_ms.min(MAX_LEASE_MS) as u32,
            renew,
        }
    }
}

/// How an offer failed.
#[derive(Debug)]
pub enum OfferError {
    /// The peer refused it (with this code), or it never left: nothing
    /// runs there.
    Refused(tonic::Code, String),
    /// No answer (lost, timed out, the peer went away): it may run there.
    Unanswered(String),
}

/// Whether a status proves the peer did not start the app: the refusals
/// the peer answers before starting anything.
fn refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::ResourceExhausted
            | tonic::Code::AlreadyExists
            | tonic::Code::InvalidArgument
            | tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::NotFound
            | tonic::Code::Unimplemented
    )
}

/// Offers once, and once more with the same offer id when the first try got
/// no answer (the peer answers a repeated id without starting twice).
pub async fn offer_with_retry(
    shared: &Shared,
    m: &Membership,
    slot: u32,
    offer: &Offer<'_>,
) -> Result<String, OfferError> {
    match send_offer(shared, m, slot, offer.request(false), OFFER_TIMEOUT).await {
        Err(OfferError::Unanswered(e)) => {
            tracing::info!(app = %offer.spec.name, slot, offer_id = offer.offer_id, error = %e, "no answer to the offer; repeating it");
            send_offer(shared, m, slot, offer.request(false), OFFER_TIMEOUT)
                .await
                .map(|(node, _)| node)
        }
        other => other.map(|(node, _)| node),
    }
}

/// Sends one `Offer` to the member in `slot`; answers its node id and the
/// app's pid there.
pub async fn send_offer(
    shared: &Shared,
    m: &Membership,
    slot: u32,
    req: pb::OfferRequest,
    timeout: Duration,
) -> Result<(String, u32), OfferError> {
    let peer = m.others().find(|p| p.slot == slot).ok_or_else(|| {
        OfferError::Refused(tonic::Code::FailedPrecondition, "no such peer".into())
    })?;
    let mut client = peer_client(shared, m, slot, &peer.peer_address)
        .map_err(|e| OfferError::Refused(tonic::Code::FailedPrecondition, e.to_string()))?;
    let answer = tokio::time::timeout(timeout, client.offer(req))
        .await
        .map_err(|_| OfferError::Unanswered("offer timed out".into()))?
        .map_err(|s| {
            if refusal(s.code()) {
                OfferError::Refused(s.code(), s.message().to_string())
            } else {
                OfferError::Unanswered(format!("{}: {}", s.code(), s.message()))
            }
        })?;
    Ok((peer.node_id.clone(), answer.into_inner().pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_ids_are_128_random_bits_in_hex() {
        let a = new_offer_id().unwrap();
        let b = new_offer_id().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(valid_offer_id(&a));
        assert!(!valid_offer_id(""));
        assert!(!valid_offer_id("ABC"));
        assert!(!valid_offer_id(&"a".repeat(65)));
    }
}
