//! Start-up: one code path builds the running gateway for both modes (store, first admin
//! key, directory, background workers, HTTP server) and stops it in order on SIGTERM.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::auth::{KeyVerifier, generate_key};
use crate::config::{KubeArgs, LocalArgs, LogFormat, ServeArgs};
use crate::directory::kube::KubeDirectory;
use crate::directory::local::{LocalConfig, LocalDirectory};
use crate::directory::{SessionDirectory, StatusBoard};
use crate::metrics::Metrics;
use crate::pod_client::PodClient;
use crate::state::{AppState, Gateway};
use crate::store::{Backend, Store};

pub enum ModeArgs {
    Local(LocalArgs),
    Kubernetes(KubeArgs),
}

pub fn init_tracing(args: &ServeArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The namespace this pod runs in, from the service account mount.
fn own_namespace() -> Option<String> {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// How local session processes are started: `$WA_SESSION_BIN`, or this binary's `session`.
fn session_command() -> anyhow::Result<Vec<OsString>> {
    if let Some(bin) = std::env::var_os("WA_SESSION_BIN").filter(|b| !b.is_empty()) {
        return Ok(vec![bin]);
    }
    let me = std::env::current_exe().context("finding this program to run sessions with")?;
    Ok(vec![me.into_os_string(), "session".into()])
}

/// Creates the first admin key once per database and prints it, unless `WA_ADMIN_KEY` is set.
async fn bootstrap_admin_key(store: &Store, env_admin: Option<&str>) -> anyhow::Result<Option<String>> {
    if env_admin.is_some_and(|k| !k.is_empty()) {
        return Ok(None);
    }
    if !store.set_setting_once("bootstrap_admin_key", &crate::util::now_ms().to_string()).await? {
        return Ok(None);
    }
    let (raw, record) = generate_key("first admin key", true, &[], &[]);
    store.insert_key(&record).await?;
    Ok(Some(raw))
}

/// Runs the gateway until SIGTERM/SIGINT.
pub async fn run(args: ServeArgs, mode: ModeArgs) -> anyhow::Result<()> {
    let settings = args.settings();
    let local = matches!(mode, ModeArgs::Local(_));
    let listen = args.listen.unwrap_or_else(|| {
        let ip = if local { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::UNSPECIFIED) };
        SocketAddr::new(ip, 8080)
    });

    let database_url = match (&args.database_url, &mode) {
        (Some(u), _) => u.clone(),
        (None, ModeArgs::Local(l)) => {
            let dir = l.data_dir();
            std::fs::create_dir_all(&dir).with_context(|| format!("creating the data directory {}", dir.display()))?;
            format!("sqlite://{}", dir.join("gateway.db").display())
        }
        (None, ModeArgs::Kubernetes(_)) => anyhow::bail!("DATABASE_URL (or --database-url) is required in Kubernetes mode"),
    };
    let store = Store::connect(&database_url).await?;
    if store.backend() == Backend::Sqlite {
        // One replica owns a SQLite file: any lease in it belongs to a process that is gone.
        let sends = store.release_all_send_leases().await?;
        let hooks = store.release_all_delivery_leases().await?;
        if sends + hooks > 0 {
            info!(sends, webhooks = hooks, "resuming work left by the previous run");
        }
    }
    let env_admin = std::env::var("WA_ADMIN_KEY").ok();
    let first_key = bootstrap_admin_key(&store, env_admin.as_deref()).await?;

    let listener = TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
    let bound = listener.local_addr()?;
    let pods = PodClient::new(args.send_timeout())?;
    let board = Arc::new(StatusBoard::default());

    let directory: Arc<dyn SessionDirectory> = match &mode {
        ModeArgs::Local(l) => {
            let host = if bound.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { bound.ip() };
            let events_host = SocketAddr::new(host, bound.port());
            let config = LocalConfig {
                data_dir: l.data_dir(),
                session_command: session_command()?,
                events_url: format!("http://{events_host}/internal/v1/events"),
                stop_grace: l.stop_grace(),
                max_backoff: Duration::from_secs(30),
                extra_env: l.session_env()?,
            };
            LocalDirectory::start(store.clone(), config, pods.clone(), board).await?
        }
        ModeArgs::Kubernetes(k) => {
            let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
            let namespace = k.namespace.clone().or_else(own_namespace).unwrap_or_else(|| "default".into());
            info!(namespace, "following WhatsAppSession objects");
            KubeDirectory::start(client, namespace, board)
        }
    };

    let metrics = Arc::new(Metrics::default());
    let gw: AppState = Arc::new(Gateway {
        store: store.clone(),
        directory: directory.clone(),
        keys: KeyVerifier::new(store.clone(), env_admin.as_deref(), args.key_cache()),
        pods: pods.clone(),
        metrics: metrics.clone(),
        outbox_wake: Notify::new(),
        webhook_wake: Notify::new(),
        settings,
    });

    let shutdown = CancellationToken::new();
    let workers = start_workers(&gw, args.scrape_interval(), &shutdown)?;

    let shown = if bound.ip().is_unspecified() { SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port()) } else { bound };
    println!("wa-operator gateway listening on http://{shown}/");
    if let Some(key) = first_key {
        println!("first admin API key (shown once, store it now): {key}");
    }
    info!(%bound, mode = if local { "local" } else { "kubernetes" }, "gateway started");

    let app = crate::http::app(gw.clone());
    let stop = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        wait_for_signal().await;
        stop.cancel();
    });
    let result = server.await.context("serving HTTP");
    shutdown.cancel();
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
    }
    directory.shutdown().await;
    store.close().await;
    info!("gateway stopped");
    result
}

/// The background work: send outbox, webhook deliveries, fleet metrics, pruning.
pub fn start_workers(gw: &AppState, scrape_interval: Duration, shutdown: &CancellationToken) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let webhook_http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("wa-gateway/", env!("CARGO_PKG_VERSION")))
        .build()?;
    let mut handles = vec![
        tokio::spawn(crate::outbox::run(gw.clone(), shutdown.clone())),
        tokio::spawn(crate::delivery::run(gw.clone(), webhook_http, shutdown.clone())),
        tokio::spawn(crate::memory::trim_after_backlog(gw.metrics.clone(), gw.settings.max_in_flight, shutdown.clone())),
        tokio::spawn(crate::metrics::run_collector(
            gw.metrics.clone(),
            gw.directory.clone(),
            gw.pods.clone(),
            gw.store.clone(),
            scrape_interval,
            shutdown.clone(),
        )),
    ];
    let store = gw.store.clone();
    let stop = shutdown.clone();
    handles.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
            }
            let week_ago = crate::util::now_ms() - 7 * 24 * 3600 * 1000;
            if let Err(e) = store.prune_processed_events(week_ago).await {
                warn!(error = %e, "pruning processed event ids failed");
            }
        }
    }));
    Ok(handles)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: stopping"),
                _ = int.recv() => info!("SIGINT: stopping"),
            }
        }
        _ => {
            warn!("cannot listen for signals; stopping on ctrl-c only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
