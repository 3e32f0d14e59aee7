//! The command line: `wa-gateway` (Kubernetes mode), `wa-gateway local`, `wa-gateway session`
//! (a session pod, for local mode), `wa-gateway openapi`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::state::Settings;

/// The REST gateway of wa-operator. Without a subcommand it runs in Kubernetes mode.
#[derive(Debug, Parser)]
#[command(name = "wa-gateway", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,

    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Local mode: SQLite and a data directory, supervising session processes on this machine.
    Local(LocalCli),
    /// Run one session pod (what local mode starts per session); takes `wa-session`'s flags.
    Session(wa_session::Config),
    /// Print the OpenAPI document.
    Openapi,
}

#[derive(Debug, Args)]
pub struct LocalCli {
    #[command(flatten)]
    pub serve: ServeArgs,

    #[command(flatten)]
    pub local: LocalArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flags of both modes.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on [default: 0.0.0.0:8080 in Kubernetes mode, 127.0.0.1:8080 locally].
    #[arg(long, env = "WA_GATEWAY_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// `sqlite://<file>` or `postgres://…` [default: SQLite in the data directory (local),
    /// required in Kubernetes mode].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Largest media (decoded bytes) a send may carry.
    #[arg(long, env = "WA_GATEWAY_MEDIA_MAX_BYTES", default_value_t = wa_api::pod::DEFAULT_MEDIA_MAX_BYTES)]
    pub media_max_bytes: usize,

    /// Seconds between collections of the pods' metrics and status.
    #[arg(long, env = "WA_GATEWAY_SCRAPE_INTERVAL", default_value_t = 15.0)]
    pub scrape_interval_seconds: f64,

    /// Seconds a forward may hold a message before the outbox may forward it again.
    #[arg(long, env = "WA_GATEWAY_SEND_LEASE", default_value_t = 60.0)]
    pub send_lease_seconds: f64,

    /// Seconds an async send may wait for its session before it fails.
    #[arg(long, env = "WA_GATEWAY_OUTBOX_MAX_AGE", default_value_t = 86_400.0)]
    pub outbox_max_age_seconds: f64,

    /// Webhook attempts before a delivery is dead-lettered.
    #[arg(long, env = "WA_GATEWAY_WEBHOOK_ATTEMPTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub webhook_max_attempts: u32,

    /// First webhook retry delay in milliseconds (doubles per attempt, with jitter).
    #[arg(long, env = "WA_GATEWAY_WEBHOOK_BACKOFF_MS", default_value_t = 2000)]
    pub webhook_backoff_ms: u64,

    /// Longest webhook retry delay in seconds.
    #[arg(long, env = "WA_GATEWAY_WEBHOOK_BACKOFF_MAX", default_value_t = 600)]
    pub webhook_backoff_max_seconds: u64,

    /// Seconds a webhook receiver has to answer.
    #[arg(long, env = "WA_GATEWAY_WEBHOOK_TIMEOUT", default_value_t = 10.0)]
    pub webhook_timeout_seconds: f64,

    /// Seconds a verified API key is cached (revocations through another replica take
    /// effect within this time).
    #[arg(long, env = "WA_GATEWAY_KEY_CACHE", default_value_t = 5.0)]
    pub key_cache_seconds: f64,

    /// Seconds a sync send waits for the pod's answer.
    #[arg(long, env = "WA_GATEWAY_SEND_TIMEOUT", default_value_t = 30.0)]
    pub send_timeout_seconds: f64,

    /// API requests answered at once; past it requests are refused at once with 503
    /// OVERLOADED and `Retry-After`, so a backlog cannot grow the gateway's memory. Pod event
    /// deliveries, health, metrics and the OpenAPI document are not counted.
    #[arg(long, env = "WA_GATEWAY_MAX_IN_FLIGHT", default_value_t = crate::state::DEFAULT_MAX_IN_FLIGHT,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_in_flight: u32,

    /// Log filter (`tracing` syntax).
    #[arg(long, env = "WA_GATEWAY_LOG", default_value = "info")]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "WA_GATEWAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Flags of local mode.
#[derive(Debug, Clone, Args)]
pub struct LocalArgs {
    /// Holds the database, each session's data (`sessions/<name>`), pid files and logs
    /// [default: $XDG_DATA_HOME/wa-operator or ~/.local/share/wa-operator].
    #[arg(long, env = "WA_GATEWAY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Seconds a session process has to stop after SIGTERM before it is killed.
    #[arg(long, env = "WA_GATEWAY_STOP_GRACE", default_value_t = 10.0)]
    pub stop_grace_seconds: f64,

    /// Extra environment for every session process, `NAME=value` (repeatable; e.g. sandbox timings).
    #[arg(long = "session-env", value_name = "NAME=VALUE")]
    pub session_env: Vec<String>,
}

/// Flags of Kubernetes mode.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Namespace of the WhatsAppSession objects [default: the pod's own namespace, or "default"].
    #[arg(long, env = "WA_GATEWAY_NAMESPACE")]
    pub namespace: Option<String>,
}

fn secs(s: f64, fallback: Duration) -> Duration {
    if s.is_finite() && s > 0.0 { Duration::from_secs_f64(s) } else { fallback }
}

impl ServeArgs {
    pub fn settings(&self) -> Settings {
        let d = Settings::default();
        Settings {
            media_max_bytes: self.media_max_bytes.max(1),
            send_lease: secs(self.send_lease_seconds, d.send_lease),
            outbox_max_age: secs(self.outbox_max_age_seconds, d.outbox_max_age),
            webhook_max_attempts: self.webhook_max_attempts,
            webhook_backoff_base: Duration::from_millis(self.webhook_backoff_ms.max(1)),
            webhook_backoff_max: Duration::from_secs(self.webhook_backoff_max_seconds.max(1)),
            webhook_timeout: secs(self.webhook_timeout_seconds, d.webhook_timeout),
            max_in_flight: self.max_in_flight as usize,
        }
    }

    pub fn scrape_interval(&self) -> Duration {
        secs(self.scrape_interval_seconds, Duration::from_secs(15))
    }

    pub fn key_cache(&self) -> Duration {
        if self.key_cache_seconds.is_finite() && self.key_cache_seconds >= 0.0 {
            Duration::from_secs_f64(self.key_cache_seconds)
        } else {
            Duration::from_secs(5)
        }
    }

    pub fn send_timeout(&self) -> Duration {
        secs(self.send_timeout_seconds, Duration::from_secs(30))
    }
}

impl LocalArgs {
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.data_dir {
            return d.clone();
        }
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("wa-operator")
    }

    pub fn stop_grace(&self) -> Duration {
        secs(self.stop_grace_seconds, Duration::from_secs(10))
    }

    pub fn session_env(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.session_env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| anyhow::anyhow!("--session-env takes NAME=VALUE, got {kv:?}"))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_modes() {
        let cli = Cli::try_parse_from(["wa-gateway", "--namespace", "wa", "--listen", "127.0.0.1:9000"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.kube.namespace.as_deref(), Some("wa"));
        assert_eq!(cli.serve.listen, Some("127.0.0.1:9000".parse().unwrap()));

        let cli = Cli::try_parse_from(["wa-gateway", "local", "--data-dir", "/tmp/x", "--session-env", "A=1"]).unwrap();
        match cli.command {
            Some(Command::Local(l)) => {
                assert_eq!(l.local.data_dir(), PathBuf::from("/tmp/x"));
                assert_eq!(l.local.session_env().unwrap(), [("A".to_owned(), "1".to_owned())]);
            }
            other => panic!("{other:?}"),
        }

        let cli = Cli::try_parse_from(["wa-gateway", "session", "--engine", "sandbox", "--token", "t", "--listen", "127.0.0.1:1"]).unwrap();
        match cli.command {
            Some(Command::Session(c)) => assert_eq!(c.engine, wa_api::Engine::Sandbox),
            other => panic!("{other:?}"),
        }
    }
}
