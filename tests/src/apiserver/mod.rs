//! A Kubernetes API server emulator, in memory, for tests: real kubectl and kube-rs talk to it
//! over HTTP unmodified. What it does and does not do is written down in `tests/README.md`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use wa_tests::apiserver::{ControlPlane, ControlPlaneConfig};
//! let cp = ControlPlane::start(ControlPlaneConfig::default()).await?;
//! cp.write_kubeconfig(std::path::Path::new("/tmp/kubeconfig"), "default")?;
//! let client = cp.client()?;
//! # Ok(()) }
//! ```

pub mod admission;
pub mod apply;
pub mod catalog;
pub mod controllers;
pub mod discovery;
pub mod events;
pub mod fieldpath;
pub mod http;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod status;
pub mod store;
pub mod table;
pub mod workloads;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use self::catalog::Catalog;
use self::registry::{State, WriteOptions};
use self::store::Store;

/// How to run the emulator. The defaults are a real API server's, but for the listen address.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// `127.0.0.1:0` picks a free port.
    pub listen: SocketAddr,
    /// How many changes watches can resume across; older versions answer 410 Gone.
    pub history_capacity: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// How often the controllers (garbage collector, namespaces, volumes) re-check everything.
    pub controller_resync: Duration,
    /// Where the pod runner writes container logs (`kubectl logs` reads them).
    pub pod_log_dir: Option<PathBuf>,
    /// Namespaces that exist from the start.
    pub namespaces: Vec<String>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            history_capacity: 10_000,
            bookmark_interval: Duration::from_secs(60),
            controller_resync: Duration::from_secs(5),
            pod_log_dir: None,
            namespaces: ["default", "kube-system", "kube-public", "kube-node-lease"]
                .map(String::from)
                .to_vec(),
        }
    }
}

/// A running emulator. Dropping it stops serving (open watches end).
pub struct ControlPlane {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl ControlPlane {
    pub async fn start(config: ControlPlaneConfig) -> anyhow::Result<Self> {
        let mut state = State {
            catalog: Catalog::new(),
            store: Store::new(config.history_capacity),
        };
        let namespaces = state
            .catalog
            .find("", "v1", "namespaces")
            .cloned()
            .context("the catalog has no namespaces")?;
        let opts = WriteOptions {
            field_manager: "kube-apiserver".into(),
            ..Default::default()
        };
        for ns in &config.namespaces {
            registry::create(&mut state, &namespaces, "", json!({"metadata": {"name": ns}}), &opts, None)
                .map_err(|e| anyhow::anyhow!("creating namespace {ns}: {e}"))?;
        }
        let changes = state.store.subscribe();
        let state = Arc::new(Mutex::new(state));
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the API server to {}", config.listen))?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let shared = Arc::new(http::Shared::new(
            state.clone(),
            changes.clone(),
            addr.to_string(),
            config.bookmark_interval,
            config.pod_log_dir.clone(),
            shutdown.clone(),
        ));
        let app = axum::Router::new().fallback(http::serve).with_state(shared);
        let server_shutdown = shutdown.clone();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(server_shutdown.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "API server stopped");
            }
        });
        let controllers = tokio::spawn(controllers::run(state.clone(), changes, config.controller_resync, shutdown.clone()));
        tracing::info!(%addr, "test control plane serving");
        Ok(Self {
            addr,
            state,
            shutdown,
            tasks: vec![server, controllers],
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).store.current_rv()
    }

    /// A kubeconfig for kubectl and kube-rs: plain HTTP, no credentials.
    pub fn kubeconfig(&self, namespace: &str) -> String {
        kubeconfig_yaml(&self.url(), namespace)
    }

    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        write_atomically(path, &self.kubeconfig(namespace))
    }

    /// A kube-rs client for this control plane, default namespace `default`.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.url().parse()?);
        Ok(kube::Client::try_from(config)?)
    }

    /// Stops serving and waits for the server and controllers to end.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

pub fn kubeconfig_yaml(server: &str, namespace: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: wa-test\n  cluster:\n    server: {server}\ncontexts:\n- name: wa-test\n  context:\n    cluster: wa-test\n    user: wa-test\n    namespace: {namespace}\ncurrent-context: wa-test\nusers:\n- name: wa-test\n  user: {{}}\npreferences: {{}}\n"
    )
}

/// Writes then renames, so a reader never sees half a file.
pub fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}
