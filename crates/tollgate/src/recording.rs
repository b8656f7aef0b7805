//! Call recording (SPEC §10): a call whose `record` parameter is true has
//! its audio written to `<data dir>/recordings/<key id>/<call id>.wav` while
//! it runs: 8 kHz PCM16, two channels (left leg A, the caller; right leg B).
//!
//! The relay hands plaintext frames to the call's [`Tap`] (crates/media
//! `record`); one writer thread per recorded call lines them up
//! ([`Mixer`]) and appends them to the file every [`FLUSH_EVERY`], keeping
//! [`LAG_SAMPLES`] back for late packets.
//!
//! Playable when cut short: the header is written first with zero sizes,
//! and after every append the RIFF and `data` sizes are rewritten to what
//! is on disk (data first, then sizes), so at any instant — a `kill -9`
//! included — the header describes a prefix of the file's samples.
//!
//! Retention: a sweep every `[recording] sweep_interval_s` deletes
//! recordings whose last write is older than `retention_days` (never one
//! still being written).

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tollgate_media::record::{Frame, Mixer, Tap, RATE};
use tollgate_media::MediaEngine;

/// How often the writer appends what it has.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Audio held back for packets that come late (200 ms).
pub const LAG_SAMPLES: i64 = RATE as i64 / 5;
const CHANNELS: u16 = 2;
const HEADER_LEN: u64 = 44;

/// `[recording]`.
#[derive(Debug, Clone)]
pub struct RecordingConfig {
    /// Recordings older than this are deleted.
    pub retention: Duration,
    /// How often the retention sweep runs.
    pub sweep_every: Duration,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            retention: Duration::from_secs(30 * 86_400),
            sweep_every: Duration::from_secs(3600),
        }
    }
}

/// The canonical 44-byte WAV header of `data_len` bytes of 8 kHz PCM16.
pub fn wav_header(data_len: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    let block = CHANNELS * 2;
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&(36u32.saturating_add(data_len)).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&1u16.to_le_bytes()); // PCM
    h[22..24].copy_from_slice(&CHANNELS.to_le_bytes());
    h[24..28].copy_from_slice(&RATE.to_le_bytes());
    h[28..32].copy_from_slice(&(RATE * u32::from(block)).to_le_bytes());
    h[32..34].copy_from_slice(&block.to_le_bytes());
    h[34..36].copy_from_slice(&16u16.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    h
}

/// A file-name-safe form of an id (key ids, Call-IDs): `[A-Za-z0-9._-]`
/// kept, anything else `_`, and never a leading dot.
pub fn file_safe(id: &str) -> String {
    let mut s: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.starts_with('.') || s.is_empty() {
        s.insert(0, '_');
    }
    s
}

/// Starts recordings, knows which are being written, sweeps old ones.
pub struct Recorder {
    data_dir: PathBuf,
    engine: Arc<MediaEngine>,
    active: Mutex<HashSet<PathBuf>>,
    cfg: RecordingConfig,
}

impl Recorder {
    pub fn new(data_dir: &Path, engine: Arc<MediaEngine>, cfg: RecordingConfig) -> Arc<Recorder> {
        Arc::new(Recorder {
            data_dir: data_dir.to_path_buf(),
            engine,
            active: Mutex::new(HashSet::new()),
            cfg,
        })
    }

    /// `recordings/<key>/<call>.wav`, relative to the data directory.
    pub fn relative(key_id: &str, call_id: &str) -> String {
        format!(
            "recordings/{}/{}.wav",
            file_safe(key_id),
            file_safe(call_id)
        )
    }

    /// Where the recording of `call_id` under `key_id` is (or would be).
    pub fn path_of(data_dir: &Path, key_id: &str, call_id: &str) -> PathBuf {
        data_dir.join(Self::relative(key_id, call_id))
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.active.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records call `call` (the B2BUA's handle): creates the file, starts
    /// its writer, and tells the media engine to tap the call's relays.
    /// Returns the recording's name (relative to the data directory), or
    /// `None` if the file could not be created (logged; the call goes on).
    pub fn start(self: &Arc<Self>, call: u64, key_id: &str, call_id: &str) -> Option<String> {
        let rel = Self::relative(key_id, call_id);
        let path = self.data_dir.join(&rel);
        let created = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| File::create(&path))
            .and_then(|mut f| f.write_all(&wav_header(0)).map(|()| f));
        let file = match created {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(call = %call_id, path = %path.display(), error = %e, "recording not started");
                metrics::counter!("tollgate_recording_errors_total").increment(1);
                return None;
            }
        };
        let (tap, rx, _stats) = Tap::new();
        self.active().insert(path.clone());
        let me = self.clone();
        let name = call_id.to_string();
        let spawned = std::thread::Builder::new()
            .name("recording".into())
            .spawn(move || {
                if let Err(e) = write_loop(file, rx) {
                    tracing::error!(call = %name, error = %e, "recording cut short");
                    metrics::counter!("tollgate_recording_errors_total").increment(1);
                }
                me.active().remove(&path);
            });
        if spawned.is_err() {
            tracing::error!(call = %call_id, "recording: no writer thread");
            return None;
        }
        self.engine.record(call, tap);
        metrics::counter!("tollgate_recordings_total").increment(1);
        Some(rel)
    }

    /// The call ended: its tap goes (the writer finishes once the relay's
    /// clone is gone too).
    pub fn stop(&self, call: u64) {
        self.engine.unrecord(call);
    }

    /// Deletes recordings older than the retention; returns how many.
    pub fn sweep(&self, now: SystemTime) -> usize {
        let mut n = 0;
        let Ok(keys) = std::fs::read_dir(self.data_dir.join("recordings")) else {
            return 0;
        };
        for dir in keys.flatten() {
            let Ok(files) = std::fs::read_dir(dir.path()) else {
                continue;
            };
            for f in files.flatten() {
                let path = f.path();
                if path.extension().is_none_or(|e| e != "wav") || self.active().contains(&path) {
                    continue;
                }
                let old = f
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age >= self.cfg.retention);
                if old && std::fs::remove_file(&path).is_ok() {
                    n += 1;
                }
            }
        }
        if n > 0 {
            metrics::counter!("tollgate_recordings_deleted_total").increment(n as u64);
            tracing::info!(deleted = n, "recording retention sweep");
        }
        n
    }

    /// Runs [`Recorder::sweep`] every `sweep_interval_s`, on its own thread.
    pub fn start_sweeper(self: &Arc<Self>) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("recording-sweep".into())
            .spawn(move || loop {
                me.sweep(SystemTime::now());
                std::thread::sleep(me.cfg.sweep_every);
            });
    }
}

/// The writer: frames in until every tap is gone, appended as they age.
fn write_loop(mut file: File, rx: Receiver<Frame>) -> std::io::Result<()> {
    let mut mixer = Mixer::new();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut data_len: u64 = 0;
    let mut last_flush = Instant::now();
    let mut open = true;
    while open {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(f) => {
                mixer.push(&f);
                for f in rx.try_iter() {
                    mixer.push(&f);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => open = false,
        }
        if open && last_flush.elapsed() < FLUSH_EVERY {
            continue;
        }
        last_flush = Instant::now();
        if open {
            mixer.flush_before(last_flush, LAG_SAMPLES, &mut out);
        } else {
            mixer.finish(&mut out);
        }
        // A WAV's sizes are 32-bit: past 4 GiB (about 37 hours) the file
        // stops growing.
        let room = (u64::from(u32::MAX) - HEADER_LEN).saturating_sub(data_len);
        let n = (out.len() as u64).min(room) as usize;
        if n > 0 {
            file.write_all(&out[..n])?;
            data_len += n as u64;
            let sizes = wav_header(data_len as u32);
            file.write_all_at(&sizes[4..8], 4)?;
            file.write_all_at(&sizes[40..44], 40)?;
        }
        out.clear();
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_canonical_pcm16_stereo_8k() {
        let h = wav_header(320);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes([h[4], h[5], h[6], h[7]]), 356);
        assert_eq!(u16::from_le_bytes([h[22], h[23]]), 2);
        assert_eq!(u32::from_le_bytes([h[24], h[25], h[26], h[27]]), 8000);
        assert_eq!(u32::from_le_bytes([h[28], h[29], h[30], h[31]]), 32000);
        assert_eq!(u32::from_le_bytes([h[40], h[41], h[42], h[43]]), 320);
    }

    #[test]
    fn ids_cannot_leave_the_recordings_directory() {
        assert_eq!(file_safe("abc.0@tollgate"), "abc.0_tollgate");
        assert_eq!(file_safe("../etc/passwd"), "_.._etc_passwd");
        assert_eq!(file_safe(".."), "_..");
        assert_eq!(file_safe(""), "_");
        assert_eq!(
            Recorder::relative("k/1", "x/../y"),
            "recordings/k_1/x_.._y.wav"
        );
    }
}
