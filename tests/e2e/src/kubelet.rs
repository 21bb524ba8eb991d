//! A client of a node's kubelet API as the API server is one: HTTPS with a client certificate
//! from the cluster CA, no check of the serving certificate. For tests and benchmarks that call
//! cloudcore's CloudStream directly.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kedge_common::pki::CertificateAuthority;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub type KubeletConn = tokio_rustls::client::TlsStream<TcpStream>;

#[derive(Clone)]
pub struct KubeletApiClient {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl KubeletApiClient {
    /// A client presenting a certificate for `user` (in `group`) signed by `ca`.
    pub fn new(
        addr: SocketAddr,
        ca: &CertificateAuthority,
        user: &str,
        group: Option<&str>,
    ) -> anyhow::Result<Self> {
        let cert = ca.issue_client_cert(user, group, Duration::from_secs(86_400))?;
        let tls = kedge_common::tls::unverified_client_config_with_identity(
            &cert.cert_pem,
            &cert.key_pem,
        )?;
        Ok(KubeletApiClient { addr, tls })
    }

    /// Connects and sends `method target` with `headers`; the response is read from the
    /// returned connection.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<KubeletConn> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from(self.addr.ip().to_string())?;
        let mut conn = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes()).await?;
        conn.flush().await?;
        Ok(conn)
    }

    /// A whole (non-streaming) answer: status code and body.
    pub async fn get(&self, target: &str) -> anyhow::Result<(u16, String)> {
        let mut conn = self.send("GET", target, &[]).await?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        Ok((status, body.to_owned()))
    }
}
