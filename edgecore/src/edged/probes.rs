//! Container probes (startup, liveness, readiness) and lifecycle hooks, as the kubelet runs them.
//!
//! - A probe starts `initialDelaySeconds` after its container started and runs every
//!   `periodSeconds`, each attempt limited to `timeoutSeconds`; the result flips to success after
//!   `successThreshold` successes in a row and to failure after `failureThreshold` failures in a
//!   row. Before its first flip, readiness is failure (not ready), liveness success, startup
//!   unknown (not started).
//! - While a startup probe has not succeeded, liveness and readiness are not run; once it has, it
//!   is not run again for that container.
//! - A failed liveness or startup probe kills the container (with the pod's grace period), and the
//!   pod worker restarts it per `restartPolicy`; readiness drives the container's `ready`.
//!
//! [`ProbeSet`] is the state of one pod's probes with time passed in (tested without sleeping);
//! the pod worker runs what it says is due with [`run_action`] and records the outcomes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::runtime::Runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProbeKind {
    Startup,
    Liveness,
    Readiness,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Startup => "Startup",
            ProbeKind::Liveness => "Liveness",
            ProbeKind::Readiness => "Readiness",
        }
    }
}

/// A probe's timing fields with the API's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeTiming {
    pub fn of(p: &Probe) -> Self {
        let secs = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(v.unwrap_or(default).max(min) as u64)
        };
        ProbeTiming {
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: p.success_threshold.unwrap_or(1).max(1) as u32,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        }
    }
}

/// One attempt's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
}

/// A probe's current result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    Unknown,
    Success,
    Failure,
}

/// One probe of one container incarnation.
#[derive(Debug, Clone)]
pub struct ProbeState {
    pub kind: ProbeKind,
    pub timing: ProbeTiming,
    pub result: ProbeResult,
    successes: u32,
    failures: u32,
    next_at: Instant,
    running: bool,
    /// The last failure's message (for the event the kubelet would record).
    pub last_failure: Option<String>,
}

impl ProbeState {
    pub fn new(kind: ProbeKind, timing: ProbeTiming, started: Instant) -> Self {
        ProbeState {
            kind,
            timing,
            result: match kind {
                ProbeKind::Readiness => ProbeResult::Failure,
                ProbeKind::Liveness => ProbeResult::Success,
                ProbeKind::Startup => ProbeResult::Unknown,
            },
            successes: 0,
            failures: 0,
            next_at: started + timing.initial_delay,
            running: false,
            last_failure: None,
        }
    }

    /// Records an attempt's outcome at `now`; returns whether the result changed.
    pub fn record(&mut self, outcome: Outcome, now: Instant) -> bool {
        self.running = false;
        self.next_at = now + self.timing.period;
        let before = self.result;
        match outcome {
            Outcome::Success => {
                self.failures = 0;
                self.successes += 1;
                if self.successes >= self.timing.success_threshold {
                    self.result = ProbeResult::Success;
                }
            }
            Outcome::Failure(why) => {
                self.successes = 0;
                self.failures += 1;
                self.last_failure = Some(why);
                if self.failures >= self.timing.failure_threshold {
                    self.result = ProbeResult::Failure;
                }
            }
        }
        self.result != before
    }
}

/// Key of a probe within a pod: container name and kind.
pub type ProbeKey = (String, ProbeKind);

/// What a pod's probes say about one running container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContainerProbeView {
    /// Startup probe passed (or none).
    pub started: bool,
    /// Readiness probe passed (or none), once started.
    pub ready: bool,
    /// Liveness or startup probe failed: the container must be killed.
    pub kill: bool,
}

/// The probes of one pod's running containers.
#[derive(Debug, Default)]
pub struct ProbeSet {
    /// By container name: the container ID the probes belong to, and its probes.
    containers: HashMap<String, (String, Vec<ProbeState>)>,
}

impl ProbeSet {
    /// Follows the pod's running containers (name, container ID, started at): a new container ID
    /// starts its probes afresh; containers no longer running lose theirs.
    pub fn track(&mut self, spec: &[Container], running: &[(String, String, Instant)]) {
        self.containers
            .retain(|name, (id, _)| running.iter().any(|(n, i, _)| n == name && i == id));
        for (name, id, started) in running {
            if self.containers.contains_key(name) {
                continue;
            }
            let Some(c) = spec.iter().find(|c| &c.name == name) else {
                continue;
            };
            let mut probes = Vec::new();
            for (kind, p) in [
                (ProbeKind::Startup, &c.startup_probe),
                (ProbeKind::Liveness, &c.liveness_probe),
                (ProbeKind::Readiness, &c.readiness_probe),
            ] {
                if let Some(p) = p {
                    probes.push(ProbeState::new(kind, ProbeTiming::of(p), *started));
                }
            }
            self.containers.insert(name.clone(), (id.clone(), probes));
        }
    }

    /// The container probe view for `name` (running containers without probes are started and
    /// ready).
    pub fn view(&self, name: &str) -> ContainerProbeView {
        let Some((_, probes)) = self.containers.get(name) else {
            return ContainerProbeView {
                started: true,
                ready: true,
                kill: false,
            };
        };
        let result = |k: ProbeKind| probes.iter().find(|p| p.kind == k).map(|p| p.result);
        let started = result(ProbeKind::Startup).is_none_or(|r| r == ProbeResult::Success);
        ContainerProbeView {
            started,
            ready: started
                && result(ProbeKind::Readiness).is_none_or(|r| r == ProbeResult::Success),
            kill: result(ProbeKind::Liveness) == Some(ProbeResult::Failure)
                || result(ProbeKind::Startup) == Some(ProbeResult::Failure),
        }
    }

    /// Probes due at `now` (container name, container ID, kind); marks them running so they are
    /// not handed out twice. A startup probe that passed is not run again, and liveness and
    /// readiness wait for it.
    pub fn due(&mut self, now: Instant) -> Vec<(String, String, ProbeKind)> {
        let mut out = Vec::new();
        for (name, (id, probes)) in &mut self.containers {
            let started = probes
                .iter()
                .find(|p| p.kind == ProbeKind::Startup)
                .is_none_or(|p| p.result == ProbeResult::Success);
            for p in probes.iter_mut() {
                let runs = match p.kind {
                    ProbeKind::Startup => p.result != ProbeResult::Success,
                    _ => started,
                };
                if runs && !p.running && p.next_at <= now {
                    p.running = true;
                    out.push((name.clone(), id.clone(), p.kind));
                }
            }
        }
        out
    }

    /// When the next probe is due (none: no probe to run).
    pub fn next_due(&self) -> Option<Instant> {
        self.containers
            .values()
            .flat_map(|(_, probes)| {
                let started = probes
                    .iter()
                    .find(|p| p.kind == ProbeKind::Startup)
                    .is_none_or(|p| p.result == ProbeResult::Success);
                probes.iter().filter(move |p| {
                    !p.running
                        && match p.kind {
                            ProbeKind::Startup => p.result != ProbeResult::Success,
                            _ => started,
                        }
                })
            })
            .map(|p| p.next_at)
            .min()
    }

    /// Records an outcome for the probe of container `id`; returns whether a result changed.
    /// Outcomes for a container that was replaced meanwhile are dropped.
    pub fn record(
        &mut self,
        name: &str,
        id: &str,
        kind: ProbeKind,
        outcome: Outcome,
        now: Instant,
    ) -> bool {
        match self.containers.get_mut(name) {
            Some((cid, probes)) if cid == id => probes
                .iter_mut()
                .find(|p| p.kind == kind)
                .is_some_and(|p| p.record(outcome, now)),
            _ => false,
        }
    }

    /// The failure message of a container's failed liveness/startup probe.
    pub fn failure(&self, name: &str) -> Option<(ProbeKind, String)> {
        let (_, probes) = self.containers.get(name)?;
        probes
            .iter()
            .find(|p| p.kind != ProbeKind::Readiness && p.result == ProbeResult::Failure)
            .map(|p| (p.kind, p.last_failure.clone().unwrap_or_default()))
    }
}

/// What to run: a probe's or a lifecycle hook's handler.
#[derive(Debug, Clone)]
pub enum Action {
    Exec(Vec<String>),
    Http {
        scheme: String,
        host: Option<String>,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Grpc {
        port: u16,
        service: String,
    },
    Sleep(Duration),
}

/// Resolves a port (number, or a name from the container's ports).
fn port(p: &IntOrString, c: &Container) -> Result<u16, String> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("container {} has no port named {name}", c.name))
        }
    }
}

fn http_action(
    h: &k8s_openapi::api::core::v1::HTTPGetAction,
    c: &Container,
) -> Result<Action, String> {
    Ok(Action::Http {
        scheme: h.scheme.clone().unwrap_or_else(|| "HTTP".into()),
        host: h.host.clone().filter(|h| !h.is_empty()),
        port: port(&h.port, c)?,
        path: h
            .path
            .clone()
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into()),
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

/// The action of a probe.
pub fn probe_action(p: &Probe, c: &Container) -> Result<Action, String> {
    if let Some(e) = &p.exec {
        return Ok(Action::Exec(e.command.clone().unwrap_or_default()));
    }
    if let Some(h) = &p.http_get {
        return http_action(h, c);
    }
    if let Some(t) = &p.tcp_socket {
        return Ok(Action::Tcp {
            host: t.host.clone().filter(|h| !h.is_empty()),
            port: port(&t.port, c)?,
        });
    }
    if let Some(g) = &p.grpc {
        return Ok(Action::Grpc {
            port: u16::try_from(g.port).map_err(|_| format!("invalid port {}", g.port))?,
            service: g.service.clone().unwrap_or_default(),
        });
    }
    Err("the probe names no handler".into())
}

/// The action of a lifecycle hook.
pub fn hook_action(
    h: &k8s_openapi::api::core::v1::LifecycleHandler,
    c: &Container,
) -> Result<Action, String> {
    if let Some(e) = &h.exec {
        return Ok(Action::Exec(e.command.clone().unwrap_or_default()));
    }
    if let Some(g) = &h.http_get {
        return http_action(g, c);
    }
    if let Some(s) = &h.sleep {
        return Ok(Action::Sleep(Duration::from_secs(s.seconds.max(0) as u64)));
    }
    if let Some(t) = &h.tcp_socket {
        return Ok(Action::Tcp {
            host: t.host.clone().filter(|h| !h.is_empty()),
            port: port(&t.port, c)?,
        });
    }
    Err("the hook names no handler".into())
}

/// The probe `kind` of container `c`, as an action.
pub fn container_probe(c: &Container, kind: ProbeKind) -> Option<&Probe> {
    match kind {
        ProbeKind::Startup => c.startup_probe.as_ref(),
        ProbeKind::Liveness => c.liveness_probe.as_ref(),
        ProbeKind::Readiness => c.readiness_probe.as_ref(),
    }
}

/// Runs `action` against container `container_id` (exec) or the pod's IP (network actions),
/// within `timeout`.
pub async fn run_action<R: Runtime>(
    rt: &R,
    action: &Action,
    container_id: &str,
    pod_ip: &str,
    timeout: Duration,
) -> Outcome {
    let attempt = async {
        match action {
            Action::Exec(cmd) => {
                let secs = timeout.as_secs().max(1) as i64;
                match rt.exec_sync(container_id, cmd.clone(), secs).await {
                    Ok(r) if r.exit_code == 0 => Outcome::Success,
                    Ok(r) => Outcome::Failure(format!(
                        "command {cmd:?} exited with {}: {}",
                        r.exit_code,
                        String::from_utf8_lossy(&r.stdout).trim()
                    )),
                    Err(e) => Outcome::Failure(format!("exec {cmd:?}: {e}")),
                }
            }
            Action::Http {
                scheme,
                host,
                port,
                path,
                headers,
            } => {
                let host = host.as_deref().unwrap_or(pod_ip);
                net::http_get(scheme, host, *port, path, headers).await
            }
            Action::Tcp { host, port } => {
                let host = host.as_deref().unwrap_or(pod_ip);
                match tokio::net::TcpStream::connect((host, *port)).await {
                    Ok(_) => Outcome::Success,
                    Err(e) => Outcome::Failure(format!("dial tcp {host}:{port}: {e}")),
                }
            }
            Action::Grpc { port, service } => net::grpc_check(pod_ip, *port, service).await,
            Action::Sleep(d) => {
                tokio::time::sleep(*d).await;
                Outcome::Success
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(o) => o,
        Err(_) => Outcome::Failure(format!("timed out after {timeout:?}")),
    }
}

mod net {
    //! The network probes: HTTP(S) GET, gRPC health check.

    use super::Outcome;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;

    /// Certificates are not verified, as the kubelet's HTTPS probes do not verify them.
    #[derive(Debug)]
    struct AcceptAnyCertificate(rustls::crypto::CryptoProvider);

    impl rustls::client::danger::ServerCertVerifier for AcceptAnyCertificate {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    async fn send<T>(io: T, req: http::Request<Empty<bytes::Bytes>>) -> Result<u16, String>
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        // The body is read (and dropped) so the server sees a complete exchange.
        let _ = resp.into_body().collect().await;
        Ok(status)
    }

    pub async fn http_get(
        scheme: &str,
        host: &str,
        port: u16,
        path: &str,
        headers: &[(String, String)],
    ) -> Outcome {
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = http::Request::get(path)
            .header("host", &authority)
            .header(
                "user-agent",
                concat!("kube-probe/kedge-", env!("CARGO_PKG_VERSION")),
            )
            .header("accept", "*/*");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = match req.body(Empty::new()) {
            Ok(r) => r,
            Err(e) => return Outcome::Failure(format!("bad request: {e}")),
        };
        let tcp = match tokio::net::TcpStream::connect((host, port)).await {
            Ok(t) => t,
            Err(e) => {
                return Outcome::Failure(format!("Get \"{scheme}://{authority}{path}\": {e}"));
            }
        };
        let status = if scheme.eq_ignore_ascii_case("HTTPS") {
            let provider = rustls::crypto::ring::default_provider();
            let config = match rustls::ClientConfig::builder_with_provider(provider.clone().into())
                .with_safe_default_protocol_versions()
            {
                Ok(b) => b
                    .dangerous()
                    .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnyCertificate(
                        provider,
                    )))
                    .with_no_client_auth(),
                Err(e) => return Outcome::Failure(e.to_string()),
            };
            let name = match rustls::pki_types::ServerName::try_from(host.to_owned()) {
                Ok(n) => n,
                Err(e) => return Outcome::Failure(e.to_string()),
            };
            match tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
            {
                Ok(tls) => send(tls, req).await,
                Err(e) => Err(format!("TLS: {e}")),
            }
        } else {
            send(tcp, req).await
        };
        match status {
            Ok(code) if (200..400).contains(&code) => Outcome::Success,
            Ok(code) => Outcome::Failure(format!("HTTP probe failed with statuscode: {code}")),
            Err(e) => Outcome::Failure(format!("Get \"{scheme}://{authority}{path}\": {e}")),
        }
    }

    pub async fn grpc_check(host: &str, port: u16, service: &str) -> Outcome {
        use kedge_proto::grpc::health::v1::health_check_response::ServingStatus;
        use kedge_proto::grpc::health::v1::{HealthCheckRequest, health_client::HealthClient};
        let endpoint =
            match tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}")) {
                Ok(e) => e,
                Err(e) => return Outcome::Failure(e.to_string()),
            };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                return Outcome::Failure(format!(
                    "failed to connect service \"{host}:{port}\": {e}"
                ));
            }
        };
        let request = HealthCheckRequest {
            service: service.to_owned(),
        };
        match HealthClient::new(channel).check(request).await {
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => Outcome::Success,
            Ok(r) => Outcome::Failure(format!(
                "service unhealthy (responded with \"{}\")",
                ServingStatus::try_from(r.get_ref().status)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN")
            )),
            Err(e) => Outcome::Failure(format!("health rpc failed: {}", e.message())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn thresholds_flip_results_and_startup_gates_the_others() {
        let t0 = Instant::now();
        let c = container(json!({"name": "app",
            "startupProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1, "failureThreshold": 2},
            "livenessProbe": {"tcpSocket": {"port": 80}, "periodSeconds": 5, "failureThreshold": 2},
            "readinessProbe": {"httpGet": {"port": 80}, "initialDelaySeconds": 3, "successThreshold": 2}}));
        let mut set = ProbeSet::default();
        set.track(std::slice::from_ref(&c), &[("app".into(), "c1".into(), t0)]);
        assert_eq!(
            set.view("app"),
            ContainerProbeView {
                started: false,
                ready: false,
                kill: false
            }
        );
        // Only the startup probe runs until it passes.
        let due = set.due(t0);
        assert_eq!(due, vec![("app".into(), "c1".into(), ProbeKind::Startup)]);
        assert!(
            set.due(t0).is_empty(),
            "a running probe is not handed out twice"
        );
        assert!(set.record("app", "c1", ProbeKind::Startup, Outcome::Success, t0));
        assert!(set.view("app").started);
        assert!(!set.view("app").ready, "readiness starts as failure");
        // Liveness now; readiness after its initial delay.
        let due = set.due(t0);
        assert_eq!(due, vec![("app".into(), "c1".into(), ProbeKind::Liveness)]);
        assert_eq!(set.next_due(), Some(t0 + Duration::from_secs(3)));
        let t3 = t0 + Duration::from_secs(3);
        assert_eq!(
            set.due(t3),
            vec![("app".into(), "c1".into(), ProbeKind::Readiness)]
        );
        assert!(!set.record("app", "c1", ProbeKind::Readiness, Outcome::Success, t3));
        let t13 = t3 + Duration::from_secs(10);
        set.due(t13);
        assert!(
            set.record("app", "c1", ProbeKind::Readiness, Outcome::Success, t13),
            "2 in a row"
        );
        assert!(set.view("app").ready);
        // Two liveness failures in a row: kill.
        assert!(!set.record(
            "app",
            "c1",
            ProbeKind::Liveness,
            Outcome::Failure("refused".into()),
            t13
        ));
        assert!(set.record(
            "app",
            "c1",
            ProbeKind::Liveness,
            Outcome::Failure("refused".into()),
            t13
        ));
        assert!(set.view("app").kill);
        assert_eq!(
            set.failure("app"),
            Some((ProbeKind::Liveness, "refused".into()))
        );
        // The restarted container (new ID) starts afresh; outcomes for the old one are dropped.
        let t20 = t0 + Duration::from_secs(20);
        set.track(
            std::slice::from_ref(&c),
            &[("app".into(), "c2".into(), t20)],
        );
        assert!(!set.view("app").kill && !set.view("app").started);
        assert!(!set.record("app", "c1", ProbeKind::Startup, Outcome::Success, t20));
        // Gone: no probes, nothing due.
        set.track(std::slice::from_ref(&c), &[]);
        assert_eq!(set.next_due(), None);
    }

    #[test]
    fn defaults_and_ports_follow_the_api() {
        let c = container(
            json!({"name": "web", "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"port": "http", "path": "/healthz", "httpHeaders": [{"name": "X", "value": "1"}]}},
            "livenessProbe": {"grpc": {"port": 9090}}}),
        );
        let p = c.readiness_probe.as_ref().unwrap();
        let t = ProbeTiming::of(p);
        assert_eq!(
            (
                t.period,
                t.timeout,
                t.success_threshold,
                t.failure_threshold
            ),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        match probe_action(p, &c).unwrap() {
            Action::Http {
                port,
                path,
                headers,
                scheme,
                ..
            } => {
                assert_eq!(
                    (port, path.as_str(), scheme.as_str()),
                    (8080, "/healthz", "HTTP")
                );
                assert_eq!(headers, vec![("X".to_owned(), "1".to_owned())]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            probe_action(c.liveness_probe.as_ref().unwrap(), &c),
            Ok(Action::Grpc { port: 9090, .. })
        ));
        let bad = container(json!({"name": "x", "livenessProbe": {"tcpSocket": {"port": "nope"}}}));
        assert!(probe_action(bad.liveness_probe.as_ref().unwrap(), &bad).is_err());
    }

    #[tokio::test]
    async fn network_probes_reach_real_servers() {
        use crate::edged::runtime::MemoryRuntime;
        let rt = MemoryRuntime::new();
        // HTTP: 200 passes, 500 fails, a closed port fails.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = vec![0u8; 2048];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if req.starts_with("GET /ok ") && req.contains("x-probe: yes") {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {code}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        let http = |path: &str| Action::Http {
            scheme: "HTTP".into(),
            host: None,
            port,
            path: path.into(),
            headers: vec![("x-probe".into(), "yes".into())],
        };
        let t = Duration::from_secs(2);
        assert_eq!(
            run_action(&rt, &http("/ok"), "", "127.0.0.1", t).await,
            Outcome::Success
        );
        assert!(
            matches!(run_action(&rt, &http("/bad"), "", "127.0.0.1", t).await, Outcome::Failure(m) if m.contains("500"))
        );
        assert_eq!(
            run_action(&rt, &Action::Tcp { host: None, port }, "", "127.0.0.1", t).await,
            Outcome::Success
        );
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        assert!(matches!(
            run_action(
                &rt,
                &Action::Tcp {
                    host: None,
                    port: closed
                },
                "",
                "127.0.0.1",
                t
            )
            .await,
            Outcome::Failure(_)
        ));
        // gRPC health: a real tonic server answering SERVING for "" and NOT_SERVING otherwise.
        let grpc = health_server().await;
        let check = |service: &str| Action::Grpc {
            port: grpc,
            service: service.into(),
        };
        assert_eq!(
            run_action(&rt, &check(""), "", "127.0.0.1", t).await,
            Outcome::Success
        );
        assert!(
            matches!(run_action(&rt, &check("db"), "", "127.0.0.1", t).await, Outcome::Failure(m) if m.contains("NOT_SERVING"))
        );
        // Exec against a container the runtime does not run: a failure, not a panic.
        assert!(matches!(
            run_action(&rt, &Action::Exec(vec!["true".into()]), "nope", "", t).await,
            Outcome::Failure(_)
        ));
        // A hook that takes too long is cut at the timeout.
        assert!(
            matches!(run_action(&rt, &Action::Sleep(Duration::from_secs(5)), "", "", Duration::from_millis(50)).await, Outcome::Failure(m) if m.contains("timed out"))
        );
    }

    async fn health_server() -> u16 {
        use kedge_proto::grpc::health::v1::health_check_response::ServingStatus;
        use kedge_proto::grpc::health::v1::health_server::{Health, HealthServer};
        use kedge_proto::grpc::health::v1::{HealthCheckRequest, HealthCheckResponse};
        struct H;
        #[tonic::async_trait]
        impl Health for H {
            async fn check(
                &self,
                r: tonic::Request<HealthCheckRequest>,
            ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
                let status = if r.get_ref().service.is_empty() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                Ok(tonic::Response::new(HealthCheckResponse {
                    status: status as i32,
                }))
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(HealthServer::new(H))
                .serve_with_incoming(incoming),
        );
        port
    }
}
