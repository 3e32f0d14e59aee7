//! The whole product on the test control plane, as a user runs it on a cluster: the API
//! emulator and the pod runner (in-process, [`TestCluster`]), the real `wa-gateway` in
//! Kubernetes mode and one or more real `wa-operator` replicas as processes, each given a
//! kubeconfig, flags and env exactly as a Deployment would give them. Session pods are the
//! real `wa-session`, started by the pod runner from the Pods the operator creates.
//!
//! What a cluster's Services would give, flags give here: the operator's `--gateway-url` is
//! the gateway's own address on 127.0.0.1 (pods get 127.0.x.y with y ≥ 2, so it never
//! collides with a pod), and both binaries read the kubeconfig from `KUBECONFIG`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use regex::Regex;
use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::cluster::{TestCluster, TestClusterConfig};
use crate::kubectl::Kubectl;
use crate::process::{ChildProcess, workspace_binary};

/// Time a binary gets to print its address after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Debug, Clone)]
pub struct StackConfig {
    pub cluster: TestClusterConfig,
    /// Namespace of the sessions (the binaries' `--namespace`).
    pub namespace: String,
    /// Identities of the operator replicas started with the stack.
    pub operators: Vec<String>,
    /// Extra flags of every operator replica (e.g. `--session-env`).
    pub operator_args: Vec<String>,
    /// Extra flags of the gateway.
    pub gateway_args: Vec<String>,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            cluster: TestClusterConfig::default(),
            namespace: "default".to_owned(),
            operators: vec!["operator-0".to_owned()],
            operator_args: Vec::new(),
            gateway_args: Vec::new(),
        }
    }
}

/// The binaries a stack runs, from the workspace's target directory.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub operator: PathBuf,
    pub gateway: PathBuf,
    pub session: PathBuf,
}

impl Binaries {
    /// `wa-operator`, `wa-gateway`, `wa-session` next to the running test; fails with the
    /// build command when one is missing.
    pub fn from_workspace() -> anyhow::Result<Self> {
        Ok(Self {
            operator: workspace_binary("wa-operator")?,
            gateway: workspace_binary("wa-gateway")?,
            session: workspace_binary("wa-session")?,
        })
    }
}

/// One `wa-operator` replica.
pub struct OperatorProcess {
    identity: String,
    process: ChildProcess,
    metrics_url: String,
    http: reqwest::Client,
}

impl OperatorProcess {
    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    pub fn metrics_url(&self) -> &str {
        &self.metrics_url
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let response = self.http.get(format!("{}/metrics", self.metrics_url)).send().await?;
        Ok(response.error_for_status()?.text().await?)
    }

    /// `wa_operator_leader` (1 while this replica leads); `None` when it cannot be read.
    pub async fn is_leader(&self) -> Option<bool> {
        let text = self.metrics().await.ok()?;
        metric_value(&text, "wa_operator_leader").map(|v| v == 1.0)
    }

    /// SIGKILL: a crash, as far as the operator can tell (no Lease release, reconciles cut).
    pub async fn kill(&mut self) {
        self.process.kill().await;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        self.process.stop(grace).await;
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// The value of an unlabelled series in a Prometheus text exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `wa-gateway` (Kubernetes mode) and an HTTP client holding its admin key.
pub struct GatewayProcess {
    process: ChildProcess,
    url: String,
    admin_key: String,
    http: reqwest::Client,
}

impl GatewayProcess {
    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    pub fn process(&mut self) -> &mut ChildProcess {
        &mut self.process
    }

    /// A request to `path` with the admin key.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.url)).bearer_auth(&self.admin_key)
    }

    /// Sends `request`; the status and the body as JSON (`Null` when it is not JSON).
    pub async fn call(&self, request: reqwest::RequestBuilder) -> anyhow::Result<(StatusCode, Value)> {
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.call(self.request(Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        self.call(self.request(Method::POST, path).json(body)).await
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }
}

/// A running stack. Dropping it kills everything at once; [`Stack::shutdown`] stops the
/// binaries and pods gracefully.
pub struct Stack {
    pub cluster: TestCluster,
    pub gateway: GatewayProcess,
    pub operators: Vec<OperatorProcess>,
    pub binaries: Binaries,
    config: StackConfig,
    kubectl: Kubectl,
    /// Operator starts so far, so every replica start gets a log file of its own.
    starts: usize,
    /// Held while the stack lives: one stack at a time per process.
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

/// Stacks of one test binary take turns. nextest runs each scenario in its own process (one
/// at a time, `.config/nextest.toml`); `cargo test` runs them on threads of one process,
/// where dozens of session processes per scenario at once would starve each other's
/// deadlines on a small machine.
static TURN: std::sync::LazyLock<std::sync::Arc<tokio::sync::Mutex<()>>> = std::sync::LazyLock::new(Default::default);

impl Stack {
    /// Control plane (with the session CRD), gateway, then the operators — the order of a
    /// chart install: the operator's `--gateway-url` must answer.
    pub async fn start(config: StackConfig) -> anyhow::Result<Self> {
        let turn = TURN.clone().lock_owned().await;
        progress("starting the control plane");
        let binaries = Binaries::from_workspace()?;
        let cluster_config = config.cluster.clone().binary("wa-session", &binaries.session);
        let cluster = TestCluster::start_with(cluster_config).await?;
        // Fails here, loudly, when kubectl is missing: the scenarios drive it as a user would.
        let kubectl = cluster.kubectl()?;
        cluster.install_crd().await?;
        if config.namespace != "default" {
            kubectl.ok(&["create", "namespace", &config.namespace]).await?;
        }
        progress("starting the gateway");
        let gateway = start_gateway(&cluster, &binaries, &config).await?;
        let mut stack = Self {
            cluster,
            gateway,
            operators: Vec::new(),
            binaries,
            config,
            kubectl,
            starts: 0,
            _turn: turn,
        };
        for identity in stack.config.operators.clone() {
            progress(&format!("starting operator {identity}"));
            let operator = stack.start_operator(&identity).await?;
            stack.operators.push(operator);
        }
        progress("started");
        Ok(stack)
    }

    pub fn namespace(&self) -> &str {
        &self.config.namespace
    }

    pub fn kubectl(&self) -> &Kubectl {
        &self.kubectl
    }

    pub fn client(&self) -> kube::Client {
        self.cluster.client()
    }

    /// Starts another operator replica with the stack's flags (not added to `operators`).
    pub async fn start_operator(&mut self, identity: &str) -> anyhow::Result<OperatorProcess> {
        self.starts += 1;
        let log_name = format!("operator-{}-{identity}", self.starts);
        let mut args = vec![
            "--namespace".to_owned(),
            self.config.namespace.clone(),
            "--gateway-url".to_owned(),
            self.gateway.url.clone(),
            "--metrics-addr".to_owned(),
            "127.0.0.1:0".to_owned(),
            "--identity".to_owned(),
            identity.to_owned(),
        ];
        args.extend(self.config.operator_args.iter().cloned());
        let env = [
            ("KUBECONFIG".to_owned(), self.cluster.kubeconfig().display().to_string()),
            ("WA_LOG".to_owned(), std::env::var("WA_TEST_OPERATOR_LOG").unwrap_or_else(|_| "info,kube=warn,kube_runtime=warn".to_owned())),
        ];
        let mut process = ChildProcess::spawn(&log_name, &self.binaries.operator, &args, &env, &self.logs_dir())?;
        let addr = wait_for_log(&mut process, r"serving /metrics.*addr=(\S+)", "wa-operator to serve /metrics").await?;
        Ok(OperatorProcess {
            identity: identity.to_owned(),
            process,
            metrics_url: format!("http://{addr}"),
            http: http_client()?,
        })
    }

    /// Where the binaries' logs go.
    pub fn logs_dir(&self) -> PathBuf {
        self.cluster.dir().join("logs")
    }

    /// What a failure message needs: the objects, the binaries' logs, the pods' logs.
    pub async fn diagnostics(&self) -> String {
        let mut out = String::new();
        let ns = self.namespace();
        match self.kubectl.run(&["get", "wa,pods,pvc,lease", "-n", ns, "-o", "wide"]).await {
            Ok(o) => out.push_str(&format!("--- kubectl get wa,pods,pvc,lease\n{}{}\n", o.stdout, o.stderr)),
            Err(e) => out.push_str(&format!("--- kubectl failed: {e:#}\n")),
        }
        for op in &self.operators {
            out.push_str(&format!("--- operator {} log\n{}\n", op.identity, op.log_tail(40)));
        }
        out.push_str(&format!("--- gateway log\n{}\n", self.gateway.log_tail(40)));
        if let Some(node) = self.cluster.node() {
            out.push_str(&pod_logs(&node.log_dir(), 6, 15));
        }
        out
    }

    /// Panics with [`Self::diagnostics`] when `result` is an error; stops everything either
    /// way. With `WA_TEST_KEEP=1` a failed stack's directory (every log) is kept and named.
    pub async fn finish(mut self, result: anyhow::Result<()>) {
        if let Err(e) = result {
            let mut diagnostics = self.diagnostics().await;
            if std::env::var_os("WA_TEST_KEEP").is_some_and(|v| v == "1") {
                self.cluster.keep_files();
                diagnostics.push_str(&format!("--- kept {}\n", self.cluster.dir().display()));
            }
            self.shutdown().await;
            panic!("{e:#}\n{diagnostics}");
        }
        self.shutdown().await;
    }

    /// Operators first (so nothing recreates pods), then the gateway, then pods and the API.
    pub async fn shutdown(mut self) {
        progress("stopping the operators");
        for op in &mut self.operators {
            op.stop(Duration::from_secs(10)).await;
        }
        progress("stopping the gateway");
        self.gateway.process.stop(Duration::from_secs(10)).await;
        progress("stopping the pods and the control plane");
        self.cluster.shutdown().await;
        progress("stopped");
    }
}

async fn start_gateway(cluster: &TestCluster, binaries: &Binaries, config: &StackConfig) -> anyhow::Result<GatewayProcess> {
    let admin_key = format!("wak_{}", hex_token());
    let db = cluster.dir().join("gateway.db");
    let mut args = vec![
        "--namespace".to_owned(),
        config.namespace.clone(),
        "--listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--database-url".to_owned(),
        format!("sqlite://{}", db.display()),
        // Failed webhook attempts retry within the tests' waits.
        "--webhook-backoff-ms".to_owned(),
        "200".to_owned(),
    ];
    args.extend(config.gateway_args.iter().cloned());
    let env = [
        ("KUBECONFIG".to_owned(), cluster.kubeconfig().display().to_string()),
        ("WA_ADMIN_KEY".to_owned(), admin_key.clone()),
        ("WA_GATEWAY_LOG".to_owned(), "info".to_owned()),
    ];
    let mut process = ChildProcess::spawn("gateway", &binaries.gateway, &args, &env, &cluster.dir().join("logs"))?;
    let url = wait_for_log(&mut process, r"gateway listening on (http://[0-9.:]+)/", "wa-gateway to listen").await?;
    Ok(GatewayProcess {
        process,
        url,
        admin_key,
        http: http_client()?,
    })
}

/// A line on the test's stderr (shown when it fails or hangs), timestamped.
fn progress(what: &str) {
    eprintln!("{} stack: {what}", chrono::Utc::now().format("%H:%M:%S%.3f"));
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?)
}

fn hex_token() -> String {
    let bytes: [u8; 20] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until the process logs a line matching `pattern`; returns its first group. Fails at
/// once, with its log, when the process exits first (a refused flag, say).
async fn wait_for_log(process: &mut ChildProcess, pattern: &str, what: &str) -> anyhow::Result<String> {
    let re = Regex::new(pattern)?;
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let log = process.log();
        if let Some(found) = re.captures(&log).and_then(|c| c.get(1)) {
            return Ok(found.as_str().to_owned());
        }
        if let Some(status) = process.try_exited() {
            bail!("{what}: it exited ({status}) first:\n{}", process.log_tail(30));
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {START_TIMEOUT:?} waiting for {what}:\n{}", process.log_tail(30));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `lines` lines of the `max` most recently written container logs.
fn pod_logs(dir: &Path, max: usize, lines: usize) -> String {
    let mut files = Vec::new();
    collect_logs(dir, &mut files);
    files.sort_by_key(|(modified, _)| std::cmp::Reverse(*modified));
    let mut out = String::new();
    for (_, path) in files.into_iter().take(max) {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        let shown = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
        out.push_str(&format!("--- pod log {shown}\n{tail}\n"));
    }
    out
}

fn collect_logs(dir: &Path, out: &mut Vec<(std::time::SystemTime, PathBuf)>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_logs(&path, out);
        } else if path.extension().is_some_and(|e| e == "log") {
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            out.push((modified, path));
        }
    }
}

/// Runs `kubectl` with a context message on failure.
pub async fn kubectl_ok(kubectl: &Kubectl, args: &[&str]) -> anyhow::Result<String> {
    kubectl.ok(args).await.with_context(|| format!("kubectl {}", args.join(" ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_values_are_read_from_the_exposition() {
        let text = "# HELP wa_operator_leader x\n# TYPE wa_operator_leader gauge\nwa_operator_leader 1\nwa_operator_leader_changes_total 3\n";
        assert_eq!(metric_value(text, "wa_operator_leader"), Some(1.0));
        assert_eq!(metric_value(text, "wa_operator_leader_changes_total"), Some(3.0));
        assert_eq!(metric_value(text, "wa_operator"), None);
        assert_eq!(metric_value("", "wa_operator_leader"), None);
    }
}
