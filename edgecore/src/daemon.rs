//! Wiring of the edgecore daemon: identity, EdgeHub, MetaManager (and, as they land, Edged and
//! DeviceTwin).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use edgecore::config::EdgeCoreConfig;
use edgecore::devicetwin::store::TwinStore;
use edgecore::devicetwin::{DeviceTwinModule, DeviceView, Dmi, LocalReport};
use edgecore::edged::cri_config::NodeSettings;
use edgecore::edged::manager::{Edged, EdgedSettings};
use edgecore::edged::node_status::NodeFacts;
use edgecore::edged::runtime::{CriRuntime, Runtime};
use edgecore::edged::tokens::TokenManager;
use edgecore::edgehub::credentials::{self, CredentialPaths, NodeCredentials};
use edgecore::edgehub::{CloudRequester, EdgeHub, EdgeHubSettings};
use edgecore::eventbus::{self, EventBusSettings, MqttMode};
use edgecore::metamanager::metaserver::{self, MetaServerSettings};
use edgecore::metamanager::sqlite::{SqliteOutbox, SqliteStore};
use kedge_common::wire::WireCodec;
use tokio_util::sync::CancellationToken;

const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30);

/// The node's name: `hostnameOverride`, else the host name.
pub fn node_name(cfg: &EdgeCoreConfig) -> anyhow::Result<String> {
    let name = if cfg.modules.edged.hostname_override.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (set modules.edged.hostnameOverride)")?
            .trim()
            .to_ascii_lowercase()
    } else {
        cfg.modules.edged.hostname_override.clone()
    };
    kedge_common::resource::validate_node_name(&name).map_err(|reason| {
        anyhow::anyhow!(
            "node name `{name}` is invalid: it {reason}; set modules.edged.hostnameOverride"
        )
    })?;
    Ok(name)
}

pub fn credential_paths(cfg: &EdgeCoreConfig) -> CredentialPaths {
    let hub = &cfg.modules.edge_hub;
    CredentialPaths {
        ca: hub.tls_ca_file.clone(),
        cert: hub.tls_cert_file.clone(),
        key: hub.tls_private_key_file.clone(),
    }
}

/// `edgecore join`: fetch CA and certificate with a token, store them.
pub async fn join(cfg: &EdgeCoreConfig, token: &str, server: &str) -> anyhow::Result<String> {
    let node = node_name(cfg)?;
    let creds = credentials::join(server, token, &node, BOOTSTRAP_TIMEOUT).await?;
    let paths = credential_paths(cfg);
    // Joining a different cloud (another CA): what the node stored came from another cluster,
    // whose resourceVersions mean nothing here, and its reports were for that cluster.
    let previous_ca = std::fs::read_to_string(&paths.ca)
        .ok()
        .and_then(|pem| kedge_common::pki::pem_to_der(&pem, "CERTIFICATE").ok());
    if previous_ca.is_some_and(|old| old != creds.ca_der) {
        let db = &cfg.database.data_source;
        let twin_db = edgecore::devicetwin::store::path_beside(db);
        for (file, suffix) in [db, &twin_db]
            .into_iter()
            .flat_map(|f| ["", "-wal", "-shm"].map(|s| (f, s)))
        {
            let mut p = file.clone().into_os_string();
            p.push(suffix);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => anyhow::bail!(
                    "cannot clear the previous cloud's database {}: {e}",
                    db.display()
                ),
            }
        }
        eprintln!(
            "joined a different cloud (new CA): cleared the previous cloud's objects and reports in {}",
            db.display()
        );
    }
    creds.save(&paths)?;
    Ok(node)
}

pub async fn run(cfg: EdgeCoreConfig) -> anyhow::Result<()> {
    let node = node_name(&cfg)?;
    let hub_cfg = &cfg.modules.edge_hub;
    let paths = credential_paths(&cfg);
    let creds = match NodeCredentials::load(&paths)? {
        Some(c) => c,
        None if !hub_cfg.token.is_empty() => {
            tracing::info!(%node, server = %hub_cfg.http_server, "no certificate yet; joining with the configured token");
            let c = credentials::join(
                &hub_cfg.http_server,
                &hub_cfg.token,
                &node,
                BOOTSTRAP_TIMEOUT,
            )
            .await?;
            c.save(&paths)?;
            c
        }
        None => anyhow::bail!(
            "no node certificate at {} and no modules.edgeHub.token: run `edgecore join --token <token>` first",
            paths.cert.display()
        ),
    };
    let creds = Arc::new(RwLock::new(creds));
    let shutdown = CancellationToken::new();

    if hub_cfg.rotate_certificates {
        tokio::spawn(rotate_when_due(
            hub_cfg.http_server.clone(),
            node.clone(),
            paths.clone(),
            creds.clone(),
            shutdown.clone(),
        ));
    }

    let mut settings = EdgeHubSettings::new(hub_cfg.websocket.server.clone(), node.clone());
    settings.project_id = hub_cfg.project_id.clone();
    settings.heartbeat = Duration::from_secs(hub_cfg.heartbeat);
    settings.read_deadline = Duration::from_secs(hub_cfg.websocket.read_deadline);
    settings.write_deadline = Duration::from_secs(hub_cfg.websocket.write_deadline);
    settings.codec = WireCodec::new(hub_cfg.max_message_bytes);
    settings.handshake_timeout = Duration::from_secs(hub_cfg.websocket.handshake_timeout);
    let db_path = &cfg.database.data_source;
    let store = SqliteStore::open(db_path).await?;
    let outbox = Arc::new(
        SqliteOutbox::new(&store)
            .await
            .with_context(|| format!("reading the outbox in {}", db_path.display()))?,
    );
    tracing::info!(database = %db_path.display(), sequence = store.seq(), "MetaManager database open");
    let mut hub = EdgeHub::new(settings, creds, Arc::new(store.clone()), outbox.clone());
    let ms = &cfg.modules.meta_manager;
    if ms.enable && ms.meta_server.enable {
        let addr = ms
            .meta_server
            .server
            .parse()
            .context("modules.metaManager.metaServer.server")?;
        let bound = metaserver::start(
            store.clone(),
            MetaServerSettings {
                addr,
                serve_secrets: ms.meta_server.serve_secrets,
                bookmark_interval: Duration::from_secs(60),
                metrics: Some(Arc::new(edgecore::observability::EdgeMetrics::new(
                    store.clone(),
                    outbox.clone(),
                    hub.link_state(),
                ))),
            },
            shutdown.clone(),
        )
        .await?;
        tracing::info!(%bound, "MetaServer listening (read-only Kubernetes API, /healthz, /metrics)");
    }
    if cfg.modules.event_bus.enable && cfg.modules.device_twin.enable {
        let (cloud_tx, cloud_rx) = tokio::sync::mpsc::channel(1024);
        match start_devicetwin(&cfg, &node, store.clone(), outbox.clone(), shutdown.clone()).await {
            Ok(module) => {
                hub = hub
                    .with_group("twin", cloud_tx.clone())
                    .with_group("user", cloud_tx);
                let (module, inbound, local) = module;
                tokio::spawn(module.run(inbound, cloud_rx, local, shutdown.clone()));
            }
            // Pods do not depend on devices: run without them, loudly.
            Err(e) => tracing::error!(error = format!("{e:#}"), "devices unavailable on this node"),
        }
    }
    if cfg.modules.edged.enable {
        // kubectl logs/exec/attach/port-forward: streams the cloud opens, served by edged.
        let (streams_tx, streams_rx) = tokio::sync::mpsc::channel(32);
        hub = hub.with_streams(streams_tx);
        tokio::spawn(run_edged(
            cfg.clone(),
            node.clone(),
            store,
            outbox,
            CloudLink {
                requester: hub.requester(),
                link: hub.link_state(),
                cloud: hub.cloud_kind(),
                streams: streams_rx,
            },
            shutdown.clone(),
        ));
    }
    let hub_task = tokio::spawn(hub.run(shutdown.clone()));
    tokio::spawn(edgecore::memory::trim_periodically(shutdown.clone()));
    tracing::info!(%node, cloud = %hub_cfg.websocket.server, "edgecore running");
    // Under systemd (Type=notify): up means the store is open and every module started; the
    // cloud link is not awaited, edgecore is useful offline.
    notify_systemd(&[sd_notify::NotifyState::Ready]);

    kedge_common::process::shutdown_signal().await;
    tracing::info!("shutting down");
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    let _ = hub_task.await;
    Ok(())
}

/// Tells systemd about a state change; a no-op when not started by systemd (no $NOTIFY_SOCKET).
fn notify_systemd(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

type TwinModule = (
    DeviceTwinModule<SqliteOutbox>,
    tokio::sync::mpsc::Receiver<edgecore::eventbus::Inbound>,
    tokio::sync::mpsc::Receiver<LocalReport>,
);

/// EventBus and DeviceTwin: the brokers, the twin database beside MetaManager's.
async fn start_devicetwin(
    cfg: &EdgeCoreConfig,
    node: &str,
    store: SqliteStore,
    outbox: Arc<SqliteOutbox>,
    shutdown: CancellationToken,
) -> anyhow::Result<TwinModule> {
    let eb = &cfg.modules.event_bus;
    let (bus, inbound) = eventbus::start(
        EventBusSettings {
            mode: MqttMode::from_config(eb.mqtt_mode),
            internal: eb.mqtt_server_internal.clone(),
            external: eb.mqtt_server_external.clone(),
            client_id: format!("edgecore-{node}"),
            subscriptions: edgecore::devicetwin::subscriptions(),
        },
        shutdown.clone(),
    )
    .await?;
    let view = Arc::new(RwLock::new(DeviceView::default()));
    let (local_tx, local_rx) = tokio::sync::mpsc::channel(256);
    let socket = cfg.modules.device_twin.dmi_sock_path.clone();
    let dmi = if socket.as_os_str().is_empty() {
        None
    } else {
        let dmi = Dmi::new(view.clone(), local_tx);
        let server = dmi.clone();
        tokio::spawn(async move {
            if let Err(e) = server.serve(socket.clone(), shutdown).await {
                tracing::error!(socket = %socket.display(), error = %e, "DMI server stopped; gRPC mappers cannot register (modules.deviceTwin.dmiSockPath)");
            }
        });
        Some(dmi)
    };
    let path = edgecore::devicetwin::store::path_beside(&cfg.database.data_source);
    let twins = TwinStore::open(&path).await?;
    tracing::info!(database = %path.display(), "DeviceTwin database open");
    Ok((
        DeviceTwinModule {
            node: node.to_owned(),
            store,
            outbox,
            twins,
            bus,
            view,
            dmi,
            user_publish: edgecore::devicetwin::UserPublish::from_config(
                cfg.modules.event_bus.mqtt_qos,
                cfg.modules.event_bus.mqtt_retain,
            ),
        },
        inbound,
        local_rx,
    ))
}

/// What edged needs of the cloud link.
struct CloudLink {
    requester: CloudRequester,
    link: tokio::sync::watch::Receiver<edgecore::edgehub::LinkState>,
    cloud: tokio::sync::watch::Receiver<edgecore::edgehub::CloudKind>,
    streams: tokio::sync::mpsc::Receiver<(
        kedge_common::stream::Stream,
        kedge_common::stream::StreamRequest,
    )>,
}

/// Edged: waits for the container runtime (retrying; edgecore is useful without it), then runs
/// pods from the local store.
async fn run_edged(
    cfg: EdgeCoreConfig,
    node: String,
    store: SqliteStore,
    outbox: Arc<SqliteOutbox>,
    cloud_link: CloudLink,
    shutdown: CancellationToken,
) {
    let CloudLink {
        requester,
        link,
        cloud,
        mut streams,
    } = cloud_link;
    let k = &cfg.modules.edged.tailored_kubelet_config;
    let endpoint = k.container_runtime_endpoint.clone();
    let socket = std::path::PathBuf::from(endpoint.trim_start_matches("unix://"));
    let mut backoff =
        kedge_common::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    let mut warned = false;
    let runtime = loop {
        match CriRuntime::connect(&socket).await {
            Ok(rt) => break rt,
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "container runtime not reachable; pods wait for it (modules.edged.tailoredKubeletConfig.containerRuntimeEndpoint)");
                    warned = true;
                }
            }
        }
        let retry = tokio::time::sleep(backoff.next_delay());
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = &mut retry => break,
                // kubectl logs/exec meanwhile get a clear answer, not a hang.
                Some((stream, request)) = streams.recv() => {
                    tokio::spawn(edgecore::edged::streaming::refuse(
                        stream,
                        503,
                        format!("the container runtime at {endpoint} is not reachable on this node"),
                    ));
                    tracing::debug!(target = %request.target, "stream refused: no container runtime");
                }
            }
        }
    };
    let runtime = Arc::new(runtime);
    tokio::spawn(
        edgecore::edged::streaming::StreamServer::new(runtime.clone())
            .run(streams, shutdown.clone()),
    );
    let (runtime_name, runtime_version) = match runtime.version().await {
        Ok(v) => (v.runtime_name, v.runtime_version),
        Err(_) => ("unknown".to_owned(), String::new()),
    };
    tracing::info!(runtime = %runtime_name, version = %runtime_version, %endpoint, "edged connected to the container runtime");
    tokio::spawn(edgecore::edged::image_gc::run(
        runtime.clone(),
        edgecore::edged::image_gc::ImageGcPolicy {
            high_threshold_percent: k.image_gc_high_threshold_percent,
            low_threshold_percent: k.image_gc_low_threshold_percent,
            min_age: Duration::from_secs(k.image_minimum_gc_age),
        },
        edgecore::edged::image_gc::IMAGE_GC_PERIOD,
        shutdown.clone(),
    ));
    let host_ip = edgecore::edged::node::host_ip();
    let image_fs = match runtime.image_fs_info().await {
        Ok(fs) => fs
            .into_iter()
            .find_map(|f| f.fs_id.map(|id| std::path::PathBuf::from(id.mountpoint))),
        Err(e) => {
            tracing::warn!(error = %e, "the runtime does not say where its images are; DiskPressure watches edged's root directory only");
            None
        }
    };
    let facts = NodeFacts {
        labels: cfg.modules.edged.node_labels.clone(),
        max_pods: k.max_pods,
        signals: edgecore::edged::pressure::NodeSignals::new(
            Some(k.root_directory.clone()),
            image_fs,
        ),
        ..NodeFacts::gather(&node, &host_ip, &runtime_name, &runtime_version)
    };
    // With KubeEdge's cloudcore the edge registers its Node and renews its Lease itself.
    tokio::spawn(edgecore::edged::kubeedge_node::run(
        facts.clone(),
        requester.clone(),
        link.clone(),
        cloud.clone(),
        edgecore::edged::kubeedge_node::Timing {
            status_every: Duration::from_secs(k.node_status_update_frequency.max(1)),
            ..Default::default()
        },
        shutdown.clone(),
    ));
    // KubeEdge's cloudcore pushes no ConfigMap or Secret a pod needs until the edge asks.
    tokio::spawn(edgecore::edged::kubeedge_objects::run(
        store.clone(),
        requester.clone(),
        link.clone(),
        cloud.clone(),
        Duration::from_secs(2),
        shutdown.clone(),
    ));
    tokio::spawn(edgecore::edged::node_status::report(
        facts,
        outbox.clone(),
        Duration::from_secs(k.node_status_update_frequency.max(1)),
        link,
        cloud,
        shutdown.clone(),
    ));
    let settings = EdgedSettings {
        node: NodeSettings {
            node_name: node,
            resolv_conf: std::fs::read_to_string(&k.resolv_conf).unwrap_or_else(|e| {
                tracing::warn!(path = %k.resolv_conf.display(), error = %e, "cannot read resolv.conf; pods get no DNS servers from the node");
                String::new()
            }),
            cluster_dns: k.cluster_dns.clone(),
            cluster_domain: k.cluster_domain.clone(),
            cgroup_root: k.cgroup_root.clone(),
            pod_log_root: k.pod_logs_dir.clone(),
            root_dir: k.root_directory.clone(),
            node_memory_bytes: edgecore::edged::node::memory_bytes(),
        },
        host_ip,
        resync: Duration::from_secs(1),
    };
    let tokens = TokenManager::new(requester, settings.node.root_dir.clone());
    Edged::new(runtime, store, outbox, settings)
        .with_tokens(Arc::new(tokens))
        .run(shutdown)
        .await;
}

async fn rotate_when_due(
    server: String,
    node: String,
    paths: CredentialPaths,
    creds: Arc<RwLock<NodeCredentials>>,
    shutdown: CancellationToken,
) {
    let mut backoff =
        kedge_common::backoff::Backoff::new(Duration::from_secs(10), Duration::from_secs(3600));
    loop {
        let current = creds.read().unwrap_or_else(|p| p.into_inner()).clone();
        let until = current.seconds_until_rotation().unwrap_or(0);
        let wait = if until > 0 {
            // Check again then, or within the hour (the clock may jump).
            Duration::from_secs((until as u64).min(3600))
        } else {
            match credentials::rotate(&server, &current, &node, BOOTSTRAP_TIMEOUT).await {
                Ok(fresh) => match fresh.save(&paths) {
                    Ok(()) => {
                        tracing::info!(%node, "node certificate rotated");
                        *creds.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                        backoff.reset();
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot store the rotated certificate");
                        backoff.next_delay()
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "certificate rotation failed; will retry");
                    backoff.next_delay()
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
