//! Shared by `cloud-manager` and `edge-agent`: the generated wire types,
//! identity and TLS helpers, logging and small file helpers. No daemon logic.
#![forbid(unsafe_code)]

pub mod catalog;
pub mod fsutil;
pub mod gate;
pub mod grpc;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod tls;
pub mod trust;

/// Generated code for package `edge.v1` (from `proto/edge/v1`).
pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("edge.v1");

    /// Encoded `FileDescriptorSet` of every `edge.v1` file (and its imports),
    /// served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/edge_v1_descriptor.bin"));
}

/// Version string both daemons report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
