//! Registry credentials from a pod's `imagePullSecrets`, as the kubelet reads them: Secrets of
//! type `kubernetes.io/dockerconfigjson` (`.dockerconfigjson`, `{"auths": {registry: …}}`) or
//! `kubernetes.io/dockercfg` (`.dockercfg`, `{registry: …}`), each entry with `username` and
//! `password` or a base64 `auth` of `user:password`.
//!
//! An entry applies to an image when its registry host matches (Docker Hub's many spellings are
//! one host) and its path, if any, is a prefix of the image's repository; `*.example.com`
//! matches one subdomain level. Every matching credential is tried in order, then an anonymous
//! pull, as the kubelet does.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;

use super::runtime::api;

const DOCKER_HUB: &str = "docker.io";

#[derive(Debug, Default, Deserialize)]
struct Entry {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    auth: String,
}

#[derive(Debug, Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, Entry>,
}

/// The registry host and repository path of an image reference.
fn split_image(image: &str) -> (String, String) {
    let name = image.split('@').next().unwrap_or(image);
    // Drop the tag (a `:` after the last `/`).
    let name = match name.rfind(':') {
        Some(i) if !name[i..].contains('/') => &name[..i],
        _ => name,
    };
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (normalize_host(first), rest.to_owned())
        }
        _ => (DOCKER_HUB.to_owned(), name.to_owned()),
    }
}

fn normalize_host(host: &str) -> String {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_owned(),
        h => h.to_ascii_lowercase(),
    }
}

/// A credential key (`https://host[:port]/path/`, `host`, `*.host`) as (host, path prefix).
fn split_key(key: &str) -> (String, String) {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let (host, path) = k.split_once('/').unwrap_or((k, ""));
    let path = path.trim_end_matches('/');
    // Docker Hub's legacy key names an API version, not a repository.
    let path = if path == "v1" || path == "v2" {
        ""
    } else {
        path
    };
    (normalize_host(host), path.to_owned())
}

fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .and_then(|h| h.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
        None => pattern == host,
    }
}

fn to_auth(e: &Entry) -> Option<api::AuthConfig> {
    let (username, password) = if !e.username.is_empty() || !e.password.is_empty() {
        (e.username.clone(), e.password.clone())
    } else {
        let decoded = STANDARD.decode(e.auth.trim()).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (u, p) = text.split_once(':')?;
        (u.to_owned(), p.to_owned())
    };
    Some(api::AuthConfig {
        username,
        password,
        ..Default::default()
    })
}

/// The entries of one pull secret, by key; a malformed one is reported and yields nothing.
fn entries(secret: &Secret) -> Vec<(String, Entry)> {
    let name = secret.metadata.name.as_deref().unwrap_or_default();
    let data = |k: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|b| b.0.clone())
    };
    let parsed = if let Some(json) = data(".dockerconfigjson") {
        serde_json::from_slice::<DockerConfigJson>(&json).map(|c| c.auths.into_iter().collect())
    } else if let Some(cfg) = data(".dockercfg") {
        serde_json::from_slice::<std::collections::BTreeMap<String, Entry>>(&cfg)
            .map(|m| m.into_iter().collect())
    } else {
        tracing::warn!(secret = %name, "image pull secret has neither .dockerconfigjson nor .dockercfg");
        return Vec::new();
    };
    parsed.unwrap_or_else(|e| {
        tracing::warn!(secret = %name, error = %e, "image pull secret is not a docker config");
        Vec::new()
    })
}

/// The credentials to try for `image`, most specific first, from the pod's pull secrets (in
/// the pod's order).
pub fn credentials_for(image: &str, secrets: &[Secret]) -> Vec<api::AuthConfig> {
    let (host, repo) = split_image(image);
    let mut found: Vec<(usize, api::AuthConfig)> = Vec::new();
    for secret in secrets {
        for (key, entry) in entries(secret) {
            let (k_host, k_path) = split_key(&key);
            let path_ok =
                k_path.is_empty() || repo == k_path || repo.starts_with(&format!("{k_path}/"));
            if host_matches(&k_host, &host)
                && path_ok
                && let Some(auth) = to_auth(&entry)
                && !found.iter().any(|(_, a)| a == &auth)
            {
                found.push((k_path.len(), auth));
            }
        }
    }
    // Longer paths are more specific; the sort is stable, so the pod's order breaks ties.
    found.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
    found.into_iter().map(|(_, a)| a).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn secret(name: &str, key: &str, config: serde_json::Value) -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "type": if key == ".dockercfg" { "kubernetes.io/dockercfg" } else { "kubernetes.io/dockerconfigjson" },
            "data": {key: STANDARD.encode(config.to_string())}
        }))
        .unwrap()
    }

    fn users(a: &[api::AuthConfig]) -> Vec<&str> {
        a.iter().map(|a| a.username.as_str()).collect()
    }

    #[test]
    fn images_split_into_registry_and_repository() {
        assert_eq!(
            split_image("busybox"),
            ("docker.io".into(), "busybox".into())
        );
        assert_eq!(
            split_image("library/busybox:1.36"),
            ("docker.io".into(), "library/busybox".into())
        );
        assert_eq!(
            split_image("127.0.0.1:5000/kedge/busybox:test"),
            ("127.0.0.1:5000".into(), "kedge/busybox".into())
        );
        assert_eq!(
            split_image("localhost/app@sha256:abc"),
            ("localhost".into(), "app".into())
        );
        assert_eq!(
            split_image("REG.example.com/a/b"),
            ("reg.example.com".into(), "a/b".into())
        );
    }

    #[test]
    fn matching_credentials_are_found_most_specific_first() {
        let team = secret(
            "team",
            ".dockerconfigjson",
            json!({"auths": {
                "127.0.0.1:5000/kedge": {"username": "team", "password": "p1"},
                "https://index.docker.io/v1/": {"auth": STANDARD.encode("hub:p2")},
                "*.example.com": {"username": "wild", "password": "p3"}
            }}),
        );
        let all = secret(
            "all",
            ".dockercfg",
            json!({"127.0.0.1:5000": {"username": "all", "password": "p4"}}),
        );
        let both = [all, team];
        assert_eq!(
            users(&credentials_for("127.0.0.1:5000/kedge/busybox:test", &both)),
            ["team", "all"]
        );
        assert_eq!(
            users(&credentials_for("127.0.0.1:5000/other/x", &both)),
            ["all"]
        );
        assert_eq!(
            users(&credentials_for("127.0.0.1:5000/kedgeother/x", &both)),
            ["all"]
        );
        let hub = credentials_for("busybox:latest", &both);
        assert_eq!(
            (hub[0].username.as_str(), hub[0].password.as_str()),
            ("hub", "p2")
        );
        assert_eq!(
            users(&credentials_for("reg.example.com/a", &both)),
            ["wild"]
        );
        assert!(
            credentials_for("a.b.example.com/a", &both).is_empty(),
            "one level only"
        );
        assert!(credentials_for("quay.io/x", &both).is_empty());
    }

    #[test]
    fn malformed_secrets_yield_nothing() {
        let bad: Secret = serde_json::from_value(json!({"metadata": {"name": "bad"},
            "data": {".dockerconfigjson": STANDARD.encode("not json")}}))
        .unwrap();
        let empty: Secret = serde_json::from_value(json!({"metadata": {"name": "empty"}})).unwrap();
        assert!(credentials_for("127.0.0.1:5000/x", &[bad, empty]).is_empty());
    }
}
