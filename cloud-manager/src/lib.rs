//! The edgepool cloud manager: certificate authority, enrollment, the
//! per-agent streams and the tenant API. See ARCHITECTURE.md for the map.
#![forbid(unsafe_code)]

pub mod ca;
pub mod chain;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod deadlines;
pub mod dev;
pub mod dev_replicas;
pub mod enrollment;
pub mod etcd;
pub mod etcd_store;
pub mod events;
pub mod failover;
pub mod forward;
#[doc(hidden)]
pub mod fuzzing;
pub mod live;
pub mod liveness;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod node_key;
pub mod node_list;
pub mod node_state;
pub mod nodes;
pub mod partition;
pub mod pool;
pub mod pools;
pub mod rate_limit;
pub mod registry;
pub mod resources;
pub mod revocations;
pub mod scrape;
pub mod sealing;
pub mod server;
pub mod store;
pub mod streams;
pub mod table;
pub mod writer;

mod agent_api;
mod api;
mod auth;
mod convert;
mod errors;
mod random;
