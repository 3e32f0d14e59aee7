//! Messages in both directions. An outbound row is recorded before its send is forwarded
//! and doubles as the outbox entry: while `next_attempt_at` is set the pod may not have it
//! yet, and whoever holds the lease (`lease_until` in the future) is forwarding it. A
//! gateway that dies mid-forward leaves an expired lease behind; the outbox then forwards
//! the row again with the same `Idempotency-Key` (the message id), so the pod sends it once.

use wa_api::pod::MessageStatus;

use super::group_commit::Atomic;
use super::{Store, StoreResult, on_pool};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct MessageRow {
    pub id: String,
    pub session: String,
    pub direction: String,
    pub chat: String,
    pub sender: Option<String>,
    pub push_name: Option<String>,
    pub kind: String,
    pub body_text: Option<String>,
    pub media_mimetype: Option<String>,
    pub media_filename: Option<String>,
    pub media_size: Option<i64>,
    pub status: String,
    pub status_rank: i32,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub wa_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub api_key_id: Option<String>,
    pub mode: String,
    pub attempts: i32,
    pub next_attempt_at: Option<i64>,
    pub lease_until: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub sent_at: Option<i64>,
}

pub(crate) const MESSAGE_COLUMNS: &str = "id, session, direction, chat, sender, push_name, kind, body_text, \
    media_mimetype, media_filename, media_size, status, status_rank, error_code, error, wa_id, \
    idempotency_key, request_hash, api_key_id, mode, attempts, next_attempt_at, lease_until, \
    created_at, updated_at, sent_at";

/// PostgreSQL: a transaction-scoped lock on one WhatsApp message id. Recording a send's
/// WhatsApp id and applying a receipt for that id take it, so one of them always sees the
/// other's result. (SQLite serializes writers anyway.)
pub(crate) const WA_ID_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// A send to record before it is forwarded.
#[derive(Debug, Clone)]
pub struct NewOutbound {
    pub id: String,
    pub session: String,
    pub chat: String,
    pub kind: String,
    pub body_text: Option<String>,
    pub media_mimetype: Option<String>,
    pub media_filename: Option<String>,
    pub media_size: Option<i64>,
    pub idempotency_key: Option<String>,
    pub request_hash: String,
    pub api_key_id: Option<String>,
    /// `sync` or `async`.
    pub mode: &'static str,
    /// The JSON send request, as forwarded to the pod.
    pub payload: String,
    /// When the outbox may take it: now for async sends; for sync sends the end of the
    /// lease the request holds (the outbox finishes it if this gateway dies mid-send).
    pub next_attempt_at: i64,
    pub lease_until: Option<i64>,
    pub now: i64,
}

impl NewOutbound {
    /// The row as `insert_outbound` writes it (so the answer to an async send needs no read).
    pub fn row(&self) -> MessageRow {
        MessageRow {
            id: self.id.clone(),
            session: self.session.clone(),
            direction: "outbound".into(),
            chat: self.chat.clone(),
            sender: None,
            push_name: None,
            kind: self.kind.clone(),
            body_text: self.body_text.clone(),
            media_mimetype: self.media_mimetype.clone(),
            media_filename: self.media_filename.clone(),
            media_size: self.media_size,
            status: "queued".into(),
            status_rank: 0,
            error_code: None,
            error: None,
            wa_id: None,
            idempotency_key: self.idempotency_key.clone(),
            request_hash: Some(self.request_hash.clone()),
            api_key_id: self.api_key_id.clone(),
            mode: self.mode.into(),
            attempts: i32::from(self.lease_until.is_some()),
            next_attempt_at: Some(self.next_attempt_at),
            lease_until: self.lease_until,
            created_at: self.now,
            updated_at: self.now,
            sent_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The `Idempotency-Key` was used before on this session: the first row.
    Existing(MessageRow),
}

/// A message row and whether an early receipt waits for it (`finish_send`).
#[derive(sqlx::FromRow)]
struct Recorded {
    #[sqlx(flatten)]
    row: MessageRow,
    early: bool,
}

/// How a forward ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// The pod took it: WhatsApp's id and the status it reported.
    Sent { wa_id: String, chat: String, status: MessageStatus, sent_at: i64 },
    /// It will not be sent.
    Failed { code: String, reason: String },
}

/// A message the outbox claimed; it holds the lease until `lease_until`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Claimed {
    pub id: String,
    pub session: String,
    pub payload: Option<String>,
    pub attempts: i32,
    pub created_at: i64,
    pub mode: String,
}

/// Filters of the history route; all optional.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub direction: Option<String>,
    pub chat: Option<String>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Only ids below this one (the previous page's last id).
    pub before_id: Option<String>,
    pub limit: i64,
}

/// The statement that records a send, bound for whichever database runs it.
macro_rules! insert_outbound_query {
    ($m:expr) => {
        sqlx::query(
            "INSERT INTO messages (id, session, direction, chat, kind, body_text, media_mimetype,
                media_filename, media_size, status, status_rank, idempotency_key, request_hash,
                api_key_id, mode, payload, attempts, next_attempt_at, lease_until, created_at, updated_at)
             VALUES ($1, $2, 'outbound', $3, $4, $5, $6, $7, $8, 'queued', 0, $9, $10, $11, $12, $13,
                $14, $15, $16, $17, $17)
             ON CONFLICT (session, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        )
        .bind(&$m.id)
        .bind(&$m.session)
        .bind(&$m.chat)
        .bind(&$m.kind)
        .bind(&$m.body_text)
        .bind(&$m.media_mimetype)
        .bind(&$m.media_filename)
        .bind($m.media_size)
        .bind(&$m.idempotency_key)
        .bind(&$m.request_hash)
        .bind(&$m.api_key_id)
        .bind($m.mode)
        .bind(&$m.payload)
        .bind(i32::from($m.lease_until.is_some()))
        .bind($m.next_attempt_at)
        .bind($m.lease_until)
        .bind($m.now)
    };
}

fn rank(s: MessageStatus) -> i32 {
    i32::from(s.rank())
}

impl Store {
    /// Records a send. With an `Idempotency-Key` already used on the session, nothing is
    /// written and the first row comes back.
    pub async fn insert_outbound(&self, m: NewOutbound) -> StoreResult<InsertOutcome> {
        // Only an `Idempotency-Key` already used can make the insert a no-op.
        let used_key = m.idempotency_key.clone().map(|key| (m.session.clone(), key));
        let done = match self {
            Store::Sqlite(_, writes) => {
                writes
                    .write(Atomic::No, m, |m, conn| {
                        Box::pin(async move { Ok(insert_outbound_query!(m).execute(conn).await?.rows_affected()) })
                    })
                    .await?
            }
            Store::Postgres(pool) => insert_outbound_query!(m).execute(pool).await?.rows_affected(),
        };
        if done == 1 {
            return Ok(InsertOutcome::Inserted);
        }
        let Some((session, key)) = used_key else {
            return Err(sqlx::Error::RowNotFound.into());
        };
        match self.message_by_idempotency_key(&session, &key).await? {
            Some(row) => Ok(InsertOutcome::Existing(row)),
            None => Err(sqlx::Error::RowNotFound.into()),
        }
    }

    pub async fn message_by_idempotency_key(&self, session: &str, key: &str) -> StoreResult<Option<MessageRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session = $1 AND idempotency_key = $2"
        )))
        .bind(session)
        .bind(key)
        .fetch_optional(pool)
        .await)?)
    }

    pub async fn message(&self, id: &str) -> StoreResult<Option<MessageRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(pool)
        .await)?)
    }

    /// Records how a forward ended and ends the row's time in the outbox. A receipt that
    /// raced ahead of the send answer is applied now. Returns the row as it is afterwards.
    pub async fn finish_send(&self, id: &str, outcome: &SendOutcome, now: i64) -> StoreResult<Option<MessageRow>> {
        match self {
            // Writers are serialized, so autocommit statements in this order are enough: a
            // receipt applied before the first finds no WhatsApp id and is kept as an early
            // receipt, which the first sees (`early`) and the next ones take; one applied after
            // it finds the id. (Only a crash between them can leave an early receipt behind.)
            Store::Sqlite(_, writes) => {
                writes
                    .write(Atomic::No, (id.to_owned(), outcome.clone(), now), |(id, outcome, now), conn| {
                        Box::pin(finish_sqlite(conn, id, outcome, *now))
                    })
                    .await
            }
            // Replicas write concurrently: one transaction, and a lock on the WhatsApp id that a
            // receipt for it takes too (see `apply_events`), so neither misses the other.
            Store::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                if let SendOutcome::Sent { wa_id, .. } = outcome {
                    sqlx::query(WA_ID_LOCK).bind(wa_id).execute(&mut *tx).await?;
                }
                let row = finish_postgres(&mut tx, id, outcome, now).await?;
                tx.commit().await?;
                Ok(row)
            }
        }
    }

    /// An async send could not be forwarded this time: back to the queue until `next_attempt_at`.
    pub async fn reschedule_send(&self, id: &str, next_attempt_at: i64, code: &str, reason: &str, now: i64) -> StoreResult<()> {
        on_pool!(self, pool => sqlx::query(
            "UPDATE messages SET next_attempt_at = $2, lease_until = NULL, error_code = $3, error = $4,
                updated_at = $5
             WHERE id = $1 AND status = 'queued'",
        )
        .bind(id)
        .bind(next_attempt_at)
        .bind(code)
        .bind(reason)
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// A client retries (same `Idempotency-Key`) a send that failed for a reason that may
    /// pass: the row goes back to `queued`, leased to this request. False when another
    /// request got there first.
    pub async fn retry_failed_send(&self, id: &str, payload: &str, lease_until: i64, now: i64) -> StoreResult<bool> {
        let done = on_pool!(self, pool => sqlx::query(
            "UPDATE messages SET status = 'queued', status_rank = 0, error_code = NULL, error = NULL,
                payload = $2, attempts = attempts + 1, next_attempt_at = $3, lease_until = $3, updated_at = $4
             WHERE id = $1 AND status = 'failed' AND wa_id IS NULL",
        )
        .bind(id)
        .bind(payload)
        .bind(lease_until)
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    /// Takes up to `limit` sends that are due and not leased, leasing them until `lease_until`.
    pub async fn claim_due_sends(&self, now: i64, lease_until: i64, limit: i64) -> StoreResult<Vec<Claimed>> {
        // The inner SELECT picks the rows; on PostgreSQL it locks them and skips rows another
        // replica is claiming at this moment.
        const PICK: &str = "SELECT id FROM messages WHERE next_attempt_at <= $1
            AND (lease_until IS NULL OR lease_until < $1) ORDER BY next_attempt_at, id LIMIT $3";
        const UPDATE: &str = "UPDATE messages SET lease_until = $2, attempts = attempts + 1, updated_at = $1
            WHERE id IN ({pick}) RETURNING id, session, payload, attempts, created_at, mode";
        let mut rows = match self {
            Store::Sqlite(pool, _) => {
                sqlx::query_as::<_, Claimed>(sqlx::AssertSqlSafe(UPDATE.replace("{pick}", PICK)))
                    .bind(now)
                    .bind(lease_until)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
            Store::Postgres(pool) => {
                let pick = format!("{PICK} FOR UPDATE SKIP LOCKED");
                sqlx::query_as::<_, Claimed>(sqlx::AssertSqlSafe(UPDATE.replace("{pick}", &pick)))
                    .bind(now)
                    .bind(lease_until)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
        };
        // Forward in acceptance order (ids are UUIDv7).
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rows)
    }

    /// Drops every lease. Only for a single-replica (SQLite) gateway at start-up: any lease
    /// then belongs to a process that is gone.
    pub async fn release_all_send_leases(&self) -> StoreResult<u64> {
        let done = on_pool!(self, pool => sqlx::query(
            "UPDATE messages SET lease_until = NULL, next_attempt_at = CASE WHEN next_attempt_at > $1 THEN $1 ELSE next_attempt_at END
             WHERE lease_until IS NOT NULL AND next_attempt_at IS NOT NULL",
        )
        .bind(crate::util::now_ms())
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(done)
    }

    /// Sends not yet handed to a pod.
    pub async fn outbox_depth(&self) -> StoreResult<i64> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*) FROM messages WHERE next_attempt_at IS NOT NULL",
        )
        .fetch_one(pool)
        .await)?;
        Ok(n)
    }

    /// A page of a session's history, newest first.
    pub async fn history(&self, session: &str, f: &HistoryFilter) -> StoreResult<Vec<MessageRow>> {
        let sql = format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session = $1
               AND ($2 IS NULL OR direction = $2)
               AND ($3 IS NULL OR chat = $3)
               AND ($4 IS NULL OR created_at >= $4)
               AND ($5 IS NULL OR created_at < $5)
               AND ($6 IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $7"
        );
        Ok(on_pool!(self, pool => sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(sql))
            .bind(session)
            .bind(&f.direction)
            .bind(&f.chat)
            .bind(f.since)
            .bind(f.until)
            .bind(&f.before_id)
            .bind(f.limit)
            .fetch_all(pool)
            .await)?)
    }

    /// Sends of a deleted session that are still queued will never go out.
    pub async fn fail_queued_sends_of(&self, session: &str, reason: &str, now: i64) -> StoreResult<u64> {
        let done = on_pool!(self, pool => sqlx::query(
            "UPDATE messages SET status = 'failed', status_rank = $3, error_code = 'SESSION_NOT_FOUND',
                error = $2, payload = NULL, next_attempt_at = NULL, lease_until = NULL, updated_at = $4
             WHERE session = $1 AND status = 'queued' AND next_attempt_at IS NOT NULL",
        )
        .bind(session)
        .bind(reason)
        .bind(rank(MessageStatus::Failed))
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(done)
    }
}

/// The statements of `finish_send`, written once and expanded for each connection type.
macro_rules! finish_on {
    ($name:ident, $conn:ty) => {
        async fn $name(conn: &mut $conn, id: &str, outcome: &SendOutcome, now: i64) -> StoreResult<Option<MessageRow>> {
            let (wa_id, chat, status, sent_at) = match outcome {
                SendOutcome::Sent { wa_id, chat, status, sent_at } => (wa_id, chat, status, sent_at),
                SendOutcome::Failed { code, reason } => {
                    return Ok(sqlx::query_as::<_, MessageRow>(sqlx::AssertSqlSafe(format!(
                        "UPDATE messages SET status = CASE WHEN status_rank < $4 THEN 'failed' ELSE status END,
                            status_rank = CASE WHEN status_rank < $4 THEN $4 ELSE status_rank END,
                            error_code = $2, error = $3, payload = NULL,
                            next_attempt_at = NULL, lease_until = NULL, updated_at = $5
                         WHERE id = $1 RETURNING {MESSAGE_COLUMNS}"
                    )))
                    .bind(id)
                    .bind(code)
                    .bind(reason)
                    .bind(rank(MessageStatus::Failed))
                    .bind(now)
                    .fetch_optional(&mut *conn)
                    .await?);
                }
            };
            // `early`: whether a receipt for this WhatsApp id arrived before this answer (read
            // in the same statement, so the common case costs one round trip, not two).
            let recorded: Option<Recorded> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE messages SET wa_id = $2, chat = $3,
                    status = CASE WHEN status_rank < $5 THEN $4 ELSE status END,
                    status_rank = CASE WHEN status_rank < $5 THEN $5 ELSE status_rank END,
                    error_code = NULL, error = NULL, sent_at = $6, payload = NULL,
                    next_attempt_at = NULL, lease_until = NULL, updated_at = $7
                 WHERE id = $1 RETURNING {MESSAGE_COLUMNS},
                    EXISTS (SELECT 1 FROM early_receipts e WHERE e.session = messages.session AND e.wa_id = $2) AS early"
            )))
            .bind(id)
            .bind(wa_id)
            .bind(chat)
            .bind(status.as_str())
            .bind(rank(*status))
            .bind(sent_at)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            let early = recorded.as_ref().is_some_and(|r| r.early);
            let mut row = recorded.map(|r| r.row);
            if let Some(session) = row.as_ref().filter(|_| early).map(|r| r.session.clone()) {
                let early: Option<(String, i32, Option<String>)> = sqlx::query_as(
                    "DELETE FROM early_receipts WHERE session = $1 AND wa_id = $2 RETURNING status, status_rank, reason",
                )
                .bind(&session)
                .bind(wa_id)
                .fetch_optional(&mut *conn)
                .await?;
                if let Some((status, status_rank, reason)) = early {
                    let updated: Option<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "UPDATE messages SET status = $2, status_rank = $3, error = COALESCE($4, error), updated_at = $5
                         WHERE id = $1 AND status_rank < $3 RETURNING {MESSAGE_COLUMNS}"
                    )))
                    .bind(id)
                    .bind(status)
                    .bind(status_rank)
                    .bind(reason)
                    .bind(now)
                    .fetch_optional(&mut *conn)
                    .await?;
                    if updated.is_some() {
                        row = updated;
                    }
                }
            }
            Ok(row)
        }
    };
}
finish_on!(finish_sqlite, sqlx::SqliteConnection);
finish_on!(finish_postgres, sqlx::PgConnection);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::both;

    fn new(id: &str, key: Option<&str>, mode: &'static str, now: i64) -> NewOutbound {
        NewOutbound {
            id: id.into(),
            session: "s".into(),
            chat: "15551234567@s.whatsapp.net".into(),
            kind: "text".into(),
            body_text: Some("hi".into()),
            media_mimetype: None,
            media_filename: None,
            media_size: None,
            idempotency_key: key.map(str::to_owned),
            request_hash: "h".into(),
            api_key_id: None,
            mode,
            payload: "{}".into(),
            next_attempt_at: if mode == "sync" { now + 1000 } else { now },
            lease_until: (mode == "sync").then_some(now + 1000),
            now,
        }
    }

    both!(idempotency_key_returns_first_row, |store| {
        assert_eq!(store.insert_outbound(new("m1", Some("k"), "sync", 10)).await.unwrap(), InsertOutcome::Inserted);
        match store.insert_outbound(new("m2", Some("k"), "sync", 11)).await.unwrap() {
            InsertOutcome::Existing(row) => assert_eq!(row.id, "m1"),
            other => panic!("{other:?}"),
        }
        // Without a key, or with another key, rows are independent.
        assert_eq!(store.insert_outbound(new("m3", None, "sync", 12)).await.unwrap(), InsertOutcome::Inserted);
        assert_eq!(store.insert_outbound(new("m4", None, "sync", 12)).await.unwrap(), InsertOutcome::Inserted);
        assert_eq!(store.insert_outbound(new("m5", Some("k2"), "sync", 12)).await.unwrap(), InsertOutcome::Inserted);
        assert!(store.message("m2").await.unwrap().is_none());
        let n = new("m9", None, "async", 20);
        let row = n.row();
        store.insert_outbound(n).await.unwrap();
        assert_eq!(store.message("m9").await.unwrap().unwrap(), row, "the answer built without a read is the stored row");
    });

    both!(status_never_moves_backwards_and_early_receipts_apply, |store| {
        store.insert_outbound(new("m1", None, "sync", 10)).await.unwrap();
        // A delivery receipt raced ahead of the send answer.
        let ack = store
            .apply_receipt_for_test("s", "WA1", MessageStatus::Delivered)
            .await;
        assert!(!ack, "no row has WA1 yet");
        let sent = SendOutcome::Sent {
            wa_id: "WA1".into(),
            chat: "15551234567@s.whatsapp.net".into(),
            status: MessageStatus::Sent,
            sent_at: 11,
        };
        let returned = store.finish_send("m1", &sent, 12).await.unwrap().unwrap();
        let row = store.message("m1").await.unwrap().unwrap();
        assert_eq!(returned, row, "finish_send returns the row as stored");
        assert_eq!(row.status, "delivered", "the early receipt was applied");
        assert_eq!(row.next_attempt_at, None);
        assert_eq!(row.payload_for_test(&store).await, None);
        // A late, lower status does not win.
        store.apply_receipt_for_test("s", "WA1", MessageStatus::Sent).await;
        assert_eq!(store.message("m1").await.unwrap().unwrap().status, "delivered");
        store.apply_receipt_for_test("s", "WA1", MessageStatus::Read).await;
        assert_eq!(store.message("m1").await.unwrap().unwrap().status, "read");
        // Failing a read message changes nothing.
        store
            .finish_send("m1", &SendOutcome::Failed { code: "SEND_FAILED".into(), reason: "x".into() }, 13)
            .await
            .unwrap();
        assert_eq!(store.message("m1").await.unwrap().unwrap().status, "read");
    });

    both!(a_batch_of_receipts_applies_as_one_by_one_in_order, |store| {
        use wa_api::pod::{EventBody, PodEvent, Receipt};
        let sent = |wa: &str| SendOutcome::Sent {
            wa_id: wa.into(),
            chat: "15551234567@s.whatsapp.net".into(),
            status: MessageStatus::Sent,
            sent_at: 11,
        };
        for (id, wa) in [("m1", "WA1"), ("m2", "WA2"), ("m3", "WA3")] {
            store.insert_outbound(new(id, None, "sync", 10)).await.unwrap();
            store.finish_send(id, &sent(wa), 12).await.unwrap();
        }
        let receipt = |id: &str, wa: &str, status: MessageStatus, reason: Option<&str>| PodEvent {
            id: id.into(),
            session: "s".into(),
            namespace: None,
            occurred_at: chrono::Utc::now(),
            body: EventBody::Receipt(Receipt {
                message_id: wa.into(),
                chat: "15551234567@s.whatsapp.net".into(),
                status,
                reason: reason.map(str::to_owned),
            }),
        };
        let batch = [
            receipt("e1", "WA1", MessageStatus::Delivered, None),
            receipt("e2", "WA1", MessageStatus::Read, None),
            receipt("e1", "WA1", MessageStatus::Delivered, None), // the same event again
            receipt("e3", "WA1", MessageStatus::Delivered, None), // late and lower: no change
            receipt("e4", "WA2", MessageStatus::Failed, Some("blocked")),
            receipt("e5", "WA2", MessageStatus::Delivered, None), // keeps the failure's reason
            receipt("e6", "WA9", MessageStatus::Delivered, None), // not recorded yet: early
            receipt("e7", "WA9", MessageStatus::Read, None),
            receipt("e8", "WA3", MessageStatus::Sent, None), // already sent: nothing to do
        ];
        let out = store.apply_events("s", None, batch.to_vec(), vec![], 20).await.unwrap();
        assert_eq!((out.ack.accepted, out.ack.duplicates), (8, 1));
        let fresh: Vec<bool> = out.seen.iter().map(|(_, f)| *f).collect();
        assert_eq!(fresh, [true, true, false, true, true, true, true, true, true]);
        let ids: Vec<Option<&str>> = out
            .applied
            .iter()
            .map(|a| match a {
                crate::store::AppliedEvent::Receipt { message_id, .. } => message_id.as_deref(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [Some("m1"), Some("m1"), Some("m1"), Some("m2"), Some("m2"), None, None, Some("m3")]);
        let m1 = store.message("m1").await.unwrap().unwrap();
        assert_eq!((m1.status.as_str(), m1.status_rank, m1.updated_at), ("read", 4, 20));
        let m2 = store.message("m2").await.unwrap().unwrap();
        assert_eq!((m2.status.as_str(), m2.error.as_deref()), ("delivered", Some("blocked")));
        let m3 = store.message("m3").await.unwrap().unwrap();
        assert_eq!((m3.status.as_str(), m3.updated_at), ("sent", 12));
        // The early receipts wait for WA9's send answer, at their highest status.
        assert_eq!(store.early_receipt_count().await.unwrap(), 1);
        store.insert_outbound(new("m9", None, "sync", 10)).await.unwrap();
        let row = store.finish_send("m9", &sent("WA9"), 30).await.unwrap().unwrap();
        assert_eq!(row.status, "read");
        assert_eq!(store.early_receipt_count().await.unwrap(), 0);
        // The whole batch again: all duplicates, nothing changes.
        let again = store.apply_events("s", None, batch.to_vec(), vec![], 40).await.unwrap();
        assert_eq!((again.ack.accepted, again.ack.duplicates), (0, 9));
        assert_eq!(store.message("m1").await.unwrap().unwrap().updated_at, 20);
    });

    both!(outbox_claims_due_unleased_rows_once, |store| {
        store.insert_outbound(new("a1", None, "async", 100)).await.unwrap();
        store.insert_outbound(new("a2", None, "async", 100)).await.unwrap();
        store.insert_outbound(new("s1", None, "sync", 100)).await.unwrap(); // leased until 1100
        assert_eq!(store.outbox_depth().await.unwrap(), 3);
        let claimed = store.claim_due_sends(200, 700, 10).await.unwrap();
        let ids: Vec<_> = claimed.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2"]);
        assert_eq!(claimed[0].attempts, 1);
        assert!(store.claim_due_sends(300, 800, 10).await.unwrap().is_empty(), "leased rows are not claimed twice");
        // Leases expire: the rows come back (a gateway died mid-forward), the sync row too.
        let again = store.claim_due_sends(1200, 2000, 10).await.unwrap();
        assert_eq!(again.len(), 3);
        assert_eq!(again[0].attempts, 2);
        store.reschedule_send("a1", 5000, "SESSION_NOT_READY", "pod starting", 1300).await.unwrap();
        assert!(store.claim_due_sends(2100, 2500, 10).await.unwrap().iter().all(|c| c.id != "a1"));
        let row = store.message("a1").await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.error_code.as_deref()), ("queued", Some("SESSION_NOT_READY")));
        store.finish_send("a2", &SendOutcome::Failed { code: "SEND_FAILED".into(), reason: "no".into() }, 1400).await.unwrap();
        assert_eq!(store.outbox_depth().await.unwrap(), 2);
    });

    both!(concurrent_claimers_never_share_a_row, |store| {
        // What replicas do on PostgreSQL: several outbox workers claim at once. Every row is
        // claimed exactly once (FOR UPDATE SKIP LOCKED; SQLite serializes the claims).
        for i in 0..200 {
            store.insert_outbound(new(&format!("c{i:03}"), None, "async", 100)).await.unwrap();
        }
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let got = store.claim_due_sends(1000, 10_000_000, 7).await.unwrap();
                        if got.is_empty() {
                            break mine;
                        }
                        mine.extend(got.into_iter().map(|c| c.id));
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.unwrap());
        }
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!((all.len(), distinct.len()), (200, 200), "a row was claimed twice or not at all");
    });

    both!(release_leases_and_retry_failed, |store| {
        store.insert_outbound(new("s1", Some("k"), "sync", 100)).await.unwrap();
        assert_eq!(store.release_all_send_leases().await.unwrap(), 1);
        let due = store.claim_due_sends(crate::util::now_ms(), i64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1, "a released sync row is due at once");
        store
            .finish_send("s1", &SendOutcome::Failed { code: "RATE_LIMITED".into(), reason: "slow down".into() }, 200)
            .await
            .unwrap();
        assert!(store.retry_failed_send("s1", "{\"x\":1}", 900, 300).await.unwrap());
        assert!(!store.retry_failed_send("s1", "{}", 900, 300).await.unwrap(), "only once");
        let row = store.message("s1").await.unwrap().unwrap();
        assert_eq!((row.status.as_str(), row.lease_until), ("queued", Some(900)));
    });

    both!(history_filters_and_pages, |store| {
        for (i, chat) in ["1@s.whatsapp.net", "2@s.whatsapp.net", "1@s.whatsapp.net"].iter().enumerate() {
            let mut m = new(&format!("m{i}"), None, "async", 100 + i as i64 * 10);
            m.chat = (*chat).into();
            store.insert_outbound(m).await.unwrap();
        }
        let all = |f: HistoryFilter| {
            let store = store.clone();
            async move { store.history("s", &f).await.unwrap().into_iter().map(|r| r.id).collect::<Vec<_>>() }
        };
        assert_eq!(all(HistoryFilter { limit: 10, ..Default::default() }).await, ["m2", "m1", "m0"]);
        assert_eq!(all(HistoryFilter { limit: 2, ..Default::default() }).await, ["m2", "m1"]);
        assert_eq!(all(HistoryFilter { limit: 2, before_id: Some("m1".into()), ..Default::default() }).await, ["m0"]);
        assert_eq!(
            all(HistoryFilter { limit: 10, chat: Some("1@s.whatsapp.net".into()), ..Default::default() }).await,
            ["m2", "m0"]
        );
        assert_eq!(all(HistoryFilter { limit: 10, since: Some(110), until: Some(120), ..Default::default() }).await, ["m1"]);
        assert_eq!(all(HistoryFilter { limit: 10, direction: Some("inbound".into()), ..Default::default() }).await, Vec::<String>::new());
        assert!(store.history("other", &HistoryFilter { limit: 10, ..Default::default() }).await.unwrap().is_empty());
    });

    impl MessageRow {
        async fn payload_for_test(&self, store: &Store) -> Option<String> {
            let (p,): (Option<String>,) = on_pool!(store, pool => sqlx::query_as("SELECT payload FROM messages WHERE id = $1")
                .bind(&self.id)
                .fetch_one(pool)
                .await
                .unwrap());
            p
        }
    }

    impl Store {
        /// Applies one receipt through the real event path; true when a row changed or existed.
        async fn apply_receipt_for_test(&self, session: &str, wa_id: &str, status: MessageStatus) -> bool {
            use wa_api::pod::{EventBody, PodEvent, Receipt};
            let event = PodEvent {
                id: crate::util::new_id(),
                session: session.into(),
                namespace: None,
                occurred_at: chrono::Utc::now(),
                body: EventBody::Receipt(Receipt {
                    message_id: wa_id.into(),
                    chat: "15551234567@s.whatsapp.net".into(),
                    status,
                    reason: None,
                }),
            };
            let out = self.apply_events(session, None, vec![event], vec![], crate::util::now_ms()).await.unwrap();
            out.applied.iter().any(|a| matches!(a, crate::store::AppliedEvent::Receipt { message_id: Some(_), .. }))
        }
    }
}
