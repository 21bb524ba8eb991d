//! EventBus: edgecore's MQTT side, where devices and mappers meet DeviceTwin.
//!
//! Like KubeEdge, the broker is either embedded (rumqttd, on loopback by default), an external
//! one (e.g. mosquitto), or both (`mqttMode` 0/2/1). edgecore itself is always an ordinary MQTT
//! client (rumqttc) of each broker in use, so the twin logic is the same whichever broker a mapper
//! talks to, and a mapper on the external broker sees exactly what one on the embedded broker
//! sees. rumqttd blocks and runs its own threads and runtimes: it gets a dedicated std thread and
//! never touches our runtime.
//!
//! Client connections reconnect with back-off (capped at 5 s) and subscribe again after every
//! connect (clean sessions: the broker keeps nothing for us). Twin traffic uses QoS 1.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use kedge_common::backoff::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeFilter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Largest MQTT packet either side accepts (twin documents of many properties fit easily).
pub const MAX_PACKET_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EventBusError {
    #[error("{field}: `{value}` is not an MQTT server address (tcp://host:port)")]
    BadAddress { field: &'static str, value: String },
    #[error("the embedded MQTT broker cannot listen on {addr}: {reason}")]
    Broker { addr: SocketAddr, reason: String },
    #[error("publishing to {topic}: {reason}")]
    Publish { topic: String, reason: String },
}

/// Which brokers to use (KubeEdge's `mqttMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttMode {
    /// 0: the embedded broker only.
    Internal,
    /// 1: the embedded broker and an external one.
    Both,
    /// 2: an external broker only.
    External,
}

impl MqttMode {
    pub fn from_config(mode: u8) -> MqttMode {
        match mode {
            1 => MqttMode::Both,
            2 => MqttMode::External,
            _ => MqttMode::Internal,
        }
    }
}

#[derive(Debug, Clone)]
pub struct EventBusSettings {
    pub mode: MqttMode,
    /// `tcp://host:port` of the embedded broker (it listens there).
    pub internal: String,
    /// `tcp://host:port` of the external broker.
    pub external: String,
    /// The MQTT client id prefix (the node name keeps ids unique on a shared broker).
    pub client_id: String,
    /// Topic filters to subscribe to on every broker.
    pub subscriptions: Vec<String>,
}

/// A message from a broker.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    pub payload: Bytes,
}

/// Publishes to every broker in use.
///
/// Publishing only queues: one task per EventBus hands the messages to the MQTT clients in
/// order. The clients' request queues are drained by the same loops that deliver inbound
/// messages to DeviceTwin, so a DeviceTwin that waited for room there while its inbound channel
/// was full would wait forever (a 10,000-update burst once stalled edgecore's MQTT client until
/// the broker dropped it for missing keepalives).
#[derive(Clone)]
pub struct EventBus {
    outgoing: mpsc::UnboundedSender<Outgoing>,
}

struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    qos: QoS,
    retain: bool,
}

impl EventBus {
    fn new(clients: Vec<AsyncClient>) -> EventBus {
        let (outgoing, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                for c in &clients {
                    if let Err(e) = c
                        .publish(m.topic.clone(), m.qos, m.retain, m.payload.clone())
                        .await
                    {
                        tracing::warn!(topic = %m.topic, error = %e, "cannot publish");
                    }
                }
            }
        });
        EventBus { outgoing }
    }

    /// Publishes on every broker (queued, in order). `retain`: the broker keeps the last
    /// message of the topic for subscribers that come later (how a mapper that was away gets a
    /// pending delta).
    pub fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), EventBusError> {
        self.outgoing
            .send(Outgoing {
                topic: topic.to_owned(),
                payload,
                qos,
                retain,
            })
            .map_err(|_| EventBusError::Publish {
                topic: topic.to_owned(),
                reason: "the event bus has stopped".into(),
            })
    }
}

/// Parses `tcp://host:port` (also `host:port`).
pub fn parse_server(field: &'static str, value: &str) -> Result<(String, u16), EventBusError> {
    let bad = || EventBusError::BadAddress {
        field,
        value: value.to_owned(),
    };
    let rest = value.strip_prefix("tcp://").unwrap_or(value);
    kedge_common::config::split_host_port(rest).ok_or_else(bad)
}

/// Starts the embedded broker on its own thread (the port is checked to be free first).
pub fn start_embedded_broker(addr: SocketAddr) -> Result<(), EventBusError> {
    // Fail early and clearly when the port is taken (rumqttd would only log it on its thread).
    std::net::TcpListener::bind(addr).map_err(|e| EventBusError::Broker {
        addr,
        reason: e.to_string(),
    })?;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: MAX_PACKET_BYTES,
        max_inflight_count: 500,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut v4 = HashMap::new();
    v4.insert(
        "v4".to_owned(),
        rumqttd::ServerSettings {
            name: "kedge-eventbus".to_owned(),
            listen: addr,
            tls: None,
            next_connection_delay_ms: 1,
            connections,
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            // An edge node's mappers, not a fleet: fewer slots, less preallocated state.
            max_connections: 64,
            max_outgoing_packet_count: 200,
            // Per-topic-filter log: two 64 KiB segments bound the broker's memory (subscribers
            // on loopback read far faster than that fills).
            max_segment_size: 64 * 1024,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })
        .map_err(|e| EventBusError::Broker {
            addr,
            reason: e.to_string(),
        })?;
    // Its thread binds asynchronously: the client's first connect may fail and is retried after
    // 100 ms (probing the port here would make rumqttd log an aborted connection as an error).
    Ok(())
}

/// Starts the brokers and clients the settings ask for. Inbound messages from every broker
/// arrive on the returned receiver.
pub async fn start(
    settings: EventBusSettings,
    shutdown: CancellationToken,
) -> Result<(EventBus, mpsc::Receiver<Inbound>), EventBusError> {
    let mut servers = Vec::new();
    if settings.mode != MqttMode::External {
        let (host, port) = parse_server("modules.eventBus.mqttServerInternal", &settings.internal)?;
        let addr: SocketAddr =
            format!("{host}:{port}")
                .parse()
                .map_err(|_| EventBusError::BadAddress {
                    field: "modules.eventBus.mqttServerInternal",
                    value: settings.internal.clone(),
                })?;
        tokio::task::spawn_blocking(move || start_embedded_broker(addr))
            .await
            .map_err(|e| EventBusError::Broker {
                addr,
                reason: e.to_string(),
            })??;
        tracing::info!(%addr, "embedded MQTT broker listening");
        servers.push(("internal", host, port));
    }
    if settings.mode != MqttMode::Internal {
        let (host, port) = parse_server("modules.eventBus.mqttServerExternal", &settings.external)?;
        servers.push(("external", host, port));
    }
    let (tx, rx) = mpsc::channel(1024);
    let mut clients = Vec::new();
    for (which, host, port) in servers {
        let mut opts = MqttOptions::new(format!("{}-{which}", settings.client_id), host, port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        opts.set_clean_session(true);
        opts.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(opts, 256);
        // Small packets, latency matters (a twin report is a few hundred bytes).
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        tokio::spawn(drive(
            which,
            client.clone(),
            eventloop,
            settings.subscriptions.clone(),
            tx.clone(),
            shutdown.clone(),
        ));
        clients.push(client);
    }
    Ok((EventBus::new(clients), rx))
}

/// Polls one broker connection: forwards publishes, subscribes after every connect, and waits
/// with back-off after errors (the next poll reconnects).
async fn drive(
    which: &'static str,
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    subscriptions: Vec<String>,
    tx: mpsc::Sender<Inbound>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut connected = false;
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = client.try_disconnect();
                return;
            }
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff.reset();
                connected = true;
                tracing::info!(broker = which, "connected to the MQTT broker");
                // Publishes made while disconnected may fill the request queue, which only this
                // loop drains: the subscription waits for room in a task of its own (a `try_`
                // here once lost every subscription when devices arrived before the broker).
                let filters: Vec<_> = subscriptions
                    .iter()
                    .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce))
                    .collect();
                if !filters.is_empty() {
                    let client = client.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.subscribe_many(filters).await {
                            tracing::warn!(broker = which, error = %e, "cannot subscribe");
                        }
                    });
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let msg = Inbound {
                    topic: p.topic,
                    payload: p.payload,
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    tracing::warn!(broker = which, error = %e, "MQTT connection lost; reconnecting");
                    connected = false;
                } else {
                    tracing::debug!(broker = which, error = %e, "MQTT connect failed; retrying");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses() {
        assert_eq!(
            parse_server("f", "tcp://127.0.0.1:1883").unwrap(),
            ("127.0.0.1".to_owned(), 1883)
        );
        assert_eq!(
            parse_server("f", "broker.local:8883").unwrap(),
            ("broker.local".to_owned(), 8883)
        );
        let e = parse_server("modules.eventBus.mqttServerExternal", "tcp://nohost").unwrap_err();
        assert!(
            e.to_string()
                .contains("modules.eventBus.mqttServerExternal")
        );
        assert!(parse_server("f", "tcp://:1883").is_err());
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Another MQTT client of the broker on `port`, polled in the background.
    fn peer(name: &str, port: u16, inflight: u16, cap: usize) -> AsyncClient {
        let mut opts = MqttOptions::new(name, "127.0.0.1", port);
        opts.set_inflight(inflight);
        let (peer, mut peer_loop) = AsyncClient::new(opts, cap);
        tokio::spawn(async move {
            loop {
                if peer_loop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        peer
    }

    /// Publishes made before the broker is up fill the client's request queue; the
    /// subscriptions made on connect must still happen (they were once dropped as "queue full").
    #[tokio::test]
    async fn subscribes_even_when_publishes_queued_up_while_the_broker_was_away() {
        let port = free_port();
        let shutdown = CancellationToken::new();
        let settings = EventBusSettings {
            mode: MqttMode::External,
            internal: String::new(),
            external: format!("tcp://127.0.0.1:{port}"),
            client_id: "queued".into(),
            subscriptions: vec!["kedge/test/in".into()],
        };
        let (bus, mut rx) = start(settings, shutdown.clone()).await.unwrap();
        let publisher = tokio::spawn(async move {
            for i in 0..600 {
                bus.publish("kedge/test/out", vec![i as u8], QoS::AtLeastOnce, false)
                    .unwrap();
            }
        });
        // Long enough for the queue to fill up while nothing listens.
        tokio::time::sleep(Duration::from_millis(300)).await;
        start_embedded_broker(format!("127.0.0.1:{port}").parse().unwrap()).unwrap();

        let peer = peer("queued-test-peer", port, 100, 16);
        let got = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                peer.publish("kedge/test/in", QoS::AtLeastOnce, false, "hi")
                    .await
                    .unwrap();
                let wait = tokio::time::sleep(Duration::from_millis(200));
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        m = rx.recv() => {
                            let m = m.expect("event bus stopped");
                            if m.topic == "kedge/test/in" {
                                return;
                            }
                        }
                        _ = &mut wait => break,
                    }
                }
            }
        })
        .await;
        assert!(
            got.is_ok(),
            "the subscription made on connect never took effect"
        );
        publisher.await.unwrap();
        shutdown.cancel();
    }

    /// DeviceTwin publishes while it has not yet read what arrived: with the inbound channel
    /// full, publishing must not wait for the MQTT client (whose loop waits for DeviceTwin).
    #[tokio::test]
    async fn publishing_never_waits_for_the_inbound_side() {
        let port = free_port();
        let shutdown = CancellationToken::new();
        let settings = EventBusSettings {
            mode: MqttMode::Internal,
            internal: format!("tcp://127.0.0.1:{port}"),
            external: String::new(),
            client_id: "busy".into(),
            subscriptions: vec!["kedge/flood".into()],
        };
        let (bus, mut rx) = start(settings, shutdown.clone()).await.unwrap();
        let peer = peer("flooder", port, 1000, 4000);
        // The first message through shows the subscription is in place.
        let first = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                peer.publish("kedge/flood", QoS::AtLeastOnce, false, "start")
                    .await
                    .unwrap();
                if let Ok(Some(_)) =
                    tokio::time::timeout(Duration::from_millis(200), rx.recv()).await
                {
                    return;
                }
            }
        })
        .await;
        assert!(first.is_ok(), "never subscribed");
        // Fill the inbound channel (1,024) and more, then publish a lot before reading any.
        for i in 0..3000 {
            peer.publish("kedge/flood", QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in 0..2000 {
            bus.publish("kedge/out", vec![i as u8], QoS::AtLeastOnce, false)
                .unwrap();
        }
        let mut last = String::new();
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            while last != "2999" {
                let m = rx.recv().await.expect("event bus stopped");
                last = String::from_utf8_lossy(&m.payload).into_owned();
            }
        })
        .await;
        assert!(drained.is_ok(), "inbound stalled at {last}");
        shutdown.cancel();
    }
}
