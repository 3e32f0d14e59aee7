//! One pod on the node: its loopback address, its volumes, its containers, its status, and
//! its end (stop the containers within the grace period, then remove the object).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::container::{self, ContainerCtx, ContainerRuntime, State};
use super::env::MountMap;
use super::{Runner, allocate_address, release_address};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn deleting(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn grace_of(pod: &Pod) -> Duration {
    let seconds = pod
        .metadata
        .deletion_grace_period_seconds
        .or_else(|| pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
        .unwrap_or(30);
    Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// Conditions with their last transition times.
#[derive(Default)]
struct Conditions(HashMap<&'static str, (bool, String)>);

impl Conditions {
    fn set(&mut self, kind: &'static str, value: bool) -> Value {
        let entry = self.0.entry(kind).or_insert_with(|| (value, container::now()));
        if entry.0 != value {
            *entry = (value, container::now());
        }
        json!({"type": kind, "status": if value { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": entry.1})
    }
}

/// Computes and writes `status`, only when it changed.
struct StatusWriter {
    api: Api<Pod>,
    name: String,
    ip: String,
    start_time: String,
    conditions: Conditions,
    last: Option<Value>,
}

impl StatusWriter {
    fn compute(&mut self, runtimes: &[ContainerRuntime]) -> Value {
        let all_terminated = !runtimes.is_empty() && runtimes.iter().all(|r| matches!(r.state, State::Terminated(_)));
        let ran = runtimes
            .iter()
            .any(|r| matches!(r.state, State::Running { .. }) || r.restart_count > 0 || r.last_terminated.is_some());
        let phase = if all_terminated {
            let ok = runtimes.iter().all(|r| matches!(&r.state, State::Terminated(t) if t.exit_code == 0));
            if ok { "Succeeded" } else { "Failed" }
        } else if ran {
            "Running"
        } else {
            "Pending"
        };
        let ready = !runtimes.is_empty() && runtimes.iter().all(|r| r.ready);
        let conditions = vec![
            self.conditions.set("PodReadyToStartContainers", true),
            self.conditions.set("Initialized", true),
            self.conditions.set("Ready", ready),
            self.conditions.set("ContainersReady", ready),
            self.conditions.set("PodScheduled", true),
        ];
        json!({
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": runtimes.iter().map(ContainerRuntime::status_json).collect::<Vec<_>>(),
        })
    }

    async fn write(&mut self, runtimes: &Mutex<Vec<ContainerRuntime>>) {
        let status = {
            let runtimes = lock(runtimes);
            self.compute(&runtimes)
        };
        if self.last.as_ref() == Some(&status) {
            return;
        }
        let params = PatchParams {
            field_manager: Some("kubelet".into()),
            ..PatchParams::default()
        };
        match self.api.patch_status(&self.name, &params, &Patch::Merge(json!({"status": status}))).await {
            Ok(_) => self.last = Some(status),
            Err(kube::Error::Api(e)) if e.code == 404 => self.last = Some(status),
            Err(e) => tracing::warn!(error = %e, pod = %self.name, "writing pod status failed"),
        }
    }
}

enum VolumeError {
    /// The pod went away (or began deleting) while volumes were prepared.
    Interrupted,
    Config(String),
}

/// Host directories of the pod's volumes, by volume name.
async fn prepare_volumes(runner: &Runner, pod: &Pod, pod_dir: &Path, updates: &watch::Receiver<Option<Arc<Pod>>>) -> Result<HashMap<String, PathBuf>, VolumeError> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(runner.client.clone(), &ns);
    let mut dirs = HashMap::new();
    let volumes = pod.spec.as_ref().and_then(|s| s.volumes.clone()).unwrap_or_default();
    let needs_sources = volumes.iter().any(|v| v.secret.is_some() || v.config_map.is_some());
    let (secrets, maps) = if needs_sources {
        runner.fetch_sources(pod).await.map_err(VolumeError::Config)?
    } else {
        Default::default()
    };
    let io = |e: std::io::Error| VolumeError::Config(format!("preparing volumes: {e}"));
    for v in volumes {
        let dir = if let Some(claim) = &v.persistent_volume_claim {
            loop {
                if runner.shutdown.is_cancelled() || updates.borrow().as_ref().is_none_or(|p| deleting(p)) {
                    return Err(VolumeError::Interrupted);
                }
                match claims.get_opt(&claim.claim_name).await {
                    Ok(Some(pvc)) => {
                        let bound = pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
                        let volume = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()).filter(|v| !v.is_empty());
                        if let (true, Some(volume)) = (bound, volume) {
                            break runner.config.volume_dir(&volume);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::debug!(error = %e, "reading a claim failed"),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        } else if v.empty_dir.is_some() {
            pod_dir.join("volumes").join(&v.name)
        } else if let Some(host) = &v.host_path {
            PathBuf::from(&host.path)
        } else if let Some(secret) = &v.secret {
            let name = secret.secret_name.clone().unwrap_or_default();
            let dir = pod_dir.join("volumes").join(&v.name);
            let data = match secrets.get(&name) {
                Some(d) => d.clone(),
                None if secret.optional == Some(true) => Default::default(),
                None => return Err(VolumeError::Config(format!("secret \"{name}\" not found"))),
            };
            write_files(&dir, &data, secret.items.as_deref()).map_err(io)?;
            dir
        } else if let Some(map) = &v.config_map {
            let dir = pod_dir.join("volumes").join(&v.name);
            let data = match maps.get(&map.name) {
                Some(d) => d.clone(),
                None if map.optional == Some(true) => Default::default(),
                None => return Err(VolumeError::Config(format!("configmap \"{}\" not found", map.name))),
            };
            write_files(&dir, &data, map.items.as_deref()).map_err(io)?;
            dir
        } else {
            return Err(VolumeError::Config(format!(
                "volume {:?}: the test pod runner supports persistentVolumeClaim, emptyDir, hostPath, secret and configMap volumes",
                v.name
            )));
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        dirs.insert(v.name.clone(), dir);
    }
    Ok(dirs)
}

fn write_files(dir: &Path, data: &std::collections::BTreeMap<String, String>, items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    match items {
        Some(items) => {
            for item in items {
                if let Some(value) = data.get(&item.key) {
                    let path = dir.join(&item.path);
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(path, value)?;
                }
            }
        }
        None => {
            for (k, v) in data {
                std::fs::write(dir.join(k), v)?;
            }
        }
    }
    Ok(())
}

/// Runs one pod until it is deleted (then removes its object) or the runner stops.
pub(super) async fn run(runner: Arc<Runner>, mut updates: watch::Receiver<Option<Arc<Pod>>>) {
    let Some(mut pod) = updates.borrow_and_update().clone() else { return };
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let api = runner.pod_api(&ns);

    let finished = matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
    let already_running = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).is_some_and(|ip| !ip.is_empty());
    if deleting(&pod) || finished || already_running {
        // Not started by this runner (it restarted): nothing to run, only to clean up.
        loop {
            let current = updates.borrow_and_update().clone();
            match current {
                None => return,
                Some(p) if deleting(&p) => {
                    runner.remove_pod(&ns, &name, &uid).await;
                    return;
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = runner.shutdown.cancelled() => return,
                changed = updates.changed() => if changed.is_err() { return },
            }
        }
    }

    let spec = pod.spec.clone().unwrap_or_default();
    let ports: Vec<u16> = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| u16::try_from(p.container_port).ok())
        .collect();
    let Some(ip) = allocate_address(&ports) else {
        tracing::error!(pod = %name, "no free loopback address for the pod");
        return;
    };
    let pod_dir = runner.config.data_dir.join("pods").join(format!("{ns}_{name}_{uid}"));
    let log_dir = runner.config.log_dir().join(&ns).join(format!("{name}_{uid}"));
    let runtimes = Arc::new(Mutex::new(spec.containers.iter().map(ContainerRuntime::new).collect::<Vec<_>>()));
    let dirty = Arc::new(Notify::new());
    let mut status = StatusWriter {
        api: api.clone(),
        name: name.clone(),
        ip: ip.to_string(),
        start_time: container::now(),
        conditions: Conditions::default(),
        last: None,
    };
    status.write(&runtimes).await;

    let set_all_waiting = |reason: &str, message: &str| {
        for rt in lock(&runtimes).iter_mut() {
            rt.state = State::Waiting {
                reason: reason.into(),
                message: message.into(),
            };
        }
    };
    let unsupported_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
    let volumes = if unsupported_init {
        Err(VolumeError::Config("init containers are not supported by the test pod runner".into()))
    } else {
        prepare_volumes(&runner, &pod, &pod_dir, &updates).await
    };
    // A child of the runner's shutdown: containers stop when the runner does, even if this
    // task is aborted first.
    let stop = runner.shutdown.child_token();
    let stop_grace = Arc::new(Mutex::new(grace_of(&pod)));
    let mut handles = Vec::new();
    match volumes {
        Ok(volumes) => {
            for (index, c) in spec.containers.iter().enumerate() {
                let mounts = MountMap::new(
                    c.volume_mounts
                        .iter()
                        .flatten()
                        .filter_map(|m| {
                            let host = volumes.get(&m.name)?;
                            let host = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                                Some(sub) => host.join(sub),
                                None => host.clone(),
                            };
                            let _ = std::fs::create_dir_all(&host);
                            Some((m.mount_path.clone(), host))
                        })
                        .collect(),
                );
                let ctx = ContainerCtx {
                    runner: runner.clone(),
                    pod: pod.clone(),
                    container: c.clone(),
                    index,
                    pod_ip: ip.to_string(),
                    mounts,
                    home: pod_dir.join("home"),
                    log_dir: log_dir.clone(),
                    runtimes: runtimes.clone(),
                    dirty: dirty.clone(),
                    stop: stop.clone(),
                    stop_grace: stop_grace.clone(),
                };
                handles.push(tokio::spawn(Arc::new(ctx).supervise()));
            }
        }
        Err(VolumeError::Config(message)) => {
            set_all_waiting("CreateContainerConfigError", &message);
            runner.event(&pod, "FailedMount", &message, "Warning", None, "kubelet");
            dirty.notify_one();
        }
        Err(VolumeError::Interrupted) => {}
    }

    let end = |grace: Duration| {
        *lock(&stop_grace) = grace;
        stop.cancel();
    };
    loop {
        tokio::select! {
            _ = runner.shutdown.cancelled() => {
                end(grace_of(&pod).min(runner.config.shutdown_grace));
                for h in handles.drain(..) {
                    let _ = h.await;
                }
                release_address(ip);
                return;
            }
            changed = updates.changed() => {
                let latest = if changed.is_err() { None } else { updates.borrow_and_update().clone() };
                match latest {
                    None => {
                        end(grace_of(&pod));
                        finish(&mut handles, ip, &pod_dir).await;
                        return;
                    }
                    Some(p) if deleting(&p) => {
                        pod = p;
                        runner.event(&pod, "Killing", "Stopping container(s)", "Normal", None, "kubelet");
                        end(grace_of(&pod));
                        for h in handles.drain(..) {
                            let _ = h.await;
                        }
                        status.write(&runtimes).await;
                        runner.remove_pod(&ns, &name, &uid).await;
                        finish(&mut handles, ip, &pod_dir).await;
                        return;
                    }
                    Some(p) => pod = p,
                }
            }
            _ = dirty.notified() => status.write(&runtimes).await,
        }
    }
}

async fn finish(handles: &mut Vec<tokio::task::JoinHandle<()>>, ip: Ipv4Addr, pod_dir: &Path) {
    for h in handles.drain(..) {
        let _ = h.await;
    }
    release_address(ip);
    if let Err(e) = tokio::fs::remove_dir_all(pod_dir).await
        && e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, dir = %pod_dir.display(), "removing a pod's scratch directory failed");
        }
}
