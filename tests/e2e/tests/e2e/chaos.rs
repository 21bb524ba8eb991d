//! Randomized chaos with the real binaries: while pods (with ConfigMap and Secret references),
//! ConfigMaps and Secrets bound to one edge node are created, updated and deleted, cloudcore and
//! edgecore are each killed with SIGKILL and restarted at random moments. Afterwards the edge's
//! database holds exactly what the node must hold — the node's pods and the ConfigMaps/Secrets
//! they reference, at the cluster's UIDs and resourceVersions — within 10 s: no orphans, nothing
//! missing, nothing stale.
//!
//! `link_cuts_during_churn_leave_exactly_the_clusters_containers` does the same on a private
//! containerd with cloudcore killed and restarted (link cuts), and checks the containers: none of
//! a deleted pod, one running for every pod, each seeing its ConfigMap's latest value.
//!
//! CI runs the first for 60 s and the second for 30 s, with a fixed seed. By hand:
//! `KEDGE_CHAOS_SEED=<n>|random KEDGE_CHAOS_SECONDS=<s> cargo nextest run -p kedge-e2e
//! -E 'test(/^chaos::/)'`. The seed is printed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cloudcore::edgecontroller::refs::{RefKind, pod_refs};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::daemons::{Daemon, Setup};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sqlx::Row;

const NODE: &str = "edge-chaos";
const DEFAULT_SEED: u64 = 20_261_202;
const DEFAULT_SECONDS: u64 = 60;
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(10);
/// About this many objects of each kind are kept alive by the workload.
const POPULATION: u64 = 20;

/// splitmix64: a small deterministic generator, enough to replay a run from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from))
    }
}

/// `kind/namespace/name` → (uid, resourceVersion).
type State = BTreeMap<String, (String, String)>;

/// What the node must hold, read from the API: its pods, the ConfigMaps and Secrets they
/// reference that exist, and its Node.
async fn expected(client: &kube::Client) -> State {
    let mut out = State::new();
    let pods: Api<Pod> = Api::all(client.clone());
    let cms: Api<ConfigMap> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::all(client.clone());
    let pods = pods
        .list(&ListParams::default().fields(&format!("spec.nodeName={NODE}")))
        .await
        .unwrap();
    let cms: BTreeMap<(String, String), ConfigMap> = cms
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            (
                (
                    c.metadata.namespace.clone().unwrap(),
                    c.metadata.name.clone().unwrap(),
                ),
                c,
            )
        })
        .collect();
    let secrets: BTreeMap<(String, String), Secret> = secrets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            (
                (
                    c.metadata.namespace.clone().unwrap(),
                    c.metadata.name.clone().unwrap(),
                ),
                c,
            )
        })
        .collect();
    for p in pods.items {
        let (ns, name) = (
            p.metadata.namespace.clone().unwrap(),
            p.metadata.name.clone().unwrap(),
        );
        for r in pod_refs(&p) {
            let key = (r.namespace.clone(), r.name.clone());
            let meta = match r.kind {
                RefKind::ConfigMap => cms.get(&key).map(|o| &o.metadata),
                RefKind::Secret => secrets.get(&key).map(|o| &o.metadata),
            };
            if let Some(m) = meta {
                out.insert(
                    format!("{}/{}/{}", r.kind.wire_type(), r.namespace, r.name),
                    (m.uid.clone().unwrap(), m.resource_version.clone().unwrap()),
                );
            }
        }
        out.insert(
            format!("pod/{ns}/{name}"),
            (
                p.metadata.uid.clone().unwrap(),
                p.metadata.resource_version.clone().unwrap(),
            ),
        );
    }
    let nodes: Api<Node> = Api::all(client.clone());
    if let Some(n) = nodes.get_opt(NODE).await.unwrap() {
        out.insert(
            format!("node/null/{NODE}"),
            (
                n.metadata.uid.unwrap(),
                n.metadata.resource_version.unwrap(),
            ),
        );
    }
    out
}

/// What the edge's database holds (live rows only).
async fn held(db: &std::path::Path) -> Option<State> {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true);
    let mut conn = sqlx::ConnectOptions::connect(&opts).await.ok()?;
    let rows = sqlx::query(
        "SELECT kind, namespace, name, uid, resource_version FROM objects WHERE deleted = 0",
    )
    .fetch_all(&mut conn)
    .await
    .ok()?;
    Some(
        rows.into_iter()
            .map(|r| {
                let (kind, ns, name): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                (format!("{kind}/{ns}/{name}"), (r.get(3), r.get(4)))
            })
            .collect(),
    )
}

fn diff(want: &State, have: &State) -> String {
    let mut out = String::new();
    for (k, v) in want {
        match have.get(k) {
            None => out.push_str(&format!("  missing at the edge: {k} {v:?}\n")),
            Some(h) if h != v => {
                out.push_str(&format!("  stale at the edge: {k} {h:?}, cluster {v:?}\n"))
            }
            _ => {}
        }
    }
    for (k, v) in have {
        if !want.contains_key(k) {
            out.push_str(&format!("  orphan at the edge: {k} {v:?}\n"));
        }
    }
    out
}

/// The objects the workload created and has not deleted. Names are never reused, so an object
/// left behind on the edge is never hidden by a namesake created later.
#[derive(Default)]
struct World {
    next: u64,
    pods: Vec<String>,
    configmaps: Vec<String>,
    secrets: Vec<String>,
}

impl World {
    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{}", self.next)
    }
}

/// Picks a live name (or, rarely, one that does not exist).
fn pick(rng: &mut Rng, live: &[String], missing: &str) -> String {
    if live.is_empty() || rng.below(10) == 0 {
        return missing.to_owned();
    }
    live[rng.below(live.len() as u64) as usize].clone()
}

fn take(rng: &mut Rng, live: &mut Vec<String>) -> Option<String> {
    (!live.is_empty()).then(|| live.swap_remove(rng.below(live.len() as u64) as usize))
}

/// One random change to the objects bound to the node (or to a pod elsewhere): creates keep
/// about `POPULATION` objects of each kind alive, updates and deletes pick live ones.
async fn random_change(rng: &mut Rng, w: &mut World, client: &kube::Client, step: u64) {
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let dp = DeleteParams::default().grace_period(0);
    match rng.below(100) {
        0..=19 if (w.pods.len() as u64) < POPULATION || rng.below(3) == 0 => {
            let name = w.fresh("pod");
            let cm1 = pick(rng, &w.configmaps, "cm-none");
            let cm2 = pick(rng, &w.configmaps, "cm-none");
            let sec = pick(rng, &w.secrets, "sec-none");
            let node = if rng.below(8) == 0 {
                "cloud-node"
            } else {
                NODE
            };
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"nodeName": node,
                    "containers": [{"name": "c", "image": "busybox",
                        "envFrom": [{"configMapRef": {"name": cm2}}],
                        "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": sec, "key": "k"}}}]}],
                    "volumes": [{"name": "v", "configMap": {"name": cm1}}]}
            }))
            .unwrap();
            if pods.create(&PostParams::default(), &pod).await.is_ok() {
                w.pods.push(name);
            }
        }
        0..=34 => {
            let name = pick(rng, &w.pods, "pod-none");
            let label = json!({"metadata": {"labels": {"step": step.to_string()}}});
            let _ = pods
                .patch(&name, &PatchParams::default(), &Patch::Merge(label))
                .await;
        }
        35..=44 => {
            if let Some(name) = take(rng, &mut w.pods) {
                let _ = pods.delete(&name, &dp).await;
            }
        }
        45..=72 => {
            let name = w.fresh("cm");
            let api = Api::<ConfigMap>::default_namespaced(client.clone());
            let data = json!({"data": {"v": step.to_string()}});
            churn(rng, &api, &mut w.configmaps, name, data).await;
        }
        _ => {
            let name = w.fresh("sec");
            let api = Api::<Secret>::default_namespaced(client.clone());
            let data = json!({"stringData": {"k": step.to_string()}});
            churn(rng, &api, &mut w.secrets, name, data).await;
        }
    }
}

/// Creates `fresh` (keeping about `POPULATION` alive), or updates or deletes a live object, with
/// `data` as its content.
async fn churn<K>(
    rng: &mut Rng,
    api: &Api<K>,
    live: &mut Vec<String>,
    fresh: String,
    mut data: serde_json::Value,
) where
    K: kube::Resource
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + k8s_openapi::serde::Serialize
        + std::fmt::Debug,
{
    match rng.below(100) {
        0..=34 if (live.len() as u64) < POPULATION || rng.below(3) == 0 => {
            data["metadata"] = json!({"name": fresh});
            if api
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(data).unwrap(),
                )
                .await
                .is_ok()
            {
                live.push(fresh);
            }
        }
        0..=74 => {
            let name = pick(rng, live, "none");
            let _ = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(data))
                .await;
        }
        _ => {
            if let Some(name) = take(rng, live) {
                let _ = api
                    .delete(&name, &DeleteParams::default().grace_period(0))
                    .await;
            }
        }
    }
}

/// `KEDGE_CHAOS_SEED`: a number, `random`, or unset for the fixed CI seed.
fn seed() -> u64 {
    match std::env::var("KEDGE_CHAOS_SEED").ok().as_deref() {
        None | Some("") => DEFAULT_SEED,
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
        Some(s) => s
            .parse()
            .expect("KEDGE_CHAOS_SEED must be a number or `random`"),
    }
}

/// `KEDGE_CHAOS_SECONDS`, or `default`.
fn seconds(default: u64) -> u64 {
    std::env::var("KEDGE_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_sigkills_of_both_daemons_leave_the_edge_holding_exactly_the_clusters_state() {
    let seed = seed();
    let seconds = seconds(DEFAULT_SECONDS);
    println!("chaos seed {seed}, {seconds} s (replay: KEDGE_CHAOS_SEED={seed})");
    let mut rng = Rng(seed);

    kedge_common::tls::install_crypto_provider();
    let server = TestApiServer::start().await.unwrap();
    let client = server.client().unwrap();
    server.create_namespace("kubeedge").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::write(dir.path(), server.kubeconfig_path(), NODE).unwrap();
    let (mut cloud, mut edge) = setup.start_both().await.unwrap();

    // Chaos: each daemon is killed at random moments and restarted after a random pause.
    let mut kills = [0u32; 2];
    let mut restart_at: [Option<Instant>; 2] = [None, None];
    let mut next_kill = Instant::now() + rng.millis(1_000, 4_000);
    let mut last_restart = Instant::now();
    let mut changes = 0u64;
    let mut world = World::default();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_kill {
            let which = rng.below(2) as usize;
            let d: &mut Daemon = if which == 0 { &mut cloud } else { &mut edge };
            if d.is_running() {
                d.kill();
                kills[which] += 1;
                restart_at[which] = Some(now + rng.millis(200, 3_000));
            }
            next_kill = now + rng.millis(1_500, 5_000);
        }
        for (which, at) in restart_at.iter_mut().enumerate() {
            if at.is_some_and(|t| now >= t) {
                *at = None;
                let d: &mut Daemon = if which == 0 { &mut cloud } else { &mut edge };
                d.start().unwrap();
                last_restart = Instant::now();
            }
        }
        random_change(&mut rng, &mut world, &client, changes).await;
        changes += 1;
        tokio::time::sleep(rng.millis(10, 60)).await;
    }
    let workload_end = Instant::now();
    for (which, at) in restart_at.iter_mut().enumerate() {
        if at.take().is_some() {
            let d: &mut Daemon = if which == 0 { &mut cloud } else { &mut edge };
            d.start().unwrap();
            last_restart = Instant::now();
        }
    }
    println!(
        "{changes} changes, {} cloudcore kills, {} edgecore kills",
        kills[0], kills[1]
    );
    assert!(
        kills[0] >= 2 && kills[1] >= 2 || seconds < 30,
        "too few kills: {kills:?}"
    );

    let from = last_restart.max(workload_end);
    let db = setup.edge_database();
    let mut have = State::new();
    let want = loop {
        let want = expected(&client).await;
        if let Some(h) = held(&db).await {
            have = h;
            if want == have {
                break want;
            }
        }
        if from.elapsed() > CONVERGENCE_LIMIT {
            break want;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let took = from.elapsed();
    if want != have {
        // Both daemons' whole logs and the edge's database stay for a post-mortem.
        let kept = dir.keep();
        panic!(
            "seed {seed}: the edge did not converge within {CONVERGENCE_LIMIT:?}:\n{}\n{}\n\
             (logs and the edge database kept in {})",
            diff(&want, &have),
            setup.log_tails(40),
            kept.display()
        );
    }
    println!(
        "converged {took:?} after the last restart/change: {} objects on the edge, exactly the cluster's",
        have.len()
    );
}

/// A pod on `node` that sleeps with ConfigMap `cm-<cm>` mounted at /etc/app.
async fn create_sleeper(pods: &Api<Pod>, image: &str, node: &str, name: &str, cm: u64) {
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": image,
                    "command": ["sh", "-c", "exec sleep 3600"],
                    "volumeMounts": [{"name": "config", "mountPath": "/etc/app"}]}],
                "volumes": [{"name": "config", "configMap": {"name": format!("cm-{cm}")}}]}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
}

/// Sets ConfigMap `cm-<i>`'s `v` to its next value.
async fn bump(cms: &Api<ConfigMap>, values: &mut BTreeMap<u64, u64>, i: u64) {
    let v = values[&i] + 1;
    values.insert(i, v);
    cms.patch(
        &format!("cm-{i}"),
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"v": v.to_string()}})),
    )
    .await
    .unwrap();
}

/// Link chaos with real containers: while pods (each mounting one of three ConfigMaps) are
/// created and deleted and the ConfigMaps change, cloudcore is killed and restarted again and
/// again, cutting the link. Afterwards, within 90 s: the API holds exactly the pods that were not
/// deleted, each Running; containerd holds containers of exactly those pods (no orphans, none
/// missing); every container sees its ConfigMap's latest value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_cuts_during_churn_leave_exactly_the_clusters_containers() {
    use edgecore::edged::runtime::{CriRuntime, Runtime};
    use kedge_e2e::edgerig::{Rig, eventually};
    use std::collections::BTreeSet;

    const NODE: &str = "edge-cchaos";
    const CONFIGMAPS: u64 = 3;
    const MAX_PODS: usize = 6;
    let seed = seed();
    let seconds = seconds(30);
    println!("container chaos seed {seed}, {seconds} s");
    let mut rng = Rng(seed);
    let rig = Rig::start(NODE).await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let cms: Api<ConfigMap> = Api::default_namespaced(rig.client.clone());
    let mut cm_value = BTreeMap::new();
    for i in 0..CONFIGMAPS {
        cms.create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": format!("cm-{i}")}, "data": {"v": "0"}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
        cm_value.insert(i, 0u64);
    }
    // Pod name → the ConfigMap it mounts.
    let mut live: BTreeMap<String, u64> = BTreeMap::new();
    let mut next_pod = 0u64;
    let mut cloud = rig.cloud;
    let _edge = rig.edge;
    let (mut cuts, mut restart_at) = (0u32, None::<Instant>);
    let mut next_cut = Instant::now() + rng.millis(2_000, 4_000);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_cut && cloud.is_running() {
            cloud.kill();
            cuts += 1;
            restart_at = Some(now + rng.millis(500, 2_500));
            next_cut = now + rng.millis(3_000, 6_000);
        }
        if restart_at.is_some_and(|t| now >= t) {
            restart_at = None;
            cloud.start().unwrap();
        }
        let roll = rng.below(100);
        if live.is_empty() || (live.len() < MAX_PODS && roll < 45) {
            let name = format!("p-{next_pod}");
            let cm = rng.below(CONFIGMAPS);
            next_pod += 1;
            create_sleeper(&pods, ctr.busybox_image.as_str(), NODE, &name, cm).await;
            live.insert(name, cm);
        } else if roll < 75 {
            let victim = live
                .keys()
                .nth(rng.below(live.len() as u64) as usize)
                .cloned()
                .unwrap();
            pods.delete(&victim, &DeleteParams::default())
                .await
                .unwrap();
            live.remove(&victim);
        } else {
            bump(&cms, &mut cm_value, rng.below(CONFIGMAPS)).await;
        }
        tokio::time::sleep(rng.millis(200, 600)).await;
    }
    // A last cut with a change of each kind made while the link is down, so what follows
    // measures convergence after the cloud returns.
    if cloud.is_running() {
        cloud.kill();
        cuts += 1;
    }
    if let Some(victim) = live.keys().next().cloned() {
        pods.delete(&victim, &DeleteParams::default())
            .await
            .unwrap();
        live.remove(&victim);
    }
    let name = format!("p-{next_pod}");
    next_pod += 1;
    create_sleeper(&pods, ctr.busybox_image.as_str(), NODE, &name, 0).await;
    live.insert(name, 0);
    bump(&cms, &mut cm_value, 0).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    cloud.start().unwrap();
    println!(
        "{next_pod} pods created, {} left, {cuts} link cuts",
        live.len()
    );
    assert!(cuts >= 3 || seconds < 20, "too few link cuts: {cuts}");

    let cri = CriRuntime::connect(&ctr.socket).await.unwrap();
    let want: BTreeSet<String> = live.keys().cloned().collect();
    let settled = Instant::now();
    let deadline = settled + Duration::from_secs(90);
    let by_pod = loop {
        let listed = pods.list(&ListParams::default()).await.unwrap().items;
        let in_api: BTreeSet<String> = listed
            .iter()
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        let all_running = listed.iter().all(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        });
        // Every container in containerd, in any state: none may belong to a deleted pod.
        let containers: BTreeSet<String> = cri
            .list_containers(None)
            .await
            .unwrap()
            .into_iter()
            .filter_map(|c| c.labels.get("io.kubernetes.pod.name").cloned())
            .collect();
        let by_pod = kedge_e2e::edgerig::running_containers(&cri).await;
        let running: BTreeSet<String> = by_pod.keys().cloned().collect();
        if in_api == want && all_running && containers == want && running == want {
            break by_pod;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: not converged after 90 s\nwant {want:?}\nAPI {in_api:?} (all Running: {all_running})\n\
             containers {containers:?}\nrunning {running:?}\n{}",
            setup.log_tails(60)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!(
        "pods and containers converged {:?} after cloudcore came back",
        settled.elapsed()
    );
    for (pod, cm) in &live {
        let id = by_pod[pod].clone();
        let latest = cm_value[cm].to_string();
        eventually(
            &format!("{pod} sees cm-{cm} = {latest}"),
            setup,
            ctr,
            || {
                let (cri, id, latest) = (cri.clone(), id.clone(), latest.clone());
                async move {
                    cri.exec_sync(&id, vec!["cat".into(), "/etc/app/v".into()], 5)
                        .await
                        .is_ok_and(|r| String::from_utf8_lossy(&r.stdout) == latest)
                }
            },
        )
        .await;
    }
}
