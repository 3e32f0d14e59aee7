//! `wa-session`: one WhatsApp session per process. See `wa_session::Config` for the flags.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // SAFETY: first thing in main; nothing has started a thread yet.
    unsafe { wa_session::quiet_library_backtraces() };
    let config = wa_session::Config::parse();
    let runtime = match wa_session::runtime_with(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("wa-session: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(wa_session::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wa-session: {e:#}");
            ExitCode::FAILURE
        }
    }
}
