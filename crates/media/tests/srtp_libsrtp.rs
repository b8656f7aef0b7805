//! Our SRTP against libsrtp (an independent C implementation, through the
//! PyPI package pylibsrtp): byte-identical protect, and each unprotects the
//! other's packets, for every suite, RTP and RTCP, across rollover.
//!
//! Needs `python3` with pylibsrtp (`crates/media/scripts/install-test-deps.sh`).
//! It FAILS when that is missing: it is never skipped.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use bytes::BytesMut;
use common::RtpGen;
use tollgate_media::srtp::{native, Direction, SrtpKeys, SrtpTransform, Suite};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn byte_identical_with_libsrtp() {
    let python = std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/libsrtp_oracle.py");

    // What we send libsrtp, and what we expect back (kind, plain) per packet.
    let mut input = String::new();
    let mut expected: Vec<(Suite, bool, BytesMut)> = Vec::new();
    let mut keys_of = Vec::new();
    for (n, suite) in Suite::ALL.into_iter().enumerate() {
        let keys = SrtpKeys::generate(suite).unwrap();
        input += &format!("suite {} {}\n", suite.sdes_name(), hex(&keys.concat()));
        let mut tx = native::Context::new(suite, &keys, Direction::Outbound).unwrap();
        let mut gen = RtpGen::new(0x11b5 + n as u64);
        for i in 0..1500 {
            let rtcp = i % 5 == 4;
            let plain = if rtcp { gen.next_rtcp() } else { gen.next() };
            let mut p = plain.clone();
            if rtcp {
                tx.protect_rtcp(&mut p).unwrap();
            } else {
                tx.protect_rtp(&mut p).unwrap();
            }
            let kind = if rtcp { "rtcp" } else { "rtp" };
            input += &format!("{kind} {} {}\n", hex(&plain), hex(&p));
            expected.push((suite, rtcp, plain));
        }
        keys_of.push((suite, keys));
    }

    let mut child = Command::new(&python)
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {python}: {e}; run crates/media/scripts/install-test-deps.sh")
        });
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().ok();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "libsrtp oracle failed (is pylibsrtp installed? run \
         crates/media/scripts/install-test-deps.sh)\nstdout tail: {}\nstderr: {stderr}",
        stdout.lines().rev().take(3).collect::<Vec<_>>().join("\n"),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&format!("DONE {}", expected.len()).as_str())
    );

    // And we unprotect what libsrtp protected.
    let mut rx: Vec<(Suite, native::Context)> = keys_of
        .iter()
        .map(|(s, k)| (*s, native::Context::new(*s, k, Direction::Inbound).unwrap()))
        .collect();
    for (line, (suite, rtcp, plain)) in lines.iter().zip(&expected) {
        let ctx = &mut rx.iter_mut().find(|(s, _)| s == suite).unwrap().1;
        let mut p = BytesMut::from(&unhex(line)[..]);
        if *rtcp {
            ctx.unprotect_rtcp(&mut p).unwrap();
        } else {
            ctx.unprotect_rtp(&mut p).unwrap();
        }
        assert_eq!(&p, plain, "{suite:?}");
    }
}
