//! The operator's flags (each with an environment variable) and their validation.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::controller::Config;
use crate::desired::PodSettings;
use crate::leader::LeaseSettings;
use crate::reconcile::Timing;

/// The session image when neither `--session-image` nor `spec.image` says otherwise.
pub const DEFAULT_SESSION_IMAGE: &str =
    concat!("ghcr.io/wa-operator/wa-session:", env!("CARGO_PKG_VERSION"));

#[derive(Debug, Parser)]
#[command(
    name = "wa-operator",
    version,
    about = "Runs each WhatsAppSession as one session pod with a persisted auth volume."
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the RBAC rules the operator needs (the `rules:` of its ClusterRole), as YAML.
    Rbac,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Watch sessions in this namespace only; all namespaces when unset.
    #[arg(long, env = "WA_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,

    /// Base URL of the gateway; pods deliver events to `<url>/internal/v1/events`.
    /// Pods keep events on their volume while unset.
    #[arg(long, env = "WA_GATEWAY_URL")]
    pub gateway_url: Option<String>,

    /// Session pod image used when a session's `spec.image` is unset.
    #[arg(long, env = "WA_SESSION_IMAGE", default_value = DEFAULT_SESSION_IMAGE)]
    pub session_image: String,

    /// Address of /metrics, /healthz and /readyz (port 0 picks a free port; see the log).
    #[arg(long, env = "WA_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Elect a leader on a Lease so several replicas are safe. Turn off only for a single
    /// replica (e.g. local development).
    #[arg(long, env = "WA_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Name of the leader election Lease.
    #[arg(long, env = "WA_LEASE_NAME", default_value = "wa-operator")]
    pub lease_name: String,

    /// Namespace of the Lease; defaults to the operator pod's namespace (POD_NAMESPACE),
    /// then --namespace, then the kubeconfig's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,

    /// This replica's identity in the Lease and Events; defaults to POD_NAME, then HOSTNAME.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Reconciles running at once.
    #[arg(long, env = "WA_MAX_CONCURRENT_RECONCILES", default_value_t = 32)]
    pub max_concurrent_reconciles: u16,

    /// Seconds a session pod may hold a status long poll before answering unchanged.
    #[arg(long, env = "WA_STATUS_WAIT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub status_wait_seconds: u64,

    /// Port of the session pods' API (`wa_api::names::POD_PORT` in a cluster).
    #[arg(long, env = "WA_POD_PORT", default_value_t = wa_api::names::POD_PORT, hide = true)]
    pub pod_port: u16,

    /// Log format: text or json.
    #[arg(long, env = "WA_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Extra environment for every session pod's container, `NAME=VALUE` (repeatable), after
    /// the operator's own; e.g. `WA_SERVER_URL` to point the whatsapp engine at a test server.
    /// Names the operator sets itself are refused.
    #[arg(long = "session-env", value_name = "NAME=VALUE")]
    pub session_env: Vec<String>,

    /// A Secret (in the session's namespace) to pull the session image with; repeatable. Set
    /// as `imagePullSecrets` on every session pod.
    #[arg(long = "session-image-pull-secret", value_name = "NAME")]
    pub session_image_pull_secrets: Vec<String>,
}

impl RunArgs {
    /// Checks the flags alone, before any connection to Kubernetes is made.
    pub fn check(&self) -> Result<(), String> {
        self.clone()
            .into_config("default", Some("check".to_owned()))
            .map(|_| ())
    }

    /// The configuration, or why the flags do not make one. `default_namespace` is the
    /// kubeconfig's (or in-cluster) namespace; `hostname` the HOSTNAME fallback.
    pub fn into_config(
        self,
        default_namespace: &str,
        hostname: Option<String>,
    ) -> Result<Config, String> {
        if let Some(url) = &self.gateway_url {
            check_gateway_url(url)?;
        }
        if self.session_image.trim().is_empty() || self.session_image.contains(char::is_whitespace)
        {
            return Err(format!(
                "--session-image must be an image reference (got {:?})",
                self.session_image
            ));
        }
        if let Some(ns) = &self.namespace {
            check_dns_label("--namespace", ns)?;
        }
        if self.max_concurrent_reconciles == 0 {
            return Err("--max-concurrent-reconciles must be at least 1".to_owned());
        }
        let identity = self
            .identity
            .clone()
            .or(hostname)
            .filter(|s| !s.trim().is_empty())
            // Unique enough that two unnamed replicas never share an identity.
            .unwrap_or_else(|| format!("wa-operator-{}", &crate::desired::new_token()[..10]));
        let lease = self.leader_elect.then(|| {
            let ns = self
                .lease_namespace
                .clone()
                .or_else(|| self.namespace.clone())
                .unwrap_or_else(|| default_namespace.to_owned());
            LeaseSettings::new(self.lease_name.clone(), ns, identity.clone())
        });
        if let Some(l) = &lease {
            check_dns_label("--lease-namespace", &l.namespace)?;
            if l.name.is_empty() || l.name.len() > 253 {
                return Err("--lease-name must be 1-253 characters".to_owned());
            }
        }
        let session_env = parse_session_env(&self.session_env)?;
        check_pull_secrets(&self.session_image_pull_secrets)?;
        Ok(Config {
            namespace: self.namespace,
            pod_settings: PodSettings::new(self.session_image, self.gateway_url.as_deref())
                .with_extra_env(session_env)
                .with_image_pull_secrets(self.session_image_pull_secrets),
            metrics_addr: self.metrics_addr,
            lease,
            identity,
            concurrency: self.max_concurrent_reconciles,
            pod_port: self.pod_port,
            status_wait: Duration::from_secs(self.status_wait_seconds),
            timing: Timing::default(),
        })
    }
}

/// `--session-env NAME=VALUE` pairs: names as Kubernetes accepts them (C identifiers, plus
/// `-` and `.`), each once, none the operator sets itself.
fn parse_session_env(pairs: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--session-env takes NAME=VALUE (got {pair:?})"))?;
        let valid = name.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphabetic()
                || matches!(b, b'_' | b'-' | b'.')
                || (i > 0 && b.is_ascii_digit())
        });
        if name.is_empty() || !valid {
            return Err(format!(
                "--session-env {name:?} is not a valid environment variable name"
            ));
        }
        if crate::desired::OPERATOR_ENV.contains(&name) {
            return Err(format!(
                "--session-env {name}: the operator sets it from the session's spec or its own flags"
            ));
        }
        if env.iter().any(|(n, _)| n == name) {
            return Err(format!("--session-env {name} is given twice"));
        }
        env.push((name.to_owned(), value.to_owned()));
    }
    Ok(env)
}

/// `--session-image-pull-secret` names: Secret names (DNS subdomains), each once.
fn check_pull_secrets(names: &[String]) -> Result<(), String> {
    for (i, name) in names.iter().enumerate() {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(format!(
                "--session-image-pull-secret must be a Secret name (lowercase DNS subdomain), got {name:?}"
            ));
        }
        if names[..i].contains(name) {
            return Err(format!("--session-image-pull-secret {name} is given twice"));
        }
    }
    Ok(())
}

fn check_gateway_url(url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("--gateway-url {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "--gateway-url must be an http(s) URL with a host (got {url:?})"
        ));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(format!(
            "--gateway-url must not have a query or fragment (got {url:?})"
        ));
    }
    Ok(())
}

fn check_dns_label(flag: &str, value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("{flag} must be a DNS label (got {value:?})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut argv = vec!["wa-operator"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.run.into_config("kube-default", Some("host-1".into()))
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.namespace, None);
        assert_eq!(c.pod_settings.default_image, DEFAULT_SESSION_IMAGE);
        assert!(DEFAULT_SESSION_IMAGE.ends_with(env!("CARGO_PKG_VERSION")));
        assert_eq!(c.pod_settings.events_url, None);
        assert_eq!(c.metrics_addr, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.identity, "host-1");
        let lease = c.lease.unwrap();
        assert_eq!(
            (lease.name.as_str(), lease.namespace.as_str()),
            ("wa-operator", "kube-default")
        );
        assert_eq!(c.pod_port, 8080);
        assert_eq!(c.concurrency, 32);
        assert_eq!(c.status_wait, Duration::from_secs(30));
        assert!(c.pod_settings.extra_env.is_empty());
    }

    #[test]
    fn session_env_is_passed_to_the_pod_settings_in_order() {
        let c = parse(&[
            "--session-env",
            "WA_SERVER_URL=ws://emu:1/ws/chat",
            "--session-env",
            "WA_MEDIA_URL=http://emu:1",
            "--session-env",
            "EMPTY=",
        ])
        .unwrap();
        let pairs: Vec<(&str, &str)> = c
            .pod_settings
            .extra_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("WA_SERVER_URL", "ws://emu:1/ws/chat"),
                ("WA_MEDIA_URL", "http://emu:1"),
                ("EMPTY", "")
            ]
        );
        // A value may itself contain '='.
        let c = parse(&["--session-env", "A=b=c"]).unwrap();
        assert_eq!(
            c.pod_settings.extra_env,
            [("A".to_owned(), "b=c".to_owned())]
        );
    }

    #[test]
    fn flags() {
        let c = parse(&[
            "--namespace",
            "wa",
            "--gateway-url",
            "http://gw.wa:8080/",
            "--session-image",
            "r/s:1",
            "--metrics-addr",
            "127.0.0.1:0",
            "--lease-name",
            "l",
            "--identity",
            "op-0",
            "--max-concurrent-reconciles",
            "4",
            "--status-wait-seconds",
            "5",
        ])
        .unwrap();
        assert_eq!(c.namespace.as_deref(), Some("wa"));
        assert_eq!(
            c.pod_settings.events_url.as_deref(),
            Some("http://gw.wa:8080/internal/v1/events")
        );
        assert_eq!(c.pod_settings.default_image, "r/s:1");
        assert_eq!(c.identity, "op-0");
        let lease = c.lease.unwrap();
        assert_eq!(
            (
                lease.name.as_str(),
                lease.namespace.as_str(),
                lease.identity.as_str()
            ),
            ("l", "wa", "op-0")
        );
        assert_eq!(c.concurrency, 4);
        assert_eq!(c.status_wait, Duration::from_secs(5));
        let c = parse(&["--namespace", "wa", "--lease-namespace", "ops"]).unwrap();
        assert_eq!(c.lease.unwrap().namespace, "ops");
        assert!(parse(&["--leader-elect", "false"]).unwrap().lease.is_none());
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        for (args, needle) in [
            (&["--gateway-url", "gw:8080"][..], "--gateway-url"),
            (&["--gateway-url", "ftp://gw"][..], "--gateway-url"),
            (&["--gateway-url", "http://gw/?x=1"][..], "--gateway-url"),
            (&["--session-image", "a b"][..], "--session-image"),
            (&["--namespace", "Bad_NS"][..], "--namespace"),
            (&["--lease-namespace=-x"][..], "--lease-namespace"),
            (
                &["--max-concurrent-reconciles", "0"][..],
                "--max-concurrent-reconciles",
            ),
            (&["--metrics-addr", "nope"][..], "--metrics-addr"),
            (&["--status-wait-seconds", "0"][..], "--status-wait-seconds"),
            (&["--session-env", "NOVALUE"][..], "NAME=VALUE"),
            (&["--session-env", "=x"][..], "not a valid"),
            (&["--session-env", "1A=x"][..], "not a valid"),
            (&["--session-env", "A B=x"][..], "not a valid"),
            (&["--session-env", "WA_TOKEN=x"][..], "the operator sets it"),
            (
                &["--session-env", "WA_LISTEN=0.0.0.0:1"][..],
                "the operator sets it",
            ),
            (
                &["--session-env", "A=1", "--session-env", "A=2"][..],
                "given twice",
            ),
            (
                &["--session-image-pull-secret", "Reg_Cred"][..],
                "--session-image-pull-secret",
            ),
            (&["--session-image-pull-secret", ""][..], "Secret name"),
            (&["--session-image-pull-secret", "a..b"][..], "Secret name"),
            (
                &["--session-image-pull-secret=a", "--session-image-pull-secret=a"][..],
                "given twice",
            ),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn image_pull_secrets_reach_the_pod_settings_in_order() {
        let c = parse(&[
            "--session-image-pull-secret",
            "regcred",
            "--session-image-pull-secret",
            "mirror.pull-2",
        ])
        .unwrap();
        assert_eq!(c.pod_settings.image_pull_secrets, ["regcred", "mirror.pull-2"]);
        assert!(parse(&[]).unwrap().pod_settings.image_pull_secrets.is_empty());
    }

    #[test]
    fn identity_falls_back_to_a_random_one() {
        let cli = Cli::try_parse_from(["wa-operator"]).unwrap();
        let a = cli.run.clone().into_config("d", None).unwrap().identity;
        let b = cli.run.into_config("d", None).unwrap().identity;
        assert!(a.starts_with("wa-operator-") && a != b, "{a} {b}");
    }

    #[test]
    fn rbac_subcommand_parses() {
        let cli = Cli::try_parse_from(["wa-operator", "rbac"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Rbac)));
    }
}
