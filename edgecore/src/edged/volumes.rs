//! Pod volumes on the host: `emptyDir` (disk, or `medium: Memory` as tmpfs), `hostPath`, and the
//! ones edged writes from the store — `configMap`, `secret`, `downwardAPI` and `projected`
//! (configMap/secret/downwardAPI/serviceAccountToken sources, the token from
//! [`super::tokens`]) — and the container mounts for them.
//!
//! Written volumes are updated in place the way the kubelet's AtomicWriter does it: the payload
//! goes into a fresh hidden directory, a `..data` symlink is swapped to it with one rename, and
//! each key is a symlink through `..data`, so a container never sees half an update. Contents
//! are compared first, so an unchanged volume is not rewritten on every sync. `subPath` mounts
//! resolve to the file at mount time and are not updated (as with the kubelet).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use super::env::{self, ObjectSource, PodContext};
use super::runtime::api;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    #[error("configmap \"{0}\" not found")]
    ConfigMapNotFound(String),
    #[error("secret \"{0}\" not found")]
    SecretNotFound(String),
    #[error("configmap references non-existent config key: {0}")]
    ConfigMapKeyNotFound(String),
    #[error("secret references non-existent secret key: {0}")]
    SecretKeyNotFound(String),
    #[error(
        "volume {volume}: waiting for a token of service account {service_account} from the cloud"
    )]
    TokenUnavailable {
        volume: String,
        service_account: String,
    },
    #[error("volume {volume}: {what} is not supported by kedge yet")]
    Unsupported { volume: String, what: String },
    #[error("container {container} mounts volume {volume}, which the pod does not define")]
    UnknownVolume { container: String, volume: String },
    #[error("volume {volume}: {reason}")]
    Io { volume: String, reason: String },
    #[error(transparent)]
    Field(#[from] env::EnvError),
}

/// File path (relative, may contain `/`) → (content, mode).
pub type Payload = BTreeMap<String, (Vec<u8>, u32)>;

fn add_items(
    payload: &mut Payload,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    missing_key: impl Fn(String) -> VolumeError,
) -> Result<(), VolumeError> {
    match items {
        Some(items) if !items.is_empty() => {
            for i in items {
                let Some(v) = data.get(&i.key) else {
                    return Err(missing_key(i.key.clone()));
                };
                let mode = i.mode.map_or(default_mode, |m| m as u32);
                payload.insert(i.path.clone(), (v.clone(), mode));
            }
        }
        _ => {
            for (k, v) in data {
                payload.insert(k, (v, default_mode));
            }
        }
    }
    Ok(())
}

fn config_map_data(cm: &k8s_openapi::api::core::v1::ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut d: BTreeMap<String, Vec<u8>> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    d.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    d
}

fn secret_data(s: &k8s_openapi::api::core::v1::Secret) -> BTreeMap<String, Vec<u8>> {
    let mut d: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    d.extend(
        s.string_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.clone().into_bytes())),
    );
    d
}

fn downward_items(
    pod: &Pod,
    ctx: &PodContext,
    items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile],
    default_mode: u32,
    payload: &mut Payload,
) -> Result<(), VolumeError> {
    for i in items {
        let value = if let Some(f) = &i.field_ref {
            match f.field_path.as_str() {
                // Whole maps, one `key="value"` per line, as the kubelet writes them.
                "metadata.labels" | "metadata.annotations" => {
                    let m = if f.field_path == "metadata.labels" {
                        pod.metadata.labels.clone()
                    } else {
                        pod.metadata.annotations.clone()
                    };
                    m.unwrap_or_default()
                        .iter()
                        .map(|(k, v)| format!("{k}={v:?}\n"))
                        .collect()
                }
                path => env::pod_field(pod, ctx, path)?,
            }
        } else {
            return Err(VolumeError::Unsupported {
                volume: i.path.clone(),
                what: "downwardAPI resourceFieldRef".into(),
            });
        };
        let mode = i.mode.map_or(default_mode, |m| m as u32);
        payload.insert(i.path.clone(), (value.into_bytes(), mode));
    }
    Ok(())
}

/// A ConfigMap or Secret a volume takes its files from: name, optional.
enum Source<'a> {
    ConfigMap(&'a str, bool),
    Secret(&'a str, bool),
}

/// Adds the files of a ConfigMap or Secret (all keys, or `items`); a missing optional source adds
/// nothing.
fn add_source(
    payload: &mut Payload,
    source: &dyn ObjectSource,
    ns: &str,
    from: Source<'_>,
    items: Option<&Vec<KeyToPath>>,
    mode: u32,
) -> Result<(), VolumeError> {
    let (data, optional, missing, missing_key): (_, _, _, fn(String) -> VolumeError) = match from {
        Source::ConfigMap(name, optional) => (
            source.config_map(ns, name).map(|c| config_map_data(&c)),
            optional,
            VolumeError::ConfigMapNotFound(name.to_owned()),
            VolumeError::ConfigMapKeyNotFound,
        ),
        Source::Secret(name, optional) => (
            source.secret(ns, name).map(|s| secret_data(&s)),
            optional,
            VolumeError::SecretNotFound(name.to_owned()),
            VolumeError::SecretKeyNotFound,
        ),
    };
    match data {
        Some(d) => add_items(payload, d, items, mode, missing_key),
        None if optional => Ok(()),
        None => Err(missing),
    }
}

/// What a written volume must hold now; `None` for an optional source that does not exist.
fn payload_of(
    pod: &Pod,
    volume: &Volume,
    ctx: &PodContext,
    source: &dyn ObjectSource,
) -> Result<Option<Payload>, VolumeError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut payload = Payload::new();
    let mode_of = |m: Option<i32>| m.map_or(0o644, |m| m as u32);
    if let Some(c) = &volume.config_map {
        let from = Source::ConfigMap(&c.name, c.optional.unwrap_or(false));
        add_source(
            &mut payload,
            source,
            ns,
            from,
            c.items.as_ref(),
            mode_of(c.default_mode),
        )?;
        return Ok(Some(payload));
    }
    if let Some(s) = &volume.secret {
        let name = s.secret_name.as_deref().unwrap_or_default();
        let from = Source::Secret(name, s.optional.unwrap_or(false));
        add_source(
            &mut payload,
            source,
            ns,
            from,
            s.items.as_ref(),
            mode_of(s.default_mode),
        )?;
        return Ok(Some(payload));
    }
    if let Some(d) = &volume.downward_api {
        let mode = d.default_mode.map_or(0o644, |m| m as u32);
        downward_items(
            pod,
            ctx,
            d.items.as_deref().unwrap_or_default(),
            mode,
            &mut payload,
        )?;
        return Ok(Some(payload));
    }
    if let Some(p) = &volume.projected {
        let mode = p.default_mode.map_or(0o644, |m| m as u32);
        for src in p.sources.iter().flatten() {
            if let Some(c) = &src.config_map {
                let from = Source::ConfigMap(&c.name, c.optional.unwrap_or(false));
                add_source(&mut payload, source, ns, from, c.items.as_ref(), mode)?;
            } else if let Some(s) = &src.secret {
                let from = Source::Secret(&s.name, s.optional.unwrap_or(false));
                add_source(&mut payload, source, ns, from, s.items.as_ref(), mode)?;
            } else if let Some(d) = &src.downward_api {
                downward_items(
                    pod,
                    ctx,
                    d.items.as_deref().unwrap_or_default(),
                    mode,
                    &mut payload,
                )?;
            } else if let Some(t) = &src.service_account_token {
                let key = super::tokens::TokenKey::for_projection(pod, t);
                let Some(token) = source.service_account_token(&key) else {
                    return Err(VolumeError::TokenUnavailable {
                        volume: volume.name.clone(),
                        service_account: key.service_account,
                    });
                };
                payload.insert(t.path.clone(), (token.into_bytes(), mode));
            } else {
                return Err(VolumeError::Unsupported {
                    volume: volume.name.clone(),
                    what: "this projected source (clusterTrustBundle, podCertificate)".into(),
                });
            }
        }
        return Ok(Some(payload));
    }
    Ok(None)
}

fn io_err(volume: &str) -> impl Fn(io::Error) -> VolumeError + '_ {
    move |e| VolumeError::Io {
        volume: volume.to_owned(),
        reason: e.to_string(),
    }
}

/// Whether `dir` already holds exactly `payload` (through its `..data` link).
fn holds(dir: &Path, payload: &Payload) -> bool {
    let data = dir.join("..data");
    let Ok(target) = std::fs::read_link(&data) else {
        return false;
    };
    let current = dir.join(target);
    let mut count = 0;
    let mut stack = vec![current.clone()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            return false;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                count += 1;
            }
        }
    }
    count == payload.len()
        && payload.iter().all(|(k, (v, mode))| {
            let p = current.join(k);
            std::fs::read(&p).is_ok_and(|c| &c == v)
                && std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode)
        })
}

/// Writes `payload` into `dir` atomically (see the module docs). Returns whether it changed.
pub fn write_atomic(dir: &Path, payload: &Payload) -> io::Result<bool> {
    if holds(dir, payload) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let stamp = format!(
        "..{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let fresh = dir.join(&stamp);
    std::fs::create_dir(&fresh)?;
    for (rel, (content, mode)) in payload {
        let p = fresh.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, content)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o755))?;
    let old = std::fs::read_link(dir.join("..data")).ok();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    // Top-level names point through ..data; names no longer in the payload go.
    let tops: std::collections::BTreeSet<String> = payload
        .keys()
        .filter_map(|k| k.split('/').next().map(str::to_owned))
        .collect();
    for top in &tops {
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(top), &link)?;
        }
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("..") && !tops.contains(&name) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    if let Some(old) = old
        && old != Path::new(&stamp)
    {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(true)
}

/// Where a pod's volumes live on the host: `<root>/pods/<uid>/volumes/<kind>/<name>`.
pub fn pod_dir(root: &Path, uid: &str) -> PathBuf {
    root.join("pods").join(uid)
}

/// What one volume needs on the host, resolved from the store (no I/O).
#[derive(Debug, Clone, PartialEq)]
pub enum VolumePlan {
    EmptyDir {
        name: String,
        memory: bool,
    },
    HostPath {
        name: String,
        path: PathBuf,
        kind: Option<String>,
    },
    Written {
        name: String,
        kind: &'static str,
        payload: Payload,
    },
}

/// Resolves every volume of `pod` (ConfigMaps, Secrets and fields from `source` and `ctx`).
pub fn plan(
    pod: &Pod,
    ctx: &PodContext,
    source: &dyn ObjectSource,
) -> Result<Vec<VolumePlan>, VolumeError> {
    let mut out = Vec::new();
    for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
        let name = v.name.clone();
        if let Some(e) = &v.empty_dir {
            out.push(VolumePlan::EmptyDir {
                name,
                memory: e.medium.as_deref() == Some("Memory"),
            });
        } else if let Some(h) = &v.host_path {
            out.push(VolumePlan::HostPath {
                name,
                path: PathBuf::from(&h.path),
                kind: h.type_.clone(),
            });
        } else if let Some(payload) = payload_of(pod, v, ctx, source)? {
            let kind = if v.config_map.is_some() {
                "configmap"
            } else if v.secret.is_some() {
                "secret"
            } else if v.downward_api.is_some() {
                "downward-api"
            } else {
                "projected"
            };
            out.push(VolumePlan::Written {
                name,
                kind,
                payload,
            });
        } else {
            return Err(VolumeError::Unsupported {
                volume: v.name.clone(),
                what: "this volume type".into(),
            });
        }
    }
    Ok(out)
}

/// Creates or updates the planned volumes of pod `uid` under `root`; returns the host path of
/// each by name. Blocking file I/O: run it with `spawn_blocking`.
pub fn apply(
    root: &Path,
    uid: &str,
    plans: &[VolumePlan],
) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let base = pod_dir(root, uid).join("volumes");
    let mut out = HashMap::new();
    for plan in plans {
        let (name, path) = match plan {
            VolumePlan::EmptyDir { name, memory } => {
                let io = io_err(name);
                let p = base.join("empty-dir").join(name);
                std::fs::create_dir_all(&p).map_err(&io)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777))
                    .map_err(&io)?;
                if *memory && !is_mount_point(&p) {
                    mount_tmpfs(&p).map_err(&io)?;
                }
                (name, p)
            }
            VolumePlan::HostPath { name, path, kind } => {
                let io = io_err(name);
                let not = |what: &str| VolumeError::Io {
                    volume: name.clone(),
                    reason: format!("hostPath {} is not a {what}", path.display()),
                };
                match kind.as_deref() {
                    Some("DirectoryOrCreate") => std::fs::create_dir_all(path).map_err(&io)?,
                    Some("FileOrCreate") if !path.exists() => {
                        if let Some(parent) = path.parent() {
                            std::fs::create_dir_all(parent).map_err(&io)?;
                        }
                        std::fs::write(path, b"").map_err(&io)?;
                    }
                    Some("Directory") if !path.is_dir() => return Err(not("directory")),
                    Some("File") if !path.is_file() => return Err(not("file")),
                    _ => {}
                }
                (name, path.clone())
            }
            VolumePlan::Written {
                name,
                kind,
                payload,
            } => {
                let p = base.join(kind).join(name);
                write_atomic(&p, payload).map_err(io_err(name))?;
                (name, p)
            }
        };
        out.insert(name.clone(), path);
    }
    Ok(out)
}

/// [`plan`] then [`apply`]: blocking.
pub fn prepare(
    root: &Path,
    pod: &Pod,
    ctx: &PodContext,
    source: &dyn ObjectSource,
) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let uid = pod.metadata.uid.as_deref().unwrap_or_default();
    apply(root, uid, &plan(pod, ctx, source)?)
}

fn is_mount_point(p: &Path) -> bool {
    let target = p.display().to_string();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(target.as_str()))
}

fn mount_tmpfs(p: &Path) -> io::Result<()> {
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "mode=0777", "tmpfs"])
        .arg(p)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("mount -t tmpfs failed: {status}")))
    }
}

/// Unmounts what edged mounted for the pod and removes its directory. Blocking.
pub fn remove(root: &Path, uid: &str) -> io::Result<()> {
    let dir = pod_dir(root, uid);
    let prefix = format!("{}/", dir.display());
    let mounts: Vec<String> = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).map(str::to_owned))
        .filter(|m| m.starts_with(&prefix))
        .collect();
    for m in mounts {
        let _ = std::process::Command::new("umount").arg(&m).status();
    }
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The CRI mounts of `container` from the prepared volumes.
pub fn mounts(
    pod: &Pod,
    container: &Container,
    volumes: &HashMap<String, PathBuf>,
) -> Result<Vec<api::Mount>, VolumeError> {
    let spec_volumes: HashMap<&str, &Volume> = pod
        .spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let (Some(host), Some(v)) = (volumes.get(&m.name), spec_volumes.get(m.name.as_str()))
        else {
            return Err(VolumeError::UnknownVolume {
                container: container.name.clone(),
                volume: m.name.clone(),
            });
        };
        let written = v.config_map.is_some()
            || v.secret.is_some()
            || v.downward_api.is_some()
            || v.projected.is_some();
        let host_path = match m.sub_path.as_deref() {
            Some(sub) if !sub.is_empty() => {
                let p = host.join(sub);
                // A subPath of a written volume is the file itself (not updated later).
                std::fs::canonicalize(&p).unwrap_or(p)
            }
            _ => host.clone(),
        };
        out.push(api::Mount {
            container_path: m.mount_path.clone(),
            host_path: host_path.display().to_string(),
            readonly: m.read_only.unwrap_or(false) || written,
            ..Default::default()
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use serde_json::json;

    struct Objects(Vec<ConfigMap>, Vec<Secret>);
    impl ObjectSource for Objects {
        fn config_map(&self, _: &str, name: &str) -> Option<ConfigMap> {
            self.0
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .cloned()
        }
        fn secret(&self, _: &str, name: &str) -> Option<Secret> {
            self.1
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name))
                .cloned()
        }
    }

    fn cm(data: serde_json::Value) -> ConfigMap {
        serde_json::from_value(
            json!({"metadata": {"name": "cfg", "namespace": "ns"}, "data": data}),
        )
        .unwrap()
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1", "labels": {"app": "shop"}},
            "spec": {"containers": [{"name": "c", "image": "x", "volumeMounts": [
                {"name": "cfg", "mountPath": "/etc/cfg"},
                {"name": "one", "mountPath": "/etc/app.conf", "subPath": "app.conf"},
                {"name": "creds", "mountPath": "/secrets"},
                {"name": "scratch", "mountPath": "/scratch"},
                {"name": "info", "mountPath": "/info"}]}],
             "volumes": [
                {"name": "cfg", "configMap": {"name": "cfg"}},
                {"name": "one", "configMap": {"name": "cfg", "items": [{"key": "app", "path": "app.conf", "mode": 256}]}},
                {"name": "creds", "secret": {"secretName": "creds", "defaultMode": 256}},
                {"name": "scratch", "emptyDir": {}},
                {"name": "info", "projected": {"sources": [
                    {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                                               {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    {"configMap": {"name": "cfg", "items": [{"key": "mode", "path": "sub/mode"}]}}]}}]}
        }))
        .unwrap()
    }

    fn objects(mode: &str) -> Objects {
        Objects(
            vec![cm(json!({"mode": mode, "app": "listen=80"}))],
            vec![
                serde_json::from_value(json!({"metadata": {"name": "creds", "namespace": "ns"},
                "data": {"token": "czNjcjN0"}}))
                .unwrap(),
            ],
        )
    }

    #[test]
    fn volumes_are_written_mounted_and_updated_atomically() {
        let root = tempfile::tempdir().unwrap();
        let p = pod();
        let ctx = PodContext::default();
        let vols = prepare(root.path(), &p, &ctx, &objects("edge")).unwrap();
        let cfg = &vols["cfg"];
        assert_eq!(std::fs::read_to_string(cfg.join("mode")).unwrap(), "edge");
        assert_eq!(
            std::fs::read_link(cfg.join("mode")).unwrap(),
            Path::new("..data/mode")
        );
        let one = &vols["one"];
        assert_eq!(
            std::fs::read_to_string(one.join("app.conf")).unwrap(),
            "listen=80"
        );
        assert_eq!(
            std::fs::metadata(one.join("app.conf"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o400
        );
        assert_eq!(
            std::fs::read_to_string(vols["creds"].join("token")).unwrap(),
            "s3cr3t"
        );
        let info = &vols["info"];
        assert_eq!(
            std::fs::read_to_string(info.join("labels")).unwrap(),
            "app=\"shop\"\n"
        );
        assert_eq!(std::fs::read_to_string(info.join("name")).unwrap(), "web");
        assert_eq!(
            std::fs::read_to_string(info.join("sub/mode")).unwrap(),
            "edge"
        );
        assert!(vols["scratch"].is_dir());

        // Unchanged: not rewritten. Changed: swapped in one rename; a removed key disappears.
        let before = std::fs::read_link(cfg.join("..data")).unwrap();
        prepare(root.path(), &p, &ctx, &objects("edge")).unwrap();
        assert_eq!(std::fs::read_link(cfg.join("..data")).unwrap(), before);
        let o = Objects(vec![cm(json!({"mode": "cloud"}))], objects("x").1);
        let err = prepare(root.path(), &p, &ctx, &o).unwrap_err();
        assert_eq!(err, VolumeError::ConfigMapKeyNotFound("app".into()));
        let mut p2 = p.clone();
        p2.spec
            .as_mut()
            .unwrap()
            .volumes
            .as_mut()
            .unwrap()
            .retain(|v| v.name != "one");
        p2.spec.as_mut().unwrap().containers[0]
            .volume_mounts
            .as_mut()
            .unwrap()
            .retain(|m| m.name != "one");
        prepare(root.path(), &p2, &ctx, &o).unwrap();
        assert_eq!(std::fs::read_to_string(cfg.join("mode")).unwrap(), "cloud");
        assert!(
            std::fs::symlink_metadata(cfg.join("app")).is_err(),
            "removed key is gone"
        );
        assert_ne!(std::fs::read_link(cfg.join("..data")).unwrap(), before);
        assert!(
            !cfg.join(&before).exists(),
            "the old payload directory is removed"
        );

        let m = mounts(&p, &p.spec.as_ref().unwrap().containers[0], &vols).unwrap();
        assert_eq!(m[0].container_path, "/etc/cfg");
        assert!(m[0].readonly, "written volumes are read-only");
        assert!(m[1].host_path.ends_with("app.conf") && !m[1].host_path.contains("..data/"));
        assert!(!m[3].readonly, "emptyDir is writable");

        remove(root.path(), "u1").unwrap();
        assert!(!pod_dir(root.path(), "u1").exists());
    }

    #[test]
    fn missing_sources_and_unsupported_types_are_clear_errors() {
        let root = tempfile::tempdir().unwrap();
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "w", "uid": "u2"},
            "spec": {"containers": [], "volumes": [{"name": "v", "configMap": {"name": "nope"}}]}}))
        .unwrap();
        assert_eq!(
            prepare(root.path(), &p, &PodContext::default(), &objects("x"))
                .unwrap_err()
                .to_string(),
            "configmap \"nope\" not found"
        );
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "w", "uid": "u3"},
            "spec": {"containers": [], "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "c"}}]}}))
            .unwrap();
        assert!(matches!(
            prepare(root.path(), &p, &PodContext::default(), &objects("x")),
            Err(VolumeError::Unsupported { .. })
        ));
        let p: Pod = serde_json::from_value(json!({"metadata": {"name": "w", "uid": "u4"},
            "spec": {"containers": [], "volumes": [{"name": "v", "configMap": {"name": "nope", "optional": true}}]}}))
            .unwrap();
        let v = prepare(root.path(), &p, &PodContext::default(), &objects("x")).unwrap();
        assert!(
            v["v"].is_dir(),
            "an optional missing source is an empty volume"
        );
    }
}
