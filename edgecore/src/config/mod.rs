//! edgecore's configuration file (`/etc/kedge/edgecore.yaml`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kedge_common::config::{ConfigError, parse_yaml};
use serde::{Deserialize, Serialize};

/// The commented default configuration printed by `edgecore --defaultconfig`. A test checks
/// that it parses to exactly [`EdgeCoreConfig::default`].
pub const DEFAULT_CONFIG_YAML: &str = include_str!("defaults.yaml");

pub const API_VERSION: &str = "edgecore.config.kubeedge.io/v1alpha2";
pub const KIND: &str = "EdgeCore";
pub const DEFAULT_PROJECT_ID: &str = "e632aba927ea4ac2b575ec1603d56f10";

/// The config `edgecore join` writes when there is none yet: the cloud it joined (bootstrap
/// `https://host:port`, WebSocket on port 10000 of the same host) and the node's name; every
/// other field keeps its default. Written once; edgecore never rewrites its config.
pub fn joined_config(bootstrap: &str, node: &str) -> String {
    let host = bootstrap
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .rsplit_once(':')
        .map_or_else(
            || {
                bootstrap
                    .trim_start_matches("https://")
                    .trim_end_matches('/')
            },
            |(h, _)| h,
        );
    format!(
        "# Written by `edgecore join`: the cloud this node joined. edgecore never rewrites this\n\
         # file; edit it freely (`edgecore --defaultconfig` prints every field with its default).\n\
         apiVersion: {API_VERSION}\n\
         kind: {KIND}\n\
         modules:\n  \
           edgeHub:\n    \
             httpServer: {bootstrap}\n    \
             websocket:\n      \
               server: \"{host}:10000\"\n  \
           edged:\n    \
             hostnameOverride: {node}\n"
    )
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeCoreConfig {
    pub api_version: String,
    pub kind: String,
    pub database: DatabaseConfig,
    pub modules: Modules,
}

impl Default for EdgeCoreConfig {
    fn default() -> Self {
        EdgeCoreConfig {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            database: DatabaseConfig::default(),
            modules: Modules::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DatabaseConfig {
    pub driver_name: String,
    /// Accepted for KubeEdge configs (an ORM alias there); no effect.
    pub alias_name: String,
    pub data_source: PathBuf,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            driver_name: "sqlite3".to_owned(),
            alias_name: "default".to_owned(),
            data_source: PathBuf::from("/var/lib/kedge/edgecore.db"),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Modules {
    pub edge_hub: EdgeHubConfig,
    pub edged: EdgedConfig,
    pub meta_manager: MetaManagerConfig,
    pub event_bus: EventBusConfig,
    pub device_twin: DeviceTwinConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeHubConfig {
    pub enable: bool,
    /// Seconds between keepalives.
    pub heartbeat: u64,
    #[serde(rename = "projectID")]
    pub project_id: String,
    pub http_server: String,
    pub token: String,
    pub tls_ca_file: PathBuf,
    pub tls_cert_file: PathBuf,
    pub tls_private_key_file: PathBuf,
    pub rotate_certificates: bool,
    pub max_message_bytes: usize,
    pub websocket: WebSocketConfig,
}

impl Default for EdgeHubConfig {
    fn default() -> Self {
        EdgeHubConfig {
            enable: true,
            heartbeat: 15,
            project_id: DEFAULT_PROJECT_ID.to_owned(),
            http_server: "https://127.0.0.1:10002".to_owned(),
            token: String::new(),
            tls_ca_file: PathBuf::from("/var/lib/kedge/certs/ca.crt"),
            tls_cert_file: PathBuf::from("/var/lib/kedge/certs/edge.crt"),
            tls_private_key_file: PathBuf::from("/var/lib/kedge/certs/edge.key"),
            rotate_certificates: true,
            max_message_bytes: kedge_common::message::DEFAULT_MAX_MESSAGE_BYTES,
            websocket: WebSocketConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebSocketConfig {
    pub enable: bool,
    /// `host:port` of cloudcore's WebSocket listener.
    pub server: String,
    /// Seconds.
    pub handshake_timeout: u64,
    pub read_deadline: u64,
    pub write_deadline: u64,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            enable: true,
            server: "127.0.0.1:10000".to_owned(),
            handshake_timeout: 30,
            read_deadline: 15,
            write_deadline: 15,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgedConfig {
    pub enable: bool,
    pub hostname_override: String,
    pub node_labels: BTreeMap<String, String>,
    pub tailored_kubelet_config: TailoredKubeletConfig,
}

impl Default for EdgedConfig {
    fn default() -> Self {
        EdgedConfig {
            enable: true,
            hostname_override: String::new(),
            node_labels: BTreeMap::new(),
            tailored_kubelet_config: TailoredKubeletConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TailoredKubeletConfig {
    pub container_runtime_endpoint: String,
    pub cgroup_root: String,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    pub resolv_conf: PathBuf,
    pub pod_logs_dir: PathBuf,
    pub root_directory: PathBuf,
    /// Seconds between node status reports (also sent at once when the cloud link returns).
    pub node_status_update_frequency: u64,
    /// The node's `pods` capacity (the scheduler places no more on it).
    pub max_pods: u32,
    /// Image GC (see `edged::image_gc`): collect when the image filesystem is this full (100:
    /// never), down to the low threshold, keeping images seen for less than the minimum age
    /// (seconds).
    #[serde(rename = "imageGCHighThresholdPercent")]
    pub image_gc_high_threshold_percent: u8,
    #[serde(rename = "imageGCLowThresholdPercent")]
    pub image_gc_low_threshold_percent: u8,
    #[serde(rename = "imageMinimumGCAge")]
    pub image_minimum_gc_age: u64,
}

impl Default for TailoredKubeletConfig {
    fn default() -> Self {
        TailoredKubeletConfig {
            container_runtime_endpoint: "unix:///run/containerd/containerd.sock".to_owned(),
            cgroup_root: "/kubepods".to_owned(),
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".to_owned(),
            resolv_conf: PathBuf::from("/etc/resolv.conf"),
            pod_logs_dir: PathBuf::from("/var/log/pods"),
            root_directory: PathBuf::from("/var/lib/kedge/edged"),
            node_status_update_frequency: 10,
            max_pods: 110,
            image_gc_high_threshold_percent: 85,
            image_gc_low_threshold_percent: 80,
            image_minimum_gc_age: 120,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MetaManagerConfig {
    pub enable: bool,
    pub meta_server: MetaServerConfig,
}

impl Default for MetaManagerConfig {
    fn default() -> Self {
        MetaManagerConfig {
            enable: true,
            meta_server: MetaServerConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MetaServerConfig {
    pub enable: bool,
    /// `ip:port`; loopback by default.
    pub server: String,
    pub serve_secrets: bool,
}

impl Default for MetaServerConfig {
    fn default() -> Self {
        MetaServerConfig {
            enable: true,
            server: "127.0.0.1:10550".to_owned(),
            serve_secrets: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EventBusConfig {
    pub enable: bool,
    /// 0: embedded broker only, 1: both, 2: external broker only (KubeEdge's meaning).
    pub mqtt_mode: u8,
    pub mqtt_server_internal: String,
    pub mqtt_server_external: String,
    #[serde(rename = "mqttQOS")]
    pub mqtt_qos: u8,
    pub mqtt_retain: bool,
}

impl Default for EventBusConfig {
    fn default() -> Self {
        EventBusConfig {
            enable: true,
            mqtt_mode: 0,
            mqtt_server_internal: "tcp://127.0.0.1:1883".to_owned(),
            mqtt_server_external: "tcp://127.0.0.1:1883".to_owned(),
            mqtt_qos: 0,
            mqtt_retain: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct DeviceTwinConfig {
    pub enable: bool,
    /// The unix socket DMI mappers call (KubeEdge's default path); empty turns DMI off.
    pub dmi_sock_path: PathBuf,
}

impl Default for DeviceTwinConfig {
    fn default() -> Self {
        DeviceTwinConfig {
            enable: true,
            dmi_sock_path: PathBuf::from("/etc/kubeedge/dmi.sock"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Toggle {
    pub enable: bool,
}

impl Default for Toggle {
    fn default() -> Self {
        Toggle { enable: true }
    }
}

impl EdgeCoreConfig {
    /// Parses and validates a config file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: EdgeCoreConfig = parse_yaml(path, text)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks what the types alone cannot; each error names the field.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            message,
        };
        if self.kind != KIND {
            return Err(bad(
                "kind",
                format!("must be `{KIND}`, not `{}`", self.kind),
            ));
        }
        if self.api_version != API_VERSION {
            return Err(bad(
                "apiVersion",
                format!("must be `{API_VERSION}`, not `{}`", self.api_version),
            ));
        }
        if self.database.driver_name != "sqlite3" {
            return Err(bad(
                "database.driverName",
                format!(
                    "only `sqlite3` is supported, not `{}`",
                    self.database.driver_name
                ),
            ));
        }
        if self.database.data_source.as_os_str().is_empty() {
            return Err(bad("database.dataSource", "must not be empty".into()));
        }
        let hub = &self.modules.edge_hub;
        if hub.heartbeat == 0 {
            return Err(bad(
                "modules.edgeHub.heartbeat",
                "must be at least 1 second".into(),
            ));
        }
        for (field, seconds) in [
            (
                "modules.edgeHub.websocket.readDeadline",
                hub.websocket.read_deadline,
            ),
            (
                "modules.edgeHub.websocket.writeDeadline",
                hub.websocket.write_deadline,
            ),
        ] {
            if seconds == 0 {
                return Err(bad(field, "must be at least 1 second".into()));
            }
        }
        if hub.max_message_bytes < 1024 {
            return Err(bad(
                "modules.edgeHub.maxMessageBytes",
                "must be at least 1024 bytes".into(),
            ));
        }
        if !hub.http_server.starts_with("https://") {
            return Err(bad(
                "modules.edgeHub.httpServer",
                format!("must be an https:// URL, not `{}`", hub.http_server),
            ));
        }
        if hub.websocket.enable && !is_host_port(&hub.websocket.server) {
            return Err(bad(
                "modules.edgeHub.websocket.server",
                format!("must be host:port, not `{}`", hub.websocket.server),
            ));
        }
        let name = &self.modules.edged.hostname_override;
        if !name.is_empty()
            && let Err(reason) = kedge_common::resource::validate_node_name(name)
        {
            return Err(bad(
                "modules.edged.hostnameOverride",
                format!("`{name}` is not a valid node name: it {reason}"),
            ));
        }
        let k = &self.modules.edged.tailored_kubelet_config;
        if k.max_pods == 0 {
            return Err(bad(
                "modules.edged.tailoredKubeletConfig.maxPods",
                "must be at least 1".into(),
            ));
        }
        if k.image_gc_high_threshold_percent > 100 {
            return Err(bad(
                "modules.edged.tailoredKubeletConfig.imageGCHighThresholdPercent",
                format!(
                    "must be 0-100 (100: no image GC), not {}",
                    k.image_gc_high_threshold_percent
                ),
            ));
        }
        if k.image_gc_low_threshold_percent >= k.image_gc_high_threshold_percent {
            return Err(bad(
                "modules.edged.tailoredKubeletConfig.imageGCLowThresholdPercent",
                format!(
                    "must be below imageGCHighThresholdPercent ({}), not {}",
                    k.image_gc_high_threshold_percent, k.image_gc_low_threshold_percent
                ),
            ));
        }
        for (key, value) in &self.modules.edged.node_labels {
            if let Err(reason) = kedge_common::labels::validate(key, value) {
                return Err(bad("modules.edged.nodeLabels", reason));
            }
            if !kedge_common::labels::node_may_set(key) {
                return Err(bad(
                    "modules.edged.nodeLabels",
                    format!(
                        "a node may not set `{key}` on itself (NodeRestriction: no \
                         node-restriction.kubernetes.io labels, and only the kubelet's own \
                         kubernetes.io/k8s.io labels); an administrator labels the Node instead"
                    ),
                ));
            }
        }
        let ms = &self.modules.meta_manager.meta_server;
        if ms.enable && ms.server.parse::<std::net::SocketAddr>().is_err() {
            return Err(bad(
                "modules.metaManager.metaServer.server",
                format!("must be ip:port, not `{}`", ms.server),
            ));
        }
        let eb = &self.modules.event_bus;
        if eb.mqtt_mode > 2 {
            return Err(bad(
                "modules.eventBus.mqttMode",
                format!("must be 0, 1 or 2, not {}", eb.mqtt_mode),
            ));
        }
        if eb.mqtt_qos > 2 {
            return Err(bad(
                "modules.eventBus.mqttQOS",
                format!("must be 0, 1 or 2, not {}", eb.mqtt_qos),
            ));
        }
        Ok(())
    }
}

fn is_host_port(s: &str) -> bool {
    match s.rsplit_once(':') {
        Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_join_writes_is_valid_and_names_the_cloud() {
        for (bootstrap, ws) in [
            ("https://cloud.example.com:10002", "cloud.example.com:10000"),
            ("https://10.0.0.5:30002", "10.0.0.5:10000"),
            ("https://[fd00::1]:10002", "[fd00::1]:10000"),
        ] {
            let text = joined_config(bootstrap, "edge-7");
            let cfg = EdgeCoreConfig::parse(Path::new("edgecore.yaml"), &text)
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(cfg.modules.edge_hub.http_server, bootstrap);
            assert_eq!(cfg.modules.edge_hub.websocket.server, ws);
            assert_eq!(cfg.modules.edged.hostname_override, "edge-7");
            // Everything else is the default.
            assert_eq!(
                cfg.database.data_source,
                EdgeCoreConfig::default().database.data_source
            );
        }
    }

    fn p() -> &'static Path {
        Path::new("edgecore.yaml")
    }

    #[test]
    fn commented_default_equals_built_in_default() {
        let parsed = EdgeCoreConfig::parse(p(), DEFAULT_CONFIG_YAML).unwrap();
        assert_eq!(parsed, EdgeCoreConfig::default());
    }

    #[test]
    fn kubeedge_style_file_parses() {
        let text = "apiVersion: edgecore.config.kubeedge.io/v1alpha2\nkind: EdgeCore\n\
                    modules:\n  edgeHub:\n    heartbeat: 5\n    websocket:\n      server: cloud.example:10000\n\
                    \x20 edged:\n    hostnameOverride: edge-1\n    nodeLabels:\n      zone: a\n    tailoredKubeletConfig:\n      maxPods: 20\n      imageGCHighThresholdPercent: 90\n";
        let cfg = EdgeCoreConfig::parse(p(), text).unwrap();
        assert_eq!(cfg.modules.edge_hub.heartbeat, 5);
        assert_eq!(cfg.modules.edged.hostname_override, "edge-1");
        assert_eq!(cfg.modules.edged.node_labels["zone"], "a");
        let k = &cfg.modules.edged.tailored_kubelet_config;
        assert_eq!(
            (
                k.max_pods,
                k.image_gc_high_threshold_percent,
                k.image_gc_low_threshold_percent
            ),
            (20, 90, 80)
        );
        assert_eq!(cfg.modules.edge_hub.project_id, DEFAULT_PROJECT_ID);
    }

    fn field_of(text: &str) -> String {
        match EdgeCoreConfig::parse(p(), text).unwrap_err() {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of("modules:\n  edgeHub:\n    hearbeat: 3\n"),
            "modules.edgeHub.hearbeat"
        );
        assert_eq!(
            field_of("modules:\n  edgeHub:\n    heartbeat: soon\n"),
            "modules.edgeHub.heartbeat"
        );
        assert_eq!(
            field_of("modules:\n  edgeHub:\n    heartbeat: 0\n"),
            "modules.edgeHub.heartbeat"
        );
        assert_eq!(
            field_of("database:\n  driverName: mysql\n"),
            "database.driverName"
        );
        assert_eq!(
            field_of("modules:\n  edged:\n    hostnameOverride: Edge_1\n"),
            "modules.edged.hostnameOverride"
        );
        assert_eq!(
            field_of("modules:\n  metaManager:\n    metaServer:\n      server: localhost\n"),
            "modules.metaManager.metaServer.server"
        );
        assert_eq!(
            field_of("modules:\n  edgeHub:\n    websocket:\n      server: nohost\n"),
            "modules.edgeHub.websocket.server"
        );
        assert_eq!(
            field_of("modules:\n  eventBus:\n    mqttMode: 3\n"),
            "modules.eventBus.mqttMode"
        );
        assert_eq!(
            field_of("modules:\n  edged:\n    nodeLabels: [a]\n"),
            "modules.edged.nodeLabels"
        );
        assert_eq!(
            field_of("modules:\n  edgeHub:\n    websocket:\n      writeDeadline: 0\n"),
            "modules.edgeHub.websocket.writeDeadline"
        );
        assert_eq!(
            field_of(
                "modules:\n  edged:\n    tailoredKubeletConfig:\n      imageGCLowThresholdPercent: 90\n"
            ),
            "modules.edged.tailoredKubeletConfig.imageGCLowThresholdPercent"
        );
        assert_eq!(
            field_of(
                "modules:\n  edged:\n    tailoredKubeletConfig:\n      imageGCHighThresholdPercent: 101\n"
            ),
            "modules.edged.tailoredKubeletConfig.imageGCHighThresholdPercent"
        );
        for labels in [
            "node-restriction.kubernetes.io/pool: trusted",
            "node-role.kubernetes.io/control-plane: \"\"",
            "zone: not valid",
        ] {
            assert_eq!(
                field_of(&format!(
                    "modules:\n  edged:\n    nodeLabels:\n      {labels}\n"
                )),
                "modules.edged.nodeLabels",
                "{labels}"
            );
        }
    }
}
