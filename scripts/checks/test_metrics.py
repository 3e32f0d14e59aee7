"""The real /metrics of each binary: `promtool check metrics` passes on it, and every metric
(and every label value the queries match exactly) used by the dashboard and the alert rules
is exported by some binary. A renamed metric or label value fails here.

The binaries run for real: `wa-session --engine sandbox` (paired and sending, so its counters
move), `wa-gateway local` supervising a sandbox session (its fleet view relabels the pods'
series with namespace and session), and `wa-operator` against the test control plane with a
sandbox session applied.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

import chartlib as c
import procs
import promql

# Series the alerts use that come from outside wa-operator, and where they come from.
EXTERNAL = {
    "kube_pod_container_resource_limits": "kube-state-metrics (memory limit of each session pod)",
}
TOKEN = "metrics-check-token"


def promtool_check_metrics(text: str) -> str:
    out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip() if out.returncode else ""


# --- wa-session ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def session_metrics(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("wa-session")
    port = procs.free_port()
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with procs.spawn([str(c.binary("wa-session")), "--engine", "sandbox", "--token", TOKEN,
                      "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp / "data"), "--session", "metrics",
                      "--rate-per-minute", "600", "--sandbox-delivered-ms", "10", "--sandbox-read-ms", "20"],
                     tmp / "wa-session.log") as proc:
        procs.wait_until("wa-session /readyz", lambda: procs.http("GET", f"{base}/readyz")[0] == 200, 20, proc)
        status, body = procs.http("POST", f"{base}/v1/sandbox/scan", b"{}",
                                  {**auth, "Content-Type": "application/json"})
        assert status == 200, body
        procs.wait_until("Connected", lambda: json.loads(
            procs.http("GET", f"{base}/v1/status", headers=auth)[1])["phase"] == "Connected", 20, proc)
        status, body = procs.http("POST", f"{base}/v1/messages",
                                  json.dumps({"to": "+15551234567", "type": "text", "text": "hi"}).encode(),
                                  {**auth, "Content-Type": "application/json"})
        assert status in (200, 202), body
        status, body = procs.http("GET", f"{base}/metrics", headers=auth)
        assert status == 200, body
        return body.decode()


def test_promtool_accepts_wa_session_metrics(session_metrics):
    assert promtool_check_metrics(session_metrics) == ""


# --- wa-gateway local ---------------------------------------------------------------------------

def _sends_and_scrapes(base: str, auth: dict, session: str, proc: procs.Proc, must_contain: str) -> str:
    """Scans the sandbox session, sends one message, and returns /metrics once it shows
    `must_contain` (the collector reads the pods in the background)."""
    procs.wait_until(f"the sandbox scan of {session}", lambda: procs.http(
        "POST", f"{base}/v1/sessions/{session}/sandbox/scan", b"{}", auth)[0] == 200, 30, proc)
    procs.wait_until(f"{session} Connected", lambda: json.loads(procs.http(
        "GET", f"{base}/v1/sessions/{session}", headers=auth)[1]).get("phase") == "Connected", 30, proc)
    status, body = procs.http("POST", f"{base}/v1/sessions/{session}/messages",
                              json.dumps({"to": "+15551234567", "type": "text", "text": "metrics"}).encode(), auth)
    assert status in (200, 201), body
    return procs.wait_until(f"{must_contain} in the gateway's /metrics", lambda: (
        lambda text: text if must_contain in text else None)(procs.http("GET", f"{base}/metrics")[1].decode()), 30, proc)


@pytest.fixture(scope="module")
def gateway_metrics(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("wa-gateway")
    port = procs.free_port()
    base = f"http://127.0.0.1:{port}"
    key = "wak_metricscheck0123456789abcdef01234567"
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with procs.spawn([str(c.binary("wa-gateway")), "local", "--listen", f"127.0.0.1:{port}",
                      "--data-dir", str(tmp / "data"), "--scrape-interval-seconds", "0.5",
                      "--session-env", "WA_SANDBOX_DELIVERED_MS=10", "--session-env", "WA_SANDBOX_READ_MS=20"],
                     tmp / "wa-gateway.log", env={"WA_ADMIN_KEY": key}) as proc:
        procs.wait_until("wa-gateway /readyz", lambda: procs.http("GET", f"{base}/readyz")[0] == 200, 30, proc)
        status, body = procs.http("POST", f"{base}/v1/sessions",
                                  json.dumps({"name": "metrics", "engine": "sandbox"}).encode(), auth)
        assert status in (200, 201), body
        return _sends_and_scrapes(base, auth, "metrics", proc,
                                  'wa_session_messages_sent_total{namespace="local",session="metrics"} 1')


def test_promtool_accepts_wa_gateway_metrics(gateway_metrics):
    assert promtool_check_metrics(gateway_metrics) == ""


# --- wa-operator ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def operator_metrics(tmp_path_factory) -> str:
    """The operator against the test control plane, leading and reconciling a session."""
    tmp = tmp_path_factory.mktemp("wa-operator")
    kubeconfig = tmp / "kubeconfig"
    kubectl = ["kubectl", f"--kubeconfig={kubeconfig}"]
    with procs.spawn([str(c.binary("test-control-plane")), "--kubeconfig", str(kubeconfig), "--data-dir",
                      str(tmp / "node"), "--no-host-commands", "--max-probe-period-ms", "500",
                      "--bin", f"wa-session={c.binary('wa-session')}"], tmp / "control-plane.log") as cp:
        procs.wait_until("the control plane", lambda: kubeconfig.exists() and subprocess.run(
            [*kubectl, "get", "--raw", "/version"], capture_output=True, timeout=10).returncode == 0, 30, cp)
        subprocess.run([*kubectl, "apply", "-f", str(c.CRD_FILE)], check=True, capture_output=True, timeout=30)
        port = procs.free_port()
        with procs.spawn([str(c.binary("wa-operator")), "--namespace", "default", "--metrics-addr", f"127.0.0.1:{port}",
                          "--lease-namespace", "default", "--identity", "metrics-check"],
                         tmp / "wa-operator.log", env={"KUBECONFIG": str(kubeconfig)}) as op:
            base = f"http://127.0.0.1:{port}"
            procs.wait_until("the operator leading", lambda: "wa_operator_leader 1" in
                             procs.http("GET", f"{base}/metrics")[1].decode(), 30, op)
            session = "apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\nmetadata: {name: m}\nspec: {engine: sandbox}\n"
            subprocess.run([*kubectl, "apply", "-f", "-"], input=session, text=True, check=True, capture_output=True, timeout=30)
            return procs.wait_until("a reconcile counted", lambda: (lambda text: text if re.search(
                r'^wa_operator_reconcile_duration_seconds_count [1-9]', text, re.M) else None)(
                procs.http("GET", f"{base}/metrics")[1].decode()), 30, op)


def test_promtool_accepts_wa_operator_metrics(operator_metrics):
    assert promtool_check_metrics(operator_metrics) == ""


# --- coverage of the dashboard and the alerts -------------------------------------------------------

@pytest.fixture(scope="module")
def exported(session_metrics, gateway_metrics, operator_metrics) -> promql.Exposition:
    exp = promql.Exposition()
    for text in (session_metrics, gateway_metrics, operator_metrics):
        exp.merge(promql.parse_exposition(text))
    return exp


def _used() -> list[promql.Selector]:
    return promql.dashboard_usage(c.DASHBOARD).selectors + promql.rules_usage(c.RULES).selectors


def missing_metrics(used: list[promql.Selector], exported: promql.Exposition) -> list[str]:
    names = exported.names()
    return sorted({f"{s.metric} ({s.where})" for s in used if s.metric not in names and s.metric not in EXTERNAL})


def unknown_label_values(used: list[promql.Selector], exported: promql.Exposition) -> list[str]:
    """`{result="dead"}` must match a value a binary really emits: a renamed label value would
    silence an alert without any error. (namespace and session values come from the cluster.)"""
    problems = set()
    for s in used:
        if s.metric in EXTERNAL:
            continue
        samples = exported.samples.get(s.metric, [])
        for label, op, value in s.matchers:
            if op != "Equal" or label in ("namespace", "session"):
                continue
            seen = {labels[label] for labels in samples if label in labels}
            if value not in seen:
                problems.add(f"{s.where}: {s.metric}{{{label}=\"{value}\"}} but the binaries emit "
                             f"{sorted(seen) or 'no such label'}")
    return sorted(problems)


def test_every_metric_used_is_exported(exported):
    missing = missing_metrics(_used(), exported)
    assert not missing, "queried but exported by no binary:\n" + "\n".join(missing)


def test_every_exact_label_value_used_is_exported(exported):
    problems = unknown_label_values(_used(), exported)
    assert not problems, "\n".join(problems)


def test_the_coverage_checks_catch_renames(exported):
    renamed = promql.selectors('sum(rate(wa_session_messages_sent_totals[5m])) + '
                               'sum(wa_gateway_webhook_deliveries_total{result="dead_letter"})', "renamed")
    assert missing_metrics(renamed, exported) == ["wa_session_messages_sent_totals (renamed)"]
    assert len(unknown_label_values(renamed, exported)) == 1
    # Histograms are queried through their series.
    assert not missing_metrics(promql.selectors("wa_operator_reconcile_duration_seconds_bucket", "h"), exported)


def test_external_metrics_are_really_external(exported):
    assert not set(EXTERNAL) & exported.names(), "listed as external but exported by wa-operator itself"
    used = {s.metric for s in _used()}
    assert set(EXTERNAL) <= used, f"external metrics no longer used: {sorted(set(EXTERNAL) - used)}"


def test_per_session_series_carry_namespace_and_session(gateway_metrics):
    exp = promql.parse_exposition(gateway_metrics)
    for name in ("wa_session_up", "wa_session_state", "wa_session_resident_memory_bytes",
                 "wa_session_messages_sent_total"):
        assert exp.samples.get(name), f"the gateway exports no {name} for its session"
        for labels in exp.samples[name]:
            assert labels.get("namespace") and labels.get("session"), (name, labels)
