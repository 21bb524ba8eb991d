//! Edge Nodes as the controller sees them: a node that becomes an edge node gets its own Node
//! object and the pods already bound to it; a deleted one loses its pods (as the pod garbage
//! collector would, on the leader) and its certificates.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_common::Operation;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::runtime::watcher;

use super::{Input, Loop, NsName, autonomy, ns_name, obj_key, rv_of, to_json};

impl Loop {
    pub(super) async fn on_nodes(&mut self, ev: watcher::Event<Node>) {
        match ev {
            watcher::Event::Apply(n) | watcher::Event::InitApply(n) => {
                let name = n.name_any();
                self.relists[0].saw((String::new(), name.clone()));
                let keys = self.identities.observe(&n);
                self.hub.close_unless_key(&name, &keys);
                let new = !self.edge_nodes.contains_key(&name);
                let autonomy_changed = self
                    .edge_nodes
                    .get(&name)
                    .is_some_and(|old| autonomy::autonomy_of(old) != autonomy::autonomy_of(&n));
                self.edge_nodes.insert(name.clone(), n.clone());
                if autonomy_changed {
                    let keys: Vec<NsName> = self
                        .pods
                        .iter()
                        .filter(|(_, e)| e.node == name)
                        .map(|(k, _)| k.clone())
                        .collect();
                    tracing::info!(node = %name, pods = keys.len(), autonomy = ?autonomy::autonomy_of(&n), "node autonomy changed");
                    for k in keys {
                        self.ensure_autonomy(&k);
                    }
                }
                // The node gets its own Node object (for its local API).
                self.send(
                    &name,
                    obj_key(
                        "node",
                        None,
                        &name,
                        n.metadata.uid.as_deref().unwrap_or_default(),
                    ),
                    &rv_of(&n),
                    Operation::Update,
                    to_json(&n),
                );
                // A node that becomes an edge node later: pick up pods already bound to it. During
                // the initial list the pod watch delivers them anyway.
                if new && self.relists[0].done_once {
                    self.adopt_pods_of(&name);
                }
                if new {
                    self.edge_nodes_changed();
                }
            }
            watcher::Event::Delete(n) => self.node_gone(&n.name_any()),
            watcher::Event::Init => self.relists[0].init(),
            watcher::Event::InitDone => {
                let seen = self.relists[0].done();
                let gone: Vec<String> = self
                    .edge_nodes
                    .keys()
                    .filter(|n| !seen.contains(&(String::new(), (*n).clone())))
                    .cloned()
                    .collect();
                for n in gone {
                    self.node_gone(&n);
                }
            }
        }
    }

    /// A node became an edge node: pick up the pods already bound to it (one list call, made
    /// off the loop: a join storm of thousands of nodes would otherwise hold every other event
    /// back behind one list per node). The pods come back as [`Input::Adoptable`].
    pub(super) fn adopt_pods_of(&mut self, node: &str) {
        self.adopting.entry(node.to_owned()).or_default();
        let (client, tx, node) = (self.client.clone(), self.retry_tx.clone(), node.to_owned());
        tokio::spawn(async move {
            let api: Api<Pod> = Api::all(client);
            let input = match api
                .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                .await
            {
                Ok(list) => Input::Adoptable(node, list.items),
                Err(e) => {
                    // Pods that do not change would otherwise never reach the node: try again.
                    tracing::warn!(%node, error = %e, "cannot list the pods of a new edge node; retrying in 2 s");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    Input::Adopt(node)
                }
            };
            if let Some(tx) = tx.upgrade() {
                let _ = tx.send(input).await;
            }
        });
    }

    pub(super) async fn adopt(&mut self, node: &str, pods: Vec<Pod>) {
        let deleted = self.adopting.remove(node).unwrap_or_default();
        if !self.edge_nodes.contains_key(node) {
            return;
        }
        for mut p in pods {
            p.metadata.managed_fields = None;
            // The watch may have brought it (or a newer version), or its deletion, meanwhile.
            let key = ns_name(&p);
            if !self.pods.contains_key(&key) && !deleted.contains(&key) {
                self.pod_applied(p).await;
            }
        }
    }

    /// An edge node's Node object is gone: its pods must not be left behind (as the pod GC).
    pub(super) fn node_gone(&mut self, node: &str) {
        // Its certificates die with it.
        self.identities.forget(node);
        self.hub.close_unless_key(node, &[]);
        if self.edge_nodes.remove(node).is_some() {
            self.edge_nodes_changed();
        }
        // Its worker finishes what it has and stops.
        self.report_workers.remove(node);
        let victims: Vec<(NsName, String)> = self
            .pods
            .iter()
            .filter(|(_, e)| e.node == node)
            .map(|(k, e)| (k.clone(), e.pod.metadata.uid.clone().unwrap_or_default()))
            .collect();
        // One replica deletes; a leader that dies before it is done leaves the rest to the
        // cluster's pod garbage collector (pods bound to a Node that does not exist).
        if victims.is_empty() || !self.leads() {
            return;
        }
        tracing::info!(%node, pods = victims.len(), "edge node deleted; deleting its pods");
        let client = self.client.clone();
        tokio::spawn(async move {
            for ((ns, name), uid) in victims {
                let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                if let Err(e) = api.delete(&name, &dp).await
                    && !matches!(&e, kube::Error::Api(s) if s.code == 404)
                {
                    tracing::warn!(%ns, %name, error = %e, "cannot delete pod of a deleted node");
                }
            }
        });
    }
}
