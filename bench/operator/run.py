#!/usr/bin/env python3
"""Operator benchmark: reconcile throughput and memory with N (default 1,000) sessions.

Runs the release `wa-operator` against the test control plane (`tests/`, binary
`test-control-plane`, API emulator only: `--no-pod-runner`, so pods stay Pending and what
is measured is the operator, not 1,000 session processes) and reports:

  - converge time: from t0 until every session has its Secret, PVC and Pod and a status
    written for its current generation (phase Starting, podName set), as read back from the
    API with kubectl, independently of the operator's own metrics;
  - throughput: sessions / converge time, and reconciles done (operator metrics);
  - operator memory: peak VmRSS sampled every 100 ms during the run, VmHWM, and VmRSS
    after the fleet has settled.

Modes:
  cold  all sessions exist before the operator starts (t0 = operator start): the restart /
        fail-over case, and the cleanest measure of the operator alone.
  live  the operator runs first; t0 = just before `kubectl create` of all sessions, so
        kubectl's own creation time is included.

Usage: bench/operator/run.py [--sessions 1000] [--mode cold|live] [--concurrency 32]
Targets (issue 4): 1,000 sessions converge in <= 30 s; operator RSS <= 64 MB.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NS = "wa"


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build():
    target = os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/wa-operator/target"))
    log(f"cargo build --release (target dir {target})")
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "wa-operator", "-p", "wa-tests", "--bins"],
        cwd=ROOT, check=True, env={**os.environ, "CARGO_TARGET_DIR": target})
    rel = Path(target) / "release"
    return rel / "wa-operator", rel / "test-control-plane"


def wait_for_line(proc, pattern, timeout, what):
    """Reads proc's stderr until a line matches (within `timeout` seconds); returns the match.
    The rest of stderr keeps being drained so the pipe never blocks the process."""
    import queue
    lines = queue.Queue()

    def pump():
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        m = re.search(pattern, line)
        if m:
            return m
    raise SystemExit(f"{what} did not start:\n{''.join(seen[-20:])}")


def kubectl(kubeconfig, *args, stdin=None):
    out = subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), *args], input=stdin,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {out.stderr}")
    return out.stdout


def manifests(n):
    docs = []
    for i in range(n):
        docs.append(
            "apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\n"
            f"metadata: {{name: s{i:04d}, namespace: {NS}}}\n"
            "spec: {engine: sandbox}\n")
    return "---\n".join(docs)


def rss_kib(pid, field="VmRSS"):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, False

    def run(self):
        while not self.stop:
            v = rss_kib(self.pid)
            if v is None:
                return
            self.peak = max(self.peak, v)
            time.sleep(0.1)


def converged(kubeconfig, n):
    """(sessions done, pods) read back from the API."""
    items = json.loads(kubectl(kubeconfig, "get", "wa", "-n", NS, "-o", "json"))["items"]
    done = 0
    for s in items:
        st = s.get("status") or {}
        if (st.get("observedGeneration") == s["metadata"].get("generation")
                and st.get("podName") and st.get("phase") == "Starting"):
            done += 1
    pods = len(kubectl(kubeconfig, "get", "pods", "-n", NS, "-o", "name").split())
    return done, pods


def scrape(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values[series] = float(value)
    return values


def quantile(values, q):
    """Upper bound of the histogram bucket holding quantile q of reconcile durations."""
    buckets = sorted(
        (float(m.group(1)) if m.group(1) != "+Inf" else float("inf"), v)
        for k, v in values.items()
        if (m := re.match(r'wa_operator_reconcile_duration_seconds_bucket\{le="([^"]+)"\}', k)))
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= q * total:
            return le
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--mode", choices=["cold", "live"], default="cold")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--timeout", type=float, default=180)
    ap.add_argument("--no-build", action="store_true", help="use already built binaries")
    ap.add_argument("--debug", action="store_true",
                    help="use debug binaries (checks the harness; not for figures)")
    args = ap.parse_args()

    if args.no_build or args.debug:
        rel = Path(os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/wa-operator/target")))
        rel = rel / ("debug" if args.debug else "release")
        operator_bin, cp_bin = rel / "wa-operator", rel / "test-control-plane"
    else:
        operator_bin, cp_bin = build()

    procs = []
    with tempfile.TemporaryDirectory(prefix="wa-bench-op-") as tmp:
        kc = Path(tmp) / "kubeconfig"
        try:
            cp = subprocess.Popen([str(cp_bin), "--kubeconfig", str(kc), "--namespace", NS, "--no-pod-runner",
                                   "--data-dir", str(Path(tmp) / "node")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            procs.append(cp)
            wait_for_line(cp, r"serving", 30, "test-control-plane")
            while not kc.exists():
                time.sleep(0.05)
            kubectl(kc, "apply", "-f", str(ROOT / "crds" / "whatsappsession.yaml"))
            kubectl(kc, "create", "namespace", NS)
            docs = manifests(args.sessions)

            def start_operator():
                op = subprocess.Popen(
                    [str(operator_bin), "--namespace", NS, "--metrics-addr", "127.0.0.1:0",
                     "--identity", "bench", "--max-concurrent-reconciles", str(args.concurrency),
                     "--gateway-url", "http://gateway.wa:8080"],
                    env={**os.environ, "KUBECONFIG": str(kc), "WA_LOG": "warn,wa_operator=info"},
                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                procs.append(op)
                m = wait_for_line(op, r"addr=(\S+)", 30, "wa-operator")
                return op, m.group(1)

            if args.mode == "cold":
                t = time.monotonic()
                kubectl(kc, "create", "-f", "-", stdin=docs)
                log(f"created {args.sessions} sessions in {time.monotonic() - t:.1f} s (operator not running)")
                t0 = time.monotonic()
                op, addr = start_operator()
            else:
                op, addr = start_operator()
                while scrape(addr).get("wa_operator_leader") != 1.0:
                    time.sleep(0.05)
                t0 = time.monotonic()
                kubectl(kc, "create", "-f", "-", stdin=docs)
                log(f"created {args.sessions} sessions in {time.monotonic() - t0:.1f} s (operator running)")
            sampler = RssSampler(op.pid)
            sampler.start()

            done = pods = 0
            while True:
                done, pods = converged(kc, args.sessions)
                elapsed = time.monotonic() - t0
                if done >= args.sessions and pods >= args.sessions:
                    break
                if elapsed > args.timeout:
                    raise SystemExit(f"not converged after {elapsed:.0f} s: {done} sessions, {pods} pods")
                time.sleep(0.25)
            converge = time.monotonic() - t0
            log(f"converged: {done} sessions, {pods} pods in {converge:.2f} s; settling 10 s")
            time.sleep(10)
            sampler.stop = True
            settled = rss_kib(op.pid)
            hwm = rss_kib(op.pid, "VmHWM")
            m = scrape(addr)
            result = {
                "sessions": args.sessions,
                "mode": args.mode,
                "concurrency": args.concurrency,
                "converge_seconds": round(converge, 2),
                "sessions_per_second": round(args.sessions / converge, 1),
                "reconciles_success": int(m.get('wa_operator_reconciles_total{result="success"}', 0)),
                "reconciles_error": int(m.get('wa_operator_reconciles_total{result="error"}', 0)),
                "reconcile_p50_le_seconds": quantile(m, 0.5),
                "reconcile_p99_le_seconds": quantile(m, 0.99),
                "rss_peak_mib": round(sampler.peak / 1024, 1),
                "rss_hwm_mib": round((hwm or 0) / 1024, 1),
                "rss_settled_mib": round((settled or 0) / 1024, 1),
            }
            print(json.dumps(result))
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
