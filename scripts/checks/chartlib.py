"""Shared helpers of the chart, observability and image checks (scripts/ci.d/40-chart.sh).

Everything here uses the real tools: Helm's own engine (libhelm through helm-python-sdk),
kubernetes-validate's strict schemas for the Kubernetes version k8s-openapi is built for,
the CRD's own openAPIV3Schema, prometheus-operator's generated validators (npm), promtool.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "wa-operator"
CRD_FILE = ROOT / "crds" / "whatsappsession.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "wa-operator.json"
RULES = ROOT / "deploy" / "prometheus" / "wa-operator-rules.yaml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "wa-operator-rules.test.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
NPM_DIR = Path(__file__).resolve().parent / "npm"

RELEASE = "wa"
NAMESPACE = "wa-system"


# --- versions ---------------------------------------------------------------------------------

@functools.cache
def workspace_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^\[workspace\.package\][^\[]*?^version\s*=\s*"([^"]+)"', text, re.M | re.S)
    assert m, "no [workspace.package] version in Cargo.toml"
    return m.group(1)


@functools.cache
def kube_version() -> str:
    """The Kubernetes minor the Rust code is built against: k8s-openapi's `v1_NN` feature."""
    text = (ROOT / "Cargo.toml").read_text()
    m = re.search(r'^k8s-openapi\s*=.*"v(\d+)_(\d+)"', text, re.M)
    assert m, "no v1_NN feature on k8s-openapi in Cargo.toml"
    return f"{m.group(1)}.{m.group(2)}"


# --- Helm -------------------------------------------------------------------------------------

def helm():
    import helm_python

    return helm_python


@functools.cache
def chart():
    return helm().Chart.load(str(CHART))


def ci_values_files() -> list[Path]:
    return sorted((CHART / "ci").glob("*-values.yaml"))


def load_values_file(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE,
           release: str = RELEASE) -> dict[str, str]:
    """Template path → rendered text, as `helm template` / `helm install` render it."""
    return chart().render(copy.deepcopy(values) if values else None, name=release,
                          namespace=namespace, is_install=True, revision=1)


def manifests(values: dict[str, Any] | None = None, namespace: str = NAMESPACE,
              release: str = RELEASE) -> list[dict[str, Any]]:
    """The rendered objects (NOTES.txt and empty documents left out), CRDs first, the way
    Helm applies them."""
    docs: list[dict[str, Any]] = [yaml.safe_load(c["data"]) for c in chart().crds]
    for path, text in sorted(render(values, namespace, release).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                docs.append(doc)
    return docs


def notes(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> str:
    rendered = render(values, namespace)
    return next(v for k, v in rendered.items() if k.endswith("NOTES.txt"))


def by_kind(docs: Iterable[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def one(docs: Iterable[dict], kind: str, name_suffix: str = "") -> dict:
    found = [d for d in by_kind(docs, kind) if d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def deployment(docs: list[dict], component: str) -> dict:
    found = [d for d in by_kind(docs, "Deployment")
             if d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert len(found) == 1, f"expected one {component} Deployment"
    return found[0]


# --- Kubernetes schemas -----------------------------------------------------------------------

def validate_kubernetes(doc: dict) -> None:
    """Strict validation against the built-in schemas (unknown fields are errors)."""
    import kubernetes_validate

    kubernetes_validate.validate(doc, kube_version(), strict=True)


@functools.cache
def crd_doc() -> dict:
    return yaml.safe_load(CRD_FILE.read_text())


def _structural_to_jsonschema(node: Any) -> Any:
    """A CRD's openAPIV3Schema as a strict JSON schema: `nullable` allows null, objects with
    `properties` and no `additionalProperties` refuse unknown fields (what kubectl's strict
    field validation reports; the API server would silently prune them)."""
    if isinstance(node, list):
        return [_structural_to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _structural_to_jsonschema(v) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator():
    import jsonschema

    crd = crd_doc()
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    schema = _structural_to_jsonschema(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version['name']}"}
    schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def validate_session(doc: dict) -> None:
    errors = sorted(crd_validator().iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        raise AssertionError("; ".join(f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors))


MONITORING = "monitoring.coreos.com/v1"


def node_validate_monitoring(docs: list[dict]) -> list[dict]:
    """prometheus-operator's generated validators (npm @kubernetes-models/prometheus-operator,
    installed by 40-chart.sh into scripts/checks/npm/node_modules)."""
    if not docs:
        return []
    if not (NPM_DIR / "node_modules").is_dir():
        raise AssertionError(f"{NPM_DIR}/node_modules is missing: run `npm ci` there (40-chart.sh does)")
    node = shutil.which("node")
    assert node, "node is not on PATH (Debian package nodejs)"
    out = subprocess.run([node, str(NPM_DIR / "validate-monitoring.mjs")], input=json.dumps(docs),
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def validate_all(docs: list[dict]) -> list[str]:
    """Every object against its schema; returns the failures (empty when all are valid)."""
    failures: list[str] = []
    monitoring = []
    for doc in docs:
        name = f"{doc.get('kind')}/{doc['metadata'].get('name')}"
        api = doc.get("apiVersion", "")
        try:
            if api == MONITORING:
                monitoring.append(doc)
            elif api.startswith("wa-operator.dev/"):
                validate_session(doc)
            else:
                validate_kubernetes(doc)
        except Exception as e:  # noqa: BLE001 - every failure is reported, with its object
            failures.append(f"{name}: {getattr(e, 'message', None) or e}")
    for result in node_validate_monitoring(monitoring):
        if result["error"]:
            failures.append(f"{result['kind']}/{result['name']}: {result['error']}")
    return failures


# --- api crate constants ------------------------------------------------------------------------

@functools.cache
def api_names() -> dict[str, str]:
    """`pub const NAME: type = value;` from api/src/names.rs, values as strings."""
    text = (ROOT / "api" / "src" / "names.rs").read_text()
    return {m.group(1): m.group(2).strip('"')
            for m in re.finditer(r'pub const (\w+): [^=]+= ([^;]+);', text)}


# --- processes ------------------------------------------------------------------------------------

def cargo_target_dir() -> Path:
    env = os.environ.get("CARGO_TARGET_DIR")
    if env:
        return Path(env)
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=120)
    return Path(json.loads(meta.stdout)["target_directory"])


def binary(name: str) -> Path:
    path = cargo_target_dir() / "debug" / name
    assert path.is_file(), f"{path} is missing: build it first (cargo build -p <crate> --bins)"
    return path
