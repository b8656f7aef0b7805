//! The fleet's call records (SPEC §8): every node keeps its durable CDR
//! file (`cdrs.jsonl`, unchanged) and publishes each record to one Redis
//! Stream, `tg:cdrs`, from which `tollgate usage` and `GET /v1/usage` sum
//! the fleet.
//!
//! # Exactly once
//!
//! The file is the node's source of truth; the stream is fed from it, never
//! from memory. [`CdrPublisher`] reads the complete lines past its cursor
//! (`cdrs.published` in the data directory: the byte offset up to which
//! every record is in the stream) and publishes each with one script that
//! first does `SET tg:cdr:{tg:cdrs}:<call_id> NX EX <7 days>` and only then
//! `XADD`s (the mark's hash tag is the stream's name: one slot on a
//! cluster); a call whose end the fleet did not settle on its budgets is
//! settled just before, under its own once-only mark:
//!
//! * at least once: the cursor moves past a record only after Redis
//!   answered for it, so a record written while Redis was down (or by a
//!   node that was killed before publishing) is published when Redis
//!   answers again, after a restart too;
//! * at most once: a record sent twice (the cursor not yet saved when the
//!   node died, or the reply lost on the way) finds its call id taken and
//!   is not added again. Call ids are unique per call (leg B's Call-ID).
//!
//! A record older than the dedupe window is not re-sent (it was, or it
//! predates the fleet).

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tollgate_trunk::{Cdr, Usage};

use crate::{Shared, StateError};

/// The fleet's stream of call records.
pub const CDR_STREAM: &str = "tg:cdrs";
/// Default approximate length the stream is trimmed to (`XADD MAXLEN ~`,
/// `[state] cdr_stream_max`): fleet usage covers the latest this many calls.
pub const CDR_STREAM_MAXLEN: u64 = 1_000_000;
/// How long a published call id is remembered against a second publication.
const DEDUPE_SECS: i64 = 7 * 86_400;
/// The publisher's cursor file in the data directory.
pub const CURSOR_FILE: &str = "cdrs.published";

/// KEYS: the call id's dedupe key, the stream (one slot: the dedupe key's
/// tag is the stream's name). ARGV: the CDR's JSON, the node, MAXLEN,
/// dedupe seconds. Returns 1 added, 0 already there.
const PUBLISH_LUA: &str = r"
if not redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[4]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'node', ARGV[2], 'cdr', ARGV[1])
return 1
";

/// The seconds of a call whose end the fleet did not settle (Redis down
/// then, or a call recovered after a crash), settled once, before its
/// record is published (its own slot: the hierarchy's root key's tag).
/// KEYS: the call's settled mark, then its budgeted keys' spent seconds of
/// the day. ARGV: billable seconds, the mark's seconds.
const SETTLE_LUA: &str = r"
local secs = tonumber(ARGV[1])
if secs > 0 and redis.call('SET', KEYS[1], 1, 'NX', 'EX', ARGV[2]) then
  for i = 2, #KEYS do
    redis.call('INCRBY', KEYS[i], secs)
    redis.call('EXPIRE', KEYS[i], 172800)
  end
end
return 0
";

/// A key's budget chain as the publisher needs it: the root of its
/// hierarchy and the ids of the key and ancestors that have a daily
/// budget (`None`: the key is unknown).
pub type BudgetChain = dyn Fn(&str) -> Option<(String, Vec<String>)> + Send + Sync;

/// Publishes a node's CDR file to the fleet's stream, exactly once per call.
pub struct CdrPublisher {
    shared: Arc<Shared>,
    node: String,
    file: PathBuf,
    cursor: PathBuf,
    script: redis::Script,
    settle: redis::Script,
    chain: Box<BudgetChain>,
    maxlen: u64,
}

impl std::fmt::Debug for CdrPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CdrPublisher")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

/// Tagged with the stream's name, so that the mark and the `XADD` are one
/// script in one slot on a cluster.
fn dedupe_key(call_id: &str) -> String {
    format!("tg:cdr:{{{CDR_STREAM}}}:{call_id}")
}

impl CdrPublisher {
    /// The publisher of `data_dir`'s CDR file for `node`, into a stream
    /// trimmed to about `maxlen` records; `chain` finds the budgeted keys a
    /// record's seconds are settled on.
    pub fn new(
        shared: Arc<Shared>,
        node: &str,
        data_dir: &Path,
        maxlen: u64,
        chain: Box<BudgetChain>,
    ) -> Arc<Self> {
        Arc::new(CdrPublisher {
            shared,
            node: node.to_owned(),
            file: data_dir.join(tollgate_trunk::cdr::CDR_FILE),
            cursor: data_dir.join(CURSOR_FILE),
            script: redis::Script::new(PUBLISH_LUA),
            settle: redis::Script::new(SETTLE_LUA),
            chain,
            maxlen,
        })
    }

    fn read_cursor(&self) -> u64 {
        std::fs::read_to_string(&self.cursor)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    fn save_cursor(&self, at: u64) -> std::io::Result<()> {
        let tmp = self.cursor.with_extension("published.tmp");
        std::fs::write(&tmp, format!("{at}\n"))?;
        std::fs::rename(&tmp, &self.cursor)
    }

    /// Publishes every complete record past the cursor; returns how many
    /// were added to the stream (not counting those already there). Stops
    /// at the first Redis failure, keeping the cursor before that record.
    pub fn publish_pending(&self, now: i64) -> Result<usize, StateError> {
        let io = |e: std::io::Error| StateError::Redis(format!("CDR file: {e}"));
        let mut at = self.read_cursor();
        let file = match File::open(&self.file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io(e)),
        };
        let len = file.metadata().map_err(io)?.len();
        if at == len {
            return Ok(0);
        }
        if at > len {
            // A file shorter than the cursor is another file: from its
            // start (the call ids keep it exactly once).
            at = 0;
        }
        let mut reader = BufReader::new(file);
        reader.seek(SeekFrom::Start(at)).map_err(io)?;
        let (mut added, mut line) = (0, Vec::new());
        let result = loop {
            line.clear();
            let n = match reader.read_until(b'\n', &mut line) {
                Ok(n) => n,
                Err(e) => break Err(io(e)),
            };
            if n == 0 || line.last() != Some(&b'\n') {
                break Ok(());
            }
            let body = line.trim_ascii();
            let fresh = serde_json::from_slice::<Cdr>(body)
                .ok()
                .filter(|c| now.saturating_sub(c.end) < DEDUPE_SECS);
            if let Some(cdr) = fresh {
                let json = String::from_utf8_lossy(body);
                let r = self.settle_unseen(&cdr).and_then(|()| {
                    let mut inv = self.script.prepare_invoke();
                    inv.key(dedupe_key(&cdr.call_id))
                        .key(CDR_STREAM)
                        .arg(&*json)
                        .arg(&self.node)
                        .arg(self.maxlen)
                        .arg(DEDUPE_SECS);
                    self.shared.run(false, |c| inv.invoke::<i64>(c))
                });
                match r {
                    Ok(1) => added += 1,
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            }
            at += n as u64;
        };
        if let Err(e) = self.save_cursor(at) {
            tracing::warn!(error = %e, "CDR publication cursor not saved (records are re-sent once, then found)");
        }
        result.map(|()| added)
    }

    /// Settles `cdr`'s seconds on its budgeted keys unless its end did
    /// (the settled mark says which): before the record's publication, so
    /// a failure here keeps the cursor before it and a retry settles once.
    fn settle_unseen(&self, cdr: &Cdr) -> Result<(), StateError> {
        let Some((root, budgeted)) = (self.chain)(&cdr.key_id) else {
            return Ok(());
        };
        if budgeted.is_empty() || cdr.billable_secs == 0 {
            return Ok(());
        }
        let mut inv = self.settle.prepare_invoke();
        inv.key(crate::settled_key(&root, &cdr.call_id));
        for kid in &budgeted {
            inv.key(crate::spent_key_of(&root, kid, cdr.end));
        }
        inv.arg(cdr.billable_secs).arg(crate::SETTLED_SECS);
        self.shared.run(false, |c| inv.invoke::<i64>(c)).map(|_| ())
    }

    /// Starts the publishing thread: every `every`, what the file gained.
    pub fn start(self: &Arc<Self>, every: Duration) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("state-cdrs".into())
            .spawn(move || loop {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                match me.publish_pending(now) {
                    Ok(n) if n > 0 => {
                        metrics::counter!("tollgate_state_cdrs_published_total").increment(n as u64)
                    }
                    Ok(_) | Err(StateError::Down) => {}
                    Err(e) => tracing::debug!(error = %e, "CDR publication deferred"),
                }
                std::thread::sleep(every);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the CDR publication thread");
        }
    }
}

/// Fleet usage from the stream: totals per key, optionally only `key`'s
/// and only calls that started at or after `since`, as
/// [`tollgate_trunk::FileCdrStore::totals`] gives for one node.
pub fn fleet_usage(
    shared: &Shared,
    key: Option<&str>,
    since: Option<i64>,
) -> Result<Usage, StateError> {
    let mut usage = Usage::default();
    let mut seen = std::collections::HashSet::new();
    let mut from = "-".to_string();
    loop {
        let batch: Vec<(String, std::collections::HashMap<String, String>)> =
            shared.run(true, |c| {
                redis::cmd("XRANGE")
                    .arg(CDR_STREAM)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(1000)
                    .query(c)
            })?;
        let Some((last, _)) = batch.last() else { break };
        from = format!("({last}");
        for (_, fields) in &batch {
            let cdr = fields
                .get("cdr")
                .and_then(|v| serde_json::from_str::<Cdr>(v).ok());
            let Some(cdr) = cdr else {
                usage.bad_lines += 1;
                continue;
            };
            if key.is_some_and(|k| k != cdr.key_id) || since.is_some_and(|s| cdr.start < s) {
                continue;
            }
            if !seen.insert(cdr.call_id.clone()) {
                usage.duplicates += 1;
                continue;
            }
            usage.keys.entry(cdr.key_id.clone()).or_default().add(&cdr);
        }
        if batch.len() < 1000 {
            break;
        }
    }
    Ok(usage)
}
