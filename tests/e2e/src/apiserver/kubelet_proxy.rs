//! Test support: the API server's connection to kubelets, as a real API server makes it for
//! `pods/log`, `pods/exec`, `pods/attach` and `pods/portforward` (and for SubjectAccessReviews
//! the kubelet asks in webhook mode).
//!
//! Like kube-apiserver: the node's address is the first of `status.addresses` in the default
//! `--kubelet-preferred-address-types` order (Hostname, InternalDNS, InternalIP, ExternalDNS,
//! ExternalIP), the port is `status.daemonEndpoints.kubeletEndpoint.Port`; the connection is
//! HTTPS with the API server's kubelet client certificate (from the cluster CA, which is also
//! the client CA published in `kube-system/extension-apiserver-authentication`) and does not
//! check the kubelet's serving certificate (no `--kubelet-certificate-authority`). Query
//! options are translated to the kubelet's names (`stdin` → `input=1`, …); upgrades (SPDY,
//! WebSocket) are passed through byte for byte, as the real server does for SPDY. A kubelet's
//! non-2xx answer to a log request becomes a Status with its body as the message.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use kedge_common::http::Body;
use kedge_common::pki::{CertAndKey, CertificateAuthority};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::store::Store;

/// The user kubeadm gives the API server's kubelet client certificate.
pub const KUBELET_CLIENT_USER: &str = "kube-apiserver-kubelet-client";

/// The cluster CA and the API server's kubelet client identity.
pub struct KubeletClient {
    pub ca: CertificateAuthority,
    tls: Arc<rustls::ClientConfig>,
}

impl KubeletClient {
    pub fn generate() -> anyhow::Result<KubeletClient> {
        let ca = CertificateAuthority::generate("kubernetes", Duration::from_secs(86_400 * 30))?;
        let cert: CertAndKey = ca.issue_client_cert(
            KUBELET_CLIENT_USER,
            Some("kubeadm:cluster-admins"),
            Duration::from_secs(86_400 * 30),
        )?;
        let tls = kedge_common::tls::unverified_client_config_with_identity(
            &cert.cert_pem,
            &cert.key_pem,
        )?;
        Ok(KubeletClient { ca, tls })
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca.material().cert_pem
    }
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    let mut r = Response::new(http_body_util::Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// The kubelet's address and port for `node`, as kube-apiserver picks them.
fn kubelet_location(node: &Value) -> Option<String> {
    let addresses = node.pointer("/status/addresses")?.as_array()?;
    let address = [
        "Hostname",
        "InternalDNS",
        "InternalIP",
        "ExternalDNS",
        "ExternalIP",
    ]
    .iter()
    .find_map(|ty| {
        addresses
            .iter()
            .find(|a| a["type"] == *ty)
            .and_then(|a| a["address"].as_str())
    })?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .unwrap_or(10250);
    Some(if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    })
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The kubelet path and query for a pod subresource request.
fn kubelet_target(
    sub: &str,
    ns: &str,
    pod: &str,
    container: &str,
    params: &[(String, String)],
) -> String {
    let truthy = |k: &str| {
        params
            .iter()
            .any(|(n, v)| n == k && matches!(v.as_str(), "true" | "1"))
    };
    let mut query: Vec<String> = Vec::new();
    let path = match sub {
        "log" => {
            for (k, v) in params {
                if [
                    "follow",
                    "previous",
                    "timestamps",
                    "tailLines",
                    "limitBytes",
                    "sinceSeconds",
                    "sinceTime",
                    "stream",
                ]
                .contains(&k.as_str())
                {
                    query.push(format!("{k}={}", enc(v)));
                }
            }
            format!("/containerLogs/{ns}/{pod}/{container}")
        }
        "exec" | "attach" => {
            for (k, v) in params {
                if k == "command" {
                    query.push(format!("command={}", enc(v)));
                }
            }
            for (api, kubelet) in [
                ("stdin", "input"),
                ("stdout", "output"),
                ("stderr", "error"),
                ("tty", "tty"),
            ] {
                if truthy(api) {
                    query.push(format!("{kubelet}=1"));
                }
            }
            format!("/{sub}/{ns}/{pod}/{container}")
        }
        _ => {
            for (k, v) in params {
                if k == "ports" {
                    query.push(format!("port={}", enc(v)));
                }
            }
            format!("/portForward/{ns}/{pod}")
        }
    };
    if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// Proxies a pod subresource request to the pod's kubelet.
pub async fn proxy(
    store: &Store,
    kubelet: &KubeletClient,
    mut req: Request<Incoming>,
    ns: &str,
    pod_name: &str,
    sub: &str,
) -> Response<Body> {
    let params = kedge_common::http::parse_query(req.uri().query());
    let Some(pods) = store.resolve("", "v1", "pods") else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "no pods type",
        );
    };
    let pod = match store.get(&pods, ns, pod_name) {
        Ok(p) => p,
        Err(_) => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{pod_name}\" not found"),
            );
        }
    };
    let Some(node_name) = pod.pointer("/spec/nodeName").and_then(Value::as_str) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("pod {pod_name} does not have a host assigned"),
        );
    };
    let container = if sub == "portforward" {
        String::new()
    } else {
        let names: Vec<String> = pod
            .pointer("/spec/containers")
            .and_then(Value::as_array)
            .map(|cs| {
                cs.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        match params.iter().find(|(k, _)| k == "container") {
            Some((_, c)) => c.clone(),
            None if names.len() == 1 => names[0].clone(),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!(
                        "a container name must be specified for pod {pod_name}, choose one of: {names:?}"
                    ),
                );
            }
        }
    };
    let Some(nodes) = store.resolve("", "v1", "nodes") else {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "no nodes type",
        );
    };
    let location = store
        .get(&nodes, "", node_name)
        .ok()
        .and_then(|n| kubelet_location(&n));
    let Some(location) = location else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &format!("node {node_name} has no address"),
        );
    };
    let target = kubelet_target(sub, ns, pod_name, &container, &params);
    let upstream = match connect(kubelet, &location).await {
        Ok(s) => s,
        Err(e) => {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &format!("error dialing backend: {e}"),
            );
        }
    };
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(x) => x,
            Err(e) => {
                return status(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalError",
                    &format!("kubelet handshake: {e}"),
                );
            }
        };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut out = Request::builder().method(req.method().clone()).uri(&target);
    for (k, v) in req.headers() {
        if k == http::header::HOST || k == http::header::AUTHORIZATION {
            continue;
        }
        out = out.header(k, v);
    }
    out = out.header(http::header::HOST, &location);
    let Ok(out) = out.body(Empty::<Bytes>::new()) else {
        return status(StatusCode::BAD_REQUEST, "BadRequest", "bad request headers");
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut resp = match sender.send_request(out).await {
        Ok(r) => r,
        Err(e) => {
            return status(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                &format!("kubelet request: {e}"),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let kubelet_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(kubelet)) = (client_upgrade.await, kubelet_upgrade.await) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(
                &mut TokioIo::new(client),
                &mut TokioIo::new(kubelet),
            )
            .await;
        });
        let mut r = Response::new(Empty::new().boxed());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *r.headers_mut() = resp.headers().clone();
        return r;
    }
    let code = resp.status();
    if sub == "log" && !code.is_success() {
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let message = String::from_utf8_lossy(&body).trim().to_owned();
        let reason = if code == StatusCode::NOT_FOUND {
            "NotFound"
        } else {
            "BadRequest"
        };
        return status(code, reason, &message);
    }
    let headers = resp.headers().clone();
    let frames = http_body_util::BodyStream::new(resp.into_body())
        .take_while(|r| std::future::ready(r.is_ok()))
        .filter_map(|r| std::future::ready(r.ok()))
        .map(Ok::<Frame<Bytes>, Infallible>);
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    *r.status_mut() = code;
    if let Some(ct) = headers.get(http::header::CONTENT_TYPE) {
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, ct.clone());
    }
    r
}

async fn connect(
    kubelet: &KubeletClient,
    location: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(location)).await??;
    let _ = tcp.set_nodelay(true);
    let host = location
        .rsplit_once(':')
        .map_or(location, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let name = rustls::pki_types::ServerName::try_from(host)?;
    let tls = tokio_rustls::TlsConnector::from(kubelet.tls.clone())
        .connect(name, tcp)
        .await?;
    Ok(tls)
}

/// `POST /apis/authorization.k8s.io/v1/subjectaccessreviews`, answered the way a kubeadm
/// cluster's RBAC answers the kubelet's question: the API server's kubelet client and
/// `system:masters` may use the kubelet API (`nodes/*`); nobody else.
pub fn subject_access_review(body: &Value) -> Value {
    let spec = &body["spec"];
    let user = spec["user"].as_str().unwrap_or_default();
    let groups: Vec<&str> = spec["groups"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let resource = spec
        .pointer("/resourceAttributes/resource")
        .and_then(Value::as_str);
    let allowed = resource == Some("nodes")
        && (user == KUBELET_CLIENT_USER || groups.contains(&"system:masters"));
    let mut review = body.clone();
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SubjectAccessReview");
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding system:kubelet-api-admin"})
    } else {
        json!({"allowed": false})
    };
    review
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preferred_address_and_kubelet_port_are_used() {
        let node = json!({"status": {
            "addresses": [{"type": "ExternalIP", "address": "1.2.3.4"}, {"type": "InternalIP", "address": "10.0.0.9"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10350}}}});
        assert_eq!(kubelet_location(&node).as_deref(), Some("10.0.0.9:10350"));
        assert_eq!(kubelet_location(&json!({"status": {}})), None);
    }

    #[test]
    fn options_become_kubelet_parameters() {
        let p = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(
            kubelet_target(
                "exec",
                "ns",
                "p",
                "c",
                &p(&[
                    ("command", "sh"),
                    ("command", "-c"),
                    ("command", "echo hi"),
                    ("stdin", "true"),
                    ("stdout", "true"),
                    ("tty", "false")
                ])
            ),
            "/exec/ns/p/c?command=sh&command=-c&command=echo%20hi&input=1&output=1"
        );
        assert_eq!(
            kubelet_target(
                "log",
                "ns",
                "p",
                "c",
                &p(&[("follow", "true"), ("container", "c"), ("tailLines", "5")])
            ),
            "/containerLogs/ns/p/c?follow=true&tailLines=5"
        );
        assert_eq!(
            kubelet_target("portforward", "ns", "p", "", &p(&[("ports", "8080")])),
            "/portForward/ns/p?port=8080"
        );
    }
}
