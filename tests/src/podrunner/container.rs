//! One container: its process (spawned from the pod's command, args and env), its probes, its
//! restarts with back-off, and its stop (SIGTERM to the process group, SIGKILL after the grace
//! period).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::Runner;
use super::env::{self, EnvSources, MountMap};
use super::probe::{self, ProbeTiming};

/// What a container is doing, as `containerStatuses[].state` reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    Waiting { reason: String, message: String },
    Running { started_at: String, pid: u32 },
    Terminated(Terminated),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Terminated {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub started_at: String,
    pub finished_at: String,
    pub container_id: String,
}

/// The part of a pod's runtime one container owns.
#[derive(Debug, Clone)]
pub struct ContainerRuntime {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub state: State,
    pub last_terminated: Option<Terminated>,
    pub restart_count: i32,
    pub ready: bool,
    pub started: bool,
}

impl ContainerRuntime {
    pub fn new(container: &Container) -> Self {
        Self {
            name: container.name.clone(),
            image: container.image.clone().unwrap_or_default(),
            image_id: String::new(),
            state: State::Waiting {
                reason: "ContainerCreating".into(),
                message: String::new(),
            },
            last_terminated: None,
            restart_count: 0,
            ready: false,
            started: false,
        }
    }

    pub fn status_json(&self) -> serde_json::Value {
        use serde_json::json;
        let state = |s: &State| match s {
            State::Waiting { reason, message } if message.is_empty() => json!({"waiting": {"reason": reason}}),
            State::Waiting { reason, message } => json!({"waiting": {"reason": reason, "message": message}}),
            State::Running { started_at, .. } => json!({"running": {"startedAt": started_at}}),
            State::Terminated(t) => terminated_json(t),
        };
        let container_id = match &self.state {
            State::Running { pid, .. } => format!("local://{pid}"),
            State::Terminated(t) => t.container_id.clone(),
            State::Waiting { .. } => self.last_terminated.as_ref().map(|t| t.container_id.clone()).unwrap_or_default(),
        };
        let mut status = json!({
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": state(&self.state),
            "lastState": self.last_terminated.as_ref().map(terminated_json).unwrap_or(json!({})),
        });
        if !container_id.is_empty() {
            status["containerID"] = json!(container_id);
        }
        status
    }
}

fn terminated_json(t: &Terminated) -> serde_json::Value {
    let mut v = serde_json::json!({"terminated": {
        "exitCode": t.exit_code, "reason": t.reason, "startedAt": t.started_at,
        "finishedAt": t.finished_at, "containerID": t.container_id}});
    if let Some(sig) = t.signal {
        v["terminated"]["signal"] = serde_json::json!(sig);
    }
    v
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// Everything a container supervisor needs.
pub struct ContainerCtx {
    pub runner: Arc<Runner>,
    pub pod: Arc<Pod>,
    pub container: Container,
    pub index: usize,
    pub pod_ip: String,
    pub mounts: MountMap,
    pub home: PathBuf,
    pub log_dir: PathBuf,
    pub runtimes: Arc<Mutex<Vec<ContainerRuntime>>>,
    pub dirty: Arc<Notify>,
    /// Cancelled to stop the container for good.
    pub stop: CancellationToken,
    /// The grace period of that stop, set before `stop` is cancelled.
    pub stop_grace: Arc<Mutex<Duration>>,
}

enum Ended {
    Exited(std::process::ExitStatus),
    Stopped(Option<std::process::ExitStatus>),
    Killed(Option<std::process::ExitStatus>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ContainerCtx {
    fn update(&self, f: impl FnOnce(&mut ContainerRuntime)) {
        {
            let mut runtimes = lock(&self.runtimes);
            if let Some(rt) = runtimes.get_mut(self.index) {
                f(rt);
            }
        }
        self.dirty.notify_one();
    }

    fn waiting(&self, reason: &str, message: &str) {
        self.update(|rt| {
            rt.state = State::Waiting {
                reason: reason.into(),
                message: message.into(),
            };
            rt.ready = false;
            rt.started = false;
        });
    }

    /// Sleeps unless the container is stopped meanwhile; `false` when stopped.
    async fn pause(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    fn pod_name(&self) -> String {
        self.pod.metadata.name.clone().unwrap_or_default()
    }

    /// The process environment: a few host variables, HOSTNAME, HOME and TMPDIR, then the
    /// container's own variables with mount paths rewritten.
    async fn environment(&self) -> Result<Vec<(String, String)>, String> {
        let (secrets, config_maps) = self.runner.fetch_sources(&self.pod).await?;
        let sources = EnvSources {
            pod_ip: self.pod_ip.clone(),
            host_ip: "127.0.0.1".into(),
            node_name: self.runner.config.node_name.clone(),
            secrets,
            config_maps,
        };
        let own = env::container_env(&self.pod, &self.container, &sources).map_err(|e| e.to_string())?;
        let mut vars: Vec<(String, String)> = self
            .runner
            .config
            .inherit_env
            .iter()
            .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
            .collect();
        vars.push(("HOSTNAME".into(), self.pod_name()));
        vars.push(("HOME".into(), self.home.display().to_string()));
        if let Some(tmp) = self.mounts.host_dir("/tmp") {
            vars.push(("TMPDIR".into(), tmp.display().to_string()));
        }
        for (k, v) in own {
            vars.retain(|(n, _)| *n != k);
            vars.push((k, self.mounts.rewrite(&v)));
        }
        Ok(vars)
    }

    fn open_log(&self) -> std::io::Result<std::fs::File> {
        std::fs::create_dir_all(&self.log_dir)?;
        let current = self.log_dir.join(format!("{}.log", self.container.name));
        if current.exists() {
            std::fs::rename(&current, self.log_dir.join(format!("{}.previous.log", self.container.name)))?;
        }
        std::fs::OpenOptions::new().create(true).append(true).open(current)
    }

    fn spawn(&self, program: &Path, args: &[String], env: &[(String, String)]) -> std::io::Result<tokio::process::Child> {
        let log = self.open_log()?;
        let log_err = log.try_clone()?;
        let workdir = match self.container.working_dir.as_deref() {
            Some(dir) if !dir.is_empty() => PathBuf::from(self.mounts.rewrite(dir)),
            _ => self.home.clone(),
        };
        std::fs::create_dir_all(&workdir)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .env_clear()
            .envs(env.iter().cloned())
            .current_dir(workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .kill_on_drop(true);
        cmd.spawn()
    }

    /// Runs the container until it is stopped or its restart policy says it is done.
    pub async fn supervise(self: Arc<Self>) {
        let policy = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let image = self.container.image.clone().unwrap_or_default();
        let mut backoff = Duration::ZERO;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let env = match self.environment().await {
                Ok(env) => env,
                Err(message) => {
                    self.waiting("CreateContainerConfigError", &message);
                    if !self.pause(Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            let (command, args) = env::command_line(&self.container, &env);
            let command: Vec<String> = command.iter().map(|c| self.mounts.rewrite(c)).collect();
            let args: Vec<String> = args.iter().map(|a| self.mounts.rewrite(a)).collect();
            let (program, mut argv) = match self.runner.resolve(&command, &image) {
                Ok(found) => found,
                Err(message) => {
                    self.waiting("ErrImageNeverPull", &message);
                    self.runner.event(&self.pod, "ErrImageNeverPull", &message, "Warning", Some(&self.container.name), "kubelet");
                    if !self.pause(Duration::from_secs(2)).await {
                        return;
                    }
                    continue;
                }
            };
            argv.extend(args);
            let mut child = match self.spawn(&program, &argv, &env) {
                Ok(child) => child,
                Err(e) => {
                    let message = format!("starting {}: {e}", program.display());
                    self.waiting("RunContainerError", &message);
                    self.runner.event(&self.pod, "Failed", &message, "Warning", Some(&self.container.name), "kubelet");
                    if !self.pause(backoff.max(Duration::from_secs(1))).await {
                        return;
                    }
                    continue;
                }
            };
            let pid = child.id().unwrap_or_default();
            // Should this task be dropped mid-run, the process group goes with it.
            let mut group = GroupGuard(Some(pid));
            let started_at = now();
            let started = Instant::now();
            let has_startup = self.container.startup_probe.is_some();
            let has_readiness = self.container.readiness_probe.is_some();
            self.update(|rt| {
                rt.image_id = format!("local://{}", program.display());
                rt.state = State::Running {
                    started_at: started_at.clone(),
                    pid,
                };
                rt.started = !has_startup;
                rt.ready = !has_startup && !has_readiness;
            });
            self.runner.event(&self.pod, "Started", &format!("Started container {}", self.container.name), "Normal", Some(&self.container.name), "kubelet");
            let run = self.stop.child_token();
            let (kill_tx, mut kill_rx) = mpsc::channel::<String>(1);
            tokio::spawn(self.clone().run_probes(run.clone(), env.clone(), kill_tx));
            let ended = tokio::select! {
                status = child.wait() => match status {
                    Ok(status) => Ended::Exited(status),
                    Err(_) => Ended::Killed(None),
                },
                _ = self.stop.cancelled() => {
                    let grace = if self.runner.killing.load(std::sync::atomic::Ordering::SeqCst) {
                        Duration::ZERO
                    } else {
                        *lock(&self.stop_grace)
                    };
                    Ended::Stopped(terminate(&mut child, grace).await)
                }
                Some(why) = kill_rx.recv() => {
                    self.runner.event(&self.pod, "Killing", &format!("Container {} {why}, will be restarted", self.container.name), "Normal", Some(&self.container.name), "kubelet");
                    let grace = self.grace_for_restart();
                    Ended::Killed(terminate(&mut child, grace).await)
                }
            };
            run.cancel();
            // Whatever the main process left behind in its group goes with it.
            signal_group(pid, libc::SIGKILL);
            group.0 = None;
            let status = match &ended {
                Ended::Exited(s) => Some(*s),
                Ended::Stopped(s) | Ended::Killed(s) => *s,
            };
            let (exit_code, signal) = exit_of(status);
            let terminated = Terminated {
                exit_code,
                signal,
                reason: if exit_code == 0 { "Completed".into() } else { "Error".into() },
                started_at,
                finished_at: now(),
                container_id: format!("local://{pid}"),
            };
            let stopped = matches!(ended, Ended::Stopped(_));
            let restart = !stopped
                && match policy.as_str() {
                    "Never" => false,
                    "OnFailure" => exit_code != 0 || matches!(ended, Ended::Killed(_)),
                    _ => true,
                };
            self.update(|rt| {
                rt.ready = false;
                rt.started = false;
                if restart {
                    rt.last_terminated = Some(terminated.clone());
                    rt.restart_count += 1;
                } else {
                    rt.state = State::Terminated(terminated.clone());
                }
            });
            if !restart {
                return;
            }
            // A container that ran for a while starts its back-off over.
            if started.elapsed() > self.runner.config.restart_backoff_max * 2 {
                backoff = Duration::ZERO;
            }
            if !backoff.is_zero() {
                let message = format!(
                    "back-off {:?} restarting failed container={} pod={}",
                    backoff,
                    self.container.name,
                    self.pod_name()
                );
                self.waiting("CrashLoopBackOff", &message);
                self.runner.event(&self.pod, "BackOff", &message, "Warning", Some(&self.container.name), "kubelet");
                if !self.pause(backoff).await {
                    return;
                }
            }
            backoff = if backoff.is_zero() {
                self.runner.config.restart_backoff
            } else {
                (backoff * 2).min(self.runner.config.restart_backoff_max)
            };
        }
    }

    fn grace_for_restart(&self) -> Duration {
        let seconds = self
            .container
            .liveness_probe
            .as_ref()
            .and_then(|p| p.termination_grace_period_seconds)
            .or_else(|| self.pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds))
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
    }
}

/// Exit code as Kubernetes reports it: the code, or 128 + the signal.
fn exit_of(status: Option<std::process::ExitStatus>) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => (code, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            (None, None) => (-1, None),
        },
        None => (137, Some(libc::SIGKILL)),
    }
}

/// Kills a running container's process group if the task is dropped before it ends.
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            signal_group(pid, libc::SIGKILL);
        }
    }
}

fn signal_group(pid: u32, signal: i32) {
    if let Ok(pid) = i32::try_from(pid)
        && pid > 0 {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
            unsafe {
                libc::kill(-pid, signal);
            }
        }
}

/// SIGTERM to the container's process group, SIGKILL after `grace`.
pub async fn terminate(child: &mut tokio::process::Child, grace: Duration) -> Option<std::process::ExitStatus> {
    let Some(pid) = child.id() else {
        return child.wait().await.ok();
    };
    signal_group(pid, libc::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            signal_group(pid, libc::SIGKILL);
            child.wait().await.ok()
        }
    }
}

/// Probe state of one run.
struct ProbeLoop {
    action: probe::ProbeAction,
    timing: ProbeTiming,
}

impl ProbeLoop {
    fn new(ctx: &ContainerCtx, p: &Probe, env: &[(String, String)], keep_delay: bool) -> Self {
        let resolve = |cmd: &[String]| -> Option<(PathBuf, Vec<String>)> {
            let cmd: Vec<String> = cmd.iter().map(|c| ctx.mounts.rewrite(c)).collect();
            ctx.runner.resolve(&cmd, "").ok()
        };
        Self {
            action: probe::action(p, &ctx.container, &ctx.pod_ip, env, &resolve),
            timing: ProbeTiming::of(p, ctx.runner.config.max_probe_period, keep_delay),
        }
    }
}

impl ContainerCtx {
    /// Startup, then readiness and liveness probes of one run of the container.
    async fn run_probes(self: Arc<Self>, run: CancellationToken, env: Vec<(String, String)>, kill: mpsc::Sender<String>) {
        let http = self.runner.http.clone();
        let sleep = |d: Duration| {
            let run = run.clone();
            async move {
                tokio::select! {
                    _ = run.cancelled() => false,
                    _ = tokio::time::sleep(d) => true,
                }
            }
        };
        if let Some(p) = &self.container.startup_probe {
            let lp = ProbeLoop::new(&self, p, &env, false);
            if !sleep(lp.timing.initial_delay).await {
                return;
            }
            let mut failures = 0;
            loop {
                match probe::run(&lp.action, lp.timing.timeout, &http).await {
                    Ok(()) => break,
                    Err(why) => {
                        failures += 1;
                        if failures >= lp.timing.failure_threshold {
                            self.runner.event(&self.pod, "Unhealthy", &format!("Startup probe failed: {why}"), "Warning", Some(&self.container.name), "kubelet");
                            let _ = kill.send("failed startup probe".into()).await;
                            return;
                        }
                    }
                }
                if !sleep(lp.timing.period).await {
                    return;
                }
            }
            let has_readiness = self.container.readiness_probe.is_some();
            self.update(|rt| {
                rt.started = true;
                rt.ready = !has_readiness;
            });
        }
        let readiness = self.container.readiness_probe.as_ref().map(|p| ProbeLoop::new(&self, p, &env, false));
        let liveness = self.container.liveness_probe.as_ref().map(|p| ProbeLoop::new(&self, p, &env, true));
        let ready_task = readiness.map(|lp| {
            let ctx = self.clone();
            let run = run.clone();
            let http = http.clone();
            tokio::spawn(async move {
                let pause = |d: Duration| {
                    let run = run.clone();
                    async move {
                        tokio::select! {
                            _ = run.cancelled() => false,
                            _ = tokio::time::sleep(d) => true,
                        }
                    }
                };
                if !pause(lp.timing.initial_delay).await {
                    return;
                }
                let (mut successes, mut failures) = (0u32, 0u32);
                let mut ready = false;
                loop {
                    match probe::run(&lp.action, lp.timing.timeout, &http).await {
                        Ok(()) => {
                            successes += 1;
                            failures = 0;
                            if !ready && successes >= lp.timing.success_threshold {
                                ready = true;
                                if !run.is_cancelled() {
                                    ctx.update(|rt| rt.ready = true);
                                }
                            }
                        }
                        Err(why) => {
                            failures += 1;
                            successes = 0;
                            if ready && failures >= lp.timing.failure_threshold {
                                ready = false;
                                ctx.update(|rt| rt.ready = false);
                                ctx.runner.event(&ctx.pod, "Unhealthy", &format!("Readiness probe failed: {why}"), "Warning", Some(&ctx.container.name), "kubelet");
                            }
                        }
                    }
                    if !pause(lp.timing.period).await {
                        return;
                    }
                }
            })
        });
        if let Some(lp) = liveness
            && sleep(lp.timing.initial_delay).await {
                let mut failures = 0;
                loop {
                    match probe::run(&lp.action, lp.timing.timeout, &http).await {
                        Ok(()) => failures = 0,
                        Err(why) => {
                            failures += 1;
                            if failures >= lp.timing.failure_threshold {
                                self.runner.event(&self.pod, "Unhealthy", &format!("Liveness probe failed: {why}"), "Warning", Some(&self.container.name), "kubelet");
                                let _ = kill.send("failed liveness probe".into()).await;
                                break;
                            }
                        }
                    }
                    if !sleep(lp.timing.period).await {
                        break;
                    }
                }
            }
        if let Some(task) = ready_task {
            let _ = task.await;
        }
    }
}
