//! What both daemons' `main` needs: the async runtime and the shutdown signal.

/// A multi-threaded tokio runtime, with the rustls crypto provider installed first.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    crate::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// The runtime of a daemon on a small device: blocking work (file I/O, name lookups) goes
/// through at most `max_blocking` threads. Each extra thread costs memory that stays (its stack
/// and, with glibc, often an allocator arena), and a burst of pods would otherwise start dozens.
pub fn small_runtime(max_blocking: usize) -> std::io::Result<tokio::runtime::Runtime> {
    crate::tls::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(max_blocking.max(1))
        .build()
}

/// Resolves on SIGTERM (systemd, kubelet) or Ctrl-C.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose text the message
/// before it already contains (many errors here name their cause in their own message).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut last = out.clone();
    let mut cur = err.source();
    while let Some(e) = cur {
        let text = e.to_string();
        if !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer names it: {0}")]
    struct Outer(#[source] std::io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("wrapper")]
    struct Wrapper(#[source] Outer);

    #[test]
    fn causes_are_not_repeated() {
        let e = Wrapper(Outer(std::io::Error::other("disk full")));
        assert_eq!(error_chain(&e), "wrapper: outer names it: disk full");
    }
}
