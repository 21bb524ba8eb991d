//! The cloud's PKI material: CA, cloudhub server certificate and the join-token signing secret.
//!
//! Created on first start and kept either in Kubernetes Secrets in cloudcore's namespace (so
//! replicas and restarts share them) or, for tests and single-host trials, in a directory.
//! Concurrent first starts are safe: creating a Secret that already exists means another replica
//! won, and its Secret is read back.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kedge_common::pki::{CertAndKey, CertificateAuthority, JoinToken, PkiError, not_after_unix};
use kedge_common::tls::{ClientAuth, TlsError, server_config};
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_rustls::TlsAcceptor;

const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
const SERVER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Re-issue the server certificate when less than this is left.
const SERVER_RENEW_BEFORE: Duration = Duration::from_secs(30 * 86_400);

pub const CA_SECRET: &str = "kedge-ca";
pub const SERVER_SECRET: &str = "kedge-cloudcore-cert";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Secret {namespace}/{name}: {source}")]
    Kube {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name} lacks key `{key}` or it is not UTF-8")]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("{0} is only partly present; remove it to have it re-created")]
    Partial(String),
}

/// Everything cloudhub needs to authenticate itself and its nodes.
pub struct CloudPki {
    pub ca: CertificateAuthority,
    pub server: CertAndKey,
    token_secret: Vec<u8>,
}

impl CloudPki {
    /// A KubeEdge-format join token valid for `ttl`.
    pub fn issue_token(&self, ttl: Duration) -> String {
        JoinToken::issue(self.ca.cert_der(), &self.token_secret, ttl)
    }

    /// A token carrying `claims` (node binding, use-count id).
    pub fn issue_token_with(&self, claims: &kedge_common::pki::JoinClaims) -> String {
        JoinToken::issue_with(self.ca.cert_der(), &self.token_secret, claims)
    }

    pub fn token_secret(&self) -> &[u8] {
        &self.token_secret
    }

    /// TLS for the WebSocket port: client certificates signed by our CA are required.
    pub fn websocket_acceptor(&self) -> Result<TlsAcceptor, CertError> {
        let cfg = server_config(
            &self.server.cert_pem,
            &self.server.key_pem,
            ClientAuth::Required(self.ca.cert_der()),
            &[b"http/1.1"],
        )?;
        Ok(TlsAcceptor::from(cfg))
    }

    /// TLS for the bootstrap port: client certificates optional (joins use a token, rotation the
    /// current certificate).
    pub fn bootstrap_acceptor(&self) -> Result<TlsAcceptor, CertError> {
        let cfg = server_config(
            &self.server.cert_pem,
            &self.server.key_pem,
            ClientAuth::Optional(self.ca.cert_der()),
            &[b"http/1.1"],
        )?;
        Ok(TlsAcceptor::from(cfg))
    }
}

/// The SANs of the server certificate: the configured addresses, else loopback and the host name.
pub fn server_sans(advertise: &[String]) -> Vec<String> {
    if !advertise.is_empty() {
        return advertise.to_vec();
    }
    let mut sans = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    if let Ok(h) = std::env::var("HOSTNAME")
        && !h.is_empty()
        && !sans.contains(&h)
    {
        sans.push(h);
    }
    sans
}

fn server_cert_usable(server: &CertAndKey, stored_sans: &str, sans: &[String]) -> bool {
    let now = kedge_common::pki::now_unix();
    let fresh = not_after_unix(&server.cert_der)
        .is_ok_and(|t| t > now + SERVER_RENEW_BEFORE.as_secs() as i64);
    fresh && stored_sans == sans.join(",")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Directory store

fn read_opt(path: &Path) -> Result<Option<String>, CertError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CertError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), CertError> {
    kedge_common::files::write_private(path, contents).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Loads the PKI from `dir`, creating what is missing.
pub fn load_or_create_in_dir(dir: &Path, sans: &[String]) -> Result<CloudPki, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let p = |n: &str| dir.join(n);
    let ca = match (read_opt(&p("ca.crt"))?, read_opt(&p("ca.key"))?) {
        (Some(c), Some(k)) => CertificateAuthority::from_pem(&c, &k)?,
        (None, None) => {
            let ca = CertificateAuthority::generate("kedge CA", CA_VALIDITY)?;
            write_private(&p("ca.key"), ca.material().key_pem.as_bytes())?;
            write_private(&p("ca.crt"), ca.material().cert_pem.as_bytes())?;
            ca
        }
        _ => return Err(CertError::Partial(format!("CA in {}", dir.display()))),
    };
    let token_secret = match read_opt(&p("token.secret"))? {
        Some(s) => decode_hex(&s).ok_or_else(|| {
            CertError::Partial(format!("{} (not hex)", p("token.secret").display()))
        })?,
        None => {
            let s = kedge_common::pki::random_secret()?;
            write_private(&p("token.secret"), hex(&s).as_bytes())?;
            s
        }
    };
    let existing = match (
        read_opt(&p("server.crt"))?,
        read_opt(&p("server.key"))?,
        read_opt(&p("server.sans"))?,
    ) {
        (Some(cert_pem), Some(key_pem), Some(stored)) => {
            let der = kedge_common::pki::pem_to_der(&cert_pem, "CERTIFICATE")
                .map_err(|e| CertError::Partial(format!("server.crt: {e}")))?;
            let s = CertAndKey {
                cert_pem,
                cert_der: der,
                key_pem,
            };
            server_cert_usable(&s, stored.trim(), sans).then_some(s)
        }
        _ => None,
    };
    let server = match existing {
        Some(s) => s,
        None => {
            let s = ca.issue_server_cert(sans, SERVER_VALIDITY)?;
            write_private(&p("server.key"), s.key_pem.as_bytes())?;
            write_private(&p("server.crt"), s.cert_pem.as_bytes())?;
            write_private(&p("server.sans"), sans.join(",").as_bytes())?;
            s
        }
    };
    Ok(CloudPki {
        ca,
        server,
        token_secret,
    })
}

// ---------------------------------------------------------------------------------------------
// Secret store

fn secret_str(secret: &Secret, ns: &str, key: &'static str) -> Result<String, CertError> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .ok_or_else(|| CertError::MissingKey {
            namespace: ns.to_owned(),
            name: secret.metadata.name.clone().unwrap_or_default(),
            key,
        })
}

/// An Opaque Secret labelled as cloudcore's.
pub(crate) fn new_secret(name: &str, entries: &[(&str, &[u8])]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                [(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "kedge-cloudcore".to_owned(),
                )]
                .into(),
            ),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(
            entries
                .iter()
                .map(|(k, v)| ((*k).to_owned(), ByteString(v.to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// Gets `name`, or creates it from `make()`; if another replica created it first, reads theirs.
async fn get_or_create(
    api: &Api<Secret>,
    ns: &str,
    name: &str,
    make: impl FnOnce() -> Result<Secret, CertError>,
) -> Result<Secret, CertError> {
    let kube_err = |source| CertError::Kube {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        source,
    };
    if let Some(s) = api.get_opt(name).await.map_err(kube_err)? {
        return Ok(s);
    }
    match api.create(&PostParams::default(), &make()?).await {
        Ok(s) => Ok(s),
        Err(kube::Error::Api(e)) if e.code == 409 => api.get(name).await.map_err(kube_err),
        Err(e) => Err(kube_err(e)),
    }
}

/// Loads the PKI from Secrets in `namespace`, creating what is missing.
pub async fn load_or_create_in_secrets(
    client: kube::Client,
    namespace: &str,
    sans: &[String],
) -> Result<CloudPki, CertError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let ca_secret = get_or_create(&api, namespace, CA_SECRET, || {
        let ca = CertificateAuthority::generate("kedge CA", CA_VALIDITY)?;
        let token = kedge_common::pki::random_secret()?;
        Ok(new_secret(
            CA_SECRET,
            &[
                ("ca.crt", ca.material().cert_pem.as_bytes()),
                ("ca.key", ca.material().key_pem.as_bytes()),
                ("token.secret", hex(&token).as_bytes()),
            ],
        ))
    })
    .await?;
    let ca = CertificateAuthority::from_pem(
        &secret_str(&ca_secret, namespace, "ca.crt")?,
        &secret_str(&ca_secret, namespace, "ca.key")?,
    )?;
    let token_secret = decode_hex(&secret_str(&ca_secret, namespace, "token.secret")?)
        .ok_or_else(|| CertError::Partial(format!("{namespace}/{CA_SECRET} token.secret")))?;

    let issue = |ca: &CertificateAuthority| -> Result<Secret, CertError> {
        let s = ca.issue_server_cert(sans, SERVER_VALIDITY)?;
        Ok(new_secret(
            SERVER_SECRET,
            &[
                ("tls.crt", s.cert_pem.as_bytes()),
                ("tls.key", s.key_pem.as_bytes()),
                ("sans", sans.join(",").as_bytes()),
            ],
        ))
    };
    let mut server_secret = get_or_create(&api, namespace, SERVER_SECRET, || issue(&ca)).await?;
    let load = |s: &Secret| -> Result<(CertAndKey, String), CertError> {
        let cert_pem = secret_str(s, namespace, "tls.crt")?;
        let der = kedge_common::pki::pem_to_der(&cert_pem, "CERTIFICATE")
            .map_err(|e| CertError::Partial(format!("{namespace}/{SERVER_SECRET}: {e}")))?;
        Ok((
            CertAndKey {
                cert_pem,
                cert_der: der,
                key_pem: secret_str(s, namespace, "tls.key")?,
            },
            secret_str(s, namespace, "sans").unwrap_or_default(),
        ))
    };
    let (mut server, stored_sans) = load(&server_secret)?;
    if !server_cert_usable(&server, &stored_sans, sans) {
        tracing::info!("re-issuing the cloudhub server certificate (SANs changed or expiring)");
        let fresh = issue(&ca)?;
        server_secret.data = fresh.data;
        let replaced = api
            .replace(SERVER_SECRET, &PostParams::default(), &server_secret)
            .await
            .map_err(|source| CertError::Kube {
                namespace: namespace.to_owned(),
                name: SERVER_SECRET.to_owned(),
                source,
            })?;
        server = load(&replaced)?.0;
    }
    Ok(CloudPki {
        ca,
        server,
        token_secret,
    })
}

/// Shared, immutable PKI for the servers.
pub type SharedPki = Arc<CloudPki>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_store_creates_once_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let sans = vec!["127.0.0.1".to_owned()];
        let a = load_or_create_in_dir(dir.path(), &sans).unwrap();
        let b = load_or_create_in_dir(dir.path(), &sans).unwrap();
        assert_eq!(a.ca.cert_hash(), b.ca.cert_hash());
        assert_eq!(a.server.cert_der, b.server.cert_der);
        assert_eq!(a.token_secret, b.token_secret);
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.key", "server.key", "token.secret"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // New SANs: same CA, new server certificate.
        let c = load_or_create_in_dir(dir.path(), &["10.0.0.1".to_owned()]).unwrap();
        assert_eq!(c.ca.cert_hash(), a.ca.cert_hash());
        assert_ne!(c.server.cert_der, a.server.cert_der);
        // Tokens verify with the stored secret.
        let t =
            kedge_common::pki::JoinToken::parse(&c.issue_token(Duration::from_secs(60))).unwrap();
        kedge_common::pki::verify_jwt(&t.jwt, a.token_secret()).unwrap();
    }

    #[test]
    fn partial_ca_is_an_error_not_a_silent_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]).unwrap();
        std::fs::remove_file(dir.path().join("ca.key")).unwrap();
        assert!(matches!(
            load_or_create_in_dir(dir.path(), &["127.0.0.1".to_owned()]),
            Err(CertError::Partial(_))
        ));
    }
}
