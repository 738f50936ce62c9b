//! Integration tests: real daemons, real TLS, real processes.

mod api_docs;
mod auth;
mod cli;
mod dev;
mod docs;
mod edgectl;
mod enrollment;
mod failover;
mod grpcurl;
mod install;
mod offload;
mod packaging;
mod peers;
mod pools;
mod stream;
