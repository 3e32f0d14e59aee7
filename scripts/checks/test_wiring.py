"""The chart against the real binaries: the flags it passes exist, the RBAC it grants is
exactly what each binary documents it uses.

Needs the debug binaries (scripts/test builds them before scripts/ci.d runs).
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

import chartlib as c

BINARIES = {"operator": "wa-operator", "gateway": "wa-gateway"}


def run(binary: str, *args: str) -> str:
    out = subprocess.run([str(c.binary(binary)), *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, f"{binary} {' '.join(args)} failed: {out.stderr}"
    return out.stdout


def help_flags(binary: str) -> dict[str, list[str] | None]:
    """`--flag` → its possible values (None when free-form), from the binary's --help."""
    text = run(binary, "--help")
    flags: dict[str, list[str] | None] = {}
    for m in re.finditer(r"^\s+(?:-\w, )?(--[\w-]+)(?: <[^>]+>)?\s*\n?(.*?)(?=^\s+(?:-\w, )?--|\Z)", text, re.M | re.S):
        values = re.search(r"\[possible values: ([^\]]+)\]", m.group(2))
        flags[m.group(1)] = [v.strip() for v in values.group(1).split(",")] if values else None
    return flags


@pytest.mark.parametrize("case", [None, *c.ci_values_files()], ids=["defaults", *[p.name for p in c.ci_values_files()]])
@pytest.mark.parametrize("component", sorted(BINARIES))
def test_chart_flags_exist_in_the_binary(case, component):
    docs = c.manifests(c.load_values_file(case) if case else None)
    container = c.deployment(docs, component)["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [BINARIES[component]]
    known = help_flags(BINARIES[component])
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        assert flag in known, f"{BINARIES[component]} has no {flag} (its flags: {sorted(known)})"
        if known[flag] is not None:
            assert value in known[flag], f"{flag}={value}: the binary accepts {known[flag]}"


def _rules(role: dict) -> set[tuple[str, str, frozenset[str]]]:
    out = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.add((group, resource, frozenset(rule["verbs"])))
    return out


def test_operator_rbac_is_exactly_what_the_operator_documents():
    documented = yaml.safe_load(run("wa-operator", "rbac"))
    expected = _rules({"rules": documented})
    docs = c.manifests({"watchNamespaces": ["team-a"]})
    roles = [r for r in c.by_kind(docs, "Role") if r["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"]
    sessions_role = [r for r in roles if r["metadata"]["namespace"] == "team-a"]
    lease_role = [r for r in roles if r["metadata"]["namespace"] == c.NAMESPACE]
    assert len(sessions_role) == 1 and len(lease_role) == 1
    granted = _rules(sessions_role[0]) | _rules(lease_role[0])
    assert granted == expected, (
        f"chart grants but operator does not use: {sorted(granted - expected)}; "
        f"operator uses but chart does not grant: {sorted(expected - granted)}")
    assert all(res == "leases" for _, res, _ in _rules(lease_role[0]))
    assert not any(res == "leases" for _, res, _ in _rules(sessions_role[0]))


# The gateway keeps no machine-readable verb list yet; this is what its Kubernetes directory
# (gateway/src/directory/kube.rs) does: reflectors (list, watch) on sessions, their pods and
# the namespace's Secrets, `get_opt` on the Secrets spec webhooks name, `create`/`delete` of
# sessions for POST/DELETE /v1/sessions.
GATEWAY_RULES = {
    ("wa-operator.dev", "whatsappsessions", frozenset({"list", "watch", "create", "delete"})),
    ("", "pods", frozenset({"list", "watch"})),
    ("", "secrets", frozenset({"get", "list", "watch"})),
}
KIND_RESOURCE = {"WhatsAppSession": ("wa-operator.dev", "whatsappsessions"), "Pod": ("", "pods"),
                 "Secret": ("", "secrets"), "Event": ("events.k8s.io", "events"), "Lease": ("coordination.k8s.io", "leases"),
                 "ConfigMap": ("", "configmaps"), "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
                 "Service": ("", "services"), "Namespace": ("", "namespaces")}


def test_gateway_rbac_is_exactly_what_the_gateway_uses():
    docs = c.manifests()
    [role] = [r for r in c.by_kind(docs, "Role") if r["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway"]
    assert _rules(role) == GATEWAY_RULES
    # Every API type the gateway's code touches is covered (a new one fails here).
    used = set()
    for path in (c.ROOT / "gateway" / "src").rglob("*.rs"):
        used |= set(re.findall(r"\bApi<(\w+)>", path.read_text()))
    assert used, "no kube Api<…> found in gateway/src"
    granted = {(g, r) for g, r, _ in GATEWAY_RULES}
    for kind in used:
        assert kind in KIND_RESOURCE, f"gateway uses Api<{kind}>: add it to KIND_RESOURCE and to the chart's Role"
        assert KIND_RESOURCE[kind] in granted, f"gateway uses Api<{kind}> but its Role does not grant it"
