//! Node identity with the real binaries: `cloudcore` against the test API server, `cloudcore
//! token|node` as an administrator runs them, `edgecore join` and `edgecore`, and an attacker
//! holding a valid join token (the bootstrap calls `edgecore join` makes, from the library).
//!
//! - A token cannot take over a running, owned node; the real node keeps its session.
//! - A node's certificate reaches only its own node's objects.
//! - Node-bound (`--node`) and counted (`--uses`) tokens; a bad token cannot join.
//! - Deleting the Node closes its session within 5 s, its certificate is refused (connect and
//!   rotation) and its Node is not re-created; a fresh join works.
//! - `cloudcore node revoke` / `reset`.
//! - Failed bootstrap attempts are rate-limited per address.
//! - The edge's database and key files are 0600.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use edgecore::edgehub::credentials::{self, CredentialError, CredentialPaths, NodeCredentials};
use k8s_openapi::api::core::v1::{Node, Pod};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::daemons::{Setup, bin, http_text};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

async fn eventually<F, Fut>(what: &str, setup: &Setup, within: Duration, mut cond: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return start.elapsed();
        }
        if start.elapsed() > within {
            panic!("{what}: not within {within:?}\n{}", setup.log_tails(40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `cloudcore <args>` with the setup's config: (success, stdout + stderr).
fn cloudcore_cli(setup: &Setup, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(bin("cloudcore").unwrap())
        .arg("--config")
        .arg(&setup.cloudcore_config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn token(setup: &Setup, args: &[&str]) -> String {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    let (ok, out) = cloudcore_cli(setup, &all);
    assert!(ok, "cloudcore token {args:?}: {out}");
    out.trim().to_owned()
}

fn bootstrap(setup: &Setup) -> String {
    format!("https://127.0.0.1:{}", setup.https_port)
}

/// What `edgecore join` does, from the library (another machine holding a token).
async fn join(setup: &Setup, token: &str, node: &str) -> Result<NodeCredentials, CredentialError> {
    credentials::join(&bootstrap(setup), token, node, Duration::from_secs(10)).await
}

fn refused_with(r: Result<NodeCredentials, CredentialError>, status: u16, text: &str) {
    match r {
        Err(CredentialError::Refused {
            status: s, body, ..
        }) => {
            assert_eq!(s, status, "{body}");
            assert!(body.contains(text), "`{body}` lacks `{text}`");
        }
        Err(e) => panic!("expected a {status} refusal, got {e}"),
        Ok(_) => panic!("expected a {status} refusal, got a certificate"),
    }
}

fn edge_credentials(setup: &Setup) -> NodeCredentials {
    let d = setup.dir.join("edge");
    credentials::NodeCredentials::load(&CredentialPaths {
        ca: d.join("ca.crt"),
        cert: d.join("edge.crt"),
        key: d.join("edge.key"),
    })
    .unwrap()
    .expect("the edge's credentials")
}

fn ws_addr(setup: &Setup) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", setup.websocket_port)
        .parse()
        .unwrap()
}

async fn connected_nodes(setup: &Setup) -> Option<u32> {
    let (_, text) = http_text(setup.observability_port, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix("kedge_cloudcore_connected_nodes "))
        .and_then(|v| v.trim().parse().ok())
}

async fn start(dir: &Path, node: &str) -> (TestApiServer, kube::Client, Setup) {
    kedge_common::tls::install_crypto_provider();
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();
    let setup = Setup::write(dir, server.kubeconfig_path(), node).unwrap();
    (server, client, setup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_cannot_take_over_a_node_and_deleting_the_node_revokes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client, setup) = start(dir.path(), "edge-owned").await;
    let (_cloud, _edge) = setup.start_both().await.unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    eventually("edge-owned connected", &setup, T, || async {
        connected_nodes(&setup).await == Some(1)
    })
    .await;

    // The edge's files holding secrets are its user's only.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    for f in [
        "edge/edge.key",
        "edge/edgecore.db",
        "edge/edgecore.db-wal",
        "edge/edgecore.db-shm",
    ] {
        let meta = std::fs::metadata(setup.dir.join(f)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        assert_eq!(meta.uid(), nix_uid(), "{f} is owned by edgecore's user");
    }

    // Someone else with a valid token asks for the running node's name: refused, and the real
    // node keeps its session.
    let any = token(&setup, &[]);
    refused_with(join(&setup, &any, "edge-owned").await, 409, "already owned");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(connected_nodes(&setup).await, Some(1));
    let log = std::fs::read_to_string(setup.dir.join("cloudcore.log")).unwrap();
    assert!(!log.contains("replaces the old session"), "{log}");

    // A certificate of one node reaches no other node's objects.
    let thief = join(&setup, &any, "edge-thief").await.unwrap();
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "secret-work"},
            "spec": {"nodeName": "edge-owned", "containers": [{"name": "c", "image": "busybox"}]}}))
        .unwrap(),
    )
    .await
    .unwrap();
    let err = kedge_e2e::cloud::raw_connect(ws_addr(&setup), &thief, "edge-owned")
        .await
        .expect_err("edge-thief's certificate connecting as edge-owned");
    assert!(err.to_string().contains("403"), "{err}");
    // The real node got its pod.
    let meta = setup.metaserver_port;
    eventually("the pod on edge-owned's MetaServer", &setup, T, || async {
        http_text(meta, "/api/v1/namespaces/default/pods/secret-work")
            .await
            .is_some_and(|(_, b)| b.contains("edge-owned"))
    })
    .await;

    // Deleting the Node closes the session within 5 s and revokes the certificate.
    let owned = edge_credentials(&setup);
    nodes
        .delete("edge-owned", &DeleteParams::default())
        .await
        .unwrap();
    let took = eventually("session closed", &setup, Duration::from_secs(5), || async {
        connected_nodes(&setup).await == Some(0)
    })
    .await;
    println!("session closed {took:?} after the Node was deleted");
    let err = kedge_e2e::cloud::raw_connect(ws_addr(&setup), &owned, "edge-owned")
        .await
        .expect_err("a deleted node's certificate");
    assert!(err.to_string().contains("403"), "{err}");
    let rotated = credentials::rotate(
        &bootstrap(&setup),
        &owned,
        "edge-owned",
        Duration::from_secs(10),
    )
    .await;
    refused_with(rotated, 403, "does not exist");
    // edgecore keeps trying, slowly (a refusal stands until an administrator acts) and saying
    // why once; cloudcore never re-creates its Node.
    let refusals = || {
        std::fs::read_to_string(setup.dir.join("cloudcore.log"))
            .unwrap()
            .lines()
            // One line per refused attempt (the admission's; "refused or ended" repeats it).
            .filter(|l| {
                l.contains("connection refused")
                    && !l.contains("or ended")
                    && l.contains("edge-owned")
            })
            .count()
    };
    let before = refusals();
    // With the link's ordinary back-off (capped at 2 s) this would be 4 or more attempts.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(nodes.get_opt("edge-owned").await.unwrap().is_none());
    assert_eq!(connected_nodes(&setup).await, Some(0));
    let attempts = refusals() - before;
    assert!(
        attempts <= 2,
        "{attempts} refused attempts in 6 s; a refused edge backs off to a minute"
    );
    let edge_log = std::fs::read_to_string(setup.dir.join("edgecore.log")).unwrap();
    let told: Vec<&str> = edge_log
        .lines()
        .filter(|l| l.contains("refused this node (HTTP 403)"))
        .collect();
    assert_eq!(told.len(), 1, "said once, at warning level: {told:?}");
    assert!(told[0].contains("WARN"), "{}", told[0]);

    // Re-provisioning: a fresh join with a new token claims the name again.
    let fresh = join(&setup, &token(&setup, &[]), "edge-owned")
        .await
        .unwrap();
    kedge_e2e::cloud::raw_connect(ws_addr(&setup), &fresh, "edge-owned")
        .await
        .expect("the re-provisioned node connects");
}

fn nix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    // The test's own files are made by the user edgecore runs as (the same user here).
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_bound_counted_and_bad_tokens_revocation_reset_and_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, client, setup) = start(dir.path(), "edge-r").await;
    let (_cloud, _edge) = setup.start_both().await.unwrap();
    eventually("edge-r connected", &setup, T, || async {
        connected_nodes(&setup).await == Some(1)
    })
    .await;

    // --node: only that name.
    let bound = token(&setup, &["--node", "edge-n", "--ttl", "10m"]);
    refused_with(
        join(&setup, &bound, "edge-other").await,
        403,
        "only node `edge-n`",
    );
    join(&setup, &bound, "edge-n").await.unwrap();

    // --uses 2: two joins, then refused.
    let counted = token(&setup, &["--uses", "2"]);
    join(&setup, &counted, "edge-u1").await.unwrap();
    join(&setup, &counted, "edge-u2").await.unwrap();
    refused_with(join(&setup, &counted, "edge-u3").await, 403, "used up");

    // A bad token cannot join: forged (another CA's token shape is checked on the edge, so a
    // bare forged JWT), expired.
    let forged = kedge_common::pki::JoinToken::issue(
        b"not our CA",
        b"guessed secret",
        Duration::from_secs(3600),
    );
    let forged_jwt = forged.split_once('.').unwrap().1.to_owned();
    let r = credentials::bootstrap_request(
        &bootstrap(&setup),
        kedge_common::tls::unverified_client_config().unwrap(),
        "/edge.crt",
        &[
            ("Authorization", format!("Bearer {forged_jwt}")),
            ("NodeName", "edge-forged".to_owned()),
        ],
        kedge_common::pki::node_csr("edge-forged")
            .unwrap()
            .1
            .into_bytes(),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        matches!(r, Err(CredentialError::Refused { status: 401, .. })),
        "{r:?}"
    );
    let expired = token(&setup, &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    refused_with(join(&setup, &expired, "edge-late").await, 401, "expired");
    let nodes: Api<Node> = Api::all(client.clone());
    for n in ["edge-other", "edge-u3", "edge-forged", "edge-late"] {
        assert!(nodes.get_opt(n).await.unwrap().is_none(), "{n}");
    }

    // cloudcore node revoke: the session closes, the certificate is refused for connections
    // and rotations, and a token cannot claim the name until a reset.
    let creds = edge_credentials(&setup);
    let (ok, out) = cloudcore_cli(&setup, &["node", "revoke", "edge-r", "--reason", "stolen"]);
    assert!(ok, "{out}");
    eventually(
        "revoked session closed",
        &setup,
        Duration::from_secs(5),
        || async { connected_nodes(&setup).await == Some(0) },
    )
    .await;
    let rotated = credentials::rotate(
        &bootstrap(&setup),
        &creds,
        "edge-r",
        Duration::from_secs(10),
    )
    .await;
    refused_with(rotated, 403, "revoked");
    refused_with(
        join(&setup, &token(&setup, &[]), "edge-r").await,
        409,
        "revoked",
    );
    let (ok, out) = cloudcore_cli(&setup, &["node", "reset", "edge-r"]);
    assert!(ok, "{out}");
    let again = join(&setup, &token(&setup, &[]), "edge-r").await.unwrap();
    kedge_e2e::cloud::raw_connect(ws_addr(&setup), &again, "edge-r")
        .await
        .expect("the reset node joined again");

    // Failed attempts from one address: after ten in a minute, refused outright (429).
    let any = token(&setup, &[]);
    let mut statuses = Vec::new();
    for _ in 0..12 {
        match join(&setup, &any, "edge-n").await {
            Err(CredentialError::Refused { status, .. }) => statuses.push(status),
            other => panic!("{:?}", other.map(|_| "a certificate")),
        }
    }
    // Six failures came before (wrong node, used up, forged, expired, rotation and join of the
    // revoked name): four more 409s, then 429.
    assert!(statuses.contains(&409), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    let log = std::fs::read_to_string(setup.dir.join("cloudcore.log")).unwrap();
    assert!(log.contains("too many failed attempts"), "logged");
    assert!(
        log.contains("join token used") && log.contains("edge-u1") && log.contains("127.0.0.1"),
        "token use is logged with the node and the caller's address"
    );
}
