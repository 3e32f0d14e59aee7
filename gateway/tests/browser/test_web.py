"""The web page, clicked through in headless Chromium (Debian's /usr/bin/chromium driven by
Playwright from PyPI; no browser download).

Starts a real `wa-gateway local` (SQLite, a temporary data directory, real sandbox session
processes), reads the URL and the first admin key it prints, then as a person would: enters
the key, creates a sandbox session, sees its QR code (and sees it refresh), asks for a pair
code, scans (sandbox), sees Connected, sends a test message, creates an API key (shown once),
checks it works, revokes it and checks it no longer does.

    python3 gateway/tests/browser/test_web.py <path to wa-gateway>
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from playwright.sync_api import expect, sync_playwright

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def start_gateway(binary, data_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("WA_ADMIN_KEY", "DATABASE_URL", "WA_SESSION_BIN")}
    log = open(os.path.join(data_dir, "gateway.log"), "w")
    proc = subprocess.Popen(
        [
            binary, "local",
            "--data-dir", os.path.join(data_dir, "data"),
            "--listen", "127.0.0.1:0",
            "--scrape-interval-seconds", "1",
            # QR codes rotate every 2 s, so the page's auto-refresh has something to show.
            "--session-env", "WA_SANDBOX_QR_SECONDS=2",
            "--session-env", "WA_SANDBOX_DELIVERED_MS=100",
            "--session-env", "WA_SANDBOX_READ_MS=200",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env=env,
        text=True,
    )
    found = {}

    def read():
        for line in proc.stdout:
            m = re.match(r"wa-operator gateway listening on (http://\S+?)/?$", line.strip())
            if m:
                found["url"] = m.group(1)
            m = re.match(r"first admin API key \(shown once, store it now\): (\S+)$", line.strip())
            if m:
                found["key"] = m.group(1)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.time() + 30
    while time.time() < deadline and not ("url" in found and "key" in found):
        if proc.poll() is not None:
            raise SystemExit(f"wa-gateway exited: {proc.returncode}; log in {data_dir}/gateway.log")
        time.sleep(0.05)
    if "url" not in found or "key" not in found:
        proc.kill()
        raise SystemExit("wa-gateway did not print its URL and first admin key within 30 s")
    return proc, found["url"], found["key"]


def api(url, key, method, path):
    req = urllib.request.Request(url + path, method=method, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def run(binary):
    tmp = tempfile.mkdtemp(prefix="wa-web-")
    proc, url, admin = start_gateway(binary, tmp)
    errors = []
    try:
        with sync_playwright() as p:
            context = p.chromium.launch_persistent_context(
                os.path.join(tmp, "profile"),  # a fresh --user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
            )
            page = context.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "409" not in m.text else None)
            page.goto(url + "/")
            expect(page).to_have_title("wa-operator")

            # The key printed on the first start.
            page.fill("#key-input", admin)
            page.click("#key-save")
            expect(page.locator("#key-status")).to_have_text("key accepted")
            expect(page.locator("#no-sessions")).to_be_visible()

            # Create a sandbox session; the page selects it and shows its QR code.
            page.fill("#create-name", "web")
            page.select_option("#create-engine", "sandbox")
            page.click("#create-submit")
            expect(page.locator('#sessions tr[data-session="web"]')).to_be_visible(timeout=10_000)
            expect(page.locator("#session-phase")).to_have_text("AwaitingScan", timeout=15_000)
            qr = page.locator("#qr-img")
            expect(qr).to_be_visible(timeout=15_000)
            page.wait_for_function("document.getElementById('qr-img').naturalWidth > 100", timeout=15_000)
            # …and it refreshes by itself (a new image every poll, a new code every 2 s).
            first = qr.get_attribute("src")
            page.wait_for_function(
                "src => document.getElementById('qr-img').src !== src", arg=first, timeout=10_000
            )
            print("QR code shown and refreshed")

            # Pair-code entry: the code to type on the phone.
            page.fill("#pair-phone", "+15557654321")
            page.click("#pair-submit")
            expect(page.locator("#pair-code")).to_have_text(re.compile(r"^[A-Z0-9-]{8,9}$"), timeout=10_000)
            print("pair code:", page.locator("#pair-code").inner_text())

            # Scan (the sandbox's simulated phone) → Connected.
            page.click("#scan-button")
            expect(page.locator("#session-phase")).to_have_text("Connected", timeout=15_000)
            expect(page.locator("#pairing")).to_be_hidden()
            expect(page.locator("#session-account")).to_have_text("15557654321@s.whatsapp.net")
            print("session connected")

            # Send a test message.
            page.fill("#send-to", "+15551234567")
            page.fill("#send-text", "hello from the browser")
            page.click("#send-submit")
            expect(page.locator("#send-result")).to_have_text(re.compile(r"^sent · 3EB0[0-9A-F]+$"), timeout=15_000)
            status, history = api(url, admin, "GET", "/v1/sessions/web/messages")
            assert status == 200 and history["items"][0]["text"] == "hello from the browser", history
            print("message sent:", page.locator("#send-result").inner_text())

            # An API key limited to this session: shown once, works, then revoked.
            page.fill("#key-name", "crm")
            page.fill("#key-sessions", "web")
            page.click("#key-create")
            expect(page.locator("#new-key-box")).to_be_visible()
            raw = page.locator("#new-key").inner_text()
            assert raw.startswith("wak_"), raw
            row = page.locator("#keys tbody tr", has_text="crm")
            expect(row).to_contain_text("send+read on web")
            expect(row).not_to_contain_text(raw[4:])
            assert api(url, raw, "GET", "/v1/sessions/web")[0] == 200
            row.locator("button.revoke").click()
            expect(row).to_contain_text("revoked", timeout=10_000)
            status, body = api(url, raw, "GET", "/v1/sessions/web")
            assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", (status, body)
            print("API key created, used and revoked")

            # After a reload the raw key is gone from the page.
            page.reload()
            expect(page.locator("#new-key-box")).to_be_hidden()
            assert raw not in page.content()
            context.close()
        if errors:
            raise SystemExit(f"the page logged errors: {errors}")
        print("web page test passed")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    run(sys.argv[1])
