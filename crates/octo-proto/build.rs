//! Compiles `proto/` with protox (pure Rust, no system `protoc`) and generates
//! tonic clients and servers, plus a descriptor set for gRPC reflection.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it was compiled: cargo reuses a
    // compiled build script for a checkout elsewhere that shares the target
    // directory (path packages hash relative to their workspace).
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "octopus/tentacle/v1/session.proto",
        "octopus/tentacle/v1/capabilities.proto",
        "octopus/tentacle/v1/script.proto",
        "octopus/tentacle/v1/file.proto",
        "octopus/tentacle/v1/upgrade.proto",
        "octopus/tentacle/v1/certificates.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", root.join(f).display());
    }
    let fds = protox::compile(files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tentacle_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .bytes(".octopus.tentacle.v1.FileChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
