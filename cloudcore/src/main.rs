//! cloudcore: attaches to a Kubernetes cluster and serves edge nodes over the cloud–edge link.
#![forbid(unsafe_code)]

mod cli;
mod crds;
mod daemon;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "cloudcore: {}",
                kedge_common::process::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
