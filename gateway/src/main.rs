//! `wa-gateway`: the REST gateway (Kubernetes mode), `wa-gateway local` (local mode),
//! `wa-gateway session` (one session pod, as local mode runs it), `wa-gateway openapi`.

use std::process::ExitCode;

use clap::Parser;
use wa_gateway::config::{Cli, Command};
use wa_gateway::server::{self, ModeArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (serve, mode) = match cli.command {
        Some(Command::Openapi) => {
            print!("{}", wa_gateway::http::openapi_text());
            return ExitCode::SUCCESS;
        }
        Some(Command::Session(config)) => return run_session(config),
        Some(Command::Local(l)) => (l.serve, ModeArgs::Local(l.local)),
        None => (cli.serve, ModeArgs::Kubernetes(cli.kube)),
    };
    server::init_tracing(&serve);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wa-gateway: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(server::run(serve, mode)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wa-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A session pod, exactly as `wa-session` runs it (same runtime shape, same flags).
fn run_session(config: wa_session::Config) -> ExitCode {
    let runtime = match wa_session::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wa-gateway session: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wa_session::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wa-gateway session: {e:#}");
            ExitCode::FAILURE
        }
    }
}
