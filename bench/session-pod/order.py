#!/usr/bin/env python3
"""Writes session-pod/wa-session.order: the functions of wa-session that a session runs.

A session pod's resident memory is mostly the binary's code: the kernel maps code in 64 KiB
windows around every page the process executes (fault-around), and the functions a session
runs are spread across the whole `.text` among code it never runs. session-pod/build.rs hands
this list to the linker (`--symbol-ordering-file`), which places these functions first and
together, so those windows cover code the session runs (BENCHMARKS.md, "Session pod").

The list is recorded, not written by hand: each scenario below runs a release wa-session under
valgrind's callgrind (which records every function executed, exactly, whatever the machine
does), and every function of the binary that callgrind saw goes into the file, grouped so that
what an idle session runs comes first:

  1. sandbox: start, probes, status, QR, metrics, scan, idle (events to a sink)
  2. whatsapp: start against the protocol emulator, QR, scan, connected and idle
  3. sandbox: text sends with idempotency keys, an image, inbound, a network drop, receipts
  4. whatsapp: text sends with idempotency keys, an image, an inbound message, receipts

Names are the linker's (mangled) symbol names, so the file fits the binary built the way the
image builds it, with this toolchain; after code changes some names go missing and the linker
skips them (no error). Rerun after larger changes or a toolchain update; the script prints how
many of the names the binary it profiled holds, and the memory benchmarks show the effect.

    bench/session-pod/order.py --bin target/release/wa-session --emulator target/release/wa-emulator

bench/session-pod/order.sh builds both as the image does and runs this. Standard library,
valgrind (Debian package valgrind) and nm (binutils).
"""

import argparse
import base64
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sp = load("sp_bench", os.path.join(HERE, "bench.py"))
wa = load("wa_bench", os.path.join(ROOT, "bench", "whatsapp", "bench.py"))

# A 1x1 PNG: the image sends go through the media path (upload, thumbnail-free message).
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()


RATE = ["--rate-per-minute", "1000000", "--rate-burst", "100000"]


def callgrind(out):
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--demangle=no",
            "--dump-instr=no", "--dump-line=no", "--compress-strings=no", "--compress-pos=no"]


def run_sandbox(binary, out, sends):
    sp.Pod.wrapper = callgrind(out)
    sink = sp.Sink()
    pod = sp.Pod(binary, args=RATE, events_url=sink.url, cold=False)
    try:
        for path in ("/healthz", "/readyz", "/v1/status", "/v1/qr", "/metrics"):
            pod.call("GET", path)
        c = pod.conn()
        for accept in ("application/json", "text/plain"):
            c.request("GET", "/v1/qr", headers={"authorization": f"Bearer {sp.TOKEN}", "accept": accept})
            c.getresponse().read()
        sp.pair(pod)
        time.sleep(3)
        for path in ("/v1/status", "/metrics", "/readyz"):
            pod.call("GET", path)
        if sends:
            c = pod.conn()
            last = None
            for i in range(sends):
                status, body = pod.call("POST", "/v1/messages",
                                        {"to": "+15551234567", "type": "text", "text": f"order message {i}"},
                                        conn=c, headers={"idempotency-key": f"order-{i}"})
                assert status == 200, body
                last = body["id"]
            status, body = pod.call("POST", "/v1/messages", {
                "to": "+15551234567", "type": "image", "caption": "order",
                "media": {"data": PNG, "mimetype": "image/png", "filename": "a.png"}},
                headers={"idempotency-key": "order-image"})
            assert status == 200, body
            pod.call("GET", f"/v1/messages/{last}")
            status, body = pod.call("POST", "/v1/sandbox/inbound",
                                    {"from": "+15551234567", "type": "text", "text": "hello"})
            assert status in (200, 201, 202), body
            status, body = pod.call("POST", "/v1/sandbox/disconnect", {})
            assert status in (200, 202), body
            time.sleep(5)
            pod.call("GET", "/v1/status")
            pod.call("GET", "/metrics")
    finally:
        pod.stop(timeout=120)
        sink.shutdown()


def run_whatsapp(binary, emulator, out, sends):
    wa.Pod.wrapper = callgrind(out)
    wa.Pod.ready_timeout = 120
    emu = wa.Emulator(emulator)
    try:
        pod = wa.Pod(binary, emu.ws_url, emu.media_url, RATE)
        try:
            pod.pair(emu, timeout=120)
            time.sleep(10)
            for path in ("/v1/status", "/metrics", "/readyz", "/healthz"):
                pod.get(path)
            if sends:
                last = None
                for i in range(sends):
                    code, body = pod.post("/v1/messages",
                                          {"to": wa.CONTACT, "type": "text", "text": f"order message {i}"},
                                          headers={"idempotency-key": f"order-{i}"})
                    assert code == 200, body
                    last = body["id"]
                code, body = pod.post("/v1/messages", {
                    "to": wa.CONTACT, "type": "image", "caption": "order",
                    "media": {"data": PNG, "mimetype": "image/png", "filename": "a.png"}},
                    headers={"idempotency-key": "order-image"})
                assert code == 200, body
                code, body = emu.post(f"/accounts/{wa.CONTACT.lstrip('+')}/send",
                                      {"to": wa.OWN, "type": "text", "text": "hello"})
                assert code == 200, body
                pod.wait(lambda: pod.get(f"/v1/messages/{last}")[1].get("status") == "delivered",
                         120, "last receipt")
                time.sleep(5)
                pod.get("/metrics")
        finally:
            pod.stop(timeout=120)
    finally:
        emu.stop()


def functions(path, binary):
    """Names of the binary's functions that a callgrind output file shows executed."""
    binary = os.path.realpath(binary)
    seen = set()
    ob = cob = None
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("=")
            if key == "ob":
                ob = os.path.realpath(value) if value else None
            elif key == "cob":
                cob = os.path.realpath(value) if value else None
            elif key in ("fn", "cfn"):
                obj = ob if key == "fn" else (cob or ob)
                if key == "fn":
                    cob = None
                # callgrind marks recursion levels as name'2, name'3, ...
                name = re.sub(r"'[0-9]+$", "", value)
                if obj == binary and name and not name.startswith(("0x", "(")):
                    seen.add(name)
    return seen


def defined_symbols(binary):
    out = subprocess.run(["nm", "--defined-only", binary], check=True, capture_output=True, text=True).stdout
    return {line.split()[-1] for line in out.splitlines() if len(line.split()) >= 3}


def listed(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def check(binary, order):
    """How much of the list the binary holds, and whether the linker placed it first."""
    names = listed(order)
    out = subprocess.run(["nm", "-n", "-S", "--defined-only", binary], check=True, capture_output=True,
                         text=True).stdout
    where = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[2] in "tTW":
            where.setdefault(parts[3], (int(parts[0], 16), int(parts[1], 16)))
    found = [where[n] for n in names if n in where]
    if not found:
        print(f"{order}: none of its {len(names)} names is a function of {binary}")
        return
    start = min(a for a, _ in where.values())
    end = max(a + size for a, size in found)
    size = sum(size for _, size in found)
    print(f"{order}: {len(found)} of {len(names)} functions are in {binary} ({size / 2**20:.1f} MiB of code), "
          f"placed within the first {(end - start) / 2**20:.1f} MiB of its code")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", required=True)
    ap.add_argument("--emulator")
    ap.add_argument("--check", action="store_true",
                    help="only report how much of the list --bin holds and where it was placed")
    ap.add_argument("--sends", type=int, default=1000, help="text sends per engine")
    ap.add_argument("--out", default=os.path.join(ROOT, "session-pod", "wa-session.order"))
    args = ap.parse_args()
    if args.check:
        return check(args.bin, args.out)
    if not args.emulator:
        ap.error("--emulator is needed to record")

    work = tempfile.mkdtemp(prefix="wa-order-")
    runs = [
        ("sandbox, idle", lambda o: run_sandbox(args.bin, o, 0)),
        ("whatsapp, connected and idle", lambda o: run_whatsapp(args.bin, args.emulator, o, 0)),
        ("sandbox, sends", lambda o: run_sandbox(args.bin, o, args.sends)),
        ("whatsapp, sends", lambda o: run_whatsapp(args.bin, args.emulator, o, args.sends)),
    ]
    placed, groups = set(), []
    for i, (what, run) in enumerate(runs):
        out = os.path.join(work, f"callgrind.{i}")
        print(f"recording: {what}", file=sys.stderr)
        run(out)
        got = functions(out, args.bin)
        new = sorted(got - placed)
        placed |= got
        groups.append((what, len(got), new))
        print(f"  {len(got)} functions executed, {len(new)} new", file=sys.stderr)

    symbols = defined_symbols(args.bin)
    missing = placed - symbols
    with open(args.out, "w") as f:
        f.write("# Functions of wa-session a session runs, in link order: written by\n")
        f.write("# bench/session-pod/order.sh (bench/session-pod/order.py), read by session-pod/build.rs.\n")
        for what, total, new in groups:
            f.write(f"# {what}: {total} functions executed, {len(new)} not listed above\n")
            for name in new:
                f.write(name + "\n")
    print(f"wrote {args.out}: {len(placed)} functions; {len(placed) - len(missing)} of them "
          f"are symbols of {args.bin}", file=sys.stderr)


if __name__ == "__main__":
    main()
