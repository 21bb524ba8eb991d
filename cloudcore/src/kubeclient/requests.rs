//! What cloudcore asks of the API server, held to `kubeAPIConfig.qps`/`burst` and counted.
//!
//! The limit is client-go's: a token bucket of `burst` requests refilled at `qps` per second,
//! taken before each request is sent (a watch takes one when it starts). Without it a reconnect
//! storm — thousands of nodes coming back after a cloud outage, each with a Lease renewal, a
//! Node status and pod status patches — reaches the API server at whatever rate cloudcore can
//! produce, and KubeEdge's users set these two fields expecting them to hold. The bucket sits
//! in kube's client stack behind its request buffer, so waiting for a token holds the requests
//! queued behind it in order and never blocks a thread.
//!
//! The counts (`kedge_cloudcore_api_requests{method,code}` and the time spent waiting for a
//! token) are read at scrape time by `crate::observability`.

use std::collections::BTreeMap;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, Service};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RateLimitError {
    #[error("kubeAPIConfig.qps {0} gives no usable interval between requests")]
    Qps(f32),
    #[error("kubeAPIConfig.burst must be greater than 0")]
    Burst,
}

/// Up to `burst` requests at once, refilled at `qps` per second. The clock is a parameter so
/// the refill is tested without sleeping.
pub struct TokenBucket<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
}

impl TokenBucket {
    pub fn new(qps: f32, burst: u32) -> Result<Self, RateLimitError> {
        Self::with_clock(qps, burst, DefaultClock::default())
    }
}

impl<C: Clock> TokenBucket<C> {
    pub fn with_clock(qps: f32, burst: u32, clock: C) -> Result<Self, RateLimitError> {
        let period = Duration::try_from_secs_f64(1.0 / f64::from(qps))
            .ok()
            .and_then(Quota::with_period)
            .ok_or(RateLimitError::Qps(qps))?;
        let burst = NonZeroU32::new(burst).ok_or(RateLimitError::Burst)?;
        Ok(TokenBucket {
            limiter: RateLimiter::direct_with_clock(period.allow_burst(burst), clock),
        })
    }

    /// Takes a token, or says how long until the next one.
    pub fn take(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|later| later.wait_time_from(self.limiter.clock().now()))
    }
}

/// Requests by method and response code, and the waiting the bucket imposed.
#[derive(Debug, Default)]
pub struct ApiRequests {
    by_method_and_code: Mutex<BTreeMap<(&'static str, Option<u16>), u64>>,
    /// Requests that had to wait for a token.
    pub throttled: AtomicU64,
    /// Total time requests waited for a token, in microseconds.
    pub throttled_micros: AtomicU64,
}

impl ApiRequests {
    fn record(&self, method: &'static str, code: Option<u16>) {
        let mut counts = self
            .by_method_and_code
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *counts.entry((method, code)).or_default() += 1;
    }

    /// `(method, code, count)`; the code is `None` when no response came (connection error,
    /// timeout).
    pub fn snapshot(&self) -> Vec<(&'static str, Option<u16>, u64)> {
        let counts = self
            .by_method_and_code
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        counts.iter().map(|(&(m, c), &n)| (m, c, n)).collect()
    }
}

/// The method label: the HTTP method, except that a watch is `WATCH` (it is a GET that stays
/// open, and telling them apart is what an operator reading the counts needs).
fn method_label<B>(req: &Request<B>) -> &'static str {
    let watch = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    match *req.method() {
        http::Method::GET if watch => "WATCH",
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        _ => "OTHER",
    }
}

/// Adds the bucket and the counts to a client stack.
#[derive(Clone)]
pub struct ApiRequestLayer {
    bucket: Arc<TokenBucket>,
    counts: Arc<ApiRequests>,
}

impl ApiRequestLayer {
    pub fn new(bucket: TokenBucket, counts: Arc<ApiRequests>) -> Self {
        ApiRequestLayer {
            bucket: Arc::new(bucket),
            counts,
        }
    }
}

impl<S> Layer<S> for ApiRequestLayer {
    type Service = ApiRequestService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ApiRequestService {
            inner,
            bucket: self.bucket.clone(),
            counts: self.counts.clone(),
            waiting: None,
            admitted: false,
        }
    }
}

pub struct ApiRequestService<S> {
    inner: S,
    bucket: Arc<TokenBucket>,
    counts: Arc<ApiRequests>,
    /// Set while the next request waits for a token: the timer and when the wait began.
    waiting: Option<(Pin<Box<tokio::time::Sleep>>, Instant)>,
    /// A token is taken for the next call; kept when the inner service is not ready yet, so a
    /// request never takes two.
    admitted: bool,
}

impl<S, B, R> Service<Request<B>> for ApiRequestService<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        while !self.admitted {
            if let Some((timer, _)) = self.waiting.as_mut() {
                ready!(timer.as_mut().poll(cx));
            }
            match self.bucket.take() {
                Ok(()) => {
                    self.admitted = true;
                    if let Some((_, since)) = self.waiting.take() {
                        let waited = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                        self.counts
                            .throttled_micros
                            .fetch_add(waited, Ordering::Relaxed);
                    }
                }
                Err(wait) => {
                    let since = match self.waiting.take() {
                        Some((_, since)) => since,
                        None => {
                            self.counts.throttled.fetch_add(1, Ordering::Relaxed);
                            Instant::now()
                        }
                    };
                    self.waiting = Some((Box::pin(tokio::time::sleep(wait)), since));
                }
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.admitted = false;
        let method = method_label(&req);
        let counts = self.counts.clone();
        let response = self.inner.call(req);
        Box::pin(async move {
            let result = response.await;
            counts.record(method, result.as_ref().ok().map(|r| r.status().as_u16()));
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn the_bucket_lets_a_burst_through_then_refills_at_qps() {
        let clock = FakeRelativeClock::default();
        let bucket = TokenBucket::with_clock(10.0, 3, clock.clone()).unwrap();
        for _ in 0..3 {
            assert_eq!(bucket.take(), Ok(()));
        }
        assert_eq!(bucket.take(), Err(Duration::from_millis(100)));
        clock.advance(Duration::from_millis(40));
        assert_eq!(bucket.take(), Err(Duration::from_millis(60)));
        clock.advance(Duration::from_millis(60));
        assert_eq!(bucket.take(), Ok(()));
        assert!(bucket.take().is_err(), "one token per 100 ms");
        // Idle for a long time refills the burst, no more.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(bucket.take(), Ok(()));
        }
        assert!(bucket.take().is_err());
    }

    #[test]
    fn unusable_limits_are_named() {
        assert_eq!(
            TokenBucket::new(0.0, 1).err(),
            Some(RateLimitError::Qps(0.0))
        );
        assert_eq!(
            TokenBucket::new(f32::MAX, 1).err(),
            Some(RateLimitError::Qps(f32::MAX))
        );
        assert_eq!(TokenBucket::new(1.0, 0).err(), Some(RateLimitError::Burst));
        assert!(TokenBucket::new(0.5, 1).is_ok(), "one request every 2 s");
    }

    #[test]
    fn watches_are_told_from_gets() {
        let get = |uri: &str| Request::get(uri).body(()).unwrap();
        assert_eq!(
            method_label(&get("/api/v1/pods?watch=true&resourceVersion=5")),
            "WATCH"
        );
        assert_eq!(method_label(&get("/api/v1/pods?limit=500")), "GET");
        assert_eq!(method_label(&get("/api/v1/pods?watchx=true")), "GET");
        let patch = Request::patch("/api/v1/namespaces/d/pods/p/status")
            .body(())
            .unwrap();
        assert_eq!(method_label(&patch), "PATCH");
    }

    /// Requests through the layer wait for tokens in order, each one is counted with its
    /// response code, and the wait is recorded. On the real clock (the bucket's), so only the
    /// lower bound is asserted.
    #[tokio::test]
    async fn the_layer_holds_requests_to_the_rate_and_counts_them() {
        use tower::ServiceExt;
        let counts = Arc::new(ApiRequests::default());
        let layer = ApiRequestLayer::new(TokenBucket::new(50.0, 2).unwrap(), counts.clone());
        let inner = tower::service_fn(|req: Request<()>| async move {
            let code = if req.method() == http::Method::DELETE {
                404
            } else {
                200
            };
            Ok::<_, std::convert::Infallible>(Response::builder().status(code).body(()).unwrap())
        });
        let mut svc = layer.layer(inner);
        let started = std::time::Instant::now();
        for i in 0..6 {
            let req = if i == 5 {
                Request::delete("/api/v1/namespaces/d/pods/gone").body(())
            } else {
                Request::get("/api/v1/pods?watch=true").body(())
            }
            .unwrap();
            let resp = svc.ready().await.unwrap().call(req).await.unwrap();
            assert!(resp.status().is_success() || i == 5);
        }
        // Two at once, then four more at 50 per second: at least 80 ms.
        assert!(
            started.elapsed() >= Duration::from_millis(75),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            counts.snapshot(),
            vec![("DELETE", Some(404), 1), ("WATCH", Some(200), 5)]
        );
        assert_eq!(counts.throttled.load(Ordering::Relaxed), 4);
        assert!(counts.throttled_micros.load(Ordering::Relaxed) >= 60_000);
    }
}
