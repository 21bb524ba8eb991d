//! cloudcore's configuration file (`/etc/kedge/cloudcore.yaml`).

use std::path::Path;

use kedge_common::config::{ConfigError, parse_yaml};
use serde::{Deserialize, Serialize};

/// The commented default configuration printed by `cloudcore --defaultconfig`. A test checks
/// that it parses to exactly [`CloudCoreConfig::default`].
pub const DEFAULT_CONFIG_YAML: &str = include_str!("defaults.yaml");

pub const API_VERSION: &str = "cloudcore.config.kubeedge.io/v1alpha2";
pub const KIND: &str = "CloudCore";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudCoreConfig {
    pub api_version: String,
    pub kind: String,
    #[serde(rename = "kubeAPIConfig")]
    pub kube_api_config: KubeApiConfig,
    pub modules: Modules,
    /// `/healthz`, `/readyz` and `/metrics` (plain HTTP).
    pub observability: ObservabilityListener,
}

impl Default for CloudCoreConfig {
    fn default() -> Self {
        CloudCoreConfig {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            kube_api_config: KubeApiConfig::default(),
            modules: Modules::default(),
            observability: ObservabilityListener::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct KubeApiConfig {
    pub kube_config: String,
    pub master: String,
    pub qps: f32,
    pub burst: u32,
}

impl Default for KubeApiConfig {
    fn default() -> Self {
        KubeApiConfig {
            kube_config: String::new(),
            master: String::new(),
            qps: 100.0,
            burst: 200,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Modules {
    pub cloud_hub: CloudHubConfig,
    pub edge_controller: EdgeControllerConfig,
    pub device_controller: Toggle,
    /// Accepted for KubeEdge configs; no effect. What KubeEdge's SyncController does (finding
    /// what an edge missed) is the inventory and the recorded acks (`edgecontroller::resync`),
    /// which cannot be switched off.
    pub sync_controller: Toggle,
    pub cloud_stream: CloudStreamConfig,
    pub leader_election: LeaderElectionConfig,
}

/// Replicas elect one to run the cluster-wide controllers (see `crate::leader`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaderElectionConfig {
    pub enable: bool,
    /// The Lease in `cloudHub.namespace`.
    pub lease_name: String,
    /// Seconds.
    pub lease_duration: u64,
    pub renew_deadline: u64,
    pub retry_period: u64,
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            enable: true,
            lease_name: "kedge-cloudcore".into(),
            lease_duration: 15,
            renew_deadline: 10,
            retry_period: 2,
        }
    }
}

/// The kubelet API cloudcore serves for its edge nodes (kubectl logs/exec/attach/port-forward).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudStreamConfig {
    pub enable: bool,
    pub address: String,
    pub port: u16,
    /// The address the API server reaches this port at. Empty: `$POD_IP`, else the first IP in
    /// `cloudHub.advertiseAddress`.
    pub advertise_address: String,
    /// The Node address type it is written as (see the README on
    /// `--kubelet-preferred-address-types`).
    pub address_type: String,
    /// The cluster's client CA (PEM). Empty: `client-ca-file` of the ConfigMap
    /// `kube-system/extension-apiserver-authentication`, as aggregated API servers read it.
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: String,
    /// `Webhook` (a SubjectAccessReview per caller, as the kubelet) or `AlwaysAllow`.
    pub authorization: String,
}

impl Default for CloudStreamConfig {
    fn default() -> Self {
        CloudStreamConfig {
            enable: true,
            address: "0.0.0.0".to_owned(),
            port: 10350,
            advertise_address: String::new(),
            address_type: "InternalIP".to_owned(),
            client_ca_file: String::new(),
            authorization: "Webhook".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudHubConfig {
    pub advertise_address: Vec<String>,
    /// Seconds.
    pub keepalive_interval: u64,
    /// Seconds one write to a node may take.
    pub write_timeout: u64,
    pub max_message_bytes: usize,
    pub node_limit: u32,
    pub namespace: String,
    /// Keep CA, server certificate and token secret as files here instead of in Secrets.
    pub cert_dir: String,
    /// Hours.
    pub token_refresh_duration: u64,
    /// Days.
    pub edge_cert_signing_duration: u64,
    pub websocket: WebSocketListener,
    pub https: HttpsListener,
}

impl Default for CloudHubConfig {
    fn default() -> Self {
        CloudHubConfig {
            advertise_address: Vec::new(),
            keepalive_interval: 30,
            write_timeout: 30,
            max_message_bytes: kedge_common::message::DEFAULT_MAX_MESSAGE_BYTES,
            node_limit: 10_000,
            namespace: "kubeedge".to_owned(),
            cert_dir: String::new(),
            token_refresh_duration: 24,
            edge_cert_signing_duration: 365,
            websocket: WebSocketListener::default(),
            https: HttpsListener::default(),
        }
    }
}

/// Declares a listener section whose defaults are its own, so that a file setting only one of
/// its fields keeps the others (serde fills a missing field from the field type's `Default`).
macro_rules! listener {
    ($name:ident, $port:expr) => {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "camelCase")]
        pub struct $name {
            pub enable: bool,
            pub address: String,
            pub port: u16,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    enable: true,
                    address: "0.0.0.0".to_owned(),
                    port: $port,
                }
            }
        }
    };
}

listener!(WebSocketListener, 10000);
listener!(HttpsListener, 10002);
listener!(ObservabilityListener, 10351);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeControllerConfig {
    pub enable: bool,
    /// Seconds.
    pub node_update_frequency: u64,
}

impl Default for EdgeControllerConfig {
    fn default() -> Self {
        EdgeControllerConfig {
            enable: true,
            node_update_frequency: 10,
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

impl CloudCoreConfig {
    /// Parses and validates a config file's text.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let cfg: CloudCoreConfig = parse_yaml(path, text)?;
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
        let k = &self.kube_api_config;
        if !k.qps.is_finite() || k.qps <= 0.0 {
            return Err(bad("kubeAPIConfig.qps", "must be greater than 0".into()));
        }
        if k.burst == 0 {
            return Err(bad("kubeAPIConfig.burst", "must be greater than 0".into()));
        }
        let le = &self.modules.leader_election;
        if le.enable {
            if le.lease_name.is_empty() {
                return Err(bad(
                    "modules.leaderElection.leaseName",
                    "must not be empty".into(),
                ));
            }
            if le.retry_period == 0 || le.renew_deadline <= le.retry_period {
                return Err(bad(
                    "modules.leaderElection.renewDeadline",
                    "must be longer than retryPeriod (at least 1 second)".into(),
                ));
            }
            if le.lease_duration <= le.renew_deadline {
                return Err(bad(
                    "modules.leaderElection.leaseDuration",
                    "must be longer than renewDeadline".into(),
                ));
            }
        }
        let hub = &self.modules.cloud_hub;
        if hub.keepalive_interval == 0 {
            return Err(bad(
                "modules.cloudHub.keepaliveInterval",
                "must be at least 1 second".into(),
            ));
        }
        if hub.write_timeout == 0 {
            return Err(bad(
                "modules.cloudHub.writeTimeout",
                "must be at least 1 second".into(),
            ));
        }
        if hub.max_message_bytes < 1024 {
            return Err(bad(
                "modules.cloudHub.maxMessageBytes",
                "must be at least 1024 bytes".into(),
            ));
        }
        if hub.token_refresh_duration == 0 {
            return Err(bad(
                "modules.cloudHub.tokenRefreshDuration",
                "must be at least 1 hour".into(),
            ));
        }
        if hub.edge_cert_signing_duration == 0 {
            return Err(bad(
                "modules.cloudHub.edgeCertSigningDuration",
                "must be at least 1 day".into(),
            ));
        }
        if hub.namespace.is_empty() {
            return Err(bad(
                "modules.cloudHub.namespace",
                "must not be empty".into(),
            ));
        }
        let listeners = [
            (
                "websocket",
                hub.websocket.enable,
                &hub.websocket.address,
                hub.websocket.port,
            ),
            (
                "https",
                hub.https.enable,
                &hub.https.address,
                hub.https.port,
            ),
        ];
        for (name, enable, address, port) in listeners {
            if enable && port == 0 {
                return Err(bad(
                    &format!("modules.cloudHub.{name}.port"),
                    "must be set when the listener is enabled".into(),
                ));
            }
            if enable && address.parse::<std::net::IpAddr>().is_err() {
                return Err(bad(
                    &format!("modules.cloudHub.{name}.address"),
                    format!("`{address}` is not an IP address"),
                ));
            }
        }
        let o = &self.observability;
        if o.enable && o.port == 0 {
            return Err(bad(
                "observability.port",
                "must be set when observability is enabled".into(),
            ));
        }
        if o.enable && o.address.parse::<std::net::IpAddr>().is_err() {
            return Err(bad(
                "observability.address",
                format!("`{}` is not an IP address", o.address),
            ));
        }
        let cs = &self.modules.cloud_stream;
        if cs.enable {
            if cs.port == 0 {
                return Err(bad(
                    "modules.cloudStream.port",
                    "must be set when cloudStream is enabled".into(),
                ));
            }
            if cs.address.parse::<std::net::IpAddr>().is_err() {
                return Err(bad(
                    "modules.cloudStream.address",
                    format!("`{}` is not an IP address", cs.address),
                ));
            }
            const TYPES: [&str; 5] = [
                "Hostname",
                "InternalIP",
                "ExternalIP",
                "InternalDNS",
                "ExternalDNS",
            ];
            if !TYPES.contains(&cs.address_type.as_str()) {
                return Err(bad(
                    "modules.cloudStream.addressType",
                    format!(
                        "must be one of {}, not `{}`",
                        TYPES.join(", "),
                        cs.address_type
                    ),
                ));
            }
            if !["Webhook", "AlwaysAllow"].contains(&cs.authorization.as_str()) {
                return Err(bad(
                    "modules.cloudStream.authorization",
                    format!("must be Webhook or AlwaysAllow, not `{}`", cs.authorization),
                ));
            }
        }
        if self.modules.edge_controller.node_update_frequency == 0 {
            return Err(bad(
                "modules.edgeController.nodeUpdateFrequency",
                "must be at least 1 second".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("cloudcore.yaml")
    }

    #[test]
    fn commented_default_equals_built_in_default() {
        let parsed = CloudCoreConfig::parse(p(), DEFAULT_CONFIG_YAML).unwrap();
        assert_eq!(parsed, CloudCoreConfig::default());
    }

    #[test]
    fn empty_file_means_defaults() {
        assert_eq!(
            CloudCoreConfig::parse(p(), "{}").unwrap(),
            CloudCoreConfig::default()
        );
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let cfg = CloudCoreConfig::parse(
            p(),
            "modules:\n  cloudHub:\n    websocket:\n      port: 20000\n",
        )
        .unwrap();
        assert_eq!(cfg.modules.cloud_hub.websocket.port, 20000);
        assert!(cfg.modules.cloud_hub.websocket.enable);
        assert_eq!(cfg.modules.cloud_hub.https.port, 10002);
        let cfg = CloudCoreConfig::parse(
            p(),
            "modules:\n  cloudHub:\n    https:\n      address: 127.0.0.1\n",
        )
        .unwrap();
        assert_eq!(cfg.modules.cloud_hub.https.port, 10002);
    }

    fn field_of(text: &str) -> String {
        match CloudCoreConfig::parse(p(), text).unwrap_err() {
            ConfigError::Invalid { field, .. } => field,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn errors_name_the_field() {
        assert_eq!(
            field_of("modules:\n  cloudHub:\n    keepaliveIntervall: 3\n"),
            "modules.cloudHub.keepaliveIntervall"
        );
        assert_eq!(
            field_of("modules:\n  cloudHub:\n    writeTimeout: 0\n"),
            "modules.cloudHub.writeTimeout"
        );
        assert_eq!(
            field_of("modules:\n  cloudHub:\n    websocket:\n      port: high\n"),
            "modules.cloudHub.websocket.port"
        );
        assert_eq!(field_of("kubeAPIConfig:\n  qps: -1\n"), "kubeAPIConfig.qps");
        assert_eq!(field_of("kind: EdgeCore\n"), "kind");
        assert_eq!(
            field_of("modules:\n  cloudHub:\n    https:\n      address: localhost\n"),
            "modules.cloudHub.https.address"
        );
    }
}
