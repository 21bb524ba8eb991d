//! cloudhub in-process for tests, and a bare protocol-level edge client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cloudcore::cloudhub::certs::{self, CloudPki};
use cloudcore::cloudhub::{self, CloudHubHandle, CloudHubOptions, HubSettings, Upstream};
use cloudcore::nodeidentity::cluster::ClusterIdentities;
use cloudcore::nodeidentity::memory::MemoryIdentities;
use cloudcore::nodeidentity::{BoxFuture, NodeIdentities, Refusal};
use edgecore::edgehub::credentials::NodeCredentials;
use kedge_common::pki;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

pub const PROJECT: &str = "e632aba927ea4ac2b575ec1603d56f10";

/// A running cloudhub with its own PKI in a temporary directory, ownership records in memory.
pub struct TestCloud {
    pub pki: Arc<CloudPki>,
    pub identities: Arc<MemoryIdentities>,
    pub handle: CloudHubHandle,
    pub upstream: mpsc::Receiver<Upstream>,
    pub websocket_addr: SocketAddr,
    pub bootstrap_addr: SocketAddr,
    pub shutdown: CancellationToken,
    /// The listeners' tasks (dropping a JoinSet aborts them, so the cloud holds it).
    _tasks: tokio::task::JoinSet<()>,
    _dir: tempfile::TempDir,
}

impl TestCloud {
    pub async fn start(settings: HubSettings) -> anyhow::Result<Self> {
        kedge_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir()?;
        let pki = Arc::new(certs::load_or_create_in_dir(
            dir.path(),
            &["127.0.0.1".to_owned()],
        )?);
        Self::start_with(pki, settings, dir).await
    }

    /// Starts a hub on the given PKI (e.g. to "restart" cloudcore with the same CA).
    pub async fn start_with(
        pki: Arc<CloudPki>,
        settings: HubSettings,
        dir: tempfile::TempDir,
    ) -> anyhow::Result<Self> {
        Self::start_on(pki, settings, dir, "127.0.0.1:0".parse()?).await
    }

    pub async fn start_on(
        pki: Arc<CloudPki>,
        settings: HubSettings,
        dir: tempfile::TempDir,
        websocket_addr: SocketAddr,
    ) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let opts = CloudHubOptions {
            websocket_addr,
            bootstrap_addr: Some("127.0.0.1:0".parse()?),
            settings,
            node_cert_validity: Duration::from_secs(86_400),
            upstream_capacity: 65_536,
        };
        let identities = Arc::new(MemoryIdentities::default());
        let running =
            cloudhub::start(pki.clone(), opts, identities.clone(), shutdown.clone()).await?;
        Ok(TestCloud {
            pki,
            identities,
            handle: running.handle,
            upstream: running.upstream,
            websocket_addr: running.websocket_addr,
            bootstrap_addr: running
                .bootstrap_addr
                .ok_or_else(|| anyhow::anyhow!("no bootstrap listener"))?,
            shutdown,
            _tasks: running.tasks,
            _dir: dir,
        })
    }

    pub fn bootstrap_url(&self) -> String {
        format!("https://{}", self.bootstrap_addr)
    }

    pub fn token(&self) -> String {
        self.pki.issue_token(Duration::from_secs(3600))
    }

    /// A node identity signed directly by the CA (no bootstrap round trip) and recorded as the
    /// node's owner, as a join would.
    pub fn node_credentials(&self, node: &str) -> anyhow::Result<NodeCredentials> {
        let creds = issue_node_credentials(&self.pki.ca, node)?;
        self.identities.own(node, &key_id(&creds)?);
        Ok(creds)
    }

    /// Waits for the next upstream event matching `pred`, up to `timeout`.
    pub async fn expect_upstream(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Upstream) -> bool,
    ) -> anyhow::Result<Upstream> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.upstream.recv())
                .await
                .map_err(|_| anyhow::anyhow!("no matching upstream event within {timeout:?}"))?
                .ok_or_else(|| anyhow::anyhow!("upstream channel closed"))?;
            if pred(&ev) {
                return Ok(ev);
            }
        }
    }
}

impl Drop for TestCloud {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// cloudcore as the in-process tests run it: WebSocket on `websocket_addr`, no bootstrap
/// endpoint (tests issue node certificates directly), namespace `kubeedge`.
pub fn cloudcore_options(
    websocket_addr: SocketAddr,
    edge: cloudcore::edgecontroller::EdgeControllerSettings,
    stream: Option<cloudcore::server::StreamServerOptions>,
) -> cloudcore::server::CloudCoreOptions {
    cloudcore::server::CloudCoreOptions {
        hub: CloudHubOptions {
            websocket_addr,
            bootstrap_addr: None,
            settings: HubSettings::default(),
            node_cert_validity: Duration::from_secs(86_400),
            upstream_capacity: 4096,
        },
        namespace: "kubeedge".into(),
        edge,
        stream,
        leader_election: None,
    }
}

/// The key id of a node identity's certificate.
pub fn key_id(creds: &NodeCredentials) -> anyhow::Result<String> {
    Ok(pki::cert_key_id(
        &pki::pem_to_der(&creds.cert_pem, "CERTIFICATE").map_err(anyhow::Error::msg)?,
    )?)
}

/// A node identity signed directly by the CA and recorded in the cluster as the node's owner
/// (its Node created, or taken over after a reset), as `edgecore join` would.
pub async fn cluster_node_credentials(
    client: &kube::Client,
    ca: &pki::CertificateAuthority,
    node: &str,
) -> anyhow::Result<NodeCredentials> {
    let creds = issue_node_credentials(ca, node)?;
    let ids = ClusterIdentities::new(client.clone(), "kubeedge");
    ids.reset(node).await?;
    ids.claim(node, &key_id(&creds)?, std::net::Ipv4Addr::LOCALHOST.into())
        .await?;
    Ok(creds)
}

/// Benchmark support: admits every certificate our CA signed, without ownership records, so
/// the hub benchmarks (`hubbench`, driven by `edgesim` from another process) measure the link
/// alone. Joins, rotations and counted tokens are refused.
pub struct AnyNodeCertificate;

impl NodeIdentities for AnyNodeCertificate {
    fn admit<'a>(&'a self, _: &'a str, _: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async { Ok(()) })
    }
    fn claim<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: std::net::IpAddr,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async { Err(Refusal::Denied("joins are off in this benchmark".into())) })
    }
    fn rotate<'a>(
        &'a self,
        _: &'a str,
        _: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async { Err(Refusal::Denied("rotation is off in this benchmark".into())) })
    }
    fn use_token<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), Refusal>> {
        Box::pin(async { Err(Refusal::Denied("tokens are off in this benchmark".into())) })
    }
}

pub fn issue_node_credentials(
    ca: &pki::CertificateAuthority,
    node: &str,
) -> anyhow::Result<NodeCredentials> {
    let (key_pem, csr) = pki::node_csr(node)?;
    let der = ca.sign_node_csr(csr.as_bytes(), node, &[], Duration::from_secs(86_400))?;
    Ok(NodeCredentials {
        ca_der: ca.cert_der().to_vec(),
        cert_pem: pki::der_to_pem(&der, "CERTIFICATE"),
        key_pem,
    })
}

pub type RawWs = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Connects a bare WebSocket client presenting `creds`, asking for `url_node`'s events path,
/// as our edgecore (`kedge-protocol` header).
pub async fn raw_connect(
    addr: SocketAddr,
    creds: &NodeCredentials,
    url_node: &str,
) -> anyhow::Result<RawWs> {
    let tls = tls_connect(addr, creds).await?;
    let mut req = format!("wss://{addr}/{PROJECT}/{url_node}/events").into_client_request()?;
    // Speaks as our edgecore does (see `kubeedge_connect` for KubeEdge's).
    req.headers_mut().insert(
        kedge_common::inventory::PROTOCOL_HEADER,
        kedge_common::inventory::PROTOCOL_VERSION.parse()?,
    );
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    Ok(ws)
}

/// Connects as KubeEdge v1.23's edgecore does (`../shared/interop/kubeedge-v1.23.1/upgrade.md`):
/// the `Connectionuse`, `Node_id` and `Project_id` headers and no kedge headers.
pub async fn kubeedge_connect(
    addr: SocketAddr,
    creds: &NodeCredentials,
    node: &str,
) -> anyhow::Result<RawWs> {
    let tls = tls_connect(addr, creds).await?;
    let mut req = format!("wss://{addr}/{PROJECT}/{node}/events").into_client_request()?;
    let h = req.headers_mut();
    h.insert("Connectionuse", "msg".parse()?);
    h.insert("Node_id", node.parse()?);
    h.insert("Project_id", PROJECT.parse()?);
    let (ws, _) = tokio_tungstenite::client_async(req, tls).await?;
    Ok(ws)
}

/// TLS to cloudcore at `addr`, presenting the node's certificate.
pub async fn tls_connect(
    addr: SocketAddr,
    creds: &NodeCredentials,
) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    Ok(tokio_rustls::TlsConnector::from(creds.client_config()?)
        .connect(rustls::pki_types::ServerName::try_from("127.0.0.1")?, tcp)
        .await?)
}
