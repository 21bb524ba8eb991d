//! cloudcore assembled: CloudHub, edgecontroller and synccontroller on one Kubernetes client.
//! The daemon and the end-to-end tests start it the same way.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cloudhub::{self, CloudHubHandle, CloudHubOptions, certs::CloudPki};
use crate::cloudstream::{self, CloudStream, CloudStreamOptions};
use crate::edgecontroller::{EdgeController, EdgeControllerSettings, Stats};
use crate::nodeidentity::cluster::ClusterIdentities;
use crate::synccontroller::{SyncError, SyncState};

#[derive(Debug, Clone)]
pub struct CloudCoreOptions {
    pub hub: CloudHubOptions,
    /// cloudcore's own namespace (PKI Secrets, sync state).
    pub namespace: String,
    pub edge: EdgeControllerSettings,
    /// The kubelet API for the API server (kubectl logs/exec/attach/port-forward); `None`: off.
    pub stream: Option<StreamServerOptions>,
    /// Several replicas: who runs the cluster-wide controllers. `None`: this one, always.
    pub leader_election: Option<LeaderElectionOptions>,
}

/// The Lease replicas elect a leader on (in cloudcore's namespace).
#[derive(Debug, Clone)]
pub struct LeaderElectionOptions {
    pub lease_name: String,
    /// This replica's name in the Lease; unique per process (see [`crate::leader::identity`]).
    pub identity: String,
    pub timing: crate::leader::ElectionTiming,
}

/// How CloudStream listens and whom it lets in.
#[derive(Clone)]
pub struct StreamServerOptions {
    pub listen: SocketAddr,
    /// PEM bundle of the cluster's client CA: callers must present a certificate it signed.
    pub client_ca_pem: String,
    pub authorizer: Arc<dyn cloudstream::authz::Authorizer>,
}

impl std::fmt::Debug for StreamServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamServerOptions")
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Hub(#[from] cloudhub::StartError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(transparent)]
    Stream(#[from] cloudstream::CloudStreamError),
    #[error("cloudstream TLS: {0}")]
    StreamTls(#[from] kedge_common::tls::TlsError),
}

/// A running cloudcore.
pub struct RunningCloudCore {
    pub hub: CloudHubHandle,
    pub websocket_addr: SocketAddr,
    pub bootstrap_addr: Option<SocketAddr>,
    /// Where CloudStream (the nodes' kubelet API) listens, if it runs.
    pub stream_addr: Option<SocketAddr>,
    pub stats: Arc<Stats>,
    pub sync: Arc<SyncState>,
    /// Whether this replica leads (always true without an election).
    pub leader: tokio::sync::watch::Receiver<bool>,
    election: Option<tokio::task::JoinHandle<()>>,
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
    // Each KubeEdge node's record is read when it connects (`SyncState::reload`), not all at
    // start: a replica holds the records of its own nodes only.
    let identities = Arc::new(ClusterIdentities::new(client.clone(), &opts.namespace));
    // The edgecontroller hands every KubeEdge session its acknowledgement record.
    let mut hub = opts.hub;
    hub.settings.await_ack_record = true;
    let mut running =
        cloudhub::start(pki.clone(), hub, identities.clone(), shutdown.clone()).await?;
    let (leader, election) = match &opts.leader_election {
        Some(le) => {
            let (rx, task) = crate::leader::spawn(
                client.clone(),
                &opts.namespace,
                &le.lease_name,
                le.identity.clone(),
                le.timing,
                shutdown.clone(),
            );
            (rx, Some(task))
        }
        None => (tokio::sync::watch::channel(true).1, None),
    };
    let controller = EdgeController::new(
        client,
        running.handle.clone(),
        sync.clone(),
        opts.edge,
        identities,
    )
    .with_leader(leader.clone());
    let stats = controller.stats.clone();
    let mut stream_addr = None;
    if let Some(so) = opts.stream {
        // The API server does not check kubelet serving certificates unless told to
        // (`--kubelet-certificate-authority`); cloudhub's certificate from our CA serves.
        let tls = kedge_common::tls::server_config(
            &pki.server.cert_pem,
            &pki.server.key_pem,
            kedge_common::tls::ClientAuth::RequiredAnyOf(&so.client_ca_pem),
            &[b"http/1.1"],
        )?;
        let server = CloudStream::bind(
            CloudStreamOptions {
                listen: so.listen,
                tls: tokio_rustls::TlsAcceptor::from(tls),
                authorizer: so.authorizer,
            },
            running.handle.clone(),
            controller.pod_locator(),
        )
        .await?;
        stream_addr = server.local_addr().ok();
        running.tasks.spawn(server.serve(shutdown.clone()));
    }
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
        stream_addr,
        stats,
        sync,
        leader,
        election,
        shutdown,
        hub_tasks: running.tasks,
        controller,
        sync_task,
    })
}

impl RunningCloudCore {
    /// Graceful stop: close sessions, write the sync state a last time, give up the leader Lease.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(e) = self.election.take() {
            let _ = e.await;
        }
        let _ = (&mut self.controller).await;
        let _ = (&mut self.sync_task).await;
        while self.hub_tasks.join_next().await.is_some() {}
    }

    /// Like `kill -9`: everything stops at once and nothing more is written.
    pub async fn kill(mut self) {
        if let Some(e) = self.election.take() {
            e.abort();
            let _ = e.await;
        }
        self.sync_task.abort();
        self.controller.abort();
        self.hub_tasks.abort_all();
        self.shutdown.cancel();
        let _ = (&mut self.sync_task).await;
        let _ = (&mut self.controller).await;
        while self.hub_tasks.join_next().await.is_some() {}
    }
}
