//! Group commit for the SQLite writes on the send path: recording a send, recording its
//! outcome, applying a pod's event batch.
//!
//! Every SQLite transaction in WAL mode writes each page it changed to the log in full and
//! updates the log's index; a send touches the same few pages (the newest leaves of the
//! messages table and its indexes) three times. The writes of concurrent requests therefore
//! go through one [`GroupCommit`] task, which runs whatever has queued up while the previous
//! group was running as one transaction: each page is logged once per group instead of
//! once per write. Nobody waits for a group to fill: a write that finds the task idle runs
//! at once, alone and without a transaction of its own when it needs none, so one request
//! at a time costs what it did before.
//!
//! A write is answered only after its group committed. When any write of a group fails, or
//! the commit does, the group is rolled back and each of its writes runs again alone, so
//! every caller gets the result of its own write and one failure never undoes another's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::future::BoxFuture;
use sqlx::{Connection as _, SqliteConnection, SqlitePool};
use tokio::sync::{mpsc, oneshot};

use super::{StoreError, StoreResult};

/// The most writes one transaction takes.
const MAX_GROUP: usize = 64;

/// Whether a write's statements must be atomic when it runs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Atomic {
    /// One statement, or statements each of which may stand alone.
    No,
    /// Several statements that must commit together.
    Yes,
}

/// One queued write: runs (possibly twice, see the module doc), then hands its result over.
trait Write: Send {
    fn atomic(&self) -> Atomic;
    /// Runs the write on `conn` and keeps the result; true when it succeeded.
    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool>;
    /// Replaces the kept result with an error that ended the write's transaction.
    fn fail(&mut self, error: sqlx::Error);
    /// Answers the caller.
    fn answer(self: Box<Self>);
}

/// The statements of a write: a function of its data and the connection, so that it can run
/// again after a rolled-back group.
type Statements<D, T> = for<'c> fn(&'c D, &'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>;

struct Pending<D, T> {
    atomic: Atomic,
    data: D,
    statements: Statements<D, T>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<D: Send + Sync, T: Send> Write for Pending<D, T> {
    fn atomic(&self) -> Atomic {
        self.atomic
    }

    fn run<'c>(&'c mut self, conn: &'c mut SqliteConnection) -> BoxFuture<'c, bool> {
        Box::pin(async move {
            let result = (self.statements)(&self.data, conn).await;
            let ok = result.is_ok();
            self.result = Some(result);
            ok
        })
    }

    fn fail(&mut self, error: sqlx::Error) {
        self.result = Some(Err(StoreError(error)));
    }

    fn answer(self: Box<Self>) {
        let result = self.result.unwrap_or(Err(StoreError(sqlx::Error::WorkerCrashed)));
        // The caller may have gone (its request was cancelled); the write stands.
        let _ = self.reply.send(result);
    }
}

/// Counts for `/metrics`: groups committed and the writes they carried.
#[derive(Debug, Default)]
pub struct GroupCommitStats {
    pub groups: AtomicU64,
    pub writes: AtomicU64,
}

/// The handle writes are queued through. Cheap to clone; the task ends with the last handle.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Box<dyn Write>>,
    stats: Arc<GroupCommitStats>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the task that runs the writes on connections of `pool`.
    pub fn start(pool: SqlitePool) -> GroupCommit {
        let (queue, writes) = mpsc::unbounded_channel();
        let stats = Arc::new(GroupCommitStats::default());
        tokio::spawn(run(pool, writes, stats.clone()));
        GroupCommit { queue, stats }
    }

    pub fn stats(&self) -> &GroupCommitStats {
        &self.stats
    }

    /// Queues a write and waits until it committed (or failed). `statements` may run twice.
    pub(crate) async fn write<D, T>(&self, atomic: Atomic, data: D, statements: Statements<D, T>) -> StoreResult<T>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { atomic, data, statements, result: None, reply };
        self.queue.send(Box::new(pending)).map_err(|_| StoreError(sqlx::Error::WorkerCrashed))?;
        answer.await.map_err(|_| StoreError(sqlx::Error::WorkerCrashed))?
    }
}

async fn run(pool: SqlitePool, mut queue: mpsc::UnboundedReceiver<Box<dyn Write>>, stats: Arc<GroupCommitStats>) {
    let mut group: Vec<Box<dyn Write>> = Vec::with_capacity(MAX_GROUP);
    while queue.recv_many(&mut group, MAX_GROUP).await > 0 {
        match pool.acquire().await {
            Ok(mut conn) => commit(&mut conn, &mut group).await,
            Err(e) => {
                for write in &mut group {
                    write.fail(copy_acquire_error(&e));
                }
            }
        }
        stats.groups.fetch_add(1, Ordering::Relaxed);
        stats.writes.fetch_add(group.len() as u64, Ordering::Relaxed);
        for write in group.drain(..) {
            write.answer();
        }
    }
}

/// Runs a group: as one transaction, or each write alone when that fails.
async fn commit(conn: &mut SqliteConnection, group: &mut [Box<dyn Write>]) {
    if let [write] = group {
        return alone(conn, write.as_mut()).await;
    }
    if together(conn, group).await {
        return;
    }
    for write in group.iter_mut() {
        alone(conn, write.as_mut()).await;
    }
}

/// One transaction for the whole group; false (and rolled back) when any part failed.
async fn together(conn: &mut SqliteConnection, group: &mut [Box<dyn Write>]) -> bool {
    let Ok(mut tx) = conn.begin().await else { return false };
    for write in group.iter_mut() {
        if !write.run(&mut tx).await {
            let _ = tx.rollback().await;
            return false;
        }
    }
    tx.commit().await.is_ok()
}

async fn alone(conn: &mut SqliteConnection, write: &mut dyn Write) {
    if write.atomic() == Atomic::No {
        write.run(conn).await;
        return;
    }
    let mut tx = match conn.begin().await {
        Ok(tx) => tx,
        Err(e) => return write.fail(e),
    };
    if write.run(&mut tx).await {
        if let Err(e) = tx.commit().await {
            write.fail(e);
        }
    }
}

/// The pool's error for each write of a group that got no connection (`sqlx::Error` is not
/// `Clone`; acquiring fails with the unit variants, anything else is reported as I/O).
fn copy_acquire_error(e: &sqlx::Error) -> sqlx::Error {
    match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Io(std::io::Error::other(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

    use super::*;

    /// One connection, as the store's SQLite pool has, and a table with a unique column.
    async fn pool() -> (tempfile::TempDir, SqlitePool) {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteConnectOptions::new()
            .filename(dir.path().join("t.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        sqlx::query("CREATE TABLE t (v TEXT NOT NULL UNIQUE)").execute(&pool).await.unwrap();
        (dir, pool)
    }

    async fn insert(writes: &GroupCommit, v: &str) -> StoreResult<u64> {
        writes
            .write(Atomic::No, v.to_owned(), |v, conn| {
                Box::pin(async move { Ok(sqlx::query("INSERT INTO t (v) VALUES ($1)").bind(v).execute(conn).await?.rows_affected()) })
            })
            .await
    }

    async fn rows(pool: &SqlitePool) -> Vec<String> {
        sqlx::query_scalar("SELECT v FROM t ORDER BY v").fetch_all(pool).await.unwrap()
    }

    /// Starts `values.len()` writes while the only connection is taken, then gives it back:
    /// the writes queue up meanwhile, as concurrent requests do behind a running group.
    async fn queued_behind_a_busy_connection(pool: &SqlitePool, writes: &GroupCommit, values: &[&str]) -> Vec<StoreResult<u64>> {
        let busy = pool.acquire().await.unwrap();
        let tasks: Vec<_> = values
            .iter()
            .map(|v| {
                let (writes, v) = (writes.clone(), v.to_string());
                tokio::spawn(async move { insert(&writes, &v).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(busy);
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.unwrap());
        }
        results
    }

    #[tokio::test]
    async fn writes_queued_together_commit_as_one_group_each_with_its_own_answer() {
        let (_dir, pool) = pool().await;
        let writes = GroupCommit::start(pool.clone());
        let values: Vec<String> = (0..20).map(|i| format!("v{i:02}")).collect();
        let values: Vec<&str> = values.iter().map(String::as_str).collect();
        let results = queued_behind_a_busy_connection(&pool, &writes, &values).await;
        assert!(results.iter().all(|r| matches!(r, Ok(1))), "{results:?}");
        assert_eq!(rows(&pool).await, values);
        let groups = writes.stats().groups.load(Ordering::Relaxed);
        assert_eq!(writes.stats().writes.load(Ordering::Relaxed), 20);
        // The task may have taken the first write before the others queued.
        assert!(groups <= 2, "20 writes queued behind one connection ran in {groups} groups");
    }

    #[tokio::test]
    async fn a_failing_write_fails_alone_and_the_rest_of_its_group_commits_once() {
        let (_dir, pool) = pool().await;
        sqlx::query("INSERT INTO t (v) VALUES ('taken')").execute(&pool).await.unwrap();
        let writes = GroupCommit::start(pool.clone());
        let results = queued_behind_a_busy_connection(&pool, &writes, &["a", "b", "taken", "c", "d"]).await;
        for (i, result) in results.iter().enumerate() {
            if i == 2 {
                assert!(result.as_ref().is_err_and(StoreError::is_unique_violation), "{result:?}");
            } else {
                assert!(matches!(result, Ok(1)), "{result:?}");
            }
        }
        // Run again alone after the group was rolled back: each row once.
        assert_eq!(rows(&pool).await, ["a", "b", "c", "d", "taken"]);
    }

    #[tokio::test]
    async fn an_atomic_write_alone_commits_all_of_its_statements_or_none() {
        let (_dir, pool) = pool().await;
        let writes = GroupCommit::start(pool.clone());
        let pair = |first: &str, second: &str| {
            let data = (first.to_owned(), second.to_owned());
            writes.write(Atomic::Yes, data, |(first, second), conn| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO t (v) VALUES ($1)").bind(first).execute(&mut *conn).await?;
                    sqlx::query("INSERT INTO t (v) VALUES ($1)").bind(second).execute(&mut *conn).await?;
                    Ok(())
                })
            })
        };
        pair("x", "y").await.unwrap();
        let err = pair("z", "x").await.unwrap_err();
        assert!(err.is_unique_violation(), "{err:?}");
        assert_eq!(rows(&pool).await, ["x", "y"], "the first statement of the failed write was rolled back");
    }

    #[tokio::test]
    async fn writes_on_a_closed_pool_fail_as_unavailable_instead_of_waiting() {
        let (_dir, pool) = pool().await;
        let writes = GroupCommit::start(pool.clone());
        pool.close().await;
        let err = tokio::time::timeout(Duration::from_secs(5), insert(&writes, "a")).await.unwrap().unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }
}
