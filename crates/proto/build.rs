//! Compiles `proto/propd/v1/*.proto` without `protoc`: `protox` parses the
//! files into descriptors and `tonic-prost-build` generates the Rust code.
//! Service code is generated only with the `transport` feature, so pure
//! crates can use the messages without tonic. The encoded descriptor set is
//! written beside the code for gRPC server reflection.

use std::path::PathBuf;

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "property.proto",
        "gossip.proto",
        "repair.proto",
        "admin.proto",
    ]
    .map(|file| root.join("propd/v1").join(file));
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let descriptors = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(
        out_dir.join("propd_descriptor_set.bin"),
        descriptors.encode_to_vec(),
    )?;
    let transport = std::env::var_os("CARGO_FEATURE_TRANSPORT").is_some();
    tonic_prost_build::configure()
        .build_server(transport)
        .build_client(transport)
        .build_transport(transport)
        .compile_fds(descriptors)?;
    Ok(())
}
