//! The test control plane's own tests: real kubectl and kube-rs against the API emulator, and
//! the pod runner running real processes. One test binary (one link) for all of them.

mod binary;
mod examples;
mod kube_client;
mod kubectl;
mod pod_runner;
mod workloads;

use std::path::PathBuf;
use std::time::Duration;

use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use wa_api::crd::WhatsAppSession;
use wa_tests::TestCluster;

/// The repository root (`tests/` is this crate).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A session manifest.
pub fn session(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "wa-operator.dev/v1alpha1", "kind": "WhatsAppSession", "metadata": {"name": name}, "spec": spec})
}

/// The sessions API as dynamic objects (the emulator must serve what any client sends).
pub fn sessions(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("wa-operator.dev", "v1alpha1", "WhatsAppSession");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "whatsappsessions");
    Api::namespaced_with(client.clone(), ns, &ar)
}

pub async fn create_session(client: &kube::Client, name: &str, spec: Value) -> WhatsAppSession {
    let obj: WhatsAppSession = serde_json::from_value(session(name, spec)).expect("a session manifest");
    Api::<WhatsAppSession>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &obj)
        .await
        .expect("creating a session")
}

/// A cluster with the CRD installed and no pod runner.
pub async fn api_only() -> TestCluster {
    let cluster = TestCluster::start_with(wa_tests::TestClusterConfig::default().without_pod_runner())
        .await
        .expect("starting the control plane");
    cluster.install_crd().await.expect("installing the CRD");
    cluster
}

pub const WAIT: Duration = Duration::from_secs(20);
