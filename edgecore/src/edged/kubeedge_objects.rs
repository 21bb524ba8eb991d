//! ConfigMaps and Secrets a pod needs, asked for when the cloud is KubeEdge's cloudcore.
//!
//! Our cloudcore pushes every ConfigMap and Secret a node's pods reference before the pods.
//! KubeEdge's cloudcore pushes only *updates* of objects the edge has asked for: its edge queries
//! each one (`edged/meta/query <ns>/configmap/<name>`, content null) and gets the bare object
//! back (docs/kubeedge-protocol.md). With such a cloud this task looks at the stored pods every
//! few seconds, asks for what they reference and the store lacks, and stores the answers as if
//! they had been pushed, so edged's workers (which follow the store) proceed as usual.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kedge_common::refs::{ObjectRef, pod_refs};
use kedge_common::{Message, Operation};
use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::edgehub::{CloudKind, CloudRequester, LinkState};
use crate::metamanager::sqlite::SqliteStore;
use crate::metamanager::store::ObjectStore;

/// How long to wait before asking again for an object the cloud did not give.
const ASK_AGAIN_AFTER: Duration = Duration::from_secs(10);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// KubeEdge's query for one referenced object.
pub fn query(r: &ObjectRef) -> Message {
    Message::new(
        "edged",
        "meta",
        Operation::Query,
        format!("{}/{}/{}", r.namespace, r.kind.wire_type(), r.name),
        Value::Null,
    )
}

/// What the stored pods reference that the store does not hold.
async fn missing(store: &SqliteStore) -> Vec<ObjectRef> {
    let Ok((pods, _)) = store.list(Some("pod"), None).await else {
        return Vec::new();
    };
    let mut wanted: Vec<ObjectRef> = pods
        .iter()
        .filter_map(|row| serde_json::from_value::<Pod>(row.object.content.clone()).ok())
        .flat_map(|p| pod_refs(&p))
        .collect();
    wanted.sort();
    wanted.dedup();
    let mut out = Vec::new();
    for r in wanted {
        if let Ok(None) = store.get(r.kind.wire_type(), &r.namespace, &r.name).await {
            out.push(r);
        }
    }
    out
}

/// Asks for one object and stores the answer; `true` if it was stored.
async fn fetch(store: &SqliteStore, requester: &CloudRequester, r: &ObjectRef) -> bool {
    let q = query(r);
    let resource = q.route.resource.clone();
    let answer = match requester.request(q, ANSWER_TIMEOUT).await {
        Ok(a) => a,
        Err(e) => {
            tracing::debug!(%resource, error = %e, "object query not answered");
            return false;
        }
    };
    // The bare object: anything else (an error, a refusal) is not stored.
    if answer.route.operation != Operation::Response
        || answer.content.pointer("/metadata/name").is_none()
    {
        tracing::warn!(%resource, answer = %answer.content, "the cloud did not give a referenced object");
        return false;
    }
    let rv = answer
        .content
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let msg = Message::new(
        "edgecontroller",
        "resource",
        Operation::Insert,
        resource.clone(),
        answer.content,
    )
    .with_resource_version(rv);
    match store.apply(&msg).await {
        Ok(_) => {
            tracing::info!(%resource, "referenced object fetched from the cloud");
            true
        }
        Err(e) => {
            tracing::warn!(%resource, error = %e, "cannot store a fetched object");
            false
        }
    }
}

/// Fetches missing referenced objects every `every` while the link is up to a KubeEdge cloud.
pub async fn run(
    store: SqliteStore,
    requester: CloudRequester,
    link: watch::Receiver<LinkState>,
    cloud: watch::Receiver<CloudKind>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut asked: HashMap<ObjectRef, Instant> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if *link.borrow() != LinkState::Connected || *cloud.borrow() != CloudKind::KubeEdge {
            continue;
        }
        let now = Instant::now();
        asked.retain(|_, at| now.duration_since(*at) < ASK_AGAIN_AFTER);
        for r in missing(&store).await {
            if asked.contains_key(&r) {
                continue;
            }
            if !fetch(&store, &requester, &r).await {
                asked.insert(r, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kedge_common::refs::RefKind;

    /// The query is KubeEdge's edge's (line 45 of the capture).
    #[test]
    fn queries_are_kubeedge_s() {
        let r = ObjectRef {
            kind: RefKind::ConfigMap,
            namespace: "default".into(),
            name: "kcap-cm".into(),
        };
        let ours = serde_json::to_value(query(&r)).unwrap();
        crate::kubeedge_capture::assert_same_route(&ours, 45);
        let theirs = crate::kubeedge_capture::captured(45);
        assert_eq!(ours["content"], theirs["content"]);
    }
}
