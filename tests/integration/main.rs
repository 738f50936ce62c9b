//! Integration tests: real daemons, real TLS, real processes.

mod auth;
mod cli;
mod dev;
mod edgectl;
mod enrollment;
mod failover;
mod grpcurl;
mod offload;
mod peers;
mod pools;
mod stream;
