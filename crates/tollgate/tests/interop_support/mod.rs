//! Helpers of the interop matrix (tests/interop.rs): real user agents and
//! proxies driven as child processes, a tone WAV in, the frequency of what
//! came back measured (an independent DFT scan, no product code).
#![allow(dead_code)]

use crate::common::*;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// The matrix never skips: a missing user agent fails, naming its package.
pub fn require(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "interop: `{bin}` not found: install the Debian package `{package}` \
         (scripts/test.sh installs it); this case fails rather than skips"
    );
}

// ---------------------------------------------------------------------------
// Audio: a tone WAV, and the dominant frequency of a WAV
// ---------------------------------------------------------------------------

/// Writes `secs` of a `freq` Hz sine, 8 kHz mono 16-bit PCM.
pub fn write_tone_wav(path: &Path, freq: f64, secs: f64) {
    let rate = 8000u32;
    let n = (rate as f64 * secs) as u32;
    let mut data = Vec::with_capacity(n as usize * 2);
    for i in 0..n {
        let v = (2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64).sin() * 12000.0;
        data.extend_from_slice(&(v as i16).to_le_bytes());
    }
    let mut w = Vec::with_capacity(44 + data.len());
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data.len() as u32).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&1u16.to_le_bytes()); // PCM
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 2).to_le_bytes());
    w.extend_from_slice(&2u16.to_le_bytes());
    w.extend_from_slice(&16u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&(data.len() as u32).to_le_bytes());
    w.extend_from_slice(&data);
    fs::write(path, w).unwrap();
}

/// 16-bit PCM samples of channel 0 and the sample rate of a WAV file.
/// The data chunk's size field is ignored (a writer killed mid-call leaves
/// it unset): everything after the `data` header is taken.
pub fn read_wav(path: &Path) -> (Vec<f64>, u32) {
    let b = fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    assert!(
        b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WAVE",
        "{} is not a WAV file",
        path.display()
    );
    let (mut pos, mut rate, mut channels, mut bits) = (12, 0u32, 1u16, 16u16);
    while pos + 8 <= b.len() {
        let id = &b[pos..pos + 4];
        let len = u32::from_le_bytes(b[pos + 4..pos + 8].try_into().unwrap()) as usize;
        let body = pos + 8;
        if id == b"fmt " && body + 16 <= b.len() {
            channels = u16::from_le_bytes([b[body + 2], b[body + 3]]);
            rate = u32::from_le_bytes(b[body + 4..body + 8].try_into().unwrap());
            bits = u16::from_le_bytes([b[body + 14], b[body + 15]]);
        }
        if id == b"data" {
            assert_eq!(bits, 16, "{}: expected 16-bit PCM", path.display());
            let frame = 2 * channels.max(1) as usize;
            let s = b[body..]
                .chunks_exact(frame)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
                .collect();
            return (s, rate);
        }
        pos = body + len + (len & 1);
    }
    panic!("{}: no data chunk", path.display());
}

/// Seconds above silence in a recording still being written (its sizes
/// may not be final yet): the bytes after the 44-byte header as 16-bit
/// PCM at the header's rate (`rate` while the writer has not filled the
/// header in yet), in chunks of 160, counted where the chunk's rms is over
/// 1000.
pub fn loud_secs_so_far(path: &Path, rate: u32) -> f64 {
    let b = fs::read(path).unwrap_or_default();
    let rate = b
        .get(24..28)
        .map(|r| u32::from_le_bytes(r.try_into().unwrap()))
        .filter(|r| (8000..=96_000).contains(r))
        .unwrap_or(rate);
    let s: Vec<f64> = b
        .get(44..)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| i16::from_le_bytes([c[0], c[1]]) as f64)
        .collect();
    let n: usize = s
        .chunks(160)
        .filter(|c| rms(c) > 1000.0)
        .map(<[f64]>::len)
        .sum();
    n as f64 / rate as f64
}

/// Root mean square of `s`.
pub fn rms(s: &[f64]) -> f64 {
    if s.is_empty() {
        return 0.0;
    }
    (s.iter().map(|x| x * x).sum::<f64>() / s.len() as f64).sqrt()
}

/// The loudest frequency of `s` (Hann window, DFT scanned in 5 Hz steps
/// from 100 Hz to 3900 Hz).
pub fn dominant_hz(s: &[f64], rate: u32) -> f64 {
    let n = s.len();
    let w: Vec<f64> = s
        .iter()
        .enumerate()
        .map(|(i, x)| x * (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()))
        .collect();
    let mut best = (0.0, 0.0);
    let mut f = 100.0;
    while f <= 3900.0 {
        let k = 2.0 * std::f64::consts::PI * f / rate as f64;
        let (mut re, mut im) = (0.0, 0.0);
        for (i, x) in w.iter().enumerate() {
            re += x * (k * i as f64).cos();
            im -= x * (k * i as f64).sin();
        }
        let p = re * re + im * im;
        if p > best.1 {
            best = (f, p);
        }
        f += 5.0;
    }
    best.0
}

/// The last `secs` of the loudest stretch of a recording: asserts that the
/// recording holds at least that much audio above silence and that its
/// frequency is `want_hz` (+-15 Hz).
pub fn assert_tone(path: &Path, want_hz: f64, secs: f64, what: &str) -> f64 {
    let (s, rate) = read_wav(path);
    assert!(rate > 0, "{what}: {} has no sample rate", path.display());
    let win = (rate as f64 * secs) as usize;
    // Non-silent samples only (leading silence before media flowed, and the
    // tail after the hang-up, are not the tone).
    let frame = rate as usize / 50;
    let loud: Vec<f64> = s
        .chunks(frame)
        .filter(|c| rms(c) > 1000.0)
        .flatten()
        .copied()
        .collect();
    assert!(
        loud.len() >= win,
        "{what}: {} holds {:.2} s of audio above silence (rms>1000), want >= {secs} s \
         (of {:.2} s recorded, rms {:.0})",
        path.display(),
        loud.len() as f64 / rate as f64,
        s.len() as f64 / rate as f64,
        rms(&s)
    );
    // Decimate to about 8 kHz (the tone is far below 4 kHz; the scan is a
    // plain DFT).
    let step = (rate / 8000).max(1) as usize;
    let seg: Vec<f64> = loud[loud.len() - win..]
        .iter()
        .step_by(step)
        .copied()
        .collect();
    let hz = dominant_hz(&seg, rate / step as u32);
    assert!(
        (hz - want_hz).abs() <= 15.0,
        "{what}: received tone is {hz} Hz, sent {want_hz} Hz ({})",
        path.display()
    );
    hz
}

// ---------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------

/// A child process in a process group of its own, ended with its children
/// (kamailio forks workers) when dropped; its output goes to `log`.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Proc {
        let out = fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        let child = std::os::unix::process::CommandExt::process_group(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err)),
            0,
        )
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc {
            child,
            log,
            name: name.into(),
        }
    }

    /// The last `n` lines of its output (baresip's `\r`-separated bit-rate
    /// ticker left out).
    pub fn tail(&self, n: usize) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t
            .split(['\n', '\r'])
            .filter(|l| !l.trim().is_empty() && !l.contains("(bit/s)"))
            .collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        poll(timeout, || self.child.try_wait().ok().flatten()).is_some()
    }

    pub fn log_contains(&self, s: &str) -> bool {
        fs::read_to_string(&self.log).is_ok_and(|t| t.contains(s))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return; // ended (and reaped): its pid is no longer ours to signal
        }
        // The group this process leads (its pid): SIGTERM lets kamailio
        // stop its workers; SIGKILL for whatever is left.
        let group = format!("-{}", self.child.id());
        for sig in ["-TERM", "-KILL"] {
            let _ = Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status();
            if poll(Duration::from_secs(3), || {
                self.child.try_wait().ok().flatten()
            })
            .is_some()
            {
                break;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// baresip (libre), driven through its ctrl_tcp module
// ---------------------------------------------------------------------------

pub struct Baresip {
    pub proc: Proc,
    pub dir: PathBuf,
    pub sip: SocketAddr,
    ctrl: TcpStream,
    events: mpsc::Receiver<String>,
    seen: Vec<String>,
}

/// One baresip account: `user`/`password` answer the edge's digest
/// challenge, `server` is where its requests go.
pub struct BaresipAccount<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub server: SocketAddr,
    /// Parameters of the account's URI (e.g. `;transport=tls`).
    pub uri_params: &'a str,
    /// Extra `;param` of the account line (e.g. `;mediaenc=srtp-mand`).
    pub extra: &'a str,
    /// Extra lines of baresip's `config` (e.g. `sip_cafile ...`).
    pub config: &'a str,
}

impl Baresip {
    /// Starts baresip with its own config dir under `dir`: audio source
    /// `tone` (aufile), received audio dumped by the sndfile filter into
    /// `dir/rec`, ALSA's null device as player, SIP, RTP and ctrl_tcp on
    /// the ports of one [`alloc_ports`] block, all on 127.0.0.1.
    pub fn start(dir: &Path, acct: &BaresipAccount<'_>, tone: &Path) -> Baresip {
        let bin = require("baresip", "baresip-core");
        let ports = alloc_ports();
        let conf = dir.join("baresip");
        let rec = dir.join("baresip-rec");
        fs::create_dir_all(&conf).unwrap();
        fs::create_dir_all(&rec).unwrap();
        let config = format!(
            "poll_method epoll\n\
             sip_listen 127.0.0.1:{sip}\n\
             net_interface 127.0.0.1\n\
             audio_source aufile,{tone}\n\
             audio_player alsa,null\n\
             audio_alert alsa,null\n\
             audio_srate 8000\n\
             audio_channels 1\n\
             rtp_ports {rtp_lo}-{rtp_hi}\n\
             module_path /usr/lib/baresip/modules\n\
             module g711.so\n\
             module alsa.so\n\
             module aufile.so\n\
             module sndfile.so\n\
             module srtp.so\n\
             module_app account.so\n\
             module_app menu.so\n\
             module_app ctrl_tcp.so\n\
             snd_path {rec}\n\
             ctrl_tcp_listen 127.0.0.1:{ctrl}\n\
             {extra}\n",
            sip = ports.sip,
            tone = tone.display(),
            rtp_lo = ports.media,
            rtp_hi = ports.media + 3,
            rec = rec.display(),
            ctrl = ports.control,
            extra = acct.config,
        );
        fs::write(conf.join("config"), config).unwrap();
        fs::write(
            conf.join("accounts"),
            format!(
                "<sip:{u}@{s}{up}>;{p}regint=0;audio_codecs=PCMU{x}\n",
                u = acct.user,
                s = acct.server,
                up = acct.uri_params,
                p = if acct.password.is_empty() {
                    String::new()
                } else {
                    format!("auth_pass={};", acct.password)
                },
                x = acct.extra
            ),
        )
        .unwrap();
        let proc = Proc::spawn(
            "baresip",
            Command::new(bin).arg("-s").arg("-f").arg(&conf),
            dir.join("baresip.log"),
        );
        let addr: SocketAddr = ([127, 0, 0, 1], ports.control).into();
        let ctrl =
            poll(Duration::from_secs(15), || TcpStream::connect(addr).ok()).unwrap_or_else(|| {
                panic!(
                    "baresip's ctrl_tcp never listened on {addr}:\n{}",
                    proc.tail(30)
                )
            });
        let (tx, rx) = mpsc::channel();
        let reader = ctrl.try_clone().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::new(reader);
            // netstrings: "<len>:<json>,"
            loop {
                let mut len = Vec::new();
                if r.read_until(b':', &mut len)
                    .ok()
                    .filter(|n| *n > 0)
                    .is_none()
                {
                    break;
                }
                let Ok(n) = String::from_utf8_lossy(&len[..len.len() - 1])
                    .trim()
                    .parse::<usize>()
                else {
                    break;
                };
                let mut body = vec![0u8; n + 1];
                if r.read_exact(&mut body).is_err() {
                    break;
                }
                body.pop();
                if tx
                    .send(String::from_utf8_lossy(&body).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Baresip {
            proc,
            dir: rec,
            sip: ([127, 0, 0, 1], ports.sip).into(),
            ctrl,
            events: rx,
            seen: Vec::new(),
        }
    }

    /// Sends a ctrl_tcp command (a menu command without the slash).
    pub fn command(&mut self, command: &str, params: &str) {
        let body = format!("{{\"command\":\"{command}\",\"params\":\"{params}\",\"token\":\"t\"}}");
        let ns = format!("{}:{body},", body.len());
        self.ctrl.write_all(ns.as_bytes()).unwrap();
    }

    /// Waits for a ctrl_tcp event of `kind` (e.g. `CALL_ESTABLISHED`).
    pub fn wait_event(&mut self, kind: &str, timeout: Duration) -> String {
        let want = format!("\"type\":\"{kind}\"");
        if let Some(e) = self.seen.iter().find(|e| e.contains(&want)) {
            return e.clone();
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) => {
                    self.seen.push(e.clone());
                    if e.contains(&want) {
                        return e;
                    }
                }
                Err(_) => panic!(
                    "baresip: no {kind} event within {timeout:?}; events: {:?}\nlog:\n{}",
                    self.seen,
                    self.proc.tail(60)
                ),
            }
        }
    }

    /// The sndfile dumps of the audio baresip received and decoded, one per
    /// call, oldest first.
    pub fn received_wavs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(&self.dir)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with("-dec.wav"))
            .collect();
        v.sort();
        v
    }

    /// Waits until the newest received-audio dump holds `secs` of audio
    /// (8 kHz, 16 bit) beyond the `before` dumps already there.
    pub fn wait_received_audio(&self, before: usize, secs: u64) {
        let want = 44 + 16_000 * secs;
        let got = poll(Duration::from_secs(30), || {
            let v = self.received_wavs();
            let p = v.get(before)?;
            (p.metadata().ok()?.len() > want).then_some(())
        });
        assert!(
            got.is_some(),
            "baresip received under {secs} s of audio in call {}:\n{}",
            before + 1,
            self.proc.tail(40)
        );
    }

    /// Forgets the events seen so far (before waiting for the next call's).
    pub fn seen_clear(&mut self) {
        self.seen.clear();
    }

    /// Dials `uri` and waits until the call is up.
    pub fn dial(&mut self, uri: &str) {
        self.seen.clear();
        self.command("dial", uri);
        self.wait_event("CALL_ESTABLISHED", Duration::from_secs(30));
    }

    /// `/quit`, then waits for the process to end (files closed).
    pub fn quit(&mut self) {
        self.command("quit", "");
        if !self.proc.wait_exit(Duration::from_secs(15)) {
            panic!("baresip did not quit:\n{}", self.proc.tail(30));
        }
    }
}

// ---------------------------------------------------------------------------
// The edge's side of a call
// ---------------------------------------------------------------------------

/// Waits until the edge has no call up and returns its CDR lines.
pub fn wait_calls_done(edge: &Edge, n: usize) -> Vec<String> {
    let path = edge.data_dir.join("cdrs.jsonl");
    poll(Duration::from_secs(20), || {
        let t = fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<String> = t.lines().map(String::from).collect();
        (lines.len() >= n).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "the edge wrote fewer than {n} CDRs in {}:\n{}",
            path.display(),
            edge.stderr_tail(30)
        )
    })
}

// ---------------------------------------------------------------------------
// Kamailio as the carrier's proxy in front of the edge
// ---------------------------------------------------------------------------

pub struct Kamailio {
    pub proc: Proc,
    pub sip: SocketAddr,
}

impl Kamailio {
    /// A stateful proxy on 127.0.0.1 that Record-Routes every INVITE,
    /// sends requests from `edge` to `ua` and all others to `edge`, and
    /// answers the edge's 401 with `user`/`password` (uac module,
    /// `uac_auth()` in a failure route): a carrier interconnect that
    /// authenticates with the key's digest credentials.
    /// `port`: where it listens (UDP, 127.0.0.1).
    pub fn start(
        dir: &Path,
        port: u16,
        edge: SocketAddr,
        ua: SocketAddr,
        user: &str,
        password: &str,
    ) -> Kamailio {
        let bin = require("kamailio", "kamailio");
        let cfg = format!(
            r#"#!KAMAILIO
debug=2
log_stderror=yes
children=1
auto_aliases=no
listen=udp:127.0.0.1:{port}
mpath="/usr/lib/x86_64-linux-gnu/kamailio/modules/"
loadmodule "tm.so"
loadmodule "sl.so"
loadmodule "rr.so"
loadmodule "pv.so"
loadmodule "maxfwd.so"
loadmodule "textops.so"
loadmodule "siputils.so"
loadmodule "uac.so"
loadmodule "xlog.so"
modparam("rr", "append_fromtag", 1)
modparam("uac", "credential", "{user}:tollgate:{password}")

request_route {{
    xlog("L_INFO", "kamailio: $rm $ru from $si:$sp\n");
    if (!mf_process_maxfwd_header("10")) {{
        sl_send_reply("483", "Too Many Hops");
        exit;
    }}
    if (has_totag()) {{
        if (loose_route()) {{
            t_relay();
            exit;
        }}
        if (is_method("ACK")) {{
            if (t_check_trans()) {{
                t_relay();
            }}
            exit;
        }}
        sl_send_reply("404", "Not here");
        exit;
    }}
    if (is_method("CANCEL")) {{
        if (t_check_trans()) {{
            t_relay();
        }}
        exit;
    }}
    if (is_method("INVITE")) {{
        record_route();
    }}
    if ($si == "{edge_ip}" && $sp == {edge_port}) {{
        $du = "sip:{ua}";
    }} else {{
        $du = "sip:{edge}";
    }}
    t_on_failure("AUTH");
    t_relay();
    exit;
}}

failure_route[AUTH] {{
    if (t_is_canceled()) {{
        exit;
    }}
    if (t_check_status("401|407")) {{
        if (uac_auth()) {{
            t_relay();
        }}
        exit;
    }}
}}
"#,
            edge_ip = edge.ip(),
            edge_port = edge.port(),
        );
        let path = dir.join("kamailio.cfg");
        fs::write(&path, cfg).unwrap();
        let proc = Proc::spawn(
            "kamailio",
            Command::new(bin)
                .args(["-DD", "-E", "-w"])
                .arg(dir)
                .arg("-P")
                .arg(dir.join("kamailio.pid"))
                .arg("-f")
                .arg(&path),
            dir.join("kamailio.log"),
        );
        let mut k = Kamailio {
            proc,
            sip: ([127, 0, 0, 1], port).into(),
        };
        let up = poll(Duration::from_secs(15), || {
            if k.proc.child.try_wait().ok().flatten().is_some() {
                return Some(false);
            }
            udp_listening(port).then_some(true)
        });
        assert_eq!(
            up,
            Some(true),
            "kamailio did not start on {}:\n{}",
            k.sip,
            k.proc.tail(40)
        );
        k
    }

    /// Methods the proxy routed (from its `kamailio: METHOD` log lines).
    pub fn routed(&self, method: &str) -> usize {
        fs::read_to_string(&self.proc.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(&format!("kamailio: {method} ")))
            .count()
    }
}

/// Plain HTTP/1.0 request with a bearer key; returns (status, body).
pub fn http_with_key(addr: SocketAddr, method: &str, path: &str, key: &str) -> (u16, String) {
    http_request(
        addr,
        method,
        path,
        &format!("Authorization: Bearer {key}\r\n"),
    )
}

/// Hangs up the edge's only call through the admin API (the edge sends
/// the BYEs).
pub fn admin_hang_up_only_call(edge: &Edge, key: &str) {
    let admin = edge
        .listening("admin")
        .expect("the edge printed its admin address");
    let (code, body) = http_with_key(admin, "GET", "/v1/calls", key);
    assert_eq!(code, 200, "GET /v1/calls: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let calls = v["calls"].as_array().cloned().unwrap_or_default();
    assert_eq!(calls.len(), 1, "one call up: {body}");
    let id = calls[0]["id"].as_str().expect("call id").to_string();
    let enc: String = id
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = http_with_key(admin, "DELETE", &format!("/v1/calls/{enc}"), key);
    assert_eq!(code, 202, "DELETE /v1/calls/{id}: {body}");
}

// ---------------------------------------------------------------------------
// A network namespace for user agents that put their interface address in SDP
// ---------------------------------------------------------------------------

/// Set inside the namespace for the re-executed test.
pub const NETNS_ENV: &str = "TOLLGATE_INTEROP_NETNS";

/// The address of the namespace's veth end, where the edge and the user
/// agent meet. A documentation address (TEST-NET-1, RFC 5737): it exists
/// only inside the namespace, which has no link to anywhere.
pub const NETNS_IP: &str = "192.0.2.77";

/// Runs the test `name` again, inside a new network namespace (`unshare
/// -n`) holding only loopback and a veth pair whose both ends stay in it,
/// so no packet of that test can leave the machine. Returns true in the
/// parent (the child's result is asserted), false inside the namespace,
/// after setting it up (the caller then runs the test body).
pub fn reexec_in_netns(name: &str) -> bool {
    if std::env::var_os(NETNS_ENV).is_some() {
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "tg0", "type", "veth", "peer", "name", "tg1"],
            vec!["addr", "add", &format!("{NETNS_IP}/24"), "dev", "tg0"],
            vec!["link", "set", "tg0", "up"],
            vec!["link", "set", "tg1", "up"],
            // A default route, so stacks that look for "the network" find
            // tg0; whatever takes it ends at tg1, inside the namespace.
            vec!["route", "add", "default", "dev", "tg0"],
        ] {
            let ip = require("ip", "iproute2");
            let out = Command::new(ip).args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?} in the namespace: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        return false;
    }
    let unshare = require("unshare", "util-linux");
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(unshare)
        .arg("-n")
        .arg(&exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot run unshare: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "{name} inside `unshare -n` (needs root, as CI runs scripts/test.sh) failed:\n{text}"
    );
    eprintln!("{text}");
    true
}

// ---------------------------------------------------------------------------
// linphonec (liblinphone, belle-sip), driven through its stdin
// ---------------------------------------------------------------------------

pub struct Linphonec {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub log: PathBuf,
    pub recording: PathBuf,
}

impl Linphonec {
    /// linphonec with a fresh config in `dir`: digest account `user` /
    /// `password` at `server`, SIP on `sip_port`, the sound card replaced by
    /// files (plays `tone`, records what it receives).
    pub fn start(
        dir: &Path,
        user: &str,
        password: &str,
        server: SocketAddr,
        sip_port: u16,
        rtp_port: u16,
        tone: &Path,
    ) -> Linphonec {
        let bin = require("linphonec", "linphone-cli");
        let rc = dir.join("linphonerc");
        fs::write(
            &rc,
            format!(
                "[sip]\nsip_tcp_port=0\ndefault_proxy=0\n\
                 [rtp]\naudio_rtp_port={rtp_port}\n\
                 [video]\nenabled=0\ncapture=0\ndisplay=0\n\
                 [sound]\nechocancellation=0\n\
                 [auth_info_0]\nusername={user}\nuserid={user}\npasswd={password}\nrealm=tollgate\n\
                 [proxy_0]\nreg_proxy=<sip:{server}>\nreg_identity=sip:{user}@{ip}\nreg_sendregister=0\n",
                ip = server.ip(),
            ),
        )
        .unwrap();
        let log = dir.join("linphone.log");
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&rc)
            .arg("-d")
            .arg("6")
            .arg("-l")
            .arg(&log)
            .env("HOME", dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start linphonec: {e}"));
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        {
            let lines = lines.clone();
            thread::spawn(move || {
                // linphonec prints its prompt without a newline: split on
                // newlines and on the prompt.
                let mut r = BufReader::new(stdout);
                let mut buf = Vec::new();
                while r
                    .read_until(b'\n', &mut buf)
                    .ok()
                    .filter(|n| *n > 0)
                    .is_some()
                {
                    let l = String::from_utf8_lossy(&buf).replace("linphonec> ", "");
                    lines.lock().unwrap().push(l.trim().to_string());
                    buf.clear();
                }
            });
        }
        let recording = dir.join("linphone-received.wav");
        let mut l = Linphonec {
            child,
            stdin,
            lines,
            log,
            recording,
        };
        l.cmd(&format!("ports sip {sip_port}"));
        l.wait_line(
            &format!("Setting sip port to {sip_port}"),
            Duration::from_secs(20),
        );
        l.cmd("soundcard use files");
        l.cmd(&format!("play {}", tone.display()));
        let rec = l.recording.display().to_string();
        l.cmd(&format!("record {rec}"));
        l
    }

    pub fn cmd(&mut self, c: &str) {
        writeln!(self.stdin, "{c}").unwrap();
        self.stdin.flush().unwrap();
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Waits for an output line containing `s`.
    pub fn wait_line(&self, s: &str, timeout: Duration) -> String {
        poll(timeout, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(s))
                .cloned()
        })
        .unwrap_or_else(|| {
            let log = fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "linphonec: no line with {s:?} within {timeout:?}; output:\n{}\nlog tail:\n{}",
                self.output(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
    }

    pub fn quit(&mut self) {
        self.cmd("quit");
        let done = poll(Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(done.is_some(), "linphonec did not quit:\n{}", self.output());
    }
}

impl Drop for Linphonec {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// PJSIP through pjsua2 (Python), the stack of Asterisk's chan_pjsip
// ---------------------------------------------------------------------------

/// The Python of the venv scripts/install-interop-deps.sh makes (or
/// `$TOLLGATE_INTEROP_VENV`), checked to import pjsua2.
pub fn pjsua2_python() -> PathBuf {
    let venv = std::env::var_os("TOLLGATE_INTEROP_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../../.venv/interop"));
    let py = venv.join("bin/python");
    let ok = Command::new(&py)
        .args(["-c", "import pjsua2"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "interop: {} cannot import pjsua2: run scripts/install-interop-deps.sh \
         (PyPI pjsua2-python in a venv; scripts/test.sh runs it); this case fails rather than skips",
        py.display()
    );
    py
}

/// Runs interop_support/pjsua2_ua.py (one call: tone, hold, resume, BYE)
/// to completion; returns its output.
pub fn run_pjsua2_call(
    dir: &Path,
    edge: SocketAddr,
    user: &str,
    password: &str,
    tone: &Path,
    out: &Path,
    tls_ca: Option<&Path>,
) -> String {
    let py = pjsua2_python();
    let script = manifest_dir().join("tests/interop_support/pjsua2_ua.py");
    let ports = alloc_ports();
    let mut p = Proc::spawn(
        "pjsua2",
        Command::new(py)
            .arg(script)
            .arg(edge.to_string())
            .arg(user)
            .arg(password)
            .arg(ports.sip.to_string())
            .arg(SERVICE)
            .arg(tone)
            .arg(out)
            .args(tls_ca),
        dir.join("pjsua2.log"),
    );
    let done = p.wait_exit(Duration::from_secs(90));
    let log = fs::read_to_string(&p.log).unwrap_or_default();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("EVENT") || l.starts_with("FAIL"))
        .collect();
    let ok = done
        && p.child
            .try_wait()
            .ok()
            .flatten()
            .is_some_and(|s| s.success());
    assert!(
        ok,
        "pjsua2 call failed (exited: {done}); events:\n{}\nlog tail:\n{}",
        events.join("\n"),
        p.tail(60)
    );
    events.join("\n")
}

/// The CDR of a call that a BYE ended normally (`cause` normal, answered
/// with 200).
pub fn assert_normal_end(cdr: &str, what: &str) {
    assert!(
        cdr.contains("\"cause\":\"normal\"") && cdr.contains("\"sip_code\":200"),
        "{what}: the call must end normally: {cdr}"
    );
}

/// baresip with a digest account for `key` on the edge's UDP address,
/// playing a `secs`-long tone WAV written into `dir`.
pub fn baresip_on(edge: &Edge, key: &str, dir: &TestDir, hz: f64, secs: f64) -> Baresip {
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, hz, secs);
    Baresip::start(
        &dir.path,
        &BaresipAccount {
            user: &key_id(key),
            password: &digest_password(key),
            server: edge.sip_udp,
            uri_params: "",
            extra: "",
            config: "",
        },
        &tone,
    )
}
