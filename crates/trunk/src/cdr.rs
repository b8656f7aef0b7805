//! Call detail records (SPEC §7) and the durable file store.
//!
//! # File format
//!
//! `<data-dir>/cdrs.jsonl`: one [`Cdr`] as a JSON object per line, UTF-8,
//! `\n`-terminated, append-only. A line without its `\n` at the end of the
//! file is a write in progress (or torn by a crash); readers skip it, and
//! [`FileCdrStore::open`] repairs it.
//!
//! # Durability and the hot path
//!
//! [`FileCdrStore::record`] serialises the CDR on the caller's thread and
//! hands the bytes to a dedicated writer thread (std, not tokio) over an
//! unbounded channel; it never blocks on disk and never drops a record. The
//! writer takes everything queued, writes it with one `write` and makes it
//! durable with one `fdatasync` (group commit), then waits for more. A record
//! is therefore on disk one fsync after `record` returns (milliseconds; the
//! promise is "within a second"), and survives `kill -9` of the process as
//! soon as the `write` is done.
//!
//! Unbounded rather than bounded-with-backpressure: backpressure would stall
//! the SIP tasks that end calls whenever the disk stalls. A CDR is ~300 bytes,
//! so even 1 000 calls/s against a disk stalled for 10 s queue only ~3 MB. The
//! queue is visible as `tollgate_cdr_queue_depth` (records accepted but not
//! yet durable) and failures as `tollgate_cdr_write_errors_total`.
//!
//! Exactly once: a failed write or fsync truncates the file back to its last
//! durable length before the batch is retried, so a record is never in the
//! file twice; readers also skip a repeated `call_id` as a safety net.
//!
//! One writer per file: [`FileCdrStore::open`] takes an exclusive advisory
//! lock; other processes (the `tollgate usage` CLI while `serve` runs) use
//! [`FileCdrStore::open_read_only`], which never writes or repairs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics::{Counter, Gauge};
use serde::{Deserialize, Serialize};

use crate::utc_day;

/// File name of the CDR store inside the data directory.
pub const CDR_FILE: &str = "cdrs.jsonl";

/// A call detail record: one per call, written when the call ends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Cdr {
    /// The edge's call id; unique per call.
    pub call_id: String,
    /// The API key the call was admitted under.
    pub key_id: String,
    /// The trunk the call ran on.
    pub trunk: String,
    /// Caller (normalised).
    pub from: String,
    /// Destination (normalised).
    pub to: String,
    /// Unix seconds: INVITE received.
    pub start: i64,
    /// Unix seconds: answered, if it was.
    pub answer: Option<i64>,
    /// Unix seconds: call ended.
    pub end: i64,
    /// Seconds billed (counted against the key's UTC day of `end`).
    pub billable_secs: u64,
    /// Why the call ended (`normal`, `cancel`, `busy`, `rate_limited`, ...).
    pub cause: String,
    /// The final SIP status, if one was sent or received.
    pub sip_code: Option<u16>,
    /// The caller's own Call-ID (leg A), so a customer can match the record
    /// to their call; absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_call_id: Option<String>,
    /// The call's recording (SPEC §10), relative to the data directory, when
    /// its `record` parameter was true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recording: Option<String>,
}

/// Where CDRs go. The embedded implementation is [`FileCdrStore`].
pub trait CdrSink: Send + Sync {
    /// Records one CDR. Must not block on I/O; must not drop the record.
    fn record(&self, cdr: &Cdr) -> io::Result<()>;
}

impl<T: CdrSink + ?Sized> CdrSink for Arc<T> {
    fn record(&self, cdr: &Cdr) -> io::Result<()> {
        (**self).record(cdr)
    }
}

/// An in-memory sink, for tests.
#[derive(Debug, Default)]
pub struct MemoryCdrSink {
    cdrs: Mutex<Vec<Cdr>>,
}

impl MemoryCdrSink {
    /// Everything recorded so far.
    pub fn cdrs(&self) -> Vec<Cdr> {
        self.cdrs.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl CdrSink for MemoryCdrSink {
    fn record(&self, cdr: &Cdr) -> io::Result<()> {
        self.cdrs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(cdr.clone());
        Ok(())
    }
}

/// Totals for one key (or for all, see [`Usage::total`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// Calls (CDRs).
    pub calls: u64,
    /// Calls that were answered.
    pub answered: u64,
    /// Calls that were not answered (`calls - answered`).
    pub failed: u64,
    /// Unanswered calls by `cause`.
    pub failed_by_cause: BTreeMap<String, u64>,
    /// Sum of billable seconds.
    pub billable_secs: u64,
}

impl KeyUsage {
    /// Counts one call record (public for the fleet's usage, summed from
    /// its shared stream of records).
    pub fn add(&mut self, cdr: &Cdr) {
        self.calls += 1;
        if cdr.answer.is_some() {
            self.answered += 1;
        } else {
            self.failed += 1;
            *self.failed_by_cause.entry(cdr.cause.clone()).or_default() += 1;
        }
        self.billable_secs += cdr.billable_secs;
    }

    fn merge(&mut self, other: &KeyUsage) {
        self.calls += other.calls;
        self.answered += other.answered;
        self.failed += other.failed;
        for (cause, n) in &other.failed_by_cause {
            *self.failed_by_cause.entry(cause.clone()).or_default() += n;
        }
        self.billable_secs += other.billable_secs;
    }
}

/// Usage totals from the CDR store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Per key id.
    pub keys: BTreeMap<String, KeyUsage>,
    /// Lines that could not be read as a CDR (skipped).
    pub bad_lines: u64,
    /// Lines repeating an earlier `call_id` (skipped; should stay 0).
    pub duplicates: u64,
}

impl Usage {
    /// The sum over all keys.
    pub fn total(&self) -> KeyUsage {
        let mut t = KeyUsage::default();
        for k in self.keys.values() {
            t.merge(k);
        }
        t
    }
}

/// Formats usage for `tollgate usage`. Stable format: whitespace-separated
/// columns; a header line `key calls answered failed billable_secs`, one line
/// per key (sorted by key id) `<key_id> <calls> <answered> <failed>
/// <billable_secs>`, then `total <calls> <answered> <failed> <billable_secs>`.
/// Every line ends with `\n`.
pub fn format_usage(usage: &Usage) -> String {
    let w = usage
        .keys
        .keys()
        .map(String::len)
        .chain([12])
        .max()
        .unwrap_or(12);
    let mut out = String::new();
    let mut line = |name: &str,
                    c: &dyn std::fmt::Display,
                    a: &dyn std::fmt::Display,
                    f: &dyn std::fmt::Display,
                    b: &dyn std::fmt::Display| {
        out.push_str(&format!("{name:<w$} {c:>10} {a:>10} {f:>10} {b:>14}\n"));
    };
    line("key", &"calls", &"answered", &"failed", &"billable_secs");
    for (key, u) in &usage.keys {
        line(key, &u.calls, &u.answered, &u.failed, &u.billable_secs);
    }
    let t = usage.total();
    line("total", &t.calls, &t.answered, &t.failed, &t.billable_secs);
    out
}

/// What [`FileCdrStore::open`] repaired at the end of the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes of a torn last line that were cut off.
    pub truncated_bytes: u64,
    /// The last line was a whole CDR missing only its `\n`, which was added.
    pub completed_line: bool,
}

/// The durable CDR store: `<data-dir>/cdrs.jsonl` (see the module docs).
pub struct FileCdrStore {
    path: PathBuf,
    writer: Option<Writer>,
    recovery: Recovery,
}

enum Msg {
    Record(Vec<u8>),
    Flush(SyncSender<io::Result<()>>),
}

struct Writer {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
    depth: Gauge,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the channel lets the writer finish what is queued and exit.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Longest line the torn-tail repair will try to parse.
const MAX_LINE: u64 = 1 << 20;
/// Most bytes written per group commit.
const MAX_BATCH: usize = 8 << 20;
/// Wait between retries of a failed write.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Retries of what is still queued once the store is dropped.
const FINAL_RETRIES: u32 = 20;

impl FileCdrStore {
    /// Opens (creating if needed) `<dir>/cdrs.jsonl` for writing and starts
    /// the writer thread. Takes an exclusive lock on the file (fails with
    /// `WouldBlock` if another process has it) and repairs a torn last line
    /// left by a crash mid-write: cut off, or completed with its `\n` if it is
    /// a whole CDR. Bad lines elsewhere are left alone (readers skip and count
    /// them).
    pub fn open(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(CDR_FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "{} is open for writing by another process; read it with open_read_only",
                        path.display()
                    ),
                ))
            }
            Err(TryLockError::Error(e)) => return Err(e),
        }
        let recovery = repair_tail(&mut file)?;
        if !existed {
            sync_dir(dir);
        }
        let len = file.metadata()?.len();
        let depth = metrics::gauge!("tollgate_cdr_queue_depth");
        let errors = metrics::counter!("tollgate_cdr_write_errors_total");
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tollgate-cdr-writer".into())
            .spawn({
                let depth = depth.clone();
                move || writer_loop(file, len, rx, depth, errors)
            })?;
        Ok(FileCdrStore {
            path,
            writer: Some(Writer {
                tx: Some(tx),
                thread: Some(thread),
                depth,
            }),
            recovery,
        })
    }

    /// Opens `<dir>/cdrs.jsonl` for reading only (no lock, no repair, no
    /// writer): for `tollgate usage` while `serve` runs. A missing file reads
    /// as empty; [`CdrSink::record`] fails with `Unsupported`.
    pub fn open_read_only(dir: &Path) -> io::Result<Self> {
        Ok(FileCdrStore {
            path: dir.join(CDR_FILE),
            writer: None,
            recovery: Recovery::default(),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `open` repaired.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    /// Blocks until every record recorded before this call is durable
    /// (written and fsynced). For shutdown. Errors if the last attempt to
    /// write failed (the records stay queued and are retried).
    pub fn flush(&self) -> io::Result<()> {
        let Some(tx) = self.writer.as_ref().and_then(|w| w.tx.as_ref()) else {
            return Ok(());
        };
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(ack_tx)).map_err(|_| writer_gone())?;
        ack_rx.recv().map_err(|_| writer_gone())?
    }

    /// Totals per key from every readable CDR, optionally only `key`'s and
    /// only calls that started at or after `since` (Unix seconds).
    pub fn totals(&self, key: Option<&str>, since: Option<i64>) -> io::Result<Usage> {
        let mut usage = Usage::default();
        let stats = self.scan(|cdr| {
            if key.is_some_and(|k| k != cdr.key_id) || since.is_some_and(|s| cdr.start < s) {
                return;
            }
            usage.keys.entry(cdr.key_id.clone()).or_default().add(&cdr);
        })?;
        usage.bad_lines = stats.bad_lines;
        usage.duplicates = stats.duplicates;
        Ok(usage)
    }

    /// Billable seconds per key id of the calls that ended on UTC `day`
    /// (days since 1970-01-01): what [`crate::Allocator::seed_spent`] takes at
    /// start-up.
    pub fn spent_on_day(&self, day: i64) -> io::Result<HashMap<String, u64>> {
        let mut spent: HashMap<String, u64> = HashMap::new();
        self.scan(|cdr| {
            if utc_day(cdr.end) == day {
                *spent.entry(cdr.key_id).or_default() += cdr.billable_secs;
            }
        })?;
        Ok(spent)
    }

    /// The `call_id` of every readable CDR: what the recovery of calls lost
    /// in a crash checks before it writes one ([`crate::CallJournal`]).
    pub fn call_ids(&self) -> io::Result<HashSet<String>> {
        let mut ids = HashSet::new();
        self.scan(|cdr| {
            ids.insert(cdr.call_id);
        })?;
        Ok(ids)
    }

    /// Calls `f` with each readable CDR in file order, first occurrence of
    /// each `call_id` only. A last line without `\n` (being written) is not
    /// read.
    fn scan(&self, mut f: impl FnMut(Cdr)) -> io::Result<ScanStats> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ScanStats::default()),
            Err(e) => return Err(e),
        };
        let mut reader = BufReader::new(file);
        let mut stats = ScanStats::default();
        let mut seen = HashSet::new();
        let mut line = Vec::new();
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 || line.last() != Some(&b'\n') {
                break;
            }
            let body = line.trim_ascii();
            if body.is_empty() {
                continue;
            }
            match serde_json::from_slice::<Cdr>(body) {
                Ok(cdr) => {
                    if seen.insert(cdr.call_id.clone()) {
                        f(cdr);
                    } else {
                        stats.duplicates += 1;
                    }
                }
                Err(_) => stats.bad_lines += 1,
            }
        }
        Ok(stats)
    }
}

impl CdrSink for FileCdrStore {
    fn record(&self, cdr: &Cdr) -> io::Result<()> {
        let Some(w) = self.writer.as_ref() else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "CDR store opened read-only",
            ));
        };
        let mut line = serde_json::to_vec(cdr)?;
        line.push(b'\n');
        let tx = w.tx.as_ref().ok_or_else(writer_gone)?;
        w.depth.increment(1.0);
        tx.send(Msg::Record(line)).map_err(|_| {
            w.depth.decrement(1.0);
            writer_gone()
        })
    }
}

impl std::fmt::Debug for FileCdrStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileCdrStore")
            .field("path", &self.path)
            .field("writable", &self.writer.is_some())
            .field("recovery", &self.recovery)
            .finish()
    }
}

#[derive(Debug, Default)]
struct ScanStats {
    bad_lines: u64,
    duplicates: u64,
}

fn writer_gone() -> io::Error {
    io::Error::other("CDR writer thread stopped")
}

fn copy_err(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

/// fsync the directory so that a newly created file's entry is durable.
pub(crate) fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Repairs a last line without its `\n` (see [`FileCdrStore::open`]).
fn repair_tail(file: &mut File) -> io::Result<Recovery> {
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(Recovery::default());
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(Recovery::default());
    }
    // Find where the last line starts, reading backwards in chunks.
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut buf = Vec::new();
    let line_start = loop {
        let from = end.saturating_sub(CHUNK);
        buf.resize((end - from) as usize, 0);
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut buf)?;
        if let Some(pos) = buf.iter().rposition(|&b| b == b'\n') {
            break from + pos as u64 + 1;
        }
        if from == 0 {
            break 0;
        }
        end = from;
    };
    let tail_len = len - line_start;
    if tail_len <= MAX_LINE {
        let mut tail = vec![0; tail_len as usize];
        file.seek(SeekFrom::Start(line_start))?;
        file.read_exact(&mut tail)?;
        if serde_json::from_slice::<Cdr>(&tail).is_ok() {
            file.write_all(b"\n")?;
            file.sync_data()?;
            return Ok(Recovery {
                truncated_bytes: 0,
                completed_line: true,
            });
        }
    }
    file.set_len(line_start)?;
    file.sync_data()?;
    Ok(Recovery {
        truncated_bytes: tail_len,
        completed_line: false,
    })
}

/// What the writer has taken off the queue and not yet made durable.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    records: usize,
    acks: Vec<SyncSender<io::Result<()>>>,
}

impl Batch {
    fn push(&mut self, msg: Msg) {
        match msg {
            Msg::Record(line) => {
                self.bytes.extend_from_slice(&line);
                self.records += 1;
            }
            Msg::Flush(ack) => self.acks.push(ack),
        }
    }

    fn is_empty(&self) -> bool {
        self.records == 0 && self.acks.is_empty()
    }
}

/// The writer thread: group commit until the store is dropped, then drain.
fn writer_loop(mut file: File, mut len: u64, rx: Receiver<Msg>, depth: Gauge, errors: Counter) {
    let mut batch = Batch::default();
    let mut connected = true;
    let mut failures = 0u32;
    loop {
        // Wait for work (or, after a failure, for the backoff to pass).
        if connected {
            let next = if batch.is_empty() {
                rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else if failures > 0 {
                rx.recv_timeout(RETRY_BACKOFF)
            } else {
                Err(RecvTimeoutError::Timeout)
            };
            match next {
                Ok(msg) => batch.push(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => connected = false,
            }
        }
        // Take whatever else is queued: that is the group.
        while connected && batch.bytes.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(msg) => batch.push(msg),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => connected = false,
            }
        }
        if batch.is_empty() {
            if connected {
                continue;
            }
            return;
        }
        let result = if batch.records == 0 {
            Ok(())
        } else {
            commit(&mut file, &mut len, &batch.bytes)
        };
        match result {
            Ok(()) => {
                depth.decrement(batch.records as f64);
                failures = 0;
                for ack in batch.acks.drain(..) {
                    let _ = ack.send(Ok(()));
                }
                batch.bytes.clear();
                batch.records = 0;
            }
            Err(e) => {
                errors.increment(1);
                failures += 1;
                for ack in batch.acks.drain(..) {
                    let _ = ack.send(Err(copy_err(&e)));
                }
                if !connected {
                    if failures >= FINAL_RETRIES {
                        return;
                    }
                    std::thread::sleep(RETRY_BACKOFF);
                }
            }
        }
    }
}

/// Appends `bytes` and fdatasyncs. On failure cuts the file back to `len`, so
/// that the retry cannot leave a record in the file twice.
fn commit(file: &mut File, len: &mut u64, bytes: &[u8]) -> io::Result<()> {
    match file.write_all(bytes).and_then(|()| file.sync_data()) {
        Ok(()) => {
            *len += bytes.len() as u64;
            Ok(())
        }
        Err(e) => {
            let _ = file.set_len(*len);
            Err(e)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU32, Ordering};

    const DAY0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z
    const CHILD_ENV: &str = "TOLLGATE_CDR_CHILD";
    const CRASH_K: usize = 500;

    /// A directory of its own under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let d = std::env::temp_dir().join(format!(
                "tollgate-trunk-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            TempDir(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cdr(call_id: &str, key: &str, start: i64, answered: bool, secs: u64) -> Cdr {
        Cdr {
            call_id: call_id.into(),
            key_id: key.into(),
            trunk: format!("trunk-{key}"),
            from: "+14155550100".into(),
            to: "+14155550199".into(),
            start,
            answer: answered.then_some(start + 2),
            end: start + 2 + secs as i64,
            billable_secs: secs,
            cause: if answered { "normal" } else { "busy" }.into(),
            sip_code: Some(if answered { 200 } else { 486 }),
            sip_call_id: Some(format!("{call_id}@caller")),
            recording: None,
        }
    }

    #[test]
    fn write_reopen_totals() {
        let dir = TempDir::new("totals");
        {
            let store = FileCdrStore::open(&dir.0).unwrap();
            for i in 0..100 {
                let key = if i % 4 == 0 { "keyb" } else { "keya" };
                store
                    .record(&cdr(&format!("c{i}"), key, DAY0 + i, i % 5 != 0, 10))
                    .unwrap();
            }
            store.flush().unwrap();
            // Flushed records are visible to a reader while the writer runs.
            let ro = FileCdrStore::open_read_only(&dir.0).unwrap();
            assert_eq!(ro.totals(None, None).unwrap().total().calls, 100);
            // A second writer is refused.
            let e = FileCdrStore::open(&dir.0).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        }
        let store = FileCdrStore::open(&dir.0).unwrap();
        assert_eq!(store.recovery(), Recovery::default());
        let u = store.totals(None, None).unwrap();
        let t = u.total();
        assert_eq!((t.calls, t.answered, t.failed), (100, 80, 20));
        assert_eq!(t.billable_secs, 1000);
        assert_eq!(t.failed_by_cause.get("busy"), Some(&20));
        assert_eq!(u.keys["keyb"].calls, 25);
        assert_eq!(u.keys["keya"].calls, 75);
        assert_eq!((u.bad_lines, u.duplicates), (0, 0));
        let only_b = store.totals(Some("keyb"), Some(DAY0 + 50)).unwrap();
        assert_eq!(only_b.keys.len(), 1);
        assert_eq!(only_b.keys["keyb"].calls, 12); // i = 52, 56, ..., 96
        let spent = store.spent_on_day(utc_day(DAY0)).unwrap();
        assert_eq!(spent["keya"] + spent["keyb"], 1000);
        assert!(store.spent_on_day(utc_day(DAY0) + 1).unwrap().is_empty());
    }

    #[test]
    fn torn_tail_is_cut_and_next_record_readable() {
        let dir = TempDir::new("torn");
        {
            let store = FileCdrStore::open(&dir.0).unwrap();
            store.record(&cdr("a", "k", DAY0, true, 5)).unwrap();
            store.flush().unwrap();
        }
        let path = dir.0.join(CDR_FILE);
        let whole = serde_json::to_string(&cdr("torn", "k", DAY0, true, 7)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&whole.as_bytes()[..whole.len() / 2]).unwrap();
        drop(f);
        // A reader skips the line being written.
        let ro = FileCdrStore::open_read_only(&dir.0).unwrap();
        assert_eq!(ro.totals(None, None).unwrap().total().calls, 1);

        let store = FileCdrStore::open(&dir.0).unwrap();
        assert_eq!(store.recovery().truncated_bytes, (whole.len() / 2) as u64);
        store.record(&cdr("b", "k", DAY0, true, 3)).unwrap();
        store.flush().unwrap();
        let u = store.totals(None, None).unwrap();
        assert_eq!(u.total().calls, 2);
        assert_eq!(u.total().billable_secs, 8);
        assert_eq!(u.bad_lines, 0);
    }

    #[test]
    fn whole_last_line_without_newline_is_kept() {
        let dir = TempDir::new("nonl");
        let path = dir.0.join(CDR_FILE);
        let line = serde_json::to_string(&cdr("x", "k", DAY0, true, 9)).unwrap();
        std::fs::write(&path, line).unwrap();
        let store = FileCdrStore::open(&dir.0).unwrap();
        assert!(store.recovery().completed_line);
        store.record(&cdr("y", "k", DAY0, true, 1)).unwrap();
        store.flush().unwrap();
        assert_eq!(store.totals(None, None).unwrap().total().calls, 2);
    }

    #[test]
    fn corrupt_lines_skipped_and_counted_duplicates_skipped() {
        let dir = TempDir::new("corrupt");
        let path = dir.0.join(CDR_FILE);
        let a = serde_json::to_string(&cdr("a", "k", DAY0, true, 4)).unwrap();
        let content = format!("{a}\nnot json\n\n{{\"call_id\":1}}\n\u{0}\u{ff}garbage\n{a}\n");
        std::fs::write(&path, content).unwrap();
        let store = FileCdrStore::open(&dir.0).unwrap();
        let u = store.totals(None, None).unwrap();
        assert_eq!(u.total().calls, 1);
        assert_eq!(u.total().billable_secs, 4);
        assert_eq!(u.bad_lines, 3);
        assert_eq!(u.duplicates, 1);
        // Garbage torn tail (no newline, not JSON) with a huge length.
        drop(store);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&vec![b'x'; 200_000]).unwrap();
        drop(f);
        let store = FileCdrStore::open(&dir.0).unwrap();
        assert_eq!(store.recovery().truncated_bytes, 200_000);
        assert_eq!(store.totals(None, None).unwrap().total().calls, 1);
    }

    #[test]
    fn read_only_store_is_read_only() {
        let dir = TempDir::new("ro");
        let ro = FileCdrStore::open_read_only(&dir.0.join("missing")).unwrap();
        assert_eq!(ro.totals(None, None).unwrap(), Usage::default());
        let e = ro.record(&cdr("a", "k", DAY0, true, 1)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        ro.flush().unwrap();
    }

    #[test]
    fn format_usage_table() {
        let mut u = Usage::default();
        for c in [
            cdr("1", "abcdefghijkl", DAY0, true, 60),
            cdr("2", "abcdefghijkl", DAY0, false, 0),
            cdr("3", "mnopqrstuvwx", DAY0, true, 30),
        ]
        .iter()
        {
            u.keys.entry(c.key_id.clone()).or_default().add(c);
        }
        let want = "\
key               calls   answered     failed  billable_secs
abcdefghijkl          2          1          1             60
mnopqrstuvwx          1          1          0             30
total                 3          2          1             90
";
        assert_eq!(format_usage(&u), want);
        let text = format_usage(&u);
        let parsed: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(parsed[3], ["total", "3", "2", "1", "90"]);
        assert_eq!(
            format_usage(&Usage::default())
                .lines()
                .last()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["total", "0", "0", "0", "0"]
        );
    }

    #[test]
    fn drop_makes_everything_durable() {
        let dir = TempDir::new("drop");
        {
            let store = FileCdrStore::open(&dir.0).unwrap();
            for i in 0..1000 {
                store
                    .record(&cdr(&format!("d{i}"), "k", DAY0, true, 1))
                    .unwrap();
            }
        }
        let ro = FileCdrStore::open_read_only(&dir.0).unwrap();
        assert_eq!(ro.totals(None, None).unwrap().total().calls, 1000);
    }

    /// Child half of [`kill_9_loses_nothing_and_duplicates_nothing`]: records
    /// `CRASH_K` CDRs, waits 1.1 s, says "child-done", then keeps recording (load)
    /// until it is killed. A no-op in a normal test run.
    #[test]
    fn crash_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let store = FileCdrStore::open(Path::new(&dir)).unwrap();
        for i in 0..CRASH_K {
            store
                .record(&cdr(&format!("ok-{i}"), "k", DAY0, true, 1))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(1100));
        // libtest may have printed "test ... " on this line already.
        println!("\nchild-done");
        io::stdout().flush().unwrap();
        for i in 0u64.. {
            store
                .record(&cdr(&format!("load-{i}"), "k", DAY0, true, 1))
                .unwrap();
            if i % 20 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn kill_9_loses_nothing_and_duplicates_nothing() {
        let dir = TempDir::new("crash");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cdr::tests::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir.0)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("child-done") {
                    let _ = tx.send(());
                    break;
                }
            }
        });
        let ready = rx.recv_timeout(Duration::from_secs(30));
        // Let the load run a little, so the kill lands mid-stream.
        std::thread::sleep(Duration::from_millis(100));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        ready.expect("child never said done");

        // Raw file: every complete line parses, no call_id twice.
        let raw = std::fs::read(dir.0.join(CDR_FILE)).unwrap();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for line in raw.split_inclusive(|&b| b == b'\n') {
            if line.last() != Some(&b'\n') {
                continue; // torn tail, repaired by open below
            }
            let c: Cdr = serde_json::from_slice(line).expect("complete line parses");
            *counts.entry(c.call_id).or_default() += 1;
        }
        assert!(counts.values().all(|&n| n == 1), "a call_id written twice");
        for i in 0..CRASH_K {
            assert_eq!(counts.get(&format!("ok-{i}")), Some(&1), "ok-{i}");
        }
        assert!(counts.len() > CRASH_K, "the load never ran");

        let store = FileCdrStore::open(&dir.0).unwrap();
        let u = store.totals(None, None).unwrap();
        assert_eq!((u.bad_lines, u.duplicates), (0, 0));
        assert_eq!(u.total().calls as usize, counts.len());
        store.record(&cdr("after", "k", DAY0, true, 1)).unwrap();
        store.flush().unwrap();
        assert_eq!(
            store.totals(None, None).unwrap().total().calls as usize,
            counts.len() + 1
        );
    }
}
