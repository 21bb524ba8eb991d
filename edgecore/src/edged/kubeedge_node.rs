//! The node's registration and heartbeat when the cloud is KubeEdge's cloudcore.
//!
//! Our cloudcore creates the Node and renews its Lease for us, and takes status reports from the
//! durable outbox. KubeEdge's cloudcore does neither: its edge registers the Node itself
//! (`edged/meta/insert null/node/<node>` with the whole Node, status included), patches the
//! status (`patch null/nodepatch/<node>`, a strategic merge patch as a JSON string) and keeps the
//! Lease alive (`query` / `insert` / `update kube-node-lease/lease/<node>` every 10 s), each a
//! request answered with `{"Object": …, "Err": …}` (docs/kubeedge-protocol.md). This task does
//! that whenever the link is up to a KubeEdge cloud, and nothing otherwise.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kedge_common::{Message, Operation};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::node_status::{NodeFacts, node_status};
use crate::edgehub::{CloudKind, CloudRequester, LinkState};

const LEASE_NAMESPACE: &str = "kube-node-lease";
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often and for how long (KubeEdge's defaults: 10 s renewals of a 40 s lease).
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub status_every: Duration,
    pub lease_every: Duration,
    pub lease_seconds: i32,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            status_every: Duration::from_secs(10),
            lease_every: Duration::from_secs(10),
            lease_seconds: 40,
        }
    }
}

/// The Node the edge registers: its labels as a kubelet (and KubeEdge's edged) sets them.
pub fn node_object(facts: &NodeFacts, status: &k8s_openapi::api::core::v1::NodeStatus) -> Value {
    let mut node = json!({
        "metadata": {
            "name": facts.name,
            "labels": {
                "kubernetes.io/arch": facts.architecture,
                "beta.kubernetes.io/arch": facts.architecture,
                "kubernetes.io/os": "linux",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/hostname": facts.name,
                "node-role.kubernetes.io/edge": "",
                "node-role.kubernetes.io/agent": "",
            },
        },
        "spec": {},
        "status": status,
    });
    for (key, value) in &facts.labels {
        node["metadata"]["labels"][key] = json!(value);
    }
    node
}

/// A request as KubeEdge's edged sends it: source `edged`, group `meta`.
pub fn request(op: Operation, resource: String, content: Value) -> Message {
    Message::new("edged", "meta", op, resource, content)
}

/// `insert null/node/<node>` with the whole Node.
pub fn node_insert(facts: &NodeFacts, status: &k8s_openapi::api::core::v1::NodeStatus) -> Message {
    request(
        Operation::Insert,
        format!("null/node/{}", facts.name),
        node_object(facts, status),
    )
}

/// `patch null/nodepatch/<node>`: the status as a strategic merge patch in a JSON string.
pub fn node_patch(node: &str, status: &k8s_openapi::api::core::v1::NodeStatus) -> Message {
    request(
        Operation::Patch,
        format!("null/nodepatch/{node}"),
        Value::String(json!({"status": status}).to_string()),
    )
}

/// The `{"Object", "Err"}` of a reply: the object, or the error's reason and message.
fn unwrap_reply(reply: &Message) -> Result<Value, (String, String)> {
    if reply.route.operation == Operation::Error {
        return Err(("Error".into(), reply.content.to_string()));
    }
    let err = &reply.content["Err"];
    if !err.is_null() {
        let status = &err["ErrStatus"];
        return Err((
            status["reason"].as_str().unwrap_or("Unknown").to_owned(),
            status["message"].as_str().unwrap_or_default().to_owned(),
        ));
    }
    Ok(reply.content["Object"].clone())
}

fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Waits until the link is (`connected`) or is not up; `false` if the hub is gone.
async fn wait_link(link: &mut watch::Receiver<LinkState>, connected: bool) -> bool {
    link.wait_for(|s| (*s == LinkState::Connected) == connected)
        .await
        .is_ok()
}

/// Registers the Node and keeps its status and Lease fresh while the link is up to a KubeEdge
/// cloud, until `shutdown`.
pub async fn run(
    facts: NodeFacts,
    requester: CloudRequester,
    mut link: watch::Receiver<LinkState>,
    cloud: watch::Receiver<CloudKind>,
    timing: Timing,
    shutdown: CancellationToken,
) {
    loop {
        // Wait for a link to a KubeEdge cloud.
        let up = tokio::select! {
            _ = shutdown.cancelled() => return,
            ok = wait_link(&mut link, true) => ok,
        };
        if !up {
            return;
        }
        if *cloud.borrow() == CloudKind::KubeEdge {
            session(&facts, &requester, &mut link, timing, &shutdown).await;
        }
        // Until this connection ends.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ok = wait_link(&mut link, false) => if !ok { return },
        }
    }
}

/// One connection's worth: register, then patch status and renew the Lease until the link drops.
async fn session(
    facts: &NodeFacts,
    requester: &CloudRequester,
    link: &mut watch::Receiver<LinkState>,
    timing: Timing,
    shutdown: &CancellationToken,
) {
    let node = &facts.name;
    let ask = |op: Operation, resource: String, content: Value| {
        let msg = request(op, resource, content);
        async move { requester.request(msg, ANSWER_TIMEOUT).await }
    };
    let status = node_status(facts, &now());
    let node_uid = match requester
        .request(node_insert(facts, &status), ANSWER_TIMEOUT)
        .await
        .map(|r| unwrap_reply(&r))
    {
        Ok(Ok(obj)) => {
            tracing::info!(%node, "Node registered with KubeEdge's cloudcore");
            obj["metadata"]["uid"].as_str().map(str::to_owned)
        }
        Ok(Err((reason, message))) => {
            tracing::warn!(%node, %reason, %message, "the cloud refused to register the Node");
            None
        }
        Err(e) => {
            tracing::warn!(%node, error = %e, "cannot register the Node");
            None
        }
    };
    let mut lease: Option<Value> = None;
    let mut status_tick = tokio::time::interval(timing.status_every);
    let mut lease_tick = tokio::time::interval(timing.lease_every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = wait_link(link, false) => return,
            _ = status_tick.tick() => {
                let patch = node_patch(node, &node_status(facts, &now()));
                match requester.request(patch, ANSWER_TIMEOUT).await {
                    Ok(r) => if let Err((reason, message)) = unwrap_reply(&r) {
                        tracing::warn!(%node, %reason, %message, "node status patch refused");
                    },
                    Err(e) => tracing::debug!(%node, error = %e, "node status patch not answered"),
                }
            }
            _ = lease_tick.tick() => {
                lease = renew_lease(node, node_uid.as_deref(), lease.take(), timing, &ask).await;
            }
        }
    }
}

/// A new Lease owned by the Node, as KubeEdge's edged creates it.
pub fn new_lease(node: &str, node_uid: Option<&str>, seconds: i32, renew_time: &Time) -> Value {
    let mut l = json!({
        "metadata": {"name": node, "namespace": LEASE_NAMESPACE},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": seconds, "renewTime": renew_time},
    });
    if let Some(uid) = node_uid {
        l["metadata"]["ownerReferences"] =
            json!([{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid}]);
    }
    l
}

/// Query (first time), create if missing, else update with a new renewTime. Returns the Lease
/// as the cloud last returned it (its resourceVersion makes the next update safe).
async fn renew_lease<F, Fut>(
    node: &str,
    node_uid: Option<&str>,
    known: Option<Value>,
    timing: Timing,
    ask: &F,
) -> Option<Value>
where
    F: Fn(Operation, String, Value) -> Fut,
    Fut: std::future::Future<Output = Result<Message, crate::edgehub::RequestError>>,
{
    let resource = format!("{LEASE_NAMESPACE}/lease/{node}");
    let renew_time = now();
    let known = match known {
        Some(l) => Some(l),
        None => match ask(Operation::Query, resource.clone(), Value::Null).await {
            Ok(r) => unwrap_reply(&r).ok().filter(|l| !l.is_null()),
            Err(e) => {
                tracing::debug!(%node, error = %e, "lease query not answered");
                return None;
            }
        },
    };
    let (op, body) = match known {
        Some(mut l) => {
            l["spec"]["renewTime"] = json!(renew_time);
            l["spec"]["holderIdentity"] = json!(node);
            l["spec"]["leaseDurationSeconds"] = json!(timing.lease_seconds);
            (Operation::Update, l)
        }
        None => (
            Operation::Insert,
            new_lease(node, node_uid, timing.lease_seconds, &renew_time),
        ),
    };
    match ask(op, resource, body).await {
        Ok(r) => match unwrap_reply(&r) {
            Ok(l) if !l.is_null() => Some(l),
            Ok(_) => None,
            Err((reason, message)) => {
                // A conflict or a deleted Lease: ask again next time.
                tracing::warn!(%node, %reason, %message, "lease renewal refused");
                None
            }
        },
        Err(e) => {
            tracing::debug!(%node, error = %e, "lease renewal not answered");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubeedge_capture::{assert_same_route, captured};

    #[test]
    fn replies_unwrap_like_kubeedge_s() {
        let req = Message::new(
            "edged",
            "meta",
            Operation::Query,
            "kube-node-lease/lease/n",
            Value::Null,
        );
        let not_found = req.response(
            "edgecontroller",
            json!({"Object": null, "Err": {"ErrStatus": {"metadata": {}, "status": "Failure",
                "message": "lease.coordination.k8s.io \"n\" not found", "reason": "NotFound", "code": 404}}}),
        );
        assert_eq!(unwrap_reply(&not_found).unwrap_err().0, "NotFound");
        let ok = req.response(
            "edgecontroller",
            json!({"Object": {"metadata": {"name": "n"}}, "Err": null}),
        );
        assert_eq!(unwrap_reply(&ok).unwrap()["metadata"]["name"], "n");
        let mut refused = req.response("edgecontroller", json!("no"));
        refused.route.operation = Operation::Error;
        assert!(unwrap_reply(&refused).is_err());
    }

    fn keys(v: &Value) -> Vec<String> {
        v.as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// What we send matches what KubeEdge's edge sent for the same step: route (with the
    /// node name), content type and top-level fields.
    #[test]
    fn requests_match_what_kubeedge_s_edge_sends() {
        let facts = NodeFacts {
            name: "kcap-edge".into(),
            ..NodeFacts::gather("kcap-edge", "192.0.2.10", "containerd", "1.6.20")
        };
        let status = node_status(&facts, &now());
        let lease = new_lease("kcap-edge", Some("uid-1"), 40, &now());
        let ours = [
            (3, node_insert(&facts, &status)),
            (10, node_patch("kcap-edge", &status)),
            (
                18,
                request(
                    Operation::Query,
                    "kube-node-lease/lease/kcap-edge".into(),
                    Value::Null,
                ),
            ),
            (
                21,
                request(
                    Operation::Insert,
                    "kube-node-lease/lease/kcap-edge".into(),
                    lease.clone(),
                ),
            ),
        ];
        for (line, m) in ours {
            let theirs = captured(line);
            let v = serde_json::to_value(&m).unwrap();
            assert_same_route(&v, line);
            let (a, b) = (&v["content"], &theirs["content"]);
            assert_eq!(
                std::mem::discriminant(a),
                std::mem::discriminant(b),
                "line {line}: content type"
            );
            if a.is_object() {
                let mut want = keys(b);
                let mut got = keys(a);
                want.sort();
                got.sort();
                assert_eq!(got, want, "line {line}: content fields");
                for part in ["metadata", "spec"] {
                    let mut w: Vec<String> = keys(&b[part])
                        .into_iter()
                        .filter(|k| k != "creationTimestamp" && k != "annotations")
                        .collect();
                    let mut g = keys(&a[part]);
                    w.sort();
                    g.sort();
                    assert_eq!(g, w, "line {line}: {part} fields");
                }
            }
        }
        // The nodepatch string holds a JSON object, as KubeEdge's does.
        let patch = node_patch("kcap-edge", &status);
        let inner: Value = serde_json::from_str(patch.content.as_str().unwrap()).unwrap();
        assert!(inner["status"]["conditions"].is_array());
        // Lease updates carry the lease as the cloud returned it, with a new renewTime.
        assert_eq!(keys(&captured(25)["content"]).len(), 2);
    }

    #[test]
    fn the_node_carries_its_status_and_edge_labels() {
        let facts = NodeFacts {
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            ..NodeFacts::gather("edge-1", "192.0.2.10", "containerd", "1.6.20")
        };
        let status = node_status(&facts, &now());
        let n = node_object(&facts, &status);
        assert_eq!(n["metadata"]["name"], "edge-1");
        assert_eq!(n["metadata"]["labels"]["node-role.kubernetes.io/edge"], "");
        assert_eq!(
            n["metadata"]["labels"]["zone"], "a",
            "modules.edged.nodeLabels"
        );
        assert_eq!(n["status"]["capacity"]["pods"], "110");
    }
}
