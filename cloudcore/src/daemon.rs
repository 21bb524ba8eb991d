//! Wiring of the cloudcore daemon: PKI, CloudHub, and (as they land) the controllers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cloudcore::cloudhub::{CloudHubOptions, HubSettings, QueueLimits, certs};
use cloudcore::cloudstream::KubeletEndpoint;
use cloudcore::cloudstream::authz::{AlwaysAllow, Authorizer, SubjectAccessReviewer};
use cloudcore::config::CloudCoreConfig;
use cloudcore::edgecontroller::EdgeControllerSettings;
use cloudcore::nodeidentity::cluster::ClusterIdentities;
use cloudcore::server::{CloudCoreOptions, LeaderElectionOptions, StreamServerOptions};
use k8s_openapi::api::core::v1::ConfigMap;
use kedge_common::wire::WireCodec;
use tokio_util::sync::CancellationToken;

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

/// A join token valid for `ttl`; bound to `node` if given; with `uses`, counted by a record in
/// cloudcore's namespace.
pub async fn issue_token(
    cfg: &CloudCoreConfig,
    ttl: Duration,
    node: Option<String>,
    uses: Option<u32>,
) -> anyhow::Result<String> {
    let pki = load_pki(cfg).await?;
    let mut claims = kedge_common::pki::JoinClaims {
        node: node.clone(),
        ..kedge_common::pki::JoinClaims::expiring_in(ttl)
    };
    if let Some(uses) = uses {
        let jti =
            kedge_common::pki::sha256_hex(&kedge_common::pki::random_secret()?)[..16].to_owned();
        let client = cloudcore::kubeclient::client(&cfg.kube_api_config).await?;
        ClusterIdentities::new(client, &cfg.modules.cloud_hub.namespace)
            .create_token_record(&jti, uses, node.as_deref())
            .await
            .with_context(|| {
                format!(
                    "creating the use count of the token in namespace {}",
                    cfg.modules.cloud_hub.namespace
                )
            })?;
        claims.jti = Some(jti);
    }
    Ok(pki.issue_token_with(&claims))
}

/// `cloudcore node revoke|reset`.
pub async fn node_action(
    cfg: &CloudCoreConfig,
    action: &crate::cli::NodeAction,
) -> anyhow::Result<()> {
    let client = cloudcore::kubeclient::client(&cfg.kube_api_config).await?;
    let ids = ClusterIdentities::new(client, &cfg.modules.cloud_hub.namespace);
    match action {
        crate::cli::NodeAction::Revoke { name, reason } => {
            ids.revoke(name, reason).await?;
            println!(
                "node {name}: certificates revoked; `cloudcore node reset {name}` allows a new join"
            );
        }
        crate::cli::NodeAction::Reset { name } => {
            if ids.reset(name).await? {
                println!(
                    "node {name}: released; the next `edgecore join` with a valid token claims it"
                );
            } else {
                println!("node {name}: no such Node; a join with a valid token creates it");
            }
        }
    }
    Ok(())
}

fn listen_addr(address: &str, port: u16) -> anyhow::Result<SocketAddr> {
    let ip: std::net::IpAddr = address
        .parse()
        .with_context(|| format!("listen address `{address}`"))?;
    Ok(SocketAddr::new(ip, port))
}

/// CloudStream's listener, client CA and authorizer, and the kubelet endpoint written into the
/// Nodes it serves.
async fn cloud_stream(
    cfg: &CloudCoreConfig,
    client: &kube::Client,
) -> anyhow::Result<(Option<StreamServerOptions>, Option<KubeletEndpoint>)> {
    let cs = &cfg.modules.cloud_stream;
    if !cs.enable {
        return Ok((None, None));
    }
    let client_ca_pem = if cs.client_ca_file.is_empty() {
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), "kube-system");
        let cm = api
            .get("extension-apiserver-authentication")
            .await
            .context("reading the cluster's client CA from kube-system/extension-apiserver-authentication \
                (set modules.cloudStream.clientCAFile, or disable modules.cloudStream)")?;
        cm.data
            .and_then(|mut d| d.remove("client-ca-file"))
            .context("kube-system/extension-apiserver-authentication has no client-ca-file")?
    } else {
        std::fs::read_to_string(&cs.client_ca_file).with_context(|| {
            format!(
                "modules.cloudStream.clientCAFile: cannot read {}",
                cs.client_ca_file
            )
        })?
    };
    let authorizer: Arc<dyn Authorizer> = match cs.authorization.as_str() {
        "AlwaysAllow" => Arc::new(AlwaysAllow),
        _ => Arc::new(SubjectAccessReviewer::new(client.clone())),
    };
    let advertise = if !cs.advertise_address.is_empty() {
        Some(cs.advertise_address.clone())
    } else if let Ok(ip) = std::env::var("POD_IP") {
        Some(ip)
    } else {
        cfg.modules
            .cloud_hub
            .advertise_address
            .iter()
            .find(|a| a.parse::<std::net::IpAddr>().is_ok())
            .cloned()
    };
    let endpoint = match advertise {
        Some(address) => Some(KubeletEndpoint {
            address,
            address_type: cs.address_type.clone(),
            port: cs.port,
        }),
        None => {
            tracing::warn!(
                "modules.cloudStream.advertiseAddress is empty and neither $POD_IP nor an IP in \
                cloudHub.advertiseAddress says where the API server reaches cloudcore: edge Nodes keep \
                their own addresses, and kubectl logs/exec reach cloudcore only if those lead here"
            );
            None
        }
    };
    let listen = StreamServerOptions {
        listen: listen_addr(&cs.address, cs.port)?,
        client_ca_pem,
        authorizer,
    };
    Ok((Some(listen), endpoint))
}

pub async fn run(cfg: CloudCoreConfig) -> anyhow::Result<()> {
    let hub_cfg = &cfg.modules.cloud_hub;
    let api_requests = Arc::new(cloudcore::kubeclient::ApiRequests::default());
    let client =
        cloudcore::kubeclient::counted_client(&cfg.kube_api_config, api_requests.clone()).await?;
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
            queue_retention: Duration::from_secs(120),
            await_ack_record: true,
            write_timeout: Duration::from_secs(hub_cfg.write_timeout),
        },
        node_cert_validity: Duration::from_secs(hub_cfg.edge_cert_signing_duration * 86_400),
        upstream_capacity: 4096,
    };
    let (stream, kubelet_endpoint) = cloud_stream(&cfg, &client).await?;
    let opts = CloudCoreOptions {
        hub,
        namespace: hub_cfg.namespace.clone(),
        edge: EdgeControllerSettings {
            node_update_frequency: Duration::from_secs(
                cfg.modules.edge_controller.node_update_frequency,
            ),
            devices: cfg.modules.device_controller.enable,
            kubelet_endpoint,
            ..EdgeControllerSettings::default()
        },
        stream,
        leader_election: cfg.modules.leader_election.enable.then(|| {
            let le = &cfg.modules.leader_election;
            LeaderElectionOptions {
                lease_name: le.lease_name.clone(),
                identity: cloudcore::leader::identity(),
                timing: cloudcore::leader::ElectionTiming {
                    lease_duration: Duration::from_secs(le.lease_duration),
                    renew_deadline: Duration::from_secs(le.renew_deadline),
                    retry_period: Duration::from_secs(le.retry_period),
                },
            }
        }),
    };
    let running = cloudcore::server::start(client, pki, opts).await?;
    tracing::info!(
        websocket = %running.websocket_addr,
        bootstrap = ?running.bootstrap_addr,
        stream = ?running.stream_addr,
        "cloudhub listening"
    );
    let observe = CancellationToken::new();
    if cfg.observability.enable {
        let addr = listen_addr(&cfg.observability.address, cfg.observability.port)?;
        let listener = cloudcore::observability::bind(addr)
            .await
            .with_context(|| format!("observability: cannot listen on {addr}"))?;
        cloudcore::observability::serve(
            listener,
            cloudcore::observability::Observed {
                stats: running.stats.clone(),
                hub: running.hub.clone(),
                api: api_requests,
            },
            observe.clone(),
        );
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    kedge_common::process::shutdown_signal().await;
    tracing::info!("shutting down");
    observe.cancel();
    running.stop().await;
    Ok(())
}
