//! Small HTTP helpers shared by the local API servers.

/// Decodes `%XX` escapes and `+` (a space in query strings). Invalid escapes are kept as-is.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query string as decoded `(key, value)` pairs, in order.
pub fn parse_query(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// The first value of `key`.
pub fn query_value<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A complete HTTP/1.1 response with a plain-text body (a newline added if it lacks one) that
/// closes the connection: what the kubelet-API byte pipes (cloudcore's CloudStream, edged's
/// stream server) answer when they answer themselves.
pub fn text_response(status: u16, body: &str) -> Vec<u8> {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Unknown");
    let newline = if body.ends_with('\n') { "" } else { "\n" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}{newline}",
        body.len() + newline.len()
    )
    .into_bytes()
}

/// Response body of the local HTTP servers.
pub type Body = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;

/// Serves plain HTTP/1.1 on `listener` with `handler` until `shutdown` is cancelled: the accept
/// loop shared by the MetaServer and the test API server. `TCP_NODELAY` is set because
/// responses go out in several segments and delayed ACKs would add ~40 ms to each.
pub fn serve<F, Fut>(
    listener: tokio::net::TcpListener,
    shutdown: tokio_util::sync::CancellationToken,
    handler: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => match a {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        // EMFILE and friends: back off briefly rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let handler = handler.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                });
                // Upgrades: the test API server passes kubectl exec/port-forward through.
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .with_upgrades();
                tokio::select! {
                    _ = conn => {}
                    _ = stop.cancelled() => {}
                }
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_responses_are_complete_http() {
        let r = String::from_utf8(text_response(404, "pod x is not on this node")).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(r.contains("Content-Length: 26\r\n"));
        assert!(r.ends_with("\r\n\r\npod x is not on this node\n"));
        let r = String::from_utf8(text_response(501, "x\n")).unwrap();
        assert!(r.starts_with("HTTP/1.1 501 Not Implemented\r\n"));
        assert!(r.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\nx\n"));
    }

    #[test]
    fn queries_decode() {
        let q = parse_query(Some(
            "labelSelector=app%20in%20(a%2Cb)&watch=1&x=a+b&bad=%zz&empty",
        ));
        assert_eq!(query_value(&q, "labelSelector"), Some("app in (a,b)"));
        assert_eq!(query_value(&q, "watch"), Some("1"));
        assert_eq!(query_value(&q, "x"), Some("a b"));
        assert_eq!(query_value(&q, "bad"), Some("%zz"));
        assert_eq!(query_value(&q, "empty"), Some(""));
        assert_eq!(percent_decode("%"), "%");
        assert_eq!(percent_decode("%4"), "%4");
    }
}
