//! Real kubectl, driven by tests: a kubeconfig of our own, a discovery cache of our own, and a
//! time limit on every call. Tests that need kubectl fail with an install hint when it is
//! missing; they never skip.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::AsyncWriteExt as _;

/// What one kubectl call printed.
#[derive(Debug, Clone)]
pub struct KubectlOutput {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A kubectl bound to one cluster.
#[derive(Debug, Clone)]
pub struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
    cache_dir: PathBuf,
    timeout: Duration,
}

/// kubectl on PATH, or an error that says how to get it.
pub fn kubectl_binary() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .context("kubectl is not on PATH: install Debian's kubernetes-client (`apt-get install kubernetes-client`; scripts/test does this)")
}

impl Kubectl {
    pub fn new(kubeconfig: &Path, cache_dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            program: kubectl_binary()?,
            kubeconfig: kubeconfig.to_owned(),
            cache_dir: cache_dir.to_owned(),
            timeout: Duration::from_secs(60),
        })
    }

    /// Limits every call; a call that takes longer is killed and reported.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs kubectl with `args`, feeding `stdin` if given. Fails only if kubectl could not run
    /// or timed out; a non-zero exit is in the output.
    pub async fn run_with_input(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<KubectlOutput> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .arg(format!("--cache-dir={}", self.cache_dir.display()))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("running {}", self.program.display()))?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).await?;
            drop(pipe);
        }
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .with_context(|| format!("kubectl {} did not finish within {:?}", args.join(" "), self.timeout))??;
        Ok(KubectlOutput {
            success: output.status.success(),
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    pub async fn run(&self, args: &[&str]) -> anyhow::Result<KubectlOutput> {
        self.run_with_input(args, None).await
    }

    /// Runs kubectl and returns stdout; a non-zero exit is an error carrying stderr.
    pub async fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.run(args).await?;
        if !out.success {
            bail!("kubectl {} failed ({:?}): {}{}", args.join(" "), out.code, out.stderr, out.stdout);
        }
        Ok(out.stdout)
    }

    /// `kubectl apply -f -` with a manifest.
    pub async fn apply(&self, manifest: &str, extra: &[&str]) -> anyhow::Result<String> {
        let mut args = vec!["apply", "-f", "-"];
        args.extend_from_slice(extra);
        let out = self.run_with_input(&args, Some(manifest)).await?;
        if !out.success {
            bail!("kubectl {} failed ({:?}): {}{}", args.join(" "), out.code, out.stderr, out.stdout);
        }
        Ok(out.stdout)
    }

    /// `kubectl get … -o json`, parsed.
    pub async fn get_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["-o", "json"]);
        let text = self.ok(&all).await?;
        serde_json::from_str(&text).with_context(|| format!("kubectl printed no JSON: {text}"))
    }
}
