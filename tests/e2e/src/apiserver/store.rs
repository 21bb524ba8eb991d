//! The test API server's storage: every object as JSON, a global resourceVersion, an event
//! history window for watches (older resourceVersions get 410 Gone), and the write semantics of
//! the real server (optimistic concurrency, status subresource, finalizers, graceful pod
//! deletion, generation, namespaces, CRD registration).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast;

use super::patch;
use super::types::{TypeInfo, builtin_types, types_from_crd};
use kedge_common::selectors::{FieldSelector, LabelSelector, supported_fields};

/// An error answered as a `Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<(String, String)>,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn with(mut self, name: &str, kind: &str) -> Self {
        self.details = Some((name.to_owned(), kind.to_owned()));
        self
    }

    pub fn not_found(ty: &TypeInfo, name: &str) -> Self {
        ApiError::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", ty.qualified()),
        )
        .with(name, &ty.plural)
    }

    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::new(400, "BadRequest", msg)
    }

    pub fn status_json(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some((name, kind)) = &self.details {
            s["details"] = json!({"name": name, "kind": kind});
        }
        s
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One committed change.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub group: String,
    pub plural: String,
    pub namespace: String,
    pub kind: EventType,
    pub object: Value,
    /// The object before the change (for selector transitions).
    pub old: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// How many events watches can resume from; older resourceVersions get 410 Gone.
    pub history_limit: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            history_limit: 100_000,
        }
    }
}

type Collection = BTreeMap<(String, String), Value>;

struct State {
    rv: u64,
    types: Vec<TypeInfo>,
    data: HashMap<(String, String), Collection>,
    history: VecDeque<Arc<Event>>,
    /// Watches from a resourceVersion below this are too old.
    compacted: u64,
    limit: usize,
}

/// List and watch options, from the query string.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
    pub resource_version: Option<String>,
    pub limit: Option<usize>,
    pub continue_token: Option<String>,
}

pub struct Filter {
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filter {
    pub fn new(ty: &TypeInfo, namespace: Option<&str>, opts: &ListOptions) -> ApiResult<Filter> {
        let labels = LabelSelector::parse(opts.label_selector.as_deref().unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(
            opts.field_selector.as_deref().unwrap_or(""),
            supported_fields(&ty.group, &ty.plural),
        )
        .map_err(ApiError::bad_request)?;
        Ok(Filter {
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
        })
    }

    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace {
            let objns = obj.pointer("/metadata/namespace").and_then(Value::as_str);
            if objns != Some(ns.as_str()) {
                return false;
            }
        }
        self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// What a watch starts with: events to send first, then the live subscription.
pub struct WatchStart {
    pub initial: Vec<(EventType, Value)>,
    /// Live events with `rv > after` are to be delivered.
    pub after: u64,
    pub rx: broadcast::Receiver<Arc<Event>>,
    pub expired: Option<ApiError>,
}

pub struct Store {
    state: Mutex<State>,
    events: broadcast::Sender<Arc<Event>>,
}

/// The API server's rule for a running pod's tolerations (`validateOnlyAddedTolerations`):
/// entries may be added, and existing ones may change only their `tolerationSeconds`.
fn validate_pod_update(
    ty: &TypeInfo,
    name: &str,
    old: &Value,
    new: &Value,
    status: bool,
) -> ApiResult<()> {
    if status || !ty.group.is_empty() || ty.plural != "pods" {
        return Ok(());
    }
    let list = |v: &Value| {
        v.pointer("/spec/tolerations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    };
    let (before, after) = (list(old), list(new));
    for o in &before {
        let kept = after.iter().any(|n| {
            let mut o = o.clone();
            match (o.as_object_mut(), n.get("tolerationSeconds")) {
                (Some(m), Some(secs)) => {
                    m.insert("tolerationSeconds".into(), secs.clone());
                }
                (Some(m), None) => {
                    m.remove("tolerationSeconds");
                }
                _ => {}
            }
            &o == n
        });
        if !kept {
            return Err(ApiError::new(
                422,
                "Invalid",
                format!(
                    "Pod \"{name}\" is invalid: spec.tolerations: Forbidden: existing toleration can not be modified except its tolerationSeconds"
                ),
            ));
        }
    }
    Ok(())
}

pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(root) = obj else {
        unreachable!("made an object above")
    };
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let Value::Object(m) = meta else {
        unreachable!("made an object above")
    };
    m
}

/// Everything but metadata and status: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Value::Object(m) = &mut o {
        m.remove("metadata");
        m.remove("status");
    }
    o
}

fn has_finalizers(obj: &Value) -> bool {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

impl Store {
    pub fn new(config: StoreConfig) -> Self {
        let mut data = HashMap::new();
        let mut state = State {
            rv: 1,
            types: builtin_types(),
            data: HashMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            limit: config.history_limit,
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            state.rv += 1;
            let obj = json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": ns, "uid": uuid::Uuid::new_v4().to_string(),
                    "resourceVersion": state.rv.to_string(), "creationTimestamp": now_rfc3339(),
                    "labels": {"kubernetes.io/metadata.name": ns}},
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"}
            });
            data.entry((String::new(), "namespaces".to_owned()))
                .or_insert_with(Collection::new)
                .insert((String::new(), ns.to_owned()), obj);
        }
        state.data = data;
        Store {
            state: Mutex::new(state),
            events: broadcast::channel(1 << 16).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The names of every namespace.
    pub fn namespace_names(&self) -> Vec<String> {
        let s = self.lock();
        s.data
            .get(&(String::new(), "namespaces".to_owned()))
            .map(|c| c.keys().map(|(_, n)| n.clone()).collect())
            .unwrap_or_default()
    }

    pub fn current_rv(&self) -> u64 {
        self.lock().rv
    }

    /// Forgets all watch history: every watch from an older resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.rv;
        s.history.clear();
    }

    pub fn types(&self) -> Vec<TypeInfo> {
        self.lock().types.clone()
    }

    pub fn resolve(&self, group: &str, version: &str, plural: &str) -> Option<TypeInfo> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    fn commit(
        &self,
        s: &mut State,
        ty: &TypeInfo,
        (ns, name): (&str, &str),
        kind: EventType,
        mut obj: Value,
        old: Option<Value>,
    ) -> Value {
        s.rv += 1;
        let rv = s.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), Value::String(rv.to_string()));
        let coll = s
            .data
            .entry((ty.group.clone(), ty.plural.clone()))
            .or_default();
        if kind == EventType::Deleted {
            coll.remove(&(ns.to_owned(), name.to_owned()));
        } else {
            coll.insert((ns.to_owned(), name.to_owned()), obj.clone());
        }
        let ev = Arc::new(Event {
            rv,
            group: ty.group.clone(),
            plural: ty.plural.clone(),
            namespace: ns.to_owned(),
            kind,
            object: obj.clone(),
            old,
        });
        s.history.push_back(ev.clone());
        while s.history.len() > s.limit {
            if let Some(e) = s.history.pop_front() {
                s.compacted = e.rv;
            }
        }
        // Sent under the lock, so watchers see events in resourceVersion order.
        let _ = self.events.send(ev);
        obj
    }

    fn check_namespace(&self, s: &State, ty: &TypeInfo, ns: &str) -> ApiResult<()> {
        if !ty.namespaced {
            return Ok(());
        }
        let exists = s
            .data
            .get(&(String::new(), "namespaces".to_owned()))
            .is_some_and(|c| c.contains_key(&(String::new(), ns.to_owned())));
        if exists {
            Ok(())
        } else {
            Err(
                ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                    .with(ns, "namespaces"),
            )
        }
    }

    fn get_locked(s: &State, ty: &TypeInfo, ns: &str, name: &str) -> ApiResult<Value> {
        s.data
            .get(&(ty.group.clone(), ty.plural.clone()))
            .and_then(|c| c.get(&(ns.to_owned(), name.to_owned())))
            .cloned()
            .ok_or_else(|| ApiError::not_found(ty, name))
    }

    pub fn get(&self, ty: &TypeInfo, ns: &str, name: &str) -> ApiResult<Value> {
        let s = self.lock();
        Self::get_locked(&s, ty, ns, name).map(|o| with_type(ty, o))
    }

    pub fn list(&self, ty: &TypeInfo, ns: Option<&str>, opts: &ListOptions) -> ApiResult<Value> {
        let filter = Filter::new(ty, ns, opts)?;
        let s = self.lock();
        let (list_rv, start_after) = match &opts.continue_token {
            Some(tok) => {
                let (rv, key) = decode_continue(tok)?;
                if rv < s.compacted {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    ));
                }
                (rv, Some(key))
            }
            None => (s.rv, None),
        };
        let mut items = Vec::new();
        let mut next = None;
        let mut last_key: Option<(String, String)> = None;
        if let Some(coll) = s.data.get(&(ty.group.clone(), ty.plural.clone())) {
            let iter: Box<dyn Iterator<Item = (&(String, String), &Value)>> = match &start_after {
                Some(k) => Box::new(coll.range::<(String, String), _>((
                    std::ops::Bound::Excluded(k.clone()),
                    std::ops::Bound::Unbounded,
                ))),
                None => Box::new(coll.iter()),
            };
            for (key, obj) in iter {
                if !filter.matches(obj) {
                    continue;
                }
                if opts.limit.is_some_and(|l| l > 0 && items.len() >= l) {
                    // Resume after the last item of this page.
                    next = last_key.as_ref().map(|k| encode_continue(list_rv, k));
                    break;
                }
                last_key = Some(key.clone());
                items.push(with_type(ty, obj.clone()));
            }
        }
        let mut meta = json!({"resourceVersion": list_rv.to_string()});
        if let Some(c) = next {
            meta["continue"] = Value::String(c);
        }
        Ok(json!({
            "kind": format!("{}List", ty.kind),
            "apiVersion": ty.api_version(),
            "metadata": meta,
            "items": items,
        }))
    }

    pub fn create(&self, ty: &TypeInfo, ns: &str, mut body: Value) -> ApiResult<Value> {
        check_body(ty, &body)?;
        let mut s = self.lock();
        self.check_namespace(&s, ty, ns)?;
        if ty.namespaced {
            match meta_str(&body, "namespace") {
                Some(bns) if bns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
        }
        let name = match meta_str(&body, "name").filter(|n| !n.is_empty()) {
            Some(n) => n.to_owned(),
            None => match meta_str(&body, "generateName").filter(|n| !n.is_empty()) {
                Some(prefix) => {
                    let suffix: String = uuid::Uuid::new_v4().simple().to_string()[..5].to_owned();
                    format!("{prefix}{suffix}")
                }
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                            ty.kind
                        ),
                    ));
                }
            },
        };
        if Self::get_locked(&s, ty, ns, &name).is_ok() {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", ty.qualified()),
            )
            .with(&name, &ty.plural));
        }
        let crd_types =
            if ty.group == "apiextensions.k8s.io" && ty.plural == "customresourcedefinitions" {
                let types = types_from_crd(&body).map_err(|e| {
                ApiError::new(
                    422,
                    "Invalid",
                    format!(
                        "CustomResourceDefinition.apiextensions.k8s.io \"{name}\" is invalid: {e}"
                    ),
                )
            })?;
                Some(types)
            } else {
                None
            };
        {
            let m = meta_mut(&mut body);
            m.insert("name".into(), Value::String(name.clone()));
            if ty.namespaced {
                m.insert("namespace".into(), Value::String(ns.to_owned()));
            } else {
                m.remove("namespace");
            }
            m.insert(
                "uid".into(),
                Value::String(uuid::Uuid::new_v4().to_string()),
            );
            m.insert("creationTimestamp".into(), Value::String(now_rfc3339()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
        }
        // Status on create, as the real strategies do.
        if ty.group.is_empty() && ty.plural == "pods" {
            body["status"] = json!({"phase": "Pending"});
        } else if ty.group.is_empty() && ty.plural == "namespaces" {
            body["status"] = json!({"phase": "Active"});
            meta_mut(&mut body)
                .entry("labels")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|l| {
                    l.insert(
                        "kubernetes.io/metadata.name".into(),
                        Value::String(name.clone()),
                    )
                });
        } else if let Some(types) = &crd_types {
            let names = body.pointer("/spec/names").cloned().unwrap_or(json!({}));
            body["status"] = json!({
                "acceptedNames": names,
                "storedVersions": types.iter().map(|t| t.version.clone()).collect::<Vec<_>>(),
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now_rfc3339()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now_rfc3339()}
                ]
            });
        } else if ty.from_crd
            && ty.status_subresource
            && let Value::Object(m) = &mut body
        {
            m.remove("status");
        }
        let body = with_type(ty, body);
        let stored_ns = if ty.namespaced { ns } else { "" };
        let out = self.commit(&mut s, ty, (stored_ns, &name), EventType::Added, body, None);
        if let Some(types) = crd_types {
            for t in types {
                s.types.retain(|x| {
                    !(x.group == t.group && x.version == t.version && x.plural == t.plural)
                });
                s.types.push(t);
            }
        }
        Ok(out)
    }

    /// PUT. `status` selects the status subresource.
    pub fn update(
        &self,
        ty: &TypeInfo,
        ns: &str,
        name: &str,
        body: Value,
        status: bool,
    ) -> ApiResult<Value> {
        check_body(ty, &body)?;
        if meta_str(&body, "name").is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let mut s = self.lock();
        let old = Self::get_locked(&s, ty, ns, name)?;
        if let Some(rv) = meta_str(&body, "resourceVersion").filter(|r| !r.is_empty())
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(conflict(ty, name));
        }
        if let Some(uid) = meta_str(&body, "uid").filter(|u| !u.is_empty())
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    ty.qualified(),
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        let new = self.merge_update(ty, &old, body, status);
        validate_pod_update(ty, name, &old, &new, status)?;
        self.finish_write(&mut s, ty, ns, name, old, new)
    }

    /// Applies spec/status separation and immutable metadata to a proposed new object.
    fn merge_update(&self, ty: &TypeInfo, old: &Value, proposed: Value, status: bool) -> Value {
        let mut new = if status {
            // Only status changes through /status.
            let mut n = old.clone();
            match proposed.get("status") {
                Some(st) => n["status"] = st.clone(),
                None => {
                    if let Value::Object(m) = &mut n {
                        m.remove("status");
                    }
                }
            }
            n
        } else {
            let mut n = proposed;
            if ty.status_subresource {
                match old.get("status") {
                    Some(st) => n["status"] = st.clone(),
                    None => {
                        if let Value::Object(m) = &mut n {
                            m.remove("status");
                        }
                    }
                }
            }
            n
        };
        let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
        {
            let m = meta_mut(&mut new);
            for k in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old_meta.get(k) {
                    Some(v) => {
                        m.insert(k.into(), v.clone());
                    }
                    None => {
                        m.remove(k);
                    }
                }
            }
            if status {
                // Metadata does not change through /status (except what the server sets).
                let labels = old_meta.get("labels").cloned();
                let ann = old_meta.get("annotations").cloned();
                let fin = old_meta.get("finalizers").cloned();
                for (k, v) in [
                    ("labels", labels),
                    ("annotations", ann),
                    ("finalizers", fin),
                ] {
                    match v {
                        Some(v) => {
                            m.insert(k.into(), v);
                        }
                        None => {
                            m.remove(k);
                        }
                    }
                }
            }
        }
        if spec_part(&new) != spec_part(old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(1);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        with_type(ty, new)
    }

    fn finish_write(
        &self,
        s: &mut State,
        ty: &TypeInfo,
        ns: &str,
        name: &str,
        old: Value,
        new: Value,
    ) -> ApiResult<Value> {
        // Unchanged objects keep their resourceVersion and make no event (as the real server).
        let strip_rv = |v: &Value| {
            let mut v = v.clone();
            if let Some(Value::Object(m)) = v.get_mut("metadata") {
                m.remove("resourceVersion");
                m.remove("managedFields");
            }
            v
        };
        if strip_rv(&old) == strip_rv(&new) {
            return Ok(old);
        }
        let deleting = new.pointer("/metadata/deletionTimestamp").is_some();
        if deleting
            && !has_finalizers(&new)
            && !(ty.group.is_empty() && ty.plural == "pods" && grace_pending(&new))
        {
            let out = self.commit(s, ty, (ns, name), EventType::Deleted, new, Some(old));
            return Ok(out);
        }
        Ok(self.commit(s, ty, (ns, name), EventType::Modified, new, Some(old)))
    }

    /// PATCH (`content_type` selects the kind). `apply` creates a missing object (server-side
    /// apply, approximated as a merge patch of the applied configuration).
    pub fn patch(
        &self,
        ty: &TypeInfo,
        ns: &str,
        name: &str,
        content_type: &str,
        patch_body: &Value,
        status: bool,
    ) -> ApiResult<Value> {
        let ct = content_type.split(';').next().unwrap_or("").trim();
        let apply = ct == "application/apply-patch+yaml";
        let existing = {
            let s = self.lock();
            Self::get_locked(&s, ty, ns, name)
        };
        let old = match existing {
            Ok(o) => o,
            Err(e) if apply && !status => {
                let _ = e;
                let mut body = patch_body.clone();
                meta_mut(&mut body).insert("name".into(), Value::String(name.to_owned()));
                return self.create(ty, ns, body);
            }
            Err(e) => return Err(e),
        };
        let mut doc = old.clone();
        match ct {
            "application/merge-patch+json" | "application/apply-patch+yaml" => {
                patch::merge_patch(&mut doc, patch_body)
            }
            "application/strategic-merge-patch+json" => {
                if !ty.strategic_merge {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                patch::strategic_merge_patch(&mut doc, patch_body)
                    .map_err(ApiError::bad_request)?;
            }
            "application/json-patch+json" => {
                patch::json_patch(&mut doc, patch_body).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!(
                            "the server rejected our request due to an error in our request: {e}"
                        ),
                    )
                })?;
            }
            other => {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                    ),
                ));
            }
        }
        // A resourceVersion in the patch is a precondition.
        if let Some(rv) = patch_body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(conflict(ty, name));
        }
        let mut s = self.lock();
        let current = Self::get_locked(&s, ty, ns, name)?;
        if meta_str(&current, "resourceVersion") != meta_str(&old, "resourceVersion") {
            // Someone wrote in between: retry the patch on the newer object (as the server does).
            drop(s);
            return self.patch(ty, ns, name, content_type, patch_body, status);
        }
        let new = self.merge_update(ty, &old, doc, status);
        validate_pod_update(ty, name, &old, &new, status)?;
        self.finish_write(&mut s, ty, ns, name, old, new)
    }

    /// DELETE. Returns the object (when it still exists, or for pods) or a success `Status`.
    pub fn delete(
        &self,
        ty: &TypeInfo,
        ns: &str,
        name: &str,
        grace_period: Option<i64>,
        precondition_uid: Option<&str>,
        precondition_rv: Option<&str>,
    ) -> ApiResult<Value> {
        let mut s = self.lock();
        let old = Self::get_locked(&s, ty, ns, name)?;
        if let Some(uid) = precondition_uid
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    ty.qualified(),
                    meta_str(&old, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = precondition_rv
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(conflict(ty, name));
        }
        let is_pod = ty.group.is_empty() && ty.plural == "pods";
        let grace = if is_pod {
            let bound = old
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty());
            let terminal = matches!(
                old.pointer("/status/phase").and_then(Value::as_str),
                Some("Succeeded" | "Failed")
            );
            let default = old
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30);
            if !bound || terminal {
                0
            } else {
                grace_period.unwrap_or(default).max(0)
            }
        } else {
            0
        };
        let finalizers = has_finalizers(&old);
        if finalizers || grace > 0 {
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                // Already terminating: a shorter grace period may finish a pod's deletion.
                if is_pod && grace == 0 && !finalizers {
                    let out = self.commit(
                        &mut s,
                        ty,
                        (ns, name),
                        EventType::Deleted,
                        old.clone(),
                        Some(old),
                    );
                    return Ok(out);
                }
                return Ok(old);
            }
            let mut new = old.clone();
            {
                let m = meta_mut(&mut new);
                m.insert("deletionTimestamp".into(), Value::String(now_rfc3339()));
                m.insert("deletionGracePeriodSeconds".into(), json!(grace));
            }
            return Ok(self.commit(&mut s, ty, (ns, name), EventType::Modified, new, Some(old)));
        }
        let uid = meta_str(&old, "uid").unwrap_or_default().to_owned();
        let deleted = self.commit(
            &mut s,
            ty,
            (ns, name),
            EventType::Deleted,
            old.clone(),
            Some(old.clone()),
        );
        // Cascade what a real server's controllers would remove.
        if ty.group.is_empty() && ty.plural == "namespaces" {
            let keys: Vec<(String, String)> = s.data.keys().cloned().collect();
            for (g, p) in keys {
                let Some(t) = s
                    .types
                    .iter()
                    .find(|t| t.group == g && t.plural == p && t.namespaced)
                    .cloned()
                else {
                    continue;
                };
                self.delete_all(&mut s, &t, |ns| ns == name);
            }
        }
        if ty.group == "apiextensions.k8s.io" && ty.plural == "customresourcedefinitions" {
            let group = old
                .pointer("/spec/group")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let plural = old
                .pointer("/spec/names/plural")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            if let Some(t) = s
                .types
                .iter()
                .find(|t| t.group == group && t.plural == plural)
                .cloned()
            {
                self.delete_all(&mut s, &t, |_| true);
            }
            s.types
                .retain(|t| !(t.group == group && t.plural == plural));
        }
        if is_pod {
            return Ok(deleted);
        }
        Ok(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": name, "group": ty.group, "kind": ty.plural, "uid": uid}
        }))
    }

    /// Deletes every object of `ty` in a namespace `in_ns` accepts, with DELETED events (the
    /// cascades real controllers perform for namespaces and CRDs).
    fn delete_all(&self, s: &mut State, ty: &TypeInfo, in_ns: impl Fn(&str) -> bool) {
        let victims: Vec<((String, String), Value)> = s
            .data
            .get(&(ty.group.clone(), ty.plural.clone()))
            .map(|c| {
                c.iter()
                    .filter(|((ns, _), _)| in_ns(ns))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        for ((ns, name), obj) in victims {
            self.commit(
                s,
                ty,
                (&ns, &name),
                EventType::Deleted,
                obj.clone(),
                Some(obj),
            );
        }
    }

    /// Starts a watch: the events to send first and the live subscription.
    pub fn watch(&self, ty: &TypeInfo, filter: &Filter, rv: Option<&str>) -> ApiResult<WatchStart> {
        let s = self.lock();
        let rx = self.events.subscribe();
        let from = match rv {
            None | Some("") | Some("0") => None,
            Some(r) => Some(
                r.parse::<u64>()
                    .map_err(|_| ApiError::bad_request(format!("invalid resource version: {r}")))?,
            ),
        };
        let Some(from) = from else {
            // No resourceVersion: the current state as ADDED events, then changes.
            let mut initial = Vec::new();
            if let Some(coll) = s.data.get(&(ty.group.clone(), ty.plural.clone())) {
                for obj in coll.values() {
                    if filter.matches(obj) {
                        initial.push((EventType::Added, with_type(ty, obj.clone())));
                    }
                }
            }
            return Ok(WatchStart {
                initial,
                after: s.rv,
                rx,
                expired: None,
            });
        };
        if from < s.compacted {
            return Ok(WatchStart {
                initial: Vec::new(),
                after: s.rv,
                rx,
                expired: Some(ApiError::new(
                    410,
                    "Expired",
                    format!("too old resource version: {from} ({})", s.compacted),
                )),
            });
        }
        let mut initial = Vec::new();
        for ev in s.history.iter().filter(|e| e.rv > from) {
            if ev.group == ty.group
                && ev.plural == ty.plural
                && let Some(x) = transition(ev, filter)
            {
                initial.push((x, with_type(ty, ev.object.clone())));
            }
        }
        Ok(WatchStart {
            initial,
            after: s.rv,
            rx,
            expired: None,
        })
    }
}

/// How an event looks to a watcher with `filter`: selector transitions become ADDED/DELETED.
pub fn transition(ev: &Event, filter: &Filter) -> Option<EventType> {
    let now = filter.matches(&ev.object);
    let before = ev.old.as_ref().is_some_and(|o| filter.matches(o));
    match ev.kind {
        EventType::Added => now.then_some(EventType::Added),
        EventType::Deleted => (now || before).then_some(EventType::Deleted),
        EventType::Modified => match (before, now) {
            (true, true) => Some(EventType::Modified),
            (false, true) => Some(EventType::Added),
            (true, false) => Some(EventType::Deleted),
            (false, false) => None,
        },
    }
}

fn grace_pending(pod: &Value) -> bool {
    pod.pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
        .is_some_and(|g| g > 0)
}

fn conflict(ty: &TypeInfo, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            ty.qualified()
        ),
    )
    .with(name, &ty.plural)
}

/// kind/apiVersion in the body must match the URL's type.
fn check_body(ty: &TypeInfo, body: &Value) -> ApiResult<()> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml",
        ));
    }
    if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
        && av != ty.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            ty.api_version()
        )));
    }
    if let Some(kind) = body.get("kind").and_then(Value::as_str)
        && kind != ty.kind
    {
        return Err(ApiError::bad_request(format!(
            "{kind} in version \"{}\" cannot be handled as a {}: the kind in the data does not match the expected kind",
            ty.version, ty.kind
        )));
    }
    Ok(())
}

/// Objects carry kind and apiVersion of the version they are read through.
pub fn with_type(ty: &TypeInfo, mut obj: Value) -> Value {
    if let Value::Object(m) = &mut obj {
        m.insert("apiVersion".into(), Value::String(ty.api_version()));
        m.insert("kind".into(), Value::String(ty.kind.clone()));
    }
    obj
}

fn encode_continue(rv: u64, key: &(String, String)) -> String {
    URL_SAFE_NO_PAD.encode(json!({"rv": rv, "ns": key.0, "name": key.1}).to_string())
}

fn decode_continue(tok: &str) -> ApiResult<(u64, (String, String))> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(tok).map_err(|_| bad())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    let rv = v.get("rv").and_then(Value::as_u64).ok_or_else(bad)?;
    let ns = v
        .get("ns")
        .and_then(Value::as_str)
        .ok_or_else(bad)?
        .to_owned();
    let name = v
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(bad)?
        .to_owned();
    Ok((rv, (ns, name)))
}
