//! Devices end to end with the shipped binaries: DeviceModel + Device applied in the (test) API
//! server → cloudcore → edgecore's store → DeviceTwin → MQTT (embedded rumqttd, or external
//! mosquitto) → a mapper made of a rumqttc client in the test; and reported values back into
//! DeviceStatus, also across a cloud outage and a mapper that was away.
#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kedge_common::crd::{Device, DeviceModel, DeviceStatus, all_crds};
use kedge_e2e::apiserver::TestApiServer;
use kedge_e2e::daemons::Setup;
use kube::api::{Api, Patch, PatchParams, PostParams};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const NODE: &str = "edge-dev";
const DEVICE: &str = "thermo-1";

async fn wait_for<F, Fut>(what: &str, setup: &Setup, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for: {what}\n{}",
            setup.log_tails(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A mapper: an MQTT client subscribed to the device's delta and result topics.
struct Mapper {
    client: AsyncClient,
    events: EventLoop,
}

impl Mapper {
    async fn connect(port: u16, id: &str) -> Mapper {
        let mut opts = MqttOptions::new(id, "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 100);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => {
                    assert!(Instant::now() < deadline, "mapper cannot connect: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        client
            .subscribe(
                format!("$hw/events/device/default/{DEVICE}/twin/update/+"),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        client
            .subscribe(
                format!("$hw/events/device/default/{DEVICE}/twin/get/result"),
                QoS::AtLeastOnce,
            )
            .await
            .unwrap();
        Mapper { client, events }
    }

    /// The next publish on a topic ending in `suffix` with a non-empty payload, within 30 s.
    async fn next(&mut self, suffix: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no message on …{suffix}");
            if let Ok(Ok(Event::Incoming(Packet::Publish(p)))) =
                tokio::time::timeout(left, self.events.poll()).await
                && p.topic.ends_with(suffix)
                && !p.payload.is_empty()
            {
                return serde_json::from_slice(&p.payload).unwrap();
            }
        }
    }

    async fn publish(&mut self, topic: String, body: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .unwrap();
        // Drive the event loop until the broker has it (PubAck).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "publish not acknowledged");
            if let Ok(Ok(Event::Incoming(Packet::PubAck(_)))) =
                tokio::time::timeout(left, self.events.poll()).await
            {
                return;
            }
        }
    }

    /// `twin/get`, asked again each second until edgecore answers (after a restart it may not
    /// have subscribed yet; nothing keeps a message nobody subscribed to).
    async fn get_twin(&mut self) -> Value {
        for _ in 0..30 {
            self.publish(
                format!("$hw/events/device/default/{DEVICE}/twin/get"),
                br#"{"event_id": "g"}"#.to_vec(),
            )
            .await;
            if let Ok(doc) =
                tokio::time::timeout(Duration::from_secs(1), self.next("/twin/get/result")).await
            {
                return doc;
            }
        }
        panic!("twin/get never answered");
    }

    async fn report(&mut self, props: Value) {
        let twin: serde_json::Map<String, Value> = props
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), json!({"actual": {"value": v}})))
            .collect();
        let body = json!({"event_id": "m", "timestamp": 0, "twin": twin});
        self.publish(
            format!("$hw/events/device/default/{DEVICE}/twin/update"),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    }
}

/// The test API server with the device CRDs, and configs for one node (daemons not started).
struct DeviceRig {
    _server: TestApiServer,
    client: kube::Client,
    dir: tempfile::TempDir,
    setup: Setup,
}

impl DeviceRig {
    async fn new() -> DeviceRig {
        kedge_common::tls::install_crypto_provider();
        let server = TestApiServer::start().await.unwrap();
        let client = server.client().unwrap();
        server.create_namespace("kubeedge").await.unwrap();
        install_crds(&client).await;
        let dir = tempfile::tempdir().unwrap();
        let setup = Setup::write(dir.path(), server.kubeconfig_path(), NODE).unwrap();
        DeviceRig {
            _server: server,
            client,
            dir,
            setup,
        }
    }
}

async fn install_crds(client: &kube::Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in all_crds() {
        api.create(&PostParams::default(), &crd).await.unwrap();
    }
}

fn model() -> DeviceModel {
    serde_json::from_value(json!({
        "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceModel",
        "metadata": {"name": "thermometer", "namespace": "default"},
        "spec": {"protocol": "virtual", "properties": [
            {"name": "temperature", "type": "DOUBLE", "accessMode": "ReadOnly", "unit": "C"},
            {"name": "setpoint", "type": "INT", "accessMode": "ReadWrite", "minimum": "5", "maximum": "35"}]}
    }))
    .unwrap()
}

fn device(setpoint: &str) -> Device {
    serde_json::from_value(json!({
        "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
        "metadata": {"name": DEVICE, "namespace": "default"},
        "spec": {"deviceModelRef": {"name": "thermometer"}, "nodeName": NODE, "properties": [
            {"name": "temperature", "reportToCloud": true},
            {"name": "setpoint", "desired": {"value": setpoint}, "reportToCloud": true}]}
    }))
    .unwrap()
}

async fn reported(api: &Api<DeviceStatus>, prop: &str) -> Option<String> {
    let ds = api.get_opt(DEVICE).await.ok()??;
    ds.status?
        .twins
        .into_iter()
        .find(|t| t.property_name.as_deref() == Some(prop))?
        .reported
        .map(|r| r.value)
}

/// A child process killed when dropped (mosquitto, the example mapper).
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The whole round trip; `external`: use a mosquitto started here instead of the embedded broker.
async fn round_trip(external: bool) {
    let rig = DeviceRig::new().await;
    let (client, setup) = (&rig.client, &rig.setup);
    let (_mosquitto, port) = if external {
        let port = kedge_e2e::procfs::free_port().unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .args(["-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        setup.use_external_broker(port).unwrap();
        (Some(ChildGuard(child)), port)
    } else {
        (None, setup.mqtt_port)
    };
    let (mut cloud, mut edge) = setup.start_both().await.unwrap();

    let models: Api<DeviceModel> = Api::namespaced(client.clone(), "default");
    let devices: Api<Device> = Api::namespaced(client.clone(), "default");
    let statuses: Api<DeviceStatus> = Api::namespaced(client.clone(), "default");
    models
        .create(&PostParams::default(), &model())
        .await
        .unwrap();
    devices
        .create(&PostParams::default(), &device("20"))
        .await
        .unwrap();

    // Membership reaches the edge; the mapper gets the desired value as a (retained) delta.
    let mut mapper = Mapper::connect(port, "mapper-1").await;
    let delta = tokio::time::timeout(Duration::from_secs(20), mapper.next("/twin/update/delta"))
        .await
        .unwrap_or_else(|_| panic!("no delta\n{}", setup.log_tails(60)));
    assert_eq!(delta["delta"]["setpoint"], "20", "{delta}");

    // Reported values reach DeviceStatus.
    mapper
        .report(json!({"temperature": "21.5", "setpoint": "20"}))
        .await;
    let result = mapper.next("/twin/update/result").await;
    assert_eq!(result["code"], 200);
    wait_for("reported temperature in DeviceStatus", setup, || async {
        reported(&statuses, "temperature").await.as_deref() == Some("21.5")
    })
    .await;
    let ds = statuses.get(DEVICE).await.unwrap();
    let owner = &ds.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Device", DEVICE)
    );

    // An invalid value is refused with an error result and never reaches the cloud.
    mapper.report(json!({"setpoint": "99"})).await;
    let result = mapper.next("/twin/update/result").await;
    assert_eq!(result["code"], 400, "{result}");

    // Reports made while the cloud is down reach DeviceStatus after it returns.
    cloud.kill();
    mapper.report(json!({"temperature": "30"})).await;
    mapper.report(json!({"temperature": "31"})).await;
    assert_eq!(mapper.next("/twin/update/result").await["code"], 200);
    cloud.start().unwrap();
    wait_for(
        "the latest offline report in DeviceStatus",
        setup,
        || async { reported(&statuses, "temperature").await.as_deref() == Some("31") },
    )
    .await;

    // A desired change while the mapper is away is delivered when it comes back.
    drop(mapper);
    let patch = json!({"spec": {"properties": [
        {"name": "temperature", "reportToCloud": true},
        {"name": "setpoint", "desired": {"value": "25"}, "reportToCloud": true}]}});
    devices
        .patch(DEVICE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut mapper = Mapper::connect(port, "mapper-2").await;
    let delta = mapper.next("/twin/update/delta").await;
    assert_eq!(delta["delta"]["setpoint"], "25", "{delta}");
    mapper.report(json!({"setpoint": "25"})).await;
    wait_for("the new setpoint reported", setup, || async {
        reported(&statuses, "setpoint").await.as_deref() == Some("25")
    })
    .await;
    let observed = statuses.get(DEVICE).await.unwrap().status.unwrap();
    let sp = observed
        .twins
        .iter()
        .find(|t| t.property_name.as_deref() == Some("setpoint"))
        .unwrap();
    assert_eq!(sp.observed_desired.as_ref().unwrap().value, "25");

    // Garbage on the twin topics: errors only; edgecore stays up and the twin is unchanged.
    for i in 0..500u32 {
        let body: Vec<u8> = (0..(i % 97)).map(|j| (i * 31 + j * 7) as u8).collect();
        mapper
            .publish(
                format!("$hw/events/device/default/{DEVICE}/twin/update"),
                body,
            )
            .await;
    }
    let doc = mapper.get_twin().await;
    assert_eq!(doc["twin"]["setpoint"]["actual"]["value"], "25", "{doc}");
    assert_eq!(doc["twin"]["temperature"]["actual"]["value"], "31", "{doc}");

    // The twin survives an edgecore restart without the cloud.
    cloud.kill();
    edge.kill();
    drop(mapper);
    edge.start().unwrap();
    let mut mapper = Mapper::connect(port, "mapper-3").await;
    let doc = mapper.get_twin().await;
    assert_eq!(doc["twin"]["setpoint"]["expected"]["value"], "25", "{doc}");
    assert_eq!(doc["twin"]["temperature"]["actual"]["value"], "31", "{doc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_twin_round_trip_with_the_embedded_broker() {
    round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_twin_round_trip_with_external_mosquitto() {
    round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_device_gets_a_warning_event_and_is_not_sent() {
    let rig = DeviceRig::new().await;
    let (client, setup) = (&rig.client, &rig.setup);
    let (_cloud, _edge) = setup.start_both().await.unwrap();
    let devices: Api<Device> = Api::namespaced(client.clone(), "default");
    // No such model.
    devices
        .create(&PostParams::default(), &device("20"))
        .await
        .unwrap();
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    wait_for("an InvalidDevice event", setup, || async {
        events.list(&Default::default()).await.is_ok_and(|l| {
            l.items.iter().any(|e| {
                e.reason.as_deref() == Some("InvalidDevice")
                    && e.note
                        .as_deref()
                        .is_some_and(|n| n.contains("does not exist"))
            })
        })
    })
    .await;
}

/// What a fake DMI mapper was told by edgecore.
#[derive(Default)]
struct MapperCalls {
    registered: Vec<String>,
    updated_desired: Vec<String>,
    removed: Vec<String>,
    models: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeMapper(std::sync::Arc<std::sync::Mutex<MapperCalls>>);

fn desired_setpoint(d: &Option<pb::Device>) -> String {
    d.as_ref()
        .and_then(|d| d.spec.as_ref())
        .and_then(|s| s.properties.iter().find(|p| p.name == "setpoint"))
        .and_then(|p| p.desired.as_ref())
        .map(|t| t.value.clone())
        .unwrap_or_default()
}

use kedge_proto::dmi::v1beta1 as pb;

#[tonic::async_trait]
impl pb::device_mapper_service_server::DeviceMapperService for FakeMapper {
    async fn register_device(
        &self,
        r: tonic::Request<pb::RegisterDeviceRequest>,
    ) -> Result<tonic::Response<pb::RegisterDeviceResponse>, tonic::Status> {
        let d = r.into_inner().device;
        let name = d.as_ref().map(|d| d.name.clone()).unwrap_or_default();
        self.0.lock().unwrap().registered.push(name.clone());
        Ok(tonic::Response::new(pb::RegisterDeviceResponse {
            device_name: name,
            device_namespace: "default".into(),
        }))
    }
    async fn remove_device(
        &self,
        r: tonic::Request<pb::RemoveDeviceRequest>,
    ) -> Result<tonic::Response<pb::RemoveDeviceResponse>, tonic::Status> {
        self.0
            .lock()
            .unwrap()
            .removed
            .push(r.into_inner().device_name);
        Ok(tonic::Response::new(pb::RemoveDeviceResponse {}))
    }
    async fn update_device(
        &self,
        r: tonic::Request<pb::UpdateDeviceRequest>,
    ) -> Result<tonic::Response<pb::UpdateDeviceResponse>, tonic::Status> {
        let sp = desired_setpoint(&r.into_inner().device);
        self.0.lock().unwrap().updated_desired.push(sp);
        Ok(tonic::Response::new(pb::UpdateDeviceResponse {}))
    }
    async fn create_device_model(
        &self,
        r: tonic::Request<pb::CreateDeviceModelRequest>,
    ) -> Result<tonic::Response<pb::CreateDeviceModelResponse>, tonic::Status> {
        let m = r.into_inner().model.map(|m| m.name).unwrap_or_default();
        self.0.lock().unwrap().models.push(m.clone());
        Ok(tonic::Response::new(pb::CreateDeviceModelResponse {
            device_model_name: m,
            device_model_namespace: "default".into(),
        }))
    }
    async fn remove_device_model(
        &self,
        _: tonic::Request<pb::RemoveDeviceModelRequest>,
    ) -> Result<tonic::Response<pb::RemoveDeviceModelResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::RemoveDeviceModelResponse {}))
    }
    async fn update_device_model(
        &self,
        _: tonic::Request<pb::UpdateDeviceModelRequest>,
    ) -> Result<tonic::Response<pb::UpdateDeviceModelResponse>, tonic::Status> {
        Ok(tonic::Response::new(pb::UpdateDeviceModelResponse {}))
    }
    async fn get_device(
        &self,
        _: tonic::Request<pb::GetDeviceRequest>,
    ) -> Result<tonic::Response<pb::GetDeviceResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed"))
    }
}

async fn dmi_client(
    socket: std::path::PathBuf,
) -> pb::device_manager_service_client::DeviceManagerServiceClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let path = socket.clone();
        let channel = tonic::transport::Endpoint::from_static("http://dmi.local")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await;
        match channel {
            Ok(c) => return pb::device_manager_service_client::DeviceManagerServiceClient::new(c),
            Err(e) => {
                assert!(Instant::now() < deadline, "DMI socket not served: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dmi_mapper_registers_reports_and_hears_about_device_changes() {
    let rig = DeviceRig::new().await;
    let (client, setup) = (&rig.client, &rig.setup);
    let (_cloud, _edge) = setup.start_both().await.unwrap();
    let models: Api<DeviceModel> = Api::namespaced(client.clone(), "default");
    let devices: Api<Device> = Api::namespaced(client.clone(), "default");
    let statuses: Api<DeviceStatus> = Api::namespaced(client.clone(), "default");
    models
        .create(&PostParams::default(), &model())
        .await
        .unwrap();
    let mut dev = device("20");
    dev.spec.protocol = Some(kedge_common::crd::ProtocolConfig {
        protocol_name: Some("virtual".into()),
        config_data: Some(serde_json::from_value(json!({"port": 502, "host": "sim"})).unwrap()),
    });
    devices.create(&PostParams::default(), &dev).await.unwrap();

    // The fake mapper serves DeviceMapperService on its own socket.
    let mapper_socket = rig.dir.path().join("mapper.sock");
    let calls = FakeMapper::default();
    let listener = tokio::net::UnixListener::bind(&mapper_socket).unwrap();
    let svc = pb::device_mapper_service_server::DeviceMapperServiceServer::new(calls.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );

    let mut dmi = dmi_client(rig.dir.path().join("edge/dmi.sock")).await;
    // Register until the device has reached the edge's store.
    let deadline = Instant::now() + Duration::from_secs(30);
    let registered = loop {
        let r = dmi
            .mapper_register(pb::MapperRegisterRequest {
                with_data: true,
                mapper: Some(pb::MapperInfo {
                    name: "virtual-mapper".into(),
                    protocol: "virtual".into(),
                    address: mapper_socket.to_str().unwrap().as_bytes().to_vec(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        if !r.device_list.is_empty() {
            break r;
        }
        assert!(Instant::now() < deadline, "{}", setup.log_tails(40));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(registered.device_list[0].name, DEVICE);
    assert_eq!(registered.model_list[0].name, "thermometer");
    assert_eq!(
        desired_setpoint(&registered.device_list.first().cloned()),
        "20"
    );
    let config = &registered.device_list[0]
        .spec
        .as_ref()
        .unwrap()
        .protocol
        .as_ref()
        .unwrap()
        .config_data
        .as_ref()
        .unwrap()
        .data;
    assert!(config.contains_key("port") && config.contains_key("host"));

    // Reports over gRPC take the MQTT path: validated, stored, in DeviceStatus.
    let twin = |name: &str, value: &str| pb::Twin {
        property_name: name.into(),
        reported: Some(pb::TwinProperty {
            value: value.into(),
            metadata: Default::default(),
        }),
        observed_desired: None,
    };
    dmi.report_device_status(pb::ReportDeviceStatusRequest {
        device_name: DEVICE.into(),
        device_namespace: "default".into(),
        reported_device: Some(pb::DeviceStatus {
            twins: vec![twin("temperature", "19.25")],
            ..Default::default()
        }),
    })
    .await
    .unwrap();
    let bad = dmi
        .report_device_status(pb::ReportDeviceStatusRequest {
            device_name: DEVICE.into(),
            device_namespace: "default".into(),
            reported_device: Some(pb::DeviceStatus {
                twins: vec![twin("setpoint", "1000")],
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad}");
    dmi.report_device_states(pb::ReportDeviceStatesRequest {
        device_name: DEVICE.into(),
        device_namespace: "default".into(),
        state: "online".into(),
    })
    .await
    .unwrap();
    wait_for("the DMI report in DeviceStatus", setup, || async {
        let state = statuses
            .get_opt(DEVICE)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.status)
            .and_then(|s| s.state);
        reported(&statuses, "temperature").await.as_deref() == Some("19.25")
            && state.as_deref() == Some("online")
    })
    .await;

    // A desired change reaches the mapper as UpdateDevice; deleting the device, RemoveDevice.
    let patch = json!({"spec": {"properties": [
        {"name": "temperature", "reportToCloud": true},
        {"name": "setpoint", "desired": {"value": "30"}, "reportToCloud": true}]}});
    devices
        .patch(DEVICE, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_for("UpdateDevice with the new setpoint", setup, || async {
        calls
            .0
            .lock()
            .unwrap()
            .updated_desired
            .contains(&"30".to_owned())
    })
    .await;
    devices.delete(DEVICE, &Default::default()).await.unwrap();
    wait_for("RemoveDevice", setup, || async {
        calls.0.lock().unwrap().removed.contains(&DEVICE.to_owned())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_mapper_moves_a_twin_towards_its_setpoint() {
    let rig = DeviceRig::new().await;
    let (client, setup) = (&rig.client, &rig.setup);
    let (_cloud, _edge) = setup.start_both().await.unwrap();
    let models: Api<DeviceModel> = Api::namespaced(client.clone(), "default");
    let devices: Api<Device> = Api::namespaced(client.clone(), "default");
    let statuses: Api<DeviceStatus> = Api::namespaced(client.clone(), "default");
    models
        .create(&PostParams::default(), &model())
        .await
        .unwrap();
    devices
        .create(&PostParams::default(), &device("23"))
        .await
        .unwrap();
    let mapper = Command::new(kedge_e2e::daemons::bin("thermometer-mapper").unwrap())
        .args([
            "--broker",
            &format!("tcp://127.0.0.1:{}", setup.mqtt_port),
            "--device",
            &format!("default/{DEVICE}"),
            "--interval-ms",
            "100",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _mapper = ChildGuard(mapper);
    wait_for(
        "temperature 23.0 and setpoint 23 reported",
        setup,
        || async {
            reported(&statuses, "temperature").await.as_deref() == Some("23.0")
                && reported(&statuses, "setpoint").await.as_deref() == Some("23")
        },
    )
    .await;
}

/// Cloud messages of the `user` group (KubeEdge's router sends them) are published to the topic
/// their resource names, with `eventBus.mqttQOS` and `mqttRetain`: a retained message reaches a
/// subscriber that comes later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_messages_for_user_topics_are_published_with_the_configured_qos_and_retain() {
    use edgecore::devicetwin::store::TwinStore;
    use edgecore::devicetwin::{DeviceTwinModule, DeviceView, UserPublish};
    use edgecore::eventbus::{EventBusSettings, MqttMode};
    use edgecore::metamanager::sqlite::SqliteStore;
    use kedge_common::{Message, Operation};
    use std::sync::{Arc, RwLock};

    let dir = tempfile::tempdir().unwrap();
    let port = kedge_e2e::procfs::free_port().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (bus, inbound) = edgecore::eventbus::start(
        EventBusSettings {
            mode: MqttMode::Internal,
            internal: format!("tcp://127.0.0.1:{port}"),
            external: String::new(),
            client_id: "edgecore-user-topics".into(),
            subscriptions: edgecore::devicetwin::subscriptions(),
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    let module = DeviceTwinModule {
        node: NODE.into(),
        store: SqliteStore::open(&dir.path().join("edge.db"))
            .await
            .unwrap(),
        outbox: Arc::new(edgecore::edgehub::outbox::MemoryOutbox::new()),
        twins: TwinStore::open(&dir.path().join("twins.db")).await.unwrap(),
        bus,
        view: Arc::new(RwLock::new(DeviceView::default())),
        dmi: None,
        user_publish: UserPublish::from_config(1, true),
    };
    let (cloud_tx, cloud_rx) = tokio::sync::mpsc::channel(8);
    let (_local_tx, local_rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(module.run(inbound, cloud_rx, local_rx, shutdown.clone()));
    let msg = Message::new(
        "router",
        "user",
        Operation::Other("publish".into()),
        "factory/line-1/alerts",
        json!({"level": "high"}),
    );
    cloud_tx.send(msg).await.unwrap();

    // Subscribed only afterwards: the broker kept it.
    let mut opts = MqttOptions::new("late-subscriber", "127.0.0.1", port);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(opts, 10);
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        let mut subscribed = false;
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) if !subscribed => {
                    // Give the publish time to reach the broker before subscribing.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    client
                        .subscribe("factory/line-1/alerts", QoS::AtLeastOnce)
                        .await
                        .unwrap();
                    subscribed = true;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => return p,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the retained user message never arrived");
    assert_eq!(got.topic, "factory/line-1/alerts");
    assert!(got.retain, "delivered as a retained message");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    let body: Value = serde_json::from_slice(&got.payload).unwrap();
    assert_eq!(body, json!({"level": "high"}));
    shutdown.cancel();
}
