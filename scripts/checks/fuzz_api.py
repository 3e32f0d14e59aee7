#!/usr/bin/env python3
"""API fuzzing: schemathesis against the committed gateway/openapi.json, on a real gateway.

Starts `wa-gateway local` (the debug binary given as the first argument) with WA_ADMIN_KEY,
a fresh data directory and SQLite; creates sandbox sessions (one connected through the
sandbox routes, so the send routes get past 404), a message, a key, a webhook with a
delivery; then runs schemathesis (examples, coverage and fuzzing phases) with the checks

    not_a_server_error, status_code_conformance, content_type_conformance,
    response_headers_conformance, response_schema_conformance, negative_data_rejection

and fails when schemathesis reports a failure, when fewer than --min-cases cases ran, or when
the gateway or any session process logged a panic. Prints the figures RELIABILITY.md quotes.

    python3 scripts/checks/fuzz_api.py target/debug/wa-gateway [--max-examples 30] [--seed 1]
"""

from __future__ import annotations

import argparse
import collections
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from procs import free_port, http, spawn, wait_until  # noqa: E402

CHECKS = ",".join([
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
])
PANIC = re.compile(r"panicked at|a request handler panicked|RUST_BACKTRACE")


class Sink(BaseHTTPRequestHandler):
    """A webhook receiver that accepts everything."""

    received = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        Sink.received += 1
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def main() -> int:
    # A SIGTERM (e.g. from `timeout`) unwinds like an exception, so the gateway is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--max-examples", type=int, default=30, help="per operation and phase")
    ap.add_argument("--min-cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    # One worker: generation is CPU-bound Python (no gain from threads on 2 cores), and
    # CPython 3.11 raised "SystemError: AST constructor recursion depth mismatch" in
    # schemathesis with 2 worker threads.
    ap.add_argument("--workers", default="1")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    admin = "fuzz-admin-" + secrets.token_hex(12)
    work = Path(tempfile.mkdtemp(prefix="wa-fuzz-"))
    data = work / "data"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{sink.server_address[1]}/hook"

    env = {
        "WA_ADMIN_KEY": admin,
        "DATABASE_URL": f"sqlite://{work / 'gateway.db'}",
        "WA_GATEWAY_LOG": "info",
        "RUST_BACKTRACE": "1",
    }
    env_drop = ["WA_SESSION_BIN"]
    for k in env_drop:
        os.environ.pop(k, None)
    cmd = [
        args.binary, "local", "--data-dir", str(data), "--listen", f"127.0.0.1:{port}",
        "--media-max-bytes", "100000", "--webhook-backoff-ms", "100", "--webhook-max-attempts", "2",
        "--key-cache-seconds", "0",
        "--session-env", "WA_SANDBOX_DELIVERED_MS=50", "--session-env", "WA_SANDBOX_READ_MS=100",
        # A whatsapp-engine session, should one be created, reaches nothing.
        "--session-env", "WA_SERVER_URL=ws://127.0.0.1:9/ws/chat",
    ]
    auth = {"Authorization": f"Bearer {admin}", "Content-Type": "application/json"}

    def call(method: str, path: str, body=None, expect=(200, 201)):
        status, raw = http(method, base + path, json.dumps(body).encode() if body is not None else None, auth, timeout=30)
        if status not in expect:
            raise AssertionError(f"{method} {path}: {status} {raw[:500]!r}")
        return json.loads(raw) if raw else None

    started = time.monotonic()
    with spawn(cmd, work / "gateway.log", env=env) as gw:
        wait_until("gateway ready", lambda: http("GET", base + "/readyz")[0] == 200, 30, gw)

        # Fixtures: a connected session with a generous rate limit, one awaiting a scan.
        call("POST", "/v1/sessions", {"name": "fuzz-a", "engine": "sandbox", "rateLimit": {"messagesPerMinute": 6000, "burst": 1000}})
        call("POST", "/v1/sessions", {"name": "fuzz-b", "engine": "sandbox"})
        for name in ("fuzz-a", "fuzz-b"):
            wait_until(f"{name} awaiting scan", lambda n=name: call("GET", f"/v1/sessions/{n}").get("phase") == "AwaitingScan"
                       and call("GET", f"/v1/sessions/{n}")["ready"], 30, gw)
        call("POST", "/v1/sessions/fuzz-a/sandbox/scan")
        wait_until("fuzz-a connected", lambda: call("GET", "/v1/sessions/fuzz-a").get("phase") == "Connected", 30, gw)
        webhook = call("POST", "/v1/sessions/fuzz-a/webhooks", {"url": hook_url, "events": ["message", "receipt", "state"]})
        message = call("POST", "/v1/sessions/fuzz-a/messages", {"to": "+15551234567", "type": "text", "text": "fuzz fixture"})
        key = call("POST", "/v1/keys", {"name": "fuzz", "permissions": ["send", "read", "manage"], "sessions": ["fuzz-a"]})
        deliveries = wait_until("a webhook delivery", lambda: call("GET", f"/v1/sessions/fuzz-a/webhooks/{webhook['id']}/deliveries")["items"], 30, gw)
        known = {
            "sessions": ["fuzz-a", "fuzz-b"],
            "pool": ["fuzz-c", "fuzz-d"],
            "message": message["id"],
            "key": key["id"],
            "webhook": webhook["id"],
            "webhook_session": "fuzz-a",
            "delivery": deliveries[0]["id"],
        }
        setup_s = time.monotonic() - started

        report = work / "events.ndjson"
        st_env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": "fuzz_hooks",
            "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "FUZZ_KNOWN": json.dumps(known),
            "FUZZ_SEED": str(args.seed),
        }
        st = [
            "schemathesis", "--config-file", str(HERE / "schemathesis.toml"),
            "run", str(ROOT / "gateway" / "openapi.json"),
            "--url", base,
            "-H", f"Authorization: Bearer {admin}",
            "--checks", CHECKS,
            "--phases", "examples,coverage,fuzzing",
            "--max-examples", str(args.max_examples),
            "--seed", str(args.seed),
            "--workers", args.workers,
            "--request-timeout", "30",
            "--generation-database", "none",
            "--suppress-health-check", "data_too_large,filter_too_much,too_slow,large_base_example",
            "--report", "ndjson", "--report-ndjson-path", str(report),
            "--no-color",
            "--output-truncate", "true",
        ]
        fuzz_started = time.monotonic()
        result = subprocess.run(st, env=st_env, cwd=work)
        fuzz_s = time.monotonic() - fuzz_started

        alive = gw.alive()
        gateway_log = gw.log()

    cases, statuses = count_cases(report)
    failed_checks, errors = check_results(report)
    panics = [f"gateway: {line}" for line in gateway_log.splitlines() if PANIC.search(line)]
    for log in sorted((data / "logs").glob("*.log")):
        panics += [f"{log.name}: {line}" for line in log.read_text(errors="replace").splitlines() if PANIC.search(line)]

    print(f"\nfuzz: {cases} cases in {fuzz_s:.0f} s (setup {setup_s:.1f} s), seed {args.seed}, "
          f"max-examples {args.max_examples}; answers by status: {dict(sorted(statuses.items()))}; "
          f"webhook deliveries received: {Sink.received}")
    failed = []
    api_errors = [e for e in errors if not generator_error(*e)]
    if failed_checks or api_errors:
        failed.append(f"schemathesis: {failed_checks} failed checks, errors {api_errors} (details above)")
    elif result.returncode != 0:
        if not errors:
            failed.append(f"schemathesis exited with {result.returncode} (details above)")
        else:
            # Every check passed; schemathesis's own generator stumbled (see GENERATOR_ERRORS).
            print(f"fuzz: note: schemathesis generator errors, not API failures: {errors}")
    if cases < args.min_cases:
        failed.append(f"only {cases} cases ran (at least {args.min_cases} wanted)")
    if not alive:
        failed.append("the gateway died during the run")
    if panics:
        failed.append("panics logged:\n  " + "\n  ".join(panics[:20]))
    if any(s >= 500 for s in statuses):
        failed.append(f"server errors: { {s: n for s, n in statuses.items() if s >= 500} }")
    if statuses.get(0):
        failed.append(f"{statuses[0]} requests got no answer")
    if failed:
        print("FAIL: " + "\n".join(failed), file=sys.stderr)
        print(f"work directory kept: {work}", file=sys.stderr)
        return 1
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print("fuzz: passed")
    return 0


# Errors raised inside schemathesis's data generation, not by an answer of the API: hypothesis
# found its own generator flaky (seen under CPU load in the coverage phase, e.g. for the
# if/then/else schema of POST /v1/keys) or a health check stopped it. They are reported, and
# they do not fail the run when every check of every sent case passed.
GENERATOR_ERRORS = {"FlakyFailure", "FailedHealthCheck", "Unsatisfiable"}


def generator_error(kind: str, message: str) -> bool:
    # CPython 3.11's AST validator keeps one recursion counter for all threads; schemathesis
    # compiling patterns can trip it ("SystemError: AST constructor recursion depth mismatch").
    return kind in GENERATOR_ERRORS or (kind == "SystemError" and message.startswith("AST constructor recursion depth"))


def check_results(report: Path) -> tuple[int, list[tuple[str, str]]]:
    """Checks that did not pass, and schemathesis's non-fatal errors (type, message)."""
    failed, errors = 0, []
    if not report.exists():
        return 0, []
    for line in report.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        if "NonFatalError" in event:
            value = event["NonFatalError"].get("value") or {}
            errors.append((str(value.get("type", "?")), str(value.get("message", ""))[:200]))
        finished = event.get("ScenarioFinished")
        if finished:
            for checks in (finished.get("recorder", {}).get("checks") or {}).values():
                for c in checks if isinstance(checks, list) else [checks]:
                    if isinstance(c, dict) and c.get("status") not in ("success", "skip"):
                        failed += 1
    return failed, errors


def count_cases(report: Path) -> tuple[int, collections.Counter]:
    """Test cases sent and their answers' statuses, from schemathesis's ndjson events
    (`ScenarioFinished.recorder.interactions`: one request/response per case)."""
    statuses: collections.Counter = collections.Counter()
    cases = 0
    if not report.exists():
        return 0, statuses
    for line in report.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        finished = event.get("ScenarioFinished") if isinstance(event, dict) else None
        if not finished:
            continue
        for interaction in (finished.get("recorder", {}).get("interactions") or {}).values():
            cases += 1
            response = interaction.get("response") if isinstance(interaction, dict) else None
            statuses[int(response["status_code"]) if isinstance(response, dict) else 0] += 1
    return cases, statuses


if __name__ == "__main__":
    sys.exit(main())
