//! The pod runner: the node of the test control plane. It plays kubelet (runs each Pod's
//! containers as local processes, probes them, reports status, stops them on deletion), the
//! scheduler (binds pending pods to its one node once their claims exist) and the volume
//! provisioner (a directory per bound PersistentVolumeClaim that outlives pods).
//!
//! It is an ordinary API client: everything it knows comes from watches, everything it does
//! is an API call, so it works the same against the emulator in-process or over the network.
//! Its limits are written down in tests/README.md.

mod container;
pub mod env;
mod pod;
pub mod probe;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Node, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::runtime::WatchStreamExt;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How the runner runs pods.
#[derive(Debug, Clone)]
pub struct PodRunnerConfig {
    /// Name of the one node this runner is.
    pub node_name: String,
    /// Holds `volumes/` (claims), `pods/` (per-pod scratch: emptyDirs, Secret volumes) and
    /// `logs/` (container output, read by `kubectl logs`).
    pub data_dir: PathBuf,
    /// Container command name or image → local binary. A command is looked up by its first
    /// word and that word's file name; a container without a command by its image, the image
    /// without tag, and the image's last path segment without tag.
    pub binaries: BTreeMap<String, PathBuf>,
    /// Whether commands not in `binaries` may run as host programs found on PATH.
    pub allow_host_commands: bool,
    /// Caps probe periods and initial delays (a test-speed knob; `None` keeps the pod's).
    pub max_probe_period: Option<Duration>,
    /// Delay before the second restart of a crashing container, doubled up to `restart_backoff_max`.
    pub restart_backoff: Duration,
    pub restart_backoff_max: Duration,
    /// How long containers get to stop when the runner itself shuts down.
    pub shutdown_grace: Duration,
    /// Host environment variables every container also gets (a container's own env wins).
    pub inherit_env: Vec<String>,
}

impl PodRunnerConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            node_name: "wa-test-node".into(),
            data_dir: data_dir.into(),
            binaries: BTreeMap::new(),
            allow_host_commands: true,
            max_probe_period: None,
            restart_backoff: Duration::from_secs(10),
            restart_backoff_max: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(5),
            inherit_env: ["PATH", "RUST_BACKTRACE", "LANG", "TZ"].map(String::from).to_vec(),
        }
    }

    /// Maps a command or image name to a local binary.
    pub fn binary(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.insert(name.into(), path.into());
        self
    }

    /// Where container logs go: `<dir>/<namespace>/<pod>_<uid>/<container>.log`.
    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("logs")
    }

    /// The host directory backing a bound claim's volume.
    pub fn volume_dir(&self, volume_name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(volume_name)
    }
}

/// Loopback addresses in use by pods of any runner in this process: 127.0.x.y, y in 2..=254.
static ADDRESSES: LazyLock<Mutex<BTreeSet<u32>>> = LazyLock::new(Default::default);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A free loopback address whose `ports` nobody listens on (other processes may use some).
fn allocate_address(ports: &[u16]) -> Option<Ipv4Addr> {
    let mut used = lock(&ADDRESSES);
    for x in 0u32..=255 {
        for y in 2u32..=254 {
            let n = (x << 8) | y;
            if used.contains(&n) {
                continue;
            }
            let ip = Ipv4Addr::new(127, 0, x as u8, y as u8);
            let free = ports.iter().all(|p| std::net::TcpListener::bind((ip, *p)).is_ok());
            if free {
                used.insert(n);
                return Some(ip);
            }
        }
    }
    None
}

fn release_address(ip: Ipv4Addr) {
    let [_, _, x, y] = ip.octets();
    lock(&ADDRESSES).remove(&((u32::from(x) << 8) | u32::from(y)));
}

/// Shared by the runner's tasks.
pub(crate) struct Runner {
    pub(crate) client: kube::Client,
    pub(crate) config: PodRunnerConfig,
    pub(crate) http: reqwest::Client,
    workers: Mutex<HashMap<String, watch::Sender<Option<Arc<Pod>>>>>,
    worker_tasks: Mutex<Vec<JoinHandle<()>>>,
    scheduling: Mutex<HashSet<String>>,
    pub(crate) shutdown: CancellationToken,
    /// Set when the runner is dropped: containers get SIGKILL at once, no grace period.
    pub(crate) killing: std::sync::atomic::AtomicBool,
}

/// A running pod runner. Dropping it kills every container at once; [`PodRunner::shutdown`]
/// stops them gracefully.
pub struct PodRunner {
    runner: Arc<Runner>,
    tasks: Vec<JoinHandle<()>>,
}

impl PodRunner {
    pub async fn start(client: kube::Client, config: PodRunnerConfig) -> anyhow::Result<Self> {
        for dir in ["volumes", "pods", "logs"] {
            std::fs::create_dir_all(config.data_dir.join(dir))?;
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::limited(10))
            .build()?;
        let runner = Arc::new(Runner {
            client,
            config,
            http,
            workers: Mutex::new(HashMap::new()),
            worker_tasks: Mutex::new(Vec::new()),
            scheduling: Mutex::new(HashSet::new()),
            shutdown: CancellationToken::new(),
            killing: std::sync::atomic::AtomicBool::new(false),
        });
        runner.register_node().await?;
        let tasks = vec![
            tokio::spawn(runner.clone().watch_pods()),
            tokio::spawn(runner.clone().reclaim_volumes()),
        ];
        tracing::info!(node = %runner.config.node_name, "pod runner started");
        Ok(Self { runner, tasks })
    }

    pub fn config(&self) -> &PodRunnerConfig {
        &self.runner.config
    }

    /// Stops every container (SIGTERM, then SIGKILL after the shutdown grace) and waits.
    pub async fn shutdown(mut self) {
        self.runner.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let workers: Vec<JoinHandle<()>> = lock(&self.runner.worker_tasks).drain(..).collect();
        let limit = self.runner.config.shutdown_grace + Duration::from_secs(5);
        for task in workers {
            let _ = tokio::time::timeout(limit, task).await;
        }
    }
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.runner.killing.store(true, std::sync::atomic::Ordering::SeqCst);
        self.runner.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
        for task in lock(&self.runner.worker_tasks).iter() {
            task.abort();
        }
    }
}

impl Runner {
    async fn register_node(&self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let name = &self.config.node_name;
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {},
        });
        let params = PatchParams::apply("kubelet").force();
        nodes.patch(name, &params, &Patch::Apply(&node)).await?;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        let status = json!({
            "apiVersion": "v1", "kind": "Node",
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                    "message": "the test pod runner is ready", "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
                "capacity": {"cpu": "1", "memory": "4Gi", "pods": "65000"},
                "allocatable": {"cpu": "1", "memory": "4Gi", "pods": "65000"},
                "nodeInfo": {"kubeletVersion": format!("v1.{}.0", crate::apiserver::discovery::KUBERNETES_MINOR),
                    "architecture": std::env::consts::ARCH, "operatingSystem": "linux",
                    "containerRuntimeVersion": "wa-test-pod-runner://0.1", "kernelVersion": "", "osImage": "",
                    "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
            }
        });
        nodes.patch_status(name, &params, &Patch::Apply(&status)).await?;
        Ok(())
    }

    async fn watch_pods(self: Arc<Self>) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let stream = watcher(pods, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        let mut listed: Option<HashSet<String>> = None;
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(watcher::Event::Init)) => listed = Some(HashSet::new()),
                Some(Ok(watcher::Event::InitApply(pod))) => {
                    if let (Some(set), Some(uid)) = (listed.as_mut(), pod.metadata.uid.clone()) {
                        set.insert(uid);
                    }
                    self.dispatch(pod);
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    // Pods that went away while the watch was re-listing.
                    if let Some(set) = listed.take() {
                        let stale: Vec<String> = lock(&self.workers).keys().filter(|u| !set.contains(*u)).cloned().collect();
                        for uid in stale {
                            self.gone(&uid);
                        }
                    }
                }
                Some(Ok(watcher::Event::Apply(pod))) => self.dispatch(pod),
                Some(Ok(watcher::Event::Delete(pod))) => {
                    if let Some(uid) = &pod.metadata.uid {
                        self.gone(uid);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                None => break,
            }
        }
    }

    fn dispatch(self: &Arc<Self>, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else { return };
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
        if node.is_empty() {
            if pod.metadata.deletion_timestamp.is_none() && lock(&self.scheduling).insert(uid.clone()) {
                tokio::spawn(self.clone().schedule(pod, uid));
            }
            return;
        }
        if node != self.config.node_name {
            return;
        }
        let (pod_ns, pod_name) = (pod.metadata.namespace.clone(), pod.metadata.name.clone());
        let pod = Arc::new(pod);
        let mut workers = lock(&self.workers);
        if let Some(tx) = workers.get(&uid) {
            tx.send_replace(Some(pod));
            return;
        }
        let (tx, rx) = watch::channel(Some(pod));
        workers.insert(uid, tx);
        drop(workers);
        let span = tracing::info_span!("pod", namespace = ?pod_ns, pod = ?pod_name);
        let task = tokio::spawn(tracing::Instrument::instrument(pod::run(self.clone(), rx), span));
        let mut tasks = lock(&self.worker_tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }

    fn gone(&self, uid: &str) {
        if let Some(tx) = lock(&self.workers).remove(uid) {
            tx.send_replace(None);
        }
    }

    /// Binds a pending pod to this node once every claim it mounts exists.
    async fn schedule(self: Arc<Self>, pod: Pod, uid: String) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
        let wanted: Vec<String> = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| c.claim_name.clone()))
            .collect();
        let mut reported = false;
        loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            match pods.get_opt(&name).await {
                Ok(Some(current)) if current.metadata.uid.as_deref() == Some(uid.as_str()) => {
                    let bound = current.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty());
                    if bound || current.metadata.deletion_timestamp.is_some() {
                        break;
                    }
                }
                Ok(_) => break,
                Err(e) => tracing::debug!(error = %e, %name, "scheduler: reading the pod failed"),
            }
            let mut missing = None;
            for claim in &wanted {
                if let Ok(None) = claims.get_opt(claim).await {
                    missing = Some(claim.clone());
                    break;
                }
            }
            match missing {
                None => {
                    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                        "target": {"apiVersion": "v1", "kind": "Node", "name": self.config.node_name}});
                    match pods.create_subresource::<_, serde_json::Value>("binding", &name, &PostParams::default(), &binding).await {
                        Ok(_) => {
                            self.event(&pod, "Scheduled", &format!("Successfully assigned {ns}/{name} to {}", self.config.node_name), "Normal", None, "default-scheduler");
                            break;
                        }
                        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => break,
                        Err(e) => tracing::warn!(error = %e, %name, "binding failed; retrying"),
                    }
                }
                Some(claim) if !reported => {
                    reported = true;
                    let message = format!("0/1 nodes are available: persistentvolumeclaim \"{claim}\" not found.");
                    let status = json!({"status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                        "message": message, "lastProbeTime": null, "lastTransitionTime": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)}]}});
                    let _ = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await;
                    self.event(&pod, "FailedScheduling", &message, "Warning", None, "default-scheduler");
                }
                Some(_) => {}
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        lock(&self.scheduling).remove(&uid);
    }

    /// Deleting a claim deletes its volume's directory (the `Delete` reclaim policy).
    async fn reclaim_volumes(self: Arc<Self>) {
        let claims: Api<PersistentVolumeClaim> = Api::all(self.client.clone());
        let stream = watcher(claims, watcher::Config::default()).default_backoff();
        futures::pin_mut!(stream);
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                event = stream.next() => event,
            };
            match event {
                Some(Ok(watcher::Event::Delete(pvc))) => {
                    if let Some(volume) = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()).filter(|v| !v.is_empty()) {
                        let dir = self.config.volume_dir(volume);
                        if let Err(e) = tokio::fs::remove_dir_all(&dir).await
                            && e.kind() != std::io::ErrorKind::NotFound {
                                tracing::warn!(error = %e, dir = %dir.display(), "removing a deleted claim's volume failed");
                            }
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => tracing::warn!(error = %e, "claim watch failed; retrying"),
                None => break,
            }
        }
    }

    /// Records a `v1` Event about a pod, as the kubelet and scheduler do; best effort.
    pub(crate) fn event(&self, pod: &Pod, reason: &str, message: &str, type_: &str, container: Option<&str>, component: &str) {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let now = chrono::Utc::now();
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": format!("{name}.{:x}", now.timestamp_nanos_opt().unwrap_or_default()), "namespace": ns},
            "involvedObject": {"apiVersion": "v1", "kind": "Pod", "name": name, "namespace": ns, "uid": pod.metadata.uid,
                "fieldPath": container.map(|c| format!("spec.containers{{{c}}}"))},
            "reason": reason, "message": message, "type": type_,
            "source": {"component": component, "host": self.config.node_name},
            "firstTimestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "lastTimestamp": now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            "count": 1, "reportingComponent": component, "reportingInstance": self.config.node_name,
        });
        let api: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        tokio::spawn(async move {
            if let Ok(event) = serde_json::from_value::<Event>(event)
                && let Err(e) = api.create(&PostParams::default(), &event).await {
                    tracing::debug!(error = %e, "recording an event failed");
                }
        });
    }

    /// The Secrets and ConfigMaps a container's env and the pod's volumes refer to.
    pub(crate) async fn fetch_sources(&self, pod: &Pod) -> Result<(HashMap<String, BTreeMap<String, String>>, HashMap<String, BTreeMap<String, String>>), String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut secret_names = BTreeSet::new();
        let mut map_names = BTreeSet::new();
        if let Some(spec) = &pod.spec {
            for c in spec.containers.iter().chain(spec.init_containers.iter().flatten()) {
                for var in c.env.iter().flatten() {
                    if let Some(from) = &var.value_from {
                        if let Some(s) = &from.secret_key_ref {
                            secret_names.insert(s.name.clone());
                        }
                        if let Some(m) = &from.config_map_key_ref {
                            map_names.insert(m.name.clone());
                        }
                    }
                }
                for from in c.env_from.iter().flatten() {
                    if let Some(s) = &from.secret_ref {
                        secret_names.insert(s.name.clone());
                    }
                    if let Some(m) = &from.config_map_ref {
                        map_names.insert(m.name.clone());
                    }
                }
            }
            for v in spec.volumes.iter().flatten() {
                if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.clone()) {
                    secret_names.insert(s);
                }
                if let Some(m) = &v.config_map {
                    map_names.insert(m.name.clone());
                }
            }
        }
        let secrets_api: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let maps_api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &ns);
        let mut secrets = HashMap::new();
        for name in secret_names {
            match secrets_api.get_opt(&name).await {
                Ok(Some(s)) => {
                    let mut data: BTreeMap<String, String> = s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
                        .collect();
                    data.extend(s.string_data.unwrap_or_default());
                    secrets.insert(name, data);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("reading secret {name}: {e}")),
            }
        }
        let mut maps = HashMap::new();
        for name in map_names {
            match maps_api.get_opt(&name).await {
                Ok(Some(m)) => {
                    let mut data = m.data.unwrap_or_default();
                    for (k, v) in m.binary_data.unwrap_or_default() {
                        data.insert(k, String::from_utf8_lossy(&v.0).into_owned());
                    }
                    maps.insert(name, data);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("reading configmap {name}: {e}")),
            }
        }
        Ok((secrets, maps))
    }

    /// The local program for a container command (or, without one, its image).
    pub(crate) fn resolve(&self, command: &[String], image: &str) -> Result<(PathBuf, Vec<String>), String> {
        let binaries = &self.config.binaries;
        if let Some((first, rest)) = command.split_first() {
            let base = Path::new(first).file_name().and_then(|f| f.to_str()).unwrap_or(first);
            if let Some(path) = binaries.get(first).or_else(|| binaries.get(base)) {
                return Ok((path.clone(), rest.to_vec()));
            }
            if self.config.allow_host_commands
                && let Some(path) = find_on_path(first) {
                    return Ok((path, rest.to_vec()));
                }
            return Err(format!("no local binary for command {first:?}: map it with --bin {base}=PATH"));
        }
        let without_digest = image.split('@').next().unwrap_or(image);
        let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
        let strip_tag = |s: &str| -> String {
            match s.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => repo.to_owned(),
                _ => s.to_owned(),
            }
        };
        for key in [image.to_owned(), strip_tag(without_digest), strip_tag(last)] {
            if let Some(path) = binaries.get(&key) {
                return Ok((path.clone(), Vec::new()));
            }
        }
        Err(format!(
            "no local binary for image {image:?} (the container has no command): map it with --bin {}=PATH",
            strip_tag(last)
        ))
    }

    pub(crate) fn pod_api(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    /// Removes a stopped pod's object, as the kubelet does once its containers are gone.
    pub(crate) async fn remove_pod(&self, ns: &str, name: &str, uid: &str) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(kube::api::Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pod_api(ns).delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => tracing::warn!(error = %e, %name, "removing a stopped pod failed"),
        }
    }
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let candidate = Path::new(program);
    if candidate.is_absolute() {
        return candidate.is_file().then(|| candidate.to_path_buf());
    }
    if program.contains('/') {
        return None;
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the pool is process-wide, so parallel tests would see each other's addresses.
    #[test]
    fn addresses_are_unique_reused_and_skip_busy_ports() {
        let a = allocate_address(&[]).unwrap();
        let b = allocate_address(&[]).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.octets()[0], 127);
        release_address(a);
        let c = allocate_address(&[]).unwrap();
        assert_eq!(a, c, "the lowest free address comes back");
        release_address(c);
        let busy = std::net::TcpListener::bind((a, 0)).unwrap();
        let port = busy.local_addr().unwrap().port();
        let d = allocate_address(&[port]).unwrap();
        assert_ne!(d, a, "an address with a busy port is skipped");
        release_address(b);
        release_address(d);
    }
}
