//! Integration tests: real daemons, real TLS, real processes.

mod auth;
mod cli;
mod dev;
mod enrollment;
mod grpcurl;
mod stream;
