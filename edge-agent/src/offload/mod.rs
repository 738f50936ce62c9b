//! Threshold scheduling on the node: measure the group's need, evaluate the
//! pool's policy on every sample, and move apps to peers (offload) on the
//! node's own decision, peer to peer, with or without the manager.
//!
//! State (`crate::offload_state`, held by `node::Shared` and persisted in
//! `offload.json` so a restart keeps it):
//! - `moved_out`: our group's apps that run on a peer now (not here), each
//!   with the id of its move (offer id) and when its host last confirmed it;
//! - `guests`: other members' apps we run for them, each with its owner's
//!   slot, offer id and lease;
//! - `releases`: copies a peer may still run that we asked it to stop and it
//!   has not confirmed stopping yet (retried until it does).
//!
//! The apps that run here are `(our group - moved_out) + guests`. Guests are
//! never offloaded again (no A -> B -> C chains, no ping-pong); a moved app
//! is not moved again within the cooldown; the node itself does not trigger
//! again within the cooldown after an offload.
//!
//! Offload protocol (PeerService, mutual TLS, pool members only): `Offer`
//! (spec, measured usage, a fresh random offer id, the lease) -> the peer
//! considers only the pool catalog's app of our slot with exactly the
//! catalog's spec (`Assignment.catalog`), never replaces a guest it runs,
//! bounds each member's guests, and admits only if it stays under its own
//! high watermarks (with the larger of the app's declared resources and
//! our stated usage) counting what it reserved for guests it has not
//! measured yet, records the guest and starts
//! it (admission and record in one critical section), and answers once it
//! runs -> we record it as moved out and stop our copy. No answer (lost,
//! timed out, the peer crashed) is not a refusal: we repeat the offer once
//! with the same id (the peer answers again without a second start), then
//! ask the peer to drop it (`Release`, retried until confirmed) and try the
//! next peer; our copy kept running throughout. Return home (policy flag):
//! we start our copy first, then `Release` the peer's, retried until it
//! succeeds. The peer server (`crate::peer`) answers `Offer` and `Release`
//! with `host::admit` and `host::release`; the owner's modules dial peers
//! through `crate::peer_client` and never import the server.
//!
//! Leases (the reconciliation interval, `offload_lease_ms`): every third of
//! it the owner renews each moved-out app at its host (`Offer` with `renew`,
//! the current spec) and retries pending releases. A host stops a guest
//! whose lease ran out; an owner that got no renewal through for a whole
//! lease (plus a margin) or is told the host no longer runs it runs the app
//! at home again. An app the owner's group no longer lists is released.
//! See ARCHITECTURE.md ("Threshold scheduling (offload)") for the
//! invariants.
//!
//! One module per job:
//! - `meter`: per-app usage in the scheduler's amounts, from the runtime's
//!   one measuring function (`Runtime::app_usage`);
//! - `scheduling`: the owner's loop: measure, evaluate, offer, return home;
//! - `offer`: the owner's client side of `Offer` (offer ids, retry once
//!   under the same id, refused vs unanswered);
//! - `owner`: the owner's side of the leases (renewals, take-backs,
//!   releases);
//! - `host`: the host's side (admission, release, guest leases), with
//!   `admission`, its pure rules (the pool catalog, what an app counts
//!   for, the bounds on one member's guests).
//!
//! They share state only through `node::Shared` (which holds
//! `crate::offload_state`); `scheduling` and `owner` use `offer`, and
//! `host` uses `offer` for the offer id's form.

pub mod admission;
pub mod host;
pub mod meter;
pub mod offer;
pub mod owner;
pub mod scheduling;
