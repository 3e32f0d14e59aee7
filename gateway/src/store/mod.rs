//! The gateway's store: API keys, local sessions, messages (which are also the send outbox),
//! processed event ids, webhooks and their delivery log, on SQLite or PostgreSQL.
//!
//! The SQL is written once for both databases (`$n` parameters, `ON CONFLICT`, `RETURNING`,
//! times as Unix milliseconds); the [`on_pool!`] macro expands each query for both pool types.
//! The dialects differ in two places: the outbox claim (PostgreSQL adds
//! `FOR UPDATE SKIP LOCKED` so replicas never claim the same row; SQLite runs one replica,
//! and its `UPDATE … RETURNING` is atomic anyway), and the statements that take a whole event
//! batch as one JSON parameter (`json_each` on SQLite, `jsonb_*` functions on PostgreSQL).

mod events;
mod group_commit;
mod keys;
mod messages;
mod webhooks;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::error::DatabaseError as _;
use sqlx::{PgPool, SqlitePool};

pub use events::{AppliedEvent, EventOutcome, WebhookTarget};
pub use group_commit::{GroupCommit, GroupCommitStats};
pub use keys::KeyRecord;
pub use messages::{
    Claimed, HistoryFilter, InsertOutcome, MessageRow, NewOutbound, SendOutcome,
};
pub use webhooks::{DeliveryResult, DeliveryRow, WebhookRow};

/// A database error; [`StoreError::is_unavailable`] tells an outage (answer 503, retry)
/// from a bug.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct StoreError(#[from] pub sqlx::Error);

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        match &self.0 {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(e) => {
                if let Some(sqlite) = e.try_downcast_ref::<sqlx::sqlite::SqliteError>() {
                    // SQLITE_BUSY / SQLITE_LOCKED and their extended codes: another writer
                    // held the database longer than the busy timeout.
                    let code: i64 = sqlite.code().and_then(|c| c.parse().ok()).unwrap_or(0);
                    return matches!(code & 0xff, 5 | 6);
                }
                let code = e.code().unwrap_or_default();
                // PostgreSQL: connection exceptions (08…), shutdown (57P…), database gone
                // (3D000), too many connections (53300).
                code.starts_with("08") || code.starts_with("57P") || code == "3D000" || code == "53300"
            }
            _ => false,
        }
    }

    pub fn is_unique_violation(&self) -> bool {
        matches!(&self.0, sqlx::Error::Database(e) if e.is_unique_violation())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The database, either engine. Cheap to clone (pools are handles). SQLite's writes on the
/// send path go through its [`GroupCommit`].
#[derive(Clone, Debug)]
pub enum Store {
    Sqlite(SqlitePool, GroupCommit),
    Postgres(PgPool),
}

/// Runs the same code against whichever pool the store holds; `$pool` is bound to it.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($pool, _) => $body,
            $crate::store::Store::Postgres($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn of_url(url: &str) -> Option<Backend> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else {
            None
        }
    }
}

impl Store {
    /// Connects and runs the migrations. `url` is `sqlite://<path>` or `postgres://…`.
    pub async fn connect(url: &str) -> anyhow::Result<Store> {
        use anyhow::Context as _;
        let store = match Backend::of_url(url) {
            Some(Backend::Postgres) => {
                let options = PgConnectOptions::from_str(url).context("parsing the PostgreSQL URL")?;
                let pool = PgPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await
                    .context("connecting to PostgreSQL")?;
                sqlx::migrate!("migrations/postgres")
                    .run(&pool)
                    .await
                    .context("migrating the PostgreSQL database")?;
                Store::Postgres(pool)
            }
            Some(Backend::Sqlite) => {
                // WAL with synchronous=NORMAL survives a killed process without losing a
                // committed row (only an OS crash can lose the last transactions).
                let options = SqliteConnectOptions::from_str(url)
                    .context("parsing the SQLite URL")?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(5));
                // One connection: SQLite has one writer at a time, and writers waiting in
                // SQLite's busy handler sleep in steps of up to 100 ms; waiting in the pool's
                // queue instead keeps the tail latency of concurrent sends low.
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    // The connection lives in this process (sqlx's worker thread): testing it
                    // before each use is one more hand-off to that thread per statement and
                    // can catch nothing a statement's own error would not.
                    .test_before_acquire(false)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options)
                    .await
                    .context("opening the SQLite database")?;
                sqlx::migrate!("migrations/sqlite")
                    .run(&pool)
                    .await
                    .context("migrating the SQLite database")?;
                Store::Sqlite(pool.clone(), GroupCommit::start(pool))
            }
            None => anyhow::bail!(
                "DATABASE_URL must start with sqlite: or postgres:// (got {:?})",
                url.split(':').next().unwrap_or("")
            ),
        };
        Ok(store)
    }

    /// How SQLite's writes on the send path were grouped, for `/metrics` (none on PostgreSQL).
    pub fn group_commit_stats(&self) -> Option<&GroupCommitStats> {
        match self {
            Store::Sqlite(_, writes) => Some(writes.stats()),
            Store::Postgres(_) => None,
        }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Store::Sqlite(..) => Backend::Sqlite,
            Store::Postgres(_) => Backend::Postgres,
        }
    }

    /// A cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> StoreResult<()> {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }

    /// Stores `value` under `name` unless a value is already there; true when it was stored.
    /// Used for once-only facts shared by replicas (the first admin key).
    pub async fn set_setting_once(&self, name: &str, value: &str) -> StoreResult<bool> {
        let done = on_pool!(self, pool => sqlx::query(
            "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(value)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }
}

/// Local-mode sessions (Kubernetes mode keeps sessions as `WhatsAppSession` objects).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct LocalSessionRow {
    pub name: String,
    pub engine: String,
    pub phone_number: Option<String>,
    pub rate_per_minute: i64,
    pub rate_burst: i64,
    pub pod_token: String,
    pub created_at: i64,
}

/// The last phase a session reported through its events.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SessionStateRow {
    pub session: String,
    pub phase: String,
    pub account_jid: Option<String>,
    pub push_name: Option<String>,
    pub reason: Option<String>,
    pub updated_at: i64,
}

impl Store {
    /// False when a session of that name exists already.
    pub async fn insert_local_session(&self, row: &LocalSessionRow) -> StoreResult<bool> {
        let done = on_pool!(self, pool => sqlx::query(
            "INSERT INTO local_sessions (name, engine, phone_number, rate_per_minute, rate_burst, pod_token, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&row.name)
        .bind(&row.engine)
        .bind(&row.phone_number)
        .bind(row.rate_per_minute)
        .bind(row.rate_burst)
        .bind(&row.pod_token)
        .bind(row.created_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    pub async fn list_local_sessions(&self) -> StoreResult<Vec<LocalSessionRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, LocalSessionRow>(
            "SELECT name, engine, phone_number, rate_per_minute, rate_burst, pod_token, created_at
             FROM local_sessions ORDER BY name",
        )
        .fetch_all(pool)
        .await)?)
    }

    pub async fn delete_local_session(&self, name: &str) -> StoreResult<bool> {
        let done = on_pool!(self, pool => sqlx::query("DELETE FROM local_sessions WHERE name = $1")
            .bind(name)
            .execute(pool)
            .await.map(|r| r.rows_affected()))?;
        Ok(done == 1)
    }

    pub async fn session_states(&self) -> StoreResult<Vec<SessionStateRow>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, SessionStateRow>(
            "SELECT session, phase, account_jid, push_name, reason, updated_at FROM session_states",
        )
        .fetch_all(pool)
        .await)?)
    }

    pub async fn delete_session_state(&self, session: &str) -> StoreResult<()> {
        on_pool!(self, pool => sqlx::query("DELETE FROM session_states WHERE session = $1")
            .bind(session)
            .execute(pool)
            .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// Forgets processed event ids older than `before_ms`; pods redeliver only what they
    /// have not had acknowledged, so days of ids are plenty.
    pub async fn prune_processed_events(&self, before_ms: i64) -> StoreResult<u64> {
        let done = on_pool!(self, pool => sqlx::query("DELETE FROM processed_events WHERE received_at < $1")
            .bind(before_ms)
            .execute(pool)
            .await.map(|r| r.rows_affected()))?;
        Ok(done)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Each test gets its own database: a fresh SQLite file, and a uniquely named PostgreSQL
    //! database on `WA_TEST_POSTGRES_URL`, dropped at the end.
    use super::*;

    pub struct TestDb {
        pub store: Store,
        #[allow(dead_code)]
        pub url: String,
        _dir: Option<tempfile::TempDir>,
        pg_admin: Option<(String, String)>,
    }

    impl TestDb {
        pub async fn drop_db(self) {
            self.store.close().await;
            if let Some((admin_url, name)) = self.pg_admin {
                drop_pg_database(&admin_url, &name).await;
            }
        }
    }

    pub async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("gateway.db").display());
        let store = Store::connect(&url).await.unwrap();
        TestDb { store, url, _dir: Some(dir), pg_admin: None }
    }

    pub async fn postgres() -> TestDb {
        let admin_url = std::env::var("WA_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!("wa_gw_unit_{}", uuid::Uuid::new_v4().simple());
        let url = create_pg_database(&admin_url, &name).await;
        let store = Store::connect(&url).await.unwrap();
        TestDb { store, url, _dir: None, pg_admin: Some((admin_url, name)) }
    }

    pub async fn create_pg_database(admin_url: &str, name: &str) -> String {
        let admin = PgPool::connect(admin_url)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at WA_TEST_POSTGRES_URL ({admin_url}) is needed: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        format!("{base}/{name}")
    }

    pub async fn drop_pg_database(admin_url: &str, name: &str) {
        if let Ok(admin) = PgPool::connect(admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&admin)
                .await;
            admin.close().await;
        }
    }

    /// Runs `f` against a fresh SQLite and a fresh PostgreSQL store.
    macro_rules! both {
        ($name:ident, |$store:ident| $body:block) => {
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($store: $crate::store::Store) $body

                #[tokio::test]
                async fn sqlite() {
                    let db = $crate::store::testing::sqlite().await;
                    run(db.store.clone()).await;
                    db.drop_db().await;
                }

                #[tokio::test]
                async fn postgres() {
                    let db = $crate::store::testing::postgres().await;
                    run(db.store.clone()).await;
                    db.drop_db().await;
                }
            }
        };
    }
    pub(crate) use both;
}

#[cfg(test)]
mod tests {
    use super::testing::both;
    use super::*;

    both!(settings_are_set_once, |store| {
        assert!(store.set_setting_once("admin", "1").await.unwrap());
        assert!(!store.set_setting_once("admin", "2").await.unwrap());
        store.ping().await.unwrap();
    });

    both!(local_sessions_round_trip, |store| {
        let row = LocalSessionRow {
            name: "a".into(),
            engine: "sandbox".into(),
            phone_number: None,
            rate_per_minute: 30,
            rate_burst: 5,
            pod_token: "t".into(),
            created_at: 1,
        };
        assert!(store.insert_local_session(&row).await.unwrap());
        assert!(!store.insert_local_session(&row).await.unwrap(), "duplicate name refused");
        assert_eq!(store.list_local_sessions().await.unwrap(), vec![row]);
        assert!(store.delete_local_session("a").await.unwrap());
        assert!(!store.delete_local_session("a").await.unwrap());
        assert!(store.list_local_sessions().await.unwrap().is_empty());
    });

    #[test]
    fn backend_of_url() {
        assert_eq!(Backend::of_url("sqlite:///x.db"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("sqlite::memory:"), Some(Backend::Sqlite));
        assert_eq!(Backend::of_url("postgres://u@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("postgresql://u@h/db"), Some(Backend::Postgres));
        assert_eq!(Backend::of_url("mysql://x"), None);
    }

    #[test]
    fn outage_errors_are_unavailable() {
        // Classification only; a real outage (the database dropped under a running gateway,
        // SQLite held by another writer) is provoked in tests/it/errors.rs.
        assert!(StoreError(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(StoreError(sqlx::Error::PoolClosed).is_unavailable());
        assert!(!StoreError(sqlx::Error::RowNotFound).is_unavailable());
    }
}
