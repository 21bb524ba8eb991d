//! DMI: KubeEdge's gRPC device management interface, for mappers that do not speak MQTT.
//!
//! edgecore serves `DeviceManagerService` on a unix socket: `MapperRegister` hands a mapper the
//! devices (and their models) of its protocol and remembers the mapper's own socket;
//! `ReportDeviceStatus` and `ReportDeviceStates` go through exactly the path of MQTT reports
//! (DeviceTwin validates, stores, answers, queues for the cloud) and return its verdict. When the
//! node's devices change, registered mappers of that protocol are told through their
//! `DeviceMapperService` (`CreateDeviceModel`/`UpdateDeviceModel` first, then
//! `RegisterDevice`/`UpdateDevice`/`RemoveDevice`), from a task of their own so a slow mapper
//! never holds up the twin loop.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use kedge_common::crd::{Device, DeviceModel};
use kedge_common::devices::{self, ResultMessage, topics};
use kedge_proto::dmi::v1beta1 as pb;
use pb::device_manager_service_server::{DeviceManagerService, DeviceManagerServiceServer};
use pb::device_mapper_service_client::DeviceMapperServiceClient;
use prost::Message as _;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// How long a call to a mapper may take.
const MAPPER_TIMEOUT: Duration = Duration::from_secs(5);

/// A report from a DMI mapper, handed to DeviceTwin's loop as the MQTT message it stands for.
pub struct LocalReport {
    pub topic: String,
    pub payload: Vec<u8>,
    pub reply: oneshot::Sender<ResultMessage>,
}

/// The node's devices and models as DeviceTwin knows them (shared with the DMI server).
#[derive(Default)]
pub struct DeviceView {
    pub devices: HashMap<String, Device>,
    pub models: HashMap<(String, String), DeviceModel>,
}

struct Mapper {
    protocol: String,
    socket: PathBuf,
    /// Devices this mapper was given (registered or returned by `MapperRegister`).
    devices: HashSet<String>,
}

/// DMI: the server for mappers and the notifier towards them.
#[derive(Clone)]
pub struct Dmi {
    view: Arc<RwLock<DeviceView>>,
    reports: mpsc::Sender<LocalReport>,
    mappers: Arc<Mutex<HashMap<String, Mapper>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `protocolName` of a device.
fn protocol_of(d: &Device) -> String {
    d.spec
        .protocol
        .as_ref()
        .and_then(|p| p.protocol_name.clone())
        .unwrap_or_default()
}

/// A free-form JSON map as DMI's `CustomizedValue`: each value packed as a
/// `google.protobuf.StringValue` (strings as they are, anything else as its JSON text).
fn customized(map: Option<&serde_json::Map<String, Value>>) -> Option<pb::CustomizedValue> {
    let map = map?;
    let data = map
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (
                k.clone(),
                prost_types::Any {
                    type_url: "type.googleapis.com/google.protobuf.StringValue".into(),
                    value: text.encode_to_vec(),
                },
            )
        })
        .collect();
    Some(pb::CustomizedValue { data })
}

/// A DeviceModel in DMI's form.
pub fn model_to_pb(m: &DeviceModel) -> pb::DeviceModel {
    let to_s = |v: &Option<String>| v.clone().unwrap_or_default();
    pb::DeviceModel {
        name: m.metadata.name.clone().unwrap_or_default(),
        namespace: m.metadata.namespace.clone().unwrap_or_default(),
        spec: Some(pb::DeviceModelSpec {
            properties: m
                .spec
                .properties
                .iter()
                .map(|p| pb::ModelProperty {
                    name: to_s(&p.name),
                    description: to_s(&p.description),
                    r#type: p
                        .property_type
                        .and_then(|t| serde_json::to_value(t).ok())
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    access_mode: p
                        .access_mode
                        .and_then(|t| serde_json::to_value(t).ok())
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    minimum: to_s(&p.minimum),
                    maximum: to_s(&p.maximum),
                    unit: to_s(&p.unit),
                })
                .collect(),
            commands: Vec::new(),
        }),
    }
}

/// A Device in DMI's form.
pub fn device_to_pb(d: &Device) -> pb::Device {
    pb::Device {
        name: d.metadata.name.clone().unwrap_or_default(),
        namespace: d.metadata.namespace.clone().unwrap_or_default(),
        spec: Some(pb::DeviceSpec {
            device_model_reference: d
                .spec
                .device_model_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .unwrap_or_default(),
            protocol: d.spec.protocol.as_ref().map(|p| pb::ProtocolConfig {
                protocol_name: p.protocol_name.clone().unwrap_or_default(),
                config_data: customized(p.config_data.as_ref()),
            }),
            properties: d
                .spec
                .properties
                .iter()
                .map(|p| pb::DeviceProperty {
                    name: p.name.clone().unwrap_or_default(),
                    desired: p.desired.as_ref().map(|t| pb::TwinProperty {
                        value: t.value.clone(),
                        metadata: t.metadata.clone().into_iter().collect(),
                    }),
                    visitors: p.visitors.as_ref().map(|v| pb::VisitorConfig {
                        protocol_name: v.protocol_name.clone().unwrap_or_default(),
                        config_data: customized(v.config_data.as_ref()),
                    }),
                    report_cycle: p.report_cycle.unwrap_or_default(),
                    collect_cycle: p.collect_cycle.unwrap_or_default(),
                    report_to_cloud: p.report_to_cloud.unwrap_or_default(),
                    push_method: None,
                })
                .collect(),
            methods: d
                .spec
                .methods
                .iter()
                .map(|m| pb::DeviceMethod {
                    name: m.name.clone().unwrap_or_default(),
                    description: m.description.clone().unwrap_or_default(),
                    property_names: m.property_names.clone(),
                })
                .collect(),
        }),
        status: None,
    }
}

async fn connect_mapper(socket: &Path) -> Result<DeviceMapperServiceClient<Channel>, String> {
    let channel = crate::unix_grpc::channel(socket, Some(MAPPER_TIMEOUT))
        .await
        .map_err(|e| e.to_string())?;
    Ok(DeviceMapperServiceClient::new(channel))
}

impl Dmi {
    pub fn new(view: Arc<RwLock<DeviceView>>, reports: mpsc::Sender<LocalReport>) -> Self {
        Dmi {
            view,
            reports,
            mappers: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Serves `DeviceManagerService` on `socket` (replacing a stale socket file) until `shutdown`.
    pub async fn serve(self, socket: PathBuf, shutdown: CancellationToken) -> std::io::Result<()> {
        if let Some(dir) = socket.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        match tokio::fs::remove_file(&socket).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(&socket)?;
        tracing::info!(socket = %socket.display(), "DMI listening for mappers");
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
        tonic::transport::Server::builder()
            .add_service(DeviceManagerServiceServer::new(self))
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled())
            .await
            .map_err(std::io::Error::other)
    }

    /// Hands a report to DeviceTwin and waits for its verdict.
    async fn report(&self, topic: String, payload: Vec<u8>) -> Result<(), Status> {
        let (reply, answer) = oneshot::channel();
        self.reports
            .send(LocalReport {
                topic,
                payload,
                reply,
            })
            .await
            .map_err(|_| Status::unavailable("DeviceTwin is not running"))?;
        let result = answer
            .await
            .map_err(|_| Status::unavailable("DeviceTwin did not answer"))?;
        match result.code {
            200 => Ok(()),
            404 => Err(Status::not_found(result.reason)),
            _ => Err(Status::invalid_argument(result.reason)),
        }
    }

    /// A device of the node was added or changed: mappers of its protocol learn about it.
    pub fn device_changed(&self, id: &str) {
        let (device, model) = {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            let Some(d) = view.devices.get(id).cloned() else {
                return;
            };
            let model = d
                .spec
                .device_model_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .and_then(|m| {
                    view.models
                        .get(&(d.metadata.namespace.clone().unwrap_or_default(), m))
                        .cloned()
                });
            (d, model)
        };
        let protocol = protocol_of(&device);
        let targets: Vec<(String, PathBuf, bool)> = lock(&self.mappers)
            .iter_mut()
            .filter(|(_, m)| m.protocol == protocol)
            .map(|(name, m)| {
                let known = !m.devices.insert(id.to_owned());
                (name.clone(), m.socket.clone(), known)
            })
            .collect();
        for (name, socket, known) in targets {
            let device = device_to_pb(&device);
            let model = model.as_ref().map(model_to_pb);
            tokio::spawn(async move {
                let result = async {
                    let mut client = connect_mapper(&socket).await?;
                    if let Some(model) = model {
                        let r = if known {
                            client
                                .update_device_model(pb::UpdateDeviceModelRequest {
                                    model: Some(model),
                                })
                                .await
                                .map(|_| ())
                        } else {
                            client
                                .create_device_model(pb::CreateDeviceModelRequest {
                                    model: Some(model),
                                })
                                .await
                                .map(|_| ())
                        };
                        r.map_err(|e| e.to_string())?;
                    }
                    if known {
                        client
                            .update_device(pb::UpdateDeviceRequest {
                                device: Some(device),
                            })
                            .await
                            .map(|_| ())
                    } else {
                        client
                            .register_device(pb::RegisterDeviceRequest {
                                device: Some(device),
                            })
                            .await
                            .map(|_| ())
                    }
                    .map_err(|e| e.to_string())
                }
                .await;
                if let Err(e) = result {
                    tracing::warn!(mapper = %name, error = %e, "cannot tell the mapper about a device");
                }
            });
        }
    }

    /// A device left the node: mappers that had it remove it.
    pub fn device_removed(&self, id: &str) {
        let Some((ns, name)) = devices::split_device_id(id) else {
            return;
        };
        let request = pb::RemoveDeviceRequest {
            device_name: name.to_owned(),
            device_namespace: ns.to_owned(),
        };
        let targets: Vec<(String, PathBuf)> = lock(&self.mappers)
            .iter_mut()
            .filter_map(|(n, m)| m.devices.remove(id).then(|| (n.clone(), m.socket.clone())))
            .collect();
        for (mapper, socket) in targets {
            let request = request.clone();
            tokio::spawn(async move {
                let result = async {
                    let mut client = connect_mapper(&socket).await?;
                    client
                        .remove_device(request)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                .await;
                if let Err(e) = result {
                    tracing::warn!(%mapper, error = %e, "cannot tell the mapper a device was removed");
                }
            });
        }
    }
}

#[tonic::async_trait]
impl DeviceManagerService for Dmi {
    async fn mapper_register(
        &self,
        request: Request<pb::MapperRegisterRequest>,
    ) -> Result<Response<pb::MapperRegisterResponse>, Status> {
        let req = request.into_inner();
        let info = req
            .mapper
            .ok_or_else(|| Status::invalid_argument("mapper is required"))?;
        if info.name.is_empty() || info.protocol.is_empty() {
            return Err(Status::invalid_argument(
                "mapper.name and mapper.protocol are required",
            ));
        }
        let socket = PathBuf::from(
            String::from_utf8(info.address.clone())
                .map_err(|_| Status::invalid_argument("mapper.address is not UTF-8"))?,
        );
        let (devices, models) = {
            let view = self.view.read().unwrap_or_else(|p| p.into_inner());
            let devices: Vec<(String, &Device)> = view
                .devices
                .iter()
                .filter(|(_, d)| protocol_of(d) == info.protocol)
                .map(|(id, d)| (id.clone(), d))
                .collect();
            let mut models: Vec<pb::DeviceModel> = Vec::new();
            let mut seen = HashSet::new();
            for (_, d) in &devices {
                if let Some(m) = d
                    .spec
                    .device_model_ref
                    .as_ref()
                    .and_then(|r| r.name.clone())
                {
                    let key = (d.metadata.namespace.clone().unwrap_or_default(), m);
                    if seen.insert(key.clone())
                        && let Some(model) = view.models.get(&key)
                    {
                        models.push(model_to_pb(model));
                    }
                }
            }
            let ids: HashSet<String> = devices.iter().map(|(id, _)| id.clone()).collect();
            let list: Vec<pb::Device> = devices.iter().map(|(_, d)| device_to_pb(d)).collect();
            ((ids, list), models)
        };
        tracing::info!(mapper = %info.name, protocol = %info.protocol, socket = %socket.display(),
            devices = devices.0.len(), "mapper registered over DMI");
        lock(&self.mappers).insert(
            info.name.clone(),
            Mapper {
                protocol: info.protocol,
                socket,
                devices: devices.0,
            },
        );
        Ok(Response::new(if req.with_data {
            pb::MapperRegisterResponse {
                model_list: models,
                device_list: devices.1,
            }
        } else {
            pb::MapperRegisterResponse::default()
        }))
    }

    async fn report_device_status(
        &self,
        request: Request<pb::ReportDeviceStatusRequest>,
    ) -> Result<Response<pb::ReportDeviceStatusResponse>, Status> {
        let req = request.into_inner();
        let id = devices::device_id(&req.device_namespace, &req.device_name);
        let twins = req.reported_device.map(|s| s.twins).unwrap_or_default();
        let twin: serde_json::Map<String, Value> = twins
            .into_iter()
            .filter_map(|t| {
                let reported = t.reported?;
                let ts = reported
                    .metadata
                    .get("timestamp")
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or_default();
                Some((
                    t.property_name,
                    json!({"actual": {"value": reported.value, "metadata": {"timestamp": ts}}}),
                ))
            })
            .collect();
        let payload = serde_json::to_vec(&json!({"event_id": "dmi", "twin": twin}))
            .map_err(|e| Status::internal(e.to_string()))?;
        self.report(topics::twin_update(&id), payload).await?;
        Ok(Response::new(pb::ReportDeviceStatusResponse {}))
    }

    async fn report_device_states(
        &self,
        request: Request<pb::ReportDeviceStatesRequest>,
    ) -> Result<Response<pb::ReportDeviceStatesResponse>, Status> {
        let req = request.into_inner();
        let id = devices::device_id(&req.device_namespace, &req.device_name);
        let payload = serde_json::to_vec(&json!({"event_id": "dmi", "state": req.state}))
            .map_err(|e| Status::internal(e.to_string()))?;
        self.report(topics::state_update(&id), payload).await?;
        Ok(Response::new(pb::ReportDeviceStatesResponse {}))
    }
}
