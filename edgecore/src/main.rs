//! edgecore: the edge daemon: keeps the cloud link, stores what the node holds, runs its pods and devices.
#![forbid(unsafe_code)]

mod cli;
mod daemon;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before any thread starts (see the module's docs for why and what it saves).
    edgecore::memory::use_one_arena();
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!(
                "edgecore: {}",
                kedge_common::process::error_chain(e.as_ref())
            );
            ExitCode::FAILURE
        }
    }
}
