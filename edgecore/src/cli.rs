//! Command line of edgecore.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kedge_common::logging::{self, LogFormat};

use edgecore::config::{DEFAULT_CONFIG_YAML, EdgeCoreConfig};

const DEFAULT_CONFIG_PATH: &str = "/etc/kedge/edgecore.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "edgecore",
    version,
    about = "kedge edgecore: runs an edge node's pods and devices, online or offline",
    long_about = None
)]
pub struct Cli {
    /// Configuration file. If not given, /etc/kedge/edgecore.yaml is read when it exists,
    /// otherwise the built-in defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the complete default configuration (with comments) and exit.
    #[arg(long)]
    pub defaultconfig: bool,

    /// Log line format. The filter comes from RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a configuration file and print it with all defaults filled in.
    CheckConfig,
    /// Join a cluster: fetch the CA and a node certificate from cloudcore using a join token
    /// (from `cloudcore token`), and store them where the configuration says.
    Join {
        /// The join token.
        #[arg(long)]
        token: String,
        /// cloudcore's bootstrap address, host or host:port (default: modules.edgeHub.httpServer).
        #[arg(long, value_name = "HOST[:PORT]")]
        cloud: Option<String>,
    },
}

fn load_config(cli: &Cli) -> anyhow::Result<EdgeCoreConfig> {
    Ok(match &cli.config {
        Some(path) => EdgeCoreConfig::load(path)?,
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            EdgeCoreConfig::load(Path::new(DEFAULT_CONFIG_PATH))?
        }
        None => EdgeCoreConfig::default(),
    })
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.defaultconfig {
        print!("{DEFAULT_CONFIG_YAML}");
        return Ok(ExitCode::SUCCESS);
    }
    match &cli.command {
        Some(Command::CheckConfig) => {
            let cfg = load_config(&cli)?;
            print!(
                "{}",
                serde_yaml::to_string(&cfg).context("rendering configuration")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Join { token, cloud }) => {
            // Without a config file yet, join writes one (once) naming the cloud it joined.
            let path = cli
                .config
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
            let write_config = !path.exists();
            let cfg = if write_config {
                EdgeCoreConfig::default()
            } else {
                EdgeCoreConfig::load(&path)?
            };
            let server = match cloud {
                None => cfg.modules.edge_hub.http_server.clone(),
                Some(c) if c.contains(':') && !c.starts_with('[') => format!("https://{c}"),
                Some(c) => format!("https://{c}:10002"),
            };
            let node = runtime()?.block_on(crate::daemon::join(&cfg, token, &server))?;
            println!(
                "node {node} joined via {server}; certificate stored at {}",
                cfg.modules.edge_hub.tls_cert_file.display()
            );
            if write_config {
                write_new_file(
                    &path,
                    edgecore::config::joined_config(&server, &node).as_bytes(),
                )
                .with_context(|| format!("writing the configuration {}", path.display()))?;
                println!(
                    "configuration written to {} (edgecore never rewrites it)",
                    path.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let cfg = load_config(&cli)?;
            // The embedded broker logs every connection at info and builds a span per publish
            // (formatting its payload): only its warnings, unless RUST_LOG asks for more.
            logging::init(cli.log_format, "info,rumqttd=warn")?;
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting edgecore");
            runtime()?.block_on(crate::daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Creates `path` (and its directory) with `contents`; refuses to replace an existing file.
fn write_new_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    kedge_common::process::small_runtime(4).context("starting the async runtime")
}
