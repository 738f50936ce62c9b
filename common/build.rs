//! Generates the gRPC code for `proto/edge/v1` with protox (no system protoc)
//! and writes the encoded descriptor set that server reflection serves.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto");
    let files = [
        "edge/v1/types.proto",
        "edge/v1/tenant.proto",
        "edge/v1/agent.proto",
        "edge/v1/peer.proto",
    ];
    let fds = protox::compile(files, ["../proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("edge_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // AgentService has an RPC named Connect; the generated `connect`
        // constructor would clash with it, and we build channels ourselves
        // (custom rustls connector) anyway.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
