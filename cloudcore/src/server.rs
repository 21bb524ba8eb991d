//! cloudcore assembled: CloudHub, edgecontroller and synccontroller on one Kubernetes client.
//! The daemon and the end-to-end tests start it the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cloudhub::{self, CloudHubHandle, CloudHubOptions, certs::CloudPki};
use crate::edgecontroller::{EdgeController, EdgeControllerSettings, Stats};
use crate::synccontroller::{SyncError, SyncState};

#[derive(Debug, Clone)]
pub struct CloudCoreOptions {
    pub hub: CloudHubOptions,
    /// cloudcore's own namespace (PKI Secrets, sync state).
    pub namespace: String,
    pub edge: EdgeControllerSettings,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Hub(#[from] cloudhub::StartError),
    #[error(transparent)]
    Sync(#[from] SyncError),
}

/// A running cloudcore.
pub struct RunningCloudCore {
    pub hub: CloudHubHandle,
    pub websocket_addr: SocketAddr,
    pub bootstrap_addr: Option<SocketAddr>,
    pub stats: Arc<Stats>,
    pub sync: Arc<SyncState>,
    shutdown: CancellationToken,
    hub_tasks: tokio::task::JoinSet<()>,
    controller: tokio::task::JoinHandle<()>,
    sync_task: tokio::task::JoinHandle<()>,
}

pub async fn start(
    client: kube::Client,
    pki: Arc<CloudPki>,
    opts: CloudCoreOptions,
) -> Result<RunningCloudCore, StartError> {
    let shutdown = CancellationToken::new();
    let sync = Arc::new(SyncState::new(client.clone(), &opts.namespace));
    let loaded = sync.load().await?;
    tracing::info!(objects = loaded, "sync state loaded");
    let running = cloudhub::start(pki, opts.hub, shutdown.clone()).await?;
    let controller = EdgeController::new(client, running.handle.clone(), sync.clone(), opts.edge);
    let stats = controller.stats.clone();
    let controller = tokio::spawn(controller.run(running.upstream, shutdown.clone()));
    let sync_task = {
        let sync = sync.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { sync.run(stop).await })
    };
    Ok(RunningCloudCore {
        hub: running.handle,
        websocket_addr: running.websocket_addr,
        bootstrap_addr: running.bootstrap_addr,
        stats,
        sync,
        shutdown,
        hub_tasks: running.tasks,
        controller,
        sync_task,
    })
}

impl RunningCloudCore {
    /// Graceful stop: close sessions, write the sync state a last time.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = (&mut self.controller).await;
        let _ = (&mut self.sync_task).await;
        while self.hub_tasks.join_next().await.is_some() {}
    }

    /// Like `kill -9`: everything stops at once and nothing more is written.
    pub async fn kill(mut self) {
        self.sync_task.abort();
        self.controller.abort();
        self.hub_tasks.abort_all();
        self.shutdown.cancel();
        let _ = (&mut self.sync_task).await;
        let _ = (&mut self.controller).await;
        while self.hub_tasks.join_next().await.is_some() {}
    }
}
