"""The Helm chart, rendered by Helm's own engine and checked with the real schemas.

Run: python3 -m pytest -p no:cacheprovider scripts/checks/test_chart.py
"""

from __future__ import annotations

import copy
import filecmp
import re

import pytest
import yaml

import chartlib as c

VALUES_CASES = [None, *c.ci_values_files()]
VALUES_IDS = ["defaults", *[p.name for p in c.ci_values_files()]]


def values_of(case):
    return c.load_values_file(case) if case else None


@pytest.fixture(scope="module", params=VALUES_CASES, ids=VALUES_IDS)
def rendered(request):
    return values_of(request.param), c.manifests(values_of(request.param))


# --- files kept identical -------------------------------------------------------------------

def test_chart_crd_is_the_generated_crd():
    chart_crds = sorted(p.name for p in (c.CHART / "crds").iterdir())
    assert chart_crds == ["whatsappsession.yaml"]
    assert (c.CHART / "crds" / "whatsappsession.yaml").read_bytes() == c.CRD_FILE.read_bytes(), (
        "charts/wa-operator/crds/whatsappsession.yaml differs from crds/whatsappsession.yaml: "
        "cp crds/whatsappsession.yaml charts/wa-operator/crds/")


@pytest.mark.parametrize("shipped,source", [
    ("files/wa-operator.json", c.DASHBOARD),
    ("files/wa-operator-rules.yaml", c.RULES),
])
def test_chart_ships_the_deploy_files_unchanged(shipped, source):
    assert filecmp.cmp(c.CHART / shipped, source, shallow=False), (
        f"charts/wa-operator/{shipped} differs from {source.relative_to(c.ROOT)}: copy it over")


def test_chart_version_follows_the_workspace():
    meta = yaml.safe_load((c.CHART / "Chart.yaml").read_text())
    assert meta["version"] == c.workspace_version()
    assert meta["appVersion"] == c.workspace_version()


# --- lint and render with every values file -------------------------------------------------

@pytest.mark.parametrize("case", VALUES_CASES, ids=VALUES_IDS)
def test_helm_lint_strict(case):
    report = c.helm().lint(str(c.CHART), values_of(case), strict=True, namespace=c.NAMESPACE,
                           kube_version=f"v{c.kube_version()}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_every_rendered_object_is_valid(rendered):
    _, docs = rendered
    assert c.validate_all(docs) == []


def test_objects_are_namespaced_where_they_belong(rendered):
    values, docs = rendered
    watched = (values or {}).get("watchNamespaces") or [c.NAMESPACE]
    for d in docs:
        kind, ns = d["kind"], d["metadata"].get("namespace")
        if kind == "CustomResourceDefinition":
            assert ns is None
        elif kind in ("Role", "RoleBinding", "NetworkPolicy", "WhatsAppSession"):
            assert ns in watched or (kind in ("Role", "RoleBinding") and ns == c.NAMESPACE), (kind, ns)
        elif kind == "ConfigMap":
            assert ns == ((values or {}).get("metrics", {}).get("dashboard", {}).get("namespace") or c.NAMESPACE)
        else:
            assert ns == c.NAMESPACE, (kind, d["metadata"]["name"], ns)


def test_selectors_match_their_pods(rendered):
    _, docs = rendered
    pods = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["labels"]
            for d in c.by_kind(docs, "Deployment")}
    for d in c.by_kind(docs, "Deployment"):
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
    for svc in c.by_kind(docs, "Service"):
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        assert svc["spec"]["selector"].items() <= pods[component].items(), svc["metadata"]["name"]
        ports = {p["name"] for p in c.deployment(docs, component)["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for pdb in c.by_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pods["gateway"].items()


def test_pods_run_as_the_image_user_without_privileges(rendered):
    _, docs = rendered
    for d in c.by_kind(docs, "Deployment"):
        spec = d["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 65532
        assert spec["securityContext"]["runAsGroup"] == 65532
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert container["resources"]["limits"]["memory"]


# --- the operator and the gateway are wired together ------------------------------------------

def _args(dep: dict) -> list[str]:
    return dep["spec"]["template"]["spec"]["containers"][0]["args"]


def _flag(dep: dict, name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in _args(dep) if a.startswith(f"--{name}=")]


def test_gateway_url_can_point_elsewhere():
    docs = c.manifests({"operator": {"gatewayUrl": "https://gw.example.com/wa"}})
    assert _flag(c.deployment(docs, "operator"), "gateway-url") == ["https://gw.example.com/wa"]


def test_operator_gives_pods_the_gateway_service_url(rendered):
    _, docs = rendered
    op, gw = c.deployment(docs, "operator"), c.deployment(docs, "gateway")
    svc = next(s for s in c.by_kind(docs, "Service") if s["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
    [url] = _flag(op, "gateway-url")
    assert url == f"http://{svc['metadata']['name']}.{c.NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}"
    assert gw["metadata"]["name"] == svc["metadata"]["name"]


def test_operator_and_gateway_watch_the_same_namespaces(rendered):
    values, docs = rendered
    watched = (values or {}).get("watchNamespaces") or [c.NAMESPACE]
    assert _flag(c.deployment(docs, "operator"), "namespace") == watched
    assert _flag(c.deployment(docs, "gateway"), "namespace") == watched


def test_session_image_defaults_to_the_app_version():
    docs = c.manifests()
    [image] = _flag(c.deployment(docs, "operator"), "session-image")
    assert image == f"ghcr.io/wa-operator/wa-session:{c.workspace_version()}"
    pinned = c.manifests({"session": {"image": {"digest": "sha256:" + "ab" * 32}}})
    assert _flag(c.deployment(pinned, "operator"), "session-image") == ["ghcr.io/wa-operator/wa-session@sha256:" + "ab" * 32]


def test_sqlite_gateway_is_one_pod_on_its_own_volume():
    docs = c.manifests()
    gw = c.deployment(docs, "gateway")
    assert gw["spec"]["replicas"] == 1
    assert gw["spec"]["strategy"]["type"] == "Recreate"
    pvc = c.one(docs, "PersistentVolumeClaim", "-gateway-data")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in gw["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    [container] = gw["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    # Relative to the working directory, which is the volume's mount.
    assert env["DATABASE_URL"] == {"name": "DATABASE_URL", "value": "sqlite://gateway.db"}
    assert container["workingDir"] == "/data"
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]


def test_postgresql_gateway_reads_its_url_from_the_secret_and_scales():
    values = {"gateway": {"replicas": 3, "database": {"type": "postgresql",
                                                       "postgresql": {"existingSecret": "db", "secretKey": "uri"}}}}
    docs = c.manifests(values)
    gw = c.deployment(docs, "gateway")
    assert gw["spec"]["replicas"] == 3
    assert gw["spec"]["strategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e for e in gw["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "uri"}
    assert not c.by_kind(docs, "PersistentVolumeClaim")


def test_existing_claim_is_used_not_created():
    docs = c.manifests({"gateway": {"database": {"sqlite": {"existingClaim": "mine"}}}})
    assert not c.by_kind(docs, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in c.deployment(docs, "gateway")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "mine"


# --- RBAC: least privilege ------------------------------------------------------------------

def test_no_cluster_wide_permissions(rendered):
    _, docs = rendered
    assert not c.by_kind(docs, "ClusterRole")
    assert not c.by_kind(docs, "ClusterRoleBinding")


def test_roles_exist_in_every_watched_namespace_and_bind_the_right_account(rendered):
    values, docs = rendered
    watched = (values or {}).get("watchNamespaces") or [c.NAMESPACE]
    accounts = {comp: c.deployment(docs, comp)["spec"]["template"]["spec"]["serviceAccountName"]
                for comp in ("operator", "gateway")}
    for ns in watched:
        for comp in ("operator", "gateway"):
            bindings = [b for b in c.by_kind(docs, "RoleBinding") if b["metadata"]["namespace"] == ns
                        and b["metadata"]["labels"]["app.kubernetes.io/component"] == comp
                        and not b["metadata"]["name"].endswith("-leader-election")]
            assert len(bindings) == 1, (ns, comp)
            assert bindings[0]["subjects"] == [{"kind": "ServiceAccount", "name": accounts[comp],
                                                "namespace": c.NAMESPACE}]
            role = [r for r in c.by_kind(docs, "Role") if r["metadata"]["namespace"] == ns
                    and r["metadata"]["name"] == bindings[0]["roleRef"]["name"]]
            assert len(role) == 1
    for sa in c.by_kind(docs, "ServiceAccount"):
        assert sa["metadata"]["name"] in accounts.values()


def test_leases_only_in_the_release_namespace(rendered):
    _, docs = rendered
    for role in c.by_kind(docs, "Role"):
        for rule in role["rules"]:
            if "leases" in rule["resources"]:
                assert role["metadata"]["namespace"] == c.NAMESPACE
                assert role["metadata"]["name"].endswith("-leader-election")


def test_gateway_cannot_write_sessions_status_or_pods():
    docs = c.manifests()
    role = next(r for r in c.by_kind(docs, "Role") if r["metadata"]["labels"]["app.kubernetes.io/component"] == "gateway")
    for rule in role["rules"]:
        assert "whatsappsessions/status" not in rule["resources"]
        if set(rule["resources"]) & {"pods", "secrets"}:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}


# --- NetworkPolicy ----------------------------------------------------------------------------

def test_session_pods_accept_only_gateway_and_operator(rendered):
    values, docs = rendered
    policies = c.by_kind(docs, "NetworkPolicy")
    if (values or {}).get("networkPolicy", {}).get("enabled") is False:
        assert not policies
        return
    watched = (values or {}).get("watchNamespaces") or [c.NAMESPACE]
    assert sorted(p["metadata"]["namespace"] for p in policies) == sorted(watched)
    names = c.api_names()
    pod_labels = {comp: c.deployment(docs, comp)["spec"]["template"]["metadata"]["labels"]
                  for comp in ("operator", "gateway")}
    for p in policies:
        assert p["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": names["APP_NAME"]}}
        assert p["spec"]["policyTypes"] == ["Ingress"]
        [rule] = p["spec"]["ingress"]
        assert rule["ports"] == [{"port": int(names["POD_PORT"]), "protocol": "TCP"}]
        peers = rule["from"]
        allowed = [peer for peer in peers if "podSelector" in peer]
        assert len(allowed) == 2
        for peer, comp in zip(allowed, ("gateway", "operator")):
            assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": c.NAMESPACE}}
            assert peer["podSelector"]["matchLabels"].items() <= pod_labels[comp].items()
        extra = (values or {}).get("networkPolicy", {}).get("extraFrom", [])
        assert peers[2:] == extra


# --- sessions declared in values ------------------------------------------------------------

def test_sessions_from_values_are_kept_on_uninstall_and_valid():
    values = {"sessions": [{"name": "support", "spec": {"engine": "sandbox", "phoneNumber": "+15551234567"}}]}
    docs = c.manifests(values)
    [s] = c.by_kind(docs, "WhatsAppSession")
    assert s["metadata"]["namespace"] == c.NAMESPACE
    assert s["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert s["spec"] == values["sessions"][0]["spec"]
    c.validate_session(s)


def test_a_bad_session_spec_is_refused_by_the_crd_schema():
    docs = c.manifests({"sessions": [{"name": "s", "spec": {"phoneNumber": "555", "engine": "fax"}}]})
    [s] = c.by_kind(docs, "WhatsAppSession")
    with pytest.raises(AssertionError, match="phoneNumber"):
        c.validate_session(s)


# --- bad values are refused -------------------------------------------------------------------

BAD_VALUES = [
    # (id, values, what the error must say)
    ("sqlite-with-replicas", {"gateway": {"replicas": 2}},
     "gateway.replicas is 2, but gateway.database.type is sqlite"),
    ("postgresql-without-secret", {"gateway": {"replicas": 2, "database": {"type": "postgresql"}}},
     "gateway.database.postgresql.existingSecret is empty"),
    ("both-monitors", {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
     "Enable one of them"),
    ("session-in-unwatched-namespace", {"sessions": [{"name": "a", "namespace": "elsewhere"}]},
     "not watched"),
    ("two-namespaces", {"watchNamespaces": ["team-a", "team-b"]}, "watch exactly one namespace each"),
    ("unknown-key", {"gateway": {"replica": 2}}, "additional properties 'replica' not allowed"),
    ("typo-top-level", {"watchNamespace": ["a"]}, "additional properties 'watchNamespace' not allowed"),
    ("replicas-not-a-number", {"operator": {"replicas": "two"}}, "/operator/replicas"),
    ("zero-operators", {"operator": {"replicas": 0}}, "/operator/replicas"),
    ("unknown-database", {"gateway": {"database": {"type": "mysql"}}}, "/gateway/database/type"),
    ("bad-namespace", {"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
    ("duplicate-namespace", {"watchNamespaces": ["a", "a"]}, "/watchNamespaces"),
    ("bad-log-format", {"gateway": {"logFormat": "xml"}}, "/gateway/logFormat"),
    ("bad-digest", {"gateway": {"image": {"digest": "latest"}}}, "/gateway/image/digest"),
    ("bad-memory-quantity", {"gateway": {"resources": {"limits": {"memory": "lots"}}}},
     "/gateway/resources/limits/memory"),
    ("bad-session-name", {"sessions": [{"name": "Support_Line"}]}, "/sessions/0/name"),
    ("too-long-session-name", {"sessions": [{"name": "a" * 54}]}, "/sessions/0/name"),
    ("bad-scrape-interval", {"metrics": {"serviceMonitor": {"interval": "often"}}},
     "/metrics/serviceMonitor/interval"),
    ("bad-pdb", {"gateway": {"pdb": {"maxUnavailable": "150%"}}}, "/gateway/pdb/maxUnavailable"),
    ("bad-service-type", {"gateway": {"service": {"type": "ExternalName"}}}, "/gateway/service/type"),
    ("bad-ingress-path", {"gateway": {"ingress": {"enabled": True, "hosts": [
        {"host": "wa.example.com", "paths": [{"path": "api", "pathType": "Prefix"}]}]}}},
     "/gateway/ingress/hosts/0/paths/0/path"),
    ("bad-label-value", {"commonLabels": {"team": "has spaces"}}, "/commonLabels/team"),
    ("gateway-url-not-a-url", {"operator": {"gatewayUrl": "gateway:8080"}}, "/operator/gatewayUrl"),
    ("metrics-port-privileged", {"operator": {"metricsPort": 80}}, "/operator/metricsPort"),
]


@pytest.mark.parametrize("values,message", [(v, m) for _, v, m in BAD_VALUES], ids=[i for i, _, _ in BAD_VALUES])
def test_bad_values_are_refused_with_a_clear_message(values, message):
    h = c.helm()
    with pytest.raises((h.HelmValuesError, h.HelmRenderError)) as err:
        c.render(values)
    assert message in str(err.value), str(err.value)


def test_good_edge_values_are_accepted():
    c.render({"gateway": {"replicas": 1, "pdb": {"maxUnavailable": "50%"}}})
    c.render({"gateway": {"replicas": 5, "database": {"type": "postgresql",
                                                       "postgresql": {"existingSecret": "db"}}}})
    c.render({"sessions": [{"name": "a" * 53}]})
    c.render({"operator": {"replicas": 2}})


# --- documentation ----------------------------------------------------------------------------

def _leaf_paths(node, prefix=""):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, f"{prefix}.{k}" if prefix else k)
    else:
        yield prefix


def test_every_value_is_documented_in_values_yaml():
    """Each value the schema defines has a comment right above its line in values.yaml
    (keys inside free-form maps and list items, like `resources.requests.cpu`, are examples)."""
    schema = c.chart().schema

    def props(node):
        if "$ref" in node:
            node = {**schema["$defs"][node["$ref"].split("/")[-1]], **node}
        return node.get("properties")

    lines = (c.CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str, dict | None]] = []  # (indent, key, schema node)
    undocumented, checked = [], 0
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z][\w-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][2] if stack else schema
        node = (props(parent) or {}).get(key) if parent is not None else None
        stack.append((indent, key, node))
        if node is None:
            continue  # inside a free-form map or a list item
        checked += 1
        if rest != "" and not lines[i - 1].strip().startswith("#"):
            undocumented.append(f"values.yaml:{i + 1}: {'.'.join(k for _, k, _ in stack)}")
    assert checked > 50, "the walk found too few values; is values.yaml parsed?"
    assert not undocumented, "\n".join(undocumented)


def test_schema_describes_and_covers_every_value():
    schema = c.chart().schema
    assert schema is not None

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or '<root>'} must refuse unknown keys"
            for k, sub in node["properties"].items():
                sub = sub if "$ref" not in sub else {**schema["$defs"][sub["$ref"].split("/")[-1]], **sub}
                assert sub.get("description"), f"{path}.{k} has no description in values.schema.json"
                walk(sub, f"{path}.{k}" if path else k)

    walk(schema, "")
    defaults = yaml.safe_load((c.CHART / "values.yaml").read_text())
    for leaf in _leaf_paths(defaults):
        node = schema
        for part in leaf.split("."):
            props = node.get("properties") or schema["$defs"].get(node.get("$ref", "#/$defs/_").split("/")[-1], {}).get("properties")
            if props is None:
                break  # free-form maps (resources, affinity, …)
            assert part in props, f"{leaf} is in values.yaml but not in values.schema.json"
            node = props[part]


def test_notes_tell_the_next_steps():
    text = c.notes(None)
    for step in ("port-forward", "admin", "kind: WhatsAppSession", "/qr", "kubectl -n wa-system wait --for=condition=Connected",
                 "/messages"):
        assert step in text, step
    # The line NOTES tells people to grep for is the one the gateway prints.
    assert "grep 'first admin API key'" in text
    assert "first admin API key" in (c.ROOT / "gateway" / "src" / "server.rs").read_text()
    with_ingress = c.notes(copy.deepcopy(values_of(c.CHART / "ci" / "postgresql-values.yaml")))
    assert "https://wa.example.com/" in with_ingress
    assert "get secret wa-admin" in with_ingress


# --- the validators themselves can fail ------------------------------------------------------

def _mutated(kind, mutate, values=None):
    docs = c.manifests(values)
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    mutate(doc)
    return c.validate_all([doc])


def test_validators_refuse_broken_objects():
    """Guards the guard: each validator used above reports a deliberately broken object."""
    enabled = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
               "sessions": [{"name": "s", "spec": {}}]}
    cases = [
        ("Deployment", lambda d: d["spec"]["template"]["spec"].__setitem__("containerz", []), None, "containerz"),
        ("Service", lambda d: d["spec"]["ports"][0].__setitem__("port", "eighty"), None, "eighty"),
        ("Role", lambda d: d["rules"][0].pop("verbs"), None, "verbs"),
        ("WhatsAppSession", lambda d: d["spec"].__setitem__("engine", "fax"), enabled, "fax"),
        ("WhatsAppSession", lambda d: d["spec"].__setitem__("replicas", 2), enabled, "replicas"),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].__setitem__("interval", 30), enabled, "interval"),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].__setitem__("for", "10 minutes"),
         enabled, "for"),
    ]
    for kind, mutate, values, needle in cases:
        failures = _mutated(kind, mutate, values)
        assert failures and needle in failures[0], (kind, needle, failures)
