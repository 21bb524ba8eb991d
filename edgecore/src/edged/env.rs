//! A container's environment, resolved as the kubelet does: `envFrom` first (ConfigMaps and
//! Secrets, with their prefix), then `env` in order — literal values with `$(VAR)` expanded from
//! what came before, and `valueFrom` a ConfigMap key, a Secret key, a pod field or a resource
//! field. A missing non-optional reference is an error the pod worker reports as
//! `CreateContainerConfigError`, with the kubelet's wording.
//!
//! Service links (`FOO_SERVICE_HOST`…) are not added: edge nodes are not sent Services.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, Secret};

use super::quantity;

/// Where ConfigMaps and Secrets come from (edged: its cache of the local store).
pub trait ObjectSource {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap>;
    fn secret(&self, namespace: &str, name: &str) -> Option<Secret>;
    /// A current service account token for a projection (see [`super::tokens`]).
    fn service_account_token(&self, _key: &super::tokens::TokenKey) -> Option<String> {
        None
    }
}

/// What a pod's fields resolve against besides the pod itself.
#[derive(Debug, Clone, Default)]
pub struct PodContext {
    pub node_name: String,
    pub host_ip: String,
    /// Known once the sandbox has its network.
    pub pod_ips: Vec<String>,
    /// Defaults for `resourceFieldRef` of limits that are not set, as the kubelet uses the node's
    /// allocatable.
    pub node_allocatable_milli_cpu: i64,
    pub node_allocatable_memory: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("couldn't find key {key} in {kind} {namespace}/{name}")]
    KeyNotFound {
        kind: &'static str,
        namespace: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldRef {0}")]
    UnsupportedField(String),
    #[error("unsupported resourceFieldRef {0}")]
    UnsupportedResource(String),
    #[error("invalid quantity in {field}: {value}")]
    BadQuantity { field: String, value: String },
}

/// Expands `$(VAR)` from `env`; `$$` is a literal `$`; an undefined `$(VAR)` stays as written.
pub fn expand(input: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(')
            && let Some(end) = tail.find(')')
        {
            let name = &tail[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// An ordered environment where a later value for a name replaces the earlier one in place.
#[derive(Default)]
struct Env {
    order: Vec<String>,
    values: HashMap<String, String>,
}

impl Env {
    fn set(&mut self, name: String, value: String) {
        if !self.values.contains_key(&name) {
            self.order.push(name.clone());
        }
        self.values.insert(name, value);
    }
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .cloned()
        })
}

fn config_map_value(cm: &ConfigMap, key: &str) -> Option<String> {
    cm.data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
        .or_else(|| {
            cm.binary_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        })
}

/// The value of a `fieldRef` path.
pub fn pod_field(pod: &Pod, ctx: &PodContext, path: &str) -> Result<String, EnvError> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref();
    let bracket = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_prefix("['"))
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_owned)
    };
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| ctx.node_name.clone()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => ctx.host_ip.clone(),
        "status.podIP" => ctx.pod_ips.first().cloned().unwrap_or_default(),
        "status.podIPs" => ctx.pod_ips.join(","),
        _ => {
            if let Some(k) = bracket("metadata.labels") {
                meta.labels
                    .as_ref()
                    .and_then(|l| l.get(&k))
                    .cloned()
                    .unwrap_or_default()
            } else if let Some(k) = bracket("metadata.annotations") {
                meta.annotations
                    .as_ref()
                    .and_then(|l| l.get(&k))
                    .cloned()
                    .unwrap_or_default()
            } else {
                return Err(EnvError::UnsupportedField(path.to_owned()));
            }
        }
    })
}

fn resource_field(
    pod: &Pod,
    ctx: &PodContext,
    this: &Container,
    r: &k8s_openapi::api::core::v1::ResourceFieldSelector,
) -> Result<String, EnvError> {
    let container = match r.container_name.as_deref() {
        Some(name) if !name.is_empty() => pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.iter().find(|c| c.name == name))
            .unwrap_or(this),
        _ => this,
    };
    let (kind, resource) = r
        .resource
        .split_once('.')
        .ok_or_else(|| EnvError::UnsupportedResource(r.resource.clone()))?;
    let res = container.resources.as_ref();
    let map = match kind {
        "limits" => res.and_then(|x| x.limits.as_ref()),
        "requests" => res.and_then(|x| x.requests.as_ref()),
        _ => return Err(EnvError::UnsupportedResource(r.resource.clone())),
    };
    let set = map.and_then(|m| m.get(resource)).map(|q| q.0.clone());
    let bad = |value: &str| EnvError::BadQuantity {
        field: r.resource.clone(),
        value: value.to_owned(),
    };
    let divisor = r.divisor.as_ref().map(|q| q.0.as_str()).unwrap_or("1");
    match resource {
        "cpu" => {
            let milli = match set {
                Some(q) => quantity::milli(&q).map_err(|_| bad(&q))?,
                None if kind == "limits" => ctx.node_allocatable_milli_cpu,
                None => 0,
            };
            let d = quantity::milli(divisor).map_err(|_| bad(divisor))?.max(1);
            Ok(((milli + d - 1) / d).to_string())
        }
        "memory" | "ephemeral-storage" => {
            let bytes = match set {
                Some(q) => quantity::units(&q).map_err(|_| bad(&q))?,
                None if kind == "limits" && resource == "memory" => ctx.node_allocatable_memory,
                None => 0,
            };
            let d = quantity::units(divisor).map_err(|_| bad(divisor))?.max(1);
            Ok(((bytes + d - 1) / d).to_string())
        }
        _ => Err(EnvError::UnsupportedResource(r.resource.clone())),
    }
}

fn value_of(
    pod: &Pod,
    ctx: &PodContext,
    container: &Container,
    var: &EnvVar,
    env: &Env,
    source: &dyn ObjectSource,
) -> Result<Option<String>, EnvError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let Some(from) = &var.value_from else {
        return Ok(Some(expand(
            var.value.as_deref().unwrap_or_default(),
            &env.values,
        )));
    };
    if let Some(r) = &from.config_map_key_ref {
        let optional = r.optional.unwrap_or(false);
        let Some(cm) = source.config_map(namespace, &r.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(EnvError::ConfigMapNotFound(r.name.clone()))
            };
        };
        return match config_map_value(&cm, &r.key) {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(EnvError::KeyNotFound {
                kind: "ConfigMap",
                namespace: namespace.to_owned(),
                name: r.name.clone(),
                key: r.key.clone(),
            }),
        };
    }
    if let Some(r) = &from.secret_key_ref {
        let optional = r.optional.unwrap_or(false);
        let Some(secret) = source.secret(namespace, &r.name) else {
            return if optional {
                Ok(None)
            } else {
                Err(EnvError::SecretNotFound(r.name.clone()))
            };
        };
        return match secret_value(&secret, &r.key) {
            Some(v) => Ok(Some(v)),
            None if optional => Ok(None),
            None => Err(EnvError::KeyNotFound {
                kind: "Secret",
                namespace: namespace.to_owned(),
                name: r.name.clone(),
                key: r.key.clone(),
            }),
        };
    }
    if let Some(f) = &from.field_ref {
        return pod_field(pod, ctx, &f.field_path).map(Some);
    }
    if let Some(r) = &from.resource_field_ref {
        return resource_field(pod, ctx, container, r).map(Some);
    }
    Ok(Some(String::new()))
}

/// The container's environment, in order (a later entry for a name replaces an earlier one).
pub fn container_env(
    pod: &Pod,
    ctx: &PodContext,
    container: &Container,
    source: &dyn ObjectSource,
) -> Result<Vec<(String, String)>, EnvError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut env = Env::default();
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match source.config_map(namespace, &r.name) {
                Some(cm) => {
                    let mut keys: Vec<(String, String)> =
                        cm.data.clone().unwrap_or_default().into_iter().collect();
                    keys.sort();
                    for (k, v) in keys {
                        let name = format!("{prefix}{k}");
                        if is_env_name(&name) {
                            env.set(name, v);
                        }
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
            }
        }
        if let Some(r) = &from.secret_ref {
            match source.secret(namespace, &r.name) {
                Some(s) => {
                    let mut keys: Vec<String> = s
                        .data
                        .iter()
                        .flat_map(|d| d.keys().cloned())
                        .chain(s.string_data.iter().flat_map(|d| d.keys().cloned()))
                        .collect();
                    keys.sort();
                    keys.dedup();
                    for k in keys {
                        let name = format!("{prefix}{k}");
                        if let Some(v) = secret_value(&s, &k)
                            && is_env_name(&name)
                        {
                            env.set(name, v);
                        }
                    }
                }
                None if r.optional.unwrap_or(false) => {}
                None => return Err(EnvError::SecretNotFound(r.name.clone())),
            }
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(v) = value_of(pod, ctx, container, var, &env, source)? {
            env.set(var.name.clone(), v);
        }
    }
    let Env { order, mut values } = env;
    Ok(order
        .into_iter()
        .filter_map(|k| values.remove(&k).map(|v| (k, v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct Objects(Vec<ConfigMap>, Vec<Secret>);

    impl ObjectSource for Objects {
        fn config_map(&self, ns: &str, name: &str) -> Option<ConfigMap> {
            self.0
                .iter()
                .find(|c| {
                    c.metadata.namespace.as_deref() == Some(ns)
                        && c.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }
        fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
            self.1
                .iter()
                .find(|c| {
                    c.metadata.namespace.as_deref() == Some(ns)
                        && c.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        }
    }

    fn objects() -> Objects {
        Objects(
            vec![
                serde_json::from_value(json!({"metadata": {"name": "cfg", "namespace": "ns"},
                    "data": {"MODE": "edge", "LEVEL": "info", "bad key": "x"}}))
                .unwrap(),
            ],
            vec![
                serde_json::from_value(json!({"metadata": {"name": "creds", "namespace": "ns"},
                    "data": {"password": "czNjcjN0"}}))
                .unwrap(),
            ],
        )
    }

    fn pod(container: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u-1", "labels": {"app": "shop"}},
            "spec": {"nodeName": "edge-1", "serviceAccountName": "robot", "containers": [container]}
        }))
        .unwrap()
    }

    fn ctx() -> PodContext {
        PodContext {
            node_name: "edge-1".into(),
            host_ip: "192.0.2.10".into(),
            pod_ips: vec!["10.233.1.5".into()],
            node_allocatable_milli_cpu: 4000,
            node_allocatable_memory: 8 << 30,
        }
    }

    fn env_of(p: &Pod) -> Result<Vec<(String, String)>, EnvError> {
        let c = &p.spec.as_ref().unwrap().containers[0];
        container_env(p, &ctx(), c, &objects())
    }

    #[test]
    fn env_from_then_env_with_expansion_and_references() {
        let p = pod(json!({"name": "c", "image": "x",
        "resources": {"limits": {"memory": "128Mi"}, "requests": {"cpu": "250m"}},
        "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "APP_"}, {"secretRef": {"name": "creds"}}],
        "env": [
            {"name": "GREETING", "value": "hello $(APP_MODE) $$(APP_MODE) $(UNDEFINED)"},
            {"name": "APP_MODE", "value": "override"},
            {"name": "PASS", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
            {"name": "LVL", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "LEVEL"}}},
            {"name": "GONE", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": true}}},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "SA", "valueFrom": {"fieldRef": {"fieldPath": "spec.serviceAccountName"}}},
            {"name": "MEM", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
            {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
            {"name": "CPUREQ", "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1m"}}}
        ]}));
        let env = env_of(&p).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("APP_LEVEL"), Some("info"));
        assert_eq!(get("APP_bad key"), None, "invalid names are skipped");
        assert_eq!(get("password"), Some("s3cr3t"));
        assert_eq!(get("GREETING"), Some("hello edge $(APP_MODE) $(UNDEFINED)"));
        assert_eq!(get("APP_MODE"), Some("override"), "a later entry replaces");
        let mode_pos = env.iter().position(|(n, _)| n == "APP_MODE").unwrap();
        let level_pos = env.iter().position(|(n, _)| n == "APP_LEVEL").unwrap();
        assert!(
            mode_pos > level_pos,
            "replaced in place, in envFrom's key order"
        );
        assert_eq!(get("PASS"), Some("s3cr3t"));
        assert_eq!(get("LVL"), Some("info"));
        assert_eq!(get("GONE"), None);
        assert_eq!(get("POD"), Some("web"));
        assert_eq!(get("APP"), Some("shop"));
        assert_eq!(get("IP"), Some("10.233.1.5"));
        assert_eq!(get("SA"), Some("robot"));
        assert_eq!(get("MEM"), Some("128"));
        assert_eq!(get("CPU"), Some("4"), "unset limit = node allocatable");
        assert_eq!(get("CPUREQ"), Some("250"));
    }

    #[test]
    fn missing_references_are_errors_with_the_kubelets_words() {
        let missing_cm = pod(
            json!({"name": "c", "image": "x", "envFrom": [{"configMapRef": {"name": "nope"}}]}),
        );
        assert_eq!(
            env_of(&missing_cm).unwrap_err().to_string(),
            "configmap \"nope\" not found"
        );
        let missing_key = pod(json!({"name": "c", "image": "x", "env": [
            {"name": "X", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "user"}}}]}));
        assert_eq!(
            env_of(&missing_key).unwrap_err().to_string(),
            "couldn't find key user in Secret ns/creds"
        );
        let bad_field = pod(json!({"name": "c", "image": "x", "env": [
            {"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "spec.nope"}}}]}));
        assert!(matches!(
            env_of(&bad_field),
            Err(EnvError::UnsupportedField(_))
        ));
    }

    #[test]
    fn expansion_rules() {
        let env = HashMap::from([("A".to_owned(), "1".to_owned())]);
        assert_eq!(expand("$(A)-$(B)-$$(A)-$-$(", &env), "1-$(B)-$(A)-$-$(");
        assert_eq!(expand("no vars", &env), "no vars");
    }
}
