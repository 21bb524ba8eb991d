//! The kubelet's streaming endpoints, served on streams cloudcore opens over the link
//! (`kedge_common::stream`): cloudcore authenticates the API server and routes by pod; this side
//! answers the kubelet HTTP request it forwarded.
//!
//! - `/containerLogs/{ns}/{pod}/{container}`: read from the CRI log file ([`logs`]) and written as
//!   a plain HTTP response.
//! - `/exec/…`, `/attach/…`, `/portForward/…`: the runtime is asked for a streaming URL (CRI
//!   `Exec`/`Attach`/`PortForward`), and the request, upgrade headers and all, is proxied byte for
//!   byte to containerd's streaming server, which speaks SPDY and WebSocket itself — so does the
//!   kubelet, and neither side needs its own implementation of those protocols.
//!
//! Every answer closes its stream (`Connection: close`): one request per stream keeps the
//! cloud's side a plain byte pipe.

pub mod logs;

use std::sync::Arc;
use std::time::Duration;

use kedge_common::http::{parse_query, percent_decode, query_value, text_response};
use kedge_common::stream::{Stream, StreamRequest};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::edged::cri_config::{
    CONTAINER_NAME_LABEL, POD_NAME_LABEL, POD_NAMESPACE_LABEL, POD_UID_LABEL,
};
use crate::edged::runtime::{Runtime, RuntimeError, api};

/// How often a followed log file is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Largest request head forwarded to the runtime's streaming server.
const MAX_HEAD_BYTES: usize = 16 * 1024;

/// A kubelet HTTP error: status and a plain-text message for `kubectl` to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl From<RuntimeError> for HttpError {
    fn from(e: RuntimeError) -> Self {
        let status = if e.is_not_found() { 404 } else { 500 };
        HttpError::new(status, e.to_string())
    }
}

/// What a request path asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Logs {
        namespace: String,
        pod: String,
        container: String,
    },
    Exec(ContainerRef),
    Attach(ContainerRef),
    PortForward {
        namespace: String,
        pod: String,
        uid: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRef {
    pub namespace: String,
    pub pod: String,
    pub uid: Option<String>,
    pub container: String,
}

/// Parses a kubelet streaming path (the forms the kubelet routes, with or without the pod UID).
pub fn parse_target(path: &str) -> Result<Target, HttpError> {
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let own = |x: &str| x.to_owned();
    let container = |ns: &str, pod: &str, uid: Option<&str>, c: &str| ContainerRef {
        namespace: own(ns),
        pod: own(pod),
        uid: uid.map(own),
        container: own(c),
    };
    Ok(match s.as_slice() {
        ["containerLogs", ns, pod, c] => Target::Logs {
            namespace: own(ns),
            pod: own(pod),
            container: own(c),
        },
        ["exec", ns, pod, c] => Target::Exec(container(ns, pod, None, c)),
        ["exec", ns, pod, uid, c] => Target::Exec(container(ns, pod, Some(uid), c)),
        ["attach", ns, pod, c] => Target::Attach(container(ns, pod, None, c)),
        ["attach", ns, pod, uid, c] => Target::Attach(container(ns, pod, Some(uid), c)),
        ["portForward", ns, pod] => Target::PortForward {
            namespace: own(ns),
            pod: own(pod),
            uid: None,
        },
        ["portForward", ns, pod, uid] => Target::PortForward {
            namespace: own(ns),
            pod: own(pod),
            uid: Some(own(uid)),
        },
        _ => {
            return Err(HttpError::new(
                404,
                format!("no streaming endpoint at {path}"),
            ));
        }
    })
}

/// Serves the streams the cloud opens until `shutdown`.
pub struct StreamServer<R: Runtime> {
    runtime: Arc<R>,
}

impl<R: Runtime> StreamServer<R> {
    pub fn new(runtime: Arc<R>) -> Self {
        StreamServer { runtime }
    }

    pub async fn run(
        self,
        mut streams: mpsc::Receiver<(Stream, StreamRequest)>,
        shutdown: CancellationToken,
    ) {
        loop {
            let (stream, request) = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = streams.recv() => match next {
                    Some(s) => s,
                    None => return,
                },
            };
            let runtime = self.runtime.clone();
            tokio::spawn(async move {
                let id = stream.id();
                let target = request.target.clone();
                let outcome = serve(runtime, stream, request).await;
                tracing::debug!(stream = id, %target, ?outcome, "stream finished");
            });
        }
    }
}

/// Answers one request on `stream`.
pub async fn serve<R: Runtime>(
    runtime: Arc<R>,
    stream: Stream,
    request: StreamRequest,
) -> Option<String> {
    let (path, query) = match request.target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (request.target.clone(), None),
    };
    let params = parse_query(query.as_deref());
    let target = match parse_target(&path) {
        Ok(t) => t,
        Err(e) => return respond(stream, &e).await,
    };
    let upstream = match &target {
        Target::Logs {
            namespace,
            pod,
            container,
        } => {
            if request.method != "GET" {
                return respond(stream, &HttpError::new(405, "logs are read with GET")).await;
            }
            return serve_logs(runtime, stream, namespace, pod, container, &params).await;
        }
        Target::Exec(c) => exec_url(&*runtime, c, &params).await,
        Target::Attach(c) => attach_url(&*runtime, c, &params).await,
        Target::PortForward {
            namespace,
            pod,
            uid,
        } => port_forward_url(&*runtime, namespace, pod, uid.as_deref(), &params).await,
    };
    match upstream {
        Ok(url) => proxy(stream, &request, &url).await,
        Err(e) => respond(stream, &e).await,
    }
}

/// Answers a stream with an error (edged cannot serve it now).
pub async fn refuse(stream: Stream, status: u16, message: String) {
    respond(stream, &HttpError::new(status, message)).await;
}

async fn respond(stream: Stream, e: &HttpError) -> Option<String> {
    let bytes = text_response(e.status, &e.message);
    let (io, mut writer) = tokio::io::duplex(bytes.len() + 64);
    let _ = writer.write_all(&bytes).await;
    drop(writer);
    stream.pipe(io).await.aborted
}

fn flag(params: &[(String, String)], names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| query_value(params, n).is_some_and(|v| matches!(v, "1" | "true" | "True")))
}

/// The pod's newest sandbox on this node (its UID, when the path names one, must match).
async fn find_sandbox<R: Runtime>(
    runtime: &R,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
) -> Result<api::PodSandbox, HttpError> {
    let mut labels = std::collections::HashMap::from([
        (POD_NAMESPACE_LABEL.to_owned(), namespace.to_owned()),
        (POD_NAME_LABEL.to_owned(), pod.to_owned()),
    ]);
    if let Some(uid) = uid {
        labels.insert(POD_UID_LABEL.to_owned(), uid.to_owned());
    }
    let mut sandboxes = runtime
        .list_pod_sandboxes(Some(api::PodSandboxFilter {
            label_selector: labels,
            ..Default::default()
        }))
        .await?;
    // Ready first, then newest.
    sandboxes.sort_by_key(|s| {
        (
            s.state == api::PodSandboxState::SandboxReady as i32,
            s.created_at,
        )
    });
    sandboxes
        .pop()
        .ok_or_else(|| HttpError::new(404, format!("pod {namespace}/{pod} is not on this node")))
}

/// The pod's instances of `container`, newest first.
async fn find_containers<R: Runtime>(
    runtime: &R,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
    container: &str,
) -> Result<Vec<api::Container>, HttpError> {
    let sandbox = find_sandbox(runtime, namespace, pod, uid).await?;
    let mut containers = runtime
        .list_containers(Some(api::ContainerFilter {
            pod_sandbox_id: sandbox.id.clone(),
            label_selector: std::collections::HashMap::from([(
                CONTAINER_NAME_LABEL.to_owned(),
                container.to_owned(),
            )]),
            ..Default::default()
        }))
        .await?;
    containers.sort_by_key(|c| (c.metadata.as_ref().map_or(0, |m| m.attempt), c.created_at));
    containers.reverse();
    if containers.is_empty() {
        return Err(HttpError::new(
            400,
            format!(
                "container {container} is not valid for pod {namespace}/{pod} (or has not been created yet)"
            ),
        ));
    }
    Ok(containers)
}

async fn running_container<R: Runtime>(runtime: &R, c: &ContainerRef) -> Result<String, HttpError> {
    let containers = find_containers(
        runtime,
        &c.namespace,
        &c.pod,
        c.uid.as_deref(),
        &c.container,
    )
    .await?;
    containers
        .into_iter()
        .find(|x| x.state == api::ContainerState::ContainerRunning as i32)
        .map(|x| x.id)
        .ok_or_else(|| {
            HttpError::new(
                400,
                format!(
                    "container {} in pod {}/{} is not running",
                    c.container, c.namespace, c.pod
                ),
            )
        })
}

async fn exec_url<R: Runtime>(
    runtime: &R,
    c: &ContainerRef,
    params: &[(String, String)],
) -> Result<String, HttpError> {
    let cmd: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if cmd.is_empty() {
        return Err(HttpError::new(400, "exec needs a command"));
    }
    let id = running_container(runtime, c).await?;
    let tty = flag(params, &["tty"]);
    Ok(runtime
        .exec(api::ExecRequest {
            container_id: id,
            cmd,
            tty,
            stdin: flag(params, &["input", "stdin"]),
            stdout: flag(params, &["output", "stdout"]),
            // With a TTY, stderr is the terminal's (the runtime refuses both).
            stderr: !tty && flag(params, &["error", "stderr"]),
        })
        .await?)
}

async fn attach_url<R: Runtime>(
    runtime: &R,
    c: &ContainerRef,
    params: &[(String, String)],
) -> Result<String, HttpError> {
    let id = running_container(runtime, c).await?;
    let tty = flag(params, &["tty"]);
    Ok(runtime
        .attach(api::AttachRequest {
            container_id: id,
            stdin: flag(params, &["input", "stdin"]),
            tty,
            stdout: flag(params, &["output", "stdout"]),
            stderr: !tty && flag(params, &["error", "stderr"]),
        })
        .await?)
}

async fn port_forward_url<R: Runtime>(
    runtime: &R,
    namespace: &str,
    pod: &str,
    uid: Option<&str>,
    params: &[(String, String)],
) -> Result<String, HttpError> {
    let sandbox = find_sandbox(runtime, namespace, pod, uid).await?;
    if sandbox.state != api::PodSandboxState::SandboxReady as i32 {
        return Err(HttpError::new(
            400,
            format!("pod {namespace}/{pod} is not running"),
        ));
    }
    // Ports travel in the stream protocol's headers; a `port` query is only a hint.
    let port = params
        .iter()
        .filter(|(k, _)| k == "port")
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    Ok(runtime
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: sandbox.id,
            port,
        })
        .await?)
}

/// `http://host:port/path` → (`host:port`, `/path`).
fn split_url(url: &str) -> Result<(String, String), HttpError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        HttpError::new(
            502,
            format!("the runtime's streaming URL {url} is not plain http on this node"),
        )
    })?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok((host.to_owned(), path.to_owned()))
}

/// The request head for the runtime's streaming server: the API server's request with the
/// runtime's path and host.
fn upstream_head(request: &StreamRequest, host: &str, path: &str) -> Result<Vec<u8>, HttpError> {
    let mut head = format!("{} {path} HTTP/1.1\r\nHost: {host}\r\n", request.method);
    for (k, v) in &request.headers {
        if k.eq_ignore_ascii_case("host") {
            continue;
        }
        if k.contains(['\r', '\n', ':']) || v.contains(['\r', '\n']) {
            return Err(HttpError::new(400, format!("malformed header {k:?}")));
        }
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    if head.len() > MAX_HEAD_BYTES {
        return Err(HttpError::new(400, "request head too large"));
    }
    Ok(head.into_bytes())
}

/// Hands the upgraded request to the runtime's streaming server and pipes both ways.
async fn proxy(stream: Stream, request: &StreamRequest, url: &str) -> Option<String> {
    let prepared = async {
        let (host, path) = split_url(url)?;
        let head = upstream_head(request, &host, &path)?;
        let mut tcp = TcpStream::connect(&host).await.map_err(|e| {
            HttpError::new(
                502,
                format!("cannot reach the runtime's streaming server at {host}: {e}"),
            )
        })?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(&head)
            .await
            .map_err(|e| HttpError::new(502, format!("streaming server at {host}: {e}")))?;
        Ok::<_, HttpError>(tcp)
    };
    match prepared.await {
        Ok(tcp) => stream.pipe(tcp).await.aborted,
        Err(e) => respond(stream, &e).await,
    }
}

async fn serve_logs<R: Runtime>(
    runtime: Arc<R>,
    stream: Stream,
    namespace: &str,
    pod: &str,
    container: &str,
    params: &[(String, String)],
) -> Option<String> {
    let now = k8s_openapi::jiff::Timestamp::now();
    let opts = match logs::LogOptions::from_query(params, now) {
        Ok(o) => o,
        Err(e) => return respond(stream, &HttpError::new(400, e)).await,
    };
    let chosen = async {
        let containers = find_containers(&*runtime, namespace, pod, None, container).await?;
        let c = if opts.previous {
            containers.into_iter().nth(1).ok_or_else(|| {
                HttpError::new(
                    400,
                    format!(
                        "previous terminated container \"{container}\" in pod \"{pod}\" not found"
                    ),
                )
            })?
        } else {
            containers
                .into_iter()
                .next()
                .ok_or_else(|| HttpError::new(404, "no container"))?
        };
        let status = runtime.container_status(&c.id).await?;
        if status.log_path.is_empty() || !status.log_path.starts_with('/') {
            return Err(HttpError::new(
                500,
                format!(
                    "container {container} has no log file (log path `{}`)",
                    status.log_path
                ),
            ));
        }
        Ok::<_, HttpError>((c.id, std::path::PathBuf::from(status.log_path)))
    };
    let (id, path) = match chosen.await {
        Ok(x) => x,
        Err(e) => return respond(stream, &e).await,
    };
    let (io, mut writer) = tokio::io::duplex(64 * 1024);
    let pipe = tokio::spawn(stream.pipe(io));
    let head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n";
    if writer.write_all(head).await.is_ok() {
        let rt = runtime.clone();
        let running = move || {
            let (rt, id) = (rt.clone(), id.clone());
            async move {
                rt.container_status(&id)
                    .await
                    .is_ok_and(|s| s.state == api::ContainerState::ContainerRunning as i32)
            }
        };
        if let Err(e) = logs::copy_log(&path, &opts, &mut writer, running, FOLLOW_POLL).await {
            // The status line is out; all that is left is to end the body early.
            tracing::debug!(path = %path.display(), error = %e, "log copy ended");
        }
        let _ = writer.shutdown().await;
    }
    drop(writer);
    pipe.await.ok().and_then(|o| o.aborted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_paths_parse() {
        assert_eq!(
            parse_target("/containerLogs/ns/web/app").unwrap(),
            Target::Logs {
                namespace: "ns".into(),
                pod: "web".into(),
                container: "app".into()
            }
        );
        assert_eq!(
            parse_target("/exec/ns/web/u-1/app").unwrap(),
            Target::Exec(ContainerRef {
                namespace: "ns".into(),
                pod: "web".into(),
                uid: Some("u-1".into()),
                container: "app".into()
            })
        );
        assert!(matches!(
            parse_target("/portForward/ns/web").unwrap(),
            Target::PortForward { uid: None, .. }
        ));
        assert_eq!(parse_target("/logs/").unwrap_err().status, 404);
        assert_eq!(parse_target("/exec/ns").unwrap_err().status, 404);
    }

    #[test]
    fn upstream_heads_keep_the_upgrade_headers_and_refuse_injection() {
        let req = StreamRequest {
            method: "POST".into(),
            target: "/exec/ns/p/c?command=sh".into(),
            headers: vec![
                ("Host".into(), "10.0.0.1:10350".into()),
                ("Connection".into(), "Upgrade".into()),
                ("Upgrade".into(), "SPDY/3.1".into()),
                (
                    "X-Stream-Protocol-Version".into(),
                    "v4.channel.k8s.io".into(),
                ),
            ],
        };
        let (host, path) = split_url("http://127.0.0.1:4321/exec/AbC").unwrap();
        let head = String::from_utf8(upstream_head(&req, &host, &path).unwrap()).unwrap();
        assert_eq!(
            head,
            "POST /exec/AbC HTTP/1.1\r\nHost: 127.0.0.1:4321\r\nConnection: Upgrade\r\n\
             Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
        );
        let mut bad = req.clone();
        bad.headers.push(("X".into(), "a\r\nEvil: 1".into()));
        assert_eq!(upstream_head(&bad, &host, &path).unwrap_err().status, 400);
        assert_eq!(split_url("https://x/y").unwrap_err().status, 502);
    }
}
