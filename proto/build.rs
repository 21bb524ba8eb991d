//! Compiles the CRI v1 API (client side only) with a vendored `protoc`, so building needs no
//! system package.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_server(false)
        .compile_with_config(config, &["cri/v1/api.proto"], &["cri"])?;
    println!("cargo:rerun-if-changed=cri");
    Ok(())
}
