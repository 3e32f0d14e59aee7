#!/usr/bin/env python3
"""Builds the wa-operator Grafana dashboard (wa-operator.json next to this file).

The JSON is committed (Grafana and the Helm chart load it as is); this script is how it is
edited, so panel ids and grid positions stay consistent. After a change:

    python3 deploy/grafana/dashboard.py          # rewrites wa-operator.json
    python3 deploy/grafana/dashboard.py --check  # fails when the committed JSON differs

then copy it to charts/wa-operator/files/ (scripts/ci.d/40-chart.sh checks both).

The datasource is a template variable, so the dashboard imports into any Grafana with a
Prometheus datasource. Per-session series come from the gateway's fleet view.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("wa-operator.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SESSION_SEL = 'namespace=~"$namespace", session=~"$session"'
NS_SEL = 'namespace=~"$namespace"'
RATE = "$__rate_interval"


class Layout:
    """Hands out panel ids and grid positions, row by row (24 columns wide)."""

    def __init__(self) -> None:
        self.panels: list[dict] = []
        self.next_id = 1
        self.y = 0
        self.x = 0
        self.row_height = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({
            "type": "row", "title": title, "id": self._id(), "collapsed": False, "panels": [],
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
        })
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_height = max(self.row_height, h)

    def _newline(self) -> None:
        self.y += self.row_height
        self.x = 0
        self.row_height = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def target(expr: str, legend: str = "__auto", ref: str = "A", **extra) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True, **extra}


def timeseries(title: str, description: str, targets: list[dict], unit: str = "short",
               stack: bool = False, **custom) -> dict:
    return {
        "type": "timeseries", "title": title, "description": description, "datasource": DS,
        "targets": targets,
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                           "showPoints": "never", "spanNulls": False,
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}, **custom},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }


def stat(title: str, description: str, expr: str, unit: str = "short",
         thresholds: list[tuple[float | None, str]] | None = None, mappings: list | None = None) -> dict:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat", "title": title, "description": description, "datasource": DS,
        "targets": [target(expr, legend="", instant=True, range=False)],
        "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                     "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "none", "textMode": "value"},
    }


def quantiles(metric: str, selector: str, by: str = "") -> list[dict]:
    group = f"le{', ' + by if by else ''}"
    out = []
    for ref, q in zip("ABC", ("0.5", "0.95", "0.99")):
        legend = f"p{int(float(q) * 100)}" + (f" {{{{{by}}}}}" if by else "")
        out.append(target(
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            legend=legend, ref=ref))
    return out


def build() -> dict:
    lay = Layout()

    # --- Fleet -----------------------------------------------------------------------------
    lay.row("Fleet")
    lay.add(stat("Connected sessions", "Sessions online with WhatsApp.",
                 f'sum(wa_session_state{{{NS_SEL}, state="Connected"}}) or vector(0)'), 6, 4)
    lay.add(stat("Sessions not connected", "Sessions in any other state (starting, awaiting a scan, "
                 "reconnecting, logged out, failed).",
                 f'sum(wa_session_state{{{NS_SEL}, state!="Connected"}}) or vector(0)',
                 thresholds=[(None, "green"), (1, "orange")]), 6, 4)
    lay.add(stat("Unreachable session pods", "Sessions whose pod does not answer the gateway.",
                 f"count(wa_session_up{{{NS_SEL}}} == 0) or vector(0)",
                 thresholds=[(None, "green"), (1, "red")]), 6, 4)
    lay.add(stat("Operator leader", "Whether an operator replica holds the leader Lease (only the "
                 "leader reconciles).", "max(wa_operator_leader) or vector(0)",
                 thresholds=[(None, "red"), (1, "green")],
                 mappings=[{"type": "value", "options": {"0": {"text": "none", "index": 0},
                                                          "1": {"text": "elected", "index": 1}}}]), 6, 4)
    lay.add(timeseries("Sessions by state", "Number of sessions in each state, as the gateway sees them.",
                       [target(f"sum by (state) (wa_session_state{{{NS_SEL}}})", legend="{{state}}")],
                       stack=True), 24, 7)

    # --- Sessions --------------------------------------------------------------------------
    lay.row("Sessions")
    lay.add(timeseries("Resident memory per session", "Resident set size of each session pod's process.",
                       [target(f"wa_session_resident_memory_bytes{{{SESSION_SEL}}}",
                               legend="{{namespace}}/{{session}}")], unit="bytes"), 12, 8)
    health = timeseries("Session pod health", "1: the session pod answers the gateway; 0: it does not.",
                        [target(f"wa_session_up{{{SESSION_SEL}}}", legend="{{namespace}}/{{session}}")])
    health["type"] = "state-timeline"
    health["fieldConfig"]["defaults"] = {
        "mappings": [{"type": "value", "options": {"0": {"text": "down", "color": "red", "index": 0},
                                                   "1": {"text": "up", "color": "green", "index": 1}}}],
        "thresholds": {"mode": "absolute", "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}]},
        "color": {"mode": "thresholds"},
    }
    health["options"] = {"showValue": "never", "mergeValues": True, "rowHeight": 0.8,
                         "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}}
    lay.add(health, 12, 8)
    table = {
        "type": "table", "title": "Current state per session",
        "description": "The state each session is in now.", "datasource": DS,
        "targets": [target(f"wa_session_state{{{SESSION_SEL}}} == 1", legend="", format="table",
                           instant=True, range=False)],
        "transformations": [{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True, "__name__": True, "instance": True,
                              "job": True, "pod": True, "service": True, "endpoint": True, "container": True},
            "indexByName": {"namespace": 0, "session": 1, "state": 2}}}],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True, "sortBy": [{"displayName": "session", "desc": False}]},
    }
    lay.add(table, 24, 7)

    # --- Messages --------------------------------------------------------------------------
    lay.row("Messages")
    lay.add(timeseries("Messages per second", "Sent, received and failed sends over the selected sessions.", [
        target(f"sum(rate(wa_session_messages_sent_total{{{SESSION_SEL}}}[{RATE}]))", legend="sent", ref="A"),
        target(f"sum(rate(wa_session_messages_received_total{{{SESSION_SEL}}}[{RATE}]))", legend="received", ref="B"),
        target(f"sum(rate(wa_session_send_failures_total{{{SESSION_SEL}}}[{RATE}]))", legend="failed", ref="C"),
    ], unit="ops"), 8, 8)
    lay.add(timeseries("Send failures by reason", "Why sends failed, per second.", [
        target(f"sum by (reason) (rate(wa_session_send_failures_total{{{SESSION_SEL}}}[{RATE}]))", legend="{{reason}}"),
    ], unit="ops"), 8, 8)
    lay.add(timeseries("Send latency", "Time the gateway takes to answer a send (record, forward to the "
                       "session pod, WhatsApp's acknowledgement).",
                       quantiles("wa_gateway_http_request_duration_seconds",
                                 'route="/v1/sessions/{name}/messages", method="POST"'), unit="s"), 8, 8)

    # --- Webhooks --------------------------------------------------------------------------
    lay.row("Webhooks")
    lay.add(timeseries("Webhook deliveries by result", "Deliveries per second: delivered, retried, "
                       "dead-lettered (gave up after the last retry).",
                       [target(f"sum by (result) (rate(wa_gateway_webhook_deliveries_total[{RATE}]))",
                               legend="{{result}}")], unit="ops", stack=True), 16, 7)
    lay.add(stat("Dead-lettered deliveries (24 h)", "Events that never reached their webhook.",
                 'sum(increase(wa_gateway_webhook_deliveries_total{result="dead"}[24h])) or vector(0)',
                 thresholds=[(None, "green"), (1, "red")]), 8, 7)

    # --- Gateway HTTP ----------------------------------------------------------------------
    lay.row("Gateway HTTP")
    lay.add(timeseries("Requests by status", "Gateway answers per second by HTTP status.",
                       [target(f"sum by (status) (rate(wa_gateway_http_requests_total[{RATE}]))",
                               legend="{{status}}")], unit="reqps", stack=True), 8, 8)
    lay.add(timeseries("Server errors", "Share of answers that are 5xx (503: a session is not ready).", [
        target(f'sum(rate(wa_gateway_http_requests_total{{status=~"5.."}}[{RATE}])) '
               f"/ sum(rate(wa_gateway_http_requests_total[{RATE}]))", legend="5xx ratio"),
    ], unit="percentunit"), 8, 8)
    lay.add(timeseries("Latency p99 by route", "99th percentile of answer time per route.", [
        target(f"histogram_quantile(0.99, sum by (le, route) (rate(wa_gateway_http_request_duration_seconds_bucket[{RATE}])))",
               legend="{{route}}"),
    ], unit="s"), 8, 8)

    # --- Operator --------------------------------------------------------------------------
    lay.row("Operator")
    lay.add(timeseries("Reconciles by result", "Reconciles per second, by result.",
                       [target(f"sum by (result) (rate(wa_operator_reconciles_total[{RATE}]))",
                               legend="{{result}}")], unit="ops", stack=True), 8, 8)
    lay.add(timeseries("Reconcile duration", "How long one reconcile takes.",
                       quantiles("wa_operator_reconcile_duration_seconds", ""), unit="s"), 8, 8)
    lay.add(timeseries("Pods recreated", "Session pods the operator had to recreate (deleted or failed), "
                       "per second.", [target(f"sum(rate(wa_operator_pods_recreated_total[{RATE}]))",
                                               legend="recreated")], unit="ops"), 8, 8)
    lay.add(timeseries("Sessions by phase (operator)", "Sessions per status.phase, as the operator wrote them.",
                       [target("sum by (phase) (wa_operator_sessions)", legend="{{phase}}")], stack=True), 24, 7)

    return {
        "title": "wa-operator",
        "uid": "wa-operator",
        "description": "WhatsApp sessions on Kubernetes: session states, memory and health, messages, "
                       "webhooks, the gateway's HTTP traffic and the operator's reconciles.",
        "tags": ["wa-operator", "whatsapp"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [], "includeAll": False, "multi": False},
            {"name": "namespace", "label": "Namespace", "type": "query", "datasource": DS,
             "definition": "label_values(wa_session_up, namespace)",
             "query": {"query": "label_values(wa_session_up, namespace)", "refId": "namespace"},
             "current": {}, "hide": 0, "refresh": 2, "regex": "", "sort": 1, "options": [],
             "includeAll": True, "allValue": ".*", "multi": True},
            {"name": "session", "label": "Session", "type": "query", "datasource": DS,
             "definition": 'label_values(wa_session_up{namespace=~"$namespace"}, session)',
             "query": {"query": 'label_values(wa_session_up{namespace=~"$namespace"}, session)', "refId": "session"},
             "current": {}, "hide": 0, "refresh": 2, "regex": "", "sort": 1, "options": [],
             "includeAll": True, "allValue": ".*", "multi": True},
        ]},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python3 {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
