//! Child processes for tests: the workspace's binaries started with their output in a log
//! file, stopped with SIGTERM then SIGKILL, and killed when dropped, so a failing test never
//! leaves processes behind. Plus bounded waits that fail with a message saying what was
//! awaited.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A binary of this workspace, from the target directory the running test lives in.
/// Fails with the command that builds it when it is missing.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut candidates = Vec::new();
    if let Some(dir) = exe.parent() {
        candidates.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| format!("binary {name:?} is not built next to {}: run `cargo build --bins` first", exe.display()))
}

fn signal_group(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0 {
            // SAFETY: kill(2) on a process group id; no memory is involved.
            unsafe {
                libc::kill(-pid, signal);
            }
        }
}

/// A child process in its own process group, logging to a file.
pub struct ChildProcess {
    name: String,
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl ChildProcess {
    /// Starts `program` with `args` and extra `env`; stdout and stderr go to `<log_dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], env: &[(String, String)], log_dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        let child = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        let pid = child.id().context("the child has no pid")?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `Some(status)` once the process has exited.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM to the process group; SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_exited() {
            return Some(status);
        }
        signal_group(self.pid, libc::SIGTERM);
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(name = %self.name, "did not stop within {grace:?}; killing");
                self.kill().await
            }
        }
    }

    /// SIGKILL to the process group, at once (a crash, as far as the process can tell).
    pub async fn kill(&mut self) -> Option<ExitStatus> {
        signal_group(self.pid, libc::SIGKILL);
        self.child.wait().await.ok()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            signal_group(self.pid, libc::SIGKILL);
        }
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `url` answers with a success status.
pub async fn wait_for_http(url: &str, timeout: Duration) -> anyhow::Result<()> {
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(2)).build()?;
    wait_until(timeout, &format!("{url} to answer"), || {
        let request = http.get(url).send();
        async move { request.await.ok().filter(|r| r.status().is_success()).map(|_| ()) }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_sends_sigterm_then_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        // Ignores SIGTERM: only the SIGKILL after the grace period ends it.
        let script = "trap '' TERM; echo started; while true; do sleep 0.05; done";
        let mut child = ChildProcess::spawn("stubborn", Path::new("/bin/sh"), &["-c".into(), script.into()], &[], dir.path()).unwrap();
        wait_until(Duration::from_secs(5), "the script to start", || async { child.log().contains("started").then_some(()) })
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let status = child.stop(Duration::from_millis(300)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[tokio::test]
    async fn dropping_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let child = ChildProcess::spawn("parent", Path::new("/bin/sh"), &["-c".into(), script], &[], dir.path()).unwrap();
        let grandchild: i32 = wait_until(Duration::from_secs(5), "the grandchild's pid", || async {
            std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok())
        })
        .await
        .unwrap();
        drop(child);
        wait_until(Duration::from_secs(5), "the grandchild to die", || async {
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(grandchild, 0) } == 0;
            let zombie = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).map(|s| s.contains(") Z ")).unwrap_or(true);
            (!alive || zombie).then_some(())
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn waits_fail_with_what_was_awaited() {
        let err = wait_until(Duration::from_millis(200), "the impossible", || async { None::<()> }).await.unwrap_err();
        assert_eq!(err.to_string(), "timed out after 200ms waiting for the impossible");
    }
}
