-- The gateway's store (PostgreSQL). Times are Unix milliseconds (BIGINT) so the SQL is the
-- same on SQLite and PostgreSQL; the migrations differ only where the dialects do.

-- API keys: only the SHA-256 of the raw key is kept.
CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    key_hash     TEXT NOT NULL UNIQUE,
    admin        BOOLEAN NOT NULL,
    permissions  TEXT NOT NULL,          -- JSON array: send, read, manage
    sessions     TEXT NOT NULL,          -- JSON array of session names (empty for admin keys)
    created_at   BIGINT NOT NULL,
    revoked_at   BIGINT
);

-- Sessions supervised in local mode (Kubernetes mode keeps them as WhatsAppSession objects).
CREATE TABLE local_sessions (
    name             TEXT PRIMARY KEY,
    engine           TEXT NOT NULL,
    phone_number     TEXT,
    rate_per_minute  BIGINT NOT NULL,
    rate_burst       BIGINT NOT NULL,
    pod_token        TEXT NOT NULL,
    created_at       BIGINT NOT NULL
);

-- Every message, both directions. Outbound rows are the send outbox too: a row with
-- next_attempt_at set still has to reach its pod.
CREATE TABLE messages (
    id               TEXT PRIMARY KEY,       -- UUIDv7: sorts by creation time
    session          TEXT NOT NULL,
    direction        TEXT NOT NULL,          -- outbound | inbound
    chat             TEXT NOT NULL,
    sender           TEXT,
    push_name        TEXT,
    kind             TEXT NOT NULL,
    body_text        TEXT,
    media_mimetype   TEXT,
    media_filename   TEXT,
    media_size       BIGINT,
    status           TEXT NOT NULL,
    status_rank      INTEGER NOT NULL,
    error_code       TEXT,
    error            TEXT,
    wa_id            TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    api_key_id       TEXT,
    mode             TEXT NOT NULL,          -- sync | async | inbound
    payload          TEXT,                   -- the send request, until the pod has it
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    lease_until      BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    sent_at          BIGINT
);
CREATE UNIQUE INDEX messages_idempotency ON messages (session, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE UNIQUE INDEX messages_wa_id ON messages (session, direction, wa_id) WHERE wa_id IS NOT NULL;
CREATE INDEX messages_history ON messages (session, id);
CREATE INDEX messages_chat ON messages (session, chat, id);
CREATE INDEX messages_outbox ON messages (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

-- Receipts that arrived before the send answer recorded the WhatsApp id.
CREATE TABLE early_receipts (
    session      TEXT NOT NULL,
    wa_id        TEXT NOT NULL,
    status       TEXT NOT NULL,
    status_rank  INTEGER NOT NULL,
    reason       TEXT,
    received_at  BIGINT NOT NULL,
    PRIMARY KEY (session, wa_id)
);

-- Event ids already applied: pods deliver at least once.
CREATE TABLE processed_events (
    id           TEXT PRIMARY KEY,
    session      TEXT NOT NULL,
    received_at  BIGINT NOT NULL
);
CREATE INDEX processed_events_age ON processed_events (received_at);

-- The last phase each session reported.
CREATE TABLE session_states (
    session      TEXT PRIMARY KEY,
    phase        TEXT NOT NULL,
    account_jid  TEXT,
    push_name    TEXT,
    reason       TEXT,
    updated_at   BIGINT NOT NULL
);

CREATE TABLE webhooks (
    id           TEXT PRIMARY KEY,
    session      TEXT NOT NULL,
    url          TEXT NOT NULL,
    events       TEXT NOT NULL,          -- JSON array; empty means all
    secret       TEXT NOT NULL,          -- needed to sign, so kept as given
    created_at   BIGINT NOT NULL
);
CREATE INDEX webhooks_session ON webhooks (session);

-- One row per (webhook, event): the delivery log and the delivery queue.
CREATE TABLE webhook_deliveries (
    id               TEXT PRIMARY KEY,
    webhook_id       TEXT NOT NULL,
    session          TEXT NOT NULL,
    event_id         TEXT NOT NULL,
    event_type       TEXT NOT NULL,
    url              TEXT NOT NULL,
    payload          TEXT NOT NULL,
    status           TEXT NOT NULL,      -- pending | delivered | dead
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  BIGINT,
    lease_until      BIGINT,
    last_status      INTEGER,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    delivered_at     BIGINT
);
CREATE UNIQUE INDEX webhook_deliveries_once ON webhook_deliveries (webhook_id, event_id);
CREATE INDEX webhook_deliveries_log ON webhook_deliveries (webhook_id, id);
CREATE INDEX webhook_deliveries_queue ON webhook_deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL;

-- One-time facts (e.g. that the first admin key was printed).
CREATE TABLE settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
