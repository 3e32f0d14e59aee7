//! Small pieces used across the gateway: time in the store's unit, ids, random secrets.

use base64::Engine as _;
use chrono::{DateTime, TimeZone, Utc};
use rand::RngCore;

/// Milliseconds since the Unix epoch: the store's time unit on both databases.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub fn to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// A new id that sorts by creation time (UUIDv7), so history pages by id.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// `bytes` random bytes, URL-safe base64 without padding.
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Hex SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation() {
        let a = new_id();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id();
        assert!(a < b, "{a} !< {b}");
    }

    #[test]
    fn secrets_are_distinct_and_sized() {
        let a = random_secret(32);
        assert_eq!(a.len(), 43);
        assert_ne!(a, random_secret(32));
    }

    #[test]
    fn time_round_trip() {
        let t = to_time(1_700_000_000_123);
        assert_eq!(t.timestamp_millis(), 1_700_000_000_123);
    }
}
