//! What operators and Kubernetes ask cloudcore: `/healthz` (the process serves requests; the
//! liveness probe), `/readyz` (CloudHub listens and the controllers finished their first lists,
//! so what cloudcore sends reflects the cluster; the readiness probe) and `/metrics`
//! (Prometheus text, encoded by prometheus-client from counters the modules keep anyway — read
//! at scrape time, so the hot paths pay one atomic add and nothing else).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kedge_common::http::Body;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cloudhub::CloudHubHandle;
use crate::edgecontroller::Stats;
use crate::kubeclient::ApiRequests;

/// What `/metrics` reads: the controllers' counters, CloudHub's, and the Kubernetes client's.
#[derive(Clone)]
pub struct Observed {
    pub stats: Arc<Stats>,
    pub hub: CloudHubHandle,
    pub api: Arc<ApiRequests>,
}

/// Reads cloudcore's counters at scrape time.
#[derive(Clone)]
struct CloudCoreCollector {
    stats: Arc<Stats>,
    hub: CloudHubHandle,
    api: Arc<ApiRequests>,
}

impl std::fmt::Debug for CloudCoreCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CloudCoreCollector")
    }
}

fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    series: &[(&[(&str, &str)], u64)],
) -> Result<(), std::fmt::Error> {
    let probe = ConstCounter::new(0u64);
    let mut family = encoder.encode_descriptor(name, help, None, probe.metric_type())?;
    if let [(labels, value)] = series
        && labels.is_empty()
    {
        return ConstCounter::new(*value).encode(family);
    }
    for (labels, value) in series {
        let metric = family.encode_family(labels)?;
        ConstCounter::new(*value).encode(metric)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(metric)
}

impl Collector for CloudCoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let hub = self.hub.counters();
        gauge(
            &mut encoder,
            "kedge_cloudcore_connected_nodes",
            "Edge nodes with an open session on this cloudcore.",
            i64::try_from(self.hub.connected_count()).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "kedge_cloudcore_queued_messages",
            "Messages waiting to be sent to, or acknowledged by, edge nodes (all nodes).",
            i64::try_from(self.hub.outstanding_total()).unwrap_or(i64::MAX),
        )?;
        gauge(
            &mut encoder,
            "kedge_cloudcore_leader",
            "1 while this replica runs the cluster-wide controllers (leader election).",
            i64::from(s.leader.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut encoder,
            "kedge_cloudcore_ready",
            "1 once the controllers finished their first lists.",
            i64::from(s.initial_sync_done.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut encoder,
            "kedge_cloudcore_messages",
            "Messages to edge nodes: queued by the controllers, skipped because the node holds \
             that version, acknowledged by the node, refused by the node (sent again later).",
            &[
                (&[("result", "queued")], get(&s.queued)),
                (&[("result", "unchanged")], get(&s.unchanged)),
                (&[("result", "acked")], hub.acked),
                (&[("result", "refused")], hub.refused),
            ],
        )?;
        counter(
            &mut encoder,
            "kedge_cloudcore_reports",
            "Reports from edge nodes written to the cluster, by kind and result.",
            &[
                (
                    &[("kind", "podstatus"), ("result", "applied")],
                    get(&s.pod_status_applied),
                ),
                (
                    &[("kind", "podstatus"), ("result", "refused")],
                    get(&s.pod_status_refused),
                ),
                (
                    &[("kind", "device"), ("result", "applied")],
                    get(&s.device_reports_applied),
                ),
                (
                    &[("kind", "device"), ("result", "refused")],
                    get(&s.device_reports_refused),
                ),
            ],
        )?;
        counter(
            &mut encoder,
            "kedge_cloudcore_lease_renewals",
            "Node Leases renewed on behalf of connected nodes.",
            &[(&[], get(&s.lease_renewals))],
        )?;
        counter(
            &mut encoder,
            "kedge_cloudcore_inventories_reconciled",
            "Edge inventories compared with what the node must hold (one per reconnect).",
            &[(&[], get(&s.inventories_reconciled))],
        )?;
        counter(
            &mut encoder,
            "kedge_cloudcore_sessions",
            "Edge node sessions started.",
            &[(&[], hub.sessions)],
        )?;
        let requests: Vec<(&'static str, String, u64)> = self
            .api
            .snapshot()
            .into_iter()
            .map(|(method, code, n)| {
                let code = code.map_or_else(|| "<error>".to_owned(), |c| c.to_string());
                (method, code, n)
            })
            .collect();
        let labels: Vec<[(&str, &str); 2]> = requests
            .iter()
            .map(|(method, code, _)| [("method", *method), ("code", code.as_str())])
            .collect();
        let series: Vec<(&[(&str, &str)], u64)> = labels
            .iter()
            .zip(&requests)
            .map(|(l, (_, _, n))| (l.as_slice(), *n))
            .collect();
        counter(
            &mut encoder,
            "kedge_cloudcore_api_requests",
            "Requests to the Kubernetes API by method (a watch is WATCH) and response code \
             (<error> when no response came).",
            &series,
        )?;
        counter(
            &mut encoder,
            "kedge_cloudcore_api_throttled_requests",
            "Requests that waited for the client-side rate limit (kubeAPIConfig.qps/burst).",
            &[(&[], get(&self.api.throttled))],
        )?;
        let waited = get(&self.api.throttled_micros);
        let metric = encoder.encode_descriptor(
            "kedge_cloudcore_api_throttled_seconds",
            "Time requests waited for the client-side rate limit.",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        ConstCounter::new(waited as f64 / 1e6).encode(metric)?;
        Ok(())
    }
}

/// The `/metrics` text for the current counters.
pub fn render_metrics(observed: Observed) -> Result<String, std::fmt::Error> {
    let Observed { stats, hub, api } = observed;
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CloudCoreCollector { stats, hub, api }));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listener` until `shutdown`.
pub fn serve(
    listener: TcpListener,
    observed: Observed,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    kedge_common::http::serve(listener, shutdown, move |req| {
        let observed = observed.clone();
        let stats = observed.stats.clone();
        async move {
            match req.uri().path() {
                "/healthz" | "/livez" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
                "/readyz" => {
                    if stats.initial_sync_done.load(Ordering::Relaxed) {
                        text(StatusCode::OK, "ok\n".into(), "text/plain")
                    } else {
                        text(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "the controllers have not finished their first lists\n".into(),
                            "text/plain",
                        )
                    }
                }
                "/metrics" => match render_metrics(observed) {
                    Ok(body) => text(
                        StatusCode::OK,
                        body,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("encoding metrics: {e}\n"),
                        "text/plain",
                    ),
                },
                _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
            }
        }
    })
}

/// Binds the observability listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudhub::{CloudHub, HubSettings};

    #[test]
    fn metrics_are_prometheus_text_from_the_live_counters() {
        let (hub, _upstream) = CloudHub::new(
            HubSettings::default(),
            8,
            std::sync::Arc::new(crate::nodeidentity::memory::MemoryIdentities::default()),
        );
        let stats = Arc::new(Stats::default());
        stats.queued.fetch_add(7, Ordering::Relaxed);
        stats.pod_status_refused.fetch_add(2, Ordering::Relaxed);
        let api = Arc::new(ApiRequests::default());
        api.throttled.fetch_add(3, Ordering::Relaxed);
        api.throttled_micros.fetch_add(1_500_000, Ordering::Relaxed);
        let observed = Observed {
            stats: stats.clone(),
            hub: hub.handle(),
            api,
        };
        let text = render_metrics(observed.clone()).unwrap();
        for line in [
            "# TYPE kedge_cloudcore_connected_nodes gauge",
            "kedge_cloudcore_connected_nodes 0",
            "kedge_cloudcore_ready 0",
            "# TYPE kedge_cloudcore_messages counter",
            "kedge_cloudcore_messages_total{result=\"queued\"} 7",
            "kedge_cloudcore_reports_total{kind=\"podstatus\",result=\"refused\"} 2",
            "kedge_cloudcore_sessions_total 0",
            "# TYPE kedge_cloudcore_api_requests counter",
            "kedge_cloudcore_api_throttled_requests_total 3",
            "kedge_cloudcore_api_throttled_seconds_total 1.5",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing in:\n{text}"
            );
        }
        stats.initial_sync_done.store(true, Ordering::Relaxed);
        let text = render_metrics(observed).unwrap();
        assert!(text.lines().any(|l| l == "kedge_cloudcore_ready 1"));
    }
}
