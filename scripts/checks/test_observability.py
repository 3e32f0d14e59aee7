"""Alert rules and the Grafana dashboard, checked with promtool and a real PromQL parser.

(Their metric names are checked against the binaries' real /metrics in test_metrics.py.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import chartlib as c
import promql


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


# --- alert rules ----------------------------------------------------------------------------------

def test_promtool_check_rules():
    out = promtool("check", "rules", str(c.RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_of_the_alerts():
    out = promtool("test", "rules", str(c.RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr


def _alerts() -> dict[str, dict]:
    rules = yaml.safe_load(c.RULES.read_text())
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


# What the issue asks the alerts to catch, and the alert that does.
REQUIRED_ALERTS = {
    "session disconnected too long": "WhatsAppSessionDisconnected",
    "session awaiting scan too long": "WhatsAppSessionAwaitingScan",
    "session logged out": "WhatsAppSessionLoggedOut",
    "session memory over 80 % of its limit": "WhatsAppSessionMemoryNearLimit",
    "gateway 5xx rate": "WhatsAppGatewayHighErrorRate",
    "webhook dead letters": "WhatsAppWebhookDeadLetters",
    "operator reconcile errors": "WhatsAppOperatorReconcileErrors",
    "no operator leader": "WhatsAppOperatorNoLeader",
}


@pytest.mark.parametrize("topic,alert", REQUIRED_ALERTS.items(), ids=list(REQUIRED_ALERTS))
def test_required_alert_exists_with_severity_and_text(topic, alert):
    rule = _alerts().get(alert)
    assert rule, f"no alert for {topic}"
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_alert_has_a_unit_test_that_fires_it():
    tests = yaml.safe_load(c.RULES_TEST.read_text())
    fired = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])
             if case.get("exp_alerts")}
    quiet = {case["alertname"] for t in tests["tests"] for case in t.get("alert_rule_test", [])
             if not case.get("exp_alerts")}
    missing = set(_alerts()) - fired
    assert not missing, f"alerts no unit test fires: {sorted(missing)}"
    assert not set(_alerts()) - quiet, f"alerts no unit test shows quiet: {sorted(set(_alerts()) - quiet)}"


def test_promtool_unit_tests_can_fail(tmp_path):
    """A rule file with one threshold changed must fail the unit tests."""
    text = c.RULES.read_text()
    assert "> 0.8" in text
    (tmp_path / c.RULES.name).write_text(text.replace("> 0.8", "> 0.95"))
    (tmp_path / c.RULES_TEST.name).write_text(c.RULES_TEST.read_text())
    out = promtool("test", "rules", str(tmp_path / c.RULES_TEST.name))
    assert out.returncode != 0 and "WhatsAppSessionMemoryNearLimit" in out.stdout + out.stderr


# --- dashboard ----------------------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(c.DASHBOARD.read_text())


def _panels(items):
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard_is_generated_from_its_source():
    out = subprocess.run([sys.executable, str(c.ROOT / "deploy" / "grafana" / "dashboard.py"), "--check"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_dashboard_shape():
    d = _dashboard()
    assert d["schemaVersion"] >= 39
    assert d["uid"] and d["title"]
    [ds] = [v for v in d["templating"]["list"] if v["type"] == "datasource"]
    assert ds["name"] == "datasource" and ds["query"] == "prometheus"
    ids = [p["id"] for p in _panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    # No two panels overlap on the 24-column grid.
    cells = {}
    for p in _panels(d["panels"]):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_datasource_variable():
    d = _dashboard()
    for p in _panels(d["panels"]):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"{p['title']} has no query"
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"


# What the issue asks the dashboard to show, and the metric each panel group must query.
REQUIRED_PANELS = {
    "sessions by state": "wa_session_state",
    "per-session resident memory": "wa_session_resident_memory_bytes",
    "per-session health": "wa_session_up",
    "messages sent": "wa_session_messages_sent_total",
    "messages received": "wa_session_messages_received_total",
    "messages failed": "wa_session_send_failures_total",
    "send latency": "wa_gateway_http_request_duration_seconds_bucket",
    "webhook delivery results": "wa_gateway_webhook_deliveries_total",
    "gateway HTTP rates and errors": "wa_gateway_http_requests_total",
    "operator reconciles": "wa_operator_reconciles_total",
}


@pytest.mark.parametrize("topic,metric", REQUIRED_PANELS.items(), ids=list(REQUIRED_PANELS))
def test_dashboard_shows(topic, metric):
    assert metric in promql.dashboard_usage(c.DASHBOARD).names(), f"no panel queries {metric} ({topic})"


def test_every_expression_parses():
    # dashboard_usage / rules_usage parse every expression; an unparsable one raises.
    assert promql.dashboard_usage(c.DASHBOARD).names()
    assert promql.rules_usage(c.RULES).names()
    with pytest.raises(Exception):
        promql.selectors("sum(rate(x[5m])", "broken")
