//! One edge node on a private containerd, with cloudcore (the shipped binaries) against the test
//! API server: the fixture of the edged end-to-end tests.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use crate::apiserver::TestApiServer;
use crate::containerd::TestContainerd;
use crate::daemons::Setup;

/// Waits up to 60 s for `cond`, failing with both daemons' and containerd's log tails.
pub async fn eventually<F, Fut>(what: &str, setup: &Setup, ctr: &TestContainerd, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{}\n--- containerd\n{}",
            setup.log_tails(60),
            ctr.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Running containers by pod name → container id, as containerd lists them.
pub async fn running_containers(
    cri: &edgecore::edged::runtime::CriRuntime,
) -> std::collections::BTreeMap<String, String> {
    use edgecore::edged::runtime::{Runtime, api};
    cri.list_containers(Some(api::ContainerFilter {
        state: Some(api::ContainerStateValue {
            state: api::ContainerState::ContainerRunning as i32,
        }),
        ..Default::default()
    }))
    .await
    .unwrap_or_default()
    .into_iter()
    .filter_map(|c| Some((c.labels.get("io.kubernetes.pod.name")?.clone(), c.id)))
    .collect()
}

/// One edge node on a private containerd, with cloudcore against the test API server, up and
/// registered.
pub struct Rig {
    pub ctr: TestContainerd,
    pub client: kube::Client,
    pub setup: Setup,
    pub cloud: crate::daemons::Daemon,
    pub edge: crate::daemons::Daemon,
    pub nodes: Api<Node>,
    pub _server: TestApiServer,
    pub _dir: tempfile::TempDir,
}

/// A label every rig's edgecore configures (`modules.edged.nodeLabels`).
pub const RIG_LABEL: (&str, &str) = ("example.com/rack", "r1");

impl Rig {
    pub async fn start(node: &str) -> Rig {
        kedge_common::tls::install_crypto_provider();
        let ctr = TestContainerd::start().unwrap();
        let server = TestApiServer::start().await.unwrap();
        let client = server.client().unwrap();
        server.create_namespace("kubeedge").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::write(dir.path(), server.kubeconfig_path(), node).unwrap();
        setup
            .use_container_runtime(&ctr.socket, &ctr.cgroup_parent)
            .unwrap();
        setup
            .set_node_labels(&[(RIG_LABEL.0, RIG_LABEL.1)])
            .unwrap();
        let (cloud, edge) = setup.start_both().await.unwrap();
        let nodes: Api<Node> = Api::all(client.clone());
        eventually("edge Node registered", &setup, &ctr, || async {
            nodes.get_opt(node).await.unwrap().is_some()
        })
        .await;
        Rig {
            ctr,
            client,
            setup,
            cloud,
            edge,
            nodes,
            _server: server,
            _dir: dir,
        }
    }
}
