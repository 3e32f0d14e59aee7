#!/usr/bin/env python3
"""End-to-end fleet benchmark: N sessions (default 1,000) on the test control plane with
everything real — the API emulator and the pod runner (`test-control-plane`), `wa-operator`,
`wa-gateway` in Kubernetes mode, and one `wa-session` process per session pod — release
builds throughout.

What it measures, from t0 = just before `kubectl create -f` of all N sessions:
  - pods ready: every session pod exists and is Ready (the pod runner started the process
    and its readiness probe passed);
  - converged: every session's object shows phase AwaitingScan for its current generation
    (the pod reported its phase, the operator wrote it);
  - with --scan: every session scanned through the gateway (`POST /v1/sessions/<name>/sandbox/scan`,
    16 at a time) and Connected on its object, from the first scan;
  - memory: VmRSS of the operator, the gateway and the control plane (API emulator + pod
    runner) sampled every 200 ms (peak) and after settling; the session pods' total RSS and
    PSS (PSS counts their shared code once) from /proc.

Usage: tests/bench/fleet.py [--sessions 1000] [--scan] [--no-build] [--probe-cap-ms MS]
The operator's own benchmark (API only, no pods) is bench/operator/run.py.
"""

import argparse
import concurrent.futures
import json
import os
import re
import secrets
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
BINARIES = ("wa-operator", "wa-gateway", "wa-session", "test-control-plane")


def log(msg):
    print(f"[fleet] {msg}", file=sys.stderr, flush=True)


def target_dir():
    return Path(os.environ.get("CARGO_TARGET_DIR", str(Path.home() / ".cache/wa-operator/target")))


def build():
    log(f"cargo build --release (target dir {target_dir()})")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "wa-operator", "-p", "wa-gateway", "-p", "wa-session",
                    "-p", "wa-tests", "--bins"], cwd=ROOT, check=True)


def kubectl(kubeconfig, *args, stdin=None, timeout=600):
    out = subprocess.run(["kubectl", f"--kubeconfig={kubeconfig}", *args], input=stdin, capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {out.stderr}")
    return out.stdout


class Proc:
    """A child process whose output goes to a file; waits for a line matching a pattern."""

    def __init__(self, name, args, logdir, env=None):
        self.name = name
        self.log = logdir / f"{name}.log"
        self.file = open(self.log, "w")
        self.p = subprocess.Popen(args, stdout=self.file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                  start_new_session=True)

    def wait_for(self, pattern, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text(errors="replace"))
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.05)
        raise SystemExit(f"{self.name} did not log {pattern!r}:\n{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self, grace=30):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.file.close()


def status_kib(pid, field="VmRSS"):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def rollup_kib(pid):
    """(Rss, Pss) from smaps_rollup."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, pss


def session_pids(binary):
    """Processes running the release wa-session binary."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.readlink(d / "exe") == str(binary):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


class Sampler(threading.Thread):
    def __init__(self, pids):
        super().__init__(daemon=True)
        self.pids, self.peak, self.stopped = pids, {k: 0 for k in pids}, False

    def run(self):
        while not self.stopped:
            for name, pid in self.pids.items():
                v = status_kib(pid)
                if v:
                    self.peak[name] = max(self.peak[name], v)
            time.sleep(0.2)


def get_json(url, headers=None, method="GET", body=None, timeout=60):
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--scan", action="store_true", help="also scan every session through the gateway")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--probe-cap-ms", type=int, default=None,
                    help="cap probe periods (the pods' own: readiness every 2 s, liveness every 10 s)")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    if not args.no_build:
        build()
    rel = target_dir() / "release"
    bins = {b: rel / b for b in BINARIES}
    for b, p in bins.items():
        if not p.is_file():
            raise SystemExit(f"{p} is missing: build it (cargo build --release -p wa-operator -p wa-gateway -p wa-session -p wa-tests --bins)")

    procs = []
    with tempfile.TemporaryDirectory(prefix="wa-fleet-") as tmp:
        tmp = Path(tmp)
        kc = tmp / "kubeconfig"
        try:
            cp_args = [str(bins["test-control-plane"]), "--kubeconfig", str(kc), "--data-dir", str(tmp / "node"),
                       "--no-host-commands", "--bin", f"wa-session={bins['wa-session']}"]
            if args.probe_cap_ms:
                cp_args += ["--max-probe-period-ms", str(args.probe_cap_ms)]
            cp = Proc("control-plane", cp_args, tmp, env={"RUST_LOG": "warn"})
            procs.append(cp)
            cp.wait_for(r"serving (http://\S+)")
            api = re.search(r"server: (\S+)", kc.read_text()).group(1)
            kubectl(kc, "apply", "-f", str(ROOT / "crds" / "whatsappsession.yaml"))
            kubectl(kc, "wait", "--for=condition=Established", "crd/whatsappsessions.wa-operator.dev")
            kubectl(kc, "create", "namespace", NS)

            admin = "wak_" + secrets.token_hex(20)
            gw = Proc("gateway", [str(bins["wa-gateway"]), "--namespace", NS, "--listen", "127.0.0.1:0",
                                  "--database-url", f"sqlite://{tmp}/gateway.db"], tmp,
                      env={"KUBECONFIG": str(kc), "WA_ADMIN_KEY": admin, "WA_GATEWAY_LOG": "warn"})
            procs.append(gw)
            gw_url = gw.wait_for(r"listening on (http://[0-9.:]+)/").group(1)
            op = Proc("operator", [str(bins["wa-operator"]), "--namespace", NS, "--gateway-url", gw_url,
                                   "--metrics-addr", "127.0.0.1:0", "--identity", "fleet"], tmp,
                      env={"KUBECONFIG": str(kc), "WA_LOG": "warn,wa_operator=info"})
            procs.append(op)
            op_addr = op.wait_for(r"serving /metrics.*addr=(\S+)").group(1)
            op.wait_for(r"leading")

            sampler = Sampler({"operator": op.p.pid, "gateway": gw.p.pid, "control-plane": cp.p.pid})
            sampler.start()
            docs = "---\n".join(
                f"apiVersion: wa-operator.dev/v1alpha1\nkind: WhatsAppSession\nmetadata: {{name: s{i:04d}, namespace: {NS}}}\n"
                "spec: {engine: sandbox}\n" for i in range(args.sessions))
            t0 = time.monotonic()
            kubectl(kc, "create", "-f", "-", stdin=docs)
            created = time.monotonic() - t0
            log(f"kubectl created {args.sessions} sessions in {created:.1f} s")

            pods_ready_at = converged_at = None
            while converged_at is None:
                elapsed = time.monotonic() - t0
                if elapsed > args.timeout:
                    raise SystemExit(f"not converged after {elapsed:.0f} s")
                items = get_json(f"{api}/apis/wa-operator.dev/v1alpha1/namespaces/{NS}/whatsappsessions")["items"]
                done = sum(1 for s in items if (s.get("status") or {}).get("phase") == "AwaitingScan"
                           and s["status"].get("observedGeneration") == s["metadata"].get("generation"))
                if pods_ready_at is None:
                    pods = get_json(f"{api}/api/v1/namespaces/{NS}/pods")["items"]
                    ready = sum(1 for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                                       for c in (p.get("status") or {}).get("conditions", [])))
                    if ready >= args.sessions:
                        pods_ready_at = time.monotonic() - t0
                        log(f"{ready} pods ready after {pods_ready_at:.1f} s")
                if done >= args.sessions:
                    converged_at = time.monotonic() - t0
                    if pods_ready_at is None:
                        pods_ready_at = converged_at
                else:
                    time.sleep(0.5)
            log(f"converged (all AwaitingScan) after {converged_at:.1f} s")

            result = {"sessions": args.sessions, "kubectl_create_seconds": round(created, 1),
                      "pods_ready_seconds": round(pods_ready_at, 1), "converged_seconds": round(converged_at, 1)}
            if args.scan:
                auth = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}
                t1 = time.monotonic()

                def scan(i):
                    for _ in range(5):
                        try:
                            get_json(f"{gw_url}/v1/sessions/s{i:04d}/sandbox/scan", auth, "POST", b"{}")
                            return
                        except Exception:  # the pod may be busy; try again
                            time.sleep(0.5)
                    raise SystemExit(f"scan of s{i:04d} failed")

                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    list(pool.map(scan, range(args.sessions)))
                scanned = time.monotonic() - t1
                while True:
                    items = get_json(f"{api}/apis/wa-operator.dev/v1alpha1/namespaces/{NS}/whatsappsessions")["items"]
                    if sum(1 for s in items if (s.get("status") or {}).get("phase") == "Connected") >= args.sessions:
                        break
                    if time.monotonic() - t1 > args.timeout:
                        raise SystemExit("not all Connected")
                    time.sleep(0.5)
                result["scan_all_seconds"] = round(scanned, 1)
                result["scan_to_all_connected_seconds"] = round(time.monotonic() - t1, 1)

            log("settling 10 s")
            time.sleep(10)
            sampler.stopped = True
            pids = session_pids(bins["wa-session"])
            rss_pss = [rollup_kib(p) for p in pids]
            metrics = urllib.request.urlopen(f"http://{op_addr}/metrics", timeout=10).read().decode()
            reconciles = re.search(r'wa_operator_reconciles_total\{result="success"\} (\S+)', metrics)
            errors = re.search(r'wa_operator_reconciles_total\{result="error"\} (\S+)', metrics)
            mib = lambda kib: round((kib or 0) / 1024, 1)  # noqa: E731
            result.update({
                "operator_rss_peak_mib": mib(sampler.peak["operator"]),
                "operator_rss_settled_mib": mib(status_kib(op.p.pid)),
                "gateway_rss_peak_mib": mib(sampler.peak["gateway"]),
                "gateway_rss_settled_mib": mib(status_kib(gw.p.pid)),
                "control_plane_rss_peak_mib": mib(sampler.peak["control-plane"]),
                "control_plane_rss_settled_mib": mib(status_kib(cp.p.pid)),
                "session_processes": len(pids),
                "sessions_rss_total_mib": mib(sum(r for r, _ in rss_pss)),
                "sessions_pss_total_mib": mib(sum(p for _, p in rss_pss)),
                "operator_reconciles": int(float(reconciles.group(1))) if reconciles else None,
                "operator_reconcile_errors": int(float(errors.group(1))) if errors else None,
            })
            print(json.dumps(result))
            return 0
        finally:
            for p in reversed(procs):
                p.stop()


if __name__ == "__main__":
    sys.exit(main())
