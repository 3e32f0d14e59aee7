//! The event outbox: events the session must deliver to the gateway, kept on the data volume
//! until the gateway acknowledges them.
//!
//! Format (in `<data-dir>/outbox/`), chosen for being obviously crash-safe with nothing but
//! appends, `fsync` and `rename`:
//!
//! - `events-<generation>.jsonl`: one [`PodEvent`] per line, append-only. A batch of events is
//!   written (to the page cache: a killed process loses nothing) before anyone is told it
//!   happened, and `fdatasync`'d [`SYNC_DELAY`] later unless the gateway acknowledged it by then
//!   ([`sync_undelivered`]). Events the gateway takes within that delay, which under normal
//!   operation is all of them, never cost a sync; events waiting for a gateway that is down are
//!   on disk within the delay. What a crash of the machine (not the process) can lose is the
//!   events of the last [`SYNC_DELAY`] the gateway had not taken yet; the gateway's embedded
//!   SQLite store (WAL, `synchronous=NORMAL`) makes the same trade.
//! - `acked`: `<generation> <byte offset>`; everything before the offset was acknowledged
//!   (2xx) by the gateway. Replaced atomically (write temporary file, `fsync`, `rename`).
//!
//! Acknowledgements are recorded on disk lazily: at most once per [`ACK_RECORD_INTERVAL`]
//! while batches keep coming, when delivery goes idle, at compaction and at shutdown. Writing
//! `acked` costs two `fsync`s, a create and a rename; doing that per delivered batch was about
//! half of a busy pod's syncs. What an unrecorded acknowledgement risks is the same as a crash
//! between a delivery and its record always risked: after a crash (of the process or the
//! machine) the batches acknowledged in the last interval are delivered again, and the gateway
//! de-duplicates them by event id (it keeps ids for a week).
//!
//! A crash can leave a torn last line (cut at open), or delivered batches whose offset was not
//! yet recorded (delivered again, as above). It cannot lose an event that was appended, nor
//! replay one whose acknowledgement was recorded.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use wa_api::pod::PodEvent;

/// Compact when at least this many acknowledged bytes precede the unacknowledged tail.
const COMPACT_MIN_ACKED_BYTES: u64 = 1024 * 1024;
/// While batches keep being acknowledged, the `acked` file is rewritten at most this often.
pub const ACK_RECORD_INTERVAL: Duration = Duration::from_secs(1);
/// Appended events not acknowledged this long after their append are synced to disk.
pub const SYNC_DELAY: Duration = Duration::from_millis(100);

/// Events waiting for delivery, with their positions in the current file.
pub struct EventOutbox {
    dir: PathBuf,
    max_events: usize,
    ack_interval: Duration,
    /// Signalled on every append (for [`sync_undelivered`]).
    appended: Notify,
    state: Mutex<Files>,
}

struct Files {
    generation: u64,
    file: File,
    /// Bytes in the current file (the end of its last complete line).
    len: u64,
    /// Bytes of the current file known to be on disk, and a handle to sync it without the lock.
    synced_len: u64,
    sync_handle: Arc<File>,
    /// Everything before this offset is acknowledged.
    acked: u64,
    /// The offset the `acked` file holds (never ahead of `acked`), and when it was written.
    acked_on_disk: u64,
    acked_written: Instant,
    /// `fsync`s and `fdatasync`s so far (for tests).
    syncs: u64,
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
        let sync_handle = Arc::new(file.try_clone()?);
        Ok(Self {
            dir: dir.to_owned(),
            max_events: max_events.max(1),
            ack_interval: ACK_RECORD_INTERVAL,
            appended: Notify::new(),
            state: Mutex::new(Files {
                generation,
                file,
                len,
                // What a previous process wrote may still be only in the page cache.
                synced_len: 0,
                sync_handle,
                acked,
                acked_on_disk: acked,
                acked_written: Instant::now(),
                syncs: 0,
                pending_ends,
                dropped: 0,
            }),
        })
    }

    /// The same outbox, with another interval between writes of the `acked` file.
    pub fn with_ack_interval(mut self, interval: Duration) -> Self {
        self.ack_interval = interval;
        self
    }

    /// Appends events (written, not synced: see the module documentation). Touches only the page
    /// cache, except when the outbox is full: the drop is then recorded on disk at once.
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
        if let Err(e) = s.file.write_all(&buf) {
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
        drop(s);
        self.appended.notify_one();
        Ok(())
    }

    /// Syncs the events file if it holds events that are neither acknowledged nor on disk yet;
    /// true when it synced. The `fdatasync` runs without holding the lock.
    pub fn sync(&self) -> io::Result<bool> {
        let (handle, generation, target) = {
            let s = self.lock();
            if s.synced_len >= s.len || s.pending_ends.is_empty() {
                return Ok(false);
            }
            (s.sync_handle.clone(), s.generation, s.len)
        };
        handle.sync_data()?;
        let mut s = self.lock();
        s.syncs += 1;
        if s.generation == generation && s.synced_len < target {
            s.synced_len = target;
        }
        Ok(true)
    }

    /// Everything on disk: the undelivered events and the acknowledged offset (a clean stop).
    pub fn flush(&self) -> io::Result<()> {
        self.sync()?;
        self.record_acks()
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

    /// Records in memory that the gateway acknowledged `batch`: its events are not delivered
    /// again by this process, nor after a restart once [`record_acks`](Self::record_acks) wrote
    /// it (see the module documentation for when). Never touches the disk, so it may run on an
    /// async thread; true when `record_acks` is due (the interval passed, or a compaction).
    pub fn ack(&self, batch: &Batch) -> bool {
        let mut s = self.lock();
        // A compaction or drop in between may have moved things; only move forward.
        if batch.generation == s.generation && batch.end > s.acked {
            forget_through(&mut s, batch.end);
        }
        s.acked != s.acked_on_disk
            && (compaction_due(&s) || s.acked_written.elapsed() >= self.ack_interval)
    }

    /// Whether an acknowledgement is waiting to be written to disk.
    pub fn ack_unrecorded(&self) -> bool {
        let s = self.lock();
        s.acked != s.acked_on_disk
    }

    /// Writes the acknowledged offset to disk now, if it is ahead of what the disk holds, and
    /// compacts the file when enough of it is acknowledged. Blocking: run it off the async
    /// threads. On error the acknowledgement still holds in memory and the next call retries.
    pub fn record_acks(&self) -> io::Result<()> {
        let mut s = self.lock();
        if compaction_due(&s) {
            return self.compact(&mut s);
        }
        if s.acked == s.acked_on_disk {
            return Ok(());
        }
        let offset = s.acked;
        self.write_acked(&mut s, offset)
    }

    /// `fsync`s and `fdatasync`s so far.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
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

    /// Drops the events before `offset`, recording that on disk first (the outbox was full).
    fn record_ack(&self, s: &mut Files, offset: u64) -> io::Result<()> {
        self.write_acked(s, offset)?;
        forget_through(s, offset);
        Ok(())
    }

    /// Writes `offset` (at or past the in-memory one) to the `acked` file, after the events
    /// before it, so the file on disk never points past the end of the events on disk.
    fn write_acked(&self, s: &mut Files, offset: u64) -> io::Result<()> {
        if s.synced_len < offset {
            s.syncs += 1;
            s.file.sync_data()?;
            s.synced_len = s.len;
        }
        s.syncs += 2;
        write_atomically(
            &self.dir,
            "acked",
            format!("{} {offset}\n", s.generation).as_bytes(),
        )?;
        s.acked_on_disk = offset;
        s.acked_written = Instant::now();
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
        s.syncs += 4;
        write_atomically(&self.dir, "acked", format!("{next} 0\n").as_bytes())?;
        s.acked_on_disk = 0;
        s.acked_written = Instant::now();
        let old_path = events_path(&self.dir, s.generation);
        let shift = s.acked;
        s.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&next_path)?;
        s.sync_handle = Arc::new(s.file.try_clone()?);
        s.generation = next;
        s.len -= shift;
        s.synced_len = s.len;
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

/// Syncs the outbox [`SYNC_DELAY`] after appends, unless the gateway acknowledged everything
/// by then; runs until `stop`.
pub async fn sync_undelivered(outbox: Arc<EventOutbox>, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = outbox.appended.notified() => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(SYNC_DELAY) => {}
            () = stop.cancelled() => return,
        }
        let o = outbox.clone();
        match tokio::task::spawn_blocking(move || o.sync()).await {
            Ok(Ok(_)) => {}
            // The events are still written and still delivered; only a machine crash before a
            // later sync could lose them.
            Ok(Err(e)) => tracing::error!(error = %e, "outbox: cannot sync undelivered events"),
            Err(e) => tracing::error!(error = %e, "outbox: sync task failed"),
        }
    }
}

/// Whether enough of the file is acknowledged to copy its tail into a new generation.
fn compaction_due(s: &Files) -> bool {
    s.acked >= COMPACT_MIN_ACKED_BYTES && s.acked * 2 >= s.len
}

/// Forgets the pending events that end at or before `offset` (in memory only).
fn forget_through(s: &mut Files, offset: u64) {
    s.acked = offset;
    while s.pending_ends.front().is_some_and(|e| *e <= offset) {
        s.pending_ends.pop_front();
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
            ack(&ob, &b);
        }
        all
    }

    /// Acknowledges `b` as the delivery task does: in memory, then on disk when due.
    fn ack(ob: &EventOutbox, b: &Batch) {
        if ob.ack(b) {
            ob.record_acks().unwrap();
        }
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
        ack(&ob, &b);
        ack(&ob, &b); // twice is harmless
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
            ack(&ob, &b);
            // e1 is peeked (as if in flight) but never acknowledged.
            let _ = ob.peek(1, 1 << 20).unwrap();
            // A clean stop writes the acknowledgement.
            ob.record_acks().unwrap();
        }
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        assert_eq!(ob.pending(), 2);
        ob.append(&[event(3)]).unwrap();
        assert_eq!(drain(&ob), ["e1", "e2", "e3"]);
    }

    #[test]
    fn acknowledgements_reach_the_disk_once_per_interval_or_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let ob = EventOutbox::open(dir.path(), 1000)
            .unwrap()
            .with_ack_interval(hour);
        fn deliver(ob: &EventOutbox, n: u32) {
            ob.append(&[event(n)]).unwrap();
            let b = ob.peek(10, 1 << 20).unwrap().unwrap();
            ack(&ob, &b);
        }
        for n in 0..50 {
            deliver(&ob, n);
        }
        // Delivered before anything synced them: no sync for the events, none for the
        // acknowledgements yet.
        assert_eq!(ob.syncs(), 0);
        assert!(ob.ack_unrecorded());
        assert_eq!(read_acked(&dir.path().join("acked")).unwrap(), (0, 0));
        ob.record_acks().unwrap();
        assert!(!ob.ack_unrecorded());
        // The events file first (the record may not point past what is on disk), then `acked`
        // and its directory.
        assert_eq!(ob.syncs(), 3);
        ob.record_acks().unwrap(); // nothing new: nothing written
        assert_eq!(ob.syncs(), 3);
        let on_disk = read_acked(&dir.path().join("acked")).unwrap();
        assert_eq!(on_disk, (0, ob.lock().len));

        // Once the interval has passed, the next acknowledgement writes the file itself.
        let ob = ob.with_ack_interval(Duration::from_millis(50));
        deliver(&ob, 50);
        assert!(ob.ack_unrecorded(), "written too early");
        std::thread::sleep(Duration::from_millis(60));
        deliver(&ob, 51);
        assert!(!ob.ack_unrecorded(), "not written after the interval");
        drop(ob);
        let ob = EventOutbox::open(dir.path(), 1000).unwrap();
        assert_eq!(ob.pending(), 0, "nothing delivered again");
    }

    #[test]
    fn only_events_still_undelivered_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        ob.append(&[event(0), event(1)]).unwrap();
        assert_eq!(ob.syncs(), 0, "an append does not sync");
        assert!(ob.sync().unwrap());
        assert!(!ob.sync().unwrap(), "nothing new since");
        ob.append(&[event(2)]).unwrap();
        assert_eq!(drain(&ob), ["e0", "e1", "e2"]);
        assert!(!ob.sync().unwrap(), "everything was acknowledged");
        ob.append(&[event(3)]).unwrap();
        assert!(ob.sync().unwrap());
        assert_eq!(ob.syncs(), 2);
    }

    #[tokio::test]
    async fn undelivered_events_are_synced_after_the_delay_and_delivered_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Arc::new(EventOutbox::open(dir.path(), 100).unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(sync_undelivered(ob.clone(), stop.clone()));
        // Acknowledged right away (the gateway is up): never synced.
        ob.append(&[event(0)]).unwrap();
        assert_eq!(drain(&ob), ["e0"]);
        tokio::time::sleep(SYNC_DELAY * 3).await;
        assert_eq!(ob.syncs(), 0);
        // Not acknowledged (the gateway is down): synced once the delay has passed.
        ob.append(&[event(1)]).unwrap();
        ob.append(&[event(2)]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while ob.syncs() == 0 {
            assert!(Instant::now() < deadline, "undelivered events never synced");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!ob.sync().unwrap(), "both appends were covered");
        stop.cancel();
        task.await.unwrap();
    }

    #[test]
    fn an_acknowledgement_lost_in_a_crash_means_delivering_again_never_losing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let ob = EventOutbox::open(dir.path(), 100)
                .unwrap()
                .with_ack_interval(Duration::from_secs(3600));
            ob.append(&[event(0), event(1), event(2)]).unwrap();
            let b = ob.peek(2, 1 << 20).unwrap().unwrap();
            ack(&ob, &b);
            assert_eq!(drain(&ob), ["e2"]);
            // Dropped without `record_acks`: a crash.
        }
        let ob = EventOutbox::open(dir.path(), 100).unwrap();
        assert_eq!(drain(&ob), ["e0", "e1", "e2"]);
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
        ack(&ob, &b);
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
            ack(&ob, &b);
        }
        assert_eq!(seen, names(0..n - 5));
        let generation = ob.lock().generation;
        assert!(generation > 0, "expected at least one compaction");
        assert!(
            !events_path(dir.path(), 0).exists(),
            "old generation removed"
        );
        ob.append(&[event(n)]).unwrap();
        ob.record_acks().unwrap();
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
            ack(&ob, &b);
            ob.record_acks().unwrap();
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
