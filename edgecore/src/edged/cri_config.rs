//! Pods to CRI requests, as the kubelet's kuberuntime builds them: the sandbox config (metadata,
//! hostname, DNS, ports, namespaces, cgroup parent, log directory) and each container's config
//! (command and args with `$(VAR)` expanded, environment, resources, security context, log path).
//!
//! Sandboxes and containers carry the kubelet's labels (`io.kubernetes.pod.uid`, …) plus
//! [`MANAGED_LABEL`], so edged finds exactly its own again after a restart and tools that know
//! the kubelet's labels read ours.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{Container, Pod};

use super::env::{self, ObjectSource, PodContext};
use super::qos::{QosClass, qos_class};
use super::quantity;
use super::runtime::api;

pub const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
pub const POD_NAME_LABEL: &str = "io.kubernetes.pod.name";
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
pub const CONTAINER_NAME_LABEL: &str = "io.kubernetes.container.name";
/// On every sandbox and container edged creates.
pub const MANAGED_LABEL: &str = "kedge.io/managed";
pub const RESTART_COUNT_ANNOTATION: &str = "io.kubernetes.container.restartCount";
pub const TERMINATION_MESSAGE_PATH_ANNOTATION: &str =
    "io.kubernetes.container.terminationMessagePath";
pub const GRACE_PERIOD_ANNOTATION: &str = "io.kubernetes.pod.terminationGracePeriod";

/// The node-side facts sandbox configs need.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_name: String,
    /// The node's resolv.conf contents (`dnsPolicy: Default`, and ClusterFirst without cluster DNS).
    pub resolv_conf: String,
    /// Cluster DNS servers (kubelet's `clusterDNS`); none on most edge nodes.
    pub cluster_dns: Vec<String>,
    pub cluster_domain: String,
    /// Cgroup under which pods go (`/kubepods` for the kubelet).
    pub cgroup_root: String,
    /// Where pod log directories are created (`/var/log/pods`).
    pub pod_log_root: std::path::PathBuf,
    /// edged's own directory (the kubelet's `--root-dir`): pod volumes live under it.
    pub root_dir: std::path::PathBuf,
    pub node_memory_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("pod has no spec")]
    NoSpec,
    #[error("pod has no {0}")]
    MissingField(&'static str),
    #[error(transparent)]
    Env(#[from] env::EnvError),
    #[error("invalid quantity for {resource}: {value}")]
    Quantity { resource: String, value: String },
}

fn pod_key(pod: &Pod) -> Result<(&str, &str, &str), ConfigError> {
    let m = &pod.metadata;
    Ok((
        m.namespace.as_deref().unwrap_or("default"),
        m.name.as_deref().ok_or(ConfigError::MissingField("name"))?,
        m.uid.as_deref().ok_or(ConfigError::MissingField("uid"))?,
    ))
}

fn base_labels(pod: &Pod) -> Result<HashMap<String, String>, ConfigError> {
    let (ns, name, uid) = pod_key(pod)?;
    Ok(HashMap::from([
        (POD_UID_LABEL.to_owned(), uid.to_owned()),
        (POD_NAME_LABEL.to_owned(), name.to_owned()),
        (POD_NAMESPACE_LABEL.to_owned(), ns.to_owned()),
        (MANAGED_LABEL.to_owned(), "true".to_owned()),
    ]))
}

/// nameserver / search / options lines of a resolv.conf.
fn parse_resolv_conf(text: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
    let (mut servers, mut searches, mut options) = (Vec::new(), Vec::new(), Vec::new());
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => servers.extend(words.next().map(str::to_owned)),
            Some("search") | Some("domain") => {
                searches = words.map(str::to_owned).collect();
            }
            Some("options") => options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    (servers, searches, options)
}

/// DNS for the sandbox from `dnsPolicy` and `dnsConfig`, as the kubelet's dns configurer does.
fn dns_config(pod: &Pod, node: &NodeSettings) -> api::DnsConfig {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let (host_servers, host_searches, host_options) = parse_resolv_conf(&node.resolv_conf);
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => !node.cluster_dns.is_empty(),
        "ClusterFirst" => !host_network && !node.cluster_dns.is_empty(),
        _ => false,
    };
    let mut dns = if policy == "None" {
        api::DnsConfig::default()
    } else if cluster_first {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let d = &node.cluster_domain;
        let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()];
        searches.extend(host_searches);
        api::DnsConfig {
            servers: node.cluster_dns.clone(),
            searches,
            options: vec!["ndots:5".to_owned()],
        }
    } else {
        api::DnsConfig {
            servers: host_servers,
            searches: host_searches,
            options: host_options,
        }
    };
    if let Some(c) = spec.and_then(|s| s.dns_config.as_ref()) {
        dns.servers.extend(c.nameservers.iter().flatten().cloned());
        dns.searches.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let name = o.name.clone().unwrap_or_default();
            dns.options
                .retain(|x| x.split(':').next() != Some(name.as_str()));
            dns.options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name,
            });
        }
    }
    // resolv.conf limits the kubelet enforces.
    dns.servers.dedup();
    dns.servers.truncate(3);
    dns.searches.dedup();
    dns.searches.truncate(32);
    dns
}

/// The cgroup a pod's containers go in: `<root>/pod<uid>` for Guaranteed pods, under
/// `burstable`/`besteffort` otherwise (the kubelet's layout).
pub fn pod_cgroup(pod: &Pod, node: &NodeSettings) -> Result<String, ConfigError> {
    let (_, _, uid) = pod_key(pod)?;
    let root = node.cgroup_root.trim_end_matches('/');
    Ok(match qos_class(pod) {
        QosClass::Guaranteed => format!("{root}/pod{uid}"),
        QosClass::Burstable => format!("{root}/burstable/pod{uid}"),
        QosClass::BestEffort => format!("{root}/besteffort/pod{uid}"),
    })
}

/// Host or pod namespaces, from `hostNetwork`/`hostPID`/`hostIPC`/`shareProcessNamespace`
/// (the sandbox and each of its containers use the same).
fn namespace_options(spec: &k8s_openapi::api::core::v1::PodSpec) -> api::NamespaceOption {
    let mode = |host: Option<bool>| {
        if host.unwrap_or(false) {
            api::NamespaceMode::Node as i32
        } else {
            api::NamespaceMode::Pod as i32
        }
    };
    api::NamespaceOption {
        network: mode(spec.host_network),
        pid: if spec.host_pid.unwrap_or(false) {
            api::NamespaceMode::Node as i32
        } else if spec.share_process_namespace.unwrap_or(false) {
            api::NamespaceMode::Pod as i32
        } else {
            api::NamespaceMode::Container as i32
        },
        ipc: mode(spec.host_ipc),
        ..Default::default()
    }
}

/// The sandbox of a pod (`attempt` counts sandboxes re-created for it).
pub fn sandbox_config(
    pod: &Pod,
    node: &NodeSettings,
    attempt: u32,
) -> Result<api::PodSandboxConfig, ConfigError> {
    let (ns, name, uid) = pod_key(pod)?;
    let spec = pod.spec.as_ref().ok_or(ConfigError::NoSpec)?;
    let host_network = spec.host_network.unwrap_or(false);
    let mut labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    labels.extend(base_labels(pod)?);
    let mut annotations: HashMap<String, String> = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    annotations.insert(
        GRACE_PERIOD_ANNOTATION.to_owned(),
        spec.termination_grace_period_seconds
            .unwrap_or(30)
            .to_string(),
    );
    let hostname = if host_network {
        // runc refuses a hostname without a private UTS namespace.
        String::new()
    } else {
        let h = spec.hostname.clone().unwrap_or_else(|| name.to_owned());
        h.chars()
            .take(63)
            .collect::<String>()
            .trim_end_matches(['-', '.'])
            .to_owned()
    };
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.unwrap_or(0) > 0)
        .map(|p| api::PortMapping {
            protocol: match p.protocol.as_deref() {
                Some("UDP") => api::Protocol::Udp as i32,
                Some("SCTP") => api::Protocol::Sctp as i32,
                _ => api::Protocol::Tcp as i32,
            },
            container_port: p.container_port,
            host_port: p.host_port.unwrap_or(0),
            host_ip: p.host_ip.clone().unwrap_or_default(),
        })
        .collect();
    let pod_sc = spec.security_context.as_ref();
    let namespace_options = namespace_options(spec);
    let sysctls = pod_sc
        .and_then(|s| s.sysctls.as_ref())
        .map(|v| {
            v.iter()
                .map(|s| (s.name.clone(), s.value.clone()))
                .collect()
        })
        .unwrap_or_default();
    Ok(api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: ns.to_owned(),
            attempt,
        }),
        hostname,
        log_directory: node
            .pod_log_root
            .join(format!("{ns}_{name}_{uid}"))
            .display()
            .to_string(),
        dns_config: Some(dns_config(pod, node)),
        port_mappings,
        labels,
        annotations,
        linux: Some(api::LinuxPodSandboxConfig {
            cgroup_parent: pod_cgroup(pod, node)?,
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespace_options),
                run_as_user: pod_sc
                    .and_then(|s| s.run_as_user)
                    .map(|value| api::Int64Value { value }),
                run_as_group: pod_sc
                    .and_then(|s| s.run_as_group)
                    .map(|value| api::Int64Value { value }),
                supplemental_groups: pod_sc
                    .and_then(|s| s.supplemental_groups.clone())
                    .unwrap_or_default(),
                ..Default::default()
            }),
            sysctls,
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn quantity_of(
    map: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
    resource: &str,
    parse: fn(&str) -> Result<i64, quantity::QuantityError>,
) -> Result<Option<i64>, ConfigError> {
    match map.and_then(|m| m.get(resource)) {
        None => Ok(None),
        Some(q) => parse(&q.0).map(Some).map_err(|_| ConfigError::Quantity {
            resource: resource.to_owned(),
            value: q.0.clone(),
        }),
    }
}

/// CPU shares, CFS quota and memory limit from requests and limits, and the OOM score the kubelet
/// gives the pod's QoS class.
fn linux_resources(
    pod: &Pod,
    container: &Container,
    node: &NodeSettings,
) -> Result<api::LinuxContainerResources, ConfigError> {
    const PERIOD: i64 = 100_000;
    let res = container.resources.as_ref();
    let requests = res.and_then(|r| r.requests.as_ref());
    let limits = res.and_then(|r| r.limits.as_ref());
    let cpu_limit = quantity_of(limits, "cpu", quantity::milli)?;
    // A missing request defaults to the limit.
    let cpu_request = quantity_of(requests, "cpu", quantity::milli)?.or(cpu_limit);
    let mem_limit = quantity_of(limits, "memory", quantity::units)?;
    let mem_request = quantity_of(requests, "memory", quantity::units)?.or(mem_limit);
    let cpu_shares = match cpu_request {
        Some(m) if m > 0 => (m * 1024 / 1000).max(2),
        _ => 2,
    };
    let oom_score_adj = match qos_class(pod) {
        QosClass::Guaranteed => -997,
        QosClass::BestEffort => 1000,
        QosClass::Burstable => {
            let req = mem_request.unwrap_or(0);
            let adj = 1000 - (1000 * req) / node.node_memory_bytes.max(1);
            adj.clamp(2, 999)
        }
    };
    Ok(api::LinuxContainerResources {
        cpu_period: if cpu_limit.is_some() { PERIOD } else { 0 },
        cpu_quota: cpu_limit.map_or(0, |m| (m * PERIOD / 1000).max(1000)),
        cpu_shares,
        memory_limit_in_bytes: mem_limit.unwrap_or(0),
        oom_score_adj,
        ..Default::default()
    })
}

/// A container's config for its `attempt` (0 for the first, +1 per restart).
pub fn container_config(
    pod: &Pod,
    container: &Container,
    attempt: u32,
    node: &NodeSettings,
    ctx: &PodContext,
    source: &dyn ObjectSource,
) -> Result<api::ContainerConfig, ConfigError> {
    let envs = env::container_env(pod, ctx, container, source)?;
    let env_map: HashMap<String, String> = envs.iter().cloned().collect();
    let expand = |v: &Option<Vec<String>>| -> Vec<String> {
        v.iter()
            .flatten()
            .map(|s| env::expand(s, &env_map))
            .collect()
    };
    let mut labels = base_labels(pod)?;
    labels.insert(CONTAINER_NAME_LABEL.to_owned(), container.name.clone());
    let annotations = HashMap::from([
        (RESTART_COUNT_ANNOTATION.to_owned(), attempt.to_string()),
        (
            TERMINATION_MESSAGE_PATH_ANNOTATION.to_owned(),
            container
                .termination_message_path
                .clone()
                .unwrap_or_else(|| "/dev/termination-log".to_owned()),
        ),
    ]);
    let sc = container.security_context.as_ref();
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let run_as_user = sc
        .and_then(|s| s.run_as_user)
        .or(pod_sc.and_then(|s| s.run_as_user));
    let run_as_group = sc
        .and_then(|s| s.run_as_group)
        .or(pod_sc.and_then(|s| s.run_as_group));
    let privileged = sc.and_then(|s| s.privileged).unwrap_or(false);
    let capabilities = sc
        .and_then(|s| s.capabilities.as_ref())
        .map(|c| api::Capability {
            add_capabilities: c.add.clone().unwrap_or_default(),
            drop_capabilities: c.drop.clone().unwrap_or_default(),
            ..Default::default()
        });
    Ok(api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: container.name.clone(),
            attempt,
        }),
        image: Some(api::ImageSpec {
            image: container.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command: expand(&container.command),
        args: expand(&container.args),
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: envs
            .into_iter()
            .map(|(key, value)| api::KeyValue { key, value })
            .collect(),
        labels,
        annotations,
        log_path: format!("{}/{attempt}.log", container.name),
        stdin: container.stdin.unwrap_or(false),
        stdin_once: container.stdin_once.unwrap_or(false),
        tty: container.tty.unwrap_or(false),
        linux: Some(api::LinuxContainerConfig {
            resources: Some(linux_resources(pod, container, node)?),
            security_context: Some(api::LinuxContainerSecurityContext {
                capabilities,
                privileged,
                namespace_options: pod.spec.as_ref().map(namespace_options),
                run_as_user: run_as_user.map(|value| api::Int64Value { value }),
                run_as_group: run_as_group.map(|value| api::Int64Value { value }),
                readonly_rootfs: sc
                    .and_then(|s| s.read_only_root_filesystem)
                    .unwrap_or(false),
                no_new_privs: !sc
                    .and_then(|s| s.allow_privilege_escalation)
                    .unwrap_or(true)
                    && !privileged,
                ..Default::default()
            }),
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct NoObjects;
    impl ObjectSource for NoObjects {
        fn config_map(&self, _: &str, _: &str) -> Option<k8s_openapi::api::core::v1::ConfigMap> {
            None
        }
        fn secret(&self, _: &str, _: &str) -> Option<k8s_openapi::api::core::v1::Secret> {
            None
        }
    }

    fn node() -> NodeSettings {
        NodeSettings {
            node_name: "edge-1".into(),
            resolv_conf: "# comment\nnameserver 192.0.2.53\nnameserver 192.0.2.54\nsearch lan example.org\noptions ndots:2 timeout:1\n".into(),
            cluster_dns: Vec::new(),
            cluster_domain: "cluster.local".into(),
            cgroup_root: "/kubepods".into(),
            pod_log_root: "/var/log/pods".into(),
            root_dir: "/var/lib/kedge/edged".into(),
            node_memory_bytes: 8 << 30,
        }
    }

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1", "labels": {"app": "web"}},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn sandbox_for_a_pod_network_pod() {
        let p = pod(json!({"containers": [{"name": "c", "image": "x",
            "ports": [{"containerPort": 80, "hostPort": 8080}, {"containerPort": 53, "protocol": "UDP"}],
            "resources": {"requests": {"memory": "64Mi"}}}],
            "dnsConfig": {"nameservers": ["198.51.100.1"], "options": [{"name": "ndots", "value": "3"}]}}));
        let sb = sandbox_config(&p, &node(), 1).unwrap();
        let m = sb.metadata.unwrap();
        assert_eq!(
            (
                m.name.as_str(),
                m.uid.as_str(),
                m.namespace.as_str(),
                m.attempt
            ),
            ("web", "u-1", "shop", 1)
        );
        assert_eq!(sb.hostname, "web");
        assert_eq!(sb.log_directory, "/var/log/pods/shop_web_u-1");
        assert_eq!(sb.labels[POD_UID_LABEL], "u-1");
        assert_eq!(sb.labels["app"], "web");
        assert_eq!(sb.labels[MANAGED_LABEL], "true");
        assert_eq!(sb.annotations[GRACE_PERIOD_ANNOTATION], "30");
        assert_eq!(
            sb.port_mappings.len(),
            1,
            "only ports with a hostPort are mapped"
        );
        assert_eq!(
            (
                sb.port_mappings[0].container_port,
                sb.port_mappings[0].host_port
            ),
            (80, 8080)
        );
        let dns = sb.dns_config.unwrap();
        // No cluster DNS on this node: ClusterFirst falls back to the node's resolv.conf.
        assert_eq!(dns.servers, ["192.0.2.53", "192.0.2.54", "198.51.100.1"]);
        assert_eq!(dns.searches, ["lan", "example.org"]);
        assert_eq!(dns.options, ["timeout:1", "ndots:3"]);
        let linux = sb.linux.unwrap();
        assert_eq!(linux.cgroup_parent, "/kubepods/burstable/podu-1");
        let ns = linux.security_context.unwrap().namespace_options.unwrap();
        assert_eq!(ns.network, api::NamespaceMode::Pod as i32);
        assert_eq!(ns.pid, api::NamespaceMode::Container as i32);
    }

    #[test]
    fn host_network_cluster_dns_and_dns_policy_none() {
        let mut n = node();
        n.cluster_dns = vec!["10.96.0.10".into()];
        let p = pod(json!({"hostNetwork": true, "containers": [{"name": "c", "image": "x"}]}));
        let sb = sandbox_config(&p, &n, 0).unwrap();
        assert_eq!(sb.hostname, "");
        let dns = sb.dns_config.unwrap();
        assert_eq!(
            dns.servers,
            ["192.0.2.53", "192.0.2.54"],
            "host network: the node's DNS"
        );
        let ns = sb
            .linux
            .unwrap()
            .security_context
            .unwrap()
            .namespace_options
            .unwrap();
        assert_eq!(ns.network, api::NamespaceMode::Node as i32);
        assert_eq!(
            sandbox_config(&p, &n, 0)
                .unwrap()
                .linux
                .unwrap()
                .cgroup_parent,
            "/kubepods/besteffort/podu-1"
        );

        let p = pod(json!({"containers": [{"name": "c", "image": "x"}]}));
        let dns = sandbox_config(&p, &n, 0).unwrap().dns_config.unwrap();
        assert_eq!(dns.servers, ["10.96.0.10"]);
        assert_eq!(
            dns.searches,
            [
                "shop.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "lan",
                "example.org"
            ]
        );
        assert_eq!(dns.options, ["ndots:5"]);

        let p = pod(
            json!({"dnsPolicy": "None", "dnsConfig": {"nameservers": ["1.1.1.1"]},
            "containers": [{"name": "c", "image": "x"}]}),
        );
        let dns = sandbox_config(&p, &n, 0).unwrap().dns_config.unwrap();
        assert_eq!(dns.servers, ["1.1.1.1"]);
        assert!(dns.searches.is_empty());
    }

    #[test]
    fn container_config_expands_command_and_maps_resources_and_security() {
        let p = pod(json!({"securityContext": {"runAsUser": 1000},
            "containers": [{"name": "app", "image": "busybox", "workingDir": "/srv",
            "command": ["sh", "-c"], "args": ["echo $(MSG) $$(MSG)"],
            "env": [{"name": "MSG", "value": "hi"}],
            "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"cpu": "500m", "memory": "1Gi"}},
            "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                "capabilities": {"drop": ["ALL"]}}}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let cfg = container_config(&p, c, 2, &node(), &PodContext::default(), &NoObjects).unwrap();
        assert_eq!(cfg.command, ["sh", "-c"]);
        assert_eq!(cfg.args, ["echo hi $(MSG)"]);
        assert_eq!(cfg.working_dir, "/srv");
        assert_eq!(cfg.log_path, "app/2.log");
        assert_eq!(cfg.metadata.unwrap().attempt, 2);
        assert_eq!(cfg.labels[CONTAINER_NAME_LABEL], "app");
        assert_eq!(cfg.annotations[RESTART_COUNT_ANNOTATION], "2");
        let linux = cfg.linux.unwrap();
        let r = linux.resources.unwrap();
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.cpu_period),
            (256, 50_000, 100_000)
        );
        assert_eq!(r.memory_limit_in_bytes, 1 << 30);
        // Burstable with 1 GiB of 8 GiB requested.
        assert_eq!(r.oom_score_adj, 875);
        let sc = linux.security_context.unwrap();
        assert_eq!(
            sc.run_as_user.unwrap().value,
            1000,
            "from the pod's security context"
        );
        assert!(sc.readonly_rootfs && sc.no_new_privs && !sc.privileged);
        assert_eq!(sc.capabilities.unwrap().drop_capabilities, ["ALL"]);
    }

    #[test]
    fn best_effort_and_guaranteed_resources() {
        let p = pod(json!({"containers": [{"name": "a", "image": "x"}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let r = container_config(&p, c, 0, &node(), &PodContext::default(), &NoObjects)
            .unwrap()
            .linux
            .unwrap()
            .resources
            .unwrap();
        assert_eq!(
            (
                r.cpu_shares,
                r.cpu_quota,
                r.memory_limit_in_bytes,
                r.oom_score_adj
            ),
            (2, 0, 0, 1000)
        );
        let p = pod(json!({"containers": [{"name": "a", "image": "x",
            "resources": {"limits": {"cpu": "2", "memory": "256Mi"}}}]}));
        let c = &p.spec.as_ref().unwrap().containers[0];
        let r = container_config(&p, c, 0, &node(), &PodContext::default(), &NoObjects)
            .unwrap()
            .linux
            .unwrap()
            .resources
            .unwrap();
        assert_eq!(
            (r.cpu_shares, r.cpu_quota, r.oom_score_adj),
            (2048, 200_000, -997)
        );
        let bad = pod(json!({"containers": [{"name": "a", "image": "x",
            "resources": {"limits": {"cpu": "lots"}}}]}));
        let c = &bad.spec.as_ref().unwrap().containers[0];
        assert!(matches!(
            container_config(&bad, c, 0, &node(), &PodContext::default(), &NoObjects),
            Err(ConfigError::Quantity { .. })
        ));
    }
}
