//! The `test-control-plane` binary: serves kubectl, runs pods, stops on SIGTERM and takes its
//! pods' processes with it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use serde_json::json;
use wa_tests::ControlPlaneProcess;
use wa_tests::kubectl::Kubectl;
use wa_tests::process::{wait_until, workspace_binary};

use crate::WAIT;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_runs_pods_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let binary = workspace_binary("test-control-plane").unwrap();
    let sleeper = dir.path().join("sleeper.sh");
    std::fs::write(&sleeper, "#!/bin/sh\necho $$ > \"$PID_FILE\"\nexec sleep 60\n").unwrap();
    std::fs::set_permissions(&sleeper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let binaries = BTreeMap::from([("sleeper".to_owned(), sleeper)]);
    let mut cp = ControlPlaneProcess::start(&binary, dir.path(), &binaries, &["--max-probe-period-ms".into(), "250".into()])
        .await
        .unwrap();
    let kubectl = Kubectl::new(cp.kubeconfig(), &dir.path().join("cache")).unwrap();
    let nodes = kubectl.ok(&["get", "nodes", "--no-headers"]).await.unwrap();
    assert!(nodes.contains("wa-test-node") && nodes.contains("Ready"), "{nodes}");

    let pid_file = dir.path().join("sleeper.pid");
    let pods: Api<Pod> = Api::default_namespaced(cp.client().await.unwrap());
    let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "sleeper"}, "spec": {"containers": [
        {"name": "c", "image": "sleeper:1", "command": ["sleeper"], "env": [{"name": "PID_FILE", "value": pid_file.display().to_string()}]}]}}))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pid: i32 = wait_until(WAIT, "the pod's process to start", || {
        let path = pid_file.clone();
        async move { std::fs::read_to_string(path).ok()?.trim().parse().ok() }
    })
    .await
    .unwrap();
    kubectl.ok(&["wait", "--for=condition=Ready", "pod/sleeper", "--timeout=20s"]).await.unwrap();

    let status = cp.process().stop(Duration::from_secs(10)).await.unwrap();
    assert!(status.success(), "test-control-plane exits cleanly on SIGTERM: {status:?}\n{}", cp.process().log_tail(20));
    // SAFETY: signal 0 only checks whether the process exists.
    let alive = unsafe { libc::kill(pid, 0) } == 0;
    assert!(!alive, "the pod's process was stopped with the control plane");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_refused() {
    let binary = workspace_binary("test-control-plane").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("k").display().to_string();
    let out = tokio::process::Command::new(&binary)
        .args(["--kubeconfig", &kubeconfig, "--bin", "wa-session=/does/not/exist"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--bin wa-session=/does/not/exist: no such file"), "{stderr}");
    let out = tokio::process::Command::new(&binary).args(["--kubeconfig", &kubeconfig, "--bin", "nonsense"]).output().await.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected NAME=PATH"));
}
