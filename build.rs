//! Compiles proto/ with protox (pure Rust), so no system protoc is needed.
//!
//! `TransferChunk.data` is `bytes::Bytes`: a received chunk is a slice of the message buffer it
//! was decoded from (no copy), hashed and written to its staging file as it is.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["proto/federation.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".federation.v1.TransferChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
