//! What the session's bounded tables hold in memory when full: the message log
//! ([`MESSAGE_LOG`] sent messages, for `GET /v1/messages/{id}`) and the idempotency keys
//! ([`IDEMPOTENCY_KEYS`]), against their budget [`FULL_TABLES_MIB`]. A session that sends more
//! than that many messages grows by this much and then stops growing; the soak's bound on a
//! pod's growth (RELIABILITY.md) is derived from the budget. Counted with a global allocator that tracks live heap bytes, as requested and as glibc's
//! malloc lays them out (a 16-byte-aligned chunk with an 8-byte header, 32 bytes at least), so
//! the figure does not depend on the machine. One test in this binary: the counter is global.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use chrono::Utc;
use wa_api::pod::{
    FULL_TABLES_MIB, IDEMPOTENCY_KEYS, MESSAGE_LOG_ENTRIES as MESSAGE_LOG, MessageInfo,
    MessageKind, MessageStatus, SendResponse,
};
use wa_session::idempotency::IdempotencyStore;
use wa_session::session::message_log::MessageLog;

struct Counting;

static REQUESTED: AtomicIsize = AtomicIsize::new(0);
static CHUNKS: AtomicIsize = AtomicIsize::new(0);

fn chunk(size: usize) -> isize {
    ((size + 8).div_ceil(16) * 16).max(32) as isize
}

fn count(size: usize, sign: isize) {
    REQUESTED.fetch_add(sign * size as isize, Ordering::Relaxed);
    CHUNKS.fetch_add(sign * chunk(size), Ordering::Relaxed);
}

// SAFETY: every call is passed on to the system allocator unchanged; the counting only reads
// the layout.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout.size(), -1);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new_size, 1);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> (isize, isize) {
    (
        REQUESTED.load(Ordering::Relaxed),
        CHUNKS.load(Ordering::Relaxed),
    )
}

fn mib(b: isize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// A message id as WhatsApp Web makes them, a chat JID and an `Idempotency-Key` as the gateway
/// sends it (its message id, a UUID): the sizes the soak's sends have.
fn wa_id(i: usize) -> String {
    format!("3EB0{i:018X}")
}

fn jid(i: usize) -> String {
    format!("1555{:07}@s.whatsapp.net", i % 10_000_000)
}

fn key(i: usize) -> String {
    format!("0193a1b2-c3d4-7e5f-8a9b-{i:012x}")
}

#[test]
fn full_tables_stay_within_their_budget() {
    // Built first, outside the measurement: the records of a full idempotency log on disk.
    let dir = tempfile::tempdir().unwrap();
    let mut log = String::new();
    for i in 0..IDEMPOTENCY_KEYS {
        let response = SendResponse {
            id: wa_id(i),
            to: jid(i),
            status: MessageStatus::Sent,
            timestamp: Utc::now(),
        };
        let f = format!("{:064x}", i);
        log += &format!("{{\"k\":\"{}\",\"f\":\"{f}\",\"s\":\"pending\"}}\n", key(i));
        log += &serde_json::to_string(
            &serde_json::json!({"k": key(i), "f": f, "s": "sent", "r": response}),
        )
        .unwrap();
        log.push('\n');
    }
    std::fs::write(dir.path().join("keys.1.jsonl"), log).unwrap();
    let before = live();
    // Each message built inside the loop, so what is left afterwards is the table alone.
    let mut messages = MessageLog::new(MESSAGE_LOG);
    for i in 0..MESSAGE_LOG {
        messages.insert(MessageInfo {
            id: wa_id(i),
            to: jid(i),
            kind: MessageKind::Text,
            status: MessageStatus::Sent,
            timestamp: Utc::now(),
            updated_at: Utc::now(),
            error: None,
        });
    }
    for i in 0..MESSAGE_LOG {
        messages.update(&wa_id(i), MessageStatus::Read, None, Utc::now());
    }
    assert_eq!(messages.len(), MESSAGE_LOG);
    let after_log = live();
    let keys = IdempotencyStore::open(dir.path(), IDEMPOTENCY_KEYS).unwrap();
    assert_eq!(keys.len(), IDEMPOTENCY_KEYS);
    let after_keys = live();

    let log_bytes = (after_log.0 - before.0, after_log.1 - before.1);
    let key_bytes = (after_keys.0 - after_log.0, after_keys.1 - after_log.1);
    let total = log_bytes.1 + key_bytes.1;
    println!(
        "message log, {MESSAGE_LOG} entries: {:.2} MiB requested, {:.2} MiB in malloc chunks ({} B per entry)",
        mib(log_bytes.0),
        mib(log_bytes.1),
        log_bytes.1 / MESSAGE_LOG as isize
    );
    println!(
        "idempotency keys, {IDEMPOTENCY_KEYS} keys: {:.2} MiB requested, {:.2} MiB in malloc chunks ({} B per key)",
        mib(key_bytes.0),
        mib(key_bytes.1),
        key_bytes.1 / IDEMPOTENCY_KEYS as isize
    );
    println!("both: {:.2} MiB in malloc chunks", mib(total));
    assert!(
        mib(total) <= FULL_TABLES_MIB,
        "the full tables take {:.2} MiB, over their budget of {FULL_TABLES_MIB} MiB",
        mib(total)
    );
    drop((messages, keys));
}
