//! Call checkpoints and `edge_lost` CDRs (SPEC §7): calls that were up when
//! the edge died are billed when it starts again.
//!
//! # File format
//!
//! `<data-dir>/calls.jsonl`: one [`Event`] as a JSON object per line,
//! `\n`-terminated, append-only between compactions:
//!
//! * `{"ev":"open", ...}` when a call is admitted, with the CDR fields known
//!   then ([`OpenCall`]);
//! * `{"ev":"answer","call_id":..,"at":T}` when it is answered;
//! * `{"ev":"checkpoint","at":T}`: every call open in the file at this line
//!   was up at `T`. One line per interval however many calls are up: the edge
//!   writes it every `[trunk] checkpoint_s` while an answered call is up;
//! * `{"ev":"close","call_id":..}` when the call has its CDR. A close is
//!   written only once the CDRs recorded before it are durable (the journal
//!   flushes the CDR store first), so a crash can never leave a call closed
//!   here without its CDR.
//!
//! # Recovery
//!
//! [`CallJournal::open`] reads the file (skipping a torn last line), and for
//! each call still open writes a CDR with cause [`EDGE_LOST`]: an answered
//! call is billed from its answer to the last checkpoint (at most
//! `checkpoint_s` lost), an unanswered one 0 s. A call whose `call_id` is
//! already in the CDR store gets none, so that a crash during recovery (or a
//! close lost with the process) neither loses nor duplicates a CDR: the
//! journal is emptied only after the recovered CDRs are fsynced.
//!
//! # Hot path and durability
//!
//! [`CallJournal::opened`], [`answered`](CallJournal::answered),
//! [`closed`](CallJournal::closed) and
//! [`checkpoint`](CallJournal::checkpoint) only queue the event for a writer
//! thread, which appends each batch with one `write(2)` (safe from `kill -9`
//! once written; batches are at most 20 ms apart) and fdatasyncs after each checkpoint, so a power loss may
//! lose up to one interval. The writer also compacts the file (temp file,
//! fsync, rename) to the calls still open once it holds 1024 lines more than
//! twice them, and after a failed write.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::thread::JoinHandle;
use std::time::Duration;

use metrics::Counter;
use serde::{Deserialize, Serialize};

use crate::cdr::{sync_dir, Cdr, CdrSink, FileCdrStore};

/// File name of the call journal inside the data directory.
pub const CALLS_FILE: &str = "calls.jsonl";

/// The CDR cause of a call that was up when the edge died.
pub const EDGE_LOST: &str = "edge_lost";

/// An admitted call: the CDR fields known at admission.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct OpenCall {
    /// The CDR's `call_id`.
    pub call_id: String,
    /// The API key the call was admitted under.
    pub key_id: String,
    /// The trunk the call runs on.
    pub trunk: String,
    /// Caller (normalised).
    pub from: String,
    /// Destination (normalised).
    pub to: String,
    /// Unix seconds: INVITE received.
    pub start: i64,
    /// The caller's own Call-ID (leg A).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_call_id: Option<String>,
}

impl OpenCall {
    /// This call's CDR, ended at `end` with `cause` (no SIP status).
    pub fn cdr(&self, answer: Option<i64>, end: i64, billable_secs: u64, cause: &str) -> Cdr {
        Cdr {
            call_id: self.call_id.clone(),
            key_id: self.key_id.clone(),
            trunk: self.trunk.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            start: self.start,
            answer,
            end,
            billable_secs,
            cause: cause.to_string(),
            sip_code: None,
            sip_call_id: self.sip_call_id.clone(),
            recording: None,
        }
    }
}

/// One line of the journal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// A call was admitted.
    Open(OpenCall),
    /// A call was answered at `at` (Unix seconds).
    Answer {
        /// The call's `call_id`.
        call_id: String,
        /// Unix seconds.
        at: i64,
    },
    /// Every call open at this line was up at `at` (Unix seconds).
    Checkpoint {
        /// Unix seconds.
        at: i64,
    },
    /// A call has its CDR (durably).
    Close {
        /// The call's `call_id`.
        call_id: String,
    },
}

/// The calls open in a journal: the sans-IO core of recovery.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Journal {
    open: HashMap<String, (OpenCall, Option<i64>)>,
    checkpoint: Option<i64>,
}

impl Journal {
    /// Applies one event.
    pub fn apply(&mut self, ev: Event) {
        match ev {
            Event::Open(c) => {
                self.open.insert(c.call_id.clone(), (c, None));
            }
            Event::Answer { call_id, at } => {
                if let Some((_, a)) = self.open.get_mut(&call_id) {
                    a.get_or_insert(at);
                }
            }
            Event::Checkpoint { at } => {
                self.checkpoint = Some(self.checkpoint.map_or(at, |c| c.max(at)));
            }
            Event::Close { call_id } => {
                self.open.remove(&call_id);
            }
        }
    }

    /// Calls open.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// True if no call is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// One `edge_lost` CDR per open call, oldest first. A call opened after
    /// the last checkpoint has answer ≥ checkpoint, so it bills 0 s.
    pub fn lost_cdrs(&self) -> Vec<Cdr> {
        let mut v: Vec<Cdr> = self
            .open
            .values()
            .map(|(c, answer)| {
                let alive = self.checkpoint.unwrap_or(i64::MIN);
                let end = alive.max(answer.unwrap_or(c.start)).max(c.start);
                let billable = answer.map_or(0, |a| (end - a).max(0) as u64);
                c.cdr(*answer, end, billable, EDGE_LOST)
            })
            .collect();
        v.sort_by(|a, b| (a.start, &a.call_id).cmp(&(b.start, &b.call_id)));
        v
    }

    /// The lines that rebuild this state: opens, answers, the checkpoint.
    fn snapshot(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for (c, answer) in self.open.values() {
            line(&mut out, &Event::Open(c.clone()))?;
            if let Some(at) = answer {
                let call_id = c.call_id.clone();
                line(&mut out, &Event::Answer { call_id, at: *at })?;
            }
        }
        if let (Some(at), false) = (self.checkpoint, self.open.is_empty()) {
            line(&mut out, &Event::Checkpoint { at })?;
        }
        Ok(out)
    }
}

fn line(out: &mut Vec<u8>, ev: &Event) -> io::Result<()> {
    serde_json::to_writer(&mut *out, ev)?;
    out.push(b'\n');
    Ok(())
}

/// Reads a journal file; a missing file is empty. Returns the state and the
/// lines that were not events (a torn last line among them).
pub fn read(path: &Path) -> io::Result<(Journal, u64)> {
    let mut j = Journal::default();
    let mut bad = 0;
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((j, 0)),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::new(file);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        if buf.last() != Some(&b'\n') {
            bad += 1; // torn by a crash mid-write
            break;
        }
        match serde_json::from_slice::<Event>(buf.trim_ascii()) {
            Ok(ev) => j.apply(ev),
            Err(_) => bad += 1,
        }
    }
    Ok((j, bad))
}

/// What [`CallJournal::open`] recovered.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovered {
    /// The `edge_lost` CDRs written now.
    pub written: Vec<Cdr>,
    /// Open calls that already had a CDR (skipped).
    pub already_recorded: usize,
    /// Lines of the old journal that were not events.
    pub bad_lines: u64,
}

/// Called by the writer before it writes a close: makes the CDRs recorded so
/// far durable (`FileCdrStore::flush`).
pub type BeforeClose = Box<dyn Fn() -> io::Result<()> + Send>;

enum Msg {
    Event(Event),
    Flush(SyncSender<io::Result<()>>),
}

/// The call journal (see the module docs).
pub struct CallJournal {
    tx: Option<Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl CallJournal {
    /// Recovers the calls left open in `<dir>/calls.jsonl` by a crash into
    /// `cdrs` (see the module docs), empties the journal and starts its
    /// writer. Call it before any call is admitted.
    pub fn open(
        dir: &Path,
        cdrs: &FileCdrStore,
        before_close: BeforeClose,
    ) -> io::Result<(CallJournal, Recovered)> {
        let path = dir.join(CALLS_FILE);
        let (old, bad_lines) = read(&path)?;
        let mut rec = Recovered {
            bad_lines,
            ..Recovered::default()
        };
        let lost = old.lost_cdrs();
        if !lost.is_empty() {
            let known: HashSet<String> = cdrs.call_ids()?;
            for cdr in lost {
                if known.contains(&cdr.call_id) {
                    rec.already_recorded += 1;
                } else {
                    cdrs.record(&cdr)?;
                    rec.written.push(cdr);
                }
            }
            // Durable before the journal forgets the calls.
            cdrs.flush()?;
        }
        let state = Journal::default();
        let file = rewrite(dir, &path, &state)?;
        let errors = metrics::counter!("tollgate_checkpoint_write_errors_total");
        let (tx, rx) = mpsc::channel();
        let w = JournalWriter {
            dir: dir.to_path_buf(),
            path,
            file,
            lines: 0,
            state,
            dirty: false,
            before_close,
            pending_closes: Vec::new(),
            last_close: std::time::Instant::now(),
            errors,
        };
        let thread = std::thread::Builder::new()
            .name("tollgate-call-journal".into())
            .spawn(move || w.run(rx))?;
        Ok((
            CallJournal {
                tx: Some(tx),
                thread: Some(thread),
            },
            rec,
        ))
    }

    fn send(&self, ev: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Event(ev));
        }
    }

    /// A call was admitted. Never blocks.
    pub fn opened(&self, call: OpenCall) {
        self.send(Event::Open(call));
    }

    /// A call was answered at `at` (Unix seconds). Never blocks.
    pub fn answered(&self, call_id: String, at: i64) {
        self.send(Event::Answer { call_id, at });
    }

    /// Every call open now is up at `at` (Unix seconds). Never blocks.
    pub fn checkpoint(&self, at: i64) {
        self.send(Event::Checkpoint { at });
    }

    /// A call's CDR was recorded (written once the CDR is durable). Never
    /// blocks.
    pub fn closed(&self, call_id: String) {
        self.send(Event::Close { call_id });
    }

    /// Blocks until everything sent before is written and fdatasynced.
    pub fn flush(&self) -> io::Result<()> {
        let gone = || io::Error::other("call journal writer stopped");
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        let (ack_tx, ack_rx) = mpsc::sync_channel(1);
        tx.send(Msg::Flush(ack_tx)).map_err(|_| gone())?;
        ack_rx.recv().map_err(|_| gone())?
    }
}

impl Drop for CallJournal {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for CallJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallJournal").finish_non_exhaustive()
    }
}

/// Writes `state` to a temp file, fsyncs it and renames it over `path`;
/// returns it open for appending.
fn rewrite(dir: &Path, path: &Path, state: &Journal) -> io::Result<File> {
    let tmp = dir.join(format!("{CALLS_FILE}.tmp"));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = OpenOptions::new()
        .append(true)
        .create_new(true)
        .open(&tmp)?;
    file.write_all(&state.snapshot()?)?;
    file.sync_data()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(dir);
    Ok(file)
}

/// How long the writer lets events queue after the first one before it
/// writes them: one wake-up and one `write(2)` per tick instead of one per
/// event (the CPS bench showed the writer's wake-ups on every call's open,
/// answer and close). A `kill -9` may lose the events of the last tick: a
/// call admitted within it has no `edge_lost` CDR (it was up for less than
/// this).
const TICK: Duration = Duration::from_millis(20);
/// Retry interval of closes waiting for the CDR store, and of a failed write.
const RETRY: Duration = Duration::from_millis(200);
/// Closes are written at most this often (or on a flush, or at shutdown):
/// each needs the CDR store flushed first (an fdatasync), and a close only
/// keeps the journal short, since recovery skips calls whose CDR exists.
/// Per call, that was a CDR flush per batch of a few closes at 2,500 calls/s.
const CLOSE_EVERY: Duration = Duration::from_millis(250);
/// Lines beyond twice the open calls that trigger a compaction. A
/// compaction rewrites every open call and fsyncs: with 64 Ki lines of slack
/// it runs every ~20,000 calls (about 8 s at 2,500 calls/s), not every ~300
/// (the CPS bench showed page faults and fsyncs of back-to-back rewrites);
/// the file stays under ~10 MB plus the open calls.
#[cfg(not(test))]
const COMPACT_SLACK: u64 = 65_536;
#[cfg(test)]
const COMPACT_SLACK: u64 = 1024;

struct JournalWriter {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    lines: u64,
    state: Journal,
    /// A write failed: the file may hold a partial line; rewrite it whole.
    dirty: bool,
    before_close: BeforeClose,
    /// Closes not written yet: waiting for [`CLOSE_EVERY`], or because the
    /// CDR store could not be flushed.
    pending_closes: Vec<String>,
    /// When closes were last written (the CDR store flushed for them).
    last_close: std::time::Instant,
    errors: Counter,
}

impl JournalWriter {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut connected = true;
        while connected || !self.pending_closes.is_empty() || self.dirty {
            let mut batch = Vec::new();
            if connected {
                let first = if self.pending_closes.is_empty() && !self.dirty {
                    rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
                } else {
                    rx.recv_timeout(RETRY)
                };
                match first {
                    Ok(m) => {
                        batch.push(m);
                        // Let the rest of this tick's events queue up: while
                        // the writer sleeps, a send wakes nobody, so under
                        // load the shards pay no thread wake-up per event.
                        std::thread::sleep(TICK);
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => connected = false,
                }
                while connected {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => connected = false,
                    }
                }
            } else {
                std::thread::sleep(RETRY);
            }
            let failed = self.write_batch(batch, !connected);
            if failed && !connected {
                // Shutting down with a broken disk: the next start recovers
                // from what the file holds (the CDR check prevents doubles).
                return;
            }
        }
    }

    /// Applies and writes one batch; acks its flushes. Returns whether
    /// something failed.
    fn write_batch(&mut self, batch: Vec<Msg>, closing: bool) -> bool {
        let mut bytes = Vec::new();
        let mut acks = Vec::new();
        let mut sync = false;
        for m in batch {
            match m {
                Msg::Event(Event::Close { call_id }) => self.pending_closes.push(call_id),
                Msg::Event(ev) => {
                    sync |= matches!(ev, Event::Checkpoint { .. });
                    let _ = line(&mut bytes, &ev);
                    self.state.apply(ev);
                }
                Msg::Flush(ack) => {
                    sync = true;
                    acks.push(ack);
                }
            }
        }
        let mut result = Ok(());
        let closes_due = closing || !acks.is_empty() || self.last_close.elapsed() >= CLOSE_EVERY;
        if !self.pending_closes.is_empty() && closes_due {
            match (self.before_close)() {
                Ok(()) => {
                    self.last_close = std::time::Instant::now();
                    for call_id in self.pending_closes.drain(..) {
                        let ev = Event::Close { call_id };
                        let _ = line(&mut bytes, &ev);
                        self.state.apply(ev);
                    }
                }
                Err(e) => result = Err(e),
            }
        }
        let n = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
        let written = if self.dirty || self.lines + n > COMPACT_SLACK + 2 * self.state.len() as u64
        {
            rewrite(&self.dir, &self.path, &self.state).map(|f| {
                self.file = f;
                // At most: an open and an answer per call, one checkpoint.
                self.lines = self.state.len() as u64 * 2 + 1;
                self.dirty = false;
            })
        } else {
            let r = self.file.write_all(&bytes);
            self.lines += n;
            if r.is_err() {
                self.dirty = true;
            }
            r.and_then(|()| if sync { self.file.sync_data() } else { Ok(()) })
        };
        let result = result.and(written);
        let failed = result.is_err();
        if failed {
            self.errors.increment(1);
        }
        for ack in acks {
            let _ = ack.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            });
        }
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdr::tests::TempDir;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

    fn call(id: &str, start: i64) -> OpenCall {
        OpenCall {
            call_id: id.into(),
            key_id: "keyaaaaaaaaa".into(),
            trunk: "keyaaaaaaaaa".into(),
            from: "+14155550100".into(),
            to: "+14155550199".into(),
            start,
            sip_call_id: Some(format!("{id}@caller")),
        }
    }

    /// Opens the CDR store and the journal on `dir` (an edge start).
    fn start(dir: &Path) -> (Arc<FileCdrStore>, CallJournal, Recovered) {
        let cdrs = Arc::new(FileCdrStore::open(dir).unwrap());
        let c = cdrs.clone();
        let (j, rec) = CallJournal::open(dir, &cdrs, Box::new(move || c.flush())).unwrap();
        (cdrs, j, rec)
    }

    fn ended(cdrs: &FileCdrStore, j: &CallJournal, c: &OpenCall, answer: i64, end: i64) {
        let mut cdr = c.cdr(Some(answer), end, (end - answer) as u64, "normal");
        cdr.sip_code = Some(200);
        cdrs.record(&cdr).unwrap();
        j.closed(c.call_id.clone());
    }

    #[test]
    fn lost_calls_billed_to_the_last_checkpoint() {
        let mut j = Journal::default();
        j.apply(Event::Open(call("a", T0)));
        j.apply(Event::Answer {
            call_id: "a".into(),
            at: T0 + 2,
        });
        j.apply(Event::Open(call("ringing", T0 + 1)));
        j.apply(Event::Open(call("done", T0 + 1)));
        j.apply(Event::Checkpoint { at: T0 + 10 });
        j.apply(Event::Close {
            call_id: "done".into(),
        });
        j.apply(Event::Checkpoint { at: T0 + 20 });
        // Opened and answered after the last checkpoint: up, but 0 s proven.
        j.apply(Event::Open(call("late", T0 + 21)));
        j.apply(Event::Answer {
            call_id: "late".into(),
            at: T0 + 22,
        });
        let lost = j.lost_cdrs();
        let got: Vec<(&str, Option<i64>, i64, u64)> = lost
            .iter()
            .map(|c| (c.call_id.as_str(), c.answer, c.end, c.billable_secs))
            .collect();
        assert_eq!(
            got,
            [
                ("a", Some(T0 + 2), T0 + 20, 18),
                ("ringing", None, T0 + 20, 0),
                ("late", Some(T0 + 22), T0 + 22, 0),
            ]
        );
        assert!(lost
            .iter()
            .all(|c| c.cause == EDGE_LOST && c.sip_code.is_none()));
        assert_eq!(lost[0].sip_call_id.as_deref(), Some("a@caller"));
        assert_eq!(lost[0].key_id, "keyaaaaaaaaa");
    }

    #[test]
    fn recovery_writes_each_lost_call_once_and_a_second_start_none() {
        let dir = TempDir::new("once");
        let (a, b, c) = (call("a", T0), call("b", T0), call("c", T0 + 1));
        {
            let (cdrs, j, rec) = start(&dir.0);
            assert_eq!(rec, Recovered::default());
            for x in [&a, &b, &c] {
                j.opened(x.clone());
            }
            j.answered("a".into(), T0 + 1);
            j.answered("c".into(), T0 + 2);
            j.checkpoint(T0 + 5);
            ended(&cdrs, &j, &c, T0 + 2, T0 + 6);
            j.checkpoint(T0 + 10);
            j.flush().unwrap();
            // "Crash": nothing more is written (a and b stay open).
        }
        let (cdrs, j, rec) = start(&dir.0);
        let got: Vec<(&str, u64, i64)> = rec
            .written
            .iter()
            .map(|c| (c.call_id.as_str(), c.billable_secs, c.end))
            .collect();
        assert_eq!(got, [("a", 9, T0 + 10), ("b", 0, T0 + 10)]);
        let u = cdrs.totals(None, None).unwrap();
        assert_eq!((u.total().calls, u.total().billable_secs), (3, 9 + 4));
        assert_eq!(u.total().failed_by_cause.get(EDGE_LOST), Some(&1));
        assert_eq!(u.duplicates, 0);
        assert_eq!(
            cdrs.spent_on_day(crate::utc_day(T0)).unwrap()["keyaaaaaaaaa"],
            13
        );
        drop((j, cdrs));
        let (cdrs, _j, rec) = start(&dir.0);
        assert_eq!(rec, Recovered::default());
        assert_eq!(cdrs.totals(None, None).unwrap().total().calls, 3);
    }

    #[test]
    fn crash_during_recovery_neither_loses_nor_duplicates() {
        let dir = TempDir::new("midrecovery");
        {
            let (_cdrs, j, _) = start(&dir.0);
            for i in 0..5 {
                j.opened(call(&format!("c{i}"), T0));
                j.answered(format!("c{i}"), T0 + 1);
            }
            j.checkpoint(T0 + 30);
            j.flush().unwrap();
        }
        // A recovery that wrote two CDRs and died before emptying the journal.
        let journal = std::fs::read(dir.0.join(CALLS_FILE)).unwrap();
        {
            let (cdrs, _j, rec) = start(&dir.0);
            assert_eq!(rec.written.len(), 5);
            drop(_j);
            let mut lines: Vec<String> = std::fs::read_to_string(cdrs.path())
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            lines.truncate(2);
            drop(cdrs);
            std::fs::write(dir.0.join(crate::cdr::CDR_FILE), lines.join("\n") + "\n").unwrap();
        }
        std::fs::write(dir.0.join(CALLS_FILE), &journal).unwrap();
        let (cdrs, _j, rec) = start(&dir.0);
        assert_eq!((rec.written.len(), rec.already_recorded), (3, 2));
        let u = cdrs.totals(None, None).unwrap();
        assert_eq!((u.total().calls, u.total().billable_secs), (5, 5 * 29));
        assert_eq!(u.duplicates, 0);
    }

    #[test]
    fn torn_last_line_is_skipped() {
        let dir = TempDir::new("torn");
        let mut text = Vec::new();
        line(&mut text, &Event::Open(call("a", T0))).unwrap();
        line(
            &mut text,
            &Event::Answer {
                call_id: "a".into(),
                at: T0 + 1,
            },
        )
        .unwrap();
        line(&mut text, &Event::Checkpoint { at: T0 + 4 }).unwrap();
        text.extend_from_slice(b"garbage\n");
        let mut torn = Vec::new();
        line(&mut torn, &Event::Checkpoint { at: T0 + 99 }).unwrap();
        text.extend_from_slice(&torn[..torn.len() - 3]);
        std::fs::write(dir.0.join(CALLS_FILE), &text).unwrap();
        let (_cdrs, _j, rec) = start(&dir.0);
        assert_eq!(rec.bad_lines, 2);
        assert_eq!(rec.written.len(), 1);
        assert_eq!(rec.written[0].billable_secs, 3);
        assert_eq!(rec.written[0].answer, Some(T0 + 1));
    }

    #[test]
    fn ended_calls_leave_nothing_and_the_file_stays_bounded() {
        let dir = TempDir::new("bounded");
        {
            let (cdrs, j, _) = start(&dir.0);
            for i in 0..5000 {
                let c = call(&format!("n{i}"), T0 + i);
                j.opened(c.clone());
                j.answered(c.call_id.clone(), T0 + i);
                if i % 100 == 0 {
                    j.checkpoint(T0 + i);
                }
                ended(&cdrs, &j, &c, T0 + i, T0 + i + 1);
            }
            j.opened(call("up", T0 + 6000));
            j.flush().unwrap();
            let lines = std::fs::read_to_string(dir.0.join(CALLS_FILE))
                .unwrap()
                .lines()
                .count();
            assert!(lines <= 3 * COMPACT_SLACK as usize, "{lines} lines");
        }
        let (cdrs, _j, rec) = start(&dir.0);
        let ids: Vec<&str> = rec.written.iter().map(|c| c.call_id.as_str()).collect();
        assert_eq!(ids, ["up"]);
        assert_eq!(rec.already_recorded, 0);
        assert_eq!(cdrs.totals(None, None).unwrap().total().calls, 5001);
    }

    #[test]
    fn a_close_waits_for_the_cdr_store() {
        let dir = TempDir::new("waits");
        let cdrs = Arc::new(FileCdrStore::open(&dir.0).unwrap());
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let (j, _) = CallJournal::open(
            &dir.0,
            &cdrs,
            Box::new(move || {
                if f.load(Ordering::SeqCst) {
                    Err(io::Error::other("disk full"))
                } else {
                    Ok(())
                }
            }),
        )
        .unwrap();
        j.opened(call("a", T0));
        j.closed("a".into());
        assert!(j.flush().is_err());
        let (state, _) = read(&dir.0.join(CALLS_FILE)).unwrap();
        assert_eq!(state.len(), 1, "closed before its CDR was durable");
        fail.store(false, Ordering::SeqCst);
        j.flush().unwrap();
        let (state, _) = read(&dir.0.join(CALLS_FILE)).unwrap();
        assert!(state.is_empty());
    }
}
