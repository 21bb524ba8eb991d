//! rustls configurations for the link: one TLS stack (rustls + ring) everywhere.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::pki::pem_to_der;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad certificate PEM: {0}")]
    BadCert(String),
    #[error("bad private key PEM: {0}")]
    BadKey(String),
    #[error("TLS configuration rejected: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// Installs ring as the process-wide rustls provider. Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let blocks = ::pem::parse_many(pem).map_err(|e| TlsError::BadCert(e.to_string()))?;
    let certs: Vec<_> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::BadCert("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let der = pem_to_der(pem, "PRIVATE KEY").map_err(TlsError::BadKey)?;
    PrivateKeyDer::try_from(der).map_err(|e| TlsError::BadKey(e.to_string()))
}

fn roots(ca_der: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    store
        .add(CertificateDer::from(ca_der.to_vec()))
        .map_err(|e| TlsError::BadCert(e.to_string()))?;
    Ok(store)
}

/// Whether a TLS server asks for client certificates.
pub enum ClientAuth<'a> {
    /// Server authentication only.
    None,
    /// Client certificates signed by this CA are verified when offered, but not required
    /// (bootstrap: token-authenticated joins and cert-authenticated rotation on one port).
    Optional(&'a [u8]),
    /// Every client must present a certificate signed by this CA.
    Required(&'a [u8]),
    /// Every client must present a certificate signed by one of the CAs in this PEM bundle
    /// (a cluster's client CA file may hold several).
    RequiredAnyOf(&'a str),
}

/// A TLS 1.2+ server configuration.
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    client_auth: ClientAuth<'_>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::RequiredAnyOf(bundle) => {
            let mut store = RootCertStore::empty();
            for cert in certs_from_pem(bundle)? {
                store
                    .add(cert)
                    .map_err(|e| TlsError::BadCert(e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        ClientAuth::Optional(ca) | ClientAuth::Required(ca) => {
            let optional = matches!(client_auth, ClientAuth::Optional(_));
            let mut vb =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider());
            if optional {
                vb = vb.allow_unauthenticated();
            }
            let verifier = vb.build().map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// A client configuration trusting only `ca_der`, optionally presenting a client certificate.
pub fn client_config(
    ca_der: &[u8],
    client: Option<(&str, &str)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots(ca_der)?);
    let cfg = match client {
        Some((cert_pem, key_pem)) => {
            builder.with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A client that accepts any server certificate. Used for exactly one request: downloading the
/// CA at join time, whose bytes are then checked against the hash in the join token (as
/// KubeEdge's edgecore does). Never used for anything that carries secrets.
pub fn unverified_client_config() -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// A client that presents a certificate but accepts any server certificate: what
/// kube-apiserver does towards kubelets unless `--kubelet-certificate-authority` is set. Only
/// the test API server's kubelet proxy uses it.
pub fn unverified_client_config_with_identity(
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServerCert))
        .with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?;
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct AcceptAnyServerCert;

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
