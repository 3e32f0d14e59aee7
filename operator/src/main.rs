//! `wa-operator`: see the library docs and ARCHITECTURE.md ("Operator").

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;
use wa_operator::cli::{Cli, Command};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Rbac) = cli.command {
        print!("{}", wa_operator::rbac::rules_yaml());
        return std::process::ExitCode::SUCCESS;
    }
    if let Err(e) = cli.run.check() {
        eprintln!("wa-operator: {e}");
        return std::process::ExitCode::from(2);
    }
    init_logging(&cli.run.log_format);
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("wa-operator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(format: &str) {
    let filter = EnvFilter::try_from_env("WA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,kube_runtime=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes configuration (KUBECONFIG or in-cluster): {e}")
    })?;
    let hostname = std::env::var("HOSTNAME").ok().or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
    });
    let config = cli
        .run
        .into_config(client.default_namespace(), hostname)
        .map_err(anyhow::Error::msg)?;
    info!(version = env!("CARGO_PKG_VERSION"), namespace = ?config.namespace, identity = %config.identity, "starting");

    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            info!("shutting down");
            shutdown.cancel();
        });
    }
    wa_operator::controller::run(client, config, shutdown).await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
