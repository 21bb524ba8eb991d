//! Real kubectl against the test API server: apply our CRDs and a KubeEdge Device manifest, get,
//! get -o yaml, get -w, patch, and delete with finalizers.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kedge_e2e::apiserver::TestApiServer;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new("kubectl")
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl is installed (hack/test.sh checks)")
}

fn ok(kubeconfig: &Path, args: &[&str]) -> String {
    let o = kubectl(kubeconfig, args);
    assert!(
        o.status.success(),
        "kubectl {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_applies_gets_watches_patches_and_deletes() {
    let server = TestApiServer::start().await.unwrap();
    let kc = server.kubeconfig_path().to_owned();
    let crds = repo().join("crds");
    let device = repo().join("common/tests/fixtures/device-v1beta1.yaml");

    tokio::task::spawn_blocking(move || {
        let out = ok(
            &kc,
            &["apply", "--validate=false", "-f", crds.to_str().unwrap()],
        );
        assert!(out.contains("devices.devices.kubeedge.io created"), "{out}");
        let out = ok(
            &kc,
            &["apply", "--validate=false", "-f", device.to_str().unwrap()],
        );
        assert!(
            out.contains("device.devices.kubeedge.io/thermometer-1 created"),
            "{out}"
        );
        // Applying the same manifest again changes nothing (the manifest's status is not the
        // main resource's to set, so kubectl sends it and the server ignores it).
        let rv = |kc: &Path| {
            ok(
                kc,
                &[
                    "get",
                    "device",
                    "thermometer-1",
                    "-o",
                    "jsonpath={.metadata.resourceVersion}",
                ],
            )
        };
        let before = rv(&kc);
        ok(
            &kc,
            &["apply", "--validate=false", "-f", device.to_str().unwrap()],
        );
        assert_eq!(rv(&kc), before, "a no-op apply must not write");

        let out = ok(&kc, &["get", "devices"]);
        assert!(out.contains("thermometer-1"), "{out}");
        let yaml = ok(&kc, &["get", "device", "thermometer-1", "-o", "yaml"]);
        assert!(yaml.contains("nodeName: edge-node-1"), "{yaml}");
        assert!(yaml.contains("protocolName: modbus"), "{yaml}");
        assert!(yaml.contains("resourceVersion:"), "{yaml}");

        // get -w sees an update.
        let mut watch = Command::new("kubectl")
            .args([
                "get",
                "device",
                "thermometer-1",
                "-w",
                "-o",
                "jsonpath={.spec.nodeName}{\"\\n\"}",
            ])
            .env("KUBECONFIG", &kc)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "edge-node-1");
        ok(
            &kc,
            &[
                "patch",
                "device",
                "thermometer-1",
                "--type",
                "merge",
                "-p",
                r#"{"spec":{"nodeName":"edge-node-2"}}"#,
            ],
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut saw = false;
        while Instant::now() < deadline {
            match lines.next() {
                Some(Ok(l)) if l == "edge-node-2" => {
                    saw = true;
                    break;
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        let _ = watch.kill();
        let _ = watch.wait();
        assert!(saw, "kubectl get -w did not see the update");

        // delete honours finalizers.
        ok(
            &kc,
            &[
                "patch",
                "device",
                "thermometer-1",
                "--type",
                "merge",
                "-p",
                r#"{"metadata":{"finalizers":["kedge.io/test"]}}"#,
            ],
        );
        ok(&kc, &["delete", "device", "thermometer-1", "--wait=false"]);
        let ts = ok(
            &kc,
            &[
                "get",
                "device",
                "thermometer-1",
                "-o",
                "jsonpath={.metadata.deletionTimestamp}",
            ],
        );
        assert!(!ts.is_empty(), "deletionTimestamp not set");
        ok(
            &kc,
            &[
                "patch",
                "device",
                "thermometer-1",
                "--type",
                "json",
                "-p",
                r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
            ],
        );
        let gone = kubectl(&kc, &["get", "device", "thermometer-1"]);
        assert!(!gone.status.success());
        assert!(String::from_utf8_lossy(&gone.stderr).contains("NotFound"));

        // Built-in types: apply twice (strategic merge patch), list across namespaces, delete.
        let dir = tempfile::tempdir().unwrap();
        let cm = dir.path().join("cm.yaml");
        std::fs::write(
            &cm,
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  a: \"1\"\n",
        )
        .unwrap();
        ok(
            &kc,
            &["apply", "--validate=false", "-f", cm.to_str().unwrap()],
        );
        std::fs::write(
            &cm,
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cfg\ndata:\n  a: \"2\"\n",
        )
        .unwrap();
        ok(
            &kc,
            &["apply", "--validate=false", "-f", cm.to_str().unwrap()],
        );
        assert_eq!(
            ok(&kc, &["get", "cm", "cfg", "-o", "jsonpath={.data.a}"]),
            "2"
        );
        assert!(ok(&kc, &["get", "cm", "-A"]).contains("cfg"));
        ok(&kc, &["delete", "-f", cm.to_str().unwrap()]);
        // Only the root CA ConfigMap every namespace has is left.
        let left = ok(&kc, &["get", "cm", "-o", "name"]);
        assert_eq!(left.trim(), "configmap/kube-root-ca.crt");
    })
    .await
    .unwrap();
}
