//! The bootstrap HTTPS endpoint (port 10002), compatible with KubeEdge's edgecore:
//!
//! - `GET /ca.crt` → the CA certificate, DER.
//! - `GET /edge.crt` with headers `NodeName`, `Authorization: Bearer <jwt>` (or a current client
//!   certificate, for rotation), optional `ExtKeyUsages` (JSON list of Go `x509.ExtKeyUsage`
//!   numbers) and a CSR as the body (PEM, or DER as KubeEdge's edgecore sends it) → the signed
//!   node certificate, DER.
//!
//! Refused: a CSR whose subject is not the node's, an expired or forged token, a client
//! certificate for another node, a body over 16 KiB. Beyond what KubeEdge checks
//! ([`crate::nodeidentity`]): a token cannot claim a name someone already owns, a rotation must
//! come from a key the node's record lists, a token bound to a node (`cloudcore token --node`)
//! joins only that node, one issued with `--uses` only that often. An address whose requests
//! fail [`MAX_FAILURES`] times in a minute is refused (429) for the rest of the minute.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kedge_common::pki::{self, JoinToken, MAX_CSR_BYTES, PkiError};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::certs::CloudPki;
use crate::nodeidentity::ratelimit::FailureLimiter;
use crate::nodeidentity::{NodeIdentities, Refusal};

/// Failed requests per source address and minute before it is refused for the rest of it.
pub const MAX_FAILURES: u32 = 10;
const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Bootstrap {
    pki: Arc<CloudPki>,
    cert_validity: Duration,
    identities: Arc<dyn NodeIdentities>,
    failures: Arc<Mutex<FailureLimiter>>,
}

/// A refusal: the HTTP status and why.
pub type Failure = (StatusCode, String);

impl From<Refusal> for Failure {
    fn from(r: Refusal) -> Failure {
        let status = StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::FORBIDDEN);
        (status, r.to_string())
    }
}

impl Bootstrap {
    pub fn new(
        pki: Arc<CloudPki>,
        cert_validity: Duration,
        identities: Arc<dyn NodeIdentities>,
    ) -> Self {
        Bootstrap {
            pki,
            cert_validity,
            identities,
            failures: Arc::new(Mutex::new(FailureLimiter::new(
                MAX_FAILURES,
                FAILURE_WINDOW,
            ))),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, FailureLimiter> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves until `shutdown` is cancelled. `tls` should accept optional client certificates
    /// ([`CloudPki::bootstrap_acceptor`]).
    pub async fn serve(self, listener: TcpListener, tls: TlsAcceptor, shutdown: CancellationToken) {
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                a = listener.accept() => match a {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "bootstrap accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let this = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let stream =
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "bootstrap TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                let peer_cert = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec());
                let svc = service_fn(move |req| {
                    let this = this.clone();
                    let peer_cert = peer_cert.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(this.handle(req, peer, peer_cert).await)
                    }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    tracing::debug!(%peer, error = %e, "bootstrap connection ended with an error");
                }
            });
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        peer_cert: Option<Vec<u8>>,
    ) -> Response<Full<Bytes>> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/ca.crt") => der(self.pki.ca.cert_der().to_vec()),
            (&Method::GET | &Method::POST, "/edge.crt") => {
                let ip = peer.ip();
                if let Err(wait) = self.failures().check(ip, Instant::now()) {
                    tracing::warn!(%peer, "certificate request refused: too many failed attempts from this address");
                    let mut r = text(
                        StatusCode::TOO_MANY_REQUESTS,
                        format!(
                            "too many failed attempts from {ip}; try again in {}s",
                            wait.as_secs() + 1
                        ),
                    );
                    r.headers_mut().insert(
                        http::header::RETRY_AFTER,
                        http::HeaderValue::from(wait.as_secs() + 1),
                    );
                    return r;
                }
                match self.sign(req, ip, peer_cert).await {
                    Ok(cert) => der(cert),
                    Err((status, why)) => {
                        // A busy API server is not the caller's fault.
                        if status != StatusCode::SERVICE_UNAVAILABLE {
                            self.failures().failed(ip, Instant::now());
                        }
                        tracing::warn!(%peer, %status, reason = %why, "refused a certificate request");
                        text(status, why)
                    }
                }
            }
            _ => text(StatusCode::NOT_FOUND, "not found".into()),
        }
    }

    async fn sign(
        &self,
        req: Request<Incoming>,
        from: IpAddr,
        peer_cert: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, Failure> {
        let CertRequest {
            node,
            authority,
            ext_key_usages,
        } = parse_request(
            req.headers(),
            peer_cert.as_deref(),
            self.pki.ca.cert_der(),
            self.pki.token_secret(),
        )?;
        let body = Limited::new(req.into_body(), MAX_CSR_BYTES)
            .collect()
            .await
            .map_err(|e| {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("CSR body unreadable or over {MAX_CSR_BYTES} bytes: {e}"),
                )
            })?
            .to_bytes();
        let cert = sign_csr(
            &self.pki.ca,
            &body,
            &node,
            &ext_key_usages,
            self.cert_validity,
        )?;
        let key = pki::cert_key_id(&cert)
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
        // The certificate exists only in this function until the record says whose it is.
        match authority {
            Authority::Certificate { key: old } => {
                self.identities.rotate(&node, &old, &key).await?;
                tracing::info!(%node, %from, "node certificate rotated");
            }
            Authority::Token { jti } => {
                if let Some(jti) = &jti {
                    self.identities.use_token(jti).await?;
                }
                self.identities.claim(&node, &key, from).await?;
                tracing::info!(%node, %from, token = jti.as_deref().unwrap_or("(unnamed)"), "join token used: node certificate issued");
            }
        }
        Ok(cert)
    }
}

/// A certificate request's head, checked: who asks and on whose authority.
#[derive(Debug)]
pub struct CertRequest {
    pub node: String,
    pub authority: Authority,
    /// Go `x509.ExtKeyUsage` numbers, as KubeEdge sends them.
    pub ext_key_usages: Vec<i64>,
}

/// Parses and authenticates a certificate request's headers: `NodeName`, then the caller's
/// current certificate (`peer_cert`, a rotation) or `Authorization: Bearer` with a join token
/// (bare JWT as KubeEdge's edgecore sends it, or the whole token, whose CA hash must be
/// `ca_der`'s) signed with `token_secret`; `ExtKeyUsages`. Ownership is checked later, against
/// the records. Pure, so it is fuzzed (`fuzz/fuzz_targets/bootstrap_request.rs`).
pub fn parse_request(
    headers: &http::HeaderMap,
    peer_cert: Option<&[u8]>,
    ca_der: &[u8],
    token_secret: &[u8],
) -> Result<CertRequest, Failure> {
    let bad = |s: StatusCode, m: &str| (s, m.to_owned());
    let node = headers
        .get("NodeName")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| bad(StatusCode::BAD_REQUEST, "NodeName header missing"))?
        .to_owned();
    kedge_common::resource::validate_node_name(&node).map_err(|r| {
        (
            StatusCode::BAD_REQUEST,
            format!("NodeName `{node}` is invalid: it {r}"),
        )
    })?;

    // Authenticate: a current node certificate (rotation) or a join token.
    let authority = match peer_cert {
        Some(der) => {
            let cert_node = pki::node_name_from_cert(der)
                .map_err(|e| (StatusCode::FORBIDDEN, format!("client certificate: {e}")))?;
            if cert_node != node {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!("client certificate is for node `{cert_node}`, not `{node}`"),
                ));
            }
            let key = pki::cert_key_id(der)
                .map_err(|e| (StatusCode::FORBIDDEN, format!("client certificate: {e}")))?;
            Authority::Certificate { key }
        }
        None => {
            let auth = headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| {
                    bad(
                        StatusCode::UNAUTHORIZED,
                        "Authorization: Bearer <token> missing",
                    )
                })?
                .trim();
            // Accept the bare JWT (KubeEdge's edgecore) or the whole join token.
            let jwt = if auth.split('.').count() > 3 {
                let t = JoinToken::parse(auth)
                    .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_string()))?;
                t.check_ca(ca_der)
                    .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_string()))?;
                t.jwt
            } else {
                auth.to_owned()
            };
            let claims = pki::verify_jwt(&jwt, token_secret)
                .map_err(|e| (StatusCode::UNAUTHORIZED, e.to_string()))?;
            if let Some(bound) = claims.node.as_deref()
                && bound != node
            {
                return Err((
                    StatusCode::FORBIDDEN,
                    format!("this token joins only node `{bound}`, not `{node}`"),
                ));
            }
            Authority::Token { jti: claims.jti }
        }
    };

    let ext_key_usages: Vec<i64> = match headers.get("ExtKeyUsages") {
        None => Vec::new(),
        Some(v) => serde_json::from_slice(v.as_bytes()).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                format!("ExtKeyUsages is not a JSON list of numbers: {e}"),
            )
        })?,
    };
    Ok(CertRequest {
        node,
        authority,
        ext_key_usages,
    })
}

/// Signs a node's CSR (PEM or DER) for `node`, mapping refusals to HTTP statuses.
pub fn sign_csr(
    ca: &pki::CertificateAuthority,
    csr: &[u8],
    node: &str,
    ext_key_usages: &[i64],
    validity: Duration,
) -> Result<Vec<u8>, Failure> {
    ca.sign_node_csr(csr, node, ext_key_usages, validity)
        .map_err(|e| {
            let status = match e {
                PkiError::CsrSubjectMismatch { .. } | PkiError::ExtKeyUsageNotAllowed(_) => {
                    StatusCode::FORBIDDEN
                }
                PkiError::CsrTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                PkiError::Generate(_) | PkiError::Random => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_REQUEST,
            };
            (status, e.to_string())
        })
}

/// What vouches for a certificate request.
#[derive(Debug)]
pub enum Authority {
    /// The node's current certificate (a rotation); `key` is its key id.
    Certificate { key: String },
    /// A join token; `jti` names its use count, if it has one.
    Token { jti: Option<String> },
}

fn der(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}
