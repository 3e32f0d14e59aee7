"""Metric names out of PromQL (with a real PromQL parser, PyPI promql-parser) and out of the
Prometheus text exposition format."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser
import yaml

# Grafana's built-in interval variables, and a stand-in for any other template variable
# (they only ever appear inside label matchers and range brackets in our dashboard).
_GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h"}


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)
    where: str


@dataclass
class Usage:
    selectors: list[Selector] = field(default_factory=list)

    def names(self) -> set[str]:
        return {s.metric for s in self.selectors}


def grafana_to_promql(expr: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return _GRAFANA_INTERVALS.get(name, "grafana_var")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)


def selectors(expr: str, where: str) -> list[Selector]:
    """Every vector selector in `expr` (functions, aggregations and label names are not
    metric names; the parser knows the difference)."""
    out: list[Selector] = []
    ast = promql_parser.parse(expr)

    def visit(node, *_):
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            matchers = [(m.name, str(m.op).split(".")[-1], m.value) for m in node.matchers.matchers]
            if not name:
                name = next((v for label, op, v in matchers if label == "__name__" and op == "Equal"), "")
            assert name, f"{where}: a selector without a metric name: {expr}"
            out.append(Selector(name, [m for m in matchers if m[0] != "__name__"], where))
        return True

    promql_parser.walk(ast, visit)
    return out


def dashboard_usage(path: Path) -> Usage:
    dash = json.loads(path.read_text())
    usage = Usage()

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            usage.selectors += selectors(grafana_to_promql(t["expr"]), f"panel {p['title']!r} {t['refId']}")
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: unsupported query {q}"
            usage.selectors += selectors(grafana_to_promql(m.group(1)), f"variable {var['name']}")
    return usage


def rules_usage(path: Path) -> Usage:
    usage = Usage()
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            usage.selectors += selectors(rule["expr"], f"rule {name}")
    return usage


# --- exposition format --------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Exposition:
    types: dict[str, str] = field(default_factory=dict)  # family → counter/gauge/histogram/…
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)  # sample name → label sets

    def merge(self, other: "Exposition") -> None:
        self.types.update(other.types)
        for k, v in other.samples.items():
            self.samples.setdefault(k, []).extend(v)

    def names(self) -> set[str]:
        """Every queryable series name: samples, plus _bucket/_sum/_count of histograms and
        summaries even while they have no samples yet."""
        names = set(self.samples)
        for family, kind in self.types.items():
            if kind == "histogram":
                names |= {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
            elif kind == "summary":
                names |= {family, f"{family}_sum", f"{family}_count"}
            else:
                names.add(family)
        return names


def parse_exposition(text: str) -> Exposition:
    exp = Exposition()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(None, 3)
            exp.types[family] = kind.strip()
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            labels = dict(_LABEL.findall(m.group(3) or ""))
            exp.samples.setdefault(m.group(1), []).append(labels)
    return exp
