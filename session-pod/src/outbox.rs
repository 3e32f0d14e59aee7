//! The event outbox: events the session must deliver to the gateway, kept on the data volume
//! until the gateway acknowledges them.
//!
//! Format (in `<data-dir>/outbox/`), chosen for being obviously crash-safe with nothing but
//! appends, `fsync` and `rename`:
//!
//! - `events-<generation>.jsonl`: one [`PodEvent`] per line, append-only. A batch of events is
//!   written and `fdatasync`'d before anyone is told it happened.
//! - `acked`: `<generation> <byte offset>`; everything before the offset was acknowledged
//!   (2xx) by the gateway. Replaced atomically (write temporary file, `fsync`, `rename`).
//!
//! A crash can leave a torn last line (cut at open), or a delivered batch whose offset was not
//! yet recorded (delivered again: the gateway de-duplicates by event id). It cannot lose an
//! event that was appended, nor replay one whose acknowledgement was recorded.
//!
//! Compaction starts a new generation: the unacknowledged tail is copied into
//! `events-<generation+1>.jsonl`, synced, and only then does `acked` switch to
//! `<generation+1> 0`. Until that rename the old pair is authoritative, so a crash at any step
//! leaves either the old or the new pair whole; stray files of other generations are removed
//! at open.
//!
//! The outbox is bounded (`max_events`): when the gateway stays unreachable long enough to
//! exceed it, the oldest events are dropped (counted in a metric and logged) rather than
//! filling the volume that also holds the account's keys.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wa_api::pod::PodEvent;

/// Compact when at least this many acknowledged bytes precede the unacknowledged tail.
const COMPACT_MIN_ACKED_BYTES: u64 = 1024 * 1024;

/// Events waiting for delivery, with their positions in the current file.
pub struct EventOutbox {
    dir: PathBuf,
    max_events: usize,
    state: Mutex<Files>,
}

struct Files {
    generation: u64,
    file: File,
    /// Bytes in the current file (the end of its last complete line).
    len: u64,
    /// Everything before this offset is acknowledged.
    acked: u64,
    /// End offset of each unacknowledged event, oldest first.
    pending_ends: VecDeque<u64>,
    /// Events dropped because the outbox was full, since start.
    dropped: u64,
}

/// Up to a batch of unacknowledged events, as the JSON body of an `EventBatch`.
#[derive(Debug)]
pub struct Batch {
    /// `{"events":[…]}`, built from the stored lines without re-serializing them.
    pub body: Vec<u8>,
    /// How many events the body carries.
    pub count: usize,
    generation: u64,
    end: u64,
}

impl EventOutbox {
    /// Opens (or creates) the outbox in `dir`, cutting a torn last line left by a crash.
    pub fn open(dir: &Path, max_events: usize) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        let (generation, mut acked) = read_acked(&dir.join("acked"))?;
        remove_other_generations(dir, generation)?;
        let path = events_path(dir, generation);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        let mut contents = Vec::new();
        file.seek(SeekFrom::Start(0))?;
        file.read_to_end(&mut contents)?;
        // Keep only complete lines: a crash mid-append leaves a line without its newline.
        let len = contents
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(0, |i| i + 1);
        if len < contents.len() {
            tracing::warn!(path = %path.display(), cut = contents.len() - len, "outbox: cutting a torn last line");
            file.set_len(len as u64)?;
            file.sync_data()?;
        }
        let len = len as u64;
        if acked > len {
            // The offset outlived its file (cannot happen with this writer); redeliver all.
            tracing::warn!(
                acked,
                len,
                "outbox: acknowledged offset past the end; delivering everything again"
            );
            acked = 0;
        }
        let mut pending_ends = VecDeque::new();
        let mut pos = acked as usize;
        for line in contents[acked as usize..len as usize].split_inclusive(|b| *b == b'\n') {
            pos += line.len();
            pending_ends.push_back(pos as u64);
        }
        drop(contents);
        Ok(Self {
            dir: dir.to_owned(),
            max_events: max_events.max(1),
            state: Mutex::new(Files {
                generation,
                file,
                len,
                acked,
                pending_ends,
                dropped: 0,
            }),
        })
    }

    /// Appends events and syncs them to disk; returns once they are durable.
    pub fn append(&self, events: &[PodEvent]) -> io::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(events.len() * 256);
        let mut ends = Vec::with_capacity(events.len());
        for e in events {
            serde_json::to_writer(&mut buf, e).map_err(io::Error::other)?;
            buf.push(b'\n');
            ends.push(buf.len() as u64);
        }
        let mut s = self.lock();
        if let Err(e) = s.file.write_all(&buf).and_then(|()| s.file.sync_data()) {
            // Disk full or I/O error: take back whatever part was written, so the next append
            // does not follow a torn line.
            let _ = s.file.set_len(s.len);
            return Err(e);
        }
        let base = s.len;
        s.pending_ends.extend(ends.iter().map(|e| base + e));
        s.len += buf.len() as u64;
        let over = s.pending_ends.len().saturating_sub(self.max_events);
        if over > 0 {
            let new_acked = s.pending_ends[over - 1];
            tracing::warn!(
                dropped = over,
                max = self.max_events,
                "outbox full: dropping the oldest undelivered events"
            );
            s.dropped += over as u64;
            self.record_ack(&mut s, new_acked)?;
        }
        Ok(())
    }

    /// The oldest unacknowledged events: at most `max_events`, and at most `max_bytes` unless a
    /// single event is larger (it then goes alone, so nothing is stuck).
    pub fn peek(&self, max_events: usize, max_bytes: usize) -> io::Result<Option<Batch>> {
        let s = self.lock();
        let Some(&first_end) = s.pending_ends.front() else {
            return Ok(None);
        };
        let mut end = first_end;
        let mut count = 1;
        for &e in s.pending_ends.iter().skip(1) {
            if count >= max_events.max(1) || (e - s.acked) as usize > max_bytes {
                break;
            }
            end = e;
            count += 1;
        }
        let mut raw = vec![0u8; (end - s.acked) as usize];
        s.file.read_exact_at(&mut raw, s.acked)?;
        let generation = s.generation;
        drop(s);
        let mut body = Vec::with_capacity(raw.len() + 16);
        body.extend_from_slice(b"{\"events\":[");
        let mut written = 0;
        for line in raw.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            // A line that is not JSON would make the whole batch unreadable for the gateway
            // forever; it can only come from disk corruption, so skip it loudly.
            if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_err() {
                tracing::error!("outbox: skipping a corrupt event line");
                continue;
            }
            if written > 0 {
                body.push(b',');
            }
            body.extend_from_slice(line);
            written += 1;
        }
        body.extend_from_slice(b"]}");
        Ok(Some(Batch {
            body,
            count,
            generation,
            end,
        }))
    }

    /// Records that the gateway acknowledged `batch`; its events are never delivered again.
    pub fn ack(&self, batch: &Batch) -> io::Result<()> {
        let mut s = self.lock();
        // A compaction or drop in between may have moved things; only move forward.
        if batch.generation != s.generation || batch.end <= s.acked {
            return Ok(());
        }
        self.record_ack(&mut s, batch.end)?;
        if s.acked >= COMPACT_MIN_ACKED_BYTES && s.acked * 2 >= s.len {
            self.compact(&mut s)?;
        }
        Ok(())
    }

    /// Events not yet acknowledged.
    pub fn pending(&self) -> usize {
        self.lock().pending_ends.len()
    }

    /// Events dropped because the outbox was full, since start.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Files> {
        // A panic while holding the lock cannot leave the files inconsistent (every step is
        // durable before the in-memory state changes), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_ack(&self, s: &mut Files, offset: u64) -> io::Result<()> {
        write_atomically(
            &self.dir,
            "acked",
            format!("{} {}\n", s.generation, offset).as_bytes(),
        )?;
        s.acked = offset;
        while s.pending_ends.front().is_some_and(|e| *e <= offset) {
            s.pending_ends.pop_front();
        }
        Ok(())
    }

    /// Copies the unacknowledged tail into the next generation and switches to it.
    fn compact(&self, s: &mut Files) -> io::Result<()> {
        let mut tail = vec![0u8; (s.len - s.acked) as usize];
        s.file.read_exact_at(&mut tail, s.acked)?;
        let next = s.generation + 1;
        let next_path = events_path(&self.dir, next);
        {
            let mut f = File::create(&next_path)?;
            f.write_all(&tail)?;
            f.sync_all()?;
        }
        sync_dir(&self.dir)?;
        write_atomically(&self.dir, "acked", format!("{next} 0\n").as_bytes())?;
        let old_path = events_path(&self.dir, s.generation);
        let shift = s.acked;
        s.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&next_path)?;
        s.generation = next;
        s.len -= shift;
        s.acked = 0;
        for e in s.pending_ends.iter_mut() {
            *e -= shift;
        }
        if let Err(e) = fs::remove_file(&old_path) {
            tracing::warn!(error = %e, "outbox: could not remove the compacted file");
        }
        tracing::debug!(generation = next, bytes = s.len, "outbox compacted");
        Ok(())
    }
}

fn events_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("events-{generation}.jsonl"))
}

fn read_acked(path: &Path) -> io::Result<(u64, u64)> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(e),
    };
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    match (parts.next(), parts.next()) {
        (Some(Ok(generation)), Some(Ok(offset))) => Ok((generation, offset)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not '<generation> <offset>'", path.display()),
        )),
    }
}

fn remove_other_generations(dir: &Path, keep: u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        let generation = name
            .strip_prefix("events-")
            .and_then(|r| r.strip_suffix(".jsonl"))
            .and_then(|g| g.parse::<u64>().ok());
        if generation.is_some_and(|g| g != keep) {
            fs::remove_file(dir.join(name))?;
        }
    }
    Ok(())
}

/// Replaces `dir/name` with `contents` so that a crash leaves the old or the new file, whole.
pub fn write_atomically(dir: &Path, name: &str, contents: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use wa_api::crd::Phase;
    use wa_api::pod::{EventBatch, EventBody};

    fn event(n: u32) -> PodEvent {
        PodEvent {
            id: format!("e{n}"),
            session: "s".into(),
            namespace: None,
            occurred_at: Utc::now(),
            body: EventBody::State {
                phase: Phase::Connected,
                account: None,
                reason: Some(format!("n{n}")),
            },
        }
    }

    fn ids(batch: &Batch) -> Vec<String> {
        let b: EventBatch = serde_json::from_slice(&batch.body).unwrap();
        b.events.into_iter().map(|e| e.id).collect()
    }

    fn drain(ob: &EventOutbox) -> Vec<String> {
        let mut all = Vec::new();
        while let Some(b) = ob.peek(7, 1 << 20).unwrap() {
            all.extend(ids(&b));
            ob.ack(&b).unwrap();
        }
        all
    }

    fn names(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|n| format!("e{n}")).collect()
    }

    #[test]
    fn append_peek_ack_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        assert!(ob.peek(10, 1 << 20).unwrap().is_none());
        ob.append(&[event(0), event(1), event(2)]).unwrap();
        assert_eq!(ob.pending(), 3);
        let b = ob.peek(2, 1 << 20).unwrap().unwrap();
        assert_eq!(ids(&b), ["e0", "e1"]);
        assert_eq!(b.count, 2);
        // Not acknowledged: the same batch comes again.
        assert_eq!(ids(&ob.peek(2, 1 << 20).unwrap().unwrap()), ["e0", "e1"]);
        ob.ack(&b).unwrap();
        ob.ack(&b).unwrap(); // twice is harmless
        assert_eq!(ob.pending(), 1);
        assert_eq!(drain(&ob), ["e2"]);
        assert_eq!(ob.pending(), 0);
    }

    #[test]
    fn survives_reopen_without_losing_or_replaying() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ob = EventOutbox::open(dir.path(), 100).unwrap();
            ob.append(&[event(0), event(1), event(2)]).unwrap();
            let b = ob.peek(1, 1 << 20).unwrap().unwrap();
            ob.ack(&b).unwrap();
            // e1 is peeked (as if in flight) but never acknowledged.
            let _ = ob.peek(1, 1 << 20).unwrap();
        }
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        assert_eq!(ob.pending(), 2);
        ob.append(&[event(3)]).unwrap();
        assert_eq!(drain(&ob), ["e1", "e2", "e3"]);
    }

    #[test]
    fn torn_last_line_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ob = EventOutbox::open(dir.path(), 100).unwrap();
            ob.append(&[event(0), event(1)]).unwrap();
        }
        let path = events_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"half").unwrap();
        drop(f);
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        ob.append(&[event(2)]).unwrap();
        assert_eq!(drain(&ob), ["e0", "e1", "e2"]);
    }

    #[test]
    fn batches_respect_byte_limit_but_never_stall() {
        let dir = tempfile::tempdir().unwrap();
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        ob.append(&[event(0), event(1), event(2)]).unwrap();
        // Smaller than one event: still one event per batch.
        let b = ob.peek(10, 1).unwrap().unwrap();
        assert_eq!(ids(&b), ["e0"]);
        ob.ack(&b).unwrap();
        let b = ob.peek(10, 1 << 20).unwrap().unwrap();
        assert_eq!(ids(&b), ["e1", "e2"]);
    }

    #[test]
    fn full_outbox_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let ob = EventOutbox::open(dir.path(), 3).unwrap();
        ob.append(&[event(0), event(1)]).unwrap();
        ob.append(&[event(2), event(3), event(4)]).unwrap();
        assert_eq!(ob.pending(), 3);
        assert_eq!(ob.dropped(), 2);
        drop(ob);
        let ob = EventOutbox::open(dir.path(), 3).unwrap();
        assert_eq!(drain(&ob), ["e2", "e3", "e4"]);
    }

    #[test]
    fn compaction_keeps_the_tail_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ob = EventOutbox::open(dir.path(), 100_000).unwrap();
        // Enough events that the acknowledged prefix passes the compaction threshold.
        let n = 12_000;
        let all: Vec<PodEvent> = (0..n).map(event).collect();
        ob.append(&all).unwrap();
        let mut seen = Vec::new();
        while seen.len() < (n - 5) as usize {
            let b = ob
                .peek(((n - 5) as usize - seen.len()).min(500), 1 << 20)
                .unwrap()
                .unwrap();
            seen.extend(ids(&b));
            ob.ack(&b).unwrap();
        }
        assert_eq!(seen, names(0..n - 5));
        let generation = ob.lock().generation;
        assert!(generation > 0, "expected at least one compaction");
        assert!(
            !events_path(dir.path(), 0).exists(),
            "old generation removed"
        );
        ob.append(&[event(n)]).unwrap();
        drop(ob);
        let ob = EventOutbox::open(dir.path(), 100_000).unwrap();
        assert_eq!(drain(&ob), names(n - 5..n + 1));
    }

    #[test]
    fn crash_during_compaction_keeps_the_old_pair() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ob = EventOutbox::open(dir.path(), 100).unwrap();
            ob.append(&[event(0), event(1)]).unwrap();
            let b = ob.peek(1, 1 << 20).unwrap().unwrap();
            ob.ack(&b).unwrap();
        }
        // A next generation written but `acked` not switched yet: it must be ignored.
        fs::write(events_path(dir.path(), 1), b"garbage\n").unwrap();
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        assert!(!events_path(dir.path(), 1).exists());
        assert_eq!(drain(&ob), ["e1"]);
    }

    #[test]
    fn corrupt_acked_file_is_an_error_not_a_silent_replay() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("acked"), "nonsense").unwrap();
        assert!(EventOutbox::open(dir.path(), 10).is_err());
    }
}
