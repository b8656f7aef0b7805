//! Call recording (issue 16 item 4, SPEC §10), against the real binary on
//! loopback: a caller with a `record` token sends a known PCMU sequence to
//! the built-in echo, and the WAV's two channels hold what each leg sent
//! (decoded samples, compared after finding each channel's offset); a call
//! without `record` leaves no file; the owning key downloads the recording,
//! another key gets 404; after `kill -9` mid-call the partial file is valid
//! WAV with the audio up to the kill; the retention sweep deletes old files.

mod common;

use common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

const SSRC: u32 = 0x0bad_cafe;

fn edge(recording_toml: &str) -> Edge {
    Edge::start(EdgeConfig {
        tcp: false,
        extra_toml: format!("[recording]\n{recording_toml}\n"),
        ..Default::default()
    })
}

/// µ-law code to linear PCM (ITU-T G.711), independent of the edge's table.
fn ulaw(u: u8) -> i16 {
    let u = !u;
    let t = ((((u & 0x0f) as i32) << 3) + 0x84) << ((u >> 4) & 7);
    (if u & 0x80 != 0 { 0x84 - t } else { t - 0x84 }) as i16
}

/// A-law code to linear PCM (ITU-T G.711).
fn alaw(a: u8) -> i16 {
    let a = a ^ 0x55;
    let seg = (a >> 4) & 7;
    let t = ((a & 0x0f) as i32) << 4;
    let t = if seg == 0 {
        t + 8
    } else {
        (t + 0x108) << (seg - 1)
    };
    (if a & 0x80 != 0 { t } else { -t }) as i16
}

/// Sends `n` G.711 packets of `payload(i)` from `sock` to `to`, paced at
/// 20 ms by deadline.
fn talk_from(
    sock: &UdpSocket,
    to: SocketAddr,
    pt: u8,
    ssrc: u32,
    n: u32,
    payload: fn(u32) -> Vec<u8>,
) {
    let t0 = Instant::now();
    for i in 0..n {
        let at = t0 + Duration::from_millis(20 * u64::from(i));
        if let Some(d) = at.checked_duration_since(Instant::now()) {
            thread::sleep(d);
        }
        let mut p = vec![0x80, pt];
        p.extend_from_slice(&(100 + i as u16).to_be_bytes());
        p.extend_from_slice(&(7_000 + 160 * i).to_be_bytes());
        p.extend_from_slice(&ssrc.to_be_bytes());
        p.extend_from_slice(&payload(i));
        sock.send_to(&p, to).unwrap();
    }
}

/// Leg B's audio in the routed test: A-law, unlike the caller's.
fn payload_b(i: u32) -> Vec<u8> {
    (0..160u32)
        .map(|j| ((i * 101 + j * 3) % 256) as u8)
        .collect()
}

/// Packet `i`'s payload: 160 distinct-ish µ-law codes.
fn payload(i: u32) -> Vec<u8> {
    (0..160u32)
        .map(|j| ((i * 37 + j * 11 + (i * j) % 7) % 256) as u8)
        .map(|b| if b == 0x7f || b == 0xff { 0x55 } else { b })
        .collect()
}

fn expected(packets: u32) -> Vec<i16> {
    (0..packets).flat_map(payload).map(ulaw).collect()
}

/// The port of an SDP body's `m=audio` line.
fn audio_port(sdp: &[u8], what: &str) -> u16 {
    let body = String::from_utf8_lossy(sdp);
    body.lines()
        .find_map(|l| l.strip_prefix("m=audio "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no m=audio in {what}:\n{body}"))
}

struct Call {
    ua: UdpUa,
    rtp: UdpSocket,
    invite: Req,
    ok: SipMsg,
    media: SocketAddr,
}

impl Call {
    fn start(edge: &Edge, key: &str, record: Option<bool>) -> Call {
        let rtp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = rtp.local_addr().unwrap().port();
        let sdp = format!(
            "v=0\r\no=alice 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n"
        );
        let now = now_unix();
        let mut c = claims(now, now + 600, SERVICE, "alice");
        if let Some(r) = record {
            c.pop();
            c.push_str(&format!(",\"record\":{r}}}"));
        }
        let mut invite = Req::invite(edge.sip_udp, SERVICE, "alice").bearer(&jwt_for(key, &c));
        invite.body = sdp.into_bytes();
        let mut ua = UdpUa::new(edge.sip_udp);
        let ok = ua.call(&invite);
        assert_eq!(ok.code(), Some(200), "INVITE: {}", ok.text());
        let mport = audio_port(&ok.body, "the edge's answer");
        ua.send(&invite.in_dialog(&ok, "ACK", invite.cseq));
        Call {
            ua,
            rtp,
            invite,
            ok,
            media: SocketAddr::from(([127, 0, 0, 1], mport)),
        }
    }

    /// Sends `n` PCMU packets paced at 20 ms.
    fn talk(&self, n: u32) {
        talk_from(&self.rtp, self.media, 0, SSRC, n, payload);
    }

    fn hang_up(mut self) {
        let bye = self.invite.in_dialog(&self.ok, "BYE", self.invite.cseq + 1);
        let code = self
            .ua
            .transact(&bye, Duration::from_secs(10))
            .map(|o| o.fin.code());
        assert_eq!(code, Some(Some(200)), "BYE through the edge");
    }
}

fn cdrs(data_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(data_dir.join("cdrs.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn wait_cdrs(data_dir: &Path, n: usize) -> Vec<Value> {
    let t = Instant::now();
    loop {
        let c = cdrs(data_dir);
        if c.len() >= n {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "want {n} CDRs, have {c:?}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// A parsed PCM WAV: (channels, rate, bits, interleaved samples).
struct Wav {
    channels: u16,
    rate: u32,
    bits: u16,
    samples: Vec<i16>,
}

/// Parses a RIFF/WAVE file strictly: every size in the header must fit in
/// the file (a partial file whose header claims more than is there fails).
fn parse_wav(b: &[u8]) -> Result<Wav, String> {
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    if b.len() < 44 || &b[0..4] != b"RIFF" || &b[8..12] != b"WAVE" {
        return Err(format!("not RIFF/WAVE ({} bytes)", b.len()));
    }
    if u32_at(4) as usize + 8 > b.len() {
        return Err(format!(
            "RIFF size {} beyond the file ({})",
            u32_at(4),
            b.len()
        ));
    }
    let mut o = 12;
    let (mut fmt, mut data) = (None, None);
    while o + 8 <= b.len() {
        let (id, len) = (&b[o..o + 4], u32_at(o + 4) as usize);
        let body = b
            .get(o + 8..o + 8 + len)
            .ok_or_else(|| format!("chunk {:?} of {len} bytes beyond the file", id))?;
        match id {
            b"fmt " => fmt = Some(body),
            b"data" => {
                data = Some(body);
                break;
            }
            _ => {}
        }
        o += 8 + len + (len & 1);
    }
    let fmt = fmt.ok_or("no fmt chunk")?;
    let data = data.ok_or("no data chunk")?;
    if u16::from_le_bytes([fmt[0], fmt[1]]) != 1 {
        return Err("not PCM".into());
    }
    let _ = u16_at;
    Ok(Wav {
        channels: u16::from_le_bytes([fmt[2], fmt[3]]),
        rate: u32::from_le_bytes([fmt[4], fmt[5], fmt[6], fmt[7]]),
        bits: u16::from_le_bytes([fmt[14], fmt[15]]),
        samples: data
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]))
            .collect(),
    })
}

fn channel(w: &Wav, c: usize) -> Vec<i16> {
    w.samples.iter().skip(c).step_by(2).copied().collect()
}

/// Where `needle` starts in `hay` (searching the first 2 s), if anywhere.
fn find(hay: &[i16], needle: &[i16]) -> Option<usize> {
    (0..hay.len().min(16_000)).find(|&o| hay.get(o..o + needle.len()) == Some(needle))
}

/// Python's `wave` module reads the file (an independent parser), if
/// python3 is there; returns (channels, rate, width, frames).
fn python_wave(path: &Path) -> Option<(u32, u32, u32, u64)> {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, wave\nw = wave.open(sys.argv[1])\nprint(w.getnchannels(), w.getframerate(), w.getsampwidth(), len(w.readframes(w.getnframes())) // 4)",
        ])
        .arg(path)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "python wave refused {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    Some((v[0] as u32, v[1] as u32, v[2] as u32, v[3]))
}

/// `GET path` on the admin API, the body as bytes.
fn admin_get(addr: SocketAddr, path: &str, key: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![];
    s.read_to_end(&mut buf).unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head, buf[split + 4..].to_vec())
}

fn wav_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for d in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            out.push(f.path());
        }
    }
    out
}

#[test]
fn recorded_call_holds_both_legs_is_served_to_its_key_only_and_unrecorded_calls_leave_nothing() {
    let edge = edge("");
    let key = edge.first_key();
    let recordings = edge.data_dir.join("recordings");

    // Without `record` (absent, then false): no file at all.
    for record in [None, Some(false)] {
        let c = Call::start(&edge, &key, record);
        c.talk(10);
        c.hang_up();
    }
    let ends = wait_cdrs(&edge.data_dir, 2);
    assert!(
        ends.iter().all(|c| c.get("recording").is_none()),
        "unrecorded calls' CDRs name a recording: {ends:?}"
    );
    assert!(
        wav_files(&recordings).is_empty(),
        "unrecorded calls left files: {:?}",
        wav_files(&recordings)
    );

    // Recorded: 2 s of known audio to the echo.
    const N: u32 = 100;
    let c = Call::start(&edge, &key, Some(true));
    c.talk(N);
    thread::sleep(Duration::from_millis(300)); // the last echoes come back
    c.hang_up();
    let cdr = wait_cdrs(&edge.data_dir, 3).pop().unwrap();
    let name = cdr["recording"]
        .as_str()
        .unwrap_or_else(|| panic!("recorded call's CDR names no recording: {cdr}"));
    let path = edge.data_dir.join(name);
    // The writer finishes when the relay is gone: poll for the final size.
    let want = expected(N);
    let t = Instant::now();
    let (wav, bytes) = loop {
        let bytes = std::fs::read(&path).unwrap_or_default();
        if let Ok(w) = parse_wav(&bytes) {
            let b = channel(&w, 1);
            if find(&b, &want).is_some() {
                break (w, bytes);
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{} never held both legs' audio ({} bytes)",
            path.display(),
            bytes.len()
        );
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!((wav.channels, wav.rate, wav.bits), (2, 8000, 16));
    let (a, b) = (channel(&wav, 0), channel(&wav, 1));
    let oa =
        find(&a, &want).expect("channel 1 (caller) holds the caller's audio, sample for sample");
    let ob = find(&b, &want).expect("channel 2 (echo) holds the echo's audio, sample for sample");
    assert!(
        ob >= oa && ob - oa <= 800,
        "legs not aligned in time: caller's audio at sample {oa}, echo's at {ob}"
    );
    // What a leg did not send is silence: before the echo started, channel 2.
    assert!(
        b[..ob].iter().all(|&s| s == 0),
        "channel 2 before the echo is not silence"
    );
    if let Some((ch, rate, width, frames)) = python_wave(&path) {
        assert_eq!((ch, rate, width), (2, 8000, 2));
        assert_eq!(frames as usize, a.len());
    }

    // Served to the owning key, byte for byte; another key gets 404.
    let admin = edge.listening("admin").expect("admin listener");
    let id = cdr["call_id"].as_str().unwrap();
    let url = format!("/v1/calls/{id}/recording");
    let (code, head, body) = admin_get(admin, &url, &key);
    assert_eq!(
        code,
        200,
        "owner GET {url}: {head}\n{}",
        String::from_utf8_lossy(&body)
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: audio/wav"),
        "{head}"
    );
    assert_eq!(body, bytes, "downloaded recording differs from the file");
    // Another root key, and the owner's own child: 404 both (owner only).
    let other = edge.create_key("other", &[]);
    let child = edge.create_key("child", &["--parent", &key_id(&key)]);
    for (who, k) in [("another key", &other), ("the owner's child", &child)] {
        let t = Instant::now();
        let (code, _, body) = loop {
            // The edge reloads the key file within a second.
            let r = admin_get(admin, &url, k);
            if r.0 != 401 || t.elapsed() > Duration::from_secs(5) {
                break r;
            }
            thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            code,
            404,
            "{who} got {code}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let (code, _, _) = admin_get(admin, "/v1/calls/nope/recording", &key);
    assert_eq!(code, 404, "unknown call's recording");
}

#[test]
fn each_leg_has_its_own_channel_pcmu_caller_and_pcma_destination() {
    let uas = MiniUas::start(UasMode::Answer);
    // The UAS answers with media at its port + 2: leg B's audio comes from there.
    let b_rtp = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], uas.addr.port() + 2)))
        .expect("the UAS's media port + 2 is free");
    let edge = Edge::start(EdgeConfig {
        tcp: false,
        ..EdgeConfig::routed_to(uas.addr.port())
    });
    let key = edge.first_key();
    let c = Call::start(&edge, &key, Some(true));
    let invite = uas
        .received
        .lock()
        .unwrap()
        .iter()
        .find(|m| m.method() == Some("INVITE"))
        .cloned()
        .expect("the UAS got the INVITE");
    let b_port = audio_port(&invite.body, "leg B's offer");
    const N: u32 = 60;
    let b = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200)); // B starts 200 ms later
        talk_from(
            &b_rtp,
            SocketAddr::from(([127, 0, 0, 1], b_port)),
            8,
            0x00b0_b0b0,
            N,
            payload_b,
        );
    });
    c.talk(N);
    b.join().unwrap();
    thread::sleep(Duration::from_millis(100));
    c.hang_up();
    let cdr = wait_cdrs(&edge.data_dir, 1).pop().unwrap();
    let path = edge
        .data_dir
        .join(cdr["recording"].as_str().expect("CDR names the recording"));
    let want_a = expected(N);
    let want_b: Vec<i16> = (0..N).flat_map(payload_b).map(alaw).collect();
    let t = Instant::now();
    let wav = loop {
        let w = std::fs::read(&path).ok().and_then(|b| parse_wav(&b).ok());
        if let Some(w) = w.filter(|w| find(&channel(w, 1), &want_b).is_some()) {
            break w;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{} never held leg B's audio",
            path.display()
        );
        thread::sleep(Duration::from_millis(100));
    };
    let (a, bch) = (channel(&wav, 0), channel(&wav, 1));
    let oa = find(&a, &want_a).expect("channel 1 holds the caller's PCMU audio");
    let ob = find(&bch, &want_b).expect("channel 2 holds leg B's PCMA audio");
    assert!(
        find(&a, &want_b).is_none() && find(&bch, &want_a).is_none(),
        "legs mixed up"
    );
    // B started 200 ms (1600 samples) after A: so it sits in the file.
    let lag = ob as i64 - oa as i64;
    assert!(
        (1200..=2400).contains(&lag),
        "leg B placed {lag} samples after leg A, want ~1600"
    );
    assert!(
        bch[..ob].iter().all(|&s| s == 0),
        "channel 2 before leg B spoke is not silence"
    );
}

#[test]
fn after_kill_9_mid_call_the_partial_recording_is_valid_wav_with_the_audio_so_far() {
    let mut edge = edge("");
    let key = edge.first_key();
    const N: u32 = 75; // 1.5 s
    let c = Call::start(&edge, &key, Some(true));
    c.talk(N);
    let dir = edge.data_dir.join("recordings");
    // Flushed every 200 ms, 200 ms held back: poll until the caller's audio
    // is on disk, then kill the edge with the call still up.
    let want = expected(N);
    let t = Instant::now();
    let path = loop {
        let found = wav_files(&dir).into_iter().find(|p| {
            std::fs::read(p)
                .ok()
                .and_then(|b| parse_wav(&b).ok())
                .is_some_and(|w| find(&channel(&w, 0), &want).is_some())
        });
        if let Some(p) = found {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the caller's 1.5 s never reached the recording while the call ran: {:?}",
            wav_files(&dir)
        );
        thread::sleep(Duration::from_millis(100));
    };
    let st = std::process::Command::new("kill")
        .args(["-9", &edge.pid().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let t = Instant::now();
    while edge.is_running() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "edge survived kill -9"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    let bytes = std::fs::read(&path).unwrap();
    let wav = parse_wav(&bytes).unwrap_or_else(|e| panic!("after kill -9: {e}"));
    assert_eq!((wav.channels, wav.rate, wav.bits), (2, 8000, 16));
    assert!(
        find(&channel(&wav, 0), &want).is_some(),
        "after kill -9 the file lacks the caller's audio"
    );
    if let Some((ch, _, _, frames)) = python_wave(&path) {
        assert_eq!(ch, 2);
        assert!(
            frames as usize >= want.len(),
            "python reads {frames} frames"
        );
    }
}

#[test]
fn retention_sweep_deletes_old_recordings_only() {
    let edge = edge("retention_days = 1\nsweep_interval_s = 1");
    let dir = edge.data_dir.join("recordings").join("k1");
    std::fs::create_dir_all(&dir).unwrap();
    let (old, fresh) = (dir.join("old.wav"), dir.join("fresh.wav"));
    for p in [&old, &fresh] {
        std::fs::write(p, b"RIFF....WAVE").unwrap();
    }
    let f = std::fs::File::options().write(true).open(&old).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(2 * 86_400))
        .unwrap();
    drop(f);
    let t = Instant::now();
    while old.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "a 2-day-old recording survived the sweep (retention_days = 1)"
        );
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(1500)); // another sweep
    assert!(fresh.exists(), "the sweep deleted a fresh recording");
}

#[test]
fn bad_recording_config_exits_2_naming_the_field() {
    for (toml, field) in [
        ("retention_days = 40000", "recording.retention_days"),
        ("sweep_interval_s = 0", "recording.sweep_interval_s"),
        ("retain = 3", "retain"),
    ] {
        let dir = TestDir::new("rec-cfg");
        let cfg = dir.join("tollgate.toml");
        std::fs::write(&cfg, format!("[recording]\n{toml}\n")).unwrap();
        let data = dir.join("data");
        let out = tollgate(&[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            describe_output(&[toml], &out)
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(field),
            "error for {toml:?} does not name {field}: {err}"
        );
    }
}
