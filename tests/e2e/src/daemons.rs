//! The shipped `cloudcore` and `edgecore` binaries as a user runs them, for end-to-end tests:
//! config files in a temporary directory, `cloudcore token`, `edgecore join`, and daemons that
//! can be killed with SIGKILL and started again on the same state.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// A binary built next to the running executable: `target/<profile>/<name>`, seen from a test
/// (`target/<profile>/deps/`) or from a benchmark binary (`target/<profile>/`).
/// `KEDGE_BIN_DIR` overrides where the daemons are taken from (e.g. `target/dist` for the
/// shipped build in benchmarks).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("KEDGE_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
        bail!("{} does not exist (KEDGE_BIN_DIR)", p.display());
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("executable has no parent directory")?;
    for candidate in [
        dir.join(name),
        dir.parent().map(|p| p.join(name)).unwrap_or_default(),
    ] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("{name} is not built next to {}", exe.display())
}

/// Ports and config files for one cloudcore and one edge node.
pub struct Setup {
    pub dir: PathBuf,
    pub node: String,
    pub websocket_port: u16,
    pub https_port: u16,
    pub metaserver_port: u16,
    /// The embedded MQTT broker's port.
    pub mqtt_port: u16,
    /// cloudcore's kubelet API for the edge nodes (CloudStream).
    pub stream_port: u16,
    /// cloudcore's /healthz, /readyz, /metrics.
    pub observability_port: u16,
    pub cloudcore_config: PathBuf,
    pub edgecore_config: PathBuf,
}

impl Setup {
    /// Writes `cloudcore.yaml` (against `kubeconfig`) and `edgecore.yaml` (node `node`) into
    /// `dir`, on free loopback ports, with a 1 s heartbeat and Lease renewal.
    pub fn write(dir: &Path, kubeconfig: &Path, node: &str) -> anyhow::Result<Setup> {
        Self::write_with_cloud_at(dir, kubeconfig, node, "127.0.0.1")
    }

    /// Like [`Setup::write`], with cloudcore's WebSocket and bootstrap listeners (and the
    /// addresses edgecore dials) on `cloud_ip`: for an edge in another network namespace.
    pub fn write_with_cloud_at(
        dir: &Path,
        kubeconfig: &Path,
        node: &str,
        cloud_ip: &str,
    ) -> anyhow::Result<Setup> {
        let port = crate::procfs::free_port;
        let (ws, https, meta, mqtt, stream) = (port()?, port()?, port()?, port()?, port()?);
        let observe = port()?;
        let d = dir.display();
        let cloudcore_config = dir.join("cloudcore.yaml");
        std::fs::write(
            &cloudcore_config,
            format!(
                "kubeAPIConfig:\n  kubeConfig: {kc}\nmodules:\n  cloudHub:\n    certDir: {d}/cloud-certs\n    advertiseAddress: [\"{cloud_ip}\"]\n    websocket: {{address: {cloud_ip}, port: {ws}}}\n    https: {{address: {cloud_ip}, port: {https}}}\n  edgeController:\n    nodeUpdateFrequency: 1\n  cloudStream:\n    address: 127.0.0.1\n    port: {stream}\nobservability: {{address: 127.0.0.1, port: {observe}}}\n",
                kc = kubeconfig.display(),
            ),
        )?;
        let edgecore_config = dir.join("edgecore.yaml");
        std::fs::write(
            &edgecore_config,
            format!(
                "database:\n  dataSource: {d}/edge/edgecore.db\nmodules:\n  edgeHub:\n    heartbeat: 1\n    httpServer: https://{cloud_ip}:{https}\n    tlsCaFile: {d}/edge/ca.crt\n    tlsCertFile: {d}/edge/edge.crt\n    tlsPrivateKeyFile: {d}/edge/edge.key\n    websocket: {{server: {cloud_ip}:{ws}, readDeadline: 5, writeDeadline: 5}}\n  edged:\n    hostnameOverride: {node}\n    tailoredKubeletConfig:\n      containerRuntimeEndpoint: unix://{d}/no-runtime.sock\n      podLogsDir: {d}/pods\n      rootDirectory: {d}/edged\n  metaManager:\n    metaServer: {{server: 127.0.0.1:{meta}}}\n  eventBus:\n    mqttServerInternal: tcp://127.0.0.1:{mqtt}\n  deviceTwin:\n    dmiSockPath: {d}/edge/dmi.sock\n",
            ),
        )?;
        Ok(Setup {
            dir: dir.to_owned(),
            node: node.to_owned(),
            websocket_port: ws,
            https_port: https,
            metaserver_port: meta,
            mqtt_port: mqtt,
            stream_port: stream,
            observability_port: observe,
            cloudcore_config,
            edgecore_config,
        })
    }

    /// Points edgecore at a container runtime (by default it has none: edged waits for one).
    pub fn use_container_runtime(&self, socket: &Path, cgroup_root: &str) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.edgecore_config)?;
        let d = self.dir.display();
        let text = text.replace(
            &format!("containerRuntimeEndpoint: unix://{d}/no-runtime.sock\n"),
            &format!(
                "containerRuntimeEndpoint: unix://{}\n      cgroupRoot: {cgroup_root}\n",
                socket.display()
            ),
        );
        std::fs::write(&self.edgecore_config, text)?;
        Ok(())
    }

    /// Sets `modules.edged.nodeLabels`.
    pub fn set_node_labels(&self, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.edgecore_config)?;
        let entries: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("\"{k}\": \"{v}\""))
            .collect();
        let text = text.replacen(
            "    hostnameOverride: ",
            &format!(
                "    nodeLabels: {{{}}}\n    hostnameOverride: ",
                entries.join(", ")
            ),
            1,
        );
        std::fs::write(&self.edgecore_config, text)?;
        Ok(())
    }

    /// Uses an external MQTT broker only (`mqttMode: 2`) instead of the embedded one.
    pub fn use_external_broker(&self, port: u16) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.edgecore_config)?;
        let text = text.replace(
            &format!(
                "    mqttServerInternal: tcp://127.0.0.1:{}\n",
                self.mqtt_port
            ),
            &format!("    mqttMode: 2\n    mqttServerExternal: tcp://127.0.0.1:{port}\n"),
        );
        std::fs::write(&self.edgecore_config, text)?;
        Ok(())
    }

    /// The edge's SQLite database.
    pub fn edge_database(&self) -> PathBuf {
        self.dir.join("edge/edgecore.db")
    }

    /// `cloudcore token` with this setup's config.
    pub fn token(&self) -> anyhow::Result<String> {
        let out = Command::new(bin("cloudcore")?)
            .arg("--config")
            .arg(&self.cloudcore_config)
            .arg("token")
            .output()?;
        if !out.status.success() {
            bail!(
                "cloudcore token failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// `edgecore join --token <token>` with this setup's config.
    pub fn join(&self, token: &str) -> anyhow::Result<()> {
        let out = Command::new(bin("edgecore")?)
            .arg("--config")
            .arg(&self.edgecore_config)
            .args(["join", "--token", token])
            .output()?;
        if !out.status.success() {
            bail!(
                "edgecore join failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn cloudcore(&self) -> anyhow::Result<Daemon> {
        Daemon::new(
            bin("cloudcore")?,
            &self.cloudcore_config,
            self.dir.join("cloudcore.log"),
        )
    }

    pub fn edgecore(&self) -> anyhow::Result<Daemon> {
        Daemon::new(
            bin("edgecore")?,
            &self.edgecore_config,
            self.dir.join("edgecore.log"),
        )
    }

    /// edgecore started through `prefix` (e.g. `ip netns exec NAME`, which execs it: the PID
    /// is edgecore's).
    pub fn edgecore_via(&self, prefix: &[String]) -> anyhow::Result<Daemon> {
        let mut d = Daemon {
            bin: bin("edgecore")?,
            config: self.edgecore_config.clone(),
            log: self.dir.join("edgecore.log"),
            prefix: prefix.to_vec(),
            child: None,
        };
        d.start()?;
        Ok(d)
    }

    /// Waits (30 s at most) until cloudcore's log says it listens.
    pub async fn wait_cloudcore_listening(&self) -> anyhow::Result<()> {
        let log = self.dir.join("cloudcore.log");
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("cloudhub listening")
        {
            if start.elapsed() > std::time::Duration::from_secs(30) {
                bail!("cloudcore did not start listening\n{}", self.log_tails(50));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Starts cloudcore, waits until it listens, issues a token, joins the edge and starts
    /// edgecore: what a user does to bring up one edge node.
    pub async fn start_both(&self) -> anyhow::Result<(Daemon, Daemon)> {
        let cloud = self.cloudcore()?;
        self.wait_cloudcore_listening().await?;
        self.join(&self.token()?)?;
        let edge = self.edgecore()?;
        Ok((cloud, edge))
    }

    /// The steps of `pod`'s (`<ns>/<name>`) way through both daemons, from their `pod_path`
    /// log lines, in log order: (step number, when, the whole line).
    pub fn pod_path(&self, pod: &str) -> Vec<(u32, time::OffsetDateTime, String)> {
        let needle = format!("pod={pod} ");
        let mut steps = Vec::new();
        for f in ["cloudcore.log", "edgecore.log"] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            for line in text.lines() {
                let Some((_, msg)) = line.split_once(" pod_path: ") else {
                    continue;
                };
                if !format!("{line} ").contains(&needle) {
                    continue;
                }
                let when = line.split_whitespace().next().and_then(|t| {
                    time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                        .ok()
                });
                let step = msg.split_whitespace().next().and_then(|s| s.parse().ok());
                if let (Some(step), Some(when)) = (step, when) {
                    steps.push((step, when, line.to_owned()));
                }
            }
        }
        steps.sort_by_key(|(_, when, _)| *when);
        steps
    }

    /// The last `lines` lines of both logs, for failure messages.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for f in ["cloudcore.log", "edgecore.log"] {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            let from = all.len().saturating_sub(lines);
            out.push_str(&format!(
                "--- {f} (last {lines} lines)\n{}\n",
                all[from..].join("\n")
            ));
        }
        out
    }
}

/// Status and body of a plain-text GET on 127.0.0.1 (a daemon's MetaServer or metrics port).
pub async fn http_text(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// A daemon process that can be killed and started again; its log is appended to across runs.
/// Dropping it kills it.
pub struct Daemon {
    bin: PathBuf,
    config: PathBuf,
    log: PathBuf,
    /// A command the daemon is started through (empty: none).
    prefix: Vec<String>,
    child: Option<Child>,
}

impl Daemon {
    fn new(bin: PathBuf, config: &Path, log: PathBuf) -> anyhow::Result<Daemon> {
        let mut d = Daemon {
            bin,
            config: config.to_owned(),
            log,
            prefix: Vec::new(),
            child: None,
        };
        d.start()?;
        Ok(d)
    }

    /// Starts the process if it is not running.
    pub fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .arg("--config")
            .arg(&self.config)
            // KEDGE_DAEMON_LOG: more detail when debugging a test. Pods' steps are logged
            // (target `pod_path`) so tests can read a pod's way from the logs.
            .env(
                "RUST_LOG",
                std::env::var("KEDGE_DAEMON_LOG").unwrap_or_else(|_| "info,pod_path=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}
