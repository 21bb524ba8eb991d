//! MetaServer: a read-only Kubernetes API on the edge (127.0.0.1:10550 by default), served from
//! MetaManager's database, so local clients — kubectl, operators, edged itself — read what the
//! node holds, online or offline.
//!
//! Discovery, get, list and watch (with `resourceVersion`, bookmarks, `timeoutSeconds`, label
//! and field selectors) for pods, configmaps, secrets (only when enabled), nodes, services,
//! endpoints, leases and the device CRDs. resourceVersions of lists and watches are the local
//! change sequence; objects keep the cloud's own resourceVersion. A watch from a sequence that
//! is no longer in memory (for example after a restart) gets a 410 `Expired` ERROR event, and
//! the client re-lists, as against a real API server. Writes get `405 MethodNotAllowed`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use kedge_common::selectors::{FieldSelector, LabelSelector, supported_fields};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::sqlite::{Change, SqliteStore};

use kedge_common::http::Body;

/// A resource the MetaServer serves.
#[derive(Debug, Clone, Copy)]
struct Served {
    /// The resource type on the cloud–edge wire and in the database.
    wire: &'static str,
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
}

impl Served {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

const RESOURCES: &[Served] = &[
    Served {
        wire: "pod",
        group: "",
        version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        short: &["po"],
    },
    Served {
        wire: "configmap",
        group: "",
        version: "v1",
        plural: "configmaps",
        kind: "ConfigMap",
        namespaced: true,
        short: &["cm"],
    },
    Served {
        wire: "secret",
        group: "",
        version: "v1",
        plural: "secrets",
        kind: "Secret",
        namespaced: true,
        short: &[],
    },
    Served {
        wire: "node",
        group: "",
        version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        short: &["no"],
    },
    Served {
        wire: "service",
        group: "",
        version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
        short: &["svc"],
    },
    Served {
        wire: "endpoints",
        group: "",
        version: "v1",
        plural: "endpoints",
        kind: "Endpoints",
        namespaced: true,
        short: &["ep"],
    },
    Served {
        wire: "lease",
        group: "coordination.k8s.io",
        version: "v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        short: &[],
    },
    Served {
        wire: "device",
        group: "devices.kubeedge.io",
        version: "v1beta1",
        plural: "devices",
        kind: "Device",
        namespaced: true,
        short: &[],
    },
    Served {
        wire: "devicemodel",
        group: "devices.kubeedge.io",
        version: "v1beta1",
        plural: "devicemodels",
        kind: "DeviceModel",
        namespaced: true,
        short: &[],
    },
];

#[derive(Debug, Clone)]
pub struct MetaServerSettings {
    pub addr: SocketAddr,
    pub serve_secrets: bool,
    pub bookmark_interval: Duration,
    /// Served at `/metrics` when set.
    pub metrics: Option<Arc<crate::observability::EdgeMetrics>>,
}

#[derive(Debug, thiserror::Error)]
#[error("MetaServer cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

struct State {
    store: SqliteStore,
    settings: MetaServerSettings,
}

impl State {
    fn served(&self) -> impl Iterator<Item = &'static Served> + '_ {
        RESOURCES
            .iter()
            .filter(|r| r.wire != "secret" || self.settings.serve_secrets)
    }
}

/// Binds the listener (so start-up fails loudly on a taken port) and serves until `shutdown`.
pub async fn start(
    store: SqliteStore,
    settings: MetaServerSettings,
    shutdown: CancellationToken,
) -> Result<SocketAddr, BindError> {
    let listener = TcpListener::bind(settings.addr)
        .await
        .map_err(|source| BindError {
            addr: settings.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| BindError {
        addr: settings.addr,
        source,
    })?;
    let state = Arc::new(State { store, settings });
    kedge_common::http::serve(listener, shutdown, move |req| handle(state.clone(), req));
    Ok(addr)
}

fn json_response(status: StatusCode, body: Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    json_response(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn not_found() -> Response<Body> {
    status(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
}

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    kedge_common::http::parse_query(req.uri().query())
}

fn q<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kedge_common::http::query_value(params, key)
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["metrics"] => match &state.settings.metrics {
            Some(m) => match m.render().await {
                Ok(text) => {
                    let mut r = Response::new(Full::new(Bytes::from(text)).boxed());
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                    );
                    r
                }
                Err(e) => status(500, "InternalError", &format!("metrics: {e}")),
            },
            None => not_found(),
        },
        ["healthz"] | ["readyz"] | ["livez"] => {
            Response::new(Full::new(Bytes::from_static(b"ok")).boxed())
        }
        ["version"] => json_response(
            StatusCode::OK,
            json!({
                "major": "1", "minor": "33", "gitVersion": concat!("v1.33.0-kedge-metaserver-", env!("CARGO_PKG_VERSION")),
                "gitCommit": "", "gitTreeState": "clean", "buildDate": "", "goVersion": "", "compiler": "rustc", "platform": "linux"
            }),
        ),
        ["api"] => json_response(
            StatusCode::OK,
            json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": state.settings.addr.to_string()}]}),
        ),
        ["api", "v1"] => json_response(StatusCode::OK, resource_list(&state, "", "v1")),
        ["apis"] => json_response(StatusCode::OK, group_list(&state)),
        ["apis", g, v] => {
            if state.served().any(|r| r.group == *g && r.version == *v) {
                json_response(StatusCode::OK, resource_list(&state, g, v))
            } else {
                not_found()
            }
        }
        ["api", "v1", rest @ ..] => resource(state, req, "", "v1", rest).await,
        ["apis", g, v, rest @ ..] => resource(state.clone(), req, g, v, rest).await,
        _ => not_found(),
    }
}

fn resource_list(state: &State, group: &str, version: &str) -> Value {
    let resources: Vec<Value> = state
        .served()
        .filter(|r| r.group == group && r.version == version)
        .map(|r| json!({"name": r.plural, "singularName": r.kind.to_ascii_lowercase(), "namespaced": r.namespaced,
            "kind": r.kind, "verbs": ["get", "list", "watch"], "shortNames": r.short}))
        .collect();
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn group_list(state: &State) -> Value {
    let mut groups: Vec<(&str, &str)> = Vec::new();
    for r in state.served().filter(|r| !r.group.is_empty()) {
        if !groups.iter().any(|(g, _)| *g == r.group) {
            groups.push((r.group, r.version));
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, v)| {
            let gv = json!({"groupVersion": format!("{g}/{v}"), "version": v});
            json!({"name": g, "versions": [gv.clone()], "preferredVersion": gv})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

async fn resource(
    state: Arc<State>,
    req: Request<Incoming>,
    group: &str,
    version: &str,
    rest: &[&str],
) -> Response<Body> {
    let find = |plural: &str| {
        state
            .served()
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .copied()
    };
    let (served, namespace, name) = match rest {
        ["namespaces", ns, plural, tail @ ..]
            if tail.len() <= 1 && find(plural).is_some_and(|r| r.namespaced) =>
        {
            (
                find(plural),
                Some((*ns).to_owned()),
                tail.first().map(|s| (*s).to_owned()),
            )
        }
        [plural] => (find(plural), None, None),
        [plural, name] => (
            find(plural).filter(|r| !r.namespaced),
            None,
            Some((*name).to_owned()),
        ),
        _ => (None, None, None),
    };
    let Some(served) = served else {
        return not_found();
    };
    if req.method() != Method::GET {
        return status(
            405,
            "MethodNotAllowed",
            "the MetaServer is read-only: change objects through the cloud's API server",
        );
    }
    let params = query(&req);
    let db_ns = if served.namespaced {
        namespace.clone()
    } else {
        Some("null".to_owned())
    };
    if let Some(name) = name {
        let ns = db_ns.unwrap_or_default();
        return match state.store.get(served.wire, &ns, &name).await {
            Ok(Some(o)) => json_response(StatusCode::OK, with_type(&served, o.content)),
            Ok(None) => status(
                404,
                "NotFound",
                &format!("{} \"{name}\" not found", served.plural),
            ),
            Err(e) => status(500, "InternalError", &e.to_string()),
        };
    }
    let labels = match LabelSelector::parse(q(&params, "labelSelector").unwrap_or("")) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e),
    };
    let fields = match FieldSelector::parse(
        q(&params, "fieldSelector").unwrap_or(""),
        supported_fields(served.group, served.plural),
    ) {
        Ok(s) => s,
        Err(e) => return status(400, "BadRequest", &e),
    };
    let filter = Filter {
        served,
        namespace: db_ns,
        labels,
        fields,
    };
    if matches!(q(&params, "watch"), Some("1" | "true")) {
        return watch(state, filter, &params).await;
    }
    // Rows are stored complete (apiVersion and kind included): serve them as they are, decoding
    // a row only to evaluate selectors.
    match state
        .store
        .list_raw(served.wire, filter.namespace.as_deref())
        .await
    {
        Ok((rows, seq)) => {
            let mut body =
                String::with_capacity(rows.iter().map(|r| r.get().len() + 1).sum::<usize>() + 128);
            body.push_str(&format!(
                "{{\"kind\":\"{}List\",\"apiVersion\":\"{}\",\"metadata\":{{\"resourceVersion\":\"{seq}\"}},\"items\":[",
                served.kind,
                served.api_version()
            ));
            let mut first = true;
            for r in &rows {
                if !filter.selects_all() {
                    let matched =
                        serde_json::from_str::<Value>(r.get()).is_ok_and(|o| filter.matches(&o));
                    if !matched {
                        continue;
                    }
                }
                if !first {
                    body.push(',');
                }
                first = false;
                body.push_str(r.get());
            }
            body.push_str("]}");
            let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => status(500, "InternalError", &e.to_string()),
    }
}

fn with_type(served: &Served, mut obj: Value) -> Value {
    if let Value::Object(m) = &mut obj {
        m.insert("apiVersion".into(), Value::String(served.api_version()));
        m.insert("kind".into(), Value::String(served.kind.to_owned()));
    }
    obj
}

struct Filter {
    served: Served,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// No selectors: every object of the type (and namespace) matches.
    fn selects_all(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// How a change looks to this watcher (selector transitions become ADDED/DELETED).
    fn event(&self, c: &Change) -> Option<&'static str> {
        if c.kind != self.served.wire
            || self.namespace.as_ref().is_some_and(|ns| *ns != c.namespace)
        {
            return None;
        }
        let now = !c.deleted && self.matches(&c.object);
        // Without selectors every live object matches: the previous one need not be decoded
        // (the common watch). One that does not decode counts as not matching.
        let before = c.old.as_deref().is_some_and(|o| {
            self.selects_all() || serde_json::from_str::<Value>(o).is_ok_and(|o| self.matches(&o))
        });
        match (before, now, c.deleted) {
            (true, _, true) => Some("DELETED"),
            (false, _, true) => None,
            (false, true, _) => Some("ADDED"),
            (true, true, _) => Some("MODIFIED"),
            (true, false, _) => Some("DELETED"),
            (false, false, _) => None,
        }
    }
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": kind, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

async fn watch(state: Arc<State>, filter: Filter, params: &[(String, String)]) -> Response<Body> {
    let rx = state.store.subscribe();
    let from = q(params, "resourceVersion").filter(|r| !r.is_empty() && *r != "0");
    let (initial, after): (Vec<Bytes>, u64) = match from {
        None => match state
            .store
            .list(Some(filter.served.wire), filter.namespace.as_deref())
            .await
        {
            Ok((rows, seq)) => (
                rows.into_iter()
                    .map(|r| with_type(&filter.served, r.object.content))
                    .filter(|o| filter.matches(o))
                    .map(|o| line("ADDED", &o))
                    .collect(),
                seq,
            ),
            Err(e) => return status(500, "InternalError", &e.to_string()),
        },
        Some(rv) => {
            let Ok(seq) = rv.parse::<u64>() else {
                return status(
                    400,
                    "BadRequest",
                    &format!("invalid resource version: {rv}"),
                );
            };
            match state.store.changes_since(seq) {
                Some(changes) => {
                    let last = changes.last().map_or(seq, |c| c.seq);
                    let lines = changes
                        .iter()
                        .filter_map(|c| {
                            filter
                                .event(c)
                                .map(|k| line(k, &with_type(&filter.served, c.object.clone())))
                        })
                        .collect();
                    (lines, last.max(seq))
                }
                None => {
                    let gone = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                        "message": format!("too old resource version: {seq}"), "reason": "Expired", "code": 410});
                    (vec![line("ERROR", &gone)], u64::MAX)
                }
            }
        }
    };
    let bookmarks = matches!(q(params, "allowWatchBookmarks"), Some("1" | "true"));
    let timeout = q(params, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, out) = mpsc::channel::<Bytes>(256);
    tokio::spawn(stream_watch(
        state, filter, rx, initial, after, bookmarks, timeout, tx,
    ));
    let stream = futures_util::stream::unfold(out, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

#[allow(clippy::too_many_arguments)]
async fn stream_watch(
    state: Arc<State>,
    filter: Filter,
    mut rx: broadcast::Receiver<Arc<Change>>,
    initial: Vec<Bytes>,
    after: u64,
    bookmarks: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    for l in initial {
        if tx.send(l).await.is_err() {
            return;
        }
    }
    if after == u64::MAX {
        return; // 410 sent
    }
    let mut last = after;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(state.settings.bookmark_interval);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = &mut deadline => return,
            _ = tx.closed() => return,
            c = rx.recv() => match c {
                Ok(c) => {
                    if c.seq <= last {
                        continue;
                    }
                    last = c.seq;
                    if let Some(kind) = filter.event(&c)
                        && tx.send(line(kind, &with_type(&filter.served, c.object.clone()))).await.is_err()
                    {
                        return;
                    }
                }
                // Too slow to keep up, or the store closed: end the watch; the client resumes.
                Err(_) => return,
            },
            _ = tick.tick(), if bookmarks => {
                // Changes are published after their sequence is visible, so drain first.
                let now = state.store.seq();
                while let Ok(c) = rx.try_recv() {
                    if c.seq > last {
                        last = c.seq;
                        if let Some(kind) = filter.event(&c)
                            && tx.send(line(kind, &with_type(&filter.served, c.object.clone()))).await.is_err()
                        {
                            return;
                        }
                    }
                }
                let rv = now.max(last);
                let obj = json!({"kind": filter.served.kind, "apiVersion": filter.served.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                if tx.send(line("BOOKMARK", &obj)).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(app: &str) -> Value {
        json!({"metadata": {"name": "p", "namespace": "default", "labels": {"app": app}}})
    }

    fn change(old: Option<&str>, new_app: &str, deleted: bool) -> Change {
        Change {
            seq: 1,
            kind: "pod".into(),
            namespace: "default".into(),
            name: "p".into(),
            deleted,
            object: pod(new_app),
            old: old.map(Arc::from),
        }
    }

    fn filter(labels: &str) -> Filter {
        Filter {
            served: RESOURCES[0],
            namespace: None,
            labels: LabelSelector::parse(labels).unwrap(),
            fields: FieldSelector::default(),
        }
    }

    #[test]
    fn selector_transitions_read_the_previous_object_from_its_text() {
        let web = pod("web").to_string();
        let db = pod("db").to_string();
        let f = filter("app=web");
        assert_eq!(f.event(&change(Some(&web), "db", false)), Some("DELETED"));
        assert_eq!(f.event(&change(Some(&db), "web", false)), Some("ADDED"));
        assert_eq!(f.event(&change(Some(&web), "web", false)), Some("MODIFIED"));
        assert_eq!(f.event(&change(Some(&db), "db", false)), None);
        assert_eq!(f.event(&change(None, "web", false)), Some("ADDED"));
        assert_eq!(f.event(&change(Some(&web), "web", true)), Some("DELETED"));
        assert_eq!(f.event(&change(Some(&db), "db", true)), None);
        // A previous row that does not decode counts as not matching.
        assert_eq!(
            f.event(&change(Some("{not json"), "web", false)),
            Some("ADDED")
        );
        // Without selectors the previous object is never decoded: any live one means MODIFIED.
        let all = filter("");
        assert!(all.selects_all());
        assert_eq!(
            all.event(&change(Some("{not json"), "db", false)),
            Some("MODIFIED")
        );
        assert_eq!(all.event(&change(None, "db", false)), Some("ADDED"));
        assert_eq!(all.event(&change(Some(&db), "db", true)), Some("DELETED"));
    }
}
