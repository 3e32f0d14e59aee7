//! `wa-session`'s configuration: flags with environment equivalents (`wa_api::pod::env`), so
//! the operator (env) and the gateway's local supervisor (flags or env) cannot drift from it.
//! The gateway embeds this struct as `wa-gateway session <same flags>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use wa_api::pod::{DEFAULT_MEDIA_MAX_BYTES, env};
use wa_api::{PhoneNumber, SessionName};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// One WhatsApp session per process: the session pod of wa-operator.
#[derive(Clone, Parser)]
#[command(name = "wa-session", version, about, args_override_self = true)]
pub struct Config {
    /// Which engine runs the session: `whatsapp` (WhatsApp's servers) or `sandbox` (a simulation).
    #[arg(long, env = env::ENGINE, default_value = "whatsapp")]
    pub engine: wa_api::Engine,

    /// The session's persistent directory (auth state, outbox, idempotency keys).
    #[arg(long, env = env::DATA_DIR, default_value = wa_api::names::POD_DATA_DIR)]
    pub data_dir: PathBuf,

    /// Address of the HTTP API: `IP:port`, `[IPv6]:port`, or a bare IP (port 8080).
    #[arg(long, env = env::LISTEN, default_value = "0.0.0.0:8080", value_parser = wa_api::pod::parse_listen)]
    pub listen: SocketAddr,

    /// Bearer token every API call but the health checks must carry; also sent with event
    /// deliveries. Required.
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    pub token: String,

    /// Where to POST events (the gateway's `/internal/v1/events`). Without it, events are not
    /// kept: status, metrics and the message log still work.
    #[arg(long, env = env::EVENTS_URL)]
    pub events_url: Option<reqwest::Url>,

    /// The session's name, used in events and logs.
    #[arg(long, env = env::SESSION, default_value = "default")]
    pub session: SessionName,

    /// The session's namespace, used in events.
    #[arg(long, env = env::NAMESPACE)]
    pub namespace: Option<String>,

    /// Pair by an 8-character code for this number (E.164) instead of a QR code, when not paired.
    #[arg(long, env = env::PHONE_NUMBER)]
    pub phone_number: Option<PhoneNumber>,

    /// Sustained sends per minute.
    #[arg(long, env = env::RATE_PER_MINUTE, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_per_minute: u32,

    /// Sends allowed at once above the sustained rate.
    #[arg(long, env = env::RATE_BURST, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_burst: u32,

    /// Largest media (decoded bytes) accepted in a send or kept from an inbound message.
    #[arg(long, env = env::MEDIA_MAX_BYTES, default_value_t = DEFAULT_MEDIA_MAX_BYTES)]
    pub media_max_bytes: usize,

    /// WebSocket URL of WhatsApp's chat server (whatsapp engine; tests point it at an emulator).
    #[arg(long, env = env::SERVER_URL)]
    pub wa_server_url: Option<String>,

    /// Base URL of WhatsApp's media server (whatsapp engine).
    #[arg(long, env = env::MEDIA_URL)]
    pub wa_media_url: Option<String>,

    /// Log filter, `tracing` syntax (e.g. `info`, `wa_session=debug`). Without it, `RUST_LOG`;
    /// without that, ours at info and everything else (wa-rs) at warn.
    #[arg(long, env = env::LOG)]
    pub log: Option<String>,

    /// Log line format.
    #[arg(long, env = "WA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Runtime worker threads: 0 runs everything on one thread (smallest footprint).
    #[arg(long, env = "WA_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    /// Events kept for delivery at most; the oldest are dropped beyond it.
    #[arg(long, env = "WA_OUTBOX_MAX_EVENTS", default_value_t = 100_000)]
    pub outbox_max_events: usize,

    /// Longest wait between event delivery attempts, in milliseconds.
    #[arg(long, env = "WA_EVENTS_RETRY_MAX_MS", default_value_t = 30_000)]
    pub events_retry_max_ms: u64,

    /// Sandbox: seconds each QR code is shown before the next one.
    #[arg(long, env = "WA_SANDBOX_QR_SECONDS", default_value_t = 20.0)]
    pub sandbox_qr_seconds: f64,

    /// Sandbox: milliseconds from a send to its "delivered" receipt.
    #[arg(long, env = "WA_SANDBOX_DELIVERED_MS", default_value_t = 1000)]
    pub sandbox_delivered_ms: u64,

    /// Sandbox: milliseconds from a send to its "read" receipt.
    #[arg(long, env = "WA_SANDBOX_READ_MS", default_value_t = 3000)]
    pub sandbox_read_ms: u64,
}

/// Everything but the token, which must never reach a log.
impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("engine", &self.engine)
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("token", &"<redacted>")
            .field("events_url", &self.events_url.as_ref().map(|u| u.as_str()))
            .field("session", &self.session.as_str())
            .field("namespace", &self.namespace)
            .field(
                "phone_number",
                &self.phone_number.as_ref().map(|p| p.as_str()),
            )
            .field("rate_per_minute", &self.rate_per_minute)
            .field("rate_burst", &self.rate_burst)
            .field("media_max_bytes", &self.media_max_bytes)
            .field("wa_server_url", &self.wa_server_url)
            .field("wa_media_url", &self.wa_media_url)
            .field("log", &self.log)
            .field("log_format", &self.log_format)
            .finish_non_exhaustive()
    }
}

/// What the session logs unless told otherwise: our crates at info, everything else at warn.
/// wa-rs logs through `log` under targets such as `Client/Recv` or `AppState` rather than its
/// crate names, so it cannot be silenced directive by directive; its info lines are protocol
/// detail nobody running a fleet reads.
pub const DEFAULT_LOG: &str = "warn,wa_session=info,wa_api=info";

/// The log filter in force: `--log` / `WA_LOG`, else `RUST_LOG`, else [`DEFAULT_LOG`]. Blank
/// values count as unset.
pub fn log_directive(flag: Option<&str>, rust_log: Option<&str>) -> String {
    let given = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
    given(flag).or_else(|| given(rust_log)).unwrap_or_else(|| DEFAULT_LOG.to_owned())
}

impl Config {
    /// The log filter for this process (see [`log_directive`]).
    pub fn log_directive(&self) -> String {
        log_directive(self.log.as_deref(), std::env::var("RUST_LOG").ok().as_deref())
    }

    /// Checks what clap cannot; the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(log) = &self.log
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(log)
        {
            return Err(format!("--log / {}: not a log filter ({e}): {log:?}", env::LOG));
        }
        if self.token.trim().is_empty() {
            return Err(format!(
                "an API token is required: pass --token or set {} (every API call must carry it)",
                env::TOKEN
            ));
        }
        if self
            .token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err("the token must not contain whitespace or control characters".into());
        }
        if self.media_max_bytes == 0 {
            return Err("--media-max-bytes must be at least 1".into());
        }
        if let Some(url) = &self.events_url
            && !matches!(url.scheme(), "http" | "https")
        {
            return Err(format!("--events-url must be http(s), got {url}"));
        }
        if !(self.sandbox_qr_seconds.is_finite() && self.sandbox_qr_seconds >= 0.05) {
            return Err("--sandbox-qr-seconds must be at least 0.05".into());
        }
        Ok(())
    }

    /// Largest request body: base64 media (4/3 of the cap) plus room for the JSON around it
    /// and the longest text, escaped.
    pub fn body_limit(&self) -> usize {
        self.media_max_bytes
            .saturating_add(2)
            .saturating_div(3)
            .saturating_mul(4)
            .saturating_add(1024 * 1024)
    }

    pub fn sandbox_options(&self) -> crate::engine::sandbox::SandboxOptions {
        crate::engine::sandbox::SandboxOptions {
            qr_period: Duration::from_secs_f64(self.sandbox_qr_seconds.max(0.05)),
            delivered_after: Duration::from_millis(self.sandbox_delivered_ms),
            read_after: Duration::from_millis(self.sandbox_read_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut all = vec!["wa-session"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
            .map_err(|e| e.to_string())
            .and_then(|c| c.validate().map(|()| c))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--token", "t"]).unwrap();
        assert_eq!(c.engine, wa_api::Engine::Whatsapp);
        assert_eq!(c.data_dir, PathBuf::from("/data"));
        assert_eq!(c.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.session.as_str(), "default");
        assert_eq!((c.rate_per_minute, c.rate_burst), (30, 5));
        assert_eq!(c.media_max_bytes, DEFAULT_MEDIA_MAX_BYTES);
        assert!(c.body_limit() > DEFAULT_MEDIA_MAX_BYTES / 3 * 4);
    }

    #[test]
    fn log_filter_from_flag_then_rust_log_then_default() {
        let check = |flag: Option<&str>, rust_log: Option<&str>, expected: &str| {
            assert_eq!(log_directive(flag, rust_log), expected, "{flag:?} {rust_log:?}");
        };
        check(None, None, DEFAULT_LOG);
        check(None, Some(""), DEFAULT_LOG);
        check(Some("  "), None, DEFAULT_LOG);
        check(None, Some("debug"), "debug");
        check(Some("info,wa_session=debug"), Some("debug"), "info,wa_session=debug");
    }

    /// The default keeps ours at info and wa-rs at warn, whatever its log targets.
    #[test]
    fn default_log_filter_quiets_wa_rs_only() {
        use tracing::Level;
        use tracing_subscriber::layer::SubscriberExt as _;
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::try_new(DEFAULT_LOG).unwrap());
        tracing::subscriber::with_default(subscriber, || {
            // Targets wa-rs really logs under (its `log` calls name them explicitly).
            assert!(!tracing::enabled!(target: "Client/Recv", Level::INFO));
            assert!(!tracing::enabled!(target: "AppState", Level::INFO));
            assert!(!tracing::enabled!(target: "wa_rs::client", Level::INFO));
            assert!(tracing::enabled!(target: "Client/Recv", Level::WARN));
            assert!(tracing::enabled!(target: "wa_rs_core::send", Level::WARN));
            assert!(tracing::enabled!(target: "wa_session::session", Level::INFO));
            assert!(!tracing::enabled!(target: "wa_session::session", Level::DEBUG));
        });
    }

    #[test]
    fn debug_output_hides_the_token() {
        let c = parse(&["--token", "s3cret-value"]).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cret-value") && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn a_repeated_flag_takes_the_last_value() {
        let c = parse(&["--token", "t", "--rate-burst", "2", "--rate-burst", "9"]).unwrap();
        assert_eq!(c.rate_burst, 9);
    }

    #[test]
    fn refusals_say_what_to_fix() {
        let check = |args: &[&str], needle: &str| {
            let err = parse(args).expect_err("must be refused");
            assert!(err.contains(needle), "{args:?}: {err}");
        };
        check(&[], "--token");
        check(&["--token", "  "], "token is required");
        check(&["--token", "t", "--engine", "baileys"], "unknown engine");
        check(&["--token", "t", "--session", "Bad_Name"], "session name");
        check(&["--token", "t", "--phone-number", "555"], "E.164");
        check(
            &["--token", "t", "--rate-per-minute", "0"],
            "rate-per-minute",
        );
        check(&["--token", "t", "--events-url", "ftp://x"], "http");
        check(&["--token", "t", "--listen", "nowhere"], "listen");
        check(&["--token", "t", "--listen", "10.0.0.1:"], "listen");
        check(&["--token", "t", "--log", "wa_session=loud"], "not a log filter");
    }

    /// The operator sets `WA_LISTEN=$(POD_IP)`: a bare IPv4 or IPv6 address listens on 8080.
    #[test]
    fn listen_takes_an_address_with_or_without_port() {
        let check = |arg: &str, expected: &str| {
            let c = parse(&["--token", "t", "--listen", arg]).unwrap();
            assert_eq!(c.listen, expected.parse::<SocketAddr>().unwrap(), "{arg}");
        };
        check("127.0.0.1:9000", "127.0.0.1:9000");
        check("[::1]:9000", "[::1]:9000");
        check("10.244.0.7", "10.244.0.7:8080");
        check("fd00:10:244::7", "[fd00:10:244::7]:8080");
        check("[fd00:10:244::7]", "[fd00:10:244::7]:8080");
    }
}
