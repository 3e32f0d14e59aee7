#!/usr/bin/env python3
"""How fast a session pod's phase reaches its WhatsAppSession object (issue 4: <= 5 s).

Runs the test control plane WITH its pod runner (real `wa-session` processes, sandbox
engine), the release `wa-operator`, and N sessions. For each session, once it shows
AwaitingScan, the simulated phone scans (`POST /v1/sandbox/scan` on the pod, with the
token from the session's Secret); the time until a watch (`kubectl get wa -w`) delivers the
object with phase Connected is the latency measured. It includes the pod's answer to the
scan, the status long poll answering, one reconcile, the status write and the watch
delivery to kubectl, so it is an upper bound of what the operator adds.

Also reported: time from `kubectl create` to AwaitingScan for each session (pod start,
probes, first status report).

Usage: bench/operator/phase_latency.py [--sessions 20] [--session-bin PATH]
"""

import argparse
import base64
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import NS, ROOT, kubectl, log, wait_for_line  # noqa: E402


class PhaseWatch(threading.Thread):
    """Follows `kubectl get wa -w -o json`; records when each (session, phase) was first seen."""

    def __init__(self, kubeconfig):
        super().__init__(daemon=True)
        self.proc = subprocess.Popen(
            ["kubectl", "--kubeconfig", str(kubeconfig), "get", "wa", "-n", NS, "-w", "-o", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.seen = {}
        self.cond = threading.Condition()

    def run(self):
        decoder, buf = json.JSONDecoder(), ""
        for chunk in iter(lambda: self.proc.stdout.readline(), ""):
            buf += chunk
            while buf.strip():
                try:
                    obj, end = decoder.raw_decode(buf.lstrip())
                except json.JSONDecodeError:
                    break
                now = time.monotonic()
                buf = buf.lstrip()[end:]
                name = obj["metadata"]["name"]
                phase = (obj.get("status") or {}).get("phase")
                with self.cond:
                    self.seen.setdefault((name, phase), now)
                    self.cond.notify_all()

    def wait(self, name, phase, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while (name, phase) not in self.seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SystemExit(f"{name} never reached {phase}")
                self.cond.wait(left)
            return self.seen[(name, phase)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--session-bin", help="wa-session binary (default: release, else debug, in CARGO_TARGET_DIR)")
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/wa-operator/target")))
    operator_bin, cp_bin = target / "release" / "wa-operator", target / "release" / "test-control-plane"
    session_bin = Path(args.session_bin) if args.session_bin else next(
        (p for p in (target / "release" / "wa-session", target / "debug" / "wa-session") if p.exists()), None)
    for b in (operator_bin, cp_bin, session_bin):
        if not b or not b.exists():
            raise SystemExit(f"missing binary {b}: cargo build --release -p wa-operator -p wa-tests -p wa-session --bins")
    log(f"session pods run {session_bin}")

    procs = []
    with tempfile.TemporaryDirectory(prefix="wa-bench-lat-") as tmp:
        kc = Path(tmp) / "kubeconfig"
        try:
            cp = subprocess.Popen(
                [str(cp_bin), "--kubeconfig", str(kc), "--namespace", NS, "--data-dir", str(Path(tmp) / "node"),
                 "--bin", f"wa-session={session_bin}", "--max-probe-period-ms", "500"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(cp)
            wait_for_line(cp, r"serving", 30, "test-control-plane")
            while not kc.exists():
                time.sleep(0.05)
            kubectl(kc, "apply", "-f", str(ROOT / "crds" / "whatsappsession.yaml"))
            kubectl(kc, "create", "namespace", NS)
            op = subprocess.Popen(
                [str(operator_bin), "--namespace", NS, "--metrics-addr", "127.0.0.1:0", "--identity", "bench"],
                env={**os.environ, "KUBECONFIG": str(kc), "WA_LOG": "warn,wa_operator=info"},
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(op)
            wait_for_line(op, r"addr=(\S+)", 30, "wa-operator")
            watch = PhaseWatch(kc)
            procs.append(watch.proc)
            watch.start()

            names = [f"lat{i:03d}" for i in range(args.sessions)]
            docs = "---\n".join(
                f"apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\n"
                f"metadata: {{name: {n}, namespace: {NS}}}\nspec: {{engine: sandbox}}\n" for n in names)
            created = time.monotonic()
            kubectl(kc, "create", "-f", "-", stdin=docs)
            startup = [watch.wait(n, "AwaitingScan", 120) - created for n in names]

            latencies = []
            for n in names:
                token = base64.b64decode(kubectl(kc, "get", "secret", f"wa-{n}-token", "-n", NS,
                                                 "-o", "jsonpath={.data.token}")).decode()
                ip = kubectl(kc, "get", "pod", f"wa-{n}", "-n", NS, "-o", "jsonpath={.status.podIP}")
                req = urllib.request.Request(f"http://{ip}:8080/v1/sandbox/scan", data=b"{}", method="POST",
                                             headers={"Authorization": f"Bearer {token}",
                                                      "Content-Type": "application/json"})
                t = time.monotonic()
                with urllib.request.urlopen(req, timeout=10) as r:
                    assert json.load(r)["phase"] == "Connected"
                latencies.append(watch.wait(n, "Connected", 30) - t)

            ms = lambda xs: [round(x * 1000) for x in xs]  # noqa: E731
            q = lambda xs, p: sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
            print(json.dumps({
                "sessions": args.sessions,
                "session_bin": str(session_bin),
                "scan_to_connected_ms": {"p50": ms([statistics.median(latencies)])[0],
                                         "p90": ms([q(latencies, 0.9)])[0], "max": ms([max(latencies)])[0]},
                "create_to_awaiting_scan_ms": {"p50": ms([statistics.median(startup)])[0],
                                               "max": ms([max(startup)])[0]},
            }))
            return 0
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
                    try:
                        p.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        p.kill()


if __name__ == "__main__":
    # SIGTERM (e.g. from `timeout`) unwinds through the clean-up of the started processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
