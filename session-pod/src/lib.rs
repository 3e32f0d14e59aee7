//! The session pod: one WhatsApp session per process.
//!
//! [`run`] is the whole program: the `wa-session` binary calls it, and the gateway embeds it
//! as `wa-gateway session <same flags>` for local mode. It handles SIGTERM/SIGINT itself and
//! stops within 5 seconds, leaving undelivered events in the outbox on disk.
//!
//! Code map: [`config`] (flags), [`http`] (the API), [`session`] (status, sends, event loop),
//! [`engine`] (the `Engine` seam, `sandbox` and `whatsapp`), [`outbox`] + [`delivery`]
//! (events to the gateway), [`idempotency`], [`pacing`], [`metrics`], [`qr`].

pub mod config;
pub mod delivery;
pub mod engine;
pub mod error;
pub mod http;
pub mod idempotency;
pub mod memory;
pub mod metrics;
pub mod outbox;
pub mod pacing;
pub mod qr;
pub mod session;

use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::{Config, LogFormat};

use crate::delivery::{Delivery, RetryPolicy};
use crate::engine::sandbox::SandboxEngine;
use crate::engine::whatsapp::{WhatsAppEngine, WhatsAppOptions};
use crate::engine::{Engine, EngineContext};
use crate::idempotency::IdempotencyStore;
use crate::metrics::Metrics;
use crate::outbox::EventOutbox;
use crate::session::{Session, SessionSettings};

use wa_api::pod::{IDEMPOTENCY_KEYS, MESSAGE_LOG_ENTRIES as MESSAGE_LOG};
/// Accepted sends waiting for the sender at most.
const SEND_QUEUE: usize = 1024;

/// Budgets of the graceful stop; together well under the 5 s the pod is given.
const STOP_HTTP: Duration = Duration::from_millis(1500);
const STOP_ENGINE: Duration = Duration::from_secs(1);
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// The runtime `wa-session` runs on, as `--worker-threads` / `WA_WORKER_THREADS` asks
/// (read from the environment here, for callers that have no `Config` yet).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let threads = std::env::var("WA_WORKER_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    runtime_with(threads)
}

/// `0` (the default): one thread. A session does little work and mostly waits; a
/// single-threaded runtime keeps the idle footprint smallest (see BENCHMARKS.md), and blocking
/// file work goes to a few blocking threads. `n`: a multi-threaded runtime with `n` workers.
pub fn runtime_with(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match worker_threads {
        0 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    builder
        .enable_all()
        .max_blocking_threads(8)
        .thread_keep_alive(Duration::from_secs(10))
        .build()
}

/// The variable that decides whether `std::backtrace::Backtrace::capture` (and so anyhow)
/// records backtraces; panics follow `RUST_BACKTRACE` alone.
const LIB_BACKTRACE: &str = "RUST_LIB_BACKTRACE";

/// The value to give `RUST_LIB_BACKTRACE` when the environment has `current`: `0` unless the
/// user chose one. wa-rs makes anyhow errors in its normal operation; with `RUST_BACKTRACE=1`
/// and no `RUST_LIB_BACKTRACE`, anyhow captures and symbolizes a backtrace for each, which
/// took a connected session from 19 to 58 MiB (BENCHMARKS.md). Panics keep their backtraces.
pub fn library_backtrace_default(current: Option<&std::ffi::OsStr>) -> Option<&'static str> {
    match current {
        Some(v) if !v.is_empty() => None,
        _ => Some("0"),
    }
}

/// Applies [`library_backtrace_default`] to this process.
///
/// # Safety
///
/// Changes the process environment, so no other thread may exist yet: call it first thing in
/// `main` (std reads the variable once, at the first backtrace capture).
pub unsafe fn quiet_library_backtraces() {
    if let Some(v) = library_backtrace_default(std::env::var_os(LIB_BACKTRACE).as_deref()) {
        // SAFETY: the caller guarantees this process has a single thread.
        unsafe { std::env::set_var(LIB_BACKTRACE, v) };
    }
}

/// Sets up logging from the config; does nothing when the embedding program already did.
pub fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let directive = config.log_directive();
    // `--log` was checked by `validate`; a bad RUST_LOG falls back to the default.
    let filter = EnvFilter::try_new(&directive).unwrap_or_else(|_| EnvFilter::new(config::DEFAULT_LOG));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
}

/// Runs the session until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    init_tracing(&config);
    let stop = CancellationToken::new();
    let signals = tokio::spawn(wait_for_signal(stop.clone()));
    let result = run_until(config, stop).await;
    signals.abort();
    result
}

async fn wait_for_signal(stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    stop.cancel();
}

/// Runs the session until `stop` is cancelled (for embedding and tests; [`run`] wires it to
/// the signals).
pub async fn run_until(config: Config, stop: CancellationToken) -> anyhow::Result<()> {
    let span = tracing::info_span!("session", session = %config.session, engine = %config.engine);
    serve(config, stop).instrument(span).await
}

async fn serve(config: Config, stop: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data directory {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let ctx = EngineContext {
        data_dir: data_dir.clone(),
        events: events_tx.clone(),
        media_max_bytes: config.media_max_bytes,
    };
    let engine = build_engine(&config, ctx);

    let outbox = match &config.events_url {
        Some(_) => Some(Arc::new(
            EventOutbox::open(&data_dir.join("outbox"), config.outbox_max_events)
                .with_context(|| format!("cannot open the event outbox in {}", data_dir.display()))?,
        )),
        None => None,
    };
    let idempotency = IdempotencyStore::open(&data_dir.join("idempotency"), IDEMPOTENCY_KEYS)
        .with_context(|| format!("cannot open the idempotency keys in {}", data_dir.display()))?;
    let metrics = Arc::new(Metrics::default());
    let housekeeping = CancellationToken::new();
    tokio::spawn(memory::trim_when_idle(metrics.clone(), housekeeping.clone()));
    let wake = Arc::new(Notify::new());
    let settings = SessionSettings {
        name: config.session.to_string(),
        namespace: config.namespace.clone(),
        phone: config.phone_number.clone(),
        media_max_bytes: config.media_max_bytes,
        rate_per_minute: config.rate_per_minute,
        rate_burst: config.rate_burst,
        message_log: MESSAGE_LOG,
        send_queue: SEND_QUEUE,
    };
    let shutdown = CancellationToken::new();
    let (session, tasks) = Session::new(
        settings,
        engine.clone(),
        events_tx,
        events_rx,
        outbox.clone(),
        wake.clone(),
        idempotency,
        metrics.clone(),
        shutdown.clone(),
    );
    let running = session.spawn(tasks);

    let delivery_stop = CancellationToken::new();
    let delivery = match (&config.events_url, &outbox) {
        (Some(url), Some(outbox)) => {
            let d = Delivery {
                outbox: outbox.clone(),
                url: url.clone(),
                token: config.token.clone(),
                retry: RetryPolicy {
                    max: Duration::from_millis(config.events_retry_max_ms.max(1)),
                    ..RetryPolicy::default()
                },
                wake,
                metrics,
            };
            tokio::spawn(
                outbox::sync_undelivered(outbox.clone(), delivery_stop.clone()).in_current_span(),
            );
            Some(tokio::spawn(d.run(delivery_stop.clone()).in_current_span()))
        }
        _ => None,
    };

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local = listener.local_addr().context("listening socket has no address")?;
    let state = Arc::new(http::AppState {
        session: session.clone(),
        token: config.token.clone(),
        span: tracing::Span::current(),
        body_limit: config.body_limit(),
    });
    let server_stop = shutdown.clone();
    let server = tokio::spawn(
        axum::serve(listener, http::app(state))
            .with_graceful_shutdown(async move { server_stop.cancelled().await })
            .into_future()
            .in_current_span(),
    );

    session.start_engine().await;
    tracing::info!(
        listen = %local,
        data_dir = %data_dir.display(),
        events = config.events_url.as_ref().map(|u| u.as_str()).unwrap_or("(none: events are not kept)"),
        pending_events = session.outbox_pending(),
        ready_ms = started.elapsed().as_millis() as u64,
        "session pod ready"
    );

    stop.cancelled().await;

    // Orderly stop: refuse new work and end long polls, let in-flight requests finish, stop the
    // engine (its last events are still applied), then give delivery a moment to flush.
    let stopping = Instant::now();
    shutdown.cancel();
    match tokio::time::timeout(STOP_HTTP, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish in time; dropping them"),
    }
    if tokio::time::timeout(STOP_ENGINE, engine.shutdown()).await.is_err() {
        tracing::warn!("engine did not stop in time");
    }
    housekeeping.cancel();
    running.events_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_millis(500), running.event_loop).await;
    let _ = tokio::time::timeout(Duration::from_millis(200), running.sender).await;
    if let Some(delivery) = delivery {
        let flush_until = Instant::now() + STOP_FLUSH;
        while session.outbox_pending() > 0 && Instant::now() < flush_until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        delivery_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_millis(200), delivery).await;
    }
    if let Some(outbox) = outbox {
        // Syncs and acknowledgements are lazy; a clean stop leaves everything on disk.
        match tokio::task::spawn_blocking(move || outbox.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "outbox: cannot flush at stop"),
            Err(e) => tracing::error!(error = %e, "outbox: flush task failed"),
        }
    }
    tracing::info!(
        pending_events = session.outbox_pending(),
        stop_ms = stopping.elapsed().as_millis() as u64,
        "session pod stopped"
    );
    Ok(())
}

/// Builds the configured engine; never substitutes one for the other.
pub fn build_engine(config: &Config, ctx: EngineContext) -> Arc<dyn Engine> {
    match config.engine {
        wa_api::Engine::Sandbox => SandboxEngine::new(ctx, config.sandbox_options()),
        wa_api::Engine::Whatsapp => {
            #[allow(clippy::needless_update)]
            let opts = WhatsAppOptions {
                server_url: config.wa_server_url.clone(),
                media_url: config.wa_media_url.clone(),
                ..WhatsAppOptions::default()
            };
            WhatsAppEngine::new(ctx, opts)
        }
    }
}

/// One process per data directory: two clients with one identity fight and get logged out,
/// and two writers would corrupt the outbox. The lock is released when the process exits.
fn lock_data_dir(dir: &Path) -> anyhow::Result<File> {
    let path = dir.join(".wa-session.lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the data directory {} is in use by another wa-session process",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn library_backtraces_are_off_unless_the_user_chose() {
        let check = |current: Option<&str>, expected: Option<&str>| {
            assert_eq!(library_backtrace_default(current.map(OsStr::new)), expected, "{current:?}");
        };
        check(None, Some("0"));
        check(Some(""), Some("0"));
        check(Some("0"), None);
        check(Some("1"), None);
        check(Some("full"), None);
    }
}
