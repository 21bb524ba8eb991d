//! Compiles the CRI v1 API (client side only), the gRPC health service (client for edged's
//! gRPC probes, server for their tests) and KubeEdge's device management interface (DMI, both
//! sides) with a vendored `protoc`, so building needs no system package.
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
    // DMI: edgecore serves DeviceManagerService and calls mappers' DeviceMapperService (and
    // tests play the mapper), so both sides are generated. `google/protobuf/any.proto` comes
    // with the vendored protoc.
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(&protoc);
    let include = protoc_bin_vendored::include_path()?;
    let include = include.to_str().ok_or("protoc include path is not UTF-8")?;
    tonic_prost_build::configure()
        .build_server(true)
        .compile_with_config(config, &["dmi/v1beta1/api.proto"], &["dmi", include])?;
    println!("cargo:rerun-if-changed=dmi");
    println!("cargo:rerun-if-changed=cri");
    println!("cargo:rerun-if-changed=grpc");
    Ok(())
}
