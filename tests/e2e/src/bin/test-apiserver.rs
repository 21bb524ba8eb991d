//! Runs the test Kubernetes API server on its own, for local trials with kubectl:
//!
//! ```sh
//! cargo run -p kedge-e2e --bin test-apiserver -- --port 6443 --kubeconfig /tmp/kedge-test.kubeconfig
//! KUBECONFIG=/tmp/kedge-test.kubeconfig kubectl get ns
//! ```
//! This is a TEST server (no authentication, simplified semantics), never a cluster.

use clap::Parser;
use kedge_e2e::apiserver::{ApiServerConfig, TestApiServer};

#[derive(Parser)]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where to write a kubeconfig for this server.
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = TestApiServer::start_on(
        std::net::SocketAddr::from(([127, 0, 0, 1], args.port)),
        ApiServerConfig::default(),
    )
    .await?;
    let kubeconfig = match args.kubeconfig {
        Some(p) => {
            std::fs::copy(server.kubeconfig_path(), &p)?;
            p
        }
        None => server.kubeconfig_path().to_owned(),
    };
    println!("kedge TEST API server (not a cluster) on {}", server.url());
    println!("kubeconfig: {}", kubeconfig.display());
    tokio::signal::ctrl_c().await?;
    Ok(())
}
