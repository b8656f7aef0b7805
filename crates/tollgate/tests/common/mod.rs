//! Shared harness for the Tollgate integration tests, split by job and
//! re-exported here (`use common::*;`): `edge.rs` (the edge process, CLI,
//! ports, PKI), `sipp.rs`, `ua.rs` (SIP user agents), `oracles.rs` (crypto,
//! JSON, metrics checks). Helpers of general use stay in this file.
//!
//! * [`Edge`]: spawns the real `tollgate serve` binary with a config file in a
//!   fresh temp dir, learns its ports from the `tollgate: listening ...` lines,
//!   kills it on drop (and prints its stderr if the test failed).
//! * [`tollgate`] / [`tollgate_ok`]: run CLI subcommands.
//! * SIPp: [`require_sipp`] (panics, never skips), [`Sipp`] builder with a
//!   hard wall-clock bound, [`SippResult`] with the final `-trace_stat` row.
//! * Ports: [`alloc_ports`] hands out blocks of free UDP ports outside the
//!   kernel's ephemeral range, unique within the process.
//! * A tiny SIP UA over UDP ([`UdpUa`]) and TCP ([`TcpUa`]), a scriptable
//!   destination UAS ([`MiniUas`]), SIP message parsing ([`SipMsg`]).
//! * Crypto done independently of the product (RustCrypto sha2/hmac/md-5 and
//!   base64, not the product's ring): SHA-256, HMAC-SHA256, MD5, base64url,
//!   JWT signing, the digest password and digest responses; JSON as
//!   `serde_json::Value` ([`Json`], [`JsonExt`]).
//! * Prometheus scraping over a plain `TcpStream`.
#![allow(
    dead_code,
    clippy::too_many_arguments,
    clippy::type_complexity,
    clippy::wrong_self_convention
)]

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
pub const REALM: &str = "tollgate";
/// Request-URI user the SIPp UAC dials (`-s`) and tokens are minted for.
pub const SERVICE: &str = "15551230000";
pub const READY_DEADLINE: Duration = Duration::from_secs(20);

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
pub fn sipp_scenario(name: &str) -> PathBuf {
    manifest_dir().join("tests").join("sipp").join(name)
}
pub fn corpus_dir() -> PathBuf {
    manifest_dir().join("tests").join("corpus")
}

pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A process-unique random-looking token (hex), for branches, tags, Call-IDs, jti.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let h = sha256(format!("{}-{}-{}", std::process::id(), n, t).as_bytes());
    format!("{prefix}{}", &hex(&h)[..16])
}

mod edge;
mod oracles;
mod sipp;
mod ua;

// Each test binary uses only some of these.
#[allow(unused_imports)]
pub use {edge::*, oracles::*, sipp::*, ua::*};
