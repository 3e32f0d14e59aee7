//! Pod-level idempotency of sends (`Idempotency-Key` on `POST /v1/messages`).
//!
//! The gateway forwards each send with its own message id as the key and retries on any
//! doubt, so the pod must answer a repeated key with the first answer and never send twice,
//! also across a restart of the pod. Keys live in `<data-dir>/idempotency/keys.jsonl`, an
//! append-only log of records:
//!
//! - `pending` is synced *before* the engine is asked to send;
//! - `sent` (with the answer) after WhatsApp accepted the message;
//! - `released` when the send failed without reaching WhatsApp (the key may be used again).
//!
//! A key whose last record is `pending` was in flight when the process stopped: it may or may
//! not have left, so it is answered as [`Outcome::Unknown`] and never sent again. The same
//! holds for a send cut off inside this process once the engine had it (the task was dropped
//! at shutdown, or the engine timed out): see [`ClaimGuard::handed_to_engine`]. The log keeps
//! the most recent `max_keys` keys and is rewritten when it grows past twice that.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wa_api::pod::{Content, OutgoingMessage, SendResponse};

/// What the first request with a key ended in, as far as later requests need to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "s", content = "r")]
pub enum Outcome {
    /// WhatsApp accepted it; answer this again.
    Sent(SendResponse),
    /// In flight when the process stopped; it may have been sent.
    Unknown,
}

/// The answer to "may I send with this key?".
#[derive(Debug)]
pub enum Claim {
    /// First use: send, then [`ClaimGuard::finish`] (or drop the guard to release the key).
    New(ClaimGuard),
    /// Used before for the same request.
    Replay(Outcome),
    /// Used before for a different request.
    Conflict,
    /// The same request is being sent right now; wait for it, then claim again.
    Wait(watch::Receiver<Option<Outcome>>),
}

/// A request's fingerprint: SHA-256 over what is sent, so the same send in JSON or multipart
/// form (or with re-ordered JSON fields) is recognised as the same request.
pub fn fingerprint(msg: &OutgoingMessage) -> String {
    let mut h = Sha256::new();
    let mut field = |tag: &str, v: &[u8]| {
        h.update(tag.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v);
    };
    field("to", msg.to.to_jid().to_string().as_bytes());
    field("type", msg.kind().as_str().as_bytes());
    field("replyTo", msg.reply_to.as_deref().unwrap_or("").as_bytes());
    match &msg.content {
        Content::Text(t) => field("text", t.as_bytes()),
        Content::Media(m) => {
            field("data", &Sha256::digest(&m.data));
            field("mimetype", m.mimetype.as_bytes());
            field("filename", m.filename.as_deref().unwrap_or("").as_bytes());
            field("caption", m.caption.as_deref().unwrap_or("").as_bytes());
        }
    }
    hex::encode(h.finalize())
}

/// Cheap to clone (a handle); the file work of `claim` is meant for `spawn_blocking`.
#[derive(Clone)]
pub struct IdempotencyStore {
    inner: Arc<Mutex<Keys>>,
}

struct Keys {
    dir: PathBuf,
    max_keys: usize,
    file: File,
    records: usize,
    entries: HashMap<String, Entry>,
    /// Keys in first-use order, for eviction.
    order: VecDeque<String>,
}

#[derive(Debug)]
struct Entry {
    fingerprint: String,
    state: State,
}

#[derive(Debug)]
enum State {
    InFlight(watch::Sender<Option<Outcome>>),
    Done(Outcome),
}

#[derive(Serialize, Deserialize)]
struct Record {
    k: String,
    f: String,
    #[serde(flatten)]
    what: RecordKind,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "s", content = "r")]
enum RecordKind {
    Pending,
    Sent(SendResponse),
    Released,
}

/// Holds a claimed key while its send is in flight. Dropped without [`finish`](Self::finish)
/// or [`release`](Self::release), it releases the key (nothing was sent; a retry may send),
/// unless the message was already [handed to the engine](Self::handed_to_engine): then the
/// outcome is unknown and the key is never sent again.
pub struct ClaimGuard {
    key: String,
    fingerprint: String,
    store: Option<Arc<Mutex<Keys>>>,
    in_engine: bool,
}

impl IdempotencyStore {
    pub fn open(dir: &Path, max_keys: usize) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let path = dir.join("keys.jsonl");
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut order = VecDeque::new();
        let mut records = 0;
        let contents = match fs::read(&path) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        // Cut a torn last line (crash mid-write) so the next record does not glue onto it.
        let complete = contents
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        if complete < contents.len() {
            OpenOptions::new()
                .write(true)
                .open(&path)?
                .set_len(complete as u64)?;
        }
        {
            for line in contents[..complete]
                .split(|b| *b == b'\n')
                .filter(|l| !l.is_empty())
            {
                // Garbage (disk corruption) is skipped rather than refusing to start.
                let Ok(r) = serde_json::from_slice::<Record>(line) else {
                    continue;
                };
                records += 1;
                match r.what {
                    RecordKind::Released => {
                        entries.remove(&r.k);
                    }
                    RecordKind::Pending | RecordKind::Sent(_) => {
                        let outcome = match r.what {
                            RecordKind::Sent(resp) => Outcome::Sent(resp),
                            _ => Outcome::Unknown,
                        };
                        if !entries.contains_key(&r.k) {
                            order.push_back(r.k.clone());
                        }
                        entries.insert(
                            r.k,
                            Entry {
                                fingerprint: r.f,
                                state: State::Done(outcome),
                            },
                        );
                    }
                }
            }
        }
        order.retain(|k| entries.contains_key(k));
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let mut keys = Keys {
            dir: dir.to_owned(),
            max_keys: max_keys.max(1),
            file,
            records,
            entries,
            order,
        };
        keys.evict();
        keys.compact_if_needed()?;
        Ok(Self {
            inner: Arc::new(Mutex::new(keys)),
        })
    }

    /// Claims `key` for a request with `fingerprint`. For a new key the `pending` record is on
    /// disk before this returns.
    pub fn claim(&self, key: &str, fingerprint: &str) -> io::Result<Claim> {
        let mut k = lock(&self.inner);
        if let Some(e) = k.entries.get(key) {
            if e.fingerprint != fingerprint {
                return Ok(Claim::Conflict);
            }
            return Ok(match &e.state {
                State::Done(o) => Claim::Replay(o.clone()),
                State::InFlight(tx) => Claim::Wait(tx.subscribe()),
            });
        }
        k.write(&Record {
            k: key.to_owned(),
            f: fingerprint.to_owned(),
            what: RecordKind::Pending,
        })?;
        let (tx, _) = watch::channel(None);
        k.entries.insert(
            key.to_owned(),
            Entry {
                fingerprint: fingerprint.to_owned(),
                state: State::InFlight(tx),
            },
        );
        k.order.push_back(key.to_owned());
        k.evict();
        Ok(Claim::New(ClaimGuard {
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            store: Some(self.inner.clone()),
            in_engine: false,
        }))
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ClaimGuard {
    /// From now on the message may leave at any moment: if this guard is dropped before an
    /// outcome is recorded (the send was cut off), the key answers [`Outcome::Unknown`].
    pub fn handed_to_engine(&mut self) {
        self.in_engine = true;
    }

    /// The key this guard holds.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The engine refused the send before anything left: the key may be used again.
    pub fn release(mut self) {
        self.in_engine = false;
    }

    /// Records the outcome for later requests with the same key and wakes those waiting.
    pub fn finish(mut self, outcome: Outcome) {
        let Some(store) = self.store.take() else {
            return;
        };
        let mut k = lock(&store);
        if let Outcome::Sent(resp) = &outcome {
            let record = Record {
                k: self.key.clone(),
                f: self.fingerprint.clone(),
                what: RecordKind::Sent(resp.clone()),
            };
            if let Err(e) = k.write(&record) {
                // The `pending` record is on disk, so after a restart this key answers
                // "unknown" rather than sending again; in this process the answer is kept.
                tracing::error!(error = %e, "idempotency: cannot record a sent message");
            }
        }
        if let Some(entry) = k.entries.get_mut(&self.key) {
            if let State::InFlight(tx) = &entry.state {
                tx.send_replace(Some(outcome.clone()));
            }
            entry.state = State::Done(outcome);
        }
        if let Err(e) = k.compact_if_needed() {
            tracing::warn!(error = %e, "idempotency: compaction failed");
        }
    }
}

impl std::fmt::Debug for ClaimGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimGuard")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(store) = self.store.take() else {
            return;
        };
        let mut k = lock(&store);
        if self.in_engine {
            // Cut off mid-send. The `pending` record on disk already says "unknown" to a
            // restarted process; this process says the same, and wakes those waiting.
            if let Some(entry) = k.entries.get_mut(&self.key) {
                if let State::InFlight(tx) = &entry.state {
                    tx.send_replace(Some(Outcome::Unknown));
                }
                entry.state = State::Done(Outcome::Unknown);
            }
            return;
        }
        let record = Record {
            k: self.key.clone(),
            f: self.fingerprint.clone(),
            what: RecordKind::Released,
        };
        if let Err(e) = k.write(&record) {
            tracing::error!(error = %e, "idempotency: cannot release a key; a retry after restart will answer unknown");
        }
        // Dropping the sender wakes waiters with "no outcome": they claim again.
        k.entries.remove(&self.key);
        k.order.retain(|x| x != &self.key);
    }
}

impl Keys {
    fn write(&mut self, r: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.records += 1;
        Ok(())
    }

    /// Forgets the oldest finished keys beyond the bound (in-flight ones stay).
    fn evict(&mut self) {
        let mut scanned = 0;
        while self.entries.len() > self.max_keys && scanned < self.order.len() {
            let Some(key) = self.order.pop_front() else {
                break;
            };
            if matches!(
                self.entries.get(&key).map(|e| &e.state),
                Some(State::InFlight(_))
            ) {
                self.order.push_back(key);
                scanned += 1;
                continue;
            }
            self.entries.remove(&key);
        }
    }

    /// Rewrites the log with one record per remembered key once it has grown past twice the
    /// bound (tmp file, sync, rename: a crash keeps the old or the new log).
    fn compact_if_needed(&mut self) -> io::Result<()> {
        if self.records <= 2 * self.max_keys + 16 {
            return Ok(());
        }
        let mut buf = Vec::new();
        let mut count = 0;
        for key in &self.order {
            let Some(e) = self.entries.get(key) else {
                continue;
            };
            let what = match &e.state {
                State::Done(Outcome::Sent(r)) => RecordKind::Sent(r.clone()),
                State::Done(Outcome::Unknown) | State::InFlight(_) => RecordKind::Pending,
            };
            serde_json::to_writer(
                &mut buf,
                &Record {
                    k: key.clone(),
                    f: e.fingerprint.clone(),
                    what,
                },
            )
            .map_err(io::Error::other)?;
            buf.push(b'\n');
            count += 1;
        }
        crate::outbox::write_atomically(&self.dir, "keys.jsonl", &buf)?;
        self.file = OpenOptions::new()
            .append(true)
            .open(self.dir.join("keys.jsonl"))?;
        self.records = count;
        Ok(())
    }
}

fn lock(m: &Mutex<Keys>) -> std::sync::MutexGuard<'_, Keys> {
    // Every step is on disk before memory changes; a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use wa_api::pod::{MessageStatus, SendRequest};

    fn resp(id: &str) -> SendResponse {
        SendResponse {
            id: id.into(),
            to: "15551234567@s.whatsapp.net".into(),
            status: MessageStatus::Sent,
            timestamp: Utc::now(),
        }
    }

    fn msg(json: serde_json::Value) -> OutgoingMessage {
        serde_json::from_value::<SendRequest>(json)
            .unwrap()
            .validate(1024)
            .unwrap()
    }

    #[test]
    fn fingerprint_is_about_content_not_spelling() {
        use serde_json::json;
        let a = fingerprint(&msg(
            json!({"to": "+15551234567", "type": "text", "text": "hi"}),
        ));
        let b = fingerprint(&msg(
            json!({"text": "hi", "type": "text", "to": "15551234567@s.whatsapp.net"}),
        ));
        let c = fingerprint(&msg(
            json!({"to": "+15551234567", "type": "text", "text": "hi!"}),
        ));
        let d = fingerprint(&msg(
            json!({"to": "+15551234568", "type": "text", "text": "hi"}),
        ));
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }

    #[test]
    fn replay_conflict_and_release() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        let Claim::New(g) = s.claim("k1", "f1").unwrap() else {
            panic!("new")
        };
        assert!(matches!(s.claim("k1", "f1").unwrap(), Claim::Wait(_)));
        assert!(matches!(s.claim("k1", "f2").unwrap(), Claim::Conflict));
        g.finish(Outcome::Sent(resp("m1")));
        assert!(
            matches!(s.claim("k1", "f1").unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "m1")
        );
        assert!(matches!(s.claim("k1", "f2").unwrap(), Claim::Conflict));
        // A failed send releases the key: the next claim is new again.
        let Claim::New(g) = s.claim("k2", "f").unwrap() else {
            panic!("new")
        };
        drop(g);
        assert!(matches!(s.claim("k2", "other").unwrap(), Claim::New(_)));
    }

    #[test]
    fn a_send_cut_off_in_the_engine_is_unknown_here_and_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 10).unwrap();
            let Claim::New(mut g) = s.claim("cut", "f").unwrap() else {
                panic!("new")
            };
            g.handed_to_engine();
            let Claim::Wait(rx) = s.claim("cut", "f").unwrap() else {
                panic!("in flight")
            };
            drop(g); // the sender task is dropped at shutdown, mid-send
            assert!(matches!(*rx.borrow(), Some(Outcome::Unknown)));
            assert!(matches!(s.claim("cut", "f").unwrap(), Claim::Replay(Outcome::Unknown)));
            // Refused by the engine before anything left: released, as before.
            let Claim::New(mut g) = s.claim("refused", "f").unwrap() else {
                panic!("new")
            };
            g.handed_to_engine();
            g.release();
            assert!(matches!(s.claim("refused", "f").unwrap(), Claim::New(_)));
        }
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(matches!(s.claim("cut", "f").unwrap(), Claim::Replay(Outcome::Unknown)));
        assert!(matches!(s.claim("refused", "f").unwrap(), Claim::New(_)));
    }

    #[tokio::test]
    async fn waiters_get_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        let Claim::New(g) = s.claim("k", "f").unwrap() else {
            panic!()
        };
        let Claim::Wait(mut rx) = s.claim("k", "f").unwrap() else {
            panic!()
        };
        let waiter = tokio::spawn(async move {
            let got = rx.wait_for(Option::is_some).await.map(|v| v.clone());
            got.ok().flatten()
        });
        g.finish(Outcome::Sent(resp("m")));
        assert!(matches!(waiter.await.unwrap(), Some(Outcome::Sent(r)) if r.id == "m"));
    }

    #[test]
    fn survives_restart_and_in_flight_becomes_unknown() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 10).unwrap();
            let Claim::New(g) = s.claim("sent", "f").unwrap() else {
                panic!()
            };
            g.finish(Outcome::Sent(resp("m1")));
            let Claim::New(g) = s.claim("released", "f").unwrap() else {
                panic!()
            };
            drop(g);
            let Claim::New(g) = s.claim("crashed", "f").unwrap() else {
                panic!()
            };
            std::mem::forget(g); // the process dies mid-send
        }
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(
            matches!(s.claim("sent", "f").unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "m1")
        );
        assert!(matches!(
            s.claim("crashed", "f").unwrap(),
            Claim::Replay(Outcome::Unknown)
        ));
        assert!(matches!(s.claim("released", "f").unwrap(), Claim::New(_)));
    }

    #[test]
    fn bounded_and_compacted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 5).unwrap();
            for i in 0..40 {
                let Claim::New(g) = s.claim(&format!("k{i}"), "f").unwrap() else {
                    panic!()
                };
                g.finish(Outcome::Sent(resp(&format!("m{i}"))));
            }
            assert_eq!(s.len(), 5);
        }
        let lines = fs::read_to_string(dir.path().join("keys.jsonl"))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 2 * 5 + 16 + 2, "log not compacted: {lines} lines");
        let s = IdempotencyStore::open(dir.path(), 5).unwrap();
        assert!(matches!(s.claim("k39", "f").unwrap(), Claim::Replay(_)));
        assert!(matches!(s.claim("k35", "f").unwrap(), Claim::Replay(_)));
        assert!(
            matches!(s.claim("k0", "f").unwrap(), Claim::New(_)),
            "oldest evicted"
        );
    }

    #[test]
    fn torn_log_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 10).unwrap();
            let Claim::New(g) = s.claim("a", "f").unwrap() else {
                panic!()
            };
            g.finish(Outcome::Sent(resp("m")));
        }
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("keys.jsonl"))
            .unwrap();
        f.write_all(b"{\"k\":\"b\",\"f\":").unwrap();
        drop(f);
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(matches!(s.claim("a", "f").unwrap(), Claim::Replay(_)));
        // The torn line must not glue onto the next record.
        let Claim::New(g) = s.claim("c", "f").unwrap() else {
            panic!()
        };
        g.finish(Outcome::Sent(resp("m2")));
        drop(s);
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(matches!(s.claim("c", "f").unwrap(), Claim::Replay(_)));
    }
}
