//! The pod runner with real processes: a Python stand-in container (tests/fixtures/pod.py)
//! bound to the pod's own loopback address, its claim on a host directory, probes, restarts,
//! and graceful deletion.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use wa_tests::process::wait_until;
use wa_tests::{TestCluster, TestClusterConfig};

use crate::{WAIT, repo_root};

fn fixture() -> String {
    repo_root().join("tests/fixtures/pod.py").display().to_string()
}

fn program(name: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is needed on PATH for the pod runner's tests"))
}

async fn cluster() -> TestCluster {
    // `fake-session` stands for wa-session: the command name the pod uses, mapped to a program.
    TestCluster::start_with(TestClusterConfig::default().binary("fake-session", program("python3")))
        .await
        .expect("starting the cluster")
}

fn pods(cluster: &TestCluster) -> Api<Pod> {
    Api::default_namespaced(cluster.client())
}

async fn create<K>(cluster: &TestCluster, obj: Value) -> K
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()> + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let api: Api<K> = Api::default_namespaced(cluster.client());
    api.create(&PostParams::default(), &serde_json::from_value(obj).unwrap()).await.unwrap()
}

/// A session-like pod: env from the downward API, a Secret and `$(VAR)` expansion, the claim
/// at /data, an emptyDir at /tmp, and HTTP probes on the pod's address.
fn session_pod(name: &str, claim: &str, extra_env: Value) -> Value {
    let mut env = vec![
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "LISTEN", "value": "$(POD_IP):8080"}),
        json!({"name": "DATA_DIR", "value": "/data/state"}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}),
        json!({"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "token", "key": "token"}}}),
    ];
    env.extend(extra_env.as_array().cloned().unwrap_or_default());
    json!({
        "metadata": {"name": name, "labels": {"app": "fake-session"}},
        "spec": {
            "terminationGracePeriodSeconds": 3,
            "containers": [{
                "name": "session",
                "image": "ghcr.io/wa-operator/wa-session:0.1.0",
                "command": ["fake-session"],
                "args": [fixture(), "--data=/data/state", "--listen=$(LISTEN)"],
                "env": env,
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 2},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "initialDelaySeconds": 1, "periodSeconds": 10, "failureThreshold": 2},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [
                {"name": "data", "persistentVolumeClaim": {"claimName": claim}},
                {"name": "tmp", "emptyDir": {}},
            ],
        }
    })
}

async fn claim_and_token(cluster: &TestCluster, claim: &str) -> PathBuf {
    let _: Secret = create(cluster, json!({"metadata": {"name": "token"}, "stringData": {"token": "t0k3n"}})).await;
    let pvc: PersistentVolumeClaim = create(cluster, json!({"metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}})).await;
    let pvcs: Api<PersistentVolumeClaim> = Api::default_namespaced(cluster.client());
    let name = pvc.metadata.name.clone().unwrap();
    let volume = wait_until(WAIT, "the claim to bind", || {
        let (pvcs, name) = (pvcs.clone(), name.clone());
        async move {
            let pvc = pvcs.get(&name).await.ok()?;
            (pvc.status?.phase.as_deref() == Some("Bound")).then_some(pvc.spec?.volume_name?)
        }
    })
    .await
    .unwrap();
    cluster.node().unwrap().volume_dir(&volume)
}

async fn wait_ready(cluster: &TestCluster, name: &str) -> Pod {
    wa_tests::cluster::wait_for_condition(&pods(cluster), name, "Ready", WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}; pod log:\n{}", log_of(cluster, name)))
}

fn log_of(cluster: &TestCluster, pod: &str) -> String {
    let dir = cluster.node().unwrap().log_dir().join("default");
    let Ok(entries) = std::fs::read_dir(&dir) else { return String::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{pod}_")))
        .filter_map(|e| std::fs::read_to_string(e.path().join("session.log")).ok())
        .collect::<Vec<_>>()
        .join("\n")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_with_its_env_volume_address_and_probes() {
    let cluster = cluster().await;
    let volume = claim_and_token(&cluster, "wa-a-auth").await;
    let mut first = session_pod("wa-a", "wa-a-auth", json!([]));
    first["spec"]["terminationGracePeriodSeconds"] = json!(30);
    create::<Pod>(&cluster, first).await;
    let pod = wait_ready(&cluster, "wa-a").await;
    let status = pod.status.clone().unwrap();
    let ip = status.pod_ip.clone().unwrap();
    assert!(ip.starts_with("127.0.") && ip != "127.0.0.1", "its own loopback address: {ip}");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    let cs = &status.container_statuses.unwrap()[0];
    assert!(cs.ready && cs.started == Some(true) && cs.restart_count == 0);
    assert_eq!(pod.spec.as_ref().unwrap().node_name.as_deref(), Some("wa-test-node"));

    // The process got the kubelet's environment, with /data mapped to the claim's directory.
    let recorded = read_json(&volume.join("state/env.json"));
    let env = &recorded["env"];
    assert_eq!(env["LISTEN"], format!("{ip}:8080"), "$(POD_IP) expanded");
    assert_eq!(env["POD_NAME"], "wa-a");
    assert_eq!(env["POD_NAMESPACE"], "default");
    assert_eq!(env["TOKEN"], "t0k3n");
    assert_eq!(env["HOSTNAME"], "wa-a");
    assert_eq!(env["DATA_DIR"], volume.join("state").display().to_string());
    let tmp = env["TMPDIR"].as_str().unwrap();
    assert!(tmp.ends_with("/volumes/tmp") && Path::new(tmp).is_dir(), "{tmp}");
    assert_eq!(recorded["argv"][1], format!("--data={}", volume.join("state").display()));
    assert_eq!(recorded["argv"][2], format!("--listen={ip}:8080"));

    // Reachable on its address, and `kubectl logs` shows its output.
    let answer = reqwest::Client::builder().no_proxy().build().unwrap().get(format!("http://{ip}:8080/readyz")).send().await.unwrap();
    assert_eq!(answer.status(), 200);
    let kubectl = cluster.kubectl().unwrap();
    let logs = kubectl.ok(&["logs", "wa-a"]).await.unwrap();
    assert!(logs.contains(&format!("listening on {ip}:8080")), "{logs}");
    let table = kubectl.ok(&["get", "pod", "wa-a", "-o", "wide", "--no-headers"]).await.unwrap();
    assert!(table.contains("1/1") && table.contains("Running") && table.contains(&ip), "{table}");

    // Deleting sends SIGTERM, waits for the process, then removes the object.
    let started = Instant::now();
    kubectl.ok(&["delete", "pod", "wa-a", "--timeout=20s"]).await.unwrap();
    assert!(pods(&cluster).get_opt("wa-a").await.unwrap().is_none());
    assert!(started.elapsed() < Duration::from_secs(15), "a process that stops at SIGTERM is not waited on for its 30 s grace");
    assert_eq!(std::fs::read_to_string(volume.join("state/terminated")).unwrap(), "SIGTERM\n");

    // The claim outlives the pod: a new pod on it finds the old state.
    create::<Pod>(&cluster, session_pod("wa-a", "wa-a-auth", json!([]))).await;
    wait_ready(&cluster, "wa-a").await;
    assert_eq!(std::fs::read_to_string(volume.join("state/starts")).unwrap(), "start\nstart\n");
    // Deleting the claim (once no pod uses it) deletes its directory.
    pods(&cluster).delete("wa-a", &DeleteParams::default()).await.unwrap();
    let pvcs: Api<PersistentVolumeClaim> = Api::default_namespaced(cluster.client());
    pvcs.delete("wa-a-auth", &DeleteParams::default()).await.unwrap();
    wait_until(WAIT, "the claim's directory to go", || {
        let gone = !volume.exists();
        async move { gone.then_some(()) }
    })
    .await
    .unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_failures_and_crashes_restart_containers() {
    let cluster = cluster().await;
    claim_and_token(&cluster, "claim").await;
    // /healthz answers 500: the liveness probe fails and the kubelet restarts the container.
    create::<Pod>(&cluster, session_pod("unhealthy", "claim", json!([{"name": "HEALTH", "value": "fail"}]))).await;
    let api = pods(&cluster);
    let restarted = wait_until(WAIT, "a liveness restart", || {
        let api = api.clone();
        async move {
            let pod = api.get("unhealthy").await.ok()?;
            let cs = pod.status?.container_statuses?.into_iter().next()?;
            (cs.restart_count >= 1).then_some(cs)
        }
    })
    .await
    .unwrap();
    let last = restarted.last_state.unwrap().terminated.unwrap();
    assert!(last.finished_at.is_some());
    let events = cluster.kubectl().unwrap().ok(&["get", "events", "--field-selector", "involvedObject.name=unhealthy"]).await.unwrap();
    assert!(events.contains("Unhealthy") && events.contains("Liveness probe failed"), "{events}");

    // A crashing container restarts with back-off under Always, and not under Never.
    for (name, policy) in [("crash-always", "Always"), ("crash-never", "Never")] {
        create::<Pod>(&cluster, json!({"metadata": {"name": name}, "spec": {"restartPolicy": policy,
            "containers": [{"name": "c", "image": "busybox", "command": ["sh", "-c", "echo crashing; exit 3"]}]}}))
        .await;
    }
    let always = wait_until(WAIT, "crash-always to restart twice", || {
        let api = api.clone();
        async move {
            let pod = api.get("crash-always").await.ok()?;
            let cs = pod.status?.container_statuses?.into_iter().next()?;
            (cs.restart_count >= 2).then_some(cs)
        }
    })
    .await
    .unwrap();
    assert_eq!(always.last_state.unwrap().terminated.unwrap().exit_code, 3);
    let never = wait_until(WAIT, "crash-never to fail", || {
        let api = api.clone();
        async move {
            let pod = api.get("crash-never").await.ok()?;
            let status = pod.status?;
            (status.phase.as_deref() == Some("Failed")).then_some(status)
        }
    })
    .await
    .unwrap();
    let cs = &never.container_statuses.unwrap()[0];
    assert_eq!((cs.restart_count, cs.state.as_ref().unwrap().terminated.as_ref().unwrap().exit_code), (0, 3));
    let table = cluster.kubectl().unwrap().ok(&["get", "pod", "crash-always", "--no-headers"]).await.unwrap();
    assert!(table.contains("CrashLoopBackOff") || table.contains("Error") || table.contains("Running"), "{table}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grace_period_ends_in_sigkill() {
    let cluster = cluster().await;
    let volume = claim_and_token(&cluster, "claim").await;
    let mut pod = session_pod("stubborn", "claim", json!([{"name": "IGNORE_TERM", "value": "1"}]));
    pod["spec"]["terminationGracePeriodSeconds"] = json!(1);
    create::<Pod>(&cluster, pod).await;
    wait_ready(&cluster, "stubborn").await;
    let started = Instant::now();
    let answer = pods(&cluster).delete("stubborn", &DeleteParams::default()).await.unwrap();
    let pending = answer.left().expect("a running pod is not gone at once");
    assert_eq!(pending.metadata.deletion_grace_period_seconds, Some(1));
    let api = pods(&cluster);
    wait_until(WAIT, "the pod to be removed", || {
        let api = api.clone();
        async move { api.get_opt("stubborn").await.ok()?.is_none().then_some(()) }
    })
    .await
    .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(1), "the grace period was honoured ({took:?})");
    assert!(took < Duration::from_secs(10), "then SIGKILL, not an endless wait ({took:?})");
    assert_eq!(std::fs::read_to_string(volume.join("state/terminated")).unwrap(), "SIGTERM\n");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_and_misconfigured_pods_say_why() {
    let cluster = cluster().await;
    let api = pods(&cluster);
    // No claim yet: the pod stays unscheduled, and says so; creating the claim schedules it.
    create::<Pod>(&cluster, session_pod("waiting", "later", json!([]))).await;
    let condition = wait_until(WAIT, "the Unschedulable condition", || {
        let api = api.clone();
        async move {
            let pod = api.get("waiting").await.ok()?;
            pod.status?.conditions?.into_iter().find(|c| c.type_ == "PodScheduled" && c.status == "False")
        }
    })
    .await
    .unwrap();
    assert_eq!(condition.reason.as_deref(), Some("Unschedulable"));
    assert!(condition.message.unwrap().contains("persistentvolumeclaim \"later\" not found"));
    // The Secret is missing too: scheduled, but the container cannot be configured.
    let _pvc: PersistentVolumeClaim = create(&cluster, json!({"metadata": {"name": "later"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Mi"}}}})).await;
    let waiting = wait_until(WAIT, "CreateContainerConfigError", || {
        let api = api.clone();
        async move {
            let pod = api.get("waiting").await.ok()?;
            let cs = pod.status?.container_statuses?.into_iter().next()?;
            cs.state?.waiting.filter(|w| w.reason.as_deref() == Some("CreateContainerConfigError"))
        }
    })
    .await
    .unwrap();
    assert_eq!(waiting.message.as_deref(), Some("secret \"token\" not found"));
    let _: Secret = create(&cluster, json!({"metadata": {"name": "token"}, "stringData": {"token": "x"}})).await;
    wait_ready(&cluster, "waiting").await;

    // A command with no local binary (and none on PATH) is reported, not run.
    create::<Pod>(&cluster, json!({"metadata": {"name": "unmapped"}, "spec": {"containers": [
        {"name": "c", "image": "ghcr.io/wa-operator/wa-gateway:0.1.0", "command": ["wa-nonexistent-binary"]}]}})).await;
    let waiting = wait_until(WAIT, "the missing binary to be reported", || {
        let api = api.clone();
        async move {
            let pod = api.get("unmapped").await.ok()?;
            let cs = pod.status?.container_statuses?.into_iter().next()?;
            cs.state?.waiting.filter(|w| w.reason.as_deref() == Some("ErrImageNeverPull"))
        }
    })
    .await
    .unwrap();
    assert!(waiting.message.unwrap().contains("no local binary for command \"wa-nonexistent-binary\""));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_found_by_image_when_they_have_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("entrypoint.sh");
    std::fs::write(&script, "#!/bin/sh\necho \"entrypoint ran with $*\"\nexec sleep 30\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = TestClusterConfig {
        binaries: BTreeMap::from([("wa-session".to_owned(), script.clone())]),
        ..TestClusterConfig::default()
    };
    let cluster = TestCluster::start_with(config).await.unwrap();
    create::<Pod>(&cluster, json!({"metadata": {"name": "by-image"}, "spec": {"containers": [
        {"name": "session", "image": "ghcr.io/wa-operator/wa-session:0.1.0", "args": ["--flag"]}]}})).await;
    wait_ready(&cluster, "by-image").await;
    let logs = cluster.kubectl().unwrap().ok(&["logs", "by-image"]).await.unwrap();
    assert_eq!(logs.trim(), "entrypoint ran with --flag");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_cluster_kills_its_pods() {
    let cluster = TestCluster::start().await.unwrap();
    let pid_file = cluster.dir().join("pid");
    create::<Pod>(&cluster, json!({"metadata": {"name": "sleeper"}, "spec": {"containers": [{"name": "c", "image": "sh",
        // `$$$$`: the kubelet's expansion turns `$$` into `$`, so the shell sees `$$`.
        "command": ["sh", "-c", format!("echo $$$$ > {}; exec sleep 60", pid_file.display())]}]}}))
    .await;
    let pid: i32 = wait_until(WAIT, "the process to start", || {
        let path = pid_file.clone();
        async move { std::fs::read_to_string(path).ok()?.trim().parse().ok() }
    })
    .await
    .unwrap();
    drop(cluster);
    wait_until(Duration::from_secs(5), "the pod's process to be killed", || async {
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
        gone.then_some(())
    })
    .await
    .unwrap();
}
