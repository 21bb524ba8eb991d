//! Certificates and join tokens: the cloud's CA signs node certificates; the edge makes CSRs.
//!
//! - A CA (ECDSA P-256) and a server certificate for cloudhub, created in-process with rcgen.
//! - Node CSRs with subject `CN=system:node:<node>, O=system:nodes`; the cloud signs only a CSR
//!   whose subject names exactly the node asking (KubeEdge signs whatever the CSR says).
//! - Join tokens in KubeEdge's format, `<sha256 hex of the CA DER>.<JWT HS256>`. The JWT is
//!   written here with `ring`'s HMAC rather than a JWT crate: current `jsonwebtoken` releases need
//!   aws-lc or RustCrypto backends, a second crypto stack for one HMAC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::{digest, hmac, rand::SecureRandom};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate, X509CertificationRequest};

/// Organisation of every node certificate (as the kubelet's).
pub const NODE_ORGANIZATION: &str = "system:nodes";
/// Prefix of a node certificate's common name.
pub const NODE_CN_PREFIX: &str = "system:node:";
/// Largest CSR we look at.
pub const MAX_CSR_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("generating key or certificate failed: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("CA key or certificate is unusable: {0}")]
    BadCa(String),
    #[error("CSR is {0} bytes, more than the {MAX_CSR_BYTES}-byte limit")]
    CsrTooLarge(usize),
    #[error("CSR is not a valid PEM certificate request: {0}")]
    CsrUnparsable(String),
    #[error("CSR subject {subject:?} is not `CN={NODE_CN_PREFIX}{node}, O={NODE_ORGANIZATION}`")]
    CsrSubjectMismatch { subject: String, node: String },
    #[error("invalid node name `{node}`: it {reason}")]
    BadNodeName { node: String, reason: &'static str },
    #[error("extended key usage {0} is not allowed for node certificates")]
    ExtKeyUsageNotAllowed(i64),
    #[error("certificate is not valid DER X.509: {0}")]
    CertUnparsable(String),
    #[error("certificate has no common name")]
    NoCommonName,
    #[error("random number generator failed")]
    Random,
}

/// Now, in unix seconds (0 if the clock is before 1970).
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn offset_from_now(d: Duration) -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc() + d
}

/// A certificate (PEM and DER) with its private key (PKCS#8 PEM).
#[derive(Clone)]
pub struct CertAndKey {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    pub key_pem: String,
}

impl std::fmt::Debug for CertAndKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAndKey")
            .field("cert_der_len", &self.cert_der.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// The cloud's certificate authority.
pub struct CertificateAuthority {
    material: CertAndKey,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Creates a new self-signed CA, valid for `validity`.
    pub fn generate(common_name: &str, validity: Duration) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Generate)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = offset_from_now(Duration::ZERO) - Duration::from_secs(300);
        params.not_after = offset_from_now(validity);
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
        let material = CertAndKey {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        };
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            material,
        })
    }

    /// Loads a CA from its certificate (PEM) and key (PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::BadCa(e.to_string()))?;
        let der = pem_to_der(cert_pem, "CERTIFICATE").map_err(PkiError::BadCa)?;
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .map_err(|e| PkiError::BadCa(e.to_string()))?;
        Ok(CertificateAuthority {
            material: CertAndKey {
                cert_pem: cert_pem.to_owned(),
                cert_der: der,
                key_pem: key_pem.to_owned(),
            },
            issuer,
        })
    }

    pub fn material(&self) -> &CertAndKey {
        &self.material
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.material.cert_der
    }

    /// sha256 of the CA certificate DER, lowercase hex: the first part of a join token.
    pub fn cert_hash(&self) -> String {
        sha256_hex(&self.material.cert_der)
    }

    /// A server certificate for cloudhub with the given SANs (IPs or DNS names).
    pub fn issue_server_cert(
        &self,
        sans: &[String],
        validity: Duration,
    ) -> Result<CertAndKey, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Generate)?;
        let mut params = CertificateParams::new(sans.to_vec()).map_err(PkiError::Generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "kedge cloudcore");
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_new(params, &key, validity)
    }

    /// Signs `params` for `key`, valid from five minutes ago (clock skew) for `validity`.
    fn sign_new(
        &self,
        mut params: CertificateParams,
        key: &KeyPair,
        validity: Duration,
    ) -> Result<CertAndKey, PkiError> {
        params.not_before = offset_from_now(Duration::ZERO) - Duration::from_secs(300);
        params.not_after = offset_from_now(validity);
        params.serial_number = Some(random_serial()?);
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(PkiError::Generate)?;
        Ok(CertAndKey {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate for `common_name` in the group `organization` (Kubernetes reads them
    /// as user and group): for clients of cloudcore's kubelet API, and tests.
    pub fn issue_client_cert(
        &self,
        common_name: &str,
        organization: Option<&str>,
        validity: Duration,
    ) -> Result<CertAndKey, PkiError> {
        let key = KeyPair::generate().map_err(PkiError::Generate)?;
        let mut params =
            CertificateParams::new(Vec::<String>::new()).map_err(PkiError::Generate)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        if let Some(o) = organization {
            dn.push(DnType::OrganizationName, o);
        }
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_new(params, &key, validity)
    }

    /// Signs a node's CSR (PEM, or DER as KubeEdge's edgecore sends it). The CSR's signature must verify and its subject must be exactly
    /// `CN=system:node:<node>, O=system:nodes` (country/locality/province, which KubeEdge's
    /// edgecore adds, are tolerated and dropped). Only the CSR's public key is used: subject,
    /// validity, key usages and "not a CA" are ours. `ext_key_usages` are Go `x509.ExtKeyUsage`
    /// numbers as KubeEdge sends them (1 server auth, 2 client auth); empty means client auth.
    pub fn sign_node_csr(
        &self,
        csr_pem: &[u8],
        node: &str,
        ext_key_usages: &[i64],
        validity: Duration,
    ) -> Result<Vec<u8>, PkiError> {
        if csr_pem.len() > MAX_CSR_BYTES {
            return Err(PkiError::CsrTooLarge(csr_pem.len()));
        }
        crate::resource::validate_node_name(node).map_err(|reason| PkiError::BadNodeName {
            node: node.to_owned(),
            reason,
        })?;
        // KubeEdge's edgecore sends the CSR as raw DER (an ASN.1 SEQUENCE, first byte 0x30);
        // ours sends PEM. Both are accepted.
        let der = if csr_pem.first() == Some(&0x30) {
            csr_pem.to_vec()
        } else {
            let text = std::str::from_utf8(csr_pem)
                .map_err(|_| PkiError::CsrUnparsable("neither DER nor PEM (not UTF-8)".into()))?;
            pem_to_der(text, "CERTIFICATE REQUEST").map_err(PkiError::CsrUnparsable)?
        };
        check_csr_subject(&der, node)?;
        let parsed = CertificateSigningRequestParams::from_der(&der.into())
            .map_err(|e| PkiError::CsrUnparsable(e.to_string()))?;

        let mut ekus = Vec::new();
        for &u in ext_key_usages {
            match u {
                1 => ekus.push(ExtendedKeyUsagePurpose::ServerAuth),
                2 => ekus.push(ExtendedKeyUsagePurpose::ClientAuth),
                other => return Err(PkiError::ExtKeyUsageNotAllowed(other)),
            }
        }
        if ekus.is_empty() {
            ekus.push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = node_subject(node);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = ekus;
        params.not_before = offset_from_now(Duration::ZERO) - Duration::from_secs(300);
        params.not_after = offset_from_now(validity);
        params.serial_number = Some(random_serial()?);
        let request = CertificateSigningRequestParams {
            params,
            public_key: parsed.public_key,
        };
        let cert = request
            .signed_by(&self.issuer)
            .map_err(PkiError::Generate)?;
        Ok(cert.der().to_vec())
    }
}

fn node_subject(node: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{NODE_CN_PREFIX}{node}"));
    dn.push(DnType::OrganizationName, NODE_ORGANIZATION);
    dn
}

fn check_csr_subject(der: &[u8], node: &str) -> Result<(), PkiError> {
    let (_, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| PkiError::CsrUnparsable(e.to_string()))?;
    let subject = &csr.certification_request_info.subject;
    let cns: Vec<&str> = subject
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let orgs: Vec<&str> = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let expected_cn = format!("{NODE_CN_PREFIX}{node}");
    let attribute_count = subject.iter_attributes().count();
    let tolerated = subject.iter_country().count()
        + subject.iter_locality().count()
        + subject.iter_state_or_province().count();
    let ok = cns == [expected_cn.as_str()]
        && orgs == [NODE_ORGANIZATION]
        && attribute_count == 2 + tolerated;
    if ok {
        Ok(())
    } else {
        Err(PkiError::CsrSubjectMismatch {
            subject: subject.to_string(),
            node: node.to_owned(),
        })
    }
}

/// A node's new key and CSR (PEM), as `edgecore join` sends it.
pub fn node_csr(node: &str) -> Result<(String, String), PkiError> {
    crate::resource::validate_node_name(node).map_err(|reason| PkiError::BadNodeName {
        node: node.to_owned(),
        reason,
    })?;
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = node_subject(node);
    let csr = params.serialize_request(&key).map_err(PkiError::Generate)?;
    let pem = csr.pem().map_err(PkiError::Generate)?;
    Ok((key.serialize_pem(), pem))
}

/// The node name in a node certificate (`CN=system:node:<node>`), or an error.
pub fn node_name_from_cert(der: &[u8]) -> Result<String, PkiError> {
    let cn = common_name(der)?;
    cn.strip_prefix(NODE_CN_PREFIX)
        .map(str::to_owned)
        .ok_or(PkiError::NoCommonName)
}

/// The first common name in a DER certificate.
pub fn common_name(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::CertUnparsable(e.to_string()))?;
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or(PkiError::NoCommonName)
}

/// Who a client certificate says its holder is, as Kubernetes reads it: the user is the
/// subject's common name, the groups its organizations.
pub fn subject_identity(der: &[u8]) -> Result<(String, Vec<String>), PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::CertUnparsable(e.to_string()))?;
    let user = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .map(str::to_owned)
        .ok_or(PkiError::NoCommonName)?;
    let groups = cert
        .subject()
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Ok((user, groups))
}

/// The identity of a certificate's key pair: SHA-256 (hex) of its DER SubjectPublicKeyInfo.
/// A node proves it owns its name by holding the private key of a key id the cloud recorded.
pub fn cert_key_id(der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::CertUnparsable(e.to_string()))?;
    Ok(sha256_hex(cert.public_key().raw))
}

/// When a DER certificate stops being valid (unix seconds).
pub fn not_after_unix(der: &[u8]) -> Result<i64, PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::CertUnparsable(e.to_string()))?;
    Ok(cert.validity().not_after.timestamp())
}

/// A DER certificate's validity as (not before, not after), unix seconds.
pub fn validity_unix(der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| PkiError::CertUnparsable(e.to_string()))?;
    Ok((
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    ))
}

/// Extracts the first PEM block with `label` as DER.
pub fn pem_to_der(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let blocks = pem::parse_many(text).map_err(|e| e.to_string())?;
    blocks
        .into_iter()
        .find(|b| b.tag() == label)
        .map(|b| b.into_contents())
        .ok_or_else(|| format!("no PEM block labelled {label}"))
}

/// DER certificate as PEM.
pub fn der_to_pem(der: &[u8], label: &str) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = digest::digest(&digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

/// Random bytes for a token-signing secret.
pub fn random_secret() -> Result<Vec<u8>, PkiError> {
    let mut bytes = vec![0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------------
// Join tokens

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not `<ca-hash>.<jwt>`")]
    Malformed,
    #[error("token's CA hash is not 64 hex digits")]
    BadCaHash,
    #[error("token JWT is malformed: {0}")]
    BadJwt(&'static str),
    #[error("token JWT uses algorithm {0}, only HS256 is accepted")]
    WrongAlgorithm(String),
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token expired at {expired_at} (now {now})")]
    Expired { expired_at: i64, now: i64 },
    #[error("token CA hash {token} does not match the CA certificate's {actual}")]
    CaHashMismatch { token: String, actual: String },
}

#[derive(Serialize, Deserialize)]
struct JwtHeader {
    alg: String,
    typ: String,
}

/// What a join token grants, signed into its JWT. KubeEdge's tokens carry only `exp`; `node`
/// and `jti` are ours and optional, so KubeEdge's tokens verify here unchanged.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinClaims {
    /// Expiry, unix seconds.
    pub exp: i64,
    /// The only node name the token may join (`cloudcore token --node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The token's id, naming the record that counts its uses (`cloudcore token --uses`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// A join token split into its parts; produced by [`JoinToken::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub ca_hash: String,
    pub jwt: String,
}

impl JoinToken {
    /// Issues a token `<ca-hash>.<jwt>` valid for `ttl`, signed with `secret`.
    pub fn issue(ca_cert_der: &[u8], secret: &[u8], ttl: Duration) -> String {
        Self::issue_with(ca_cert_der, secret, &JoinClaims::expiring_in(ttl))
    }

    /// Issues a token carrying `claims`.
    pub fn issue_with(ca_cert_der: &[u8], secret: &[u8], claims: &JoinClaims) -> String {
        format!("{}.{}", sha256_hex(ca_cert_der), sign_jwt(secret, claims))
    }

    /// Splits a token. The JWT itself has dots, so the CA hash is everything before the first.
    pub fn parse(token: &str) -> Result<JoinToken, TokenError> {
        let (hash, jwt) = token.trim().split_once('.').ok_or(TokenError::Malformed)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::BadCaHash);
        }
        if jwt.split('.').count() != 3 {
            return Err(TokenError::Malformed);
        }
        Ok(JoinToken {
            ca_hash: hash.to_ascii_lowercase(),
            jwt: jwt.to_owned(),
        })
    }

    /// Checks the CA the edge downloaded against the token's hash.
    pub fn check_ca(&self, ca_cert_der: &[u8]) -> Result<(), TokenError> {
        let actual = sha256_hex(ca_cert_der);
        if actual == self.ca_hash {
            Ok(())
        } else {
            Err(TokenError::CaHashMismatch {
                token: self.ca_hash.clone(),
                actual,
            })
        }
    }
}

impl JoinClaims {
    /// Claims of a token for any node, valid for `ttl` from now.
    pub fn expiring_in(ttl: Duration) -> JoinClaims {
        JoinClaims {
            exp: now_unix().saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
            node: None,
            jti: None,
        }
    }
}

fn sign_jwt(secret: &[u8], claims: &JoinClaims) -> String {
    let header = JwtHeader {
        alg: "HS256".into(),
        typ: "JWT".into(),
    };
    // Serializing two plain structs cannot fail.
    let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap_or_default());
    let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_default());
    let signing_input = format!("{h}.{c}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let sig = hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

/// Verifies a bare JWT (what edgecore sends as `Authorization: Bearer`): HS256 signature with
/// `secret`, then expiry. Returns what the token grants.
pub fn verify_jwt(jwt: &str, secret: &[u8]) -> Result<JoinClaims, TokenError> {
    let mut parts = jwt.trim().split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::BadJwt("not three dot-separated parts"));
    };
    let header_bytes = URL_SAFE_NO_PAD
        .decode(h)
        .map_err(|_| TokenError::BadJwt("header is not base64url"))?;
    let header: JwtHeader = serde_json::from_slice(&header_bytes)
        .map_err(|_| TokenError::BadJwt("header is not JSON"))?;
    if header.alg != "HS256" {
        return Err(TokenError::WrongAlgorithm(header.alg));
    }
    let sig = URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| TokenError::BadJwt("signature is not base64url"))?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::verify(&key, format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims_bytes = URL_SAFE_NO_PAD
        .decode(c)
        .map_err(|_| TokenError::BadJwt("claims are not base64url"))?;
    let claims: JoinClaims = serde_json::from_slice(&claims_bytes)
        .map_err(|_| TokenError::BadJwt("claims lack a numeric exp"))?;
    let now = now_unix();
    if claims.exp <= now {
        return Err(TokenError::Expired {
            expired_at: claims.exp,
            now,
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn node_csr_is_signed_with_our_subject_and_names_the_node() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let (_key, csr) = node_csr("edge-1").unwrap();
        let der = ca
            .sign_node_csr(csr.as_bytes(), "edge-1", &[], DAY)
            .unwrap();
        assert_eq!(node_name_from_cert(&der).unwrap(), "edge-1");
        assert!(not_after_unix(&der).unwrap() > now_unix());
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(
            cert.subject()
                .iter_organization()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            NODE_ORGANIZATION
        );
    }

    #[test]
    fn a_der_csr_as_kubeedge_sends_it_is_signed_too() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let (_key, csr) = node_csr("edge-1").unwrap();
        let der_csr = pem_to_der(&csr, "CERTIFICATE REQUEST").unwrap();
        let cert = ca.sign_node_csr(&der_csr, "edge-1", &[], DAY).unwrap();
        assert_eq!(node_name_from_cert(&cert).unwrap(), "edge-1");
        assert!(matches!(
            ca.sign_node_csr(&der_csr, "edge-2", &[], DAY),
            Err(PkiError::CsrSubjectMismatch { .. })
        ));
        assert!(matches!(
            ca.sign_node_csr(&[0x30, 0x03, 0x01], "edge-1", &[], DAY),
            Err(PkiError::CsrUnparsable(_))
        ));
    }

    #[test]
    fn csr_for_another_node_is_refused() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let (_key, csr) = node_csr("edge-a").unwrap();
        let e = ca
            .sign_node_csr(csr.as_bytes(), "edge-b", &[], DAY)
            .unwrap_err();
        assert!(matches!(e, PkiError::CsrSubjectMismatch { .. }), "{e}");
    }

    #[test]
    fn csr_with_a_foreign_subject_is_refused() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "system:node:edge-1");
        dn.push(DnType::OrganizationName, "system:masters");
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let e = ca
            .sign_node_csr(csr.as_bytes(), "edge-1", &[], DAY)
            .unwrap_err();
        assert!(matches!(e, PkiError::CsrSubjectMismatch { .. }), "{e}");
    }

    #[test]
    fn kubeedge_style_subject_with_location_is_accepted() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = node_subject("edge-1");
        dn.push(DnType::CountryName, "CN");
        dn.push(DnType::LocalityName, "Hangzhou");
        dn.push(DnType::StateOrProvinceName, "Zhejiang");
        params.distinguished_name = dn;
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let der = ca
            .sign_node_csr(csr.as_bytes(), "edge-1", &[2], DAY)
            .unwrap();
        assert_eq!(node_name_from_cert(&der).unwrap(), "edge-1");
    }

    #[test]
    fn bad_csrs_are_typed_errors() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let big = vec![b'A'; MAX_CSR_BYTES + 1];
        assert!(matches!(
            ca.sign_node_csr(&big, "edge-1", &[], DAY),
            Err(PkiError::CsrTooLarge(_))
        ));
        assert!(matches!(
            ca.sign_node_csr(b"hello", "edge-1", &[], DAY),
            Err(PkiError::CsrUnparsable(_))
        ));
        let (_k, csr) = node_csr("edge-1").unwrap();
        assert!(matches!(
            ca.sign_node_csr(csr.as_bytes(), "edge-1", &[3], DAY),
            Err(PkiError::ExtKeyUsageNotAllowed(3))
        ));
        assert!(matches!(
            ca.sign_node_csr(csr.as_bytes(), "Edge_1", &[], DAY),
            Err(PkiError::BadNodeName { .. })
        ));
        // A CSR whose signature was tampered with.
        let mut der = pem_to_der(&csr, "CERTIFICATE REQUEST").unwrap();
        let last = der.len() - 1;
        der[last] ^= 0x55;
        let tampered = der_to_pem(&der, "CERTIFICATE REQUEST");
        assert!(
            ca.sign_node_csr(tampered.as_bytes(), "edge-1", &[], DAY)
                .is_err()
        );
    }

    #[test]
    fn ca_reloads_from_pem_and_keeps_signing() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let m = ca.material().clone();
        let again = CertificateAuthority::from_pem(&m.cert_pem, &m.key_pem).unwrap();
        assert_eq!(again.cert_hash(), ca.cert_hash());
        let (_k, csr) = node_csr("n1").unwrap();
        again.sign_node_csr(csr.as_bytes(), "n1", &[], DAY).unwrap();
        assert!(CertificateAuthority::from_pem("junk", &m.key_pem).is_err());
    }

    #[test]
    fn tokens_issue_verify_and_expire() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let secret = random_secret().unwrap();
        let token = JoinToken::issue(ca.cert_der(), &secret, DAY);
        let parsed = JoinToken::parse(&token).unwrap();
        parsed.check_ca(ca.cert_der()).unwrap();
        verify_jwt(&parsed.jwt, &secret).unwrap();

        // Forged: signed with another secret.
        let forged = JoinToken::issue(ca.cert_der(), b"another secret", DAY);
        let forged = JoinToken::parse(&forged).unwrap();
        assert_eq!(
            verify_jwt(&forged.jwt, &secret),
            Err(TokenError::BadSignature)
        );

        // Expired.
        let expired_jwt = sign_jwt(
            &secret,
            &JoinClaims {
                exp: now_unix() - 10,
                ..JoinClaims::default()
            },
        );
        assert!(matches!(
            verify_jwt(&expired_jwt, &secret),
            Err(TokenError::Expired { .. })
        ));

        // Wrong CA.
        let other = CertificateAuthority::generate("other", DAY).unwrap();
        assert!(matches!(
            parsed.check_ca(other.cert_der()),
            Err(TokenError::CaHashMismatch { .. })
        ));
    }

    #[test]
    fn node_bound_tokens_carry_their_claims_and_kubeedge_tokens_still_verify() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let secret = random_secret().unwrap();
        let claims = JoinClaims {
            node: Some("edge-7".into()),
            jti: Some("abc".into()),
            ..JoinClaims::expiring_in(DAY)
        };
        let t = JoinToken::parse(&JoinToken::issue_with(ca.cert_der(), &secret, &claims)).unwrap();
        assert_eq!(verify_jwt(&t.jwt, &secret).unwrap(), claims);
        // A KubeEdge token: only `exp`.
        let plain = JoinToken::parse(&JoinToken::issue(ca.cert_der(), &secret, DAY)).unwrap();
        let got = verify_jwt(&plain.jwt, &secret).unwrap();
        assert_eq!((got.node, got.jti), (None, None));
    }

    #[test]
    fn key_ids_follow_the_key_not_the_certificate() {
        let ca = CertificateAuthority::generate("kedge test CA", DAY).unwrap();
        let (key, csr) = node_csr("edge-1").unwrap();
        let a = ca
            .sign_node_csr(csr.as_bytes(), "edge-1", &[], DAY)
            .unwrap();
        let b = ca
            .sign_node_csr(csr.as_bytes(), "edge-1", &[], DAY)
            .unwrap();
        assert_ne!(a, b, "two certificates");
        assert_eq!(cert_key_id(&a).unwrap(), cert_key_id(&b).unwrap());
        let spki = pem_to_der(
            &KeyPair::from_pem(&key).unwrap().public_key_pem(),
            "PUBLIC KEY",
        )
        .unwrap();
        assert_eq!(cert_key_id(&a).unwrap(), sha256_hex(&spki));
        let (_, other) = node_csr("edge-1").unwrap();
        let c = ca
            .sign_node_csr(other.as_bytes(), "edge-1", &[], DAY)
            .unwrap();
        assert_ne!(cert_key_id(&a).unwrap(), cert_key_id(&c).unwrap());
        assert!(cert_key_id(b"junk").is_err());
    }

    #[test]
    fn malformed_tokens_never_panic() {
        for t in [
            "",
            ".",
            "abc.def",
            &format!("{}.a.b", "0".repeat(64)),
            &format!("{}.a", "0".repeat(64)),
            &format!("{}.a.b.c.d", "z".repeat(64)),
        ] {
            let _ = JoinToken::parse(t);
        }
        for jwt in ["a.b.c", "..", "eyJ.eyJ.xx", "a.b", "a.b.c.d"] {
            assert!(verify_jwt(jwt, b"s").is_err());
        }
        // alg=none is refused.
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let c = URL_SAFE_NO_PAD.encode(br#"{"exp":99999999999}"#);
        assert!(matches!(
            verify_jwt(&format!("{h}.{c}."), b"s"),
            Err(TokenError::WrongAlgorithm(_))
        ));
    }
}
