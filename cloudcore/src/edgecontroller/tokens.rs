//! Service account tokens for pods on edge nodes.
//!
//! A real API server gives every pod a `kube-api-access-*` volume whose token the kubelet obtains
//! with the TokenRequest API. An edge node cannot reach the API server, so its edged asks
//! cloudcore (KubeEdge's `query <ns>/serviceaccounttoken/<sa>`, content a TokenRequest bound to
//! the pod), and cloudcore asks the API server on its behalf and answers with the TokenRequest
//! the API server returned (KubeEdge's reply). cloudcore holds the right to mint tokens for any
//! service account, so it hands a node only what that node's kubelet could get itself: a token
//! bound to a pod bound to that node, for the pod's own service account, with the audience and
//! lifetime one of the pod's projections names.

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kedge_common::{Message, Operation, ResourcePath};
use kube::api::{Api, PostParams};

use crate::cloudhub::CloudHubHandle;

/// A token a pod's volumes project (audience `None`: the API server's own).
fn projections(pod: &Pod) -> Vec<(Option<String>, i64)> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .flat_map(|v| v.projected.iter().flat_map(|p| p.sources.iter().flatten()))
        .filter_map(|src| src.service_account_token.as_ref())
        .map(|t| {
            (
                t.audience.clone().filter(|a| !a.is_empty()),
                t.expiration_seconds.unwrap_or(3600),
            )
        })
        .collect()
}

/// Checks a node's token request against the pod it names. `pod` is the pod of that name in
/// the request's namespace as cloudcore knows it, with the node it is bound to.
pub fn check(
    node: &str,
    service_account: &str,
    request: &TokenRequest,
    pod: Option<(&Pod, &str)>,
) -> Result<(), String> {
    let bound = request
        .spec
        .bound_object_ref
        .as_ref()
        .ok_or("the token request is not bound to a pod")?;
    if bound.kind.as_deref() != Some("Pod") {
        return Err("only tokens bound to a pod are issued to edge nodes".into());
    }
    let pod_name = bound.name.as_deref().unwrap_or_default();
    let Some((pod, pod_node)) = pod else {
        return Err(format!("pod {pod_name} is not bound to node {node}"));
    };
    if pod_node != node || pod.metadata.uid.as_deref() != bound.uid.as_deref() {
        return Err(format!("pod {pod_name} is not bound to node {node}"));
    }
    let pod_sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    if pod_sa != service_account {
        return Err(format!(
            "pod {pod_name} runs as service account {pod_sa}, not {service_account}"
        ));
    }
    let audiences = &request.spec.audiences;
    let audience = match audiences.as_slice() {
        [] => None,
        [a] => Some(a.clone()),
        _ => return Err("a projected token has one audience".into()),
    };
    let seconds = request.spec.expiration_seconds.unwrap_or(3600);
    if !projections(pod).contains(&(audience.clone(), seconds)) {
        return Err(format!(
            "pod {pod_name} projects no token with audience {} and expirationSeconds {seconds}",
            audience.as_deref().unwrap_or("(default)")
        ));
    }
    Ok(())
}

/// Parses a node's token query: (namespace, service account, request).
pub fn parse(msg: &Message) -> Result<(String, String, TokenRequest), String> {
    let path = ResourcePath::parse_cloud(&msg.route.resource).map_err(|e| e.to_string())?;
    let ns = path.namespace().unwrap_or_default().to_owned();
    let sa = path.name().unwrap_or_default().to_owned();
    if ns.is_empty() || sa.is_empty() {
        return Err(format!(
            "a token query names <namespace>/serviceaccounttoken/<name>, not {}",
            msg.route.resource
        ));
    }
    // Only the spec matters; KubeEdge's edge sends an empty status with a null
    // `expirationTimestamp`, which the typed status cannot hold.
    let mut content = msg.content.clone();
    if let Some(m) = content.as_object_mut() {
        m.remove("status");
        m.remove("metadata");
    }
    let request: TokenRequest = serde_json::from_value(content)
        .map_err(|e| format!("the token query's content is not a TokenRequest: {e}"))?;
    Ok((ns, sa, request))
}

/// Asks the API server for the token and answers the node: the TokenRequest on success, an
/// `error` message with the reason otherwise.
pub async fn issue(
    client: kube::Client,
    hub: CloudHubHandle,
    node: String,
    query: Message,
    namespace: String,
    service_account: String,
    request: TokenRequest,
) {
    let api: Api<ServiceAccount> = Api::namespaced(client, &namespace);
    // Only what the node may choose; the API server fills in the rest.
    let body = TokenRequest {
        metadata: Default::default(),
        spec: request.spec,
        status: None,
    };
    let answer = match api
        .create_token_request(&service_account, &PostParams::default(), &body)
        .await
    {
        Ok(mut issued) => {
            issued.metadata.managed_fields = None;
            tracing::info!(%node, %namespace, %service_account, "service account token issued");
            match serde_json::to_value(&issued) {
                // KubeEdge's reply: edgecontroller/resource/response with the bare object.
                Ok(v) => super::kubeedge::reply(&query, v, String::new()),
                Err(e) => refusal(&query, format!("cannot encode the token: {e}")),
            }
        }
        Err(e) => {
            tracing::warn!(%node, %namespace, %service_account, error = %e, "cannot issue a service account token");
            refusal(&query, format!("TokenRequest failed: {e}"))
        }
    };
    send(&hub, &node, answer);
}

/// The `error` answer to a query.
pub fn refusal(query: &Message, why: String) -> Message {
    let mut m = query.response(kedge_common::message::module::EDGE_CONTROLLER, why.into());
    m.route.operation = Operation::Error;
    m
}

/// Queues an answer for `node` (answers are not acked, and not kept across its sessions).
/// The answer copies the query's resource, which CloudHub already put in cloud form
/// (`node/<node>/…`), so the hub routes it back to that node.
pub fn send(hub: &CloudHubHandle, node: &str, answer: Message) {
    if let Err(e) = hub.enqueue(None, answer) {
        tracing::warn!(%node, error = %e, "cannot queue an answer for the node");
    }
}

/// A node asking for a service account token (KubeEdge's `query …/serviceaccounttoken/…`).
pub(super) fn is_token_query(msg: &Message) -> bool {
    msg.route.operation == Operation::Query
        && kedge_common::ResourcePath::parse_cloud(&msg.route.resource)
            .is_ok_and(|p| p.resource_type() == Some("serviceaccounttoken"))
}

impl super::Loop {
    /// Answers a node's token query: checked here against the pods cloudcore knows, issued by
    /// the API server in a task of its own (see `tokens`).
    pub(super) fn token_query(&self, node: String, query: Message) {
        let (namespace, service_account, request) = match parse(&query) {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(%node, %why, "malformed token query");
                send(&self.hub, &node, refusal(&query, why));
                return;
            }
        };
        let pod_name = request
            .spec
            .bound_object_ref
            .as_ref()
            .and_then(|b| b.name.clone())
            .unwrap_or_default();
        let pod = self
            .pods
            .get(&(namespace.clone(), pod_name))
            .map(|e| (&e.pod, e.node.as_str()));
        if let Err(why) = check(&node, &service_account, &request, pod) {
            tracing::warn!(%node, %namespace, %service_account, %why, "token query refused");
            send(&self.hub, &node, refusal(&query, why));
            return;
        }
        tokio::spawn(issue(
            self.client.clone(),
            self.hub.clone(),
            node,
            query,
            namespace,
            service_account,
            request,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "apps", "uid": "u-1"},
            "spec": {"nodeName": "edge-1", "serviceAccountName": "builder",
                "containers": [{"name": "c"}],
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"serviceAccountToken": {"audience": "vault", "path": "v"}}
                ]}}]}
        }))
        .unwrap()
    }

    fn request(audiences: serde_json::Value, seconds: i64, uid: &str) -> TokenRequest {
        serde_json::from_value(json!({
            "spec": {"audiences": audiences, "expirationSeconds": seconds,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": uid}}
        }))
        .unwrap()
    }

    /// The content KubeEdge's edged sends (see `../shared/interop`).
    fn kubeedge_query(audiences: serde_json::Value, seconds: i64, uid: &str) -> serde_json::Value {
        json!({
            "metadata": {"creationTimestamp": null},
            "spec": {"audiences": audiences, "expirationSeconds": seconds,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": uid}},
            "status": {"token": "", "expirationTimestamp": null}
        })
    }

    #[test]
    fn only_the_hosting_node_gets_what_the_pod_projects() {
        let p = pod();
        let ok = request(json!(null), 3607, "u-1");
        assert_eq!(
            check("edge-1", "builder", &ok, Some((&p, "edge-1"))),
            Ok(())
        );
        let vault = request(json!(["vault"]), 3600, "u-1");
        assert_eq!(
            check("edge-1", "builder", &vault, Some((&p, "edge-1"))),
            Ok(())
        );
        // Another node, another pod incarnation, another service account, another audience or
        // lifetime, no pod at all: refused.
        assert!(
            check("edge-2", "builder", &ok, Some((&p, "edge-1")))
                .unwrap_err()
                .contains("not bound to node edge-2")
        );
        let stale = request(json!(null), 3607, "u-0");
        assert!(check("edge-1", "builder", &stale, Some((&p, "edge-1"))).is_err());
        assert!(
            check("edge-1", "admin", &ok, Some((&p, "edge-1")))
                .unwrap_err()
                .contains("runs as service account builder")
        );
        let other = request(json!(["https://evil"]), 3607, "u-1");
        assert!(check("edge-1", "builder", &other, Some((&p, "edge-1"))).is_err());
        let longer = request(json!(null), 86400, "u-1");
        assert!(check("edge-1", "builder", &longer, Some((&p, "edge-1"))).is_err());
        assert!(check("edge-1", "builder", &ok, None).is_err());
    }

    #[test]
    fn queries_are_parsed_from_kubeedge_s_message() {
        let mut m = Message::new(
            "edged",
            "meta",
            Operation::Query,
            "node/edge-1/apps/serviceaccounttoken/builder",
            kubeedge_query(json!(null), 3607, "u-1"),
        );
        let (ns, sa, req) = parse(&m).unwrap();
        assert_eq!((ns.as_str(), sa.as_str()), ("apps", "builder"));
        assert_eq!(req.spec.expiration_seconds, Some(3607));
        m.content = json!("nonsense");
        assert!(parse(&m).is_err());
    }
}
