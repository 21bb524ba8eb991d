//! Wiring of the cloudcore daemon: PKI, CloudHub, and (as they land) the controllers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cloudcore::cloudhub::{CloudHubOptions, HubSettings, QueueLimits, certs};
use cloudcore::config::CloudCoreConfig;
use cloudcore::edgecontroller::EdgeControllerSettings;
use cloudcore::server::CloudCoreOptions;
use kedge_common::wire::WireCodec;

/// Loads (or creates) the CA, server certificate and token secret where the config says.
pub async fn load_pki(cfg: &CloudCoreConfig) -> anyhow::Result<certs::CloudPki> {
    let hub = &cfg.modules.cloud_hub;
    let sans = certs::server_sans(&hub.advertise_address);
    if hub.cert_dir.is_empty() {
        let client = cloudcore::kubeclient::client(&cfg.kube_api_config).await?;
        Ok(certs::load_or_create_in_secrets(client, &hub.namespace, &sans).await?)
    } else {
        Ok(certs::load_or_create_in_dir(
            std::path::Path::new(&hub.cert_dir),
            &sans,
        )?)
    }
}

fn listen_addr(address: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let ip: std::net::IpAddr = address
        .parse()
        .with_context(|| format!("listen address `{address}`"))?;
    Ok(SocketAddr::new(ip, port))
}

pub async fn run(cfg: CloudCoreConfig) -> anyhow::Result<()> {
    let hub_cfg = &cfg.modules.cloud_hub;
    let client = cloudcore::kubeclient::client(&cfg.kube_api_config).await?;
    let pki = Arc::new(load_pki(&cfg).await?);
    tracing::info!(ca_hash = %pki.ca.cert_hash(), "PKI ready");
    let hub = CloudHubOptions {
        websocket_addr: listen_addr(&hub_cfg.websocket.address, hub_cfg.websocket.port)?,
        bootstrap_addr: if hub_cfg.https.enable {
            Some(listen_addr(&hub_cfg.https.address, hub_cfg.https.port)?)
        } else {
            None
        },
        settings: HubSettings {
            keepalive_timeout: Duration::from_secs(hub_cfg.keepalive_interval),
            node_limit: hub_cfg.node_limit as usize,
            codec: WireCodec::new(hub_cfg.max_message_bytes),
            queue: QueueLimits::default(),
            handshake_timeout: Duration::from_secs(10),
        },
        node_cert_validity: Duration::from_secs(hub_cfg.edge_cert_signing_duration * 86_400),
        upstream_capacity: 4096,
    };
    let opts = CloudCoreOptions {
        hub,
        namespace: hub_cfg.namespace.clone(),
        edge: EdgeControllerSettings {
            node_update_frequency: Duration::from_secs(
                cfg.modules.edge_controller.node_update_frequency,
            ),
            devices: cfg.modules.device_controller.enable,
            ..EdgeControllerSettings::default()
        },
    };
    let running = cloudcore::server::start(client, pki, opts).await?;
    tracing::info!(
        websocket = %running.websocket_addr,
        bootstrap = ?running.bootstrap_addr,
        "cloudhub listening"
    );
    kedge_common::process::shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}
