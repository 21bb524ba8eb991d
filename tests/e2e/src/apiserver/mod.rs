//! A test Kubernetes API server: test support only, never part of cloudcore.
//!
//! No real API server can be installed on these machines, so cloudcore's tests talk to this one
//! through kube-rs exactly as they would to a cluster, and real `kubectl` works against it. It
//! speaks the Kubernetes REST and watch protocol over HTTP on 127.0.0.1 with real semantics:
//! a global resourceVersion; list with label/field selectors and `limit`/`continue`; watch from a
//! resourceVersion with bookmarks, `timeoutSeconds` and 410 Gone (an `ERROR` event, as the real
//! server sends) once history is compacted; create/get/update/patch/delete with optimistic
//! concurrency, the status subresource, finalizers and graceful pod deletion; namespaces;
//! CustomResourceDefinitions (registering one serves its resources); and discovery.
//!
//! Admission and controllers as far as kedge depends on them: namespaces must exist, and service
//! accounts behave as in a cluster (see [`serviceaccounts`]: default service account and root CA
//! ConfigMap per namespace, the `kube-api-access-*` volume and default tolerations on pods,
//! TokenRequest with signed tokens).
//!
//! Known simplifications: no authentication or authorization, no other admission, no schema validation or pruning of custom resources (CRD schemas are checked for
//! structure), server-side apply is a merge patch without field ownership, and `continue` pages
//! are read from the current state rather than a snapshot. Bodies are JSON or YAML only:
//! `kubectl create <generator>` (which sends protobuf) gets 415, and there is no server-side
//! Table rendering (kubectl prints NAME and AGE), no OpenAPI (use `--validate=false`).

pub mod eviction;
pub mod kubelet_proxy;
pub mod patch;
pub mod serviceaccounts;
pub mod store;
pub mod types;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use store::{ApiError, EventType, Filter, ListOptions, Store, StoreConfig, transition};
use types::TypeInfo;

use kedge_common::http::Body;

/// Largest request body (the real server's limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    pub store: StoreConfig,
    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK.
    pub bookmark_interval: Duration,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            store: StoreConfig::default(),
            bookmark_interval: Duration::from_secs(1),
        }
    }
}

/// Requests served, by verb (for benchmarks: how much a client talks to the API).
#[derive(Debug, Default)]
pub struct RequestCounts {
    pub get: std::sync::atomic::AtomicU64,
    pub list: std::sync::atomic::AtomicU64,
    pub watch: std::sync::atomic::AtomicU64,
    pub create: std::sync::atomic::AtomicU64,
    pub update: std::sync::atomic::AtomicU64,
    pub patch: std::sync::atomic::AtomicU64,
    pub delete: std::sync::atomic::AtomicU64,
    pub other: std::sync::atomic::AtomicU64,
}

impl RequestCounts {
    /// `[get, list, watch, create, update, patch, delete, other]`.
    pub fn snapshot(&self) -> [u64; 8] {
        use std::sync::atomic::Ordering::Relaxed;
        [
            self.get.load(Relaxed),
            self.list.load(Relaxed),
            self.watch.load(Relaxed),
            self.create.load(Relaxed),
            self.update.load(Relaxed),
            self.patch.load(Relaxed),
            self.delete.load(Relaxed),
            self.other.load(Relaxed),
        ]
    }

    fn count(&self, method: &Method, named: bool, watch: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = match (method, named, watch) {
            (&Method::GET, _, true) => &self.watch,
            (&Method::GET, true, _) => &self.get,
            (&Method::GET, false, _) => &self.list,
            (&Method::POST, _, _) => &self.create,
            (&Method::PUT, _, _) => &self.update,
            (&Method::PATCH, _, _) => &self.patch,
            (&Method::DELETE, _, _) => &self.delete,
            _ => &self.other,
        };
        c.fetch_add(1, Relaxed);
    }
}

struct Shared {
    store: Store,
    requests: RequestCounts,
    bookmark_interval: Duration,
    /// Bumped to end every open watch (used with `Store::compact` to force re-lists).
    watch_epoch: watch::Sender<u64>,
    addr: SocketAddr,
    accounts: serviceaccounts::ServiceAccountIssuer,
    /// The cluster CA and the API server's kubelet client certificate.
    kubelet: kubelet_proxy::KubeletClient,
}

/// A running test API server. Dropping it stops it.
pub struct TestApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    shutdown: CancellationToken,
    kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestApiServer {
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(ApiServerConfig::default()).await
    }

    pub async fn start_with(config: ApiServerConfig) -> anyhow::Result<Self> {
        Self::start_on("127.0.0.1:0".parse()?, config).await
    }

    pub async fn start_on(addr: SocketAddr, config: ApiServerConfig) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let store = Store::new(config.store);
        let accounts = serviceaccounts::ServiceAccountIssuer::generate()?;
        for ns in store.namespace_names() {
            accounts.populate_namespace(&store, &ns);
        }
        let kubelet = kubelet_proxy::KubeletClient::generate()?;
        // As in a cluster: the client CA for components that authenticate API-server callers.
        if let Some(cms) = store.resolve("", "v1", "configmaps") {
            let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
                "data": {"client-ca-file": kubelet.ca_pem()}});
            store
                .create(&cms, "kube-system", cm)
                .map_err(|e| anyhow::anyhow!("client CA ConfigMap: {e:?}"))?;
        }
        let shared = Arc::new(Shared {
            kubelet,
            accounts,
            store,
            bookmark_interval: config.bookmark_interval,
            watch_epoch: watch::channel(0).0,
            addr,
            requests: RequestCounts::default(),
        });
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        write_kubeconfig(&kubeconfig, addr)?;
        let shutdown = CancellationToken::new();
        let s2 = shared.clone();
        kedge_common::http::serve(listener, shutdown.clone(), move |req| {
            handle(s2.clone(), req)
        });
        Ok(TestApiServer {
            shared,
            addr,
            shutdown,
            kubeconfig,
            _dir: dir,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kubeconfig file pointing at this server (for kubectl and cloudcore's `--kubeconfig`).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// A kube-rs client for this server.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let url: http::Uri = self.url().parse()?;
        let config = kube::Config::new(url);
        Ok(kube::Client::try_from(config)?)
    }

    /// Creates a namespace (e.g. cloudcore's `kubeedge`) through the API.
    pub async fn create_namespace(&self, name: &str) -> anyhow::Result<()> {
        use k8s_openapi::api::core::v1::Namespace;
        let api: kube::Api<Namespace> = kube::Api::all(self.client()?);
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        api.create(&kube::api::PostParams::default(), &ns).await?;
        Ok(())
    }

    pub fn store(&self) -> &Store {
        &self.shared.store
    }

    /// Checks a service account token this server issued; returns its claims.
    pub fn verify_token(&self, token: &str) -> anyhow::Result<Value> {
        self.shared.accounts.verify(token)
    }

    /// Test support: a node unreachable for `unreachable_for`, as the node lifecycle and taint
    /// eviction controllers would treat it (see [`eviction`]). Returns the evicted pods.
    pub fn evict_unreachable(
        &self,
        node: &str,
        unreachable_for: Duration,
    ) -> anyhow::Result<Vec<String>> {
        eviction::evict_unreachable(&self.shared.store, node, unreachable_for)
            .map_err(|e| anyhow::anyhow!("{}", e.message))
    }

    /// The cluster's root CA certificate (as in every namespace's `kube-root-ca.crt`).
    /// The cluster CA, which signs the API server's kubelet client certificate (PEM).
    pub fn client_ca_pem(&self) -> &str {
        self.shared.kubelet.ca_pem()
    }

    /// The cluster CA, to issue client certificates of other users in tests.
    pub fn cluster_ca(&self) -> &kedge_common::pki::CertificateAuthority {
        &self.shared.kubelet.ca
    }

    pub fn root_ca_pem(&self) -> &str {
        self.shared.accounts.root_ca_pem()
    }

    /// Resource requests served so far, by verb.
    pub fn requests(&self) -> &RequestCounts {
        &self.shared.requests
    }

    /// Ends every open watch and forgets the watch history, so clients must re-list (their next
    /// watch from an old resourceVersion gets 410 Gone).
    pub fn expire_watches(&self) {
        self.shared.store.compact();
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn write_kubeconfig(path: &Path, addr: SocketAddr) -> std::io::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kedge-test\n  cluster:\n    server: http://{addr}\n\
         contexts:\n- name: kedge-test\n  context:\n    cluster: kedge-test\n    user: kedge-test\n    namespace: default\n\
         current-context: kedge-test\nusers:\n- name: kedge-test\n  user: {{}}\n"
    );
    std::fs::write(path, text)
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    let mut r = Response::new(Full::new(bytes).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn ok(body: Value) -> Response<Body> {
    full(StatusCode::OK, body)
}

fn error(e: &ApiError) -> Response<Body> {
    full(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        e.status_json(),
    )
}

fn not_found_path() -> Response<Body> {
    error(&ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    ))
}

fn method_not_allowed(method: &Method) -> Response<Body> {
    error(&ApiError::new(
        405,
        "MethodNotAllowed",
        format!("the server does not allow this method on the requested resource ({method})"),
    ))
}

use kedge_common::http::percent_decode;

fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    kedge_common::http::parse_query(req.uri().query())
}

fn q<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kedge_common::http::query_value(params, key)
}

fn truthy(v: Option<&str>) -> bool {
    matches!(v, Some("1" | "true" | "True"))
}

async fn read_body(req: Request<Incoming>) -> Result<(String, Value), ApiError> {
    let ct = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_owned();
    let known = ct.starts_with("application/json")
        || ct.contains("yaml")
        || ct.starts_with("application/merge-patch+json")
        || ct.starts_with("application/strategic-merge-patch+json")
        || ct.starts_with("application/json-patch+json")
        || ct.starts_with("*/*");
    if !known {
        // Protobuf and CBOR are not spoken here; clients fall back to JSON on 415.
        return Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {ct})"
            ),
        ));
    }
    let bytes = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                "RequestEntityTooLarge",
                "the request body is too large",
            )
        })?
        .to_bytes();
    let value = match serde_json::from_slice::<Value>(&bytes) {
        Ok(v) => v,
        Err(json_err) if ct.contains("yaml") => {
            serde_yaml::from_slice::<Value>(&bytes).map_err(|e| {
                ApiError::bad_request(format!("error decoding YAML: {e} (as JSON: {json_err})"))
            })?
        }
        Err(e) => {
            return Err(ApiError::bad_request(format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml ({e})"
            )));
        }
    };
    Ok((ct, value))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let segs: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["version"] => ok(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-kedge-test", "gitCommit": "0000000",
            "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24.0",
            "compiler": "gc", "platform": "linux/amd64"
        })),
        ["healthz"] | ["readyz"] | ["livez"] => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"ok")).boxed());
            *r.status_mut() = StatusCode::OK;
            r
        }
        ["api"] => ok(json!({
            "kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}]
        })),
        ["api", "v1"] => ok(resource_list(&shared.store.types(), "", "v1")),
        ["apis"] => ok(group_list(&shared.store.types())),
        ["apis", g] => {
            let list = group_list(&shared.store.types());
            match list["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["name"] == *g))
            {
                Some(grp) => {
                    let mut grp = grp.clone();
                    grp["kind"] = json!("APIGroup");
                    grp["apiVersion"] = json!("v1");
                    ok(grp)
                }
                None => not_found_path(),
            }
        }
        ["apis", g, v] => {
            let types = shared.store.types();
            if types.iter().any(|t| t.group == *g && t.version == *v) {
                ok(resource_list(&types, g, v))
            } else {
                not_found_path()
            }
        }
        ["api", "v1", rest @ ..] => {
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            resource(shared, req, "", "v1", &rest).await
        }
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]
            if req.method() == Method::POST =>
        {
            match read_body(req).await {
                Ok((_, body)) => full(
                    StatusCode::CREATED,
                    kubelet_proxy::subject_access_review(&body),
                ),
                Err(e) => error(&e),
            }
        }
        ["apis", g, v, rest @ ..] => {
            let (g, v) = ((*g).to_owned(), (*v).to_owned());
            let rest: Vec<String> = rest.iter().map(|s| (*s).to_owned()).collect();
            resource(shared, req, &g, &v, &rest).await
        }
        _ => not_found_path(),
    }
}

fn resource_list(types: &[TypeInfo], group: &str, version: &str) -> Value {
    let resources: Vec<Value> = types
        .iter()
        .filter(|t| t.group == group && t.version == version)
        .flat_map(TypeInfo::discovery)
        .collect();
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

fn group_list(types: &[TypeInfo]) -> Value {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for t in types.iter().filter(|t| !t.group.is_empty()) {
        match groups.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, vs)) => {
                if !vs.contains(&t.version) {
                    vs.push(t.version.clone());
                }
            }
            None => groups.push((t.group.clone(), vec![t.version.clone()])),
        }
    }
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|(g, vs)| {
            let versions: Vec<Value> = vs
                .iter()
                .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                .collect();
            let preferred = versions[0].clone();
            json!({"name": g, "versions": versions, "preferredVersion": preferred})
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// Which object or collection a resource path names.
struct Target {
    ty: TypeInfo,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn resolve(store: &Store, group: &str, version: &str, rest: &[String]) -> Option<Target> {
    let find = |plural: &str| store.resolve(group, version, plural);
    let r: Vec<&str> = rest.iter().map(String::as_str).collect();
    match r.as_slice() {
        ["namespaces", ns, plural, tail @ ..]
            if find(plural).is_some_and(|t| t.namespaced) && tail.len() <= 2 =>
        {
            Some(Target {
                ty: find(plural)?,
                namespace: Some((*ns).to_owned()),
                name: tail.first().map(|s| (*s).to_owned()),
                sub: tail.get(1).map(|s| (*s).to_owned()),
            })
        }
        [plural, tail @ ..] if tail.len() <= 2 => Some(Target {
            ty: find(plural)?,
            namespace: None,
            name: tail.first().map(|s| (*s).to_owned()),
            sub: tail.get(1).map(|s| (*s).to_owned()),
        }),
        _ => None,
    }
}

async fn resource(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    group: &str,
    version: &str,
    rest: &[String],
) -> Response<Body> {
    let Some(t) = resolve(&shared.store, group, version, rest) else {
        return not_found_path();
    };
    let params = query(&req);
    let method = req.method().clone();
    shared
        .requests
        .count(&method, t.name.is_some(), truthy(q(&params, "watch")));
    let store = &shared.store;
    if let (Some(ns), Some(name), Some(sub)) = (&t.namespace, &t.name, t.sub.as_deref())
        && t.ty.group.is_empty()
        && t.ty.plural == "pods"
        && ["log", "exec", "attach", "portforward"].contains(&sub)
    {
        return kubelet_proxy::proxy(store, &shared.kubelet, req, ns, name, sub).await;
    }
    // Namespaced objects need a namespace; cluster-scoped ones must not have one.
    let ns = match (&t.namespace, t.ty.namespaced) {
        (Some(ns), true) => ns.clone(),
        (None, true) if t.name.is_none() => String::new(),
        (None, true) => return not_found_path(),
        (Some(_), false) => return not_found_path(),
        (None, false) => String::new(),
    };
    let result: Result<Value, ApiError> = match (&t.name, t.sub.as_deref(), &method) {
        (None, None, &Method::GET) => {
            let opts = ListOptions {
                label_selector: q(&params, "labelSelector").map(str::to_owned),
                field_selector: q(&params, "fieldSelector").map(str::to_owned),
                resource_version: q(&params, "resourceVersion").map(str::to_owned),
                limit: q(&params, "limit").and_then(|l| l.parse().ok()),
                continue_token: q(&params, "continue")
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned),
            };
            let ns_filter = t.namespace.as_deref();
            if truthy(q(&params, "watch")) {
                return watch_response(shared.clone(), &t.ty, ns_filter, &opts, &params);
            }
            store.list(&t.ty, ns_filter, &opts)
        }
        (None, None, &Method::POST) => {
            if t.ty.namespaced && t.namespace.is_none() {
                return method_not_allowed(&method);
            }
            let is_core = |plural: &str| t.ty.group.is_empty() && t.ty.plural == plural;
            let created = read_body(req).await.and_then(|(_, mut body)| {
                if is_core("pods") {
                    shared.accounts.admit_pod(store, &ns, &mut body)?;
                }
                store.create(&t.ty, &ns, body)
            });
            if let (Ok(v), true) = (&created, is_core("namespaces"))
                && let Some(name) = v.pointer("/metadata/name").and_then(Value::as_str)
            {
                shared.accounts.populate_namespace(store, name);
            }
            return match created {
                Ok(v) => full(StatusCode::CREATED, v),
                Err(e) => error(&e),
            };
        }
        (Some(name), Some("binding"), &Method::POST)
            if t.ty.group.is_empty() && t.ty.plural == "pods" =>
        {
            // The scheduler's binding: sets spec.nodeName once.
            return match read_body(req).await.and_then(|(_, body)| {
                let node = body
                    .pointer("/target/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let pod = store.get(&t.ty, &ns, name)?;
                if let Some(bound) = pod
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .filter(|n| !n.is_empty())
                {
                    return Err(store::ApiError::new(
                        409,
                        "Conflict",
                        format!("pod {name} is already assigned to node \"{bound}\""),
                    ));
                }
                store.patch(
                    &t.ty,
                    &ns,
                    name,
                    "application/merge-patch+json",
                    &json!({"spec": {"nodeName": node}}),
                    false,
                )
            }) {
                Ok(_) => full(
                    StatusCode::CREATED,
                    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
                ),
                Err(e) => error(&e),
            };
        }
        (Some(name), Some("token"), &Method::POST)
            if t.ty.group.is_empty() && t.ty.plural == "serviceaccounts" =>
        {
            return match read_body(req)
                .await
                .and_then(|(_, body)| shared.accounts.token_request(store, &ns, name, &body))
            {
                Ok(v) => full(StatusCode::CREATED, v),
                Err(e) => error(&e),
            };
        }
        (Some(name), sub @ (None | Some("status")), m) => {
            let status = sub == Some("status");
            if status && !t.ty.status_subresource {
                return not_found_path();
            }
            match *m {
                Method::GET => store.get(&t.ty, &ns, name),
                Method::PUT => match read_body(req).await {
                    Ok((_, body)) => store.update(&t.ty, &ns, name, body, status),
                    Err(e) => Err(e),
                },
                Method::PATCH => match read_body(req).await {
                    Ok((ct, body)) => store.patch(&t.ty, &ns, name, &ct, &body, status),
                    Err(e) => Err(e),
                },
                Method::DELETE if !status => {
                    let grace_q = q(&params, "gracePeriodSeconds").and_then(|g| g.parse().ok());
                    let body = read_body(req).await.ok().map(|(_, b)| b);
                    let grace = body
                        .as_ref()
                        .and_then(|b| b.get("gracePeriodSeconds"))
                        .and_then(Value::as_i64)
                        .or(grace_q);
                    let uid = body
                        .as_ref()
                        .and_then(|b| b.pointer("/preconditions/uid"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    let rv = body
                        .as_ref()
                        .and_then(|b| b.pointer("/preconditions/resourceVersion"))
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    store.delete(&t.ty, &ns, name, grace, uid.as_deref(), rv.as_deref())
                }
                _ => return method_not_allowed(&method),
            }
        }
        (Some(_), Some(_), _) => return not_found_path(),
        _ => return method_not_allowed(&method),
    };
    match result {
        Ok(v) => ok(v),
        Err(e) => error(&e),
    }
}

fn watch_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(
    shared: Arc<Shared>,
    ty: &TypeInfo,
    namespace: Option<&str>,
    opts: &ListOptions,
    params: &[(String, String)],
) -> Response<Body> {
    let filter = match Filter::new(ty, namespace, opts) {
        Ok(f) => f,
        Err(e) => return error(&e),
    };
    let start = match shared
        .store
        .watch(ty, &filter, opts.resource_version.as_deref())
    {
        Ok(s) => s,
        Err(e) => return error(&e),
    };
    let bookmarks = truthy(q(params, "allowWatchBookmarks"));
    let timeout = q(params, "timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::channel::<Bytes>(1024);
    let ty = ty.clone();
    let mut epoch = shared.watch_epoch.subscribe();
    tokio::spawn(async move {
        let store::WatchStart {
            initial,
            after,
            mut rx,
            expired,
        } = start;
        if let Some(e) = expired {
            let _ = tx.send(watch_line("ERROR", &e.status_json())).await;
            return;
        }
        let mut last = after;
        for (kind, obj) in initial {
            if let Some(rv) = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|r| r.parse::<u64>().ok())
            {
                last = last.max(rv);
            }
            if tx.send(watch_line(kind.as_str(), &obj)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut bookmark = tokio::time::interval(shared.bookmark_interval);
        bookmark.tick().await;
        let deliver = |ev: &store::Event| -> Option<Bytes> {
            if ev.rv <= after || ev.group != ty.group || ev.plural != ty.plural {
                return None;
            }
            let kind: EventType = transition(ev, &filter)?;
            Some(watch_line(
                kind.as_str(),
                &store::with_type(&ty, ev.object.clone()),
            ))
        };
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                _ = epoch.changed() => return,
                _ = tx.closed() => return,
                ev = rx.recv() => match ev {
                    Ok(ev) => {
                        last = last.max(ev.rv);
                        if let Some(line) = deliver(&ev) && tx.send(line).await.is_err() {
                            return;
                        }
                    }
                    // A watcher that cannot keep up is closed; it re-watches from its last
                    // resourceVersion, as with a real server.
                    Err(broadcast::error::RecvError::Lagged(_)) | Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = bookmark.tick(), if bookmarks => {
                    // Everything committed up to `now` is already in `rx`: deliver it first.
                    let now = shared.store.current_rv();
                    loop {
                        match rx.try_recv() {
                            Ok(ev) => {
                                last = last.max(ev.rv);
                                if let Some(line) = deliver(&ev) && tx.send(line).await.is_err() {
                                    return;
                                }
                            }
                            Err(broadcast::error::TryRecvError::Empty) => break,
                            Err(_) => return,
                        }
                    }
                    let rv = now.max(last);
                    let obj = json!({"kind": ty.kind, "apiVersion": ty.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    if tx.send(watch_line("BOOKMARK", &obj)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
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
