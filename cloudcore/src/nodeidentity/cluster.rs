//! Ownership records on Node objects, token uses in Secrets of cloudcore's namespace.
//!
//! Reads for connections go through a cache the edgecontroller's Node watch keeps fresh
//! ([`ClusterIdentities::observe`]); a connection the cache would refuse is checked again
//! against the API server before it is refused, so a record written a moment ago (a join, a
//! rotation) never locks its node out. Writes replace the Node with its resourceVersion, so two
//! writers (two joins, two replicas) cannot both win.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{Api, PostParams};
use serde_json::json;

use super::{
    ANNOTATION, BoxFuture, Claim, Identity, NodeIdentities, Record, Refusal, may_claim,
    may_connect, rotated,
};
use crate::edgecontroller::EDGE_ROLE_LABEL;

/// Prefix of the Secrets that count a token's uses.
pub const TOKEN_SECRET_PREFIX: &str = "kedge-join-token-";
/// Key of the remaining uses in such a Secret.
const USES_LEFT: &str = "usesLeft";
/// Attempts of a read-modify-write that lost a race before giving up.
const WRITE_ATTEMPTS: usize = 5;

pub struct ClusterIdentities {
    nodes: Api<Node>,
    secrets: Api<Secret>,
    /// Records of edge Nodes as the watch last saw them.
    cache: Mutex<HashMap<String, Record>>,
}

fn unavailable(what: &str, e: kube::Error) -> Refusal {
    Refusal::Unavailable(format!("{what}: {e}"))
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn annotate(node: &mut Node, identity: &Identity) {
    // An enum of strings and string lists always serializes.
    let value = serde_json::to_string(identity).unwrap_or_default();
    node.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION.to_owned(), value);
}

/// The Node a join creates: labelled as an edge node (so the edgecontroller serves it), owned
/// by the joining key.
fn new_node(name: &str, identity: &Identity) -> Result<Node, serde_json::Error> {
    let mut node: Node = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {EDGE_ROLE_LABEL: "", "kubernetes.io/hostname": name}},
        "spec": {}
    }))?;
    annotate(&mut node, identity);
    Ok(node)
}

impl ClusterIdentities {
    /// Records on the cluster's Nodes; token uses in `namespace` (cloudcore's).
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        ClusterIdentities {
            nodes: Api::all(client.clone()),
            secrets: Api::namespaced(client, namespace),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Record>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watch saw `node` (added or changed). Returns the keys its connections may use now,
    /// so the caller can close a session whose key is no longer among them.
    pub fn observe(&self, node: &Node) -> Vec<String> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let record = Record::of_node(Some(node));
        let keys = record.accepted_keys().to_vec();
        self.cache().insert(name, record);
        keys
    }

    /// The watch saw `node` deleted.
    pub fn forget(&self, node: &str) {
        self.cache().insert(node.to_owned(), Record::NoNode);
    }

    async fn fetch(&self, node: &str) -> Result<Option<Node>, Refusal> {
        self.nodes
            .get_opt(node)
            .await
            .map_err(|e| unavailable(&format!("reading Node {node}"), e))
    }

    /// Replaces `node` (read at some resourceVersion) with `identity`.
    async fn write(&self, mut node: Node, identity: &Identity) -> Result<(), kube::Error> {
        annotate(&mut node, identity);
        let name = node.metadata.name.clone().unwrap_or_default();
        let written = self
            .nodes
            .replace(&name, &PostParams::default(), &node)
            .await?;
        self.cache().insert(name, Record::of_node(Some(&written)));
        Ok(())
    }

    /// `cloudcore node revoke`: the node's certificates stop working; a join needs a reset.
    pub async fn revoke(&self, node: &str, reason: &str) -> Result<(), Refusal> {
        let revoked = Identity::Revoked {
            reason: reason.to_owned(),
        };
        if self.set(node, revoked).await? {
            Ok(())
        } else {
            Err(Refusal::Denied(format!("there is no Node {node}")))
        }
    }

    /// `cloudcore node reset`: the next join (with any valid token) claims the name. `Ok(false)`:
    /// there is no such Node, so a join may claim the name anyway.
    pub async fn reset(&self, node: &str) -> Result<bool, Refusal> {
        self.set(node, Identity::Released).await
    }

    /// Writes `identity` as `node`'s record; `Ok(false)`: there is no such Node.
    async fn set(&self, node: &str, identity: Identity) -> Result<bool, Refusal> {
        for _ in 0..WRITE_ATTEMPTS {
            let Some(current) = self.fetch(node).await? else {
                return Ok(false);
            };
            match self.write(current, &identity).await {
                Ok(()) => return Ok(true),
                Err(e) if is_conflict(&e) => continue,
                Err(e) => return Err(unavailable(&format!("writing Node {node}"), e)),
            }
        }
        Err(Refusal::Unavailable(format!(
            "Node {node} kept changing; try again"
        )))
    }

    /// Creates the record counting the uses of token `jti` (`cloudcore token --uses`).
    pub async fn create_token_record(
        &self,
        jti: &str,
        uses: u32,
        node: Option<&str>,
    ) -> Result<(), kube::Error> {
        let uses = uses.to_string();
        let mut entries: Vec<(&str, &[u8])> = vec![(USES_LEFT, uses.as_bytes())];
        if let Some(n) = node {
            entries.push(("node", n.as_bytes()));
        }
        let secret =
            crate::cloudhub::certs::new_secret(&format!("{TOKEN_SECRET_PREFIX}{jti}"), &entries);
        self.secrets.create(&PostParams::default(), &secret).await?;
        Ok(())
    }
}

fn uses_left(secret: &Secret) -> Option<u32> {
    let raw = secret.data.as_ref()?.get(USES_LEFT)?;
    std::str::from_utf8(&raw.0).ok()?.trim().parse().ok()
}

impl NodeIdentities for ClusterIdentities {
    fn admit<'a>(&'a self, node: &'a str, key: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let cached = self.cache().get(node).cloned();
            if let Some(record) = cached
                && let Ok(None) = may_connect(node, key, &record)
            {
                return Ok(());
            }
            // Not cached, or the cache would refuse or change the record: ask the API server.
            for _ in 0..WRITE_ATTEMPTS {
                let current = self.fetch(node).await?;
                let record = Record::of_node(current.as_ref());
                match (may_connect(node, key, &record)?, current) {
                    (Some(keys), Some(n)) => match self.write(n, &Identity::Owned { keys }).await {
                        Ok(()) => return Ok(()),
                        Err(e) if is_conflict(&e) => continue,
                        // The connection is the node's either way; the old keys go next time.
                        Err(e) => {
                            tracing::warn!(%node, error = %e, "cannot retire the node's older keys");
                            return Ok(());
                        }
                    },
                    _ => {
                        self.cache().insert(node.to_owned(), record);
                        return Ok(());
                    }
                }
            }
            Ok(())
        })
    }

    fn claim<'a>(
        &'a self,
        node: &'a str,
        key: &'a str,
        from: IpAddr,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let current = self.fetch(node).await?;
            let identity = Identity::Owned {
                keys: vec![key.to_owned()],
            };
            let result = match (
                may_claim(node, &Record::of_node(current.as_ref()))?,
                current,
            ) {
                (Claim::TakeOver, Some(mut n)) => {
                    let labels = n.metadata.labels.get_or_insert_with(BTreeMap::new);
                    labels.insert(EDGE_ROLE_LABEL.to_owned(), String::new());
                    self.write(n, &identity).await
                }
                _ => {
                    let n = new_node(node, &identity).map_err(|e| {
                        Refusal::Unavailable(format!("cannot build Node {node}: {e}"))
                    })?;
                    self.nodes
                        .create(&PostParams::default(), &n)
                        .await
                        .map(|created| {
                            self.cache()
                                .insert(node.to_owned(), Record::of_node(Some(&created)));
                        })
                }
            };
            match result {
                Ok(()) => {
                    tracing::info!(%node, %from, "node name claimed by a join");
                    Ok(())
                }
                Err(e) if is_conflict(&e) => Err(Refusal::Owned(format!(
                    "another join claimed node {node} at the same moment"
                ))),
                Err(e) => Err(unavailable(
                    &format!("recording the owner of Node {node}"),
                    e,
                )),
            }
        })
    }

    fn rotate<'a>(
        &'a self,
        node: &'a str,
        old: &'a str,
        new: &'a str,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            for _ in 0..WRITE_ATTEMPTS {
                let current = self.fetch(node).await?;
                let identity = rotated(node, old, new, &Record::of_node(current.as_ref()))?;
                let Some(n) = current else {
                    return Err(Refusal::Denied(format!("there is no Node {node}")));
                };
                match self.write(n, &identity).await {
                    Ok(()) => return Ok(()),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(unavailable(&format!("writing Node {node}"), e)),
                }
            }
            Err(Refusal::Unavailable(format!(
                "Node {node} kept changing; try again"
            )))
        })
    }

    fn use_token<'a>(&'a self, jti: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async move {
            let name = format!("{TOKEN_SECRET_PREFIX}{jti}");
            for _ in 0..WRITE_ATTEMPTS {
                let secret = self
                    .secrets
                    .get_opt(&name)
                    .await
                    .map_err(|e| unavailable("reading the token's use count", e))?;
                let Some(mut secret) = secret else {
                    return Err(Refusal::Denied(
                        "the token's use count is gone (deleted); issue a new token".into(),
                    ));
                };
                let left = uses_left(&secret).ok_or_else(|| {
                    Refusal::Denied(format!("Secret {name} does not hold a use count"))
                })?;
                if left == 0 {
                    return Err(Refusal::Denied("the token is used up".into()));
                }
                secret.data.get_or_insert_with(BTreeMap::new).insert(
                    USES_LEFT.to_owned(),
                    ByteString((left - 1).to_string().into_bytes()),
                );
                match self
                    .secrets
                    .replace(&name, &PostParams::default(), &secret)
                    .await
                {
                    Ok(_) => return Ok(()),
                    Err(e) if is_conflict(&e) => continue,
                    Err(e) => return Err(unavailable("counting the token's use", e)),
                }
            }
            Err(Refusal::Unavailable(
                "the token is being used concurrently; try again".into(),
            ))
        })
    }
}
