//! Reported twins and device state from the edge, written into the DeviceStatus of the device
//! (`devices.kubeedge.io/v1beta1`, same name as the Device, owned by it so it goes with it).
//!
//! A report changes only the properties it names: the writer keeps each DeviceStatus it wrote
//! (read once, then its own copy) and patches the status subresource with the whole twin list,
//! because a JSON merge patch replaces lists. Reports of one node arrive through that node's
//! report worker in order, and a device has one hosting node, so no two writers race on one
//! DeviceStatus. Only the node hosting a device may report for it.

use std::collections::HashMap;

use kedge_common::crd::{DeviceStatus, DeviceStatusStatus, Twin, TwinProperty};
use kedge_common::devices::{StateMessage, TwinMessage};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::edgecontroller::upstream::Outcome;

type NsName = (String, String);

/// Writes DeviceStatus objects for one node's reports.
pub struct StatusWriter {
    client: kube::Client,
    /// The status last written per device, with the UID of the Device it belongs to.
    cache: HashMap<NsName, (String, DeviceStatusStatus)>,
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The outcome of a report's API calls, logged when they failed.
fn finish(key: &NsName, result: Result<(), kube::Error>, what: &str) -> Outcome {
    match result {
        Ok(()) => Outcome::Done,
        Err(e) => {
            tracing::warn!(namespace = %key.0, device = %key.1, error = %e, "{what}");
            outcome_of(&e)
        }
    }
}

fn outcome_of(e: &kube::Error) -> Outcome {
    if is_status(e, 404) || is_status(e, 422) {
        Outcome::Done
    } else {
        Outcome::RetryLater
    }
}

/// Applies a twin report to a status: reported values (and the desired value the edge has seen)
/// of the properties it names; others are kept.
pub fn merge_twins(status: &mut DeviceStatusStatus, report: &TwinMessage) -> bool {
    let mut changed = false;
    for (prop, t) in &report.twin {
        let reported = t.actual.as_ref().and_then(|a| {
            let value = a.value.clone()?;
            let mut metadata = std::collections::BTreeMap::new();
            if let Some(m) = &a.metadata {
                metadata.insert("timestamp".to_owned(), m.timestamp.to_string());
            }
            if let Some(ty) = &t.metadata {
                metadata.insert("type".to_owned(), ty.value_type.clone());
            }
            Some(TwinProperty { value, metadata })
        });
        let observed = t.expected.as_ref().and_then(|e| {
            let value = e.value.clone()?;
            let mut metadata = std::collections::BTreeMap::new();
            if let Some(m) = &e.metadata {
                metadata.insert("timestamp".to_owned(), m.timestamp.to_string());
            }
            Some(TwinProperty { value, metadata })
        });
        if reported.is_none() && observed.is_none() {
            continue;
        }
        let i = match status
            .twins
            .iter()
            .position(|x| x.property_name.as_deref() == Some(prop))
        {
            Some(i) => i,
            None => {
                status.twins.push(Twin {
                    property_name: Some(prop.clone()),
                    ..Twin::default()
                });
                status.twins.len() - 1
            }
        };
        let twin = &mut status.twins[i];
        if let Some(r) = reported
            && twin.reported.as_ref() != Some(&r)
        {
            twin.reported = Some(r);
            changed = true;
        }
        if let Some(o) = observed
            && twin.observed_desired.as_ref() != Some(&o)
        {
            twin.observed_desired = Some(o);
            changed = true;
        }
    }
    status
        .twins
        .sort_by(|a, b| a.property_name.cmp(&b.property_name));
    changed
}

impl StatusWriter {
    pub fn new(client: kube::Client) -> Self {
        StatusWriter {
            client,
            cache: HashMap::new(),
        }
    }

    /// The current status of the device's DeviceStatus, creating the object if it is missing.
    async fn current(
        &mut self,
        key: &NsName,
        device_uid: &str,
    ) -> Result<DeviceStatusStatus, kube::Error> {
        if let Some((uid, s)) = self.cache.get(key)
            && uid == device_uid
        {
            return Ok(s.clone());
        }
        let api: Api<DeviceStatus> = Api::namespaced(self.client.clone(), &key.0);
        let found = match api.get_opt(&key.1).await? {
            Some(ds) => ds.status.unwrap_or_default(),
            None => {
                let obj: DeviceStatus = serde_json::from_value(json!({
                    "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "DeviceStatus",
                    "metadata": {"name": key.1, "namespace": key.0, "ownerReferences": [{
                        "apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
                        "name": key.1, "uid": device_uid, "controller": true,
                        "blockOwnerDeletion": false
                    }]},
                    "spec": {}
                }))
                .map_err(kube::Error::SerdeError)?;
                match api.create(&PostParams::default(), &obj).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => return Err(e),
                }
                DeviceStatusStatus::default()
            }
        };
        self.cache
            .insert(key.clone(), (device_uid.to_owned(), found.clone()));
        Ok(found)
    }

    async fn write(
        &mut self,
        key: &NsName,
        device_uid: &str,
        status: DeviceStatusStatus,
    ) -> Result<(), kube::Error> {
        let api: Api<DeviceStatus> = Api::namespaced(self.client.clone(), &key.0);
        let patch = json!({"status": status});
        match api
            .patch_status(&key.1, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.cache
                    .insert(key.clone(), (device_uid.to_owned(), status));
                Ok(())
            }
            Err(e) => {
                self.cache.remove(key);
                Err(e)
            }
        }
    }

    /// Applies a twin report. `device_uid`: the Device the report's node hosts.
    pub async fn twin_report(
        &mut self,
        key: &NsName,
        device_uid: &str,
        report: &TwinMessage,
    ) -> Outcome {
        let result = async {
            let mut status = self.current(key, device_uid).await?;
            if merge_twins(&mut status, report) {
                self.write(key, device_uid, status).await?;
            }
            Ok::<_, kube::Error>(())
        }
        .await;
        finish(key, result, "cannot write reported twins")
    }

    /// Applies a state report (`online`, `offline`, …) and the last time the device was online.
    pub async fn state_report(
        &mut self,
        key: &NsName,
        device_uid: &str,
        report: &StateMessage,
    ) -> Outcome {
        let result = async {
            let mut status = self.current(key, device_uid).await?;
            let state = Some(report.state.clone()).filter(|s| !s.is_empty());
            let changed = status.state != state
                || (report.last_online.is_some() && status.last_online_time != report.last_online);
            if changed {
                status.state = state;
                if report.last_online.is_some() {
                    status.last_online_time = report.last_online.clone();
                }
                self.write(key, device_uid, status).await?;
            }
            Ok::<_, kube::Error>(())
        }
        .await;
        finish(key, result, "cannot write device state")
    }

    /// Forgets a device whose DeviceStatus may have gone with it.
    pub fn forget(&mut self, key: &NsName) {
        self.cache.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_changes_only_the_properties_it_names() {
        let mut s = DeviceStatusStatus::default();
        let r1: TwinMessage = serde_json::from_value(json!({"twin": {
            "temperature": {"actual": {"value": "21.5", "metadata": {"timestamp": 5}}, "metadata": {"type": "double"}},
            "setpoint": {"actual": {"value": "20"}, "expected": {"value": "20"}}
        }}))
        .unwrap();
        assert!(merge_twins(&mut s, &r1));
        let r2: TwinMessage =
            serde_json::from_value(json!({"twin": {"temperature": {"actual": {"value": "22"}}}}))
                .unwrap();
        assert!(merge_twins(&mut s, &r2));
        assert!(
            !merge_twins(&mut s, &r2),
            "the same report again changes nothing"
        );
        assert_eq!(s.twins.len(), 2);
        let sp = &s.twins[0];
        assert_eq!(sp.property_name.as_deref(), Some("setpoint"));
        assert_eq!(sp.reported.as_ref().unwrap().value, "20");
        assert_eq!(sp.observed_desired.as_ref().unwrap().value, "20");
        assert_eq!(s.twins[1].reported.as_ref().unwrap().value, "22");
    }
}
