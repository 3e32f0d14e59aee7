"""The chart installed on the test control plane brings a sandbox session to Connected.

Render the chart with Helm's engine → `kubectl apply` the objects → the operator and the
gateway from that install run as pods (the pod runner starts the real binaries) → the
session the release declares gets its pod, is scanned through the gateway's REST API, and
`kubectl wait --for=condition=Connected` returns; a message sent through the gateway is
delivered (its receipt travels pod → gateway over the URL the chart gave the operator).

What the test control plane does not do, and how this test bridges it (see
tests/README.md for the emulator's own list):
- The NetworkPolicy and the PodDisruptionBudget are applied and stored, but nothing enforces
  them here; RBAC objects are stored, never enforced (tests cannot show the chart's RBAC is
  sufficient: that is checked against the operator's verb list in test_chart.py).
- No Service proxy or cluster DNS, and no in-cluster service-account credentials: the
  operator's `gatewayUrl` value points session pods at the gateway's port on 127.0.0.1, and
  both binaries get the kubeconfig through `extraEnv` (values any user may set).
- Ports are host ports: the gateway and the operator listen on free ports (values `port`,
  `metricsPort`) so they cannot collide with session pods' 8080 on 127.0.0.N.
Everything else is what a user does: every rendered manifest is applied as it is, and the
emulator's Deployment and ReplicaSet controllers create the operator's and gateway's pods.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

import chartlib as c
import procs

NAMESPACE = "wa-system"
SESSION = "demo"


class Cluster:
    def __init__(self, tmp: Path, proc: procs.Proc, kubeconfig: Path):
        self.tmp, self.proc, self.kubeconfig = tmp, proc, kubeconfig

    def kubectl(self, *args: str, input: str | None = None, timeout: float = 60, check: bool = True) -> str:
        out = subprocess.run(["kubectl", f"--kubeconfig={self.kubeconfig}", *args], input=input,
                             capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {out.stderr}\n{out.stdout}")
        return out.stdout

    def logs(self) -> str:
        """Every container log the runner kept, for failure messages."""
        parts = []
        for log in sorted((self.tmp / "node" / "logs").rglob("*.log")):
            parts.append(f"--- {log.relative_to(self.tmp / 'node' / 'logs')} ---\n{log.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def cluster():
    # Not under /tmp: the gateway pod mounts an emptyDir at /tmp, and the runner maps paths
    # under a pod's mounts to the pod's own directories (so KUBECONFIG=/tmp/… would vanish).
    tmp = Path(tempfile.mkdtemp(prefix="wa-chart-install-", dir=c.cargo_target_dir()))
    kubeconfig = tmp / "kubeconfig"
    args = [str(c.binary("test-control-plane")), "--kubeconfig", str(kubeconfig), "--data-dir", str(tmp / "node"),
            "--no-host-commands", "--max-probe-period-ms", "500", "--restart-backoff-ms", "500"]
    for name in ("wa-operator", "wa-gateway", "wa-session"):
        args += ["--bin", f"{name}={c.binary(name)}"]
    with procs.spawn(args, tmp / "control-plane.log") as proc:
        cl = Cluster(tmp, proc, kubeconfig)
        procs.wait_until("the control plane's kubeconfig", lambda: kubeconfig.exists() and
                         cl.kubectl("get", "--raw", "/version", check=False), 30, proc)
        try:
            yield cl
        finally:
            proc.stop(grace=15)  # the runner stops its pods first
            shutil.rmtree(tmp, ignore_errors=True)


def install_values(kubeconfig: Path, gateway_port: int, metrics_port: int) -> dict:
    env = [{"name": "KUBECONFIG", "value": str(kubeconfig)}]
    return {
        "operator": {"metricsPort": metrics_port, "gatewayUrl": f"http://127.0.0.1:{gateway_port}",
                     "logFormat": "text", "extraEnv": env},
        "gateway": {"port": gateway_port, "logFormat": "text", "adminKey": {"existingSecret": "wa-admin"},
                    "extraEnv": env, "extraArgs": ["--scrape-interval-seconds=1"]},
        "sessions": [{"name": SESSION, "spec": {"engine": "sandbox"}}],
    }


def test_chart_install_brings_a_sandbox_session_to_connected(cluster):
    gw_port, op_port = procs.free_port(), procs.free_port()
    admin_key = "wak_" + secrets.token_hex(20)
    docs = c.manifests(install_values(cluster.kubeconfig, gw_port, op_port), namespace=NAMESPACE)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "WhatsAppSession", "CustomResourceDefinition"} <= kinds

    cluster.kubectl("create", "namespace", NAMESPACE)
    cluster.kubectl("-n", NAMESPACE, "create", "secret", "generic", "wa-admin", f"--from-literal=adminKey={admin_key}")

    # Helm's order: CRDs first, then the templates; the session last (its CRD must be served).
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(crds))
    cluster.kubectl("wait", "--for=condition=Established", "crd/whatsappsessions.wa-operator.dev", "--timeout=30s")
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    out = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rest))
    assert out.count(" created") == len(rest), out
    try:
        # The Deployment and ReplicaSet controllers make the pods; the runner starts them.
        cluster.kubectl("-n", NAMESPACE, "wait", "--for=condition=Available", "deployment", "-l",
                        f"app.kubernetes.io/instance={c.RELEASE}", "--timeout=60s", timeout=70)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster.kubectl('get', 'deploy,rs,pods', '-A', '-o', 'wide', check=False)}\n"
                             f"{cluster.logs()}") from None

    base = f"http://127.0.0.1:{gw_port}"
    auth = {"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"}
    try:
        # The operator made the session's pod; the gateway routes to it once it is ready.
        def awaiting_scan():
            return cluster.kubectl("-n", NAMESPACE, "get", f"wa/{SESSION}", "-o", "jsonpath={.status.phase}") == "AwaitingScan"
        procs.wait_until(f"wa/{SESSION} AwaitingScan (the operator created its pod)", awaiting_scan, 60)
        procs.wait_until("the sandbox scan through the gateway", lambda: procs.http(
            "POST", f"{base}/v1/sessions/{SESSION}/sandbox/scan", b"{}", auth)[0] == 200, 30)
        cluster.kubectl("-n", NAMESPACE, "wait", f"wa/{SESSION}", "--for=condition=Connected", "--timeout=30s", timeout=40)

        status, body = procs.http("POST", f"{base}/v1/sessions/{SESSION}/messages",
                                  json.dumps({"to": "+15551234567", "type": "text", "text": "hello from the chart"}).encode(),
                                  auth)
        assert status in (200, 201), body
        message_id = json.loads(body)["id"]
        # Delivered: the pod's receipt reached the gateway over operator.gatewayUrl.
        procs.wait_until("the delivered receipt", lambda: json.loads(procs.http(
            "GET", f"{base}/v1/messages/{message_id}", headers=auth)[1])["status"] in ("delivered", "read"), 30)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{cluster.kubectl('get', 'wa,pods', '-A', '-o', 'wide', check=False)}\n"
                             f"{cluster.logs()}") from None

    # The session pod the operator made is the one the chart and the image expect: the chart's
    # session image, the image's binary and user, events to the chart's gateway URL, and
    # labels the chart's NetworkPolicy selects (while the chart's own pods are its peers).
    pod = json.loads(cluster.kubectl("-n", NAMESPACE, "get", "pod", f"wa-{SESSION}", "-o", "json"))
    [container] = pod["spec"]["containers"]
    operator_args = c.deployment(docs, "operator")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--session-image={container['image']}" in operator_args
    assert container["command"] == ["wa-session"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 65532
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["WA_EVENTS_URL"] == f"http://127.0.0.1:{gw_port}/internal/v1/events"
    [policy] = c.by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    running = json.loads(cluster.kubectl("-n", NAMESPACE, "get", "pods", "-l", f"app.kubernetes.io/instance={c.RELEASE}",
                                         "-o", "json"))["items"]
    peers = [peer["podSelector"]["matchLabels"] for peer in policy["spec"]["ingress"][0]["from"]]
    for p in running:
        assert any(sel.items() <= p["metadata"]["labels"].items() for sel in peers), p["metadata"]["name"]

    # The operator from the install leads and reports the session Connected.
    text = procs.http("GET", f"http://127.0.0.1:{op_port}/metrics")[1].decode()
    assert "wa_operator_leader 1" in text
    assert 'wa_operator_sessions{phase="Connected"} 1' in text
    gateway_metrics = procs.http("GET", f"{base}/metrics")[1].decode()
    assert f'wa_session_state{{namespace="{NAMESPACE}",session="{SESSION}",state="Connected"}} 1' in gateway_metrics
