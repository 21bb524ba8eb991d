//! A cloud outage with the real binaries and real containerd: cloudcore stopped for 60 s with
//! five pods running. The containers keep running (same IDs); edgecore restarted while the cloud
//! is down picks them up without restarting any; a pod that finished meanwhile is reported once
//! the cloud is back, and the others are Running and Ready in the API, none restarted.
//!
//! `KEDGE_OUTAGE_SECONDS` shortens or lengthens the outage (default 60).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use edgecore::edged::runtime::CriRuntime;
use k8s_openapi::api::core::v1::Pod;
use kedge_e2e::edgerig::{Rig, eventually, running_containers};
use kube::api::{Api, PostParams};
use serde_json::json;

const NODE: &str = "edge-outage";
const SLEEPERS: [&str; 4] = ["web", "worker", "cache", "agent"];
/// Exits 0 while the cloud is away (restartPolicy Never): its Succeeded must reach the API.
const FINISHER: &str = "batch";

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn restarts(p: &Pod) -> i32 {
    p.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|cs| cs.iter().map(|c| c.restart_count).sum())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_outage_with_an_edgecore_restart_restarts_no_container() {
    let outage = Duration::from_secs(
        std::env::var("KEDGE_OUTAGE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let rig = Rig::start(NODE).await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let finish_after = outage.as_secs() / 2;
    for name in SLEEPERS.iter().chain([&FINISHER]) {
        let command = if *name == FINISHER {
            // Counts from when the container starts; the outage begins right after all run.
            json!(["sh", "-c", format!("sleep {finish_after}; exit 0")])
        } else {
            json!(["sh", "-c", "exec sleep 3600"])
        };
        pods.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"nodeName": NODE, "terminationGracePeriodSeconds": 1, "restartPolicy":
                    if *name == FINISHER { "Never" } else { "Always" },
                    "containers": [{"name": "main", "image": ctr.busybox_image, "command": command}]}}))
            .unwrap(),
        )
        .await
        .unwrap();
    }
    eventually(
        "five pods Running and Ready in the API",
        setup,
        ctr,
        || async {
            let mut ok = true;
            for n in SLEEPERS.iter().chain([&FINISHER]) {
                ok &= pods.get(n).await.is_ok_and(|p| ready(&p));
            }
            ok
        },
    )
    .await;
    let cri = CriRuntime::connect(&ctr.socket).await.unwrap();
    let before = running_containers(&cri).await;
    assert_eq!(before.len(), 5, "{before:?}");

    // The cloud goes away.
    let mut cloud = rig.cloud;
    let mut edge = rig.edge;
    cloud.kill();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        running_containers(&cri).await,
        before,
        "containers changed when the cloud went"
    );

    // edgecore restarts while the cloud is down: it finds its pods in its database and the
    // containers in containerd, and restarts none.
    edge.kill();
    edge.start().unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after_restart = running_containers(&cri).await;
    for n in SLEEPERS {
        assert_eq!(
            after_restart.get(n),
            before.get(n),
            "{n}'s container changed after edgecore restarted offline\n{}",
            setup.log_tails(40)
        );
    }

    // The rest of the outage: the finisher exits meanwhile.
    if let Some(left) = outage.checked_sub(down.elapsed()) {
        tokio::time::sleep(left).await;
    }
    let at_end = running_containers(&cri).await;
    assert!(
        !at_end.contains_key(FINISHER),
        "the finisher still runs: {at_end:?}"
    );
    for n in SLEEPERS {
        assert_eq!(
            at_end.get(n),
            before.get(n),
            "{n} restarted during the outage"
        );
    }

    // The cloud returns: the API shows what happened meanwhile, nothing restarted.
    cloud.start().unwrap();
    let back = Instant::now();
    eventually(
        "sleepers Running and Ready, the finisher Succeeded, in the API",
        setup,
        ctr,
        || async {
            let mut ok = true;
            for n in SLEEPERS {
                ok &= pods.get(n).await.is_ok_and(|p| {
                    ready(&p)
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                });
            }
            let finished = pods.get(FINISHER).await.is_ok_and(|p| {
                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
            });
            ok && finished
        },
    )
    .await;
    println!(
        "API converged {:?} after cloudcore restarted (outage {:?})",
        back.elapsed(),
        outage
    );
    for n in SLEEPERS {
        let p = pods.get(n).await.unwrap();
        assert_eq!(restarts(&p), 0, "{n} restarted");
    }
    let end = running_containers(&cri).await;
    for n in SLEEPERS {
        assert_eq!(end.get(n), before.get(n), "{n}'s container changed");
    }
}
