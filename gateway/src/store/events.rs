//! Applying the events pods deliver. One transaction per batch: an event id is recorded in
//! `processed_events` together with its effects (status update, inbound message, webhook
//! deliveries), so a redelivered event is recognised and changes nothing.

use wa_api::crd::{Account, WebhookEvent};
use wa_api::pod::{EventAck, EventBody, MessageStatus, PodEvent};

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::group_commit::Atomic;
use super::{Store, StoreResult, on_pool};
use crate::model::{WebhookPayload, webhook_payload};
use crate::util::new_id;

/// A webhook that should receive this session's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTarget {
    pub id: String,
    pub url: String,
    /// Empty means every event type.
    pub events: Vec<WebhookEvent>,
}

impl WebhookTarget {
    pub fn wants(&self, kind: WebhookEvent) -> bool {
        self.events.is_empty() || self.events.contains(&kind)
    }
}

/// What a newly applied event changed, for the caller's in-memory state and counters.
#[derive(Debug, Clone, PartialEq)]
pub enum AppliedEvent {
    State { phase: wa_api::Phase, account: Option<Account>, at: chrono::DateTime<chrono::Utc> },
    Inbound { message_id: String },
    /// `message_id` is the gateway's id of the message, when it is known yet.
    Receipt { message_id: Option<String>, status: MessageStatus },
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventOutcome {
    pub ack: EventAck,
    pub applied: Vec<AppliedEvent>,
    /// Webhook deliveries queued by this batch.
    pub deliveries: u32,
    /// Per event of the batch: its type and whether it was new (false: a duplicate).
    pub seen: Vec<(&'static str, bool)>,
}

fn rank(s: MessageStatus) -> i32 {
    i32::from(s.rank())
}

/// Statements that take a whole batch at once: the batch's values go in as one JSON parameter,
/// unpacked by the database (`json_each` on SQLite, `jsonb_*` on PostgreSQL), so a batch
/// costs a few round trips whatever its size instead of a few per event. A batch of one
/// uses the one-row statements (`ONE_*`): on SQLite the JSON forms build a temporary b-tree
/// per execution (RETURNING, `IN (SELECT …)`), which costs more than they save for one row
/// (measured with `bench/gateway/callgrind.sh`, BENCHMARKS.md).
mod batch_sql {
    pub const DEDUP_ONE: &str = "INSERT INTO processed_events (id, session, received_at) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO NOTHING";
    pub const MESSAGE_ONE: &str = "SELECT wa_id, id, status_rank FROM messages
         WHERE session = $1 AND direction = 'outbound' AND wa_id = $2";
    pub const ADVANCE_ONE: &str = "UPDATE messages SET status = $2, status_rank = $3,
            error = COALESCE($4, error), updated_at = $5
         WHERE id = $1 AND status_rank < $3";

    /// Records the batch's event ids; returns the ones not seen before. `$1`: JSON array of ids.
    /// (SQLite: `OR IGNORE` rather than `ON CONFLICT DO NOTHING`, and in the update below,
    /// because a multi-row statement that cannot abort needs no statement journal; with one,
    /// SQLite copies every page it touches first, which cost more than the batching saved.)
    pub const DEDUP_SQLITE: &str = "INSERT OR IGNORE INTO processed_events (id, session, received_at)
         SELECT value, $2, $3 FROM json_each($1) RETURNING id";
    pub const DEDUP_PG: &str = "INSERT INTO processed_events (id, session, received_at)
         SELECT t.id, $2, $3 FROM jsonb_array_elements_text($1::jsonb) AS t(id)
         ON CONFLICT (id) DO NOTHING RETURNING id";

    /// The outbound messages the receipts are about. `$2`: JSON array of WhatsApp ids.
    pub const MESSAGES_SQLITE: &str = "SELECT wa_id, id, status_rank FROM messages
         WHERE session = $1 AND direction = 'outbound' AND wa_id IN (SELECT value FROM json_each($2))";
    pub const MESSAGES_PG: &str = "SELECT wa_id, id, status_rank FROM messages
         WHERE session = $1 AND direction = 'outbound'
           AND wa_id = ANY (ARRAY(SELECT jsonb_array_elements_text($2::jsonb)))";

    /// PostgreSQL: the per-WhatsApp-id locks (`WA_ID_LOCK`) of every receipt of the batch, in
    /// one order (by hash), so two transactions locking overlapping sets cannot deadlock.
    pub const LOCK_PG: &str = "SELECT pg_advisory_xact_lock(h) FROM
         (SELECT DISTINCT hashtextextended(t.w, 0) AS h FROM jsonb_array_elements_text($1::jsonb) AS t(w)
          ORDER BY h OFFSET 0) AS locks";

    /// Moves messages forward. `$1`: JSON array of {id, status, rank, error}; `error` is the
    /// reason of a `failed` receipt, null otherwise.
    pub const ADVANCE_SQLITE: &str = "UPDATE OR IGNORE messages SET status = u.status, status_rank = u.rank,
            error = COALESCE(u.error, messages.error), updated_at = $2
         FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.status') AS status,
                      json_extract(value, '$.rank') AS rank, json_extract(value, '$.error') AS error
               FROM json_each($1)) AS u
         WHERE messages.id = u.id AND messages.status_rank < u.rank";
    pub const ADVANCE_PG: &str = "UPDATE messages SET status = u.status, status_rank = u.rank,
            error = COALESCE(u.error, messages.error), updated_at = $2
         FROM jsonb_to_recordset($1::jsonb) AS u(id text, status text, rank int, error text)
         WHERE messages.id = u.id AND messages.status_rank < u.rank";
}

/// Where a receipt moves a message: the highest status the batch's receipts reach.
#[derive(Debug, serde::Serialize)]
struct Advance<'a> {
    id: String,
    status: &'static str,
    rank: i32,
    error: Option<&'a str>,
}

fn encode(e: serde_json::Error) -> sqlx::Error {
    sqlx::Error::Encode(Box::new(e))
}

impl Store {
    /// Applies a batch of events from `session`'s pod. `targets` are the session's webhooks.
    ///
    /// Receipts, the bulk of the traffic (three per send), are applied with one statement
    /// each for the whole batch: record the event ids, read the messages they name, move the
    /// messages forward. The result is what applying the events one by one in order gives.
    pub async fn apply_events(
        &self,
        session: &str,
        namespace: Option<&str>,
        events: Vec<PodEvent>,
        targets: Vec<WebhookTarget>,
        now: i64,
    ) -> StoreResult<EventOutcome> {
        match self {
            Store::Sqlite(_, writes) => {
                let batch = (session.to_owned(), namespace.map(str::to_owned), events, targets, now);
                writes
                    .write(Atomic::Yes, batch, |(session, namespace, events, targets, now), conn| {
                        Box::pin(apply_sqlite(conn, session, namespace.as_deref(), events, targets, *now))
                    })
                    .await
            }
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                let out = apply_postgres(&mut tx, session, namespace, &events, &targets, now).await?;
                tx.commit().await?;
                Ok(out)
            }
        }
    }

    /// Rows in `early_receipts` (for tests and diagnostics).
    pub async fn early_receipt_count(&self) -> StoreResult<i64> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as("SELECT COUNT(*) FROM early_receipts")
            .fetch_one(pool)
            .await)?;
        Ok(n)
    }
}

/// The statements of `apply_events`, written once and expanded for each connection type; the
/// caller holds the transaction.
macro_rules! apply_on {
    ($name:ident, $conn:ty, $postgres:expr) => {
        async fn $name(
            tx: &mut $conn,
            session: &str,
            namespace: Option<&str>,
            events: &[PodEvent],
            targets: &[WebhookTarget],
            now: i64,
        ) -> StoreResult<EventOutcome> {
            let postgres = $postgres;
            let mut out = EventOutcome {
                ack: EventAck { accepted: 0, duplicates: 0 },
                applied: Vec::with_capacity(events.len()),
                deliveries: 0,
                seen: Vec::with_capacity(events.len()),
            };
            let fresh: Vec<bool> = if let [event] = events {
                let done = sqlx::query(batch_sql::DEDUP_ONE)
                    .bind(&event.id)
                    .bind(session)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                vec![done == 1]
            } else {
                let ids = serde_json::to_string(&events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>()).map_err(encode)?;
                let new_ids: Vec<(String,)> = sqlx::query_as(if postgres { batch_sql::DEDUP_PG } else { batch_sql::DEDUP_SQLITE })
                    .bind(&ids)
                    .bind(session)
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?;
                let mut new_ids: HashSet<String> = new_ids.into_iter().map(|(id,)| id).collect();
                // An id twice in one batch: the first one is new, the second a duplicate.
                events.iter().map(|e| new_ids.remove(&e.id)).collect()
            };

            // The messages this batch's new receipts are about: WhatsApp id → (id, rank).
            let wa_ids: BTreeSet<&str> = events
                .iter()
                .zip(&fresh)
                .filter_map(|(e, fresh)| match &e.body {
                    EventBody::Receipt(r) if *fresh => Some(r.message_id.as_str()),
                    _ => None,
                })
                .collect();
            let mut known: HashMap<String, (String, i32)> = HashMap::new();
            if wa_ids.len() == 1 {
                let wa_id = wa_ids.first().copied().unwrap_or_default();
                if postgres {
                    sqlx::query(super::messages::WA_ID_LOCK).bind(wa_id).execute(&mut *tx).await?;
                }
                let rows: Vec<(String, String, i32)> =
                    sqlx::query_as(batch_sql::MESSAGE_ONE).bind(session).bind(wa_id).fetch_all(&mut *tx).await?;
                known = rows.into_iter().map(|(wa_id, id, rank)| (wa_id, (id, rank))).collect();
            } else if !wa_ids.is_empty() {
                let wa_ids = serde_json::to_string(&wa_ids).map_err(encode)?;
                if postgres {
                    sqlx::query(batch_sql::LOCK_PG).bind(&wa_ids).execute(&mut *tx).await?;
                }
                let rows: Vec<(String, String, i32)> =
                    sqlx::query_as(if postgres { batch_sql::MESSAGES_PG } else { batch_sql::MESSAGES_SQLITE })
                        .bind(session)
                        .bind(&wa_ids)
                        .fetch_all(&mut *tx)
                        .await?;
                known = rows.into_iter().map(|(wa_id, id, rank)| (wa_id, (id, rank))).collect();
            }
            let mut advances: BTreeMap<String, Advance<'_>> = BTreeMap::new();

            for (event, fresh) in events.iter().zip(fresh) {
                out.seen.push((event_kind(&event.body), fresh));
                if !fresh {
                    out.ack.duplicates += 1;
                    continue;
                }
                out.ack.accepted += 1;
                let occurred = event.occurred_at.timestamp_millis();
                // The webhook payload, when this event changed something worth telling.
                let mut payload: Option<(WebhookEvent, WebhookPayload)> = None;
                match &event.body {
                    EventBody::State { phase, account, reason } => {
                        sqlx::query(
                            "INSERT INTO session_states (session, phase, account_jid, push_name, reason, updated_at)
                             VALUES ($1, $2, $3, $4, $5, $6)
                             ON CONFLICT (session) DO UPDATE SET phase = excluded.phase,
                                account_jid = excluded.account_jid, push_name = excluded.push_name,
                                reason = excluded.reason, updated_at = excluded.updated_at
                             WHERE session_states.updated_at <= excluded.updated_at",
                        )
                        .bind(session)
                        .bind(phase.as_str())
                        .bind(account.as_ref().map(|a| a.jid.clone()))
                        .bind(account.as_ref().and_then(|a| a.push_name.clone()))
                        .bind(reason)
                        .bind(occurred)
                        .execute(&mut *tx)
                        .await?;
                        out.applied.push(AppliedEvent::State { phase: *phase, account: account.clone(), at: event.occurred_at });
                        payload = Some((WebhookEvent::State, webhook_payload(event, namespace, None)));
                    }
                    EventBody::Message(m) => {
                        let id = new_id();
                        let (mimetype, filename, size) = match &m.media {
                            Some(media) => (Some(media.mimetype.clone()), media.filename.clone(), Some(media.size as i64)),
                            None => (None, None, None),
                        };
                        let inserted = sqlx::query(
                            "INSERT INTO messages (id, session, direction, chat, sender, push_name, kind, body_text,
                                media_mimetype, media_filename, media_size, status, status_rank, wa_id, mode,
                                attempts, created_at, updated_at, sent_at)
                             VALUES ($1, $2, 'inbound', $3, $4, $5, $6, $7, $8, $9, $10, 'received', 0, $11,
                                'inbound', 0, $12, $12, $13)
                             ON CONFLICT (session, direction, wa_id) WHERE wa_id IS NOT NULL DO NOTHING",
                        )
                        .bind(&id)
                        .bind(session)
                        .bind(&m.chat)
                        .bind(&m.from)
                        .bind(&m.push_name)
                        .bind(m.message_type.as_str())
                        .bind(m.text.clone().or_else(|| m.caption.clone()))
                        .bind(mimetype)
                        .bind(filename)
                        .bind(size)
                        .bind(&m.message_id)
                        .bind(now)
                        .bind(m.timestamp.timestamp_millis())
                        .execute(&mut *tx)
                        .await?
                        .rows_affected()
                            == 1;
                        // The same WhatsApp message under a new event id is not news.
                        if inserted {
                            out.applied.push(AppliedEvent::Inbound { message_id: id.clone() });
                            payload = Some((WebhookEvent::Message, webhook_payload(event, namespace, Some(&id))));
                        }
                    }
                    EventBody::Receipt(r) => {
                        let message_id = match known.get_mut(&r.message_id) {
                            Some((id, current)) => {
                                if *current < rank(r.status) {
                                    // Applied in order: later receipts compare with this one.
                                    *current = rank(r.status);
                                    let advance = advances.entry(id.clone()).or_insert_with(|| Advance {
                                        id: id.clone(),
                                        status: r.status.as_str(),
                                        rank: 0,
                                        error: None,
                                    });
                                    advance.status = r.status.as_str();
                                    advance.rank = rank(r.status);
                                    if r.status == MessageStatus::Failed && r.reason.is_some() {
                                        advance.error = r.reason.as_deref();
                                    }
                                }
                                // Otherwise not news: the message is already that far.
                                Some(id.clone())
                            }
                            // A "sent" receipt ahead of the send answer says nothing the answer
                            // will not record itself.
                            None if r.status == MessageStatus::Sent => None,
                            None => {
                                // The send answer has not recorded the WhatsApp id yet: keep the
                                // highest status until it does.
                                sqlx::query(
                                    "INSERT INTO early_receipts (session, wa_id, status, status_rank, reason, received_at)
                                     VALUES ($1, $2, $3, $4, $5, $6)
                                     ON CONFLICT (session, wa_id) DO UPDATE SET status = excluded.status,
                                        status_rank = excluded.status_rank, reason = excluded.reason
                                     WHERE early_receipts.status_rank < excluded.status_rank",
                                )
                                .bind(session)
                                .bind(&r.message_id)
                                .bind(r.status.as_str())
                                .bind(rank(r.status))
                                .bind(&r.reason)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                                None
                            }
                        };
                        payload = Some((WebhookEvent::Receipt, webhook_payload(event, namespace, message_id.as_deref())));
                        out.applied.push(AppliedEvent::Receipt { message_id, status: r.status });
                    }
                }
                if let Some((kind, payload)) = payload {
                    let wanted: Vec<&WebhookTarget> = targets.iter().filter(|t| t.wants(kind)).collect();
                    if wanted.is_empty() {
                        continue;
                    }
                    let body = serde_json::to_string(&payload).map_err(encode)?;
                    for target in wanted {
                        let queued = sqlx::query(
                            "INSERT INTO webhook_deliveries (id, webhook_id, session, event_id, event_type, url,
                                payload, status, attempts, next_attempt_at, created_at, updated_at)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, $8, $8)
                             ON CONFLICT (webhook_id, event_id) DO NOTHING",
                        )
                        .bind(new_id())
                        .bind(&target.id)
                        .bind(session)
                        .bind(&event.id)
                        .bind(kind_str(kind))
                        .bind(&target.url)
                        .bind(&body)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                        out.deliveries += queued as u32;
                    }
                }
            }
            if let (1, Some(a)) = (advances.len(), advances.values().next()) {
                sqlx::query(batch_sql::ADVANCE_ONE)
                    .bind(&a.id)
                    .bind(a.status)
                    .bind(a.rank)
                    .bind(a.error)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            } else if !advances.is_empty() {
                let advances: Vec<&Advance<'_>> = advances.values().collect();
                let advances = serde_json::to_string(&advances).map_err(encode)?;
                sqlx::query(if postgres { batch_sql::ADVANCE_PG } else { batch_sql::ADVANCE_SQLITE })
                    .bind(&advances)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            Ok(out)
        }
    };
}
apply_on!(apply_sqlite, sqlx::SqliteConnection, false);
apply_on!(apply_postgres, sqlx::PgConnection, true);

fn event_kind(body: &EventBody) -> &'static str {
    match body {
        EventBody::State { .. } => "state",
        EventBody::Message(_) => "message",
        EventBody::Receipt(_) => "receipt",
    }
}

pub fn kind_str(kind: WebhookEvent) -> &'static str {
    match kind {
        WebhookEvent::Message => "message",
        WebhookEvent::Receipt => "receipt",
        WebhookEvent::State => "state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::both;
    use chrono::Utc;
    use wa_api::Phase;
    use wa_api::pod::{InboundMessage, MessageKind, Receipt};

    fn event(id: &str, body: EventBody) -> PodEvent {
        PodEvent { id: id.into(), session: "s".into(), namespace: None, occurred_at: Utc::now(), body }
    }

    fn inbound(wa_id: &str) -> EventBody {
        EventBody::Message(InboundMessage {
            message_id: wa_id.into(),
            from: "15550001111@s.whatsapp.net".into(),
            chat: "15550001111@s.whatsapp.net".into(),
            push_name: Some("Ann".into()),
            message_type: MessageKind::Text,
            text: Some("hello".into()),
            caption: None,
            media: None,
            timestamp: Utc::now(),
        })
    }

    fn targets() -> Vec<WebhookTarget> {
        vec![
            WebhookTarget { id: "w-all".into(), url: "http://127.0.0.1:1/all".into(), events: vec![] },
            WebhookTarget { id: "w-msg".into(), url: "http://127.0.0.1:1/msg".into(), events: vec![WebhookEvent::Message] },
        ]
    }

    both!(events_are_applied_once, |store| {
        let batch = vec![
            event("e1", EventBody::State { phase: Phase::Connected, account: None, reason: None }),
            event("e2", inbound("IN1")),
            event("e3", EventBody::Receipt(Receipt {
                message_id: "WA-unknown".into(),
                chat: "1@s.whatsapp.net".into(),
                status: MessageStatus::Delivered,
                reason: None,
            })),
        ];
        let first = store.apply_events("s", None, batch.clone(), targets(), 1000).await.unwrap();
        assert_eq!(first.ack, EventAck { accepted: 3, duplicates: 0 });
        // state → w-all; message → w-all + w-msg; receipt → w-all.
        assert_eq!(first.deliveries, 4);
        let again = store.apply_events("s", None, batch.clone(), targets(), 2000).await.unwrap();
        assert_eq!(again.ack, EventAck { accepted: 0, duplicates: 3 });
        assert_eq!(again.deliveries, 0);
        assert!(again.applied.is_empty());
        // The same WhatsApp message under a new event id is stored once and not re-announced.
        let renamed = store.apply_events("s", None, vec![event("e4", inbound("IN1"))], targets(), 3000).await.unwrap();
        assert_eq!(renamed.ack.accepted, 1);
        assert_eq!(renamed.deliveries, 0);
        let history = store
            .history("s", &crate::store::HistoryFilter { limit: 10, ..Default::default() })
            .await
            .unwrap();
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].direction, "inbound");
        assert_eq!(history[0].body_text.as_deref(), Some("hello"));
        assert_eq!(store.early_receipt_count().await.unwrap(), 1);
        let states = store.session_states().await.unwrap();
        assert_eq!(states[0].phase, "Connected");
    });

    both!(older_state_does_not_overwrite_newer, |store| {
        let mut newer = event("n", EventBody::State { phase: Phase::Connected, account: None, reason: None });
        let mut older = event("o", EventBody::State { phase: Phase::AwaitingScan, account: None, reason: None });
        newer.occurred_at = "2026-01-01T00:00:10Z".parse().unwrap();
        older.occurred_at = "2026-01-01T00:00:05Z".parse().unwrap();
        store.apply_events("s", None, vec![newer], vec![], 1).await.unwrap();
        store.apply_events("s", None, vec![older], vec![], 2).await.unwrap();
        assert_eq!(store.session_states().await.unwrap()[0].phase, "Connected");
    });
}
