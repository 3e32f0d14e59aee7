//! The real `wa-operator` binary as a process: its subcommand, flag errors, its HTTP port,
//! and a prompt, clean stop on SIGTERM. (Against a Kubernetes API it is driven by the
//! end-to-end scenarios in `tests/`.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_wa-operator");

/// Kills the process if a test fails half-way.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A kubeconfig whose API server does not answer (a closed local port).
fn dead_api_kubeconfig(dir: &std::path::Path) -> std::path::PathBuf {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: 'http://127.0.0.1:{port}'}}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u, namespace: wa}}\n\
             current-context: x\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn rbac_subcommand_prints_exactly_the_rules() {
    let out = Command::new(BIN).arg("rbac").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        wa_operator::rbac::rules_yaml()
    );
}

#[test]
fn bad_flags_exit_with_code_2_naming_the_flag_before_touching_kubernetes() {
    for (args, needle) in [
        (&["--gateway-url", "gw:8080"][..], "--gateway-url"),
        (&["--namespace", "Not_A_Label"][..], "--namespace"),
        (&["--metrics-addr", "8080"][..], "--metrics-addr"),
    ] {
        // No KUBECONFIG at all: the flags are refused first, with their own message.
        let out = Command::new(BIN)
            .args(args)
            .env_remove("KUBECONFIG")
            .env("HOME", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn serves_health_and_metrics_and_stops_promptly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dead_api_kubeconfig(dir.path());
    let mut child = Command::new(BIN)
        .args(["--metrics-addr", "127.0.0.1:0", "--identity", "test-0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("WA_LOG", "info")
        .env_remove("POD_NAMESPACE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut proc = Proc(child);

    // The log names the bound address (port 0 picks one).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut log = String::new();
    let addr = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no address in the log:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let get = |path: &str| {
            let url = format!("http://{addr}{path}");
            let http = http.clone();
            async move {
                let r = http
                    .get(url)
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/healthz").await, (200, "ok".to_owned()));
        // The API server is unreachable: alive, not ready, not leading.
        let (status, body) = get("/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("UNAVAILABLE"), "{body}");
        let (status, metrics) = get("/metrics").await;
        assert_eq!(status, 200);
        assert!(metrics.contains("wa_operator_leader 0"), "{metrics}");
    });

    let pid = libc::pid_t::try_from(proc.0.id()).unwrap();
    let sent = Instant::now();
    // SAFETY: a plain kill(2) of our own child, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status:?}");
}
