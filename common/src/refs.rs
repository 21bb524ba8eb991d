//! Which ConfigMaps and Secrets a pod references: volumes, projected volumes, env, envFrom and
//! image pull secrets, in every kind of container.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefKind {
    ConfigMap,
    Secret,
}

impl RefKind {
    /// The resource type on the wire.
    pub fn wire_type(&self) -> &'static str {
        match self {
            RefKind::ConfigMap => "configmap",
            RefKind::Secret => "secret",
        }
    }
}

/// A namespaced reference to a ConfigMap or Secret.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: RefKind,
    pub namespace: String,
    pub name: String,
}

fn env_refs(env: &[EnvVar], env_from: &[EnvFromSource], out: &mut BTreeSet<(RefKind, String)>) {
    for e in env {
        if let Some(src) = &e.value_from {
            if let Some(c) = &src.config_map_key_ref {
                out.insert((RefKind::ConfigMap, c.name.clone()));
            }
            if let Some(s) = &src.secret_key_ref {
                out.insert((RefKind::Secret, s.name.clone()));
            }
        }
    }
    for f in env_from {
        if let Some(c) = &f.config_map_ref {
            out.insert((RefKind::ConfigMap, c.name.clone()));
        }
        if let Some(s) = &f.secret_ref {
            out.insert((RefKind::Secret, s.name.clone()));
        }
    }
}

fn container_refs(c: &Container, out: &mut BTreeSet<(RefKind, String)>) {
    env_refs(
        c.env.as_deref().unwrap_or_default(),
        c.env_from.as_deref().unwrap_or_default(),
        out,
    );
}

/// Every ConfigMap and Secret `pod` needs, sorted.
pub fn pod_refs(pod: &Pod) -> Vec<ObjectRef> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut out: BTreeSet<(RefKind, String)> = BTreeSet::new();
    if let Some(spec) = &pod.spec {
        for v in spec.volumes.iter().flatten() {
            if let Some(c) = &v.config_map {
                out.insert((RefKind::ConfigMap, c.name.clone()));
            }
            if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
                out.insert((RefKind::Secret, s));
            }
            for src in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(c) = &src.config_map {
                    out.insert((RefKind::ConfigMap, c.name.clone()));
                }
                if let Some(s) = &src.secret {
                    out.insert((RefKind::Secret, s.name.clone()));
                }
            }
        }
        for c in spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
        {
            container_refs(c, &mut out);
        }
        for c in spec.ephemeral_containers.iter().flatten() {
            env_refs(
                c.env.as_deref().unwrap_or_default(),
                c.env_from.as_deref().unwrap_or_default(),
                &mut out,
            );
        }
        for s in spec.image_pull_secrets.iter().flatten() {
            out.insert((RefKind::Secret, s.name.clone()));
        }
    }
    out.into_iter()
        .filter(|(_, name)| !name.is_empty())
        .map(|(kind, name)| ObjectRef {
            kind,
            namespace: ns.clone(),
            name,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_every_kind_of_reference() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {
                "volumes": [
                    {"name": "a", "configMap": {"name": "cm-vol"}},
                    {"name": "b", "secret": {"secretName": "sec-vol"}},
                    {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}, {"secret": {"name": "sec-proj"}}]}},
                    {"name": "d", "emptyDir": {}}
                ],
                "initContainers": [{"name": "i", "envFrom": [{"configMapRef": {"name": "cm-init"}}]}],
                "containers": [{"name": "c", "env": [
                    {"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec-env", "key": "k"}}},
                    {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}},
                    {"name": "Z", "value": "plain"}
                ], "envFrom": [{"secretRef": {"name": "sec-from"}}]}],
                "imagePullSecrets": [{"name": "pull"}]
            }
        }))
        .unwrap();
        let names: Vec<(RefKind, String)> = pod_refs(&pod)
            .into_iter()
            .map(|r| {
                assert_eq!(r.namespace, "ns");
                (r.kind, r.name)
            })
            .collect();
        let expect = |k: RefKind, n: &str| (k, n.to_owned());
        assert_eq!(
            names,
            vec![
                expect(RefKind::ConfigMap, "cm-env"),
                expect(RefKind::ConfigMap, "cm-init"),
                expect(RefKind::ConfigMap, "cm-proj"),
                expect(RefKind::ConfigMap, "cm-vol"),
                expect(RefKind::Secret, "pull"),
                expect(RefKind::Secret, "sec-env"),
                expect(RefKind::Secret, "sec-from"),
                expect(RefKind::Secret, "sec-proj"),
                expect(RefKind::Secret, "sec-vol"),
            ]
        );
    }
}
