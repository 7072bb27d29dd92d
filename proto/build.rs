//! Compiles `modelcache/v1/*.proto` (the node's `ModelCache` and `Admin`, the agent daemon's `Agent`) with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "modelcache/v1/cache.proto",
        "modelcache/v1/agent.proto",
        "modelcache/v1/admin.proto",
    ];
    let fds = protox::compile(protos, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("modelcache_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .bytes(".modelcache.v1.Chunk.data")
        .compile_fds(fds)?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
