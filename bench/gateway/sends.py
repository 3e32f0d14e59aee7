#!/usr/bin/env python3
"""Sends N text messages through the gateway from C threads (one keep-alive connection each).

    sends.py <gateway url> <api key> <N> <C>

Used by bench/gateway/callgrind.sh; exits 1 when a send is not answered 201.
"""
import http.client
import sys
import threading
import urllib.parse

url, key, n, c = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
host = urllib.parse.urlparse(url)
body = b'{"to":"+15551234567","type":"text","text":"benchmark message"}'
headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
failures = []
lock = threading.Lock()
remaining = [n]


def worker():
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=600)
    while True:
        with lock:
            if remaining[0] == 0:
                return
            remaining[0] -= 1
        conn.request("POST", "/v1/sessions/bench/messages", body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 201:
            with lock:
                failures.append((resp.status, data[:200]))


threads = [threading.Thread(target=worker) for _ in range(c)]
for t in threads:
    t.start()
for t in threads:
    t.join()
if failures:
    print(f"{len(failures)} sends failed, first: {failures[0]}", file=sys.stderr)
    sys.exit(1)
