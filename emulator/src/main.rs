//! `wa-emulator`: runs the WhatsApp protocol emulator as a process, for tests that drive it
//! over its HTTP control API from elsewhere (the gateway's and the end-to-end suites).
//!
//! Prints one JSON line with its URLs on stdout once it listens, then serves until SIGTERM
//! or SIGINT.

use std::net::SocketAddr;

use clap::Parser;
use wa_emulator::{Emulator, EmulatorConfig};

#[derive(Parser, Debug)]
#[command(name = "wa-emulator", about = "WhatsApp Web protocol emulator with simulated phones (for tests)")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, env = "WA_EMULATOR_LISTEN", default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Treat unknown phone numbers as not on WhatsApp instead of registering them.
    #[arg(long)]
    no_auto_register: bool,
    /// Contacts do not confirm delivery by themselves.
    #[arg(long)]
    no_auto_delivery: bool,
    /// Answer the post-login props, blocklist and privacy queries with 501 (benchmarks).
    #[arg(long)]
    refuse_init_queries: bool,
    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "WA_EMULATOR_LOG", default_value = "info")]
    log: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log)?)
        .with_writer(std::io::stderr)
        .init();
    let config = EmulatorConfig {
        listen: args.listen,
        auto_register_contacts: !args.no_auto_register,
        auto_delivery_receipts: !args.no_auto_delivery,
        refuse_init_queries: args.refuse_init_queries,
        ..Default::default()
    };
    let emu = Emulator::start(config).await?;
    println!(
        "{}",
        serde_json::json!({
            "wsUrl": emu.ws_url(),
            "mediaUrl": emu.media_url(),
            "controlUrl": emu.control_url(),
        })
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
