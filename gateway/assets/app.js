// The wa-operator web page: plain JavaScript against the gateway's /v1 API.
// The API key lives in this browser's localStorage only.
"use strict";

const $ = (id) => document.getElementById(id);
let selected = null;        // name of the session shown in the session panel
let qrUrl = null;           // object URL of the QR image shown
let refreshing = false;

function key() {
  return localStorage.getItem("wa-key") || "";
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
}

async function api(method, path, body, accept) {
  const headers = { "Authorization": "Bearer " + key() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (accept) headers["Accept"] = accept;
  const resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try {
      const err = await resp.json();
      if (err && err.error) message = err.error.code + ": " + err.error.message;
    } catch (_) { /* not JSON */ }
    const e = new Error(message);
    e.status = resp.status;
    throw e;
  }
  return resp;
}

async function json(method, path, body) {
  const resp = await api(method, path, body);
  return resp.status === 204 ? null : resp.json();
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  return td;
}

async function refreshSessions() {
  const list = await json("GET", "/v1/sessions");
  const body = $("sessions").querySelector("tbody");
  body.replaceChildren();
  for (const s of list.items) {
    const tr = document.createElement("tr");
    tr.dataset.session = s.name;
    if (s.name === selected) tr.classList.add("selected");
    tr.append(cell(s.name), cell(s.engine), cell(s.phase), cell(s.account ? s.account.jid : ""));
    tr.addEventListener("click", () => select(s.name));
    body.append(tr);
  }
  $("no-sessions").hidden = list.items.length > 0;
  if (selected) {
    const s = list.items.find((x) => x.name === selected);
    if (s) await showSession(s); else select(null);
  }
}

async function showSession(s) {
  $("session-panel").hidden = false;
  $("session-name").textContent = s.name;
  $("session-phase").textContent = s.phase;
  $("session-account").textContent = s.account ? s.account.jid : "";
  const pairing = s.phase === "AwaitingScan";
  $("pairing").hidden = !pairing;
  $("scan-button").hidden = !(pairing && s.engine === "sandbox");
  $("pair-code").textContent = s.pairCode || "";
  if (pairing && s.ready) {
    await refreshQr(s.name);
  } else {
    clearQr();
  }
}

async function refreshQr(name) {
  try {
    const resp = await api("GET", "/v1/sessions/" + encodeURIComponent(name) + "/qr", undefined, "image/png");
    const blob = await resp.blob();
    const url = URL.createObjectURL(blob);
    $("qr-img").src = url;
    $("qr-img").hidden = false;
    $("qr-wait").hidden = true;
    if (qrUrl) URL.revokeObjectURL(qrUrl);
    qrUrl = url;
  } catch (e) {
    // Between two codes, or a pair code is shown instead.
    $("qr-wait").hidden = false;
  }
}

function clearQr() {
  $("qr-img").hidden = true;
  $("qr-img").removeAttribute("src");
  if (qrUrl) URL.revokeObjectURL(qrUrl);
  qrUrl = null;
}

function select(name) {
  selected = name;
  $("send-result").textContent = "";
  $("pair-code").textContent = "";
  if (!name) {
    $("session-panel").hidden = true;
    clearQr();
  }
  refresh();
}

async function refreshKeys() {
  let list;
  try {
    list = await json("GET", "/v1/keys");
  } catch (e) {
    if (e.status === 403) { $("keys-panel").hidden = true; return; }
    throw e;
  }
  $("keys-panel").hidden = false;
  const body = $("keys").querySelector("tbody");
  body.replaceChildren();
  for (const k of list.items) {
    const tr = document.createElement("tr");
    tr.dataset.key = k.id;
    const scope = k.admin ? "admin" : k.permissions.join("+") + " on " + k.sessions.join(", ");
    tr.append(cell(k.name), cell(k.prefix + "…"), cell(scope), cell(k.revokedAt ? "revoked" : "active"));
    const td = document.createElement("td");
    if (!k.revokedAt) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "danger revoke";
      b.textContent = "Revoke";
      b.addEventListener("click", () => guarded(async () => {
        await json("DELETE", "/v1/keys/" + encodeURIComponent(k.id));
        await refreshKeys();
      }));
      td.append(b);
    }
    tr.append(td);
    body.append(tr);
  }
}

async function refresh() {
  if (!key() || refreshing) return;
  refreshing = true;
  try {
    await refreshSessions();
    showError("");
  } catch (e) {
    showError(e.message);
  } finally {
    refreshing = false;
  }
}

async function guarded(fn) {
  try {
    await fn();
    showError("");
  } catch (e) {
    showError(e.message);
  }
}

function wire() {
  $("key-input").value = key();
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem("wa-key", $("key-input").value.trim());
    guarded(async () => {
      await refreshSessions();
      await refreshKeys();
      $("key-status").textContent = "key accepted";
    });
  });

  $("create-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded(async () => {
      const body = { name: $("create-name").value.trim(), engine: $("create-engine").value };
      const phone = $("create-phone").value.trim();
      if (phone) body.phoneNumber = phone;
      const s = await json("POST", "/v1/sessions", body);
      $("create-name").value = "";
      selected = s.name;
      await refreshSessions();
    });
  });

  $("scan-button").addEventListener("click", () => guarded(async () => {
    await json("POST", "/v1/sessions/" + encodeURIComponent(selected) + "/sandbox/scan", {});
    await refreshSessions();
  }));

  $("pair-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded(async () => {
      const r = await json("POST", "/v1/sessions/" + encodeURIComponent(selected) + "/pair-code",
        { phoneNumber: $("pair-phone").value.trim() });
      $("pair-code").textContent = r.code;
    });
  });

  $("send-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded(async () => {
      $("send-result").textContent = "sending…";
      try {
        const m = await json("POST", "/v1/sessions/" + encodeURIComponent(selected) + "/messages",
          { to: $("send-to").value.trim(), type: "text", text: $("send-text").value });
        $("send-result").textContent = m.status + " · " + (m.waMessageId || m.id);
      } catch (e) {
        $("send-result").textContent = "";
        throw e;
      }
    });
  });

  for (const [id, path] of [["restart-button", "restart"], ["logout-button", "logout"]]) {
    $(id).addEventListener("click", () => guarded(async () => {
      await json("POST", "/v1/sessions/" + encodeURIComponent(selected) + "/" + path);
      await refreshSessions();
    }));
  }
  $("delete-button").addEventListener("click", () => guarded(async () => {
    if (!confirm("Delete session " + selected + "?")) return;
    await json("DELETE", "/v1/sessions/" + encodeURIComponent(selected));
    select(null);
  }));

  $("key-admin").addEventListener("change", () => {
    $("key-scope").disabled = $("key-admin").checked;
  });
  $("new-key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guarded(async () => {
      const body = { name: $("key-name").value.trim(), admin: $("key-admin").checked };
      if (!body.admin) {
        body.permissions = ["send", "read", "manage"].filter((p) => $("key-perm-" + p).checked);
        body.sessions = $("key-sessions").value.split(",").map((s) => s.trim()).filter(Boolean);
      }
      const k = await json("POST", "/v1/keys", body);
      $("new-key").textContent = k.key;
      $("new-key-box").hidden = false;
      $("key-name").value = "";
      await refreshKeys();
    });
  });

  if (key()) {
    guarded(async () => { await refreshSessions(); await refreshKeys(); });
  }
  // The QR code rotates and the phase moves on by itself: keep the view fresh.
  setInterval(refresh, 1500);
}

document.addEventListener("DOMContentLoaded", wire);
