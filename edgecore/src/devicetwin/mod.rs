//! DeviceTwin: the node's devices between the cloud and the mappers.
//!
//! Like edged, DeviceTwin reads Devices and DeviceModels **only from the local store**
//! (MetaManager's change feed), so desired values work the same online, offline and after a
//! restart; the cloud's membership messages are for KubeEdge's edge and are not needed here.
//! Mappers talk MQTT through the EventBus (KubeEdge's `$hw/events/…` topics). Reported values
//! and states go to the cloud through the durable outbox — one entry per device property, so
//! while offline the latest value of each property waits and nothing else piles up.
//!
//! The logic lives in [`twin`] (no I/O, time passed in); this module feeds it and carries out its
//! effects: publishing, saving twins in batches ([`store`]), queueing reports.

pub mod dmi;
pub mod store;
pub mod twin;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, RwLock};

use kedge_common::crd::{Device, DeviceModel};
use kedge_common::devices::{self, topics};
use kedge_common::message::now_millis;
use kedge_common::{Message, Operation};
use rumqttc::QoS;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::edgehub::outbox::Outbox;
use crate::eventbus::{EventBus, Inbound};
use crate::metamanager::sqlite::SqliteStore;
pub use dmi::{DeviceView, Dmi, LocalReport};
use store::TwinStore;
use twin::{Effect, Twins};

/// Mapper messages handled before their effects are written out together.
const BATCH: usize = 256;

/// The MQTT filters DeviceTwin and the upload bridge need.
pub fn subscriptions() -> Vec<String> {
    vec![
        topics::DEVICE_FILTER.to_owned(),
        topics::DEVICE_STATE_FILTER.to_owned(),
        topics::NODE_FILTER.to_owned(),
        topics::UPLOAD_FILTER.to_owned(),
    ]
}

type NsName = (String, String);

/// What DeviceTwin knows of the store's devices and models (shared with DMI, which hands
/// them to mappers).
struct Known {
    node: String,
    view: Arc<RwLock<DeviceView>>,
}

impl DeviceView {
    fn model_of(&self, d: &Device) -> Option<&DeviceModel> {
        let name = d.spec.device_model_ref.as_ref()?.name.clone()?;
        self.models
            .get(&(d.metadata.namespace.clone().unwrap_or_default(), name))
    }

    fn users_of(&self, key: &NsName) -> Vec<String> {
        self.devices
            .iter()
            .filter(|(_, d)| {
                d.metadata.namespace.as_deref() == Some(key.0.as_str())
                    && d.spec
                        .device_model_ref
                        .as_ref()
                        .and_then(|r| r.name.as_deref())
                        == Some(key.1.as_str())
            })
            .map(|(id, _)| id.clone())
            .collect()
    }
}

impl Known {
    fn is_ours(&self, d: &Device) -> bool {
        d.spec.node_name.as_deref().is_none_or(|n| n == self.node)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, DeviceView> {
        self.view.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which device DMI mappers must hear about after a change.
enum MapperNote {
    Changed(String),
    Removed(String),
}

pub struct DeviceTwinModule<O: Outbox> {
    pub node: String,
    pub store: SqliteStore,
    pub outbox: Arc<O>,
    pub twins: TwinStore,
    pub bus: EventBus,
    /// The devices as DeviceTwin knows them (DMI reads them).
    pub view: Arc<RwLock<DeviceView>>,
    /// DMI, when mappers may use it.
    pub dmi: Option<Dmi>,
    /// How cloud messages of the `user` group are published (`eventBus.mqttQOS` and
    /// `mqttRetain`, as KubeEdge's EventBus); twin traffic is always QoS 1, not retained.
    pub user_publish: UserPublish,
}

/// QoS and retain flag for cloud messages published to user topics.
#[derive(Debug, Clone, Copy)]
pub struct UserPublish {
    pub qos: QoS,
    pub retain: bool,
}

impl UserPublish {
    /// From `eventBus.mqttQOS` (0, 1 or 2; validated with the config) and `mqttRetain`.
    pub fn from_config(qos: u8, retain: bool) -> Self {
        let qos = match qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            _ => QoS::ExactlyOnce,
        };
        UserPublish { qos, retain }
    }
}

impl<O: Outbox> DeviceTwinModule<O> {
    /// Runs until `shutdown`. `inbound`: MQTT messages; `cloud`: messages of the `twin` and `user`
    /// groups from the cloud.
    pub async fn run(
        self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut cloud: mpsc::Receiver<Message>,
        mut local: mpsc::Receiver<LocalReport>,
        shutdown: CancellationToken,
    ) {
        let saved = match self.twins.load().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the device twin database; twins start empty");
                BTreeMap::new()
            }
        };
        let mut twins = Twins::new(&self.node, saved);
        let known = Known {
            node: self.node.clone(),
            view: self.view.clone(),
        };
        'follow: loop {
            // Subscribed first, then read: no change between the two is missed. Only devices and
            // models are read, not the node's pods and ConfigMaps.
            let listed = async {
                let (mut rows, _, changes) = self.store.follow(Some("devicemodel")).await?;
                rows.extend(self.store.list(Some("device"), None).await?.0);
                Ok::<_, crate::metamanager::store::StoreError>((rows, changes))
            };
            let (rows, mut changes) = match listed.await {
                Ok(f) => f,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read devices from the local store; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => continue 'follow,
                    }
                }
            };
            // A (re)list: models first, then devices; twins of devices gone meanwhile go too.
            let mut effects = Vec::new();
            let mut notes = Vec::new();
            {
                let mut view = known.write();
                view.devices.clear();
                view.models.clear();
                for r in rows.iter().filter(|r| r.kind == "devicemodel") {
                    match serde_json::from_value::<DeviceModel>(r.object.content.clone()) {
                        Ok(m) => {
                            view.models.insert((r.namespace.clone(), r.name.clone()), m);
                        }
                        Err(e) => {
                            tracing::error!(namespace = %r.namespace, name = %r.name, error = %e, "stored DeviceModel unreadable")
                        }
                    }
                }
                let now = now_millis();
                for r in rows.iter().filter(|r| r.kind == "device") {
                    match serde_json::from_value::<Device>(r.object.content.clone()) {
                        Ok(d) if known.is_ours(&d) => {
                            let id = devices::device_id(&r.namespace, &r.name);
                            effects.extend(twins.device_synced(&d, view.model_of(&d), now));
                            view.devices.insert(id.clone(), d);
                            notes.push(MapperNote::Changed(id));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(namespace = %r.namespace, name = %r.name, error = %e, "stored Device unreadable")
                        }
                    }
                }
                for id in twins.ids() {
                    if !view.devices.contains_key(&id) {
                        effects.extend(twins.device_removed(&id, now));
                        notes.push(MapperNote::Removed(id));
                    }
                }
            }
            self.carry_out(&twins, effects).await;
            self.tell_mappers(notes);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    change = changes.recv() => match change {
                        Ok(c) => {
                            let (effects, notes) = self.on_change(&mut twins, &known, &c);
                            self.carry_out(&twins, effects).await;
                            self.tell_mappers(notes);
                        }
                        Err(RecvError::Lagged(_)) => continue 'follow,
                        Err(RecvError::Closed) => return,
                    },
                    msg = inbound.recv() => {
                        let Some(msg) = msg else { return };
                        let mut effects = self.on_mqtt(&mut twins, msg);
                        // Whatever else is waiting joins this batch (one transaction, one flush).
                        for _ in 0..BATCH {
                            match inbound.try_recv() {
                                Ok(m) => effects.extend(self.on_mqtt(&mut twins, m)),
                                Err(_) => break,
                            }
                        }
                        self.carry_out(&twins, effects).await;
                    }
                    report = local.recv() => {
                        let Some(report) = report else { continue };
                        let result_topic = format!("{}/result", report.topic);
                        let inbound = Inbound { topic: report.topic, payload: report.payload.into() };
                        let effects = self.on_mqtt(&mut twins, inbound);
                        let verdict = effects.iter().find_map(|e| match e {
                            Effect::Publish { topic, payload, .. } if *topic == result_topic => {
                                serde_json::from_slice::<devices::ResultMessage>(payload).ok()
                            }
                            _ => None,
                        });
                        self.carry_out(&twins, effects).await;
                        let _ = report.reply.send(verdict.unwrap_or(devices::ResultMessage {
                            code: 400,
                            reason: "not a device report".into(),
                            ..Default::default()
                        }));
                    }
                    msg = cloud.recv() => {
                        if let Some(msg) = msg {
                            self.on_cloud(msg).await;
                        }
                    }
                }
            }
        }
    }

    fn on_change(
        &self,
        twins: &mut Twins,
        known: &Known,
        c: &crate::metamanager::sqlite::Change,
    ) -> (Vec<Effect>, Vec<MapperNote>) {
        let now = now_millis();
        if c.kind != "device" && c.kind != "devicemodel" {
            return (Vec::new(), Vec::new());
        }
        let mut view = known.write();
        match c.kind.as_str() {
            "device" => {
                let id = devices::device_id(&c.namespace, &c.name);
                if c.deleted {
                    view.devices.remove(&id);
                    return (
                        twins.device_removed(&id, now),
                        vec![MapperNote::Removed(id)],
                    );
                }
                match serde_json::from_value::<Device>(c.object.clone()) {
                    Ok(d) if known.is_ours(&d) => {
                        let effects = twins.device_synced(&d, view.model_of(&d), now);
                        view.devices.insert(id.clone(), d);
                        (effects, vec![MapperNote::Changed(id)])
                    }
                    Ok(_) => {
                        view.devices.remove(&id);
                        (
                            twins.device_removed(&id, now),
                            vec![MapperNote::Removed(id)],
                        )
                    }
                    Err(e) => {
                        tracing::error!(device = %id, error = %e, "stored Device unreadable");
                        (Vec::new(), Vec::new())
                    }
                }
            }
            "devicemodel" => {
                let key = (c.namespace.clone(), c.name.clone());
                if c.deleted {
                    view.models.remove(&key);
                    return (Vec::new(), Vec::new());
                }
                match serde_json::from_value::<DeviceModel>(c.object.clone()) {
                    Ok(m) => {
                        let users = view.users_of(&key);
                        let mut effects = twins.model_synced(&users, &m);
                        view.models.insert(key, m);
                        // Devices that waited for their model are complete now.
                        for id in &users {
                            if let Some(d) = view.devices.get(id) {
                                effects.extend(twins.device_synced(d, view.model_of(d), now));
                            }
                        }
                        (
                            effects,
                            users.into_iter().map(MapperNote::Changed).collect(),
                        )
                    }
                    Err(e) => {
                        tracing::error!(model = %c.name, error = %e, "stored DeviceModel unreadable");
                        (Vec::new(), Vec::new())
                    }
                }
            }
            _ => (Vec::new(), Vec::new()),
        }
    }

    fn tell_mappers(&self, notes: Vec<MapperNote>) {
        let Some(dmi) = &self.dmi else { return };
        for n in notes {
            match n {
                MapperNote::Changed(id) => dmi.device_changed(&id),
                MapperNote::Removed(id) => dmi.device_removed(&id),
            }
        }
    }

    fn on_mqtt(&self, twins: &mut Twins, msg: Inbound) -> Vec<Effect> {
        let now = now_millis();
        match topics::classify(&msg.topic) {
            topics::Inbound::TwinUpdate(id) => twins.mapper_twin_update(&id, &msg.payload, now),
            topics::Inbound::TwinGet(id) => twins.mapper_twin_get(&id, &msg.payload, now),
            topics::Inbound::StateUpdate(id) => twins.mapper_state_update(&id, &msg.payload, now),
            topics::Inbound::MembershipGet(node) if node == self.node => {
                twins.membership_get(&msg.payload, now)
            }
            topics::Inbound::Upload => {
                // Up to the cloud as it is (latest per topic waits while offline).
                let content = serde_json::from_slice(&msg.payload).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&msg.payload).into_owned())
                });
                let m = Message::new(
                    "eventbus",
                    "user",
                    Operation::Upload,
                    msg.topic.clone(),
                    content,
                );
                vec![Effect::Report {
                    key: format!("upload/{}", msg.topic),
                    message: Box::new(m),
                }]
            }
            _ => Vec::new(),
        }
    }

    /// `user` group messages are published to the topic named in their resource; `twin`
    /// membership messages are KubeEdge's way to tell its DeviceTwin — ours reads the store.
    async fn on_cloud(&self, msg: Message) {
        if msg.route.group == "user" {
            let payload = match &msg.content {
                serde_json::Value::String(s) => s.clone().into_bytes(),
                other => serde_json::to_vec(other).unwrap_or_default(),
            };
            if let Err(e) = self.bus.publish(
                &msg.route.resource,
                payload,
                self.user_publish.qos,
                self.user_publish.retain,
            ) {
                tracing::warn!(topic = %msg.route.resource, error = %e, "cannot publish a cloud message");
            }
        } else {
            tracing::debug!(group = %msg.route.group, resource = %msg.route.resource, "cloud twin message (devices come from the store)");
        }
    }

    async fn carry_out(&self, twins: &Twins, effects: Vec<Effect>) {
        if effects.is_empty() {
            return;
        }
        let mut saves: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut reports = Vec::new();
        for e in effects {
            match e {
                Effect::Publish {
                    topic,
                    payload,
                    retain,
                } => {
                    if let Err(e) = self.bus.publish(&topic, payload, QoS::AtLeastOnce, retain) {
                        tracing::warn!(%topic, error = %e, "cannot publish");
                    }
                }
                Effect::Save(id) | Effect::Forget(id) => {
                    if seen.insert(id.clone()) {
                        saves.push(id);
                    }
                }
                Effect::Report { key, message } => reports.push((key, message)),
            }
        }
        let batch: Vec<(String, Option<String>)> = saves
            .into_iter()
            .map(|id| {
                let text = twins.get(&id).and_then(|t| serde_json::to_string(t).ok());
                (id, text)
            })
            .collect();
        if let Err(e) = self.twins.write(batch).await {
            tracing::error!(error = %e, "cannot save device twins");
        }
        // Puts are queued in call order and committed together by the outbox's writer.
        let puts = reports
            .iter()
            .map(|(key, message)| self.outbox.put(key, (**message).clone()));
        for (r, (key, _)) in futures_util::future::join_all(puts)
            .await
            .into_iter()
            .zip(&reports)
        {
            if let Err(e) = r {
                tracing::error!(%key, error = %e, "cannot queue a device report for the cloud");
            }
        }
    }
}
