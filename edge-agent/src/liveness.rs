//! Liveness between the members of a pool: who is heard from, and the view
//! the uplink sends to the manager (`PeerLiveness`).
//!
//! Each pair of members shares one stream (`PeerService/Beat`): the member
//! with the lower slot opens it to the member with the higher slot over a
//! kept-open mutual-TLS connection and sends a beat every
//! `peer_liveness_interval_ms` (200 ms); the other answers each beat. Every
//! beat either way is a sign of life of its sender, so both ends learn about
//! each other from one exchange per interval (half the messages of each
//! member asking every other one, which is what the agent's CPU goes on).
//!
//! `Heard` (`crate::heard`, kept in `node::Shared`) keeps, per watched
//! member (slot and certificate serial), when it was last heard from. The
//! loop publishes a member silent for `peer_suspect_ms` as unreachable; it
//! sleeps until the next member could turn silent, and is woken when the
//! membership changes or a member it may have published as silent is heard
//! again, so it does not poll.
//!
//! A frozen or cut member stops beating and answering: both ends of each of
//! its streams hear nothing. A beat that cannot be sent (the stream is
//! blocked by flow control) is skipped; a stream with no answer for
//! `STALE_BEATS` intervals is dropped with its connection and opened again,
//! so a connection that died without a reset does not hide a live member.
//!
//! The peer server (`crate::peer`) serves the answering side (`Answers`);
//! this module dials with `crate::peer_client` and never imports the
//! server.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use edgepool_common::identity::Identity;
use edgepool_common::proto as pb;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::heard::Member;
use crate::membership::Membership;
use crate::node::Shared;
use crate::peer_client::peer_client;

/// What the liveness loop publishes for the uplink: one entry per other
/// member (empty when not a member).
pub type Liveness = Arc<Vec<pb::PeerAlive>>;

/// While a member is unreachable, the view is published again this often
/// (a manager that missed it, or a new stream, still hears it).
const LIVENESS_REPEAT: Duration = Duration::from_secs(1);

/// A beat stream with no answer for this many intervals is opened again on
/// a new connection.
const STALE_BEATS: u32 = 10;

/// One other member as the loop watches it: a new certificate (ours or
/// theirs) or address means a new stream and a new task.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WatchKey {
    slot: u32,
    node_id: String,
    address: String,
    our_serial: String,
    their_serial: String,
}

impl WatchKey {
    fn member(&self) -> Member {
        (self.slot, self.their_serial.clone())
    }
}

/// Keeps the beat streams this member opens, and publishes the view on
/// `out`, until shutdown (see the module comment).
pub async fn liveness_loop(
    shared: Arc<Shared>,
    every: Duration,
    out: watch::Sender<Liveness>,
    shutdown: CancellationToken,
) {
    let heard = &shared.heard;
    let suspect_after = heard.suspect_after();
    let mut membership_changes = shared.membership_changes();
    let mut tasks: HashMap<WatchKey, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut published: Vec<(u32, String, bool)> = Vec::new();
    let mut published_at = Instant::now();
    let mut wake_at = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = heard.revived() => {}
            changed = membership_changes.changed() => {
                if changed.is_err() {
                    break;
                }
            }
        }
        let membership = shared.membership();
        let watched: Vec<WatchKey> = membership
            .as_deref()
            .map(|m| {
                m.others()
                    .map(|p| WatchKey {
                        slot: p.slot,
                        node_id: p.node_id.clone(),
                        address: p.peer_address.clone(),
                        our_serial: m.serial.clone(),
                        their_serial: p.cert_serial.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        heard.watch(&watched.iter().map(WatchKey::member).collect::<Vec<_>>());
        tasks.retain(|k, t| {
            let keep = watched.contains(k);
            if !keep {
                t.abort();
            }
            keep
        });
        if let Some(m) = &membership {
            // The lower slot of each pair opens the stream.
            for key in watched.iter().filter(|k| k.slot > m.slot) {
                if !tasks.contains_key(key) {
                    let task = beat_peer(shared.clone(), m.clone(), key.clone(), every);
                    tasks.insert(key.clone(), tokio::spawn(task));
                }
            }
        }
        let now = Instant::now();
        let view: Vec<pb::PeerAlive> = watched
            .iter()
            .map(|key| {
                let silent = heard
                    .last(&key.member())
                    .map(|t| now.saturating_duration_since(t))
                    .unwrap_or_default();
                pb::PeerAlive {
                    slot: key.slot,
                    node_id: key.node_id.clone(),
                    reachable: silent < suspect_after,
                    silent_ms: silent.as_millis() as u64,
                }
            })
            .collect();
        let state: Vec<(u32, String, bool)> = view
            .iter()
            .map(|p| (p.slot, p.node_id.clone(), p.reachable))
            .collect();
        let any_down = view.iter().any(|p| !p.reachable);
        let repeat = any_down && now.saturating_duration_since(published_at) >= LIVENESS_REPEAT;
        if state != published || repeat {
            for p in view.iter().filter(|p| !p.reachable) {
                if !published.contains(&(p.slot, p.node_id.clone(), false)) {
                    tracing::warn!(node = %p.node_id, slot = p.slot, silent_ms = p.silent_ms, "pool member does not answer");
                }
            }
            out.send_replace(Arc::new(view.clone()));
            published = state;
            published_at = now;
        }
        // Next wake-up: when the first reachable member would turn silent,
        // or the repeat while one is unreachable; at least once a repeat
        // period either way.
        wake_at = now + LIVENESS_REPEAT;
        for p in &view {
            let due = if p.reachable {
                now + (suspect_after - Duration::from_millis(p.silent_ms))
            } else {
                published_at + LIVENESS_REPEAT
            };
            wake_at = wake_at.min(due);
        }
        wake_at = wake_at.max(now + Duration::from_millis(1));
    }
    for t in tasks.values() {
        t.abort();
    }
}

/// Keeps the beat stream to one member with a higher slot: a beat every
/// `every`, each answer recorded in `shared.heard`.
async fn beat_peer(shared: Arc<Shared>, m: Arc<Membership>, key: WatchKey, every: Duration) {
    // Opening a stream takes one round trip; no answer in this long and
    // the next attempt is due.
    let open_timeout = (every * 2).max(Duration::from_millis(100));
    let stale = every * STALE_BEATS;
    let mut client = None;
    let mut seq = 0u64;
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        next = Instant::now() + every;
        if client.is_none() {
            client = peer_client(&shared, &m, key.slot, &key.address).ok();
        }
        let Some(c) = client.as_mut() else { continue };
        let (tx, rx) = mpsc::channel(4);
        seq += 1;
        let _ = tx.try_send(pb::BeatMessage { seq });
        let mut answers =
            match tokio::time::timeout(open_timeout, c.beat(ReceiverStream::new(rx))).await {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    if gone(&status) {
                        client = None;
                    } else {
                        // Refused, but by a running member process.
                        shared.heard.record(key.slot, &key.their_serial);
                    }
                    continue;
                }
                Err(_) => continue,
            };
        let mut answered = Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {
                    next += every;
                    if next <= Instant::now() {
                        next = Instant::now() + every;
                    }
                    if Instant::now().saturating_duration_since(answered) >= stale {
                        // Drop the connection too: it may be dead without
                        // anyone having said so.
                        client = None;
                        break;
                    }
                    seq += 1;
                    if let Err(mpsc::error::TrySendError::Closed(_)) =
                        tx.try_send(pb::BeatMessage { seq })
                    {
                        break;
                    }
                }
                answer = answers.message() => match answer {
                    Ok(Some(_)) => {
                        answered = Instant::now();
                        shared.heard.record(key.slot, &key.their_serial);
                    }
                    Ok(None) => break,
                    Err(status) => {
                        if gone(&status) {
                            client = None;
                        }
                        break;
                    }
                },
            }
        }
    }
}

/// The connection is gone (or never came up): make a new one.
fn gone(status: &Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown
    )
}

/// The answering side of a beat stream from the member `caller` (already
/// authorised, presenting certificate `serial`): every beat is recorded and
/// answered while the caller stays a current member.
pub struct Answers {
    shared: Arc<Shared>,
    inbound: Streaming<pb::BeatMessage>,
    caller: Identity,
    serial: String,
    slot: u32,
    done: bool,
}

impl Answers {
    pub fn new(
        shared: Arc<Shared>,
        inbound: Streaming<pb::BeatMessage>,
        caller: Identity,
        serial: String,
        slot: u32,
    ) -> Self {
        shared.heard.record(slot, &serial);
        Answers {
            shared,
            inbound,
            caller,
            serial,
            slot,
            done: false,
        }
    }
}

impl Stream for Answers {
    type Item = Result<pb::BeatMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let beat = match Pin::new(&mut self.inbound).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(beat))) => beat,
            Poll::Ready(Some(Err(_)) | None) => {
                self.done = true;
                return Poll::Ready(None);
            }
        };
        let allowed = match self.shared.membership() {
            Some(m) => m
                .authorize(&self.caller, &self.serial)
                .map_err(|e| Status::permission_denied(e.to_string())),
            None => Err(Status::permission_denied("this node is not a pool member")),
        };
        match allowed {
            Ok(_) => {
                self.shared.heard.record(self.slot, &self.serial);
                Poll::Ready(Some(Ok(pb::BeatMessage { seq: beat.seq })))
            }
            Err(status) => {
                self.done = true;
                Poll::Ready(Some(Err(status)))
            }
        }
    }
}
