//! Pod-level idempotency of sends (`Idempotency-Key` on `POST /v1/messages`).
//!
//! The gateway forwards each send with its own message id as the key and retries on any
//! doubt, so the pod must answer a repeated key with the first answer and never send twice,
//! also across a restart of the pod. Keys live in `<data-dir>/idempotency/`, an append-only
//! log of records:
//!
//! - `pending` is synced *before* the engine is asked to send;
//! - `sent` (with the answer) after WhatsApp accepted the message; written but not synced on
//!   its own: the next synced record carries it to disk (a killed process loses nothing the
//!   kernel has; a crash of the machine may lose it, and the key then answers "unknown" from its
//!   `pending` record, never sends again). That saves one `fdatasync` of the two per send;
//! - `released` when the send failed without reaching WhatsApp (the key may be used again).
//!
//! A key whose last record is `pending` was in flight when the process stopped: it may or may
//! not have left, so it is answered as [`Outcome::Unknown`] and never sent again. The same
//! holds for a send cut off inside this process once the engine had it (the task was dropped
//! at shutdown, or the engine timed out): see [`ClaimGuard::handed_to_engine`].
//!
//! The most recent `max_keys` keys are remembered. The log is split into segment files
//! (`keys.<n>.jsonl`, read in order of `n`; `keys.jsonl`, the single file of earlier versions,
//! counts as segment 0), a new one started every `max_keys` records. The oldest segment is
//! deleted once no remembered key's latest record is in it, so the log is never rewritten
//! while sends wait: a full rewrite of 10,000 keys on every 10,000th send comes to every session
//! of a node in the same second under even load (the 10-minute soak stalled at that moment in
//! both of its runs; RELIABILITY.md). Only a key held far longer than the rest (a send stuck in
//! flight) keeps an old segment alive; past [`MAX_CLOSED_SEGMENTS`] its record is copied
//! forward and the segment deleted.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wa_api::pod::{Content, OutgoingMessage, SendResponse};

/// Closed segments kept on disk before the oldest one's remembered keys are copied forward.
/// Under steady use the remembered keys span two or three segments.
const MAX_CLOSED_SEGMENTS: usize = 8;

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
/// form (or with re-ordered JSON fields) is recognised as the same request. Written to the
/// log in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 32]);

impl Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.as_bytes(), &mut out).map_err(serde::de::Error::custom)?;
        Ok(Self(out))
    }
}

/// The [`Fingerprint`] of a send.
pub fn fingerprint(msg: &OutgoingMessage) -> Fingerprint {
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
    Fingerprint(h.finalize().into())
}

/// Cheap to clone (a handle); the file work of `claim` is meant for `spawn_blocking`.
#[derive(Clone)]
pub struct IdempotencyStore {
    inner: Arc<Mutex<Keys>>,
}

struct Keys {
    dir: PathBuf,
    max_keys: usize,
    /// The segment being appended to (the last of `segments`) and its record count.
    file: File,
    active_records: usize,
    /// Whether the active segment holds records not synced yet (`sent` ones). Synced before the
    /// segment is closed and before any segment is deleted, as an unsynced record may be what
    /// made an older segment unneeded.
    unsynced: bool,
    /// `fdatasync`s of the log so far (for tests).
    syncs: u64,
    /// Segments on disk, oldest first.
    segments: VecDeque<Segment>,
    /// 10,000 of these stay in memory: the key is shared with `order`, the answer boxed.
    entries: HashMap<Arc<str>, Entry>,
    /// Keys in first-use order, for eviction.
    order: VecDeque<Arc<str>>,
}

struct Segment {
    number: u64,
    /// Remembered keys whose latest record is in this segment.
    live: usize,
}

#[derive(Debug)]
struct Entry {
    fingerprint: Fingerprint,
    /// The segment holding this key's latest record.
    segment: u64,
    state: State,
}

#[derive(Debug)]
enum State {
    InFlight(watch::Sender<Option<Outcome>>),
    Sent(Box<SendResponse>),
    Unknown,
}

impl State {
    fn outcome(&self) -> Option<Outcome> {
        match self {
            State::InFlight(_) => None,
            State::Sent(r) => Some(Outcome::Sent((**r).clone())),
            State::Unknown => Some(Outcome::Unknown),
        }
    }

    fn done(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Sent(r) => State::Sent(Box::new(r)),
            Outcome::Unknown => State::Unknown,
        }
    }

    /// The record that restores this state after a restart (in flight reads back as unknown).
    fn record(&self) -> RecordKind {
        match self {
            State::Sent(r) => RecordKind::Sent((**r).clone()),
            State::InFlight(_) | State::Unknown => RecordKind::Pending,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Record {
    k: String,
    f: Fingerprint,
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
    key: Arc<str>,
    fingerprint: Fingerprint,
    store: Option<Arc<Mutex<Keys>>>,
    in_engine: bool,
}

fn segment_name(number: u64) -> String {
    if number == 0 {
        "keys.jsonl".to_owned()
    } else {
        format!("keys.{number}.jsonl")
    }
}

/// The numbers of the segments in `dir`, oldest first.
fn segments_in(dir: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir)? {
        if let Some(n) = entry?.file_name().to_str().and_then(segment_number) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

fn segment_number(name: &str) -> Option<u64> {
    if name == "keys.jsonl" {
        return Some(0);
    }
    let n = name.strip_prefix("keys.")?.strip_suffix(".jsonl")?;
    // Only the names this module writes: no sign, no leading zero.
    if n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok().filter(|n| *n > 0)
}

impl IdempotencyStore {
    pub fn open(dir: &Path, max_keys: usize) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        // Left by the rewrite of earlier versions when cut off before its rename.
        match fs::remove_file(dir.join(".keys.jsonl.tmp")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let numbers = segments_in(dir)?;
        let mut entries: HashMap<Arc<str>, Entry> = HashMap::new();
        let mut order = VecDeque::new();
        for &number in &numbers {
            let contents = fs::read(dir.join(segment_name(number)))?;
            // A torn last line (crash mid-write) or garbage (disk corruption) is skipped
            // rather than refusing to start; no segment is appended to after a restart.
            for line in contents.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let Ok(r) = serde_json::from_slice::<Record>(line) else {
                    continue;
                };
                let state = match r.what {
                    RecordKind::Released => {
                        entries.remove(r.k.as_str());
                        continue;
                    }
                    RecordKind::Sent(resp) => State::Sent(Box::new(resp)),
                    RecordKind::Pending => State::Unknown,
                };
                let entry = Entry {
                    fingerprint: r.f,
                    segment: number,
                    state,
                };
                match entries.get_mut(r.k.as_str()) {
                    Some(e) => *e = entry,
                    None => {
                        let key: Arc<str> = Arc::from(r.k);
                        order.push_back(key.clone());
                        entries.insert(key, entry);
                    }
                }
            }
        }
        order.retain(|k| entries.contains_key(k));
        let mut segments: VecDeque<Segment> = numbers
            .iter()
            .map(|&number| Segment { number, live: 0 })
            .collect();
        let active = numbers.last().map_or(1, |n| n + 1);
        segments.push_back(Segment {
            number: active,
            live: 0,
        });
        let file = create_segment(dir, active)?;
        let mut keys = Keys {
            dir: dir.to_owned(),
            max_keys: max_keys.max(1),
            file,
            active_records: 0,
            unsynced: false,
            syncs: 0,
            segments,
            entries,
            order,
        };
        keys.evict();
        let latest: Vec<u64> = keys.entries.values().map(|e| e.segment).collect();
        for segment in latest {
            keys.add_live(segment);
        }
        keys.drop_old_segments()?;
        Ok(Self {
            inner: Arc::new(Mutex::new(keys)),
        })
    }

    /// Claims `key` for a request with `fingerprint`. For a new key the `pending` record is on
    /// disk before this returns.
    pub fn claim(&self, key: &str, fingerprint: &Fingerprint) -> io::Result<Claim> {
        let mut k = lock(&self.inner);
        if let Some(e) = k.entries.get(key) {
            if e.fingerprint != *fingerprint {
                return Ok(Claim::Conflict);
            }
            return Ok(match &e.state {
                State::InFlight(tx) => Claim::Wait(tx.subscribe()),
                done => Claim::Replay(done.outcome().expect("a finished state has an outcome")),
            });
        }
        let segment = k.write(&Record {
            k: key.to_owned(),
            f: *fingerprint,
            what: RecordKind::Pending,
        })?;
        let (tx, _) = watch::channel(None);
        let key: Arc<str> = Arc::from(key);
        k.entries.insert(
            key.clone(),
            Entry {
                fingerprint: *fingerprint,
                segment,
                state: State::InFlight(tx),
            },
        );
        k.add_live(segment);
        k.order.push_back(key.clone());
        k.evict();
        if let Err(e) = k.drop_old_segments() {
            tracing::warn!(error = %e, "idempotency: cannot remove an old log segment");
        }
        Ok(Claim::New(ClaimGuard {
            key,
            fingerprint: *fingerprint,
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
        let mut written = None;
        if let Outcome::Sent(resp) = &outcome {
            let record = Record {
                k: self.key.to_string(),
                f: self.fingerprint,
                what: RecordKind::Sent(resp.clone()),
            };
            match k.write(&record) {
                Ok(segment) => written = Some(segment),
                // The `pending` record is on disk, so after a restart this key answers
                // "unknown" rather than sending again; in this process the answer is kept.
                Err(e) => tracing::error!(error = %e, "idempotency: cannot record a sent message"),
            }
        }
        if let Some(entry) = k.entries.get_mut(&self.key) {
            if let State::InFlight(tx) = &entry.state {
                tx.send_replace(Some(outcome.clone()));
            }
            entry.state = State::done(outcome);
        }
        if let Some(segment) = written {
            k.move_latest(&self.key, segment);
        }
        if let Err(e) = k.drop_old_segments() {
            tracing::warn!(error = %e, "idempotency: cannot remove an old log segment");
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
                entry.state = State::Unknown;
            }
            return;
        }
        let record = Record {
            k: self.key.to_string(),
            f: self.fingerprint,
            what: RecordKind::Released,
        };
        if let Err(e) = k.write(&record) {
            tracing::error!(error = %e, "idempotency: cannot release a key; a retry after restart will answer unknown");
        }
        // Dropping the sender wakes waiters with "no outcome": they claim again.
        if let Some(e) = k.entries.remove(&self.key) {
            k.remove_live(e.segment);
        }
        k.order.retain(|x| x != &self.key);
    }
}

impl Keys {
    /// Appends a record, starting a new segment first if the active one is full, and syncs it
    /// unless it is a `sent` record (see the module doc); returns the segment it went to.
    fn write(&mut self, r: &Record) -> io::Result<u64> {
        if self.active_records >= self.max_keys {
            self.start_segment()?;
        }
        let mut line = serde_json::to_vec(r).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.active_records += 1;
        if matches!(r.what, RecordKind::Sent(_)) {
            self.unsynced = true;
        } else {
            self.sync()?;
        }
        Ok(self.active())
    }

    /// Syncs the active segment (and with it every record written to it so far).
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.syncs += 1;
        self.unsynced = false;
        Ok(())
    }

    fn sync_if_needed(&mut self) -> io::Result<()> {
        if self.unsynced { self.sync() } else { Ok(()) }
    }

    fn active(&self) -> u64 {
        self.segments.back().expect("the active segment").number
    }

    fn start_segment(&mut self) -> io::Result<()> {
        self.sync_if_needed()?;
        let number = self.active() + 1;
        self.file = create_segment(&self.dir, number)?;
        self.segments.push_back(Segment { number, live: 0 });
        self.active_records = 0;
        Ok(())
    }

    fn segment_mut(&mut self, number: u64) -> Option<&mut Segment> {
        let i = self
            .segments
            .binary_search_by_key(&number, |s| s.number)
            .ok()?;
        self.segments.get_mut(i)
    }

    /// A remembered key's latest record is now in segment `to`.
    fn move_latest(&mut self, key: &str, to: u64) {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let from = std::mem::replace(&mut e.segment, to);
        self.remove_live(from);
        self.add_live(to);
    }

    fn add_live(&mut self, number: u64) {
        if let Some(s) = self.segment_mut(number) {
            s.live += 1;
        }
    }

    fn remove_live(&mut self, number: u64) {
        if let Some(s) = self.segment_mut(number) {
            s.live = s.live.saturating_sub(1);
        }
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
            if let Some(e) = self.entries.remove(&key) {
                self.remove_live(e.segment);
            }
        }
    }

    /// Deletes the oldest segments that no remembered key needs, oldest first only (a newer
    /// segment may hold the `released` record that cancels an older `pending` one). Past
    /// [`MAX_CLOSED_SEGMENTS`] the oldest segment's remembered keys are written again to the
    /// active segment first.
    fn drop_old_segments(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            if oldest.live > 0 {
                if self.segments.len() - 1 <= MAX_CLOSED_SEGMENTS {
                    return Ok(());
                }
                self.carry_forward(oldest.number)?;
            }
            let number = self.segments[0].number;
            self.sync_if_needed()?;
            match fs::remove_file(self.dir.join(segment_name(number))) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            self.segments.pop_front();
        }
        Ok(())
    }

    /// Writes the latest record of every remembered key held by segment `number` to the active
    /// segment (one write, one sync).
    fn carry_forward(&mut self, number: u64) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut moved = 0;
        for key in &self.order {
            let Some(e) = self.entries.get(key) else {
                continue;
            };
            if e.segment != number {
                continue;
            }
            let record = Record {
                k: key.to_string(),
                f: e.fingerprint,
                what: e.state.record(),
            };
            serde_json::to_writer(&mut buf, &record).map_err(io::Error::other)?;
            buf.push(b'\n');
            moved += 1;
        }
        self.file.write_all(&buf)?;
        self.sync()?;
        self.active_records += moved;
        let active = self.active();
        for e in self.entries.values_mut() {
            if e.segment == number {
                e.segment = active;
            }
        }
        self.segments[0].live = 0;
        if let Some(s) = self.segments.back_mut() {
            s.live += moved;
        }
        Ok(())
    }
}

/// Creates an empty segment and makes its name durable, so records synced into it survive a
/// crash.
fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(segment_name(number)))?;
    File::open(dir)?.sync_all()?;
    Ok(file)
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

    fn fp(s: &str) -> Fingerprint {
        Fingerprint(Sha256::digest(s.as_bytes()).into())
    }

    /// Claims a key that must be new.
    fn new(s: &IdempotencyStore, key: &str, f: &str) -> ClaimGuard {
        match s.claim(key, &fp(f)).unwrap() {
            Claim::New(g) => g,
            other => panic!("{key}: expected a new claim, got {other:?}"),
        }
    }

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
        let g = new(&s, "k1", "f1");
        assert!(matches!(s.claim("k1", &fp("f1")).unwrap(), Claim::Wait(_)));
        assert!(matches!(s.claim("k1", &fp("f2")).unwrap(), Claim::Conflict));
        g.finish(Outcome::Sent(resp("m1")));
        assert!(
            matches!(s.claim("k1", &fp("f1")).unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "m1")
        );
        assert!(matches!(s.claim("k1", &fp("f2")).unwrap(), Claim::Conflict));
        // A failed send releases the key: the next claim is new again.
        let g = new(&s, "k2", "f");
        drop(g);
        assert!(matches!(
            s.claim("k2", &fp("other")).unwrap(),
            Claim::New(_)
        ));
    }

    #[test]
    fn a_send_cut_off_in_the_engine_is_unknown_here_and_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 10).unwrap();
            let mut g = new(&s, "cut", "f");
            g.handed_to_engine();
            let Claim::Wait(rx) = s.claim("cut", &fp("f")).unwrap() else {
                panic!("in flight")
            };
            drop(g); // the sender task is dropped at shutdown, mid-send
            assert!(matches!(*rx.borrow(), Some(Outcome::Unknown)));
            assert!(matches!(
                s.claim("cut", &fp("f")).unwrap(),
                Claim::Replay(Outcome::Unknown)
            ));
            // Refused by the engine before anything left: released, as before.
            let mut g = new(&s, "refused", "f");
            g.handed_to_engine();
            g.release();
            assert!(matches!(
                s.claim("refused", &fp("f")).unwrap(),
                Claim::New(_)
            ));
        }
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(matches!(
            s.claim("cut", &fp("f")).unwrap(),
            Claim::Replay(Outcome::Unknown)
        ));
        assert!(matches!(
            s.claim("refused", &fp("f")).unwrap(),
            Claim::New(_)
        ));
    }

    #[tokio::test]
    async fn waiters_get_the_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        let g = new(&s, "k", "f");
        let Claim::Wait(mut rx) = s.claim("k", &fp("f")).unwrap() else {
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
            let g = new(&s, "sent", "f");
            g.finish(Outcome::Sent(resp("m1")));
            let g = new(&s, "released", "f");
            drop(g);
            let g = new(&s, "crashed", "f");
            std::mem::forget(g); // the process dies mid-send
        }
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(
            matches!(s.claim("sent", &fp("f")).unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "m1")
        );
        assert!(matches!(
            s.claim("crashed", &fp("f")).unwrap(),
            Claim::Replay(Outcome::Unknown)
        ));
        assert!(matches!(
            s.claim("released", &fp("f")).unwrap(),
            Claim::New(_)
        ));
    }

    /// Every line of every segment file, oldest segment first.
    fn log_lines(dir: &Path) -> Vec<String> {
        segments_in(dir)
            .unwrap()
            .iter()
            .flat_map(|n| {
                fs::read_to_string(dir.join(segment_name(*n)))
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn segment_files(dir: &Path) -> usize {
        segments_in(dir).unwrap().len()
    }

    fn syncs(s: &IdempotencyStore) -> (u64, bool) {
        let k = lock(&s.inner);
        (k.syncs, k.unsynced)
    }

    /// Whether a store opened again on `dir` (a restart) answers `key` with its recorded answer.
    fn replays_sent_after_restart(dir: &Path, max_keys: usize, key: &str) -> bool {
        let s = IdempotencyStore::open(dir, max_keys).unwrap();
        matches!(
            s.claim(key, &fp("f")).unwrap(),
            Claim::Replay(Outcome::Sent(_))
        )
    }

    #[test]
    fn a_send_costs_one_sync_and_its_sent_record_goes_to_disk_with_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdempotencyStore::open(dir.path(), 100).unwrap();
        new(&s, "a", "f").finish(Outcome::Sent(resp("m1")));
        assert_eq!(syncs(&s), (1, true), "only the pending record was synced");
        new(&s, "b", "f").finish(Outcome::Sent(resp("m2")));
        assert_eq!(
            syncs(&s),
            (2, true),
            "b's pending record synced a's sent record with it"
        );
        // A released key is synced at once (its pending record too).
        drop(new(&s, "c", "f"));
        assert_eq!(syncs(&s), (4, false));
        // Written all the same: a restarted process replays the answer (the kernel has the
        // page; only a crash of the machine could lose it, and the key would answer unknown).
        drop(s);
        assert!(replays_sent_after_restart(dir.path(), 100, "b"));
    }

    #[test]
    fn no_segment_is_deleted_while_the_record_that_replaced_it_is_unsynced() {
        let dir = tempfile::tempdir().unwrap();
        let s = IdempotencyStore::open(dir.path(), 3).unwrap();
        // A slow send keeps the oldest segment alive while others pass and are forgotten.
        let slow = new(&s, "slow", "f");
        for i in 0..6 {
            new(&s, &format!("k{i}"), "f").finish(Outcome::Sent(resp(&format!("m{i}"))));
        }
        let before = segments_in(dir.path()).unwrap();
        slow.finish(Outcome::Sent(resp("m-slow")));
        let after = segments_in(dir.path()).unwrap();
        assert!(
            before.iter().any(|n| !after.contains(n)),
            "the slow key's sent record freed its segment: {before:?} → {after:?}"
        );
        // Lost in a crash, that record would leave the key with no record at all: it could be
        // sent again. So it was synced before the segment went.
        assert!(
            !syncs(&s).1,
            "a segment was deleted before the record that replaced it was synced"
        );
        drop(s);
        assert!(replays_sent_after_restart(dir.path(), 3, "slow"));
    }

    #[test]
    fn bounded_on_disk_without_rewriting() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 5).unwrap();
            for i in 0..400 {
                let g = new(&s, &format!("k{i}"), "f");
                g.finish(Outcome::Sent(resp(&format!("m{i}"))));
                assert_eq!(s.len(), (i + 1).min(5));
                // The last 5 keys' records span at most 10 records: two full segments of 5,
                // and the one being written.
                assert!(
                    segment_files(dir.path()) <= 4,
                    "old segments kept at key {i}"
                );
            }
        }
        // Nothing was copied: every key's records were written once, `pending` then `sent`.
        let lines = log_lines(dir.path());
        assert!(lines.len() <= 4 * 5, "{} lines", lines.len());
        let mut seen = std::collections::HashMap::<String, Vec<String>>::new();
        for l in &lines {
            let r: Record = serde_json::from_str(l).unwrap();
            let kind = match r.what {
                RecordKind::Pending => "pending",
                RecordKind::Sent(_) => "sent",
                RecordKind::Released => "released",
            };
            seen.entry(r.k).or_default().push(kind.to_owned());
        }
        for (k, kinds) in &seen {
            assert!(
                kinds == &["pending", "sent"] || kinds == &["sent"],
                "{k}: {kinds:?}"
            );
        }
        let s = IdempotencyStore::open(dir.path(), 5).unwrap();
        assert!(matches!(
            s.claim("k399", &fp("f")).unwrap(),
            Claim::Replay(_)
        ));
        assert!(matches!(
            s.claim("k395", &fp("f")).unwrap(),
            Claim::Replay(_)
        ));
        assert!(
            matches!(s.claim("k0", &fp("f")).unwrap(), Claim::New(_)),
            "oldest evicted"
        );
    }

    #[test]
    fn a_key_stuck_in_flight_is_carried_forward_and_the_log_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 5).unwrap();
            let stuck = new(&s, "stuck", "f");
            let sent = new(&s, "early", "f");
            sent.finish(Outcome::Sent(resp("early")));
            for i in 0..400 {
                let g = new(&s, &format!("k{i}"), "f");
                g.finish(Outcome::Sent(resp(&format!("m{i}"))));
                assert!(
                    segment_files(dir.path()) <= MAX_CLOSED_SEGMENTS + 1,
                    "{} segments at key {i}",
                    segment_files(dir.path())
                );
            }
            assert!(matches!(
                s.claim("stuck", &fp("f")).unwrap(),
                Claim::Wait(_)
            ));
            std::mem::forget(stuck); // the process dies with the send still in flight
        }
        let s = IdempotencyStore::open(dir.path(), 5).unwrap();
        assert!(
            matches!(
                s.claim("stuck", &fp("f")).unwrap(),
                Claim::Replay(Outcome::Unknown)
            ),
            "the in-flight key survived the deletion of the segment its `pending` record was in"
        );
        assert!(
            matches!(s.claim("early", &fp("f")).unwrap(), Claim::New(_)),
            "evicted"
        );
        assert!(
            matches!(s.claim("k399", &fp("f")).unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "m399")
        );
    }

    #[test]
    fn a_released_key_stays_released_while_its_pending_record_is_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 3).unwrap();
            let g = new(&s, "keep", "f");
            g.finish(Outcome::Sent(resp("keep")));
            let g = new(&s, "released", "f");
            drop(g);
            // Fill segments with more releases: the `released` record lands in a newer
            // segment than its `pending` record.
            for i in 0..5 {
                let g = new(&s, &format!("r{i}"), "f");
                drop(g);
            }
        }
        let s = IdempotencyStore::open(dir.path(), 3).unwrap();
        assert!(matches!(
            s.claim("released", &fp("other")).unwrap(),
            Claim::New(_)
        ));
        assert!(
            matches!(s.claim("keep", &fp("f")).unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "keep")
        );
    }

    #[test]
    fn the_single_log_file_of_earlier_versions_is_read_and_retired() {
        let dir = tempfile::tempdir().unwrap();
        let legacy = |k: &str, what: RecordKind| {
            let mut l = serde_json::to_string(&Record {
                k: k.into(),
                f: fp("f"),
                what,
            })
            .unwrap();
            l.push('\n');
            l
        };
        let mut old = String::new();
        old += &legacy("sent", RecordKind::Pending);
        old += &legacy("sent", RecordKind::Sent(resp("m-old")));
        old += &legacy("cut", RecordKind::Pending);
        fs::write(dir.path().join("keys.jsonl"), old).unwrap();
        fs::write(dir.path().join(".keys.jsonl.tmp"), "half a rewrite").unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 2).unwrap();
            assert!(!dir.path().join(".keys.jsonl.tmp").exists());
            assert!(
                matches!(s.claim("sent", &fp("f")).unwrap(), Claim::Replay(Outcome::Sent(r)) if r.id == "m-old")
            );
            assert!(matches!(
                s.claim("cut", &fp("f")).unwrap(),
                Claim::Replay(Outcome::Unknown)
            ));
            for i in 0..6 {
                let g = new(&s, &format!("k{i}"), "f");
                g.finish(Outcome::Sent(resp(&format!("m{i}"))));
            }
        }
        assert!(
            !dir.path().join("keys.jsonl").exists(),
            "the old file is deleted once none of its keys is remembered"
        );
        let s = IdempotencyStore::open(dir.path(), 2).unwrap();
        assert!(matches!(s.claim("k5", &fp("f")).unwrap(), Claim::Replay(_)));
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_number("keys.jsonl"), Some(0));
        assert_eq!(segment_number("keys.12.jsonl"), Some(12));
        for other in [
            "keys.0.jsonl",
            "keys.012.jsonl",
            "keys.-1.jsonl",
            "keys..jsonl",
            "keys.1.jsonl.tmp",
            ".keys.jsonl.tmp",
            "keys.+1.jsonl",
        ] {
            assert_eq!(segment_number(other), None, "{other}");
        }
        for n in [0, 1, 12, u64::MAX] {
            assert_eq!(segment_number(&segment_name(n)), Some(n));
        }
    }

    #[test]
    fn torn_log_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = IdempotencyStore::open(dir.path(), 10).unwrap();
            let g = new(&s, "a", "f");
            g.finish(Outcome::Sent(resp("m")));
        }
        let newest = *segments_in(dir.path()).unwrap().last().unwrap();
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(segment_name(newest)))
            .unwrap();
        f.write_all(b"{\"k\":\"b\",\"f\":").unwrap();
        drop(f);
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(matches!(s.claim("a", &fp("f")).unwrap(), Claim::Replay(_)));
        // The torn line must not glue onto the next record.
        let g = new(&s, "c", "f");
        g.finish(Outcome::Sent(resp("m2")));
        drop(s);
        let s = IdempotencyStore::open(dir.path(), 10).unwrap();
        assert!(matches!(s.claim("c", &fp("f")).unwrap(), Claim::Replay(_)));
    }
}
