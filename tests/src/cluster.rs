//! A whole test cluster for one test: the API emulator and the pod runner in-process, a
//! kubeconfig and a private kubectl cache in a temporary directory, and a kube-rs client.
//! Or the same as a separate process ([`ControlPlaneProcess`]), for tests that want to
//! restart things around it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};

use crate::apiserver::{ControlPlane, ControlPlaneConfig};
use crate::kubectl::Kubectl;
use crate::podrunner::{PodRunner, PodRunnerConfig};
use crate::process::{ChildProcess, wait_for_http, wait_until};

/// What to start.
#[derive(Debug, Clone)]
pub struct TestClusterConfig {
    /// Run a pod runner (a node). Without one, pods stay Pending, as in a cluster with no nodes.
    pub pod_runner: bool,
    /// Command or image name → local binary, for the pod runner.
    pub binaries: BTreeMap<String, PathBuf>,
    /// Short probe periods and restart back-off, so tests do not wait on real-cluster timings.
    pub fast: bool,
    /// With `fast`: the cap on probe periods and initial delays (250 ms by default; a test
    /// with hundreds of pods may want a longer one, so probes do not crowd out the work).
    pub probe_period: Duration,
    pub control_plane: ControlPlaneConfig,
}

impl Default for TestClusterConfig {
    fn default() -> Self {
        Self {
            pod_runner: true,
            binaries: BTreeMap::new(),
            fast: true,
            probe_period: Duration::from_millis(250),
            control_plane: ControlPlaneConfig::default(),
        }
    }
}

impl TestClusterConfig {
    pub fn binary(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.binaries.insert(name.into(), path.into());
        self
    }

    pub fn without_pod_runner(mut self) -> Self {
        self.pod_runner = false;
        self
    }
}

pub struct TestCluster {
    control_plane: ControlPlane,
    runner: Option<PodRunner>,
    client: kube::Client,
    kubeconfig: PathBuf,
    dir: tempfile::TempDir,
}

impl TestCluster {
    /// The API emulator and a pod runner with test timings.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(TestClusterConfig::default()).await
    }

    pub async fn start_with(config: TestClusterConfig) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("wa-test-cluster-").tempdir()?;
        let mut runner_config = PodRunnerConfig::new(dir.path().join("node"));
        runner_config.binaries = config.binaries.clone();
        if config.fast {
            runner_config.max_probe_period = Some(config.probe_period);
            runner_config.restart_backoff = Duration::from_millis(200);
            runner_config.restart_backoff_max = Duration::from_secs(2);
            runner_config.shutdown_grace = Duration::from_secs(2);
        }
        let mut cp_config = config.control_plane.clone();
        if config.pod_runner {
            cp_config.pod_log_dir = Some(runner_config.log_dir());
        }
        let control_plane = ControlPlane::start(cp_config).await?;
        let kubeconfig = dir.path().join("kubeconfig");
        control_plane.write_kubeconfig(&kubeconfig, "default")?;
        let client = control_plane.client()?;
        let runner = if config.pod_runner {
            Some(PodRunner::start(client.clone(), runner_config).await?)
        } else {
            None
        };
        Ok(Self {
            control_plane,
            runner,
            client,
            kubeconfig,
            dir,
        })
    }

    pub fn client(&self) -> kube::Client {
        self.client.clone()
    }

    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    pub fn url(&self) -> String {
        self.control_plane.url()
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A temporary directory that lives as long as the cluster.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Leaves the temporary directory (logs, volumes) in place when the cluster goes, for a
    /// post-mortem of a failed test.
    pub fn keep_files(&mut self) {
        self.dir.disable_cleanup(true);
    }

    /// The pod runner's configuration (data and log directories).
    pub fn node(&self) -> Option<&PodRunnerConfig> {
        self.runner.as_ref().map(PodRunner::config)
    }

    /// Real kubectl against this cluster (fails if kubectl is not installed).
    pub fn kubectl(&self) -> anyhow::Result<Kubectl> {
        Kubectl::new(&self.kubeconfig, &self.dir.path().join("kubectl-cache"))
    }

    /// Registers the WhatsAppSession CRD (the committed YAML) and waits until it is served.
    pub async fn install_crd(&self) -> anyhow::Result<()> {
        install_session_crd(&self.client).await
    }

    /// Stops the pod runner's containers gracefully, then the control plane.
    pub async fn shutdown(mut self) {
        if let Some(runner) = self.runner.take() {
            runner.shutdown().await;
        }
        self.control_plane.shutdown().await;
    }
}

/// Applies `crds/whatsappsession.yaml` (as `wa_api` generates it) and waits for Established.
pub async fn install_session_crd(client: &kube::Client) -> anyhow::Result<()> {
    let crd: CustomResourceDefinition = serde_yaml::from_str(&wa_api::crd::crd_yaml())?;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.metadata.name.clone().context("the CRD has no name")?;
    api.patch(&name, &PatchParams::apply("wa-tests").force(), &Patch::Apply(&crd)).await?;
    let established = kube::runtime::wait::conditions::is_crd_established();
    tokio::time::timeout(Duration::from_secs(10), kube::runtime::wait::await_condition(api, &name, established))
        .await
        .context("the CRD was not established within 10s")??;
    Ok(())
}

/// Waits until the object's `status.conditions` has `condition` with status `True`.
pub async fn wait_for_condition<K>(api: &Api<K>, name: &str, condition: &str, timeout: Duration) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K::DynamicType: Default,
{
    let what = format!("{} {name} to be {condition}", K::kind(&K::DynamicType::default()));
    wait_until(timeout, &what, || async {
        let obj = api.get_opt(name).await.ok()??;
        let value = serde_json::to_value(&obj).ok()?;
        let met = value["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == condition && c["status"] == "True");
        met.then_some(obj)
    })
    .await
}

/// `test-control-plane` as a separate process.
pub struct ControlPlaneProcess {
    process: ChildProcess,
    kubeconfig: PathBuf,
    url: String,
}

impl ControlPlaneProcess {
    /// Starts the binary with `--bin` mappings and waits until it serves.
    pub async fn start(binary: &Path, dir: &Path, binaries: &BTreeMap<String, PathBuf>, extra_args: &[String]) -> anyhow::Result<Self> {
        let kubeconfig = dir.join("kubeconfig");
        let mut args = vec![
            "--kubeconfig".to_owned(),
            kubeconfig.display().to_string(),
            "--data-dir".to_owned(),
            dir.join("data").display().to_string(),
        ];
        for (name, path) in binaries {
            args.push("--bin".into());
            args.push(format!("{name}={}", path.display()));
        }
        args.extend_from_slice(extra_args);
        let process = ChildProcess::spawn("test-control-plane", binary, &args, &[], dir)?;
        let kubeconfig_for_wait = kubeconfig.clone();
        let url = wait_until(Duration::from_secs(20), "test-control-plane to write its kubeconfig", || {
            let path = kubeconfig_for_wait.clone();
            async move {
                let text = std::fs::read_to_string(path).ok()?;
                text.lines()
                    .find_map(|l| l.trim().strip_prefix("server: "))
                    .map(str::to_owned)
            }
        })
        .await
        .with_context(|| format!("test-control-plane log:\n{}", process.log_tail(30)))?;
        wait_for_http(&format!("{url}/readyz"), Duration::from_secs(10)).await?;
        Ok(Self { process, kubeconfig, url })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let config = kube::Config::new(self.url.parse()?);
        Ok(kube::Client::try_from(config)?)
    }
}
