//! `kubectl logs`, `attach`, `exec` and `port-forward` to edge pods, with the shipped binaries and real
//! containerd: kubectl → test API server (proxying to the node's kubelet endpoint as
//! kube-apiserver does) → cloudcore's CloudStream → the node's link → edged → CRI log files and
//! containerd's streaming server.
//!
//! kubectl is told to speak SPDY (`KUBECTL_*_WEBSOCKETS=false`): a real API server translates
//! kubectl's WebSockets to SPDY before it calls a kubelet, so SPDY is what cloudcore receives from
//! a cluster; the test API server passes upgrades through untranslated.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kedge_e2e::edgerig::{Rig, eventually};
use kube::api::{Api, PostParams};
use serde_json::json;

fn kubectl_cmd(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("kubectl");
    c.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false");
    c
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Output {
    kubectl_cmd(kubeconfig, args)
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

/// Reads lines from a child's stdout until `want` of them arrived or `timeout` passed.
fn read_lines(child: &mut Child, want: usize, timeout: Duration) -> Vec<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Keep reading after the caller has what it wanted: a closed pipe would kill kubectl
        // (SIGPIPE) at its next line of output.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    while lines.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    lines
}

async fn running(pods: &Api<Pod>, name: &str) -> bool {
    pods.get(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase)
        .as_deref()
        == Some("Running")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_exec_and_port_forward_reach_edge_pods() {
    let node = "edge-streams";
    let rig = Rig::start(node).await;
    let (ctr, setup) = (&rig.ctr, &rig.setup);
    let kc = rig._server.kubeconfig_path().to_owned();
    let pods: Api<Pod> = Api::default_namespaced(rig.client.clone());
    let pod = |name: &str, script: &str| {
        serde_json::from_value::<Pod>(json!({"metadata": {"name": name},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": ctr.busybox_image, "command": ["sh", "-c", script]}]}}))
        .unwrap()
    };
    let pp = PostParams::default();
    pods.create(
        &pp,
        &pod(
            "static",
            "for i in 1 2 3 4 5; do echo line-$i; done; sleep 1; echo err-1 >&2; exec sleep 3600",
        ),
    )
    .await
    .unwrap();
    pods.create(
        &pp,
        &pod(
            "ticker",
            "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done",
        ),
    )
    .await
    .unwrap();
    let mut restarter = pod(
        "restarter",
        "n=$(cat /data/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/n; echo attempt-$n; sleep 2; exit 1",
    );
    let mut v = serde_json::to_value(&restarter).unwrap();
    v["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    v["spec"]["containers"][0]["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    restarter = serde_json::from_value(v).unwrap();
    pods.create(&pp, &restarter).await.unwrap();
    pods.create(
        &pp,
        &pod(
            "web",
            "mkdir -p /www && echo hello-from-the-pod > /www/index.html && exec httpd -f -p 8080 -h /www",
        ),
    )
    .await
    .unwrap();
    eventually("the pods run", setup, ctr, || async {
        running(&pods, "static").await
            && running(&pods, "ticker").await
            && running(&pods, "web").await
    })
    .await;
    // (stdout and stderr reach the log file through separate pipes: let both land.)
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The node's status points the API server at cloudcore.
    eventually("the node reported its status", setup, ctr, || async {
        rig.nodes
            .get(node)
            .await
            .unwrap()
            .status
            .and_then(|s| s.daemon_endpoints)
            .is_some()
    })
    .await;
    let n = rig.nodes.get(node).await.unwrap();
    let status = n.status.unwrap();
    let port = status
        .daemon_endpoints
        .and_then(|d| d.kubelet_endpoint)
        .map(|e| e.port);
    assert_eq!(port, Some(i32::from(setup.stream_port)));
    let addresses = status.addresses.unwrap_or_default();
    assert_eq!(addresses.len(), 1, "{addresses:?}");
    assert_eq!(
        (addresses[0].type_.as_str(), addresses[0].address.as_str()),
        ("InternalIP", "127.0.0.1")
    );
    assert!(
        n.metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kedge.io/edge-addresses")
    );

    let kc2 = kc.clone();
    tokio::task::spawn_blocking(move || {
        let kc = kc2.as_path();
        // logs: the content, not the CRI format; both streams; --tail; --timestamps.
        let out = ok(kc, &["logs", "static"]);
        assert_eq!(out, "line-1\nline-2\nline-3\nline-4\nline-5\nerr-1\n");
        assert_eq!(ok(kc, &["logs", "static", "--tail=2"]), "line-5\nerr-1\n");
        let stamped = ok(kc, &["logs", "static", "--timestamps", "--tail=1"]);
        assert!(
            stamped.ends_with(" err-1\n") && stamped.starts_with("20"),
            "{stamped}"
        );
        assert_eq!(ok(kc, &["logs", "static", "--limit-bytes=9"]), "line-1\nli");

        // logs -f: lines keep coming while the container runs.
        let started = Instant::now();
        let mut follow = kubectl_cmd(kc, &["logs", "-f", "ticker"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = read_lines(&mut follow, 15, Duration::from_secs(20));
        let _ = follow.kill();
        let _ = follow.wait();
        assert_eq!(lines.len(), 15, "{lines:?}");
        assert!(lines.iter().all(|l| l.starts_with("tick-")), "{lines:?}");
        // Ticks come every 0.2 s: 15 lines took about 3 s minus the backlog, so they streamed.
        assert!(started.elapsed() < Duration::from_secs(20));

        // attach: the running container's output as it comes.
        let mut attach = kubectl_cmd(kc, &["attach", "ticker"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = read_lines(&mut attach, 3, Duration::from_secs(20));
        let _ = attach.kill();
        let _ = attach.wait();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines.iter().all(|l| l.starts_with("tick-")), "{lines:?}");

        // exec: stdout and the exit code; stdin with -i.
        let o = kubectl(kc, &["exec", "static", "--", "sh", "-c", "echo hi; exit 3"]);
        assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
        assert_eq!(
            o.status.code(),
            Some(3),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let mut child = kubectl_cmd(
            kc,
            &["exec", "-i", "static", "--", "sh", "-c", "cat; echo done"],
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"payload from stdin\n")
            .unwrap();
        let o = child.wait_with_output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            "payload from stdin\ndone\n",
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success());

        // port-forward: a local port reaches the pod's httpd.
        let mut pf = kubectl_cmd(kc, &["port-forward", "pod/web", ":8080"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let first = read_lines(&mut pf, 1, Duration::from_secs(20));
        let local_port: u16 = first
            .first()
            .and_then(|l| {
                l.strip_prefix("Forwarding from 127.0.0.1:")?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("kubectl port-forward said {first:?}"));
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", local_port)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        tcp.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        let read = tcp.read_to_string(&mut answer);
        let _ = pf.kill();
        let out = pf.wait_with_output().unwrap();
        if read.is_err()
            || !(answer.starts_with("HTTP/1.") && answer.contains("hello-from-the-pod"))
        {
            return Err(format!(
                "port-forward: read {read:?}, answer {answer:?}; kubectl: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n--- containerd\n{}",
            setup.log_tails(40),
            ctr.log()
        )
    });

    // --previous: the attempt before the current one.
    eventually("the restarter restarted", setup, ctr, || async {
        pods.get("restarter")
            .await
            .unwrap()
            .status
            .and_then(|s| s.container_statuses)
            .is_some_and(|c| c.iter().any(|c| c.restart_count >= 1))
    })
    .await;
    let kc2 = kc.clone();
    tokio::task::spawn_blocking(move || {
        let previous = ok(&kc2, &["logs", "restarter", "--previous"]);
        let current = ok(&kc2, &["logs", "restarter"]);
        let n = |s: &str| {
            s.trim()
                .strip_prefix("attempt-")
                .and_then(|n| n.parse::<u32>().ok())
        };
        let (p, c) = (n(&previous).unwrap(), n(&current).unwrap());
        assert_eq!(p + 1, c, "previous {previous:?}, current {current:?}");
        // A pod that never restarted has no previous container.
        let o = kubectl(&kc2, &["logs", "static", "--previous"]);
        assert!(!o.status.success());
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("previous terminated container"),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
    })
    .await
    .unwrap();

    // Offline: the call fails at once and names the node.
    let mut edge = rig.edge;
    edge.kill();
    let nodes = rig.nodes.clone();
    let _ = nodes;
    let kc2 = kc.clone();
    let node_name = node.to_owned();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let started = Instant::now();
            let o = kubectl(&kc2, &["logs", "static"]);
            let took = started.elapsed();
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            if !o.status.success() {
                assert!(
                    err.contains(&format!("node {node_name} is not connected")),
                    "{err}"
                );
                assert!(took < Duration::from_secs(5), "took {took:?}");
                break;
            }
            // cloudcore may not have noticed the killed edge for a moment.
            assert!(
                Instant::now() < deadline,
                "logs still served with the edge gone"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    })
    .await
    .unwrap();
}
