#!/usr/bin/env python3
"""Resident memory and start-to-ready time of the wa-session binary (release build).

Measures, each in a fresh temporary data directory:
  1. start-to-ready: from spawning the process to the first 200 on /readyz (N runs);
  2. sandbox idle: RSS after start (AwaitingScan), and after pairing (Connected), each after
     a settle time; and the share per session when --fleet sessions run side by side;
  3. sandbox after 10,000 sends: RSS once every send was answered and receipts settled,
     with an events sink acknowledging deliveries (as under the operator) and without;
  4. whatsapp engine, fresh store, no network: --wa-server-url points at a closed local port.

RSS is VmRSS from /proc/<pid>/status (also split into anonymous and file-backed pages, and
PSS for side-by-side sessions). Before each start the binary's pages are dropped from the
page cache (posix_fadvise on that one file), so the figures are those of a node that reads the
binary from disk. Prints a Markdown table. Standard library only.

    bench/session-pod/bench.py [--bin PATH] [--sends 10000] [--starts 30]
"""

import argparse
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time

TOKEN = "bench-token"


def evict_from_page_cache(path):
    """Drops the binary's pages from the page cache (this file only), as on a node that has
    not run it yet. Without this, how much of the code counts in RSS depends on how the file
    happens to sit in the cache (a freshly copied binary measured 2 MiB more)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def memory(pid):
    """VmRSS, its anonymous part (heap, stacks: what only this process uses) and PSS
    (file pages such as the binary's code divided among the processes mapping them), KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile"):
                fields[k] = int(v.split()[0])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                fields["Pss"] = int(line.split()[1])
    return fields


class Pod:
    # A command the pod runs under (bench/session-pod/order.py: callgrind), and how long it
    # may take to become ready then.
    wrapper = []
    ready_timeout = 10.0

    def __init__(self, binary, engine="sandbox", args=(), events_url=None, cold=True):
        if cold:
            evict_from_page_cache(binary)
        self.dir = tempfile.mkdtemp(prefix="wa-bench-")
        self.port = free_port()
        cmd = [binary, "--engine", engine, "--data-dir", os.path.join(self.dir, "data"),
               "--listen", f"127.0.0.1:{self.port}", "--token", TOKEN, "--log", "warn", *args]
        if events_url:
            cmd += ["--events-url", events_url]
        self.log = open(os.path.join(self.dir, "log"), "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*Pod.wrapper, *cmd], stdout=self.log, stderr=self.log)
        self.ready_after = self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + Pod.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited: {open(self.log.name).read()}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                c.request("GET", "/readyz")
                if c.getresponse().status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.0005)
        raise RuntimeError("not ready")

    def conn(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def call(self, method, path, body=None, conn=None, headers=None):
        c = conn or self.conn()
        headers = {"authorization": f"Bearer {TOKEN}", **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        c.request(method, path, body=data, headers=headers)
        r = c.getresponse()
        payload = r.read()
        return r.status, json.loads(payload) if payload.startswith(b"{") else payload

    def rss(self):
        return rss_kib(self.proc.pid)

    def mem(self):
        m = memory(self.proc.pid)
        return f"{mib(m['VmRSS'])} RSS ({mib(m['RssAnon'])} anonymous, {mib(m['RssFile'])} file)"

    def metric(self, name):
        _, text = self.call("GET", "/metrics")
        for line in text.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def stop(self, timeout=10):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Sink(http.server.ThreadingHTTPServer):
    """Acknowledges event batches like the gateway would, counting events."""

    def __init__(self):
        self.events = 0
        self.lock = threading.Lock()

        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with sink.lock:
                    sink.events += len(json.loads(body)["events"])
                reply = b'{"accepted":1,"duplicates":0}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/internal/v1/events"


def pair(pod):
    status, body = pod.call("POST", "/v1/sandbox/scan", {})
    assert status == 200 and body["phase"] == "Connected", body


def send_many(pod, n, workers=8):
    """n text sends over `workers` keep-alive connections; returns seconds taken."""
    counter = iter(range(n))
    lock = threading.Lock()
    errors = []

    def work():
        c = pod.conn()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            status, body = pod.call("POST", "/v1/messages",
                                    {"to": "+15551234567", "type": "text", "text": f"bench message {i}"}, conn=c)
            if status != 200:
                errors.append((status, body))
                return

    started = time.monotonic()
    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"send failed: {errors[0]}")
    return time.monotonic() - started


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("WA_SESSION_BIN", "target/release/wa-session"))
    ap.add_argument("--sends", type=int, default=10_000)
    ap.add_argument("--starts", type=int, default=30)
    ap.add_argument("--idle-runs", type=int, default=5, help="starts per idle figure (median)")
    ap.add_argument("--fleet", type=int, default=10, help="sessions run side by side")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds to wait before reading idle RSS")
    a = ap.parse_args()
    fast = ["--sandbox-delivered-ms", "200", "--sandbox-read-ms", "400"]
    rows = []

    # 1. start to ready: binary read from disk (cold) and already in the page cache (warm)
    for cold in (True, False):
        times = []
        for _ in range(a.starts):
            p = Pod(a.bin, cold=cold)
            times.append(p.ready_after * 1000)
            p.stop()
        times.sort()
        p95 = times[max(0, int(len(times) * 0.95) - 1)]
        label = "binary not in the page cache" if cold else "binary in the page cache"
        rows.append((f"start to ready (sandbox, fresh data dir, {label})",
                     f"median {statistics.median(times):.1f} ms, p95 {p95:.1f} ms, max {times[-1]:.1f} ms ({a.starts} runs)"))

    # 2. sandbox idle
    def median_of(runs, paired):
        samples = []
        for _ in range(runs):
            p = Pod(a.bin, args=fast)
            if paired:
                pair(p)
            time.sleep(a.settle)
            samples.append(memory(p.proc.pid))
            p.stop()
        rss = sorted(m["VmRSS"] for m in samples)
        med = statistics.median(rss)
        anon = statistics.median(m["RssAnon"] for m in samples)
        return (f"{mib(med)} RSS median of {runs} starts (min {mib(rss[0])}, max {mib(rss[-1])}); "
                f"{mib(anon)} of it anonymous")

    rows.append(("sandbox idle, awaiting scan", median_of(a.idle_runs, paired=False)))
    rows.append(("sandbox idle, paired (Connected)", median_of(a.idle_runs, paired=True)))

    # 2a. the runtime's shape: the same, on a multi-threaded runtime.
    for workers in (1, 2):
        p = Pod(a.bin, args=fast + ["--worker-threads", str(workers)])
        pair(p)
        time.sleep(a.settle)
        rows.append((f"sandbox idle, paired, --worker-threads {workers} (multi-threaded runtime)", p.mem()))
        p.stop()

    # 2b. many sessions on one host (local mode): the binary's code pages are shared.
    pods = [Pod(a.bin, args=fast, cold=(i == 0)) for i in range(a.fleet)]
    for p in pods:
        pair(p)
    time.sleep(a.settle)
    mems = [memory(p.proc.pid) for p in pods]
    rows.append((f"{a.fleet} sandbox sessions on one host, paired, idle (per session)",
                 f"{mib(statistics.mean(m['Pss'] for m in mems))} PSS, "
                 f"{mib(statistics.mean(m['RssAnon'] for m in mems))} anonymous, "
                 f"{mib(statistics.mean(m['VmRSS'] for m in mems))} RSS"))
    for p in pods:
        p.stop()

    # 3. sandbox after N sends
    for label, with_sink in (("with events delivered to a sink", True), ("no events URL", False)):
        sink = Sink() if with_sink else None
        rate = ["--rate-per-minute", "100000000", "--rate-burst", str(a.sends)]
        p = Pod(a.bin, args=fast + rate, events_url=sink.url if sink else None)
        pair(p)
        took = send_many(p, a.sends)
        peak = p.rss()
        # Let receipts arrive and the outbox drain before the "after" reading.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (p.metric("wa_session_outbox_events") or 0) == 0 and \
                    (p.metric('wa_session_receipts_total{status="read"}') or 0) >= a.sends:
                break
            time.sleep(0.2)
        # The pod gives freed memory back after 2-4 s without activity (memory.rs).
        time.sleep(max(a.settle, 6.0))
        sent = p.metric("wa_session_messages_sent_total")
        assert sent == a.sends, sent
        detail = f" ({sink.events} events acknowledged)" if sink else ""
        rows.append((f"sandbox after {a.sends:,} sends, {label}",
                     f"{p.mem()} settled; {mib(peak)} RSS right after the last send; "
                     f"{a.sends / took:,.0f} sends/s over 8 connections{detail}"))
        p.stop()
        if sink:
            sink.shutdown()

    # 4. whatsapp engine, fresh store, no network
    closed = free_port()
    p = Pod(a.bin, engine="whatsapp", args=["--wa-server-url", f"ws://127.0.0.1:{closed}/ws/chat",
                                             "--wa-media-url", f"http://127.0.0.1:{closed}"])
    time.sleep(a.settle)
    _, status = p.call("GET", "/v1/status")
    rows.append(("whatsapp engine, fresh store, no network",
                 f"{p.mem()} (phase {status.get('phase')}; start to ready {p.ready_after * 1000:.1f} ms"
                 + (f"; {status['lastError']}" if status.get("lastError") else "") + ")"))
    p.stop()

    print(f"binary: {a.bin} ({os.path.getsize(a.bin) / 1024 / 1024:.1f} MiB)")
    print()
    print("| measurement | result |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
