//! CloudStream: the kubelet HTTPS API of every edge node, served by cloudcore, so `kubectl logs`,
//! `exec`, `attach` and `port-forward` work with no tunnel, iptables rule or extra component.
//!
//! The API server reaches a node's kubelet at an address from `Node.status.addresses` and the
//! port in `status.daemonEndpoints.kubeletEndpoint`. cloudcore writes its own address and this
//! listener's port there for the nodes it serves (see [`KubeletEndpoint`]), so the API server
//! calls us; we
//! 1. authenticate the caller by its client certificate, which must be signed by the cluster's
//!    client CA (the TLS handshake refuses anything else), and authorize it as the kubelet does
//!    in webhook mode: a SubjectAccessReview for `nodes/proxy` of that node ([`authz`]);
//! 2. find the node hosting the pod the path names (the edgecontroller's view of pods bound to
//!    edge nodes), and answer at once with a message naming the node if it is not connected;
//! 3. forward the request head over that node's link as a new stream and then copy bytes both
//!    ways: edged answers as a kubelet would (logs from the CRI files; exec, attach and
//!    port-forward proxied to containerd's streaming server, upgrade and all).
//!
//! One request per connection (`Connection: close` on every answer) keeps this a byte pipe:
//! nothing here parses a response, SPDY or WebSocket.

pub mod authz;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kedge_common::stream::StreamRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::cloudhub::{CloudHubHandle, OpenStreamError};
use authz::{Authorizer, RequestAttributes};

/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// Where the API server should reach cloudcore for its edge nodes' kubelet API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletEndpoint {
    /// The address written into each served Node's `status.addresses`.
    pub address: String,
    /// Its address type; the API server picks addresses by `--kubelet-preferred-address-types`
    /// (default `Hostname,InternalDNS,InternalIP,ExternalDNS,ExternalIP`), so the default
    /// `InternalIP` wins as long as no Hostname address is reported — and none is.
    pub address_type: String,
    /// The port written into `status.daemonEndpoints.kubeletEndpoint.Port`.
    pub port: u16,
}

/// Which pods live on which edge node (the edgecontroller keeps it current).
pub trait PodLocator: Send + Sync + 'static {
    /// The node a pod is bound to, if it is an edge node this cloudcore serves.
    fn node_of(&self, namespace: &str, pod: &str) -> Option<String>;
}

/// What the daemon configures.
#[derive(Clone)]
pub struct CloudStreamOptions {
    pub listen: SocketAddr,
    pub tls: TlsAcceptor,
    pub authorizer: Arc<dyn Authorizer>,
}

/// A bound CloudStream listener.
pub struct CloudStream {
    listener: TcpListener,
    tls: TlsAcceptor,
    shared: Arc<Shared>,
}

struct Shared {
    hub: CloudHubHandle,
    pods: Arc<dyn PodLocator>,
    authorizer: Arc<dyn Authorizer>,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudStreamError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl CloudStream {
    pub async fn bind(
        opts: CloudStreamOptions,
        hub: CloudHubHandle,
        pods: Arc<dyn PodLocator>,
    ) -> Result<CloudStream, CloudStreamError> {
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| CloudStreamError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        Ok(CloudStream {
            listener,
            tls: opts.tls,
            shared: Arc::new(Shared {
                hub,
                pods,
                authorizer: opts.authorizer,
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn serve(self, shutdown: CancellationToken) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = self.listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "cloudstream accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let (tls, shared, stop) = (self.tls.clone(), self.shared.clone(), shutdown.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = handle(shared, tls, tcp) => if let Err(e) = r {
                        tracing::info!(%peer, error = %e, "kubelet API request refused");
                    }
                }
            });
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    /// Bytes after the head (a body, or bytes pipelined early).
    rest: Vec<u8>,
}

/// Reads until the end of the request head (or fails).
async fn read_head<R: tokio::io::AsyncRead + Unpin>(io: &mut R) -> Result<Head, String> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the request: {e}"))?;
        if n == 0 {
            return Err("connection closed before a complete request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let method = req.method.unwrap_or("GET").to_owned();
                let target = req.path.unwrap_or("/").to_owned();
                let headers = req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_owned(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                return Ok(Head {
                    method,
                    target,
                    headers,
                    rest: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => continue,
            Ok(httparse::Status::Partial) => return Err("request head too large".into()),
            Err(e) => return Err(format!("malformed request: {e}")),
        }
    }
}

/// The pod a kubelet streaming path names, and the subresource it is authorized as.
fn pod_of(path: &str) -> Option<(String, String)> {
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(kedge_common::http::percent_decode)
        .collect();
    match segs.first().map(String::as_str) {
        Some("containerLogs" | "exec" | "attach" | "portForward") if segs.len() >= 3 => {
            Some((segs[1].clone(), segs[2].clone()))
        }
        _ => None,
    }
}

/// The kubelet's verb for an HTTP method (its webhook authorizer's mapping).
fn verb_of(method: &str) -> &'static str {
    match method {
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "get",
    }
}

async fn answer<W: tokio::io::AsyncWrite + Unpin>(io: &mut W, status: u16, message: &str) {
    let bytes = kedge_common::http::text_response(status, message);
    let _ = io.write_all(&bytes).await;
    let _ = io.shutdown().await;
}

async fn handle(shared: Arc<Shared>, tls: TlsAcceptor, tcp: TcpStream) -> Result<(), String> {
    let timeout = Duration::from_secs(10);
    let mut conn = tokio::time::timeout(timeout, tls.accept(tcp))
        .await
        .map_err(|_| "TLS handshake timed out".to_owned())?
        .map_err(|e| {
            format!(
                "TLS handshake failed (no client certificate from the cluster's client CA?): {e}"
            )
        })?;
    let identity = {
        let (_, c) = conn.get_ref();
        let der = c
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or("no client certificate")?;
        kedge_common::pki::subject_identity(der)
            .map_err(|e| format!("client certificate names no user: {e}"))?
    };
    let head = tokio::time::timeout(timeout, read_head(&mut conn))
        .await
        .map_err(|_| "request head not received in time".to_owned())?;
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            answer(&mut conn, 400, &e).await;
            return Err(e);
        }
    };
    let path = head.target.split('?').next().unwrap_or("/").to_owned();
    if path == "/healthz" {
        answer(&mut conn, 200, "ok").await;
        return Ok(());
    }
    // Authorized before anything is said about pods or nodes: a request that names no pod on
    // our nodes is asked about all nodes (an empty name), which only a caller allowed
    // everywhere passes.
    let target = pod_of(&path);
    let node = target
        .as_ref()
        .and_then(|(namespace, pod)| shared.pods.node_of(namespace, pod));
    let attrs = RequestAttributes {
        user: identity.0.clone(),
        groups: identity.1.clone(),
        verb: verb_of(&head.method).to_owned(),
        node: node.clone().unwrap_or_default(),
        subresource: "proxy".to_owned(),
    };
    match shared.authorizer.authorize(&attrs).await {
        Ok(true) => {}
        Ok(false) => {
            let msg = format!(
                "Forbidden (user={}, verb={}, resource=nodes, subresource=proxy, name={})",
                attrs.user, attrs.verb, attrs.node
            );
            answer(&mut conn, 403, &msg).await;
            return Err(msg);
        }
        Err(e) => {
            let msg = format!("cannot authorize {}: {e}", attrs.user);
            answer(&mut conn, 503, &msg).await;
            return Err(msg);
        }
    }
    let Some((namespace, pod)) = target else {
        let msg = format!(
            "{path} is not served: cloudcore serves the kubelet API of its edge nodes for pod \
             logs, exec, attach and port-forward only (all nodes share this address, so paths that name no pod \
             cannot be routed to one)"
        );
        answer(&mut conn, 404, &msg).await;
        return Err(msg);
    };
    let Some(node) = node else {
        let msg =
            format!("pod {namespace}/{pod} is not bound to an edge node served by this cloudcore");
        answer(&mut conn, 404, &msg).await;
        return Err(msg);
    };
    if !head.rest.is_empty() {
        let msg = "request bodies are not accepted on kubelet streaming endpoints";
        answer(&mut conn, 400, msg).await;
        return Err(msg.into());
    }
    let request = StreamRequest {
        method: head.method,
        target: head.target,
        headers: head.headers,
    };
    let stream = match shared.hub.open_stream(&node, &request).await {
        Ok(s) => s,
        Err(e) => {
            let status = match e {
                OpenStreamError::NotConnected(_) => 503,
                OpenStreamError::NoStreams(_) => 501,
                OpenStreamError::Link { .. } => 503,
            };
            let msg = e.to_string();
            answer(&mut conn, status, &msg).await;
            return Err(msg);
        }
    };
    let id = stream.id();
    tracing::debug!(%node, stream = id, user = %identity.0, target = %request.target, "stream opened");
    let outcome = stream.pipe(conn).await;
    tracing::debug!(%node, stream = id, sent = outcome.sent, received = outcome.received,
        aborted = ?outcome.aborted, "stream closed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn request_heads_parse_and_keep_what_follows() {
        let raw = b"POST /exec/ns/p/c?command=sh HTTP/1.1\r\nHost: 10.0.0.1:10350\r\n\
            Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\nxyz";
        let mut io = &raw[..];
        let head = read_head(&mut io).await.unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/exec/ns/p/c?command=sh");
        assert_eq!(head.headers.len(), 3);
        assert_eq!(head.headers[2], ("Upgrade".into(), "SPDY/3.1".into()));
        assert_eq!(head.rest, b"xyz");
        let mut bad = &b"GET /\x01 HTTP/1.1\r\n\r\n"[..];
        assert!(read_head(&mut bad).await.unwrap_err().contains("malformed"));
        let mut short = &b"GET / HTTP/1.1\r\n"[..];
        assert!(read_head(&mut short).await.unwrap_err().contains("closed"));
    }

    #[test]
    fn pods_are_found_in_streaming_paths_only() {
        assert_eq!(
            pod_of("/containerLogs/ns/web/app"),
            Some(("ns".into(), "web".into()))
        );
        assert_eq!(
            pod_of("/exec/ns/web/uid/app"),
            Some(("ns".into(), "web".into()))
        );
        assert_eq!(
            pod_of("/portForward/ns/web"),
            Some(("ns".into(), "web".into()))
        );
        assert_eq!(pod_of("/logs/syslog"), None);
        assert_eq!(pod_of("/exec/ns"), None);
        assert_eq!(verb_of("POST"), "create");
        assert_eq!(verb_of("GET"), "get");
    }
}
