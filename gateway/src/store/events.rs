//! Applying the events pods deliver. One transaction per batch: an event id is recorded in
//! `processed_events` together with its effects (status update, inbound message, webhook
//! deliveries), so a redelivered event is recognised and changes nothing.

use wa_api::crd::{Account, WebhookEvent};
use wa_api::pod::{EventAck, EventBody, MessageStatus, PodEvent};

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

impl Store {
    /// Applies a batch of events from `session`'s pod. `targets` are the session's webhooks.
    pub async fn apply_events(
        &self,
        session: &str,
        namespace: Option<&str>,
        events: &[PodEvent],
        targets: &[WebhookTarget],
        now: i64,
    ) -> StoreResult<EventOutcome> {
        let mut out = EventOutcome {
            ack: EventAck { accepted: 0, duplicates: 0 },
            applied: Vec::new(),
            deliveries: 0,
            seen: Vec::new(),
        };
        let postgres = matches!(self, Store::Postgres(_));
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for event in events {
                let fresh = sqlx::query(
                    "INSERT INTO processed_events (id, session, received_at) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(&event.id)
                .bind(session)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                    == 1;
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
                        if postgres {
                            sqlx::query(super::messages::WA_ID_LOCK).bind(&r.message_id).execute(&mut *tx).await?;
                        }
                        let row: Option<(String, i32)> = sqlx::query_as(
                            "SELECT id, status_rank FROM messages WHERE session = $1 AND direction = 'outbound' AND wa_id = $2",
                        )
                        .bind(session)
                        .bind(&r.message_id)
                        .fetch_optional(&mut *tx)
                        .await?;
                        match &row {
                            Some((id, current)) if *current < rank(r.status) => {
                                sqlx::query(
                                    "UPDATE messages SET status = $2, status_rank = $3,
                                        error = CASE WHEN $2 = 'failed' THEN COALESCE($4, error) ELSE error END,
                                        updated_at = $5
                                     WHERE id = $1 AND status_rank < $3",
                                )
                                .bind(id)
                                .bind(r.status.as_str())
                                .bind(rank(r.status))
                                .bind(&r.reason)
                                .bind(now)
                                .execute(&mut *tx)
                                .await?;
                            }
                            // Not news: the message is already that far.
                            Some(_) => {}
                            // A "sent" receipt ahead of the send answer says nothing the answer
                            // will not record itself.
                            None if r.status == MessageStatus::Sent => {}
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
                            }
                        }
                        let message_id = row.map(|(id, _)| id);
                        payload = Some((WebhookEvent::Receipt, webhook_payload(event, namespace, message_id.as_deref())));
                        out.applied.push(AppliedEvent::Receipt { message_id, status: r.status });
                    }
                }
                if let Some((kind, payload)) = payload {
                    let body = serde_json::to_string(&payload).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                    for target in targets.iter().filter(|t| t.wants(kind)) {
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
            tx.commit().await?;
        });
        Ok(out)
    }

    /// Rows in `early_receipts` (for tests and diagnostics).
    pub async fn early_receipt_count(&self) -> StoreResult<i64> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as("SELECT COUNT(*) FROM early_receipts")
            .fetch_one(pool)
            .await)?;
        Ok(n)
    }
}

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
        let first = store.apply_events("s", None, &batch, &targets(), 1000).await.unwrap();
        assert_eq!(first.ack, EventAck { accepted: 3, duplicates: 0 });
        // state → w-all; message → w-all + w-msg; receipt → w-all.
        assert_eq!(first.deliveries, 4);
        let again = store.apply_events("s", None, &batch, &targets(), 2000).await.unwrap();
        assert_eq!(again.ack, EventAck { accepted: 0, duplicates: 3 });
        assert_eq!(again.deliveries, 0);
        assert!(again.applied.is_empty());
        // The same WhatsApp message under a new event id is stored once and not re-announced.
        let renamed = store.apply_events("s", None, &[event("e4", inbound("IN1"))], &targets(), 3000).await.unwrap();
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
        store.apply_events("s", None, &[newer], &[], 1).await.unwrap();
        store.apply_events("s", None, &[older], &[], 2).await.unwrap();
        assert_eq!(store.session_states().await.unwrap()[0].phase, "Connected");
    });
}
