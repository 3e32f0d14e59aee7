//! `wa-soak`: sends at a fixed rate through `wa-gateway local` to sandbox sessions, then
//! accounts for every message and checks memory growth (see `wa_tests::soak`). Prints a
//! Markdown report; exits 1 when a check fails.
//!
//! ```sh
//! wa-soak --sessions 50 --rate 1000 --duration 600 --warmup 60        # bench/soak/run.sh
//! wa-soak --sessions 10 --rate 100 --duration 40 --warmup 10          # scripts/ci.d/60-load.sh
//! ```

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use wa_tests::soak::{self, Bounds, SoakConfig};

/// Open-loop load through the gateway, with an accounting of every message.
#[derive(Parser, Debug)]
// A flag given twice takes the last value: bench/soak/run.sh passes its defaults first and
// the caller's flags after them (`run.sh --duration 60`).
#[command(name = "wa-soak", version, args_override_self = true)]
struct Args {
    /// Sandbox sessions (each its own wa-session process).
    #[arg(long, default_value_t = 50)]
    sessions: usize,
    /// Sends per second through the gateway.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Seconds of load after which memory is taken as the reference for growth.
    #[arg(long, default_value_t = 60)]
    warmup: u64,
    /// Requests open at once; a send due while this many are unanswered is skipped (counted
    /// as an error).
    #[arg(long, default_value_t = 2000)]
    max_in_flight: usize,
    /// Run the gateway on PostgreSQL: a database is created on this server (admin URL, e.g.
    /// postgres://postgres@127.0.0.1:5432/postgres) and dropped afterwards. Default SQLite.
    #[arg(long)]
    postgres: Option<String>,
    /// Sandbox delivered/read receipts after these milliseconds ("off": no receipts).
    #[arg(long, default_value = "200,400")]
    receipts_ms: String,
    /// `wa-gateway` [default: next to this program].
    #[arg(long)]
    gateway_bin: Option<PathBuf>,
    /// `wa-session` for the session processes [default: next to wa-gateway, else the
    /// gateway's own `session` subcommand].
    #[arg(long)]
    session_bin: Option<PathBuf>,
    /// Keep the data directory, logs and the report here.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Seconds allowed after the load for every receipt to arrive.
    #[arg(long, default_value_t = 120)]
    drain_timeout: u64,
    /// Accepted sends per second must reach this fraction of --rate.
    #[arg(long, default_value_t = 0.99)]
    min_rate_fraction: f64,
    /// Fraction of sends allowed to get no 201.
    #[arg(long, default_value_t = 0.0)]
    max_error_rate: f64,
    /// Gateway VmRSS growth allowed from the end of the warm-up to the end of the load, MiB.
    #[arg(long, default_value_t = 16.0)]
    gateway_growth_mib: f64,
    /// VmRSS growth allowed per session process over the same interval, MiB. By default the
    /// share of its bounded tables (message log, idempotency keys) the run fills after the
    /// warm-up, plus 2 MiB.
    #[arg(long)]
    pod_growth_mib: Option<f64>,
    /// p99 latency allowed for accepted sends, ms.
    #[arg(long, default_value_t = 250.0)]
    max_p99_ms: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (found_gateway, found_session) = soak::binaries_next_to_me()
        .map(|(g, s)| (Some(g), s))
        .unwrap_or((None, None));
    let gateway_bin = args
        .gateway_bin
        .or(found_gateway)
        .ok_or_else(|| anyhow::anyhow!("wa-gateway is not next to wa-soak; pass --gateway-bin"))?;
    let receipts_ms = match args.receipts_ms.as_str() {
        "off" => None,
        s => {
            let (d, r) = s.split_once(',').ok_or_else(|| anyhow::anyhow!("--receipts-ms takes DELIVERED,READ or off"))?;
            Some((d.trim().parse()?, r.trim().parse()?))
        }
    };
    let config = SoakConfig {
        gateway_bin,
        session_bin: args.session_bin.or(found_session),
        sessions: args.sessions,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        warmup: Duration::from_secs(args.warmup),
        max_in_flight: args.max_in_flight,
        postgres_admin_url: args.postgres,
        receipts_ms,
        work_dir: args.work_dir.clone(),
        drain_timeout: Duration::from_secs(args.drain_timeout),
        bounds: Bounds {
            min_rate_fraction: args.min_rate_fraction,
            max_error_rate: args.max_error_rate,
            gateway_growth_mib: args.gateway_growth_mib,
            pod_growth_mib: args.pod_growth_mib.unwrap_or_else(|| {
                soak::pod_growth_bound(
                    args.rate / args.sessions.max(1) as f64,
                    Duration::from_secs(args.warmup),
                    Duration::from_secs(args.duration),
                )
            }),
            max_p99_ms: args.max_p99_ms,
        },
    };
    anyhow::ensure!(config.sessions >= 1 && config.sessions <= 100, "--sessions takes 1-100 (one API key names at most 100)");
    anyhow::ensure!(config.rate > 0.0 && config.duration > config.warmup, "--rate must be positive and --duration longer than --warmup");

    // One thread for the generator: the gateway and the pods get the rest of the machine.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let report = runtime.block_on(soak::run(config))?;
    let text = report.render();
    println!("{text}");
    if let Some(dir) = &args.work_dir {
        soak::save(&report, &dir.join("report.md"))?;
    }
    if !report.passed() {
        eprintln!("wa-soak: a check failed");
        std::process::exit(1);
    }
    Ok(())
}
