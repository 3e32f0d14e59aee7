//! Readiness, liveness and startup probes: `httpGet` (2xx/3xx is success), `tcpSocket`
//! (connects), `exec` (exit 0). `grpc` probes are not supported and always fail, with a
//! message saying so.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Timing and thresholds of a probe, with the API's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProbeTiming {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl ProbeTiming {
    /// `max_period` caps the period (a test-speed knob of the runner; see tests/README.md),
    /// and the initial delay too unless `keep_delay` (liveness keeps its delay, so that a slow
    /// start is not mistaken for a hang).
    pub fn of(probe: &Probe, max_period: Option<Duration>, keep_delay: bool) -> Self {
        let secs = |v: Option<i32>, default: u64| Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default));
        let mut period = secs(probe.period_seconds, 10).max(Duration::from_millis(100));
        let mut initial_delay = secs(probe.initial_delay_seconds, 0);
        if let Some(max) = max_period {
            period = period.min(max);
            if !keep_delay {
                initial_delay = initial_delay.min(max);
            }
        }
        Self {
            initial_delay,
            period,
            timeout: secs(probe.timeout_seconds, 1).max(Duration::from_millis(100)),
            success_threshold: probe.success_threshold.and_then(|v| u32::try_from(v).ok()).unwrap_or(1).max(1),
            failure_threshold: probe.failure_threshold.and_then(|v| u32::try_from(v).ok()).unwrap_or(3).max(1),
        }
    }
}

/// How to run one probe attempt.
#[derive(Debug, Clone)]
pub enum ProbeAction {
    Http { url: String, headers: Vec<(String, String)> },
    Tcp { addr: String },
    Exec { program: std::path::PathBuf, args: Vec<String>, env: Vec<(String, String)> },
    Unsupported(String),
}

fn port_number(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// Finds the local program for an `exec` command: program and its arguments.
pub type Resolver<'a> = &'a dyn Fn(&[String]) -> Option<(std::path::PathBuf, Vec<String>)>;

/// The action of a probe for a container on `pod_ip`. `exec` commands resolve through
/// `resolve` like container commands do.
pub fn action(
    probe: &Probe,
    container: &Container,
    pod_ip: &str,
    env: &[(String, String)],
    resolve: Resolver<'_>,
) -> ProbeAction {
    if let Some(http) = &probe.http_get {
        let port = match port_number(&http.port, container) {
            Ok(p) => p,
            Err(e) => return ProbeAction::Unsupported(e),
        };
        if http.scheme.as_deref().is_some_and(|s| !s.eq_ignore_ascii_case("http")) {
            return ProbeAction::Unsupported("only HTTP probes are supported, not HTTPS".into());
        }
        let host = http.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| pod_ip.to_owned());
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let path = if path.starts_with('/') { path } else { format!("/{path}") };
        let headers = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        return ProbeAction::Http {
            url: format!("http://{host}:{port}{path}"),
            headers,
        };
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = match port_number(&tcp.port, container) {
            Ok(p) => p,
            Err(e) => return ProbeAction::Unsupported(e),
        };
        let host = tcp.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| pod_ip.to_owned());
        return ProbeAction::Tcp {
            addr: format!("{host}:{port}"),
        };
    }
    if let Some(exec) = &probe.exec {
        let command = exec.command.clone().unwrap_or_default();
        return match resolve(&command) {
            Some((program, args)) => ProbeAction::Exec {
                program,
                args,
                env: env.to_vec(),
            },
            None => ProbeAction::Unsupported(format!("exec probe command {command:?} has no local binary")),
        };
    }
    if probe.grpc.is_some() {
        return ProbeAction::Unsupported("grpc probes are not supported by the test pod runner".into());
    }
    ProbeAction::Unsupported("the probe has no handler".into())
}

/// One attempt: `Ok(())` on success, the reason otherwise.
pub async fn run(action: &ProbeAction, timeout: Duration, http: &reqwest::Client) -> Result<(), String> {
    match action {
        ProbeAction::Http { url, headers } => {
            let mut request = http.get(url).timeout(timeout);
            for (k, v) in headers {
                request = request.header(k, v);
            }
            match request.send().await {
                Ok(resp) if resp.status().as_u16() < 400 => Ok(()),
                Ok(resp) => Err(format!("HTTP probe failed with statuscode: {}", resp.status().as_u16())),
                Err(e) => Err(format!("Get \"{url}\": {e}")),
            }
        }
        ProbeAction::Tcp { addr } => match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("dial tcp {addr}: {e}")),
            Err(_) => Err(format!("dial tcp {addr}: i/o timeout")),
        },
        ProbeAction::Exec { program, args, env } => {
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .env_clear()
                .envs(env.iter().cloned())
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true);
            match tokio::time::timeout(timeout, cmd.status()).await {
                Ok(Ok(status)) if status.success() => Ok(()),
                Ok(Ok(status)) => Err(format!("command exited with {status}")),
                Ok(Err(e)) => Err(format!("exec failed: {e}")),
                Err(_) => Err(format!("command timed out after {timeout:?}")),
            }
        }
        ProbeAction::Unsupported(why) => Err(why.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(json!({"name": "c", "ports": [{"name": "http", "containerPort": 8080}]})).unwrap()
    }

    fn probe(v: serde_json::Value) -> Probe {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn actions() {
        let none = |_: &[String]| None;
        let c = container();
        let cases = [
            (json!({"httpGet": {"path": "/readyz", "port": 8080}}), "http://127.0.0.9:8080/readyz"),
            (json!({"httpGet": {"path": "healthz", "port": "http"}}), "http://127.0.0.9:8080/healthz"),
            (json!({"httpGet": {"port": 9000, "host": "localhost"}}), "http://localhost:9000/"),
        ];
        for (p, url) in cases {
            match action(&probe(p), &c, "127.0.0.9", &[], &none) {
                ProbeAction::Http { url: got, .. } => assert_eq!(got, url),
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(action(&probe(json!({"tcpSocket": {"port": "http"}})), &c, "127.0.0.9", &[], &none),
            ProbeAction::Tcp { addr } if addr == "127.0.0.9:8080"));
        assert!(matches!(action(&probe(json!({"httpGet": {"port": "nope"}})), &c, "127.0.0.9", &[], &none), ProbeAction::Unsupported(_)));
        assert!(matches!(action(&probe(json!({"grpc": {"port": 1}})), &c, "127.0.0.9", &[], &none), ProbeAction::Unsupported(_)));
    }

    #[test]
    fn timing_defaults_and_cap() {
        let t = ProbeTiming::of(&probe(json!({})), None, false);
        assert_eq!((t.period, t.timeout, t.success_threshold, t.failure_threshold), (Duration::from_secs(10), Duration::from_secs(1), 1, 3));
        let p = probe(json!({"periodSeconds": 10, "initialDelaySeconds": 5}));
        let t = ProbeTiming::of(&p, Some(Duration::from_millis(200)), false);
        assert_eq!((t.period, t.initial_delay), (Duration::from_millis(200), Duration::from_millis(200)));
        let t = ProbeTiming::of(&p, Some(Duration::from_millis(200)), true);
        assert_eq!((t.period, t.initial_delay), (Duration::from_millis(200), Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn http_and_tcp_attempts() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route("/bad", axum::routing::get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no") }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let t = Duration::from_secs(2);
        let http_probe = |path: &str| ProbeAction::Http { url: format!("http://{addr}{path}"), headers: vec![] };
        assert_eq!(run(&http_probe("/ok"), t, &http).await, Ok(()));
        assert_eq!(run(&http_probe("/bad"), t, &http).await, Err("HTTP probe failed with statuscode: 503".into()));
        assert_eq!(run(&ProbeAction::Tcp { addr: addr.to_string() }, t, &http).await, Ok(()));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(run(&ProbeAction::Tcp { addr: closed.to_string() }, t, &http).await.is_err());
        let exec = |cmd: &str| ProbeAction::Exec { program: cmd.into(), args: vec![], env: vec![] };
        assert_eq!(run(&exec("/bin/true"), t, &http).await, Ok(()));
        assert!(run(&exec("/bin/false"), t, &http).await.is_err());
    }
}
