//! Command line of cloudcore.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kedge_common::logging::{self, LogFormat};

use cloudcore::config::{CloudCoreConfig, DEFAULT_CONFIG_YAML};

const DEFAULT_CONFIG_PATH: &str = "/etc/kedge/cloudcore.yaml";

#[derive(Debug, Parser)]
#[command(
    name = "cloudcore",
    version,
    about = "kedge cloudcore: serves Kubernetes pods, ConfigMaps, Secrets and devices to edge nodes",
    long_about = None
)]
pub struct Cli {
    /// Configuration file. If not given, /etc/kedge/cloudcore.yaml is read when it exists,
    /// otherwise the built-in defaults apply.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the complete default configuration (with comments) and exit.
    #[arg(long)]
    pub defaultconfig: bool,

    /// Kubeconfig file; overrides kubeAPIConfig.kubeConfig.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,

    /// Log line format. The filter comes from RUST_LOG (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CustomResourceDefinitions kedge needs (Device, DeviceModel, DeviceStatus,
    /// ObjectSync, ClusterObjectSync) as YAML.
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Check a configuration file and print it with all defaults filled in.
    CheckConfig,
    /// Print a join token for `edgecore join` (creates the CA on first use).
    Token {
        /// How long the token stays valid, in hours (default: tokenRefreshDuration).
        #[arg(long, value_name = "HOURS")]
        ttl_hours: Option<u64>,
    },
}

/// Loads the config named on the command line, or the default file, or the built-in defaults.
fn load_config(cli: &Cli) -> anyhow::Result<CloudCoreConfig> {
    let mut cfg = match &cli.config {
        Some(path) => CloudCoreConfig::load(path)?,
        None if Path::new(DEFAULT_CONFIG_PATH).exists() => {
            CloudCoreConfig::load(Path::new(DEFAULT_CONFIG_PATH))?
        }
        None => CloudCoreConfig::default(),
    };
    if let Some(kc) = &cli.kubeconfig {
        cfg.kube_api_config.kube_config = kc.display().to_string();
    }
    Ok(cfg)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.defaultconfig {
        print!("{DEFAULT_CONFIG_YAML}");
        return Ok(ExitCode::SUCCESS);
    }
    match &cli.command {
        Some(Command::Crds { dir: None }) => {
            print!("{}", crate::crds::render_all()?);
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Crds { dir: Some(dir) }) => {
            crate::crds::write_dir(dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::CheckConfig) => {
            let cfg = load_config(&cli)?;
            print!(
                "{}",
                serde_yaml::to_string(&cfg).context("rendering configuration")?
            );
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Token { ttl_hours }) => {
            let cfg = load_config(&cli)?;
            let hours = ttl_hours.unwrap_or(cfg.modules.cloud_hub.token_refresh_duration);
            let runtime = runtime()?;
            let pki = runtime.block_on(crate::daemon::load_pki(&cfg))?;
            println!("{}", pki.issue_token(Duration::from_secs(hours * 3600)));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let cfg = load_config(&cli)?;
            logging::init(cli.log_format, "info")?;
            tracing::info!(version = env!("CARGO_PKG_VERSION"), "starting cloudcore");
            runtime()?.block_on(crate::daemon::run(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    kedge_common::process::runtime().context("starting the async runtime")
}
