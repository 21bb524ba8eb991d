//! A TCP proxy on 127.0.0.1 for failure injection: `cut_all` resets every live connection,
//! `set_refusing(true)` closes new connections at once (the upstream looks unreachable).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct ChaosProxy {
    addr: SocketAddr,
    cut: watch::Sender<u64>,
    refusing: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl ChaosProxy {
    /// Starts a proxy to `target` on a random loopback port.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (cut, _) = watch::channel(0u64);
        let refusing = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (cut_tx, refusing2, accepted2, stop2) = (
            cut.clone(),
            refusing.clone(),
            accepted.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                };
                if refusing2.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                accepted2.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut_tx.subscribe();
                let stop3 = stop2.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut_rx.changed() => {
                            // Reset rather than close politely: a cut link, not a goodbye.
                            let _ = client.set_zero_linger();
                            let _ = server.set_zero_linger();
                        }
                        _ = stop3.cancelled() => {}
                    }
                });
            }
        });
        Ok(ChaosProxy {
            addr,
            cut,
            refusing,
            accepted,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills every connection currently through the proxy.
    pub fn cut_all(&self) {
        self.cut.send_modify(|n| *n += 1);
    }

    /// While refusing, new connections are closed immediately.
    pub fn set_refusing(&self, refusing: bool) {
        self.refusing.store(refusing, Ordering::SeqCst);
    }

    /// Connections accepted (and forwarded) so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A TCP load balancer on 127.0.0.1, as a Service in front of cloudcore replicas: each new
/// connection goes to the next backend in turn; a backend that refuses is skipped. Backends can
/// be changed while it runs (a rolling update adds the new replica's endpoint).
pub struct LoadBalancer {
    addr: SocketAddr,
    backends: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    stop: CancellationToken,
}

impl LoadBalancer {
    pub async fn start(backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let stop2 = stop.clone();
        let next = Arc::new(AtomicUsize::new(0));
        let backends = Arc::new(std::sync::Mutex::new(backends));
        let shared = backends.clone();
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = stop2.cancelled() => return,
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                };
                let backends = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let (next, stop3) = (next.clone(), stop2.clone());
                tokio::spawn(async move {
                    let first = next.fetch_add(1, Ordering::SeqCst);
                    for i in 0..backends.len() {
                        let target = backends[(first + i) % backends.len()];
                        let Ok(mut server) = TcpStream::connect(target).await else {
                            continue;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = stop3.cancelled() => {}
                        }
                        return;
                    }
                });
            }
        });
        Ok(LoadBalancer {
            addr,
            backends,
            stop,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where new connections go from now on.
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap_or_else(|p| p.into_inner()) = backends;
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
