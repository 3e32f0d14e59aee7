//! `test-control-plane`: the Kubernetes API emulator and the pod runner, for kubectl and for
//! wa-operator's binaries, until SIGTERM or Ctrl-C.
//!
//! ```sh
//! test-control-plane --kubeconfig /tmp/wa.kubeconfig --bin wa-session=target/debug/wa-session
//! kubectl --kubeconfig /tmp/wa.kubeconfig apply -f crds/whatsappsession.yaml
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use wa_tests::apiserver::{ControlPlane, ControlPlaneConfig};
use wa_tests::podrunner::{PodRunner, PodRunnerConfig};

/// A Kubernetes API emulator and a pod runner that runs pods as local processes.
#[derive(Parser, Debug)]
#[command(name = "test-control-plane", version)]
struct Args {
    /// Where to write the kubeconfig for kubectl and kube-rs.
    #[arg(long)]
    kubeconfig: PathBuf,

    /// Node data: claim volumes, pod scratch space, container logs. A temporary directory,
    /// removed on exit, when not given.
    #[arg(long)]
    data_dir: Option<PathBuf>,

    /// Command or image name to a local binary for pod containers, e.g.
    /// `--bin wa-session=target/debug/wa-session`. Repeatable.
    #[arg(long = "bin", value_name = "NAME=PATH")]
    binaries: Vec<String>,

    /// Address to serve the API on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,

    /// Default namespace written into the kubeconfig.
    #[arg(long, default_value = "default")]
    namespace: String,

    /// Run only the API emulator: pods stay Pending.
    #[arg(long)]
    no_pod_runner: bool,

    /// Refuse container commands that are not mapped with --bin (instead of running them
    /// from PATH).
    #[arg(long)]
    no_host_commands: bool,

    /// Cap probe periods and initial delays (milliseconds), to make tests fast.
    #[arg(long, value_name = "MS")]
    max_probe_period_ms: Option<u64>,

    /// First restart back-off of crashing containers (milliseconds); doubles up to 30 times it.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    restart_backoff_ms: u64,

    /// Changes watches can resume across before answering 410 Gone.
    #[arg(long, default_value_t = 10_000)]
    history: usize,

    /// Interval of watch bookmarks (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    bookmark_interval_ms: u64,
}

fn parse_binaries(specs: &[String]) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    for spec in specs {
        let Some((name, path)) = spec.split_once('=') else {
            bail!("--bin {spec:?}: expected NAME=PATH");
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("--bin {name}={}: no such file", path.display());
        }
        let path = path.canonicalize()?;
        map.insert(name.to_owned(), path);
    }
    Ok(map)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let binaries = parse_binaries(&args.binaries)?;
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("test-control-plane-").tempdir()?),
    };
    let data_dir = match (&args.data_dir, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory is made when --data-dir is absent"),
    };
    std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;

    let mut runner_config = PodRunnerConfig::new(&data_dir);
    runner_config.binaries = binaries;
    runner_config.allow_host_commands = !args.no_host_commands;
    runner_config.max_probe_period = args.max_probe_period_ms.map(Duration::from_millis);
    runner_config.restart_backoff = Duration::from_millis(args.restart_backoff_ms);
    runner_config.restart_backoff_max = Duration::from_millis(args.restart_backoff_ms.saturating_mul(30));

    let control_plane = ControlPlane::start(ControlPlaneConfig {
        listen: args.listen,
        history_capacity: args.history,
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms),
        pod_log_dir: (!args.no_pod_runner).then(|| runner_config.log_dir()),
        ..ControlPlaneConfig::default()
    })
    .await?;
    let runner = if args.no_pod_runner {
        None
    } else {
        Some(PodRunner::start(control_plane.client()?, runner_config).await?)
    };
    control_plane
        .write_kubeconfig(&args.kubeconfig, &args.namespace)
        .with_context(|| format!("writing {}", args.kubeconfig.display()))?;
    println!("serving {} (kubeconfig {})", control_plane.url(), args.kubeconfig.display());

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping: pods first, then the API");
    if let Some(runner) = runner {
        runner.shutdown().await;
    }
    control_plane.shutdown().await;
    Ok(())
}
