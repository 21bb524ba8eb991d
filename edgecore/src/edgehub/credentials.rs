//! The node's TLS identity: CA, certificate and key, kept as PEM files (key files 0600), and the
//! join / rotation calls to cloudcore's bootstrap endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use kedge_common::pki::{self, JoinToken, PkiError, TokenError};
use kedge_common::tls::{self, TlsError};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Largest response we read from the bootstrap endpoint (a certificate is ~1 KiB).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} does not hold a usable {what}: {reason}")]
    BadFile {
        path: PathBuf,
        what: &'static str,
        reason: String,
    },
    #[error("join token: {0}")]
    Token(#[from] TokenError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("bootstrap server `{0}` is not an https://host:port URL")]
    BadServer(String),
    #[error("certificate request: {0}")]
    Csr(String),
    #[error("cannot reach {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("{server}{path} answered {status}: {body}")]
    Refused {
        server: String,
        path: &'static str,
        status: u16,
        body: String,
    },
}

/// Where the node keeps its identity.
#[derive(Debug, Clone)]
pub struct CredentialPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The node's CA (DER), certificate (PEM) and key (PEM).
#[derive(Clone)]
pub struct NodeCredentials {
    pub ca_der: Vec<u8>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials").finish_non_exhaustive()
    }
}

impl NodeCredentials {
    /// TLS client configuration presenting this identity and trusting only the cloud CA.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        tls::client_config(&self.ca_der, Some((&self.cert_pem, &self.key_pem)))
    }

    pub fn cert_der(&self) -> Result<Vec<u8>, String> {
        pki::pem_to_der(&self.cert_pem, "CERTIFICATE")
    }

    /// Seconds until the certificate should be rotated: once 80 % of its lifetime has passed
    /// (as the kubelet does), so short-lived certificates rotate too, and only once per
    /// lifetime. Zero or negative: rotate now.
    pub fn seconds_until_rotation(&self) -> Result<i64, CredentialError> {
        let der = self.cert_der().map_err(|reason| CredentialError::BadFile {
            path: PathBuf::from("<memory>"),
            what: "certificate",
            reason,
        })?;
        let (not_before, not_after) = pki::validity_unix(&der)?;
        let now = pki::now_unix();
        let rotate_at = not_before + (not_after - not_before) * 4 / 5;
        Ok(rotate_at - now)
    }

    pub fn load(paths: &CredentialPaths) -> Result<Option<Self>, CredentialError> {
        let read = |p: &Path| match std::fs::read_to_string(p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CredentialError::Io {
                path: p.to_owned(),
                source,
            }),
        };
        let (Some(ca), Some(cert), Some(key)) =
            (read(&paths.ca)?, read(&paths.cert)?, read(&paths.key)?)
        else {
            return Ok(None);
        };
        let ca_der =
            pki::pem_to_der(&ca, "CERTIFICATE").map_err(|reason| CredentialError::BadFile {
                path: paths.ca.clone(),
                what: "CA certificate",
                reason,
            })?;
        let creds = NodeCredentials {
            ca_der,
            cert_pem: cert,
            key_pem: key,
        };
        // Fail early, naming the file, rather than at the first connection.
        creds
            .client_config()
            .map_err(|e| CredentialError::BadFile {
                path: paths.cert.clone(),
                what: "certificate and key",
                reason: e.to_string(),
            })?;
        Ok(Some(creds))
    }

    pub fn save(&self, paths: &CredentialPaths) -> Result<(), CredentialError> {
        write_private(
            &paths.ca,
            pki::der_to_pem(&self.ca_der, "CERTIFICATE").as_bytes(),
        )?;
        write_private(&paths.key, self.key_pem.as_bytes())?;
        write_private(&paths.cert, self.cert_pem.as_bytes())?;
        Ok(())
    }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), CredentialError> {
    kedge_common::files::write_private(path, contents).map_err(|source| CredentialError::Io {
        path: path.to_owned(),
        source,
    })
}

/// `https://host:port` → (host, port).
fn split_server(server: &str) -> Result<(String, u16), CredentialError> {
    let bad = || CredentialError::BadServer(server.to_owned());
    let rest = server.strip_prefix("https://").ok_or_else(bad)?;
    kedge_common::config::split_host_port(rest).ok_or_else(bad)
}

/// One HTTPS request to the bootstrap endpoint; returns the body of a 2xx response.
pub async fn bootstrap_request(
    server: &str,
    tls_config: Arc<ClientConfig>,
    path: &'static str,
    headers: &[(&str, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Vec<u8>, CredentialError> {
    let (host, port) = split_server(server)?;
    let unreachable = |reason: String| CredentialError::Unreachable {
        server: server.to_owned(),
        reason,
    };
    let work = async {
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let name = ServerName::try_from(host.clone())
            .map_err(|_| CredentialError::BadServer(server.to_owned()))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config)
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = http::Request::builder()
            .method(http::Method::GET)
            .uri(path)
            .header(http::header::HOST, format!("{host}:{port}"));
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading the response: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(CredentialError::Refused {
                server: server.to_owned(),
                path,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok(bytes.to_vec())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| unreachable(format!("no answer within {timeout:?}")))?
}

/// The CSR as raw DER, the form KubeEdge's cloudcore parses (ours takes DER and PEM).
fn csr_der(csr_pem: &str) -> Result<Vec<u8>, CredentialError> {
    pki::pem_to_der(csr_pem, "CERTIFICATE REQUEST")
        .map_err(|e| CredentialError::Csr(format!("our own CSR does not decode: {e}")))
}

/// Joins the cluster: fetches the CA (checking it against the token's hash), sends a CSR
/// authenticated by the token, and returns the node's new identity.
pub async fn join(
    server: &str,
    token: &str,
    node: &str,
    timeout: Duration,
) -> Result<NodeCredentials, CredentialError> {
    let token = JoinToken::parse(token)?;
    // The CA comes over an unverified connection; the token's hash is what makes it trusted.
    let ca_der = bootstrap_request(
        server,
        tls::unverified_client_config()?,
        "/ca.crt",
        &[],
        Vec::new(),
        timeout,
    )
    .await?;
    token.check_ca(&ca_der)?;
    let (key_pem, csr_pem) = pki::node_csr(node)?;
    let trusted = tls::client_config(&ca_der, None)?;
    let cert_der = bootstrap_request(
        server,
        trusted,
        "/edge.crt",
        &[
            ("Authorization", format!("Bearer {}", token.jwt)),
            ("NodeName", node.to_owned()),
            ("ExtKeyUsages", "[2]".to_owned()),
        ],
        csr_der(&csr_pem)?,
        timeout,
    )
    .await?;
    Ok(NodeCredentials {
        ca_der,
        cert_pem: pki::der_to_pem(&cert_der, "CERTIFICATE"),
        key_pem,
    })
}

/// Rotates the node certificate: a new key and CSR, authenticated by the current certificate.
pub async fn rotate(
    server: &str,
    current: &NodeCredentials,
    node: &str,
    timeout: Duration,
) -> Result<NodeCredentials, CredentialError> {
    let (key_pem, csr_pem) = pki::node_csr(node)?;
    let cert_der = bootstrap_request(
        server,
        current.client_config()?,
        "/edge.crt",
        &[
            ("NodeName", node.to_owned()),
            ("ExtKeyUsages", "[2]".to_owned()),
        ],
        csr_der(&csr_pem)?,
        timeout,
    )
    .await?;
    Ok(NodeCredentials {
        ca_der: current.ca_der.clone(),
        cert_pem: pki::der_to_pem(&cert_der, "CERTIFICATE"),
        key_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csr_goes_out_as_der_as_kubeedge_s_cloud_expects() {
        let (_, pem) = pki::node_csr("edge-1").unwrap();
        let der = csr_der(&pem).unwrap();
        assert_eq!(der[0], 0x30, "an ASN.1 SEQUENCE");
        assert_eq!(der, pki::pem_to_der(&pem, "CERTIFICATE REQUEST").unwrap());
        assert!(csr_der("not a csr").is_err());
    }

    fn creds_valid_for(validity: Duration) -> NodeCredentials {
        let ca = pki::CertificateAuthority::generate("test", Duration::from_secs(86_400)).unwrap();
        let (key_pem, csr) = pki::node_csr("n1").unwrap();
        let der = ca
            .sign_node_csr(csr.as_bytes(), "n1", &[], validity)
            .unwrap();
        NodeCredentials {
            ca_der: ca.cert_der().to_vec(),
            cert_pem: pki::der_to_pem(&der, "CERTIFICATE"),
            key_pem,
        }
    }

    #[test]
    fn rotation_is_due_after_80_percent_of_the_lifetime() {
        let long = creds_valid_for(Duration::from_secs(10 * 86_400));
        let until = long.seconds_until_rotation().unwrap();
        // Backdated 5 minutes, so a little under 8 days.
        assert!((7 * 86_400..8 * 86_400).contains(&until), "{until}");
        let short = creds_valid_for(Duration::from_secs(1));
        assert!(short.seconds_until_rotation().unwrap() <= 0);
    }

    #[test]
    fn server_urls() {
        assert_eq!(
            split_server("https://cloud:10002").unwrap(),
            ("cloud".into(), 10002)
        );
        assert_eq!(
            split_server("https://127.0.0.1:1/").unwrap(),
            ("127.0.0.1".into(), 1)
        );
        assert_eq!(
            split_server("https://[::1]:10002").unwrap(),
            ("::1".into(), 10002)
        );
        for bad in [
            "http://cloud:1",
            "https://cloud",
            "https://:1",
            "https://c:x",
        ] {
            assert!(split_server(bad).is_err(), "{bad}");
        }
    }
}
