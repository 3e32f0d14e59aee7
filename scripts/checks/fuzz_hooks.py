"""Schemathesis hooks for scripts/checks/fuzz_api.py (loaded through SCHEMATHESIS_HOOKS).

Random path values almost always answer 404 or 422, which never reaches the code behind
them. So half of the generated cases get a name or id that exists (sessions, a message, a
key, a webhook, a delivery, listed by the driver in FUZZ_KNOWN as JSON), and cases that
would change the fixtures beyond use are kept within bounds:

- valid names of new sessions (createSession, compat init) are drawn from a small pool, so
  the fuzzer cannot start hundreds of session processes;
- operations that delete, log out or disconnect keep their generated (unknown) names, so
  the connected session stays connected for the send routes;
- a simulated network drop on a known session lasts at most a second.

A component that schemathesis generated as invalid (a negative case) is never changed: the
check `negative_data_rejection` expects exactly that invalid value to be refused.
"""

from __future__ import annotations

import json
import os
import random
import re

import schemathesis
from schemathesis.core.parameters import ParameterLocation

KNOWN = json.loads(os.environ.get("FUZZ_KNOWN", "{}"))
SESSION_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$")
# Deterministic for a given --seed of the driver.
RNG = random.Random(int(os.environ.get("FUZZ_SEED", "0")))

# Operations whose path names must not hit the fixtures.
DESTRUCTIVE = {"deleteSession", "logoutSession", "revokeKey", "deleteWebhook"}


def _operation_id(case) -> str:
    return case.operation.definition.raw.get("operationId", "")


def _negative(case, location) -> bool:
    meta = case.meta
    return meta is not None and meta.is_negative_at(location)


@schemathesis.hook
def map_case(context, case):
    op = _operation_id(case)
    params = case.path_parameters or {}
    if op not in DESTRUCTIVE and params and not _negative(case, ParameterLocation.PATH) and RNG.random() < 0.5:
        for name in list(params):
            if name in ("name", "sessionId"):
                params[name] = RNG.choice(KNOWN["sessions"])
            elif name == "id":
                if op == "getMessage":
                    params[name] = KNOWN["message"]
                elif op == "getKey":
                    params[name] = KNOWN["key"]
                elif "ebhook" in op or op in ("listDeliveries", "redeliver"):
                    params[name] = KNOWN["webhook"]
                    params["name"] = KNOWN["webhook_session"]
            elif name == "deliveryId":
                params[name] = KNOWN["delivery"]
    body = case.body
    if isinstance(body, dict) and not _negative(case, ParameterLocation.BODY):
        if op == "createSession" and isinstance(body.get("name"), str) and SESSION_NAME.match(body["name"]):
            body["name"] = RNG.choice(KNOWN["pool"])
            # No whatsapp-engine sessions (the default engine): they would try to reach
            # WhatsApp's servers, and their calls wait for it.
            if body.get("engine") in (None, "whatsapp"):
                body["engine"] = "sandbox"
        if op == "compatInitSession" and isinstance(body.get("sessionId"), str) and SESSION_NAME.match(body["sessionId"]):
            body["sessionId"] = RNG.choice(KNOWN["pool"])
            if body.get("engine") in (None, "whatsapp"):
                body["engine"] = "sandbox"
        if op == "sandboxDisconnect" and isinstance(body.get("seconds"), int) and params.get("name") in KNOWN["sessions"]:
            body["seconds"] = min(body["seconds"], 1)
        if op == "compatDisconnectSession" and body.get("sessionId") in KNOWN["sessions"]:
            body["sessionId"] = RNG.choice(KNOWN["pool"])
    return case
