//! Edge nodes for end-to-end tests: a real `EdgeHub` with a store that records what arrived.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use edgecore::edgehub::credentials::NodeCredentials;
use edgecore::edgehub::outbox::MemoryOutbox;
use edgecore::edgehub::{EdgeHub, EdgeHubSettings, LinkState};
use edgecore::metamanager::store::{Applied, MemoryStore, ObjectStore, StoreError};
use kedge_common::stream::{Stream, StreamRequest};
use kedge_common::{Message, Operation};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// One message the store received, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct Arrival {
    pub resource: String,
    pub operation: Operation,
    pub resource_version: String,
    pub applied: Applied,
}

/// Delegates to [`MemoryStore`] and records every message, and every version actually stored.
#[derive(Default)]
pub struct RecordingStore {
    pub inner: MemoryStore,
    pub arrivals: Mutex<Vec<Arrival>>,
    pub applied: Mutex<HashMap<String, Vec<u64>>>,
}

impl RecordingStore {
    pub fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Position of the first arrival for `resource`, if any.
    pub fn first_arrival(&self, resource: &str) -> Option<usize> {
        self.arrivals().iter().position(|a| a.resource == resource)
    }
}

impl ObjectStore for RecordingStore {
    fn apply(
        &self,
        msg: &Message,
    ) -> impl std::future::Future<Output = Result<Applied, StoreError>> + Send + 'static + use<>
    {
        std::future::ready(self.record(msg))
    }

    fn inventory(
        &self,
    ) -> impl std::future::Future<
        Output = Result<Vec<kedge_common::inventory::InventoryItem>, StoreError>,
    >
    + Send
    + 'static
    + use<> {
        self.inner.inventory()
    }
}

impl RecordingStore {
    fn record(&self, msg: &Message) -> Result<Applied, StoreError> {
        let r = self.inner.apply_now(msg)?;
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arrival {
                resource: msg.route.resource.clone(),
                operation: msg.route.operation.clone(),
                resource_version: msg.header.resource_version.clone(),
                applied: r,
            });
        if r == Applied::Stored {
            let rv = msg.header.resource_version.parse().unwrap_or(0);
            self.applied
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(msg.route.resource.clone())
                .or_default()
                .push(rv);
        }
        Ok(r)
    }
}

/// Settings for a test edge: fast heartbeats and reconnects.
pub fn fast_settings(server: SocketAddr, node: &str) -> EdgeHubSettings {
    let mut s = EdgeHubSettings::new(server.to_string(), node);
    s.heartbeat = Duration::from_millis(500);
    s.read_deadline = Duration::from_millis(5500);
    s.backoff_initial = Duration::from_millis(10);
    s.backoff_max = Duration::from_millis(100);
    s
}

/// A running edge node. Dropping it stops it.
pub struct TestEdge<S: ObjectStore> {
    pub store: Arc<S>,
    pub outbox: Arc<MemoryOutbox>,
    pub link: watch::Receiver<LinkState>,
    stop: CancellationToken,
}

impl<S: ObjectStore> TestEdge<S> {
    pub fn start(settings: EdgeHubSettings, creds: NodeCredentials, store: Arc<S>) -> Self {
        Self::start_with(settings, creds, store, None)
    }

    /// An edge whose EdgeHub hands the streams the cloud opens to the returned receiver (what
    /// edged's stream server gets).
    pub fn start_with_streams(
        settings: EdgeHubSettings,
        creds: NodeCredentials,
        store: Arc<S>,
    ) -> (Self, mpsc::Receiver<(Stream, StreamRequest)>) {
        let (tx, rx) = mpsc::channel(64);
        (Self::start_with(settings, creds, store, Some(tx)), rx)
    }

    fn start_with(
        settings: EdgeHubSettings,
        creds: NodeCredentials,
        store: Arc<S>,
        streams: Option<mpsc::Sender<(Stream, StreamRequest)>>,
    ) -> Self {
        let outbox = Arc::new(MemoryOutbox::new());
        let mut hub = EdgeHub::new(
            settings,
            Arc::new(RwLock::new(creds)),
            store.clone(),
            outbox.clone(),
        );
        if let Some(tx) = streams {
            hub = hub.with_streams(tx);
        }
        let link = hub.link_state();
        let stop = CancellationToken::new();
        tokio::spawn(hub.run(stop.clone()));
        TestEdge {
            store,
            outbox,
            link,
            stop,
        }
    }

    pub async fn wait_for(&mut self, want: LinkState, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.link.wait_for(|s| *s == want))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl<S: ObjectStore> Drop for TestEdge<S> {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
