//! Compiles the service definitions with the vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // The vendored protoc, so that no system protoc is needed.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(&["indexer/v1/indexer.proto"], &["."])?;
    Ok(())
}
