//! What a real API server and its controllers do with service accounts, so tests see what a
//! cluster does (test support only):
//!
//! - every namespace gets a `default` ServiceAccount (the service account controller) and the
//!   `kube-root-ca.crt` ConfigMap (the root CA publisher);
//! - pods are admitted as the `ServiceAccount` admission plugin does it: `serviceAccountName`
//!   defaults to `default` and must exist, and unless automounting is off (pod first, then the
//!   service account) a `kube-api-access-<random>` projected volume (token, `ca.crt`, namespace)
//!   is added and mounted read-only at `/var/run/secrets/kubernetes.io/serviceaccount` in every
//!   container; `DefaultTolerationSeconds` adds the 300 s `not-ready`/`unreachable` tolerations;
//! - `POST …/serviceaccounts/<name>/token` (TokenRequest) returns a signed JWT (ES256) bound to
//!   the object named in `boundObjectRef`, with the real server's defaults and checks.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use super::store::{ApiError, Store};
use super::types::TypeInfo;

pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";
/// The audience tokens get when a request names none (the API server's `--api-audiences`).
pub const DEFAULT_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The lifetime the admission plugin gives the kube-api-access token.
const KUBE_API_ACCESS_SECONDS: i64 = 3607;

/// The signing key of service account tokens and the cluster's root CA certificate.
pub struct ServiceAccountIssuer {
    key: EcdsaKeyPair,
    root_ca_pem: String,
}

fn rfc3339(secs: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

fn random_suffix() -> String {
    // The alphabet Kubernetes uses for generated names (no vowels, no confusable digits).
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let raw = uuid::Uuid::new_v4();
    raw.as_bytes()[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

impl ServiceAccountIssuer {
    pub fn generate() -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng)
            .map_err(|_| anyhow::anyhow!("cannot generate the token signing key"))?;
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("cannot load the token signing key"))?;
        let ca = kedge_common::pki::CertificateAuthority::generate(
            "kedge-test-apiserver-ca",
            std::time::Duration::from_secs(365 * 24 * 3600),
        )?;
        Ok(ServiceAccountIssuer {
            key,
            root_ca_pem: ca.material().cert_pem.clone(),
        })
    }

    pub fn root_ca_pem(&self) -> &str {
        &self.root_ca_pem
    }

    fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?);
        let input = format!("{header}.{payload}");
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing failed"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// Checks a token's signature and expiry; returns its claims.
    pub fn verify(&self, token: &str) -> anyhow::Result<Value> {
        let (input, sig) = token
            .trim()
            .rsplit_once('.')
            .ok_or_else(|| anyhow::anyhow!("not a JWT"))?;
        let sig = URL_SAFE_NO_PAD.decode(sig)?;
        signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        )
        .verify(input.as_bytes(), &sig)
        .map_err(|_| anyhow::anyhow!("bad signature"))?;
        let payload = input
            .split_once('.')
            .map(|(_, p)| p)
            .ok_or_else(|| anyhow::anyhow!("not a JWT"))?;
        let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
        if claims["exp"].as_i64().unwrap_or(0) <= kedge_common::pki::now_unix() {
            anyhow::bail!("token expired");
        }
        Ok(claims)
    }

    /// What the controllers put into a new namespace.
    pub fn populate_namespace(&self, store: &Store, ns: &str) {
        let (sa, cm) = (ty(store, "serviceaccounts"), ty(store, "configmaps"));
        let objects = [
            (
                sa,
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}}),
            ),
            (
                cm,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": ROOT_CA_CONFIGMAP, "namespace": ns,
                        "annotations": {"kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters."}},
                    "data": {"ca.crt": self.root_ca_pem}}),
            ),
        ];
        for (ty, obj) in objects {
            if let Some(ty) = ty {
                // Already there (made by a test): kept as it is.
                let _ = store.create(&ty, ns, obj);
            }
        }
    }

    /// The `ServiceAccount` and `DefaultTolerationSeconds` admission plugins for a new pod.
    pub fn admit_pod(&self, store: &Store, ns: &str, pod: &mut Value) -> Result<(), ApiError> {
        let name = pod
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(()); // the store reports the missing spec
        };
        let sa_name = spec
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .or_else(|| spec.get("serviceAccount").and_then(Value::as_str))
            .filter(|s| !s.is_empty())
            .unwrap_or("default")
            .to_owned();
        spec.insert("serviceAccountName".into(), json!(sa_name));
        spec.insert("serviceAccount".into(), json!(sa_name));
        let sa = ty(store, "serviceaccounts")
            .map(|t| store.get(&t, ns, &sa_name))
            .transpose()
            .ok()
            .flatten();
        let Some(sa) = sa else {
            return Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "pods \"{name}\" is forbidden: error looking up service account {ns}/{sa_name}: serviceaccount \"{sa_name}\" not found"
                ),
            ));
        };
        let automount = spec
            .get("automountServiceAccountToken")
            .and_then(Value::as_bool)
            .or_else(|| {
                sa.get("automountServiceAccountToken")
                    .and_then(Value::as_bool)
            })
            .unwrap_or(true);
        if automount {
            add_api_access_volume(spec);
        }
        add_default_tolerations(spec);
        Ok(())
    }

    /// TokenRequest for service account `sa` in `ns`.
    pub fn token_request(
        &self,
        store: &Store,
        ns: &str,
        sa_name: &str,
        body: &Value,
    ) -> Result<Value, ApiError> {
        let sa_ty = ty(store, "serviceaccounts")
            .ok_or_else(|| ApiError::bad_request("no serviceaccounts"))?;
        let sa = store.get(&sa_ty, ns, sa_name)?;
        let spec = body.get("spec").cloned().unwrap_or(json!({}));
        let seconds = spec
            .get("expirationSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(3600);
        let invalid = |msg: String| {
            ApiError::new(
                422,
                "Invalid",
                format!("TokenRequest.authentication.k8s.io \"{sa_name}\" is invalid: {msg}"),
            )
        };
        if seconds < 600 {
            return Err(invalid(format!(
                "spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration less than 10 minutes"
            )));
        }
        if seconds > 1 << 32 {
            return Err(invalid(format!(
                "spec.expirationSeconds: Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds"
            )));
        }
        let mut audiences: Vec<String> = spec
            .get("audiences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if audiences.is_empty() {
            audiences = vec![DEFAULT_AUDIENCE.to_owned()];
        }
        let now = kedge_common::pki::now_unix();
        let mut k8s = json!({
            "namespace": ns,
            "serviceaccount": {"name": sa_name, "uid": sa.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)}
        });
        let bound = spec.get("boundObjectRef").cloned();
        if let Some(b) = &bound {
            let kind = b.get("kind").and_then(Value::as_str).unwrap_or_default();
            let plural = match kind {
                "Pod" => "pods",
                "Secret" => "secrets",
                "Node" => "nodes",
                other => {
                    return Err(invalid(format!(
                        "spec.boundObjectRef.kind: Unsupported value: \"{other}\": supported values: \"Pod\", \"Secret\", \"Node\""
                    )));
                }
            };
            let obj_name = b.get("name").and_then(Value::as_str).unwrap_or_default();
            let t = ty(store, plural).ok_or_else(|| ApiError::bad_request("unknown kind"))?;
            let obj = store.get(&t, if plural == "nodes" { "" } else { ns }, obj_name)?;
            let uid = obj
                .pointer("/metadata/uid")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(want) = b
                .get("uid")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
                && want != uid
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    format!(
                        "the UID in the bound object reference ({want}) does not match the UID in record. The object might have been deleted and then recreated"
                    ),
                ));
            }
            k8s[kind.to_ascii_lowercase()] = json!({"name": obj_name, "uid": uid});
            if kind == "Pod"
                && let Some(node) = obj.pointer("/spec/nodeName").and_then(Value::as_str)
            {
                k8s["node"] = json!({"name": node});
            }
        }
        let claims = json!({
            "aud": audiences,
            "exp": now + seconds,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": format!("system:serviceaccount:{ns}:{sa_name}"),
            "kubernetes.io": k8s,
        });
        let token = self
            .sign(&claims)
            .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))?;
        let mut out_spec = json!({"audiences": audiences, "expirationSeconds": seconds});
        if let Some(b) = bound {
            out_spec["boundObjectRef"] = b;
        }
        Ok(json!({
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": sa_name, "namespace": ns, "creationTimestamp": rfc3339(now)},
            "spec": out_spec,
            "status": {"token": token, "expirationTimestamp": rfc3339(now + seconds)}
        }))
    }
}

fn ty(store: &Store, plural: &str) -> Option<TypeInfo> {
    store.resolve("", "v1", plural)
}

fn add_api_access_volume(spec: &mut serde_json::Map<String, Value>) {
    let mounted_already = |c: &Value| {
        c.get("volumeMounts")
            .and_then(Value::as_array)
            .is_some_and(|ms| ms.iter().any(|m| m["mountPath"] == TOKEN_MOUNT_PATH))
    };
    let name = format!("kube-api-access-{}", random_suffix());
    let mut used = false;
    for list in ["initContainers", "containers"] {
        for c in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if mounted_already(c) {
                continue;
            }
            used = true;
            let Some(c) = c.as_object_mut() else { continue };
            let mounts = c.entry("volumeMounts").or_insert_with(|| json!([]));
            if let Some(m) = mounts.as_array_mut() {
                m.push(json!({"name": name, "readOnly": true, "mountPath": TOKEN_MOUNT_PATH}));
            }
        }
    }
    if !used {
        return;
    }
    let volume = json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": KUBE_API_ACCESS_SECONDS, "path": "token"}},
        {"configMap": {"name": ROOT_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
    ]}});
    if let Some(v) = spec
        .entry("volumes")
        .or_insert_with(|| json!([]))
        .as_array_mut()
    {
        v.push(volume);
    }
}

fn add_default_tolerations(spec: &mut serde_json::Map<String, Value>) {
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        let tolerated = list.iter().any(|t| {
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or_default();
            let k = t.get("key").and_then(Value::as_str).unwrap_or_default();
            let op = t.get("operator").and_then(Value::as_str).unwrap_or("Equal");
            (effect.is_empty() || effect == "NoExecute")
                && (k == key || (k.is_empty() && op == "Exists"))
        });
        if !tolerated {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}));
        }
    }
}
