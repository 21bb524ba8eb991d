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
    /// Print a join token for `edgecore join` (creates the CA on first use). Without options it
    /// joins any number of nodes with new names until it expires.
    Token {
        /// How long the token stays valid: `90s`, `30m`, `24h`, `7d` (default:
        /// tokenRefreshDuration hours).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// The same in hours (the older flag).
        #[arg(long, value_name = "HOURS", conflicts_with = "ttl", hide = true)]
        ttl_hours: Option<u64>,
        /// The only node name this token may join.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// How many joins the token allows (counted in a Secret in cloudcore's namespace).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        uses: Option<u32>,
    },
    /// Manage a node's ownership record (who may be that node).
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeAction {
    /// Revoke the node's certificates: its session closes within seconds and it cannot
    /// connect, rotate or be joined again until `cloudcore node reset`.
    Revoke {
        name: String,
        /// Why (kept in the record).
        #[arg(long, default_value = "revoked by an administrator")]
        reason: String,
    },
    /// Release the name for re-provisioning: its certificates stop working and the next
    /// `edgecore join` with a valid token claims it. (Deleting the Node does the same.)
    Reset { name: String },
}

/// `90s`, `30m`, `24h`, `7d`, or a bare number of seconds. (Four units do not need a crate.)
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90s, 30m, 24h or 7d"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: unit must be s, m, h or d")),
    };
    let total = n
        .checked_mul(secs)
        .filter(|t| *t > 0)
        .ok_or_else(|| format!("`{s}` must be more than zero and less than a few billion years"))?;
    Ok(Duration::from_secs(total))
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
        Some(Command::Token {
            ttl,
            ttl_hours,
            node,
            uses,
        }) => {
            let cfg = load_config(&cli)?;
            let ttl = ttl.unwrap_or_else(|| {
                let hours = ttl_hours.unwrap_or(cfg.modules.cloud_hub.token_refresh_duration);
                Duration::from_secs(hours.saturating_mul(3600))
            });
            if let Some(n) = node {
                kedge_common::resource::validate_node_name(n).map_err(|r| {
                    anyhow::anyhow!("--node `{n}` is not a valid node name: it {r}")
                })?;
            }
            let runtime = runtime()?;
            let token =
                runtime.block_on(crate::daemon::issue_token(&cfg, ttl, node.clone(), *uses))?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Node { action }) => {
            let cfg = load_config(&cli)?;
            logging::init(cli.log_format, "warn")?;
            runtime()?.block_on(crate::daemon::node_action(&cfg, action))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_the_four_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        for bad in ["", "h", "0s", "1w", "-1h", "1.5h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
