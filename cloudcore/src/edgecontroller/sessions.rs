//! What CloudHub tells the controller about sessions: a node connected (and how it will say what
//! it holds), left, acknowledged something, sent its inventory, asked a question or reported.

use tokio::sync::mpsc;

use super::{Loop, kubeedge, tokens, upstream};
use crate::cloudhub::Upstream;

impl Loop {
    pub(super) fn on_hub(&mut self, ev: Upstream) {
        match ev {
            Upstream::Connected {
                node,
                inventory,
                kubeedge,
            } => {
                self.shared
                    .connected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node.clone());
                if inventory {
                    // Acks need no recording for a node that says what it holds.
                    self.sync.forget(&node);
                    self.inventory_nodes.insert(node.clone());
                } else {
                    self.inventory_nodes.remove(&node);
                    self.pending_inventories.remove(&node);
                    self.read_ack_record(node.clone());
                }
                let mut kubeedge_nodes = self
                    .shared
                    .kubeedge
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if kubeedge {
                    // It inserts its Node (with status) and renews its Lease itself; a Node
                    // made here first would be a status-less one it could see and reject pods by.
                    kubeedge_nodes.insert(node);
                } else {
                    kubeedge_nodes.remove(&node);
                    tokio::spawn(upstream::ensure_node(self.client.clone(), node));
                }
            }
            Upstream::Disconnected { node } => {
                self.shared
                    .connected
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&node);
            }
            Upstream::Acked { node, acked } => {
                if !self.inventory_nodes.contains(&node) {
                    self.sync.record(&node, &acked);
                }
            }
            Upstream::Inventory { node, held } => {
                if self.orphans_checked {
                    self.reconcile_inventory(&node, held);
                } else {
                    self.pending_inventories.insert(node, held);
                }
            }
            Upstream::Message { node, message, ack } if kubeedge::is_object_query(&message) => {
                drop(ack);
                self.object_query(node, *message);
            }
            Upstream::Message { node, message, ack } if tokens::is_token_query(&message) => {
                drop(ack);
                self.token_query(node, *message);
            }
            Upstream::Message { node, message, ack } => {
                // One worker per node applies its reports in the order they came: two status
                // reports of one pod applied concurrently could leave the older one in the API.
                let worker = self.report_workers.entry(node.clone()).or_insert_with(|| {
                    upstream::spawn_report_worker(
                        self.client.clone(),
                        self.hub.clone(),
                        self.shared.clone(),
                        self.stats.clone(),
                        node.clone(),
                    )
                });
                if let Err(mpsc::error::SendError((message, ack))) = worker.send((message, ack)) {
                    // The worker is gone (it never stops on its own): start another.
                    let worker = upstream::spawn_report_worker(
                        self.client.clone(),
                        self.hub.clone(),
                        self.shared.clone(),
                        self.stats.clone(),
                        node.clone(),
                    );
                    let _ = worker.send((message, ack));
                    self.report_workers.insert(node, worker);
                }
            }
        }
    }
}
