//! Generates the client code of the etcd v3 API (`proto/etcd`, vendored from
//! etcd) with protox: no system protoc is needed to build the manager.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../proto/etcd");
    let fds = protox::compile(["rpc.proto"], ["../proto/etcd"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
