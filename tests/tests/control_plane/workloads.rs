//! apps/v1 on the emulator with real kubectl and real processes: a Deployment shaped like the
//! Helm chart's (Recreate, named probe ports, a claim, an emptyDir, the downward API) runs its
//! pods through a ReplicaSet; `kubectl rollout status`, `wait --for=condition=Available`,
//! `scale`, `rollout restart`, `rollout undo` and `delete` behave as against a cluster; a rollout never has
//! pods of two templates at once; NetworkPolicies and PodDisruptionBudgets are accepted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::Value;
use wa_tests::process::wait_until;
use wa_tests::{TestCluster, TestClusterConfig};

use crate::{WAIT, repo_root};

fn python() -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("python3"))
        .find(|p| p.is_file())
        .expect("python3 is needed on PATH for the workload tests")
}

fn manifest(replicas: u32) -> String {
    let fixture = repo_root().join("tests/fixtures/pod.py").display().to_string();
    format!(
        r#"apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: web-data}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 16Mi}}}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {{app.kubernetes.io/name: web}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app.kubernetes.io/name: web, app.kubernetes.io/component: server}}
  strategy: {{type: Recreate}}
  template:
    metadata:
      labels: {{app.kubernetes.io/name: web, app.kubernetes.io/component: server}}
    spec:
      securityContext: {{runAsNonRoot: true, runAsUser: 65532, fsGroup: 65532}}
      containers:
        - name: server
          image: ghcr.io/example/web:1.0
          command: [fake-web]
          args: ["{fixture}"]
          env:
            - name: POD_IP
              valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
            - name: POD_NAME
              valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
            - name: LISTEN
              value: $(POD_IP):8080
            - name: DATA_DIR
              value: /data/$(POD_NAME)
          ports: [{{name: http, containerPort: 8080}}]
          readinessProbe: {{httpGet: {{path: /readyz, port: http}}, periodSeconds: 5}}
          livenessProbe: {{httpGet: {{path: /healthz, port: http}}, initialDelaySeconds: 5, periodSeconds: 20}}
          securityContext: {{allowPrivilegeEscalation: false, readOnlyRootFilesystem: true, capabilities: {{drop: [ALL]}}}}
          volumeMounts:
            - {{name: data, mountPath: /data}}
            - {{name: tmp, mountPath: /tmp}}
      volumes:
        - name: data
          persistentVolumeClaim: {{claimName: web-data}}
        - name: tmp
          emptyDir: {{}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web}}
spec:
  podSelector: {{matchLabels: {{app.kubernetes.io/name: web}}}}
  ingress: [{{from: [{{podSelector: {{matchLabels: {{role: client}}}}}}], ports: [{{port: 8080}}]}}]
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata: {{name: web}}
spec:
  maxUnavailable: 1
  selector: {{matchLabels: {{app.kubernetes.io/name: web}}}}
"#
    )
}

/// Pod template hashes alive at each change, from a watch (every change, in order).
struct TemplateCensus {
    mixed: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TemplateCensus {
    fn start(client: kube::Client) -> Self {
        let mixed: Arc<Mutex<Vec<String>>> = Arc::default();
        let api: Api<Pod> = Api::default_namespaced(client);
        let task = {
            let mixed = mixed.clone();
            tokio::spawn(async move {
                let mut live: BTreeMap<String, String> = BTreeMap::new();
                let mut stream = std::pin::pin!(watcher(api, watcher::Config::default().labels("app.kubernetes.io/name=web")).default_backoff());
                while let Some(event) = stream.next().await {
                    let (pod, gone) = match event {
                        Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => (p, false),
                        Ok(watcher::Event::Delete(p)) => (p, true),
                        _ => continue,
                    };
                    let uid = pod.metadata.uid.clone().unwrap_or_default();
                    if gone {
                        live.remove(&uid);
                    } else {
                        let hash = pod.metadata.labels.as_ref().and_then(|l| l.get("pod-template-hash")).cloned().unwrap_or_default();
                        live.insert(uid, hash);
                    }
                    if live.values().collect::<BTreeSet<_>>().len() > 1 {
                        mixed.lock().unwrap().push(format!("{live:?}"));
                    }
                }
            })
        };
        Self { mixed, task }
    }
}

impl Drop for TemplateCensus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn web_pods(kubectl: &wa_tests::Kubectl) -> Vec<Value> {
    let list = kubectl.get_json(&["pods", "-l", "app.kubernetes.io/name=web"]).await.unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

async fn wait_for_pods(kubectl: &wa_tests::Kubectl, count: usize, what: &str) -> Vec<Value> {
    wait_until(WAIT, what, || async {
        let pods = web_pods(kubectl).await;
        let live = pods.iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).count();
        (live == count && pods.len() == count).then_some(pods)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_roll_out_scale_and_restart_with_kubectl() {
    let cluster = TestCluster::start_with(TestClusterConfig::default().binary("fake-web", python())).await.unwrap();
    let kubectl = cluster.kubectl().unwrap();
    let census = TemplateCensus::start(cluster.client());

    let out = kubectl.apply(&manifest(2), &[]).await.unwrap();
    for created in ["persistentvolumeclaim/web-data created", "deployment.apps/web created", "networkpolicy.networking.k8s.io/web created",
        "poddisruptionbudget.policy/web created"]
    {
        assert!(out.contains(created), "{out}");
    }
    let status = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]).await.unwrap();
    assert!(status.contains("successfully rolled out"), "{status}");
    kubectl.ok(&["wait", "--for=condition=Available", "deployment/web", "--timeout=30s"]).await.unwrap();
    let table = kubectl.ok(&["get", "deployment", "web", "--no-headers"]).await.unwrap();
    assert_eq!(table.split_whitespace().take(4).collect::<Vec<_>>(), ["web", "2/2", "2", "2"], "{table}");
    let rs = kubectl.get_json(&["replicasets", "-l", "app.kubernetes.io/name=web"]).await.unwrap();
    let [rs] = rs["items"].as_array().unwrap().as_slice() else { panic!("one ReplicaSet: {rs}") };
    let rs_name = rs["metadata"]["name"].as_str().unwrap().to_owned();
    assert_eq!(rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");
    let pods = web_pods(&kubectl).await;
    assert_eq!(pods.len(), 2);
    for pod in &pods {
        assert!(pod["metadata"]["name"].as_str().unwrap().starts_with(&format!("{rs_name}-")));
        assert_eq!(pod["metadata"]["ownerReferences"][0]["name"], rs_name.as_str());
        assert_eq!(pod["status"]["phase"], "Running");
    }
    // The processes really run, each with its pod's name, on the claim.
    let first_name = pods[0]["metadata"]["name"].as_str().unwrap();
    let events = kubectl.ok(&["get", "events", "--field-selector", &format!("involvedObject.name={first_name},reason=Started")]).await.unwrap();
    assert!(events.contains("Started"), "{events}");

    // A lost pod is replaced.
    let lost = pods[0]["metadata"]["uid"].clone();
    kubectl.ok(&["delete", "pod", first_name, "--wait=false"]).await.unwrap();
    let pods = wait_for_pods(&kubectl, 2, "two pods after one was deleted").await;
    assert!(pods.iter().all(|p| p["metadata"]["uid"] != lost));

    // Scale through the scale subresource.
    let out = kubectl.ok(&["scale", "deployment/web", "--replicas=3"]).await.unwrap();
    assert!(out.contains("scaled"), "{out}");
    wait_for_pods(&kubectl, 3, "three pods").await;
    kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]).await.unwrap();
    let raw = kubectl.ok(&["get", "--raw", "/apis/apps/v1/namespaces/default/deployments/web/scale"]).await.unwrap();
    let scale: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(scale["spec"]["replicas"], 3);
    assert_eq!(scale["status"]["selector"], "app.kubernetes.io/component=server,app.kubernetes.io/name=web");
    kubectl.ok(&["scale", "deployment/web", "--replicas=1"]).await.unwrap();
    wait_for_pods(&kubectl, 1, "one pod").await;

    // A new template (rollout restart) rolls: old pods go before new ones start.
    let before: Vec<Value> = web_pods(&kubectl).await.iter().map(|p| p["metadata"]["uid"].clone()).collect();
    kubectl.ok(&["rollout", "restart", "deployment/web"]).await.unwrap();
    let status = kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]).await.unwrap();
    assert!(status.contains("successfully rolled out"), "{status}");
    let after = wait_for_pods(&kubectl, 1, "the restarted pod").await;
    assert!(after.iter().all(|p| !before.contains(&p["metadata"]["uid"])));
    let deployment = kubectl.get_json(&["deployment", "web"]).await.unwrap();
    assert_eq!(deployment["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "2");
    assert_eq!(deployment["status"]["observedGeneration"], deployment["metadata"]["generation"]);
    // Back to the first template: its ReplicaSet serves again, as revision 3.
    kubectl.ok(&["rollout", "undo", "deployment/web"]).await.unwrap();
    kubectl.ok(&["rollout", "status", "deployment/web", "--timeout=60s"]).await.unwrap();
    let pods = wait_for_pods(&kubectl, 1, "the pod of the first template").await;
    assert!(pods[0]["metadata"]["name"].as_str().unwrap().starts_with(&format!("{rs_name}-")), "{}", pods[0]["metadata"]["name"]);
    let rs = kubectl.get_json(&["replicaset", &rs_name]).await.unwrap();
    assert_eq!(rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "3");
    assert!(census.mixed.lock().unwrap().is_empty(), "pods of two templates at once: {:?}", census.mixed.lock().unwrap());

    // Bad input is refused as a cluster refuses it.
    let bad = manifest(1).replace("matchLabels: {app.kubernetes.io/name: web, app.kubernetes.io/component: server}", "matchLabels: {app.kubernetes.io/name: other}");
    let out = kubectl.run_with_input(&["create", "-f", "-"], Some(&bad)).await.unwrap();
    assert!(!out.success);
    assert!(out.stderr.contains("`selector` does not match template `labels`"), "{}", out.stderr);

    // Deleting the Deployment takes its ReplicaSets and pods with it.
    kubectl.ok(&["delete", "deployment", "web", "--timeout=60s"]).await.unwrap();
    wait_until(WAIT, "the ReplicaSets and pods to go", || async {
        let rs = kubectl.get_json(&["replicasets"]).await.ok()?;
        (rs["items"].as_array()?.is_empty() && web_pods(&kubectl).await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(kubectl.get_json(&["pvc", "web-data"]).await.unwrap()["status"]["phase"], "Bound");
    cluster.shutdown().await;
}
