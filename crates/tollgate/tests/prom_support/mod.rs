//! Helpers shared by `e2e_prometheus` and `deploy_kit`: required tools (the
//! tests fail, never skip, when one is missing), the repository's deploy kit,
//! YAML through python3-yaml, traffic that makes the edge register its metric
//! families, and Prometheus text-format parsing.
#![allow(dead_code)]

use crate::common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (where `deploy/` lives).
pub fn repo_root() -> PathBuf {
    let root = manifest_dir().join("..").join("..");
    root.canonicalize().unwrap_or(root)
}

pub fn deploy(rel: &str) -> PathBuf {
    repo_root().join("deploy").join(rel)
}

/// Full path of `name` on PATH, or None.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Panics (never skips) when `name` is not installed.
pub fn require_tool(name: &str, debian_package: &str) -> PathBuf {
    which(name).unwrap_or_else(|| {
        panic!(
            "`{name}` is required by this test but is not on PATH. Install the Debian package \
             `{debian_package}` (scripts/test.sh does: apt-get install --no-install-recommends \
             {debian_package}). Tests never skip."
        )
    })
}

/// Run a command to completion; (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    let desc = format!("{cmd:?}");
    let o = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// `promtool check metrics` on a scrape (stdin); panics with its findings.
pub fn promtool_check_metrics(promtool: &Path, text: &str, what: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run promtool: {e}"));
    {
        let mut stdin = child.stdin.take().expect("promtool stdin");
        stdin
            .write_all(text.as_bytes())
            .expect("write scrape to promtool");
    }
    let o = child.wait_with_output().expect("promtool output");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success() && out.trim().is_empty() && err.trim().is_empty(),
        "`promtool check metrics` rejected the {what} scrape ({}):\n{out}{err}\n--- scrape ---\n{text}",
        o.status
    );
}

/// Every document of a YAML file as JSON, through python3 + PyYAML
/// (`safe_load_all`). Tries `python3` on PATH, then Debian's /usr/bin/python3.
pub fn yaml_docs(path: &Path) -> Vec<serde_json::Value> {
    const PY: &str = "import sys, json, yaml\n\
        with open(sys.argv[1]) as f:\n    docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let mut last = String::new();
    for py in ["python3", "/usr/bin/python3"] {
        let o = Command::new(py)
            .args(["-c", PY])
            .arg(path)
            .stdin(Stdio::null())
            .output();
        match o {
            Ok(o) if o.status.success() => {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout)
                    .unwrap_or_else(|e| panic!("python3 gave bad JSON for {path:?}: {e}"));
                return v.as_array().cloned().unwrap_or_default();
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr).into_owned();
                if !err.contains("No module named") {
                    panic!("{} is not valid YAML:\n{err}", path.display());
                }
                last = err;
            }
            Err(e) => last = e.to_string(),
        }
    }
    panic!(
        "parsing YAML needs python3 with PyYAML (Debian: python3-yaml, installed by \
         scripts/test.sh); tests never skip. Last error: {last}"
    );
}

/// HTTP/1.0 GET that returns None instead of panicking (server not up yet).
pub fn try_http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = vec![];
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// `# TYPE` lines of a scrape: family name -> type.
pub fn families(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| {
            let mut t = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((t.next()?.to_string(), t.next()?.to_string()))
        })
        .collect()
}

/// `# HELP` lines of a scrape: family name -> text.
pub fn helps(scrape: &str) -> BTreeMap<String, String> {
    scrape
        .lines()
        .filter_map(|l| {
            let (n, h) = l.strip_prefix("# HELP ")?.split_once(' ')?;
            Some((n.to_string(), h.to_string()))
        })
        .collect()
}

/// Every sample name a query may use: families plus the `_bucket`, `_sum`,
/// `_count` series of histograms and summaries.
pub fn exported_names(scrape: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (n, t) in families(scrape) {
        if t == "histogram" || t == "summary" {
            for s in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{n}{s}"));
            }
        }
        names.insert(n);
    }
    names
}

/// `tollgate_*` identifiers used in a PromQL expression.
pub fn tollgate_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(p) = expr[i..].find("tollgate_") {
        let start = i + p;
        let boundary = start == 0 || {
            let c = b[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        };
        let mut end = start;
        while end < b.len() && (b[end].is_ascii_alphanumeric() || b[end] == b'_' || b[end] == b':')
        {
            end += 1;
        }
        if boundary {
            out.insert(expr[start..end].to_string());
        }
        i = end.max(start + 1);
    }
    out
}

/// Drives the traffic that makes every family of SPEC §7 appear on the
/// edge's /metrics: an INVITE without credentials and one with an expired
/// token (auth failures), an unparseable datagram, and an answered bearer
/// call through the built-in echo destination with RTP both ways (media
/// relay, ports, trunk and per-key families, setup histogram, calls by
/// result). The edge must route to the echo (no `[[routes]]`).
pub fn drive_metric_traffic(edge: &Edge) {
    let key = edge.first_key();
    let mut ua = UdpUa::new(edge.sip_udp);
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "sipp"));
    assert_eq!(fin.code(), Some(401), "no credential:\n{}", fin.text());
    let n = now_unix();
    let expired = jwt_for(&key, &claims(n - 900, n - 600, SERVICE, "sipp"));
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&expired));
    assert_eq!(fin.code(), Some(401), "expired token:\n{}", fin.text());
    ua.send_raw(b"this is not SIP\r\n\r\n");

    let back = media_call(edge, &mut ua, 40);
    assert!(back > 0, "the echo returned no RTP through the relay");
}

/// Waits until the edge is idle and the families [`drive_metric_traffic`]
/// registers are all on /metrics.
pub fn settle_metrics(edge: &Edge) {
    // A call ends (and its counters appear) when leg B answers the BYE.
    let settled = poll(Duration::from_secs(20), || {
        let s = scrape(edge.metrics_addr());
        let f = families(&s);
        let ready = [
            "tollgate_calls_total",
            "tollgate_key_calls_ended_total",
            "tollgate_key_calls_answered_total",
            "tollgate_sip_parse_errors_total",
            "tollgate_media_packets_total",
        ]
        .iter()
        .all(|n| f.contains_key(*n))
            && metric_sum(&s, "tollgate_calls_active", &[]) == Some(0.0);
        ready.then_some(())
    });
    assert!(
        settled.is_some(),
        "the media call's metrics did not settle within 20 s:\n{}",
        scrape(edge.metrics_addr())
    );
}

/// One answered call through the echo with `packets` RTP packets sent to the
/// edge; returns how many came back. ACKs and BYEs the call.
pub fn media_call(edge: &Edge, ua: &mut UdpUa, packets: u16) -> usize {
    let token = jwt_for(
        &edge.first_key(),
        &claims(now_unix() - 5, now_unix() + 300, SERVICE, "sipp"),
    );
    let rtp = UdpSocket::bind("127.0.0.1:0").expect("bind RTP socket");
    let port = rtp.local_addr().expect("RTP socket address").port();
    let mut inv = Req::invite(edge.sip_udp, SERVICE, "sipp").bearer(&token);
    inv.body = format!(
        "v=0\r\no=tgtest 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    .into_bytes();
    let ok = ua.call(&inv);
    assert_eq!(ok.code(), Some(200), "bearer call via echo:\n{}", ok.text());
    ua.send(&inv.in_dialog(&ok, "ACK", 1));
    let media = sdp_media_addr(&ok.body)
        .unwrap_or_else(|| panic!("no c=/m= in the edge's answer:\n{}", ok.text()));
    rtp.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("RTP read timeout");
    let mut back = 0;
    let mut buf = [0u8; 2048];
    for seq in 0..packets {
        let mut pkt = vec![0x80, 0x00];
        pkt.extend_from_slice(&seq.to_be_bytes());
        pkt.extend_from_slice(&(u32::from(seq) * 160).to_be_bytes());
        pkt.extend_from_slice(&0x1234_5678u32.to_be_bytes());
        pkt.extend_from_slice(&[0xffu8; 160]);
        rtp.send_to(&pkt, media).expect("send RTP");
        if rtp.recv_from(&mut buf).is_ok() {
            back += 1;
        }
    }
    // late echoes
    let end = Instant::now() + Duration::from_millis(500);
    while Instant::now() < end && back < usize::from(packets) {
        if rtp.recv_from(&mut buf).is_ok() {
            back += 1;
        }
    }
    let bye = inv.in_dialog(&ok, "BYE", 2);
    let code = ua
        .transact(&bye, Duration::from_secs(10))
        .and_then(|o| o.fin.code());
    assert_eq!(code, Some(200), "BYE of the media call");
    back
}

/// The `c=` address and audio `m=` port of an SDP body.
pub fn sdp_media_addr(body: &[u8]) -> Option<SocketAddr> {
    let text = std::str::from_utf8(body).ok()?;
    let mut ip = None;
    let mut port = None;
    for l in text.lines() {
        let l = l.trim();
        if let Some(c) = l.strip_prefix("c=IN IP4 ") {
            ip = c
                .split_whitespace()
                .next()?
                .parse::<std::net::IpAddr>()
                .ok();
        } else if let Some(m) = l.strip_prefix("m=audio ") {
            port = m.split_whitespace().next()?.parse::<u16>().ok();
        }
    }
    Some(SocketAddr::new(ip?, port?))
}
