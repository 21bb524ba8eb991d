//! Compiles the CRI v1 API (client side only) and the gRPC health service (client for edged's
//! gRPC probes, server for their tests) with a vendored `protoc`, so building needs no system
//! package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &["cri/v1/api.proto"], &["cri"])?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .build_server(true)
        .compile_with_config(config, &["grpc/health/v1/health.proto"], &["grpc"])?;
    println!("cargo:rerun-if-changed=cri");
    println!("cargo:rerun-if-changed=grpc");
    Ok(())
}
