//! A certificate request to the bootstrap endpoint: header lines (`Name: value`), an empty line,
//! then the CSR body. Parsing and authenticating the head, then signing the CSR, never panic;
//! a certificate is only ever signed for the node the request names, with our subject.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use cloudcore::cloudhub::bootstrap::{parse_request, sign_csr};
use kedge_common::pki::{self, CertificateAuthority, JoinToken};
use libfuzzer_sys::fuzz_target;

struct Fixture {
    ca: CertificateAuthority,
    secret: Vec<u8>,
    /// A valid token, so the fuzzer reaches the CSR.
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ca = CertificateAuthority::generate("fuzz CA", Duration::from_secs(86_400))
            .expect("a CA");
        let secret = b"fuzz token secret".to_vec();
        let token = JoinToken::issue(ca.cert_der(), &secret, Duration::from_secs(86_400));
        Fixture { ca, secret, token }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let split = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(data.len());
    let (head, body) = (&data[..split], data.get(split + 2..).unwrap_or_default());
    let mut headers = http::HeaderMap::new();
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value.trim_ascii()),
        ) else {
            continue;
        };
        // `@token` stands for a valid token, so inputs get past authentication.
        let value = if value.as_bytes() == b"@token" {
            http::HeaderValue::from_str(&format!("Bearer {}", f.token)).expect("a header value")
        } else {
            value
        };
        headers.append(name, value);
    }
    let Ok(req) = parse_request(&headers, None, f.ca.cert_der(), &f.secret) else {
        return;
    };
    if let Ok(der) = sign_csr(
        &f.ca,
        body,
        &req.node,
        &req.ext_key_usages,
        Duration::from_secs(3600),
    ) {
        assert_eq!(pki::node_name_from_cert(&der).ok().as_deref(), Some(req.node.as_str()));
    }
});
