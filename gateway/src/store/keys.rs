//! API keys. Only the SHA-256 of a raw key is stored; the raw key is shown once at creation.

use super::{Store, StoreResult, on_pool};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct KeyRecord {
    pub id: String,
    pub name: String,
    /// The first characters of the raw key, so a person can tell keys apart in a list.
    pub prefix: String,
    pub key_hash: String,
    pub admin: bool,
    /// JSON array of permissions (`send`, `read`, `manage`).
    pub permissions: String,
    /// JSON array of session names the key may use (empty for admin keys).
    pub sessions: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

const COLUMNS: &str = "id, name, prefix, key_hash, admin, permissions, sessions, created_at, revoked_at";

impl Store {
    pub async fn insert_key(&self, k: &KeyRecord) -> StoreResult<()> {
        on_pool!(self, pool => sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, key_hash, admin, permissions, sessions, created_at, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&k.id)
        .bind(&k.name)
        .bind(&k.prefix)
        .bind(&k.key_hash)
        .bind(k.admin)
        .bind(&k.permissions)
        .bind(&k.sessions)
        .bind(k.created_at)
        .bind(k.revoked_at)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        Ok(())
    }

    /// The key whose hash this is, revoked or not (the caller decides what revoked means).
    pub async fn key_by_hash(&self, key_hash: &str) -> StoreResult<Option<KeyRecord>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, KeyRecord>(
            sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM api_keys WHERE key_hash = $1"))
        )
        .bind(key_hash)
        .fetch_optional(pool)
        .await)?)
    }

    pub async fn key_by_id(&self, id: &str) -> StoreResult<Option<KeyRecord>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, KeyRecord>(
            sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1"))
        )
        .bind(id)
        .fetch_optional(pool)
        .await)?)
    }

    pub async fn list_keys(&self) -> StoreResult<Vec<KeyRecord>> {
        Ok(on_pool!(self, pool => sqlx::query_as::<_, KeyRecord>(
            sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id"))
        )
        .fetch_all(pool)
        .await)?)
    }

    /// Revokes a key; `None` when there is no such key. Revoking twice keeps the first time.
    pub async fn revoke_key(&self, id: &str, now: i64) -> StoreResult<Option<KeyRecord>> {
        on_pool!(self, pool => sqlx::query(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(pool)
        .await.map(|r| r.rows_affected()))?;
        self.key_by_id(id).await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::testing::both;

    fn key(id: &str, hash: &str) -> super::KeyRecord {
        super::KeyRecord {
            id: id.into(),
            name: "ci".into(),
            prefix: "wak_abcd".into(),
            key_hash: hash.into(),
            admin: false,
            permissions: r#"["send"]"#.into(),
            sessions: r#"["a"]"#.into(),
            created_at: 10,
            revoked_at: None,
        }
    }

    both!(keys_round_trip_and_revoke, |store| {
        let k = key("k1", "h1");
        store.insert_key(&k).await.unwrap();
        assert!(store.insert_key(&key("k2", "h1")).await.unwrap_err().is_unique_violation());
        assert_eq!(store.key_by_hash("h1").await.unwrap(), Some(k.clone()));
        assert_eq!(store.key_by_hash("nope").await.unwrap(), None);
        let revoked = store.revoke_key("k1", 20).await.unwrap().unwrap();
        assert_eq!(revoked.revoked_at, Some(20));
        let again = store.revoke_key("k1", 30).await.unwrap().unwrap();
        assert_eq!(again.revoked_at, Some(20), "first revocation time is kept");
        assert_eq!(store.revoke_key("missing", 1).await.unwrap(), None);
        assert_eq!(store.list_keys().await.unwrap().len(), 1);
    });
}
