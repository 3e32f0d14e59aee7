//! Webhooks registered through the API, and the delivery log that is also the delivery
//! queue (same lease scheme as the send outbox).

use super::{Store, StoreResult, on_pool};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WebhookRow {
    pub id: String,
    pub session: String,
    pub url: String,
    /// JSON array of event types; empty for all.
    pub events: String,
    pub secret: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct DeliveryRow {
    pub id: String,
    pub webhook_id: String,
    pub session: String,
    pub event_id: String,
    pub event_type: String,
    pub url: String,
    pub payload: String,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<i64>,
    pub lease_until: Option<i64>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub delivered_at: Option<i64>,
}

const DELIVERY_COLUMNS: &str = "id, webhook_id, session, event_id, event_type, url, payload, status, attempts, \
    next_attempt_at, lease_until, last_status, last_error, created_at, updated_at, delivered_at";

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    Delivered { status: i32 },
    /// Try again at `next_attempt_at`.
    Retry { next_attempt_at: i64, status: Option<i32>, error: String },
    /// The last try failed: dead-lettered, kept in the log.
    Dead { status: Option<i32>, error: String },
}

impl Store {
    pub async fn insert_webhook(&self, w: &WebhookRow) -> StoreResult<()> {
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO webhooks (id, session, url, events, secret, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&w.id)
        .bind(&w.session)
        .bind(&w.url)
        .bind(&w.events)
        .bind(&w.secret)
        .bind(w.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn webhooks_of(&self, session: &str) -> StoreResult<Vec<WebhookRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, WebhookRow>(
            "SELECT id, session, url, events, secret, created_at FROM webhooks WHERE session = $1 ORDER BY id",
        )
        .bind(session)
        .fetch_all(pool)
        .await)?)
    }

    pub async fn webhook(&self, id: &str) -> StoreResult<Option<WebhookRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, WebhookRow>(
            "SELECT id, session, url, events, secret, created_at FROM webhooks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(pool)
        .await)?)
    }

    /// Deletes a webhook; its pending deliveries are dead-lettered (kept in no log: the
    /// webhook is gone). False when there was none.
    pub async fn delete_webhook(&self, session: &str, id: &str) -> StoreResult<bool> {
        let deleted = on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let n = sqlx::query("DELETE FROM webhooks WHERE id = $1 AND session = $2")
                .bind(id)
                .bind(session)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM webhook_deliveries WHERE webhook_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            n
        });
        Ok(deleted == 1)
    }

    pub async fn delete_webhooks_of(&self, session: &str) -> StoreResult<()> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM webhook_deliveries WHERE session = $1").bind(session).execute(&mut *tx).await?;
            sqlx::query("DELETE FROM webhooks WHERE session = $1").bind(session).execute(&mut *tx).await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Takes up to `limit` due deliveries, leasing them until `lease_until`.
    pub async fn claim_due_deliveries(&self, now: i64, lease_until: i64, limit: i64) -> StoreResult<Vec<DeliveryRow>> {
        const PICK: &str = "SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= $1
            AND (lease_until IS NULL OR lease_until < $1) ORDER BY next_attempt_at, id LIMIT $3";
        let update = format!(
            "UPDATE webhook_deliveries SET lease_until = $2, attempts = attempts + 1, updated_at = $1
             WHERE id IN ({{pick}}) RETURNING {DELIVERY_COLUMNS}"
        );
        let mut rows = match self {
            Store::Sqlite(pool, _) => sqlx::query_as::<_, DeliveryRow>(sqlx::AssertSqlSafe(update.replace("{pick}", PICK)))
                .bind(now)
                .bind(lease_until)
                .bind(limit)
                .fetch_all(pool)
                .await?,
            Store::Postgres(pool) => {
                let pick = format!("{PICK} FOR UPDATE SKIP LOCKED");
                sqlx::query_as::<_, DeliveryRow>(sqlx::AssertSqlSafe(update.replace("{pick}", &pick)))
                    .bind(now)
                    .bind(lease_until)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?
            }
        };
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(rows)
    }

    pub async fn finish_delivery(&self, id: &str, result: &DeliveryResult, now: i64) -> StoreResult<()> {
        let (status, next, last_status, error, delivered_at) = match result {
            DeliveryResult::Delivered { status } => ("delivered", None, Some(*status), None, Some(now)),
            DeliveryResult::Retry { next_attempt_at, status, error } => {
                ("pending", Some(*next_attempt_at), *status, Some(error.as_str()), None)
            }
            DeliveryResult::Dead { status, error } => ("dead", None, *status, Some(error.as_str()), None),
        };
        on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_deliveries SET status = $2, next_attempt_at = $3, lease_until = NULL,
                last_status = $4, last_error = $5, delivered_at = $6, updated_at = $7
             WHERE id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(next)
        .bind(last_status)
        .bind(error)
        .bind(delivered_at)
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The delivery log of a webhook, newest first.
    pub async fn deliveries(&self, webhook_id: &str, before_id: Option<&str>, limit: i64) -> StoreResult<Vec<DeliveryRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, DeliveryRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1 AND ($2 IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        )))
        .bind(webhook_id)
        .bind(before_id)
        .bind(limit)
        .fetch_all(pool)
        .await)?)
    }

    pub async fn delivery(&self, id: &str) -> StoreResult<Option<DeliveryRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, DeliveryRow>(sqlx::AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(pool)
        .await)?)
    }

    /// Queues a dead (or delivered) delivery again, with a fresh set of attempts.
    pub async fn redeliver(&self, id: &str, now: i64) -> StoreResult<Option<DeliveryRow>> {
        on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_deliveries SET status = 'pending', attempts = 0, next_attempt_at = $2,
                lease_until = NULL, updated_at = $2
             WHERE id = $1 AND status <> 'pending'",
        )
        .bind(id)
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        self.delivery(id).await
    }

    /// Deliveries still to be made, for the queue-depth gauge.
    pub async fn pending_deliveries(&self) -> StoreResult<i64> {
        let (n,): (i64,) = on_pool!(self, pool => sqlx::query_as(
            "SELECT COUNT(*) FROM webhook_deliveries WHERE status = 'pending'",
        )
        .fetch_one(pool)
        .await)?;
        Ok(n)
    }

    pub async fn release_all_delivery_leases(&self) -> StoreResult<u64> {
        let done = on_pool!(self, pool => sqlx::query(
            "UPDATE webhook_deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL AND status = 'pending'",
        )
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WebhookTarget;
    use crate::store::testing::both;
    use wa_api::pod::{EventBody, PodEvent};

    both!(delivery_queue_life_cycle, |store| {
        let w = WebhookRow {
            id: "w1".into(),
            session: "s".into(),
            url: "http://127.0.0.1:9/hook".into(),
            events: "[]".into(),
            secret: "sec".into(),
            created_at: 1,
        };
        store.insert_webhook(&w).await.unwrap();
        assert_eq!(store.webhooks_of("s").await.unwrap(), vec![w.clone()]);
        let event = PodEvent {
            id: "e1".into(),
            session: "s".into(),
            namespace: None,
            occurred_at: chrono::Utc::now(),
            body: EventBody::State { phase: wa_api::Phase::Connected, account: None, reason: None },
        };
        let target = WebhookTarget { id: w.id.clone(), url: w.url.clone(), events: vec![] };
        store.apply_events("s", None, vec![event], vec![target], 100).await.unwrap();
        assert_eq!(store.pending_deliveries().await.unwrap(), 1);

        let claimed = store.claim_due_deliveries(100, 200, 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].attempts, 1);
        assert!(store.claim_due_deliveries(150, 250, 10).await.unwrap().is_empty(), "leased");
        let id = claimed[0].id.clone();
        store
            .finish_delivery(&id, &DeliveryResult::Retry { next_attempt_at: 300, status: Some(500), error: "HTTP 500".into() }, 150)
            .await
            .unwrap();
        assert!(store.claim_due_deliveries(299, 400, 10).await.unwrap().is_empty(), "not due yet");
        let again = store.claim_due_deliveries(300, 400, 10).await.unwrap();
        assert_eq!(again[0].attempts, 2);
        store.finish_delivery(&id, &DeliveryResult::Dead { status: None, error: "refused".into() }, 310).await.unwrap();
        let log = store.deliveries("w1", None, 10).await.unwrap();
        assert_eq!((log[0].status.as_str(), log[0].last_error.as_deref()), ("dead", Some("refused")));
        assert_eq!(store.pending_deliveries().await.unwrap(), 0);

        let back = store.redeliver(&id, 400).await.unwrap().unwrap();
        assert_eq!((back.status.as_str(), back.attempts), ("pending", 0));
        let third = store.claim_due_deliveries(400, 500, 10).await.unwrap();
        store.finish_delivery(&third[0].id, &DeliveryResult::Delivered { status: 204 }, 410).await.unwrap();
        let done = store.delivery(&id).await.unwrap().unwrap();
        assert_eq!((done.status.as_str(), done.last_status, done.delivered_at), ("delivered", Some(204), Some(410)));

        assert!(store.delete_webhook("s", "w1").await.unwrap());
        assert!(!store.delete_webhook("s", "w1").await.unwrap());
        assert!(store.deliveries("w1", None, 10).await.unwrap().is_empty());
    });
}
