//! Compiles the service definitions with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // The vendored protoc, so that no system protoc is needed.
    std::env::set_var("PROTOC", protoc);
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // For gRPC server reflection (grpcurl and friends list and call without the .proto).
        .file_descriptor_set_path(out.join("indexer_descriptor.bin"))
        .compile_protos(&["indexer/v1/indexer.proto"], &["."])?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("orchestrator_descriptor.bin"))
        .compile_protos(&["orchestrator/v1/withdrawals.proto"], &["."])?;
    Ok(())
}
