//! The resource types the test API server serves: built-in ones, and whatever CRDs register.

use serde_json::{Value, json};

#[derive(Debug, Clone, PartialEq)]
pub struct TypeInfo {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub status_subresource: bool,
    /// Built-in types accept strategic merge patches; custom resources do not (415).
    pub strategic_merge: bool,
    pub from_crd: bool,
}

impl TypeInfo {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, or `devices.devices.kubeedge.io` for grouped types, as in error messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        vec![
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ]
    }

    /// The discovery entry (`APIResource`) for this type and its status subresource.
    pub fn discovery(&self) -> Vec<Value> {
        let mut v = vec![json!({
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs(),
            "shortNames": self.short_names,
        })];
        if self.status_subresource {
            v.push(json!({
                "name": format!("{}/status", self.plural),
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        v
    }
}

fn builtin(
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
) -> TypeInfo {
    TypeInfo {
        group: group.to_owned(),
        version: version.to_owned(),
        kind: kind.to_owned(),
        plural: plural.to_owned(),
        singular: kind.to_ascii_lowercase(),
        namespaced,
        short_names: short.iter().map(|s| (*s).to_owned()).collect(),
        status_subresource: status,
        strategic_merge: true,
        from_crd: false,
    }
}

/// The built-in types: core/v1 and the few groups kedge and its tests use.
pub fn builtin_types() -> Vec<TypeInfo> {
    vec![
        builtin("", "v1", "Namespace", "namespaces", false, &["ns"], true),
        builtin("", "v1", "Node", "nodes", false, &["no"], true),
        builtin("", "v1", "Pod", "pods", true, &["po"], true),
        builtin("", "v1", "ConfigMap", "configmaps", true, &["cm"], false),
        builtin("", "v1", "Secret", "secrets", true, &[], false),
        builtin("", "v1", "Service", "services", true, &["svc"], true),
        builtin("", "v1", "Endpoints", "endpoints", true, &["ep"], false),
        builtin(
            "",
            "v1",
            "ServiceAccount",
            "serviceaccounts",
            true,
            &["sa"],
            false,
        ),
        builtin("", "v1", "Event", "events", true, &["ev"], false),
        builtin(
            "coordination.k8s.io",
            "v1",
            "Lease",
            "leases",
            true,
            &[],
            false,
        ),
        builtin(
            "events.k8s.io",
            "v1",
            "Event",
            "events",
            true,
            &["ev"],
            false,
        ),
        // Stored only (no controllers): what a chart creates besides cloudcore's own objects.
        builtin(
            "apps",
            "v1",
            "Deployment",
            "deployments",
            true,
            &["deploy"],
            true,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRole",
            "clusterroles",
            false,
            &[],
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            false,
            &[],
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "Role",
            "roles",
            true,
            &[],
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "RoleBinding",
            "rolebindings",
            true,
            &[],
            false,
        ),
        builtin(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
            &["crd", "crds"],
            true,
        ),
    ]
}

/// The types a CRD object defines (one per served version), or why it is invalid.
pub fn types_from_crd(crd: &Value) -> Result<Vec<TypeInfo>, String> {
    let spec = crd.get("spec").ok_or("spec is required")?;
    let s = |v: &Value, p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let group = s(spec, "/group").ok_or("spec.group is required")?;
    let plural = s(spec, "/names/plural").ok_or("spec.names.plural is required")?;
    let kind = s(spec, "/names/kind").ok_or("spec.names.kind is required")?;
    let singular = s(spec, "/names/singular").unwrap_or_else(|| kind.to_ascii_lowercase());
    let scope = s(spec, "/scope").ok_or("spec.scope is required")?;
    let namespaced = match scope.as_str() {
        "Namespaced" => true,
        "Cluster" => false,
        other => return Err(format!("spec.scope: Unsupported value: \"{other}\"")),
    };
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name != format!("{plural}.{group}") {
        return Err(format!(
            "metadata.name: Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"
        ));
    }
    let short_names: Vec<String> = spec
        .pointer("/names/shortNames")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .ok_or("spec.versions is required")?;
    if versions.is_empty() {
        return Err("spec.versions must have at least one version".into());
    }
    let mut out = Vec::new();
    for v in versions {
        let vname = s(v, "/name").ok_or("spec.versions[].name is required")?;
        if let Some(schema) = v.pointer("/schema/openAPIV3Schema") {
            let mut errors = Vec::new();
            check_structural(
                &format!("spec.versions[{vname}].schema.openAPIV3Schema"),
                schema,
                true,
                &mut errors,
            );
            if !errors.is_empty() {
                return Err(errors.join("; "));
            }
        } else {
            return Err(format!(
                "spec.versions[{vname}].schema.openAPIV3Schema: Required value"
            ));
        }
        if v.get("served").and_then(Value::as_bool) != Some(true) {
            continue;
        }
        out.push(TypeInfo {
            group: group.clone(),
            version: vname,
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            namespaced,
            short_names: short_names.clone(),
            status_subresource: v.pointer("/subresources/status").is_some(),
            strategic_merge: false,
            from_crd: true,
        });
    }
    Ok(out)
}

/// The structural-schema rules the real API server enforces on CRDs (a subset that catches what
/// generators get wrong): every node has a `type` unless it is `x-kubernetes-int-or-string` or
/// `x-kubernetes-preserve-unknown-fields`; no `$ref`; `additionalProperties` and `properties` are
/// exclusive; no types inside `anyOf`/`allOf`/`oneOf`/`not`; the root is an object; `required`
/// names only existing properties is not enforced by the server and not here either.
pub fn check_structural(path: &str, node: &Value, root: bool, errors: &mut Vec<String>) {
    let Some(obj) = node.as_object() else {
        errors.push(format!("{path}: must be an object"));
        return;
    };
    if obj.contains_key("$ref") {
        errors.push(format!("{path}.$ref: Forbidden: $ref is not allowed"));
    }
    let int_or_string = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
    let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    match obj.get("type") {
        Some(Value::String(t)) => {
            if root && t != "object" {
                errors.push(format!(
                    "{path}.type: Invalid value: \"{t}\": must be object at the root"
                ));
            }
        }
        Some(_) => errors.push(format!("{path}.type: Invalid value: must be a string")),
        None if int_or_string || preserve => {}
        None => errors.push(format!(
            "{path}.type: Required value: must not be empty for specified object fields"
        )),
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        errors.push(format!(
            "{path}.additionalProperties: Forbidden: additionalProperties and properties are mutual exclusive"
        ));
    }
    for junctor in ["anyOf", "allOf", "oneOf"] {
        if let Some(Value::Array(alts)) = obj.get(junctor) {
            for (i, alt) in alts.iter().enumerate() {
                if alt.get("type").is_some() && !int_or_string {
                    errors.push(format!(
                        "{path}.{junctor}[{i}].type: Forbidden: must be empty to be structural"
                    ));
                }
            }
        }
    }
    if let Some(Value::Object(props)) = obj.get("properties") {
        for (k, v) in props {
            check_structural(&format!("{path}.properties[{k}]"), v, false, errors);
        }
    }
    if let Some(items) = obj.get("items") {
        check_structural(&format!("{path}.items"), items, false, errors);
    }
    if let Some(ap @ Value::Object(_)) = obj.get("additionalProperties") {
        check_structural(&format!("{path}.additionalProperties"), ap, false, errors);
    }
}
