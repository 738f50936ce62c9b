//! `Manager`: the components of the manager, wired together. It holds no
//! state and no operation of its own: the transport (`api`, `agent_api`),
//! `server` and `dev` reach each component through it, e.g.
//! `manager.pools().create_pool(..)`.
//!
//! Who uses whom (no component knows the ones to its left):
//!
//! ```text
//!   Enrollment ──> Streams ──> Failover ──> Pools ──> Control
//! ```
//!
//! Enrollment and Streams use Pools directly too, and every component,
//! like `Nodes` (the node listings), uses `Control`.
//!
//! `Control` is the shared core (config, CA, durable registry and its
//! writer, events, live nodes). `Pools` and `Failover` share the failure
//! detector's `Watchlist` (pushing an assignment arms it), made here.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ca::Ca;
use crate::config::ManagerConfig;
use crate::control::{Control, ManagerError};
use crate::deadlines::Watchlist;
use crate::enrollment::Enrollment;
use crate::failover::Failover;
use crate::nodes::Nodes;
use crate::pools::Pools;
use crate::store::Store;
use crate::streams::Streams;

pub struct Manager {
    control: Arc<Control>,
    nodes: Nodes,
    pools: Arc<Pools>,
    failover: Arc<Failover>,
    streams: Arc<Streams>,
    enrollment: Enrollment,
}

impl Manager {
    /// Loads the registry from `store`, starts its writer and builds the
    /// components. Their workers start with `start`.
    pub fn new(config: ManagerConfig, ca: Ca, store: Box<dyn Store>) -> Result<Self, ManagerError> {
        let control = Arc::new(Control::new(config, ca, store)?);
        let watchlist = Arc::new(Watchlist::default());
        let pools = Arc::new(Pools::new(control.clone(), watchlist.clone()));
        let failover = Arc::new(Failover::new(control.clone(), pools.clone(), watchlist));
        let streams = Arc::new(Streams::new(
            control.clone(),
            pools.clone(),
            failover.clone(),
        ));
        let enrollment = Enrollment::new(control.clone(), pools.clone(), streams.clone());
        Ok(Manager {
            nodes: Nodes::new(control.clone()),
            control,
            pools,
            failover,
            streams,
            enrollment,
        })
    }

    /// Starts the components' workers on `tracker` (the member-certificate
    /// renewals of `Pools`, the failure detector of `Failover`), until
    /// `shutdown` fires.
    pub fn start(&self, tracker: &TaskTracker, shutdown: &CancellationToken) {
        self.pools.start(tracker, shutdown.clone());
        self.failover.start(tracker, shutdown.clone());
    }

    pub fn config(&self) -> &ManagerConfig {
        self.control.config()
    }

    pub fn trust_domain(&self) -> &str {
        self.control.trust_domain()
    }

    /// The shared core: configuration and the events (`watch_events`).
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Node listings and lookups of the tenant API.
    pub fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    /// Join tokens, enrollment, node authorization.
    pub fn enrollment(&self) -> &Enrollment {
        &self.enrollment
    }

    /// Agents' streams: open, close, app reports.
    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// Pools, assignments, app reports' effects, certificate renewals.
    pub fn pools(&self) -> &Pools {
        &self.pools
    }

    /// Liveness reports, peer checks, fencing, the failure detector.
    pub fn failover(&self) -> &Failover {
        &self.failover
    }
}
