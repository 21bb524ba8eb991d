//! The requests a KubeEdge edgecore makes, and the replies it waits for.
//!
//! Our edge reports through a durable outbox and gets a plain ack; a KubeEdge v1.23 edge instead
//! asks and waits for an answer whose `parent_msg_id` is its request's id (see
//! `docs/kubeedge-protocol.md` and the capture in `../shared/interop/kubeedge-v1.23.1`):
//!
//! | request (source edged, group meta)       | what cloudcore does                      | reply content                  |
//! |------------------------------------------|------------------------------------------|--------------------------------|
//! | `insert null/node/<node>`                | create the Node, or update its labels, annotations and status | `{"Object": Node, "Err": null}` |
//! | `patch null/nodepatch/<node>` (JSON in a string) | strategic merge patch of the Node's status | `{"Object": Node, "Err": …}` |
//! | `query`/`insert`/`update kube-node-lease/lease/<node>` | get / create / replace the Lease | `{"Object": Lease or null, "Err": null or {"ErrStatus": Status}}` |
//! | `patch <ns>/podpatch/<pod>` (JSON in a string) | strategic merge patch of the pod's status | `{"Object": Pod, "Err": …}` |
//! | `delete <ns>/pod/<pod>` (DeleteOptions)  | finish the pod's deletion                | `"OK"`                         |
//!
//! Replies come from `edgecontroller`, group `resource`, with the request's resource; the patch
//! replies carry the object's `resourceversion` in the header. A node may only touch its own Node
//! and Lease and the pods bound to it: anything else is answered with a `Forbidden` status and
//! changes nothing. ConfigMap, Secret and token queries need the controller's caches and are
//! answered by its loop (`Loop::object_query`, `tokens`).

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_common::message::module::EDGE_CONTROLLER;
use kedge_common::{Message, Operation, ResourcePath};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde::Serialize;
use serde_json::{Value, json};

use super::Shared;

const LEASE_NAMESPACE: &str = "kube-node-lease";

/// A request from a KubeEdge edge that the node's report worker answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    NodeInsert(Value),
    NodePatch(Value),
    LeaseQuery,
    LeaseInsert(Value),
    LeaseUpdate(Value),
    PodPatch {
        namespace: String,
        name: String,
        patch: Value,
    },
    PodDelete {
        namespace: String,
        name: String,
        options: Value,
    },
}

/// KubeEdge's patches travel as JSON inside a JSON string; a bare object is taken too.
fn patch_content(content: &Value) -> Option<Value> {
    match content {
        Value::String(s) => serde_json::from_str(s).ok(),
        Value::Object(_) => Some(content.clone()),
        _ => None,
    }
}

/// Recognises the requests in [`Request`] (path in edge form, without `node/<node>/`). `Err`:
/// a request of a known kind whose content is unusable.
pub fn classify(msg: &Message, path: &ResourcePath) -> Option<Result<Request, String>> {
    if msg.route.group != "meta" {
        return None;
    }
    let op = &msg.route.operation;
    let ns = path.namespace().map(str::to_owned);
    let name = path.name().map(str::to_owned).unwrap_or_default();
    let req = match (path.resource_type()?, op) {
        ("node", Operation::Insert) => Ok(Request::NodeInsert(msg.content.clone())),
        ("nodepatch", Operation::Patch) => patch_content(&msg.content)
            .map(Request::NodePatch)
            .ok_or_else(|| "a nodepatch carries a JSON patch".to_owned()),
        ("lease", Operation::Query) => Ok(Request::LeaseQuery),
        ("lease", Operation::Insert) => Ok(Request::LeaseInsert(msg.content.clone())),
        ("lease", Operation::Update) => Ok(Request::LeaseUpdate(msg.content.clone())),
        ("podpatch", Operation::Patch) => match patch_content(&msg.content) {
            Some(patch) => Ok(Request::PodPatch {
                namespace: ns.unwrap_or_default(),
                name,
                patch,
            }),
            None => Err("a podpatch carries a JSON patch".to_owned()),
        },
        ("pod", Operation::Delete) => Ok(Request::PodDelete {
            namespace: ns.unwrap_or_default(),
            name,
            options: msg.content.clone(),
        }),
        _ => return None,
    };
    // Node and Lease requests must name the session's own node.
    if let Ok(Request::NodeInsert(_) | Request::NodePatch(_)) = &req
        && path.namespace().is_some()
    {
        return Some(Err("a Node is cluster-scoped (null/node/<name>)".into()));
    }
    if let Ok(Request::LeaseQuery | Request::LeaseInsert(_) | Request::LeaseUpdate(_)) = &req
        && path.namespace() != Some(LEASE_NAMESPACE)
    {
        return Some(Err(format!("node leases live in {LEASE_NAMESPACE}")));
    }
    Some(req)
}

/// A Kubernetes `Status` for the `Err` field (`{"ErrStatus": …}`, as Go's StatusError encodes).
fn err_status(code: u16, reason: &str, message: &str) -> Value {
    json!({"ErrStatus": {"metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}})
}

fn kube_err(e: &kube::Error) -> Value {
    match e {
        // The API server's own Status (with its details), as KubeEdge passes it on.
        kube::Error::Api(s) => match serde_json::to_value(&**s) {
            Ok(mut v) => {
                if v.get("metadata").is_none() {
                    v["metadata"] = json!({});
                }
                json!({"ErrStatus": v})
            }
            Err(_) => err_status(s.code, &s.reason, &s.message),
        },
        other => err_status(500, "InternalError", &other.to_string()),
    }
}

/// What a request got: the reply's content and resourceVersion header, and whether it failed
/// for a reason that may pass later (the API server unreachable or failing), so that a report
/// our own edge queued durably is sent again instead of being dropped.
#[derive(Debug)]
pub struct Answered {
    pub content: Value,
    pub resource_version: String,
    pub transient: bool,
}

impl Answered {
    fn final_(content: Value) -> Answered {
        Answered {
            content,
            resource_version: String::new(),
            transient: false,
        }
    }

    /// Without the `resourceversion` header (KubeEdge sets it only on patch replies).
    fn without_rv(mut self) -> Answered {
        self.resource_version.clear();
        self
    }
}

/// Anything but a 4xx answer of the API server may pass on a later attempt.
fn transient(e: &kube::Error) -> bool {
    !matches!(e, kube::Error::Api(s) if (400..500).contains(&s.code))
}

/// `{"Object": …, "Err": …}` and the object's resourceVersion.
fn object_or_err<T: Serialize + kube::ResourceExt>(r: &Result<T, kube::Error>) -> Answered {
    match r {
        Ok(o) => Answered {
            content: json!({"Object": super::to_json(o), "Err": null}),
            resource_version: o.resource_version().unwrap_or_default(),
            transient: false,
        },
        Err(e) => Answered {
            content: json!({"Object": null, "Err": kube_err(e)}),
            resource_version: String::new(),
            transient: transient(e),
        },
    }
}

/// The reply to `req`: `edgecontroller/resource/response`, same resource, `parent_msg_id` set.
pub fn reply(req: &Message, content: Value, resource_version: String) -> Message {
    let mut m = req.response(EDGE_CONTROLLER, content);
    m.route.group = "resource".into();
    m.header.resource_version = resource_version;
    m
}

fn forbidden(node: &str, what: &str) -> Answered {
    Answered::final_(
        json!({"Object": null, "Err": err_status(403, "Forbidden", &format!("node {node} may not {what}"))}),
    )
}

fn bad_request(why: &str) -> Answered {
    Answered::final_(json!({"Object": null, "Err": err_status(400, "BadRequest", why)}))
}

/// Carries out a request (`classify` recognised it) and answers it. A KubeEdge edge gets the
/// reply it waits for; our own edge sends such requests (the pod delete) from its durable outbox
/// with `sync`, and CloudHub acks those from the returned outcome instead.
pub async fn handle(
    client: &kube::Client,
    hub: &crate::cloudhub::CloudHubHandle,
    shared: &Shared,
    node: &str,
    path: &ResourcePath,
    msg: &Message,
    request: Result<Request, String>,
) -> super::upstream::Outcome {
    let answered = match request {
        Ok(request) => answer(client, shared, node, path, request).await,
        Err(why) => {
            tracing::warn!(%node, resource = %path, %why, "malformed request");
            bad_request(&why)
        }
    };
    if answered.transient {
        tracing::warn!(%node, resource = %path, answer = %answered.content, "request failed; may pass later");
    }
    if !msg.header.sync {
        super::tokens::send(
            hub,
            node,
            reply(msg, answered.content, answered.resource_version),
        );
    }
    if answered.transient {
        super::upstream::Outcome::RetryLater
    } else {
        super::upstream::Outcome::Done
    }
}

/// Strips what a client may not choose when creating an object.
fn for_create(mut v: Value) -> Value {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "managedFields",
            "generation",
        ] {
            m.remove(k);
        }
    }
    v
}

/// Carries out one request of `node`.
async fn answer(
    client: &kube::Client,
    shared: &Shared,
    node: &str,
    path: &ResourcePath,
    request: Request,
) -> Answered {
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let own = path.name() == Some(node);
    match request {
        Request::NodeInsert(_) | Request::NodePatch(_) if !own => {
            forbidden(node, "write another Node")
        }
        Request::LeaseQuery | Request::LeaseInsert(_) | Request::LeaseUpdate(_) if !own => {
            forbidden(node, "use another node's Lease")
        }
        Request::NodeInsert(content) => {
            object_or_err(&insert_node(&nodes, node, content).await).without_rv()
        }
        Request::NodePatch(patch) => {
            let r = nodes
                .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
                .await;
            object_or_err(&r)
        }
        Request::LeaseQuery => object_or_err(&leases.get(node).await).without_rv(),
        Request::LeaseInsert(content) => {
            let r = match serde_json::from_value::<Lease>(for_create(content)) {
                Ok(l) => leases.create(&PostParams::default(), &l).await,
                Err(e) => return bad_request(&format!("not a Lease: {e}")),
            };
            object_or_err(&r).without_rv()
        }
        Request::LeaseUpdate(content) => {
            let r = match serde_json::from_value::<Lease>(content) {
                Ok(l) => leases.replace(node, &PostParams::default(), &l).await,
                Err(e) => return bad_request(&format!("not a Lease: {e}")),
            };
            object_or_err(&r).without_rv()
        }
        Request::PodPatch {
            namespace,
            name,
            patch,
        } => {
            let Some(uid) = pod_of(shared, node, &namespace, &name) else {
                return forbidden(node, &format!("patch pod {namespace}/{name}"));
            };
            // Only the status, and only for the pod incarnation this node runs.
            let patch = json!({"metadata": {"uid": uid}, "status": patch.get("status").cloned().unwrap_or(json!({}))});
            let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            let r = api
                .patch_status(&name, &PatchParams::default(), &Patch::Strategic(&patch))
                .await;
            object_or_err(&r)
        }
        Request::PodDelete {
            namespace,
            name,
            options,
        } => {
            let Some(uid) = pod_of(shared, node, &namespace, &name) else {
                return Answered::final_(json!(format!(
                    "node {node} may not delete pod {namespace}/{name}"
                )));
            };
            let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
            let dp = DeleteParams {
                grace_period_seconds: options
                    .get("gracePeriodSeconds")
                    .and_then(Value::as_u64)
                    .and_then(|s| u32::try_from(s).ok())
                    .or(Some(0)),
                // Always this node's incarnation of the pod, whatever the request says.
                preconditions: Some(Preconditions {
                    uid: Some(uid),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&name, &dp).await {
                Ok(_) => Answered::final_(json!("OK")),
                Err(kube::Error::Api(s)) if s.code == 404 => Answered::final_(json!("OK")),
                Err(e) => Answered {
                    transient: transient(&e),
                    ..Answered::final_(json!(e.to_string()))
                },
            }
        }
    }
}

/// The UID of pod `ns/name` if it is bound to `node`.
fn pod_of(shared: &Shared, node: &str, ns: &str, name: &str) -> Option<String> {
    shared
        .pod_owner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&(ns.to_owned(), name.to_owned()))
        .filter(|(n, _)| n == node)
        .map(|(_, uid)| uid.clone())
}

/// KubeEdge's edge registers its Node itself. Create it with what the edge sent (our edge role
/// label added), or, if it exists, add the edge's labels and annotations and take its status.
async fn insert_node(api: &Api<Node>, node: &str, content: Value) -> Result<Node, kube::Error> {
    let mut content = for_create(content);
    if content.pointer("/metadata/name").and_then(Value::as_str) != Some(node) {
        return Err(kube::Error::Api(
            kube::core::Status::failure(
                &format!("the Node object must be named {node}"),
                "BadRequest",
            )
            .with_code(400)
            .boxed(),
        ));
    }
    let (mut labels, refused) = super::node_labels::self_set(
        content
            .pointer("/metadata/labels")
            .and_then(Value::as_object),
    );
    if !refused.is_empty() {
        tracing::warn!(%node, ?refused, "labels a node may not set on itself (NodeRestriction) are not applied");
    }
    labels.insert(super::EDGE_ROLE_LABEL.into(), json!(""));
    content["metadata"]["labels"] = Value::Object(labels);
    // The ownership record is the cloud's, never the edge's to write.
    if let Some(a) = content
        .pointer_mut("/metadata/annotations")
        .and_then(Value::as_object_mut)
    {
        a.remove(crate::nodeidentity::ANNOTATION);
    }
    let status = content.get("status").cloned();
    // The Node was made by the node's join; one that is gone was deleted (which revokes the
    // node) and is not re-created for it.
    let meta = json!({"metadata": {
        "labels": content.pointer("/metadata/labels").cloned().unwrap_or(json!({})),
        "annotations": content.pointer("/metadata/annotations").cloned().unwrap_or(json!({})),
    }});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&meta))
        .await?;
    match status {
        Some(status) => {
            api.patch_status(
                node,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        }
        None => api.get(node).await,
    }
}

/// A KubeEdge edge asking for a ConfigMap or Secret (`query <ns>/configmap|secret/<name>`).
pub(super) fn is_object_query(msg: &Message) -> bool {
    msg.route.operation == Operation::Query
        && ResourcePath::parse_cloud(&msg.route.resource)
            .is_ok_and(|p| matches!(p.resource_type(), Some("configmap" | "secret")))
}

impl super::Loop {
    /// Answers a ConfigMap/Secret query from the controller's caches: the bare object (with its
    /// resourceVersion in the header), as KubeEdge's cloud does, but only if a pod bound to that
    /// node references it; anything else is refused, so the query cannot read other objects.
    pub(super) fn object_query(&self, node: String, query: Message) {
        let path = match ResourcePath::parse_cloud(&query.route.resource) {
            Ok(p) => p,
            Err(e) => {
                super::tokens::send(
                    &self.hub,
                    &node,
                    super::tokens::refusal(&query, e.to_string()),
                );
                return;
            }
        };
        let (ns, name) = (
            path.namespace().unwrap_or_default().to_owned(),
            path.name().unwrap_or_default().to_owned(),
        );
        let kind = match path.resource_type() {
            Some("secret") => super::refs::RefKind::Secret,
            _ => super::refs::RefKind::ConfigMap,
        };
        let key = super::refs::ObjectRef {
            kind: kind.clone(),
            namespace: ns.clone(),
            name: name.clone(),
        };
        let found = if self.holders.holds(&key, &node) {
            let nk = (ns.clone(), name.clone());
            match kind {
                super::refs::RefKind::ConfigMap => self
                    .configmaps
                    .get(&nk)
                    .map(|o| (super::to_json(o), super::rv_of(o))),
                super::refs::RefKind::Secret => self
                    .secrets
                    .get(&nk)
                    .map(|o| (super::to_json(o), super::rv_of(o))),
            }
        } else {
            None
        };
        let answer = match found {
            Some((v, rv)) => reply(&query, v, rv),
            None => {
                tracing::warn!(%node, resource = %path, "query for an object no pod of this node uses; refused");
                super::tokens::refusal(
                    &query,
                    format!("{} {ns}/{name} not found for node {node}", kind.wire_type()),
                )
            }
        };
        super::tokens::send(&self.hub, &node, answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(op: Operation, resource: &str, content: Value) -> Message {
        Message::new("edged", "meta", op, resource, content)
    }

    fn classify_edge(m: &Message) -> Option<Result<Request, String>> {
        let path = ResourcePath::parse_edge(&m.route.resource).unwrap();
        classify(m, &path)
    }

    #[test]
    fn kubeedge_requests_are_recognised() {
        let m = msg(Operation::Patch, "null/nodepatch/kcap-edge", json!("{}"));
        assert_eq!(classify_edge(&m), Some(Ok(Request::NodePatch(json!({})))));
        let m = msg(
            Operation::Query,
            "kube-node-lease/lease/kcap-edge",
            Value::Null,
        );
        assert_eq!(classify_edge(&m), Some(Ok(Request::LeaseQuery)));
        let m = msg(
            Operation::Patch,
            "default/podpatch/p",
            json!("{\"status\":{\"phase\":\"Running\"}}"),
        );
        assert_eq!(
            classify_edge(&m),
            Some(Ok(Request::PodPatch {
                namespace: "default".into(),
                name: "p".into(),
                patch: json!({"status": {"phase": "Running"}})
            }))
        );
        // Not a KubeEdge request: our edge's reports, cloud pushes, other groups.
        let m = msg(Operation::Update, "default/podstatus/p", json!({}));
        assert_eq!(classify_edge(&m), None);
        let mut m = msg(Operation::Insert, "null/node/x", json!({}));
        m.route.group = "resource".into();
        assert_eq!(classify_edge(&m), None);
        // Known kinds with unusable content or in the wrong place.
        let m = msg(Operation::Patch, "null/nodepatch/x", json!("not json"));
        assert!(matches!(classify_edge(&m), Some(Err(_))));
        let m = msg(Operation::Query, "default/lease/x", Value::Null);
        assert!(matches!(classify_edge(&m), Some(Err(_))));
    }

    #[test]
    fn replies_look_like_kubeedge_s() {
        let req = msg(
            Operation::Query,
            "node/n/kube-node-lease/lease/n",
            Value::Null,
        );
        let r = reply(&req, json!("OK"), "7".into());
        assert_eq!(r.route.source, "edgecontroller");
        assert_eq!(r.route.group, "resource");
        assert_eq!(r.route.operation, Operation::Response);
        assert_eq!(r.route.resource, req.route.resource);
        assert_eq!(r.header.parent_id, req.header.id);
        assert_eq!(r.header.resource_version, "7");
        let e = kube::Error::Api(
            kube::core::Status::failure("lease.coordination.k8s.io \"n\" not found", "NotFound")
                .with_code(404)
                .boxed(),
        );
        let a = object_or_err::<Lease>(&Err(e));
        assert_eq!(a.resource_version, "");
        assert!(!a.transient, "a 404 will not pass later");
        let v = a.content;
        assert_eq!(v["Object"], Value::Null);
        assert_eq!(v["Err"]["ErrStatus"]["reason"], "NotFound");
        assert_eq!(v["Err"]["ErrStatus"]["code"], 404);
        assert_eq!(v["Err"]["ErrStatus"]["status"], "Failure");
    }
}
