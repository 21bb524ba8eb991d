//! edgecore's `/metrics` (Prometheus text, prometheus-client), served by the MetaServer beside
//! its `/healthz`: whether the cloud link is up, how many reports wait in the outbox, what the
//! store holds (objects by kind, pods by phase as stored, bytes on disk) and the store's own
//! counters. Gathered at scrape time from what edgecore keeps anyway; nothing on the hot paths.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::edgehub::LinkState;
use crate::metamanager::sqlite::{SqliteOutbox, SqliteStore};

/// The sources of edgecore's metrics.
pub struct EdgeMetrics {
    store: SqliteStore,
    outbox: Arc<SqliteOutbox>,
    link: watch::Receiver<LinkState>,
}

impl std::fmt::Debug for EdgeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EdgeMetrics")
    }
}

/// One scrape's values.
#[derive(Debug, Default)]
struct Snapshot {
    connected: bool,
    outbox: u64,
    db_bytes: u64,
    objects: BTreeMap<String, u64>,
    pods: BTreeMap<String, u64>,
    transactions: u64,
    messages: u64,
    corrupt_rows: u64,
}

fn db_bytes(path: PathBuf) -> u64 {
    ["", "-wal"]
        .iter()
        .map(|suffix| {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            std::fs::metadata(p).map_or(0, |m| m.len())
        })
        .sum()
}

impl EdgeMetrics {
    pub fn new(
        store: SqliteStore,
        outbox: Arc<SqliteOutbox>,
        link: watch::Receiver<LinkState>,
    ) -> Self {
        EdgeMetrics {
            store,
            outbox,
            link,
        }
    }

    async fn snapshot(&self) -> Result<Snapshot, String> {
        let mut s = Snapshot {
            connected: *self.link.borrow() == LinkState::Connected,
            ..Default::default()
        };
        s.outbox = self
            .outbox
            .pending_count()
            .await
            .map_err(|e| e.to_string())? as u64;
        (s.objects, s.pods) = self.store.counts().await.map_err(|e| e.to_string())?;
        let path = self.store.path().to_owned();
        s.db_bytes = tokio::task::spawn_blocking(move || db_bytes(path))
            .await
            .unwrap_or(0);
        let stats = self.store.stats();
        s.transactions = stats.transactions.load(Ordering::Relaxed);
        s.messages = stats.messages.load(Ordering::Relaxed);
        s.corrupt_rows = stats.corrupt_rows.load(Ordering::Relaxed);
        Ok(s)
    }

    /// The `/metrics` text now.
    pub async fn render(&self) -> Result<String, String> {
        let snapshot = self.snapshot().await?;
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snapshot));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .map_err(|e| e.to_string())?;
        Ok(out)
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: Option<&str>,
    series: &BTreeMap<String, u64>,
) -> Result<(), std::fmt::Error> {
    let probe = ConstGauge::new(0i64);
    let mut family = encoder.encode_descriptor(name, help, None, probe.metric_type())?;
    for (value_label, v) in series {
        let g = ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX));
        match label {
            Some(l) => g.encode(family.encode_family(&[(l, value_label.as_str())])?)?,
            None => return g.encode(family),
        }
    }
    Ok(())
}

fn one(value: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([(String::new(), value)])
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        gauge(
            &mut encoder,
            "kedge_edgecore_cloud_connected",
            "1 while the link to cloudcore is up.",
            None,
            &one(u64::from(self.connected)),
        )?;
        gauge(
            &mut encoder,
            "kedge_edgecore_outbox_reports",
            "Reports waiting in the durable outbox for the cloud's acknowledgement.",
            None,
            &one(self.outbox),
        )?;
        gauge(
            &mut encoder,
            "kedge_edgecore_store_bytes",
            "Size of the SQLite database and its write-ahead log.",
            None,
            &one(self.db_bytes),
        )?;
        gauge(
            &mut encoder,
            "kedge_edgecore_store_objects",
            "Objects this node holds, by kind.",
            Some("kind"),
            &self.objects,
        )?;
        gauge(
            &mut encoder,
            "kedge_edgecore_pods",
            "Pods this node holds, by phase (as last stored).",
            Some("phase"),
            &self.pods,
        )?;
        for (name, help, v) in [
            (
                "kedge_edgecore_store_transactions",
                "Store transactions committed (group commits).",
                self.transactions,
            ),
            (
                "kedge_edgecore_store_messages",
                "Writes applied by the store's writer (cloud messages and outbox reports).",
                self.messages,
            ),
            (
                "kedge_edgecore_store_corrupt_rows",
                "Rows the store could not decode (reported, skipped).",
                self.corrupt_rows,
            ),
        ] {
            let c = ConstCounter::new(v);
            let metric = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(metric)?;
        }
        Ok(())
    }
}
