//! The `/etc/hosts` a pod's containers see, written and mounted as the kubelet does: the
//! loopback entries, the pod's own IP with its hostname (and FQDN with a subdomain), and the
//! pod's `hostAliases` — the usual way to give an edge workload names for local devices and
//! gateways that no DNS knows. A `hostNetwork` pod gets the node's own hosts file with its
//! aliases appended. One file per pod (`<pod dir>/etc-hosts`), written (atomically) whenever a
//! container is created, so a new sandbox's IP is there; a running container keeps the file it
//! was started with. A container that mounts something at `/etc/hosts` itself keeps its own.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;

/// The mount point.
pub const HOSTS_PATH: &str = "/etc/hosts";

/// Where the node's own hosts file is (for `hostNetwork` pods).
const NODE_HOSTS: &str = "/etc/hosts";

/// The file's contents for a pod with `pod_ip` (pod network) or the node's `node_hosts`
/// (host network).
pub fn contents(pod: &Pod, pod_ip: &str, node_hosts: Option<&str>, cluster_domain: &str) -> String {
    let spec = pod.spec.as_ref();
    let mut out = String::new();
    match node_hosts {
        Some(node) => {
            out.push_str("# Kubernetes-managed hosts file (host network).\n");
            out.push_str(node);
            if !node.ends_with('\n') && !node.is_empty() {
                out.push('\n');
            }
        }
        None => {
            out.push_str(
                "# Kubernetes-managed hosts file.\n\
                 127.0.0.1\tlocalhost\n\
                 ::1\tlocalhost ip6-localhost ip6-loopback\n\
                 fe00::0\tip6-localnet\n\
                 fe00::0\tip6-mcastprefix\n\
                 fe00::1\tip6-allnodes\n\
                 fe00::2\tip6-allrouters\n",
            );
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let hostname: String = spec
                .and_then(|s| s.hostname.clone())
                .unwrap_or_else(|| name.to_owned())
                .chars()
                .take(63)
                .collect::<String>()
                .trim_end_matches(['-', '.'])
                .to_owned();
            let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
            match spec
                .and_then(|s| s.subdomain.as_deref())
                .filter(|s| !s.is_empty())
            {
                Some(sub) => out.push_str(&format!(
                    "{pod_ip}\t{hostname}.{sub}.{namespace}.svc.{cluster_domain}\t{hostname}\n"
                )),
                None => out.push_str(&format!("{pod_ip}\t{hostname}\n")),
            }
        }
    }
    let aliases = spec.and_then(|s| s.host_aliases.as_ref());
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        out.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.as_deref().unwrap_or_default();
            if a.ip.is_empty() || names.is_empty() {
                continue;
            }
            out.push_str(&format!("{}\t{}\n", a.ip, names.join("\t")));
        }
    }
    out
}

/// Writes the pod's hosts file; returns its path.
pub async fn ensure(
    pod_dir: &Path,
    pod: &Pod,
    pod_ip: &str,
    host_network: bool,
    cluster_domain: &str,
) -> std::io::Result<PathBuf> {
    let path = pod_dir.join("etc-hosts");
    let node = if host_network {
        Some(
            tokio::fs::read_to_string(NODE_HOSTS)
                .await
                .unwrap_or_default(),
        )
    } else {
        None
    };
    let text = contents(pod, pod_ip, node.as_deref(), cluster_domain);
    tokio::fs::create_dir_all(pod_dir).await?;
    let tmp = pod_dir.join(".etc-hosts.tmp");
    tokio::fs::write(&tmp, text).await?;
    tokio::fs::rename(&tmp, &path).await?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_network_pod_sees_itself_and_its_aliases() {
        let p = pod(json!({"containers": [],
            "hostAliases": [{"ip": "192.168.1.20", "hostnames": ["plc", "plc.local"]},
                            {"ip": "", "hostnames": ["skipped"]}]}));
        let text = contents(&p, "10.233.0.7", None, "cluster.local");
        assert!(text.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(text.contains("\n10.233.0.7\tweb\n"), "{text}");
        assert!(text.ends_with("# Entries added by HostAliases.\n192.168.1.20\tplc\tplc.local\n"));
        assert!(!text.contains("skipped"));
    }

    #[test]
    fn a_subdomain_gives_the_fqdn_and_host_network_keeps_the_nodes_file() {
        let p = pod(json!({"containers": [], "hostname": "db-0", "subdomain": "db"}));
        let text = contents(&p, "10.233.0.8", None, "cluster.local");
        assert!(
            text.contains("\n10.233.0.8\tdb-0.db.shop.svc.cluster.local\tdb-0\n"),
            "{text}"
        );
        let p = pod(json!({"containers": [], "hostNetwork": true,
            "hostAliases": [{"ip": "10.0.0.1", "hostnames": ["gw"]}]}));
        let text = contents(
            &p,
            "",
            Some("127.0.0.1 localhost\n192.0.2.10 edge-1"),
            "cluster.local",
        );
        assert_eq!(
            text,
            "# Kubernetes-managed hosts file (host network).\n127.0.0.1 localhost\n192.0.2.10 edge-1\n\n# Entries added by HostAliases.\n10.0.0.1\tgw\n"
        );
    }

    #[tokio::test]
    async fn the_file_follows_the_sandbox() {
        let dir = tempfile::tempdir().unwrap();
        let p = pod(json!({"containers": []}));
        let path = ensure(dir.path(), &p, "10.233.0.9", false, "cluster.local")
            .await
            .unwrap();
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("10.233.0.9\tweb")
        );
        // A new sandbox, a new IP: the next container sees it.
        let again = ensure(dir.path(), &p, "10.233.0.10", false, "cluster.local")
            .await
            .unwrap();
        assert_eq!(again, path);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("10.233.0.10\tweb")
        );
    }
}
