#!/usr/bin/env python3
"""Resident memory of the wa-session binary with the whatsapp engine (release build).

Measures, each with a fresh temporary data directory:
  1. fresh store, no network: --wa-server-url points at a closed local port; RSS after the
     engine has created its store and tried to connect for a while;
  2. connected and idle: paired with a simulated phone of the protocol emulator (its HTTP
     control API scans the pod's QR code), then left idle;
  3. after N sends (default 1,000) to one contact through POST /v1/messages, once every send
     was answered and the receipts settled; also the peak (VmHWM).

RSS is VmRSS from /proc/<pid>/status, split into private anonymous memory (heap, stacks) and
file-backed pages (mostly the binary's code) from /proc/<pid>/smaps_rollup. Before each start
the binary's pages are dropped from the page cache, as bench/session-pod/bench.py does (how
much code the kernel maps depends on how the file sits in the cache; a freshly built binary is
all in it). The pod runs
without the caller's RUST_BACKTRACE / RUST_LIB_BACKTRACE unless --env sets them (wa-session
turns library backtraces off unless RUST_LIB_BACKTRACE is set; before that, RUST_BACKTRACE=1
made every anyhow error in wa-rs capture and symbolize a backtrace: 58 MiB connected instead
of 20). Prints a Markdown table. Standard library only.

    bench/whatsapp/bench.py --bin PATH --emulator PATH [--sends 1000] [--settle 10]
                            [--env RUST_BACKTRACE=1 ...]
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse

TOKEN = "bench-token"
OWN = "+15550000001"
CONTACT = "+15557654321"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def evict_from_page_cache(path):
    """Drops the binary's pages from the page cache (this file only), as on a node that reads
    the binary from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key}")


def call(host, port, method, path, body=None, token=None, accept=None, timeout=60, headers=None):
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = dict(headers or {})
    if body is not None:
        headers["content-type"] = "application/json"
        body = json.dumps(body)
    if token:
        headers["authorization"] = f"Bearer {token}"
    if accept:
        headers["accept"] = accept
    c.request(method, path, body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    try:
        return r.status, json.loads(data)
    except ValueError:
        return r.status, data.decode(errors="replace")


class Emulator:
    def __init__(self, binary, extra=()):
        self.proc = subprocess.Popen([binary, "--log", "warn", *extra], stdout=subprocess.PIPE, text=True)
        urls = json.loads(self.proc.stdout.readline())
        self.ws_url = urls["wsUrl"]
        self.media_url = urls["mediaUrl"]
        u = urllib.parse.urlparse(urls["controlUrl"])
        self.host, self.port = u.hostname, u.port

    def post(self, path, body):
        return call(self.host, self.port, "POST", "/control" + path, body)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Pod:
    extra_env = {}
    # A command the pod runs under (bench/session-pod/order.py: callgrind), and how long it
    # may take to become ready then.
    wrapper = []
    ready_timeout = 15

    def __init__(self, binary, server_url, media_url, extra=()):
        self.dir = tempfile.mkdtemp(prefix="wa-bench-wa-")
        self.port = free_port()
        cmd = [binary, "--engine", "whatsapp", "--data-dir", os.path.join(self.dir, "data"),
               "--listen", f"127.0.0.1:{self.port}", "--token", TOKEN, "--log", "warn",
               "--wa-server-url", server_url, *extra]
        if media_url:
            cmd += ["--wa-media-url", media_url]
        self.log = open(os.path.join(self.dir, "log"), "w")
        env = {k: v for k, v in os.environ.items() if k not in ("RUST_BACKTRACE", "RUST_LIB_BACKTRACE")}
        env.update(Pod.extra_env)
        evict_from_page_cache(binary)
        self.proc = subprocess.Popen([*Pod.wrapper, *cmd], stdout=self.log, stderr=self.log, env=env)
        self.wait(lambda: self.get("/readyz", token=None)[0] == 200, Pod.ready_timeout, "ready")

    def get(self, path, token=TOKEN, accept=None):
        return call("127.0.0.1", self.port, "GET", path, token=token, accept=accept)

    def post(self, path, body, headers=None):
        return call("127.0.0.1", self.port, "POST", path, body, token=TOKEN, headers=headers)

    def wait(self, cond, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wa-session exited: {open(self.log.name).read()}")
            try:
                if cond():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{what}: timed out; log:\n{open(self.log.name).read()}")

    def pair(self, emu, timeout):
        """Scans the pod's current QR code with the emulator's phone for OWN; waits for Connected."""
        qr = {}

        def have_qr():
            code, body = self.get("/v1/qr", accept="application/json")
            if code == 200:
                qr["code"] = body["code"]
                return True
            return False

        self.wait(have_qr, timeout, "QR code")
        code, body = emu.post("/scan", {"qr": qr["code"], "phone": OWN, "pushName": "Bench"})
        assert code == 200, body
        self.wait(lambda: self.phase() == "Connected", timeout, "Connected")

    def phase(self):
        return self.get("/v1/status")[1]["phase"]

    def rss(self):
        return proc_status(self.proc.pid, "VmRSS")

    def hwm(self):
        return proc_status(self.proc.pid, "VmHWM")

    def split(self):
        """(anonymous, file-backed) KiB."""
        anon = file = 0
        with open(f"/proc/{self.proc.pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Anonymous:"):
                    anon = int(line.split()[1])
                elif line.startswith("Rss:"):
                    file = int(line.split()[1])
        return anon, file - anon

    def reading(self, what):
        anon, file = self.split()
        return (what, self.phase(), mib(self.rss()), mib(anon), mib(file))

    def stop(self, timeout=10):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--emulator", required=True)
    ap.add_argument("--sends", type=int, default=1000)
    ap.add_argument("--settle", type=float, default=10.0, help="seconds idle before a reading")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment for the pod (e.g. RUST_BACKTRACE=1); repeatable")
    ap.add_argument("--emulator-arg", action="append", default=[], metavar="ARG",
                    help="flag for wa-emulator (e.g. --refuse-init-queries); repeatable")
    args = ap.parse_args()
    Pod.extra_env = dict(kv.split("=", 1) for kv in args.env)
    rows = []

    # 1. Fresh store, no network: nothing listens on the server port.
    closed = f"ws://127.0.0.1:{free_port()}/ws/chat"
    pod = Pod(args.bin, closed, None)
    time.sleep(args.settle)
    rows.append(pod.reading("fresh store, no network (connect attempts failing)"))
    pod.stop()

    emu = Emulator(args.emulator, args.emulator_arg)
    try:
        # 2. Connected and idle.
        rate = ["--rate-per-minute", "1000000", "--rate-burst", "100000"]
        pod = Pod(args.bin, emu.ws_url, emu.media_url, rate)
        pod.pair(emu, timeout=30)
        time.sleep(args.settle)
        rows.append(pod.reading("connected, idle"))

        if args.sends == 0:
            pod.stop()
            return print_rows(rows)

        # 3. After N sends: one at a time, as the session sends them anyway.
        started = time.monotonic()
        last_id = None
        for i in range(args.sends):
            code, body = pod.post("/v1/messages", {"to": CONTACT, "type": "text", "text": f"benchmark message {i}"})
            if code != 200:
                raise RuntimeError(f"send {i}: {code} {body}")
            last_id = body["id"]
        took = time.monotonic() - started

        def delivered():
            return pod.get(f"/v1/messages/{last_id}")[1].get("status") == "delivered"

        pod.wait(delivered, 60, "last receipt")
        time.sleep(args.settle)
        rows.append(pod.reading(f"after {args.sends:,} sends ({args.sends / took:.0f} sends/s), idle again"))
        rows.append((f"peak during the {args.sends:,} sends (VmHWM)", pod.phase(), mib(pod.hwm()), "", ""))
        code, got = call(emu.host, emu.port, "GET", "/control/accounts/" + CONTACT.lstrip("+") + "/messages")
        assert code == 200, got
        decrypted = [m for m in got if m.get("text", "").startswith("benchmark message")]
        if len(decrypted) != args.sends:
            raise RuntimeError(f"the contact decrypted {len(decrypted)} of {args.sends} messages")
        pod.stop()
    finally:
        emu.stop()
    print_rows(rows)


def print_rows(rows):
    if Pod.extra_env:
        print("pod environment: " + " ".join(f"{k}={v}" for k, v in Pod.extra_env.items()))
    print("| whatsapp engine (release) | phase | RSS | of which anonymous | of which file-backed |")
    print("|---|---|---|---|---|")
    for what, phase, rss, anon, file in rows:
        print(f"| {what} | {phase} | {rss} | {anon} | {file} |")


if __name__ == "__main__":
    main()
