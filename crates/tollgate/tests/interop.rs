//! Interop matrix (issue 11): the real binary against the SIP stacks PBXs,
//! phones and carriers run, each case a call with media checked (a tone in,
//! the edge's built-in echo back, the received tone's frequency measured).
//! A case whose user agent is not installed fails, naming the Debian
//! package (scripts/test.sh installs them), never skips.
//!
//! cargo test -p tollgate --test interop
mod common;
mod interop_support;
use common::*;
use interop_support::*;
use std::time::Duration;

const TONE_HZ: f64 = 1000.0;
const SETUP: Duration = Duration::from_secs(30);

/// libre (baresip) refuses a 401 carrying any challenge that is not
/// `Digest ... algorithm=MD5` (whatever the order: it walks every
/// WWW-Authenticate and gives up with ENOSYS on SHA-256, EBADMSG on Bearer),
/// so the edge offers MD5 alone to the libre peer's source
/// (`[[sip.digest_by_source]]`) and the default offer to everyone else.
const LIBRE_SOURCE: &str =
    "[[sip.digest_by_source]]\ncidrs = [\"127.0.0.1/32\"]\nalgorithms = [\"MD5\"]\n";

fn edge_for_libre() -> Edge {
    Edge::start(EdgeConfig {
        digest_algorithms: None,
        extra_toml: LIBRE_SOURCE.into(),
        ..EdgeConfig::default()
    })
}

/// The algorithms of the digest challenges a credential-less INVITE from
/// `ip` gets.
fn offered_to(edge: &Edge, ip: &str) -> Vec<String> {
    let mut ua = UdpUa::from_ip(edge.sip_udp, ip);
    let fin = ua.call(&Req::invite(edge.sip_udp, SERVICE, "probe"));
    www_auth(&fin)
        .into_iter()
        .map(|(_, p)| p.get("algorithm").cloned().unwrap_or_default())
        .collect()
}

#[test]
fn baresip_digest_call_tone_echoed_and_bye() {
    let edge = edge_for_libre();
    assert_eq!(offered_to(&edge, "127.0.0.1"), ["MD5"], "libre's source");
    assert_eq!(
        offered_to(&edge, "127.0.0.2"),
        ["SHA-256", "MD5"],
        "everyone else keeps the default offer"
    );
    let key = edge.first_key();
    let dir = TestDir::new("interop-baresip");
    let mut ua = baresip_on(&edge, &key, &dir, TONE_HZ, 30.0);
    ua.dial(&format!("sip:{SERVICE}@{}", edge.sip_udp));
    // Media: 4 s of decoded audio came back through the edge's relay.
    ua.wait_received_audio(0, 4);
    ua.command("hangup", "");
    ua.wait_event("CALL_CLOSED", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "baresip's BYE");
    ua.quit();
    let hz = assert_tone(
        &ua.received_wavs()[0],
        TONE_HZ,
        2.0,
        "baresip -> edge -> echo",
    );
    eprintln!("baresip: received {hz} Hz (sent {TONE_HZ} Hz)");
}

/// baresip: RFC 4733 DTMF through the relay (the echo returns the events,
/// baresip reports them), hold (re-INVITE a=sendonly, answered recvonly)
/// and resume (a=sendrecv) with media flowing again, then a BYE from the
/// edge (admin API hang-up).
#[test]
fn baresip_dtmf_hold_resume_and_bye_from_the_edge() {
    let edge = edge_for_libre();
    let key = edge.first_key();
    let dir = TestDir::new("interop-baresip-dtmf");
    let mut ua = baresip_on(&edge, &key, &dir, TONE_HZ, 60.0);
    ua.dial(&format!("sip:{SERVICE}@{}", edge.sip_udp));
    ua.wait_received_audio(0, 3);
    ua.command("sndcode", "7");
    let ev = ua.wait_event("CALL_DTMF_START", SETUP);
    assert!(
        ev.contains("\"param\":\"7\""),
        "the DTMF digit came back through the edge as 7: {ev}"
    );
    ua.command("hold", "");
    let held = poll(SETUP, || {
        let log = std::fs::read_to_string(&ua.proc.log).ok()?;
        log.contains("a=sendonly").then_some(())?;
        log.contains("a=recvonly").then_some(())
    });
    assert!(
        held.is_some(),
        "hold: re-INVITE a=sendonly answered a=recvonly through the edge:\n{}",
        ua.proc.tail(80)
    );
    // After the resume, the echo's RTP flows to baresip again (counted by
    // the edge's relay: baresip 1.0's sndfile dump stops at the first
    // re-INVITE, so the tone is measured on what came before the hold).
    let to_a = || {
        metric_sum(
            &scrape(edge.metrics_addr()),
            "tollgate_media_packets_total",
            &[("direction", "b_to_a"), ("proto", "rtp")],
        )
        .unwrap_or(0.0)
    };
    let before = to_a();
    ua.command("resume", "");
    let resumed = poll(SETUP, || (to_a() >= before + 100.0).then_some(()));
    assert!(
        resumed.is_some(),
        "after resume, 2 s more RTP came back through the edge (from {before} packets):\n{}",
        ua.proc.tail(60)
    );
    admin_hang_up_only_call(&edge, &key);
    ua.wait_event("CALL_CLOSED", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert!(
        cdrs[0].contains("\"sip_code\":200"),
        "one answered call, ended by the edge: {cdrs:?}"
    );
    ua.quit();
    assert_tone(
        &ua.received_wavs()[0],
        TONE_HZ,
        2.0,
        "baresip after hold/resume",
    );
}

#[test]
fn kamailio_in_front_uac_digest_record_route_bye_both_ways() {
    let edge = Edge::start(EdgeConfig::default());
    let key = edge.first_key();
    let dir = TestDir::new("interop-kamailio");
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, TONE_HZ, 60.0);
    // The carrier's UA (baresip) talks to Kamailio without credentials;
    // Kamailio answers the edge's 401 (default offer: SHA-256 then MD5) with
    // the key's digest credentials. Each needs the other's address: pick
    // Kamailio's port first.
    let kam_port = alloc_ports().sip;
    let kam_addr: std::net::SocketAddr = ([127, 0, 0, 1], kam_port).into();
    let mut ua = Baresip::start(
        &dir.path,
        &BaresipAccount {
            user: "carrier",
            password: "",
            server: kam_addr,
            uri_params: "",
            extra: "",
            config: "",
        },
        &tone,
    );
    let kam_dir = dir.join("kamailio");
    std::fs::create_dir_all(&kam_dir).unwrap();
    let kam = Kamailio::start(
        &kam_dir,
        kam_port,
        edge.sip_udp,
        ua.sip,
        &key_id(&key),
        &digest_password(&key),
    );
    let log = |k: &Kamailio| k.proc.tail(60);

    // Call 1: BYE from the caller, through the proxy.
    ua.dial(&format!("sip:{SERVICE}@{kam_addr}"));
    ua.wait_received_audio(0, 4);
    ua.command("hangup", "");
    ua.wait_event("CALL_CLOSED", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "call 1, the caller's BYE through kamailio");
    assert!(
        kam.routed("ACK") >= 1,
        "the ACK of the 2xx crossed the proxy (Record-Route):\n{}",
        log(&kam)
    );
    assert_eq!(
        kam.routed("BYE"),
        1,
        "the caller's BYE crossed the proxy:\n{}",
        log(&kam)
    );

    // Call 2: the edge hangs up (admin API); its BYE crosses the proxy.
    ua.dial(&format!("sip:{SERVICE}@{kam_addr}"));
    ua.wait_received_audio(1, 2);
    admin_hang_up_only_call(&edge, &key);
    ua.wait_event("CALL_CLOSED", SETUP);
    wait_calls_done(&edge, 2);
    assert_eq!(
        kam.routed("BYE"),
        2,
        "the edge's BYE crossed the proxy:\n{}",
        log(&kam)
    );
    ua.quit();
    let wavs = ua.received_wavs();
    assert_eq!(wavs.len(), 2, "one received-audio dump per call: {wavs:?}");
    for (i, w) in wavs.iter().enumerate() {
        let hz = assert_tone(w, TONE_HZ, 1.5, &format!("kamailio call {}", i + 1));
        eprintln!("kamailio call {}: received {hz} Hz", i + 1);
    }
}

/// The other direction: calls from the edge out to a carrier whose
/// Kamailio proxy (Record-Route) fronts the called party. baresip A dials
/// the edge with the key's digest credentials; the edge's route is the
/// proxy; the proxy hands the call to baresip B (auto-answer), each side
/// playing its own tone. ACK and both BYEs (B's, then A's) cross the proxy.
#[test]
fn kamailio_behind_the_edge_record_route_tones_both_ways_bye_both_ways() {
    const B_HZ: f64 = 700.0;
    let kam_port = alloc_ports().sip;
    let kam_addr: std::net::SocketAddr = ([127, 0, 0, 1], kam_port).into();
    let dir_b = TestDir::new("interop-kamailio-out-b");
    let tone_b = dir_b.join("tone.wav");
    write_tone_wav(&tone_b, B_HZ, 60.0);
    let mut callee = Baresip::start(
        &dir_b.path,
        &BaresipAccount {
            user: "agent",
            password: "",
            server: kam_addr,
            uri_params: "",
            extra: ";answermode=auto",
            config: "",
        },
        &tone_b,
    );
    let edge = Edge::start(EdgeConfig {
        digest_algorithms: None,
        route_target: Some(format!("sip:agent@{kam_addr}")),
        extra_toml: LIBRE_SOURCE.into(),
        ..EdgeConfig::default()
    });
    let key = edge.first_key();
    let kam_dir = dir_b.join("kamailio");
    std::fs::create_dir_all(&kam_dir).unwrap();
    // Requests from the edge go to the callee, the others to the edge.
    let kam = Kamailio::start(
        &kam_dir,
        kam_port,
        edge.sip_udp,
        callee.sip,
        "unused",
        "unused",
    );
    let log = |k: &Kamailio| k.proc.tail(60);
    let dir_a = TestDir::new("interop-kamailio-out-a");
    let mut caller = baresip_on(&edge, &key, &dir_a, TONE_HZ, 60.0);

    // Call 1: the called party hangs up; its BYE crosses the proxy.
    caller.dial(&format!("sip:{SERVICE}@{}", edge.sip_udp));
    callee.wait_event("CALL_ESTABLISHED", SETUP);
    caller.wait_received_audio(0, 3);
    callee.wait_received_audio(0, 3);
    callee.command("hangup", "");
    caller.wait_event("CALL_CLOSED", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "call 1, the called party's BYE through kamailio");
    assert_eq!(
        kam.routed("INVITE"),
        1,
        "the edge's INVITE went to the proxy:\n{}",
        log(&kam)
    );
    assert!(
        kam.routed("ACK") >= 1,
        "the ACK crossed the proxy:\n{}",
        log(&kam)
    );
    assert_eq!(
        kam.routed("BYE"),
        1,
        "the callee's BYE crossed the proxy:\n{}",
        log(&kam)
    );

    // Call 2: the caller hangs up; the edge's BYE toward the carrier
    // crosses the proxy (Route from its Record-Route).
    callee.seen_clear();
    caller.dial(&format!("sip:{SERVICE}@{}", edge.sip_udp));
    callee.wait_event("CALL_ESTABLISHED", SETUP);
    caller.wait_received_audio(1, 2);
    caller.command("hangup", "");
    callee.wait_event("CALL_CLOSED", SETUP);
    wait_calls_done(&edge, 2);
    assert_eq!(
        kam.routed("BYE"),
        2,
        "the edge's BYE crossed the proxy:\n{}",
        log(&kam)
    );

    caller.quit();
    callee.quit();
    for (i, w) in caller.received_wavs().iter().enumerate() {
        assert_tone(
            w,
            B_HZ,
            1.5,
            &format!("call {}: callee -> proxy -> edge -> caller", i + 1),
        );
    }
    for (i, w) in callee.received_wavs().iter().enumerate() {
        assert_tone(
            w,
            TONE_HZ,
            1.5,
            &format!("call {}: caller -> edge -> proxy -> callee", i + 1),
        );
    }
    assert_eq!(
        callee.received_wavs().len(),
        2,
        "the callee took both calls"
    );
}

/// linphonec advertises its interface address (not the address it talks
/// to) in SDP, and needs a non-loopback interface to start its transports:
/// the test runs in its own network namespace, where the edge listens on
/// the veth address.
#[test]
fn linphonec_digest_sha256_call_tone_echoed_and_bye() {
    if reexec_in_netns("linphonec_digest_sha256_call_tone_echoed_and_bye") {
        return;
    }
    require("linphonec", "linphone-cli");
    let edge = Edge::start(EdgeConfig {
        tcp: false,
        // The product default offer: SHA-256 first, then MD5.
        digest_algorithms: None,
        extra_args: vec![
            "--sip-listen".into(),
            format!("udp:{NETNS_IP}:0"),
            "--media-ip".into(),
            NETNS_IP.into(),
        ],
        ..EdgeConfig::default()
    });
    let sip = edge
        .listening("sip udp")
        .expect("the edge printed its SIP address");
    assert_eq!(sip.ip().to_string(), NETNS_IP, "edge on the veth address");
    let key = edge.first_key();
    let dir = TestDir::new("interop-linphonec");
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, TONE_HZ, 30.0);
    let ports = alloc_ports();
    let mut ua = Linphonec::start(
        &dir.path,
        &key_id(&key),
        &digest_password(&key),
        sip,
        ports.sip,
        ports.media,
        &tone,
    );
    ua.cmd(&format!("call sip:{SERVICE}@{sip}"));
    ua.wait_line("connected", SETUP);
    // Media: the recording grows with audio that came back (liblinphone
    // records at the codec's rate, Opus 48 kHz here, and writes the WAV
    // header when it closes the file).
    let grown = poll(Duration::from_secs(30), || {
        (loud_secs_so_far(&ua.recording, 48_000) >= 3.0).then_some(())
    });
    assert!(
        grown.is_some(),
        "linphonec received under 3 s of audio:\n{}",
        ua.output()
    );
    ua.cmd("terminate");
    ua.wait_line("ended", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "linphonec's BYE");
    ua.quit();
    let hz = assert_tone(&ua.recording, TONE_HZ, 2.0, "linphonec -> edge -> echo");
    eprintln!("linphonec: received {hz} Hz (sent {TONE_HZ} Hz)");
}

/// PJSIP (pjsua2 2.15): digest against the default offer, a tone echoed,
/// hold (re-INVITE a=sendonly) and resume (a=sendrecv) through the edge,
/// BYE from the caller.
#[test]
fn pjsua2_digest_call_hold_resume_tone_echoed_and_bye() {
    let edge = Edge::start(EdgeConfig {
        digest_algorithms: None,
        ..EdgeConfig::default()
    });
    let key = edge.first_key();
    let dir = TestDir::new("interop-pjsua2");
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, TONE_HZ, 30.0);
    let out = dir.join("pjsua2-received.wav");
    let events = run_pjsua2_call(
        &dir.path,
        edge.sip_udp,
        &key_id(&key),
        &digest_password(&key),
        &tone,
        &out,
        None,
    );
    for step in [
        "confirmed 200",
        "held",
        "resumed",
        "disconnected 200",
        "done",
    ] {
        assert!(events.contains(step), "pjsua2 missed {step:?}:\n{events}");
    }
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "pjsua2's BYE after hold and resume");
    let hz = assert_tone(&out, TONE_HZ, 2.0, "pjsua2 -> edge -> echo");
    eprintln!("pjsua2: received {hz} Hz (sent {TONE_HZ} Hz)");
}

/// PJSIP over TLS with SRTP mandatory (SDES keys over the TLS hop, as
/// Asterisk's chan_pjsip does with `media_encryption=sdes`): digest, a tone
/// both ways through the edge's SRTP, and the hold/resume re-INVITEs, each
/// re-keying the media.
#[test]
fn pjsua2_tls_srtp_digest_call_hold_resume_tone_echoed_and_bye() {
    let dir = TestDir::new("interop-pjsua2-tls");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key_file, ck.key_pair.serialize_pem()).unwrap();
    let edge = Edge::start(EdgeConfig {
        tcp: false,
        digest_algorithms: None,
        extra_toml: format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key_file.display()
        ),
        extra_args: vec![
            "--sip-listen".into(),
            "udp:127.0.0.1:0".into(),
            "--sip-listen".into(),
            "tls:127.0.0.1:0".into(),
        ],
        ..EdgeConfig::default()
    });
    let tls = edge.listening("sip tls").expect("the edge listens on TLS");
    let key = edge.first_key();
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, TONE_HZ, 30.0);
    let out = dir.join("pjsua2-received.wav");
    let events = run_pjsua2_call(
        &dir.path,
        tls,
        &key_id(&key),
        &digest_password(&key),
        &tone,
        &out,
        Some(&cert),
    );
    for step in [
        "confirmed 200",
        "held",
        "resumed",
        "disconnected 200",
        "done",
    ] {
        assert!(
            events.contains(step),
            "pjsua2 (TLS) missed {step:?}:\n{events}"
        );
    }
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "pjsua2's BYE over TLS after hold and resume");
    let log = std::fs::read_to_string(dir.join("pjsua2.log")).unwrap_or_default();
    assert!(
        log.contains("RTP/SAVP") && log.contains("a=crypto:"),
        "pjsua2's SDP is SRTP with SDES keys"
    );
    let m = scrape(edge.metrics_addr());
    for t in ["decrypt", "encrypt"] {
        let n = metric_sum(&m, "tollgate_media_packets_total", &[("transform", t)]).unwrap_or(0.0);
        assert!(n >= 100.0, "the relay did SRTP {t} ({n} packets)");
    }
    let hz = assert_tone(&out, TONE_HZ, 2.0, "pjsua2 SRTP over TLS -> edge -> echo");
    eprintln!("pjsua2 TLS+SRTP: received {hz} Hz (sent {TONE_HZ} Hz)");
}

/// baresip over TLS with `mediaenc=srtp-mand`: SDES keys ride the TLS
/// signaling, the edge decrypts leg A's SRTP for the (plain RTP) echo and
/// encrypts what comes back; the tone survives both ways.
#[test]
fn baresip_tls_srtp_mandatory_call_tone_echoed_and_bye() {
    let dir = TestDir::new("interop-baresip-tls");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key_file, ck.key_pair.serialize_pem()).unwrap();
    let edge = Edge::start(EdgeConfig {
        tcp: false,
        digest_algorithms: None,
        extra_toml: format!(
            "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n{LIBRE_SOURCE}",
            cert.display(),
            key_file.display()
        ),
        extra_args: vec![
            "--sip-listen".into(),
            "udp:127.0.0.1:0".into(),
            "--sip-listen".into(),
            "tls:127.0.0.1:0".into(),
        ],
        ..EdgeConfig::default()
    });
    let tls = edge.listening("sip tls").expect("the edge listens on TLS");
    let key = edge.first_key();
    let tone = dir.join("tone.wav");
    write_tone_wav(&tone, TONE_HZ, 30.0);
    let mut ua = Baresip::start(
        &dir.path,
        &BaresipAccount {
            user: &key_id(&key),
            password: &digest_password(&key),
            server: tls,
            uri_params: ";transport=tls",
            extra: ";mediaenc=srtp-mand",
            config: &format!("sip_cafile {}", cert.display()),
        },
        &tone,
    );
    // baresip adds the account's ;transport=tls to the dialled URI.
    ua.dial(&format!("sip:{SERVICE}@{tls}"));
    ua.wait_received_audio(0, 4);
    let log = std::fs::read_to_string(&ua.proc.log).unwrap_or_default();
    assert!(
        log.contains("RTP/SAVP") && log.contains("a=crypto:"),
        "the call's SDP is SRTP with SDES keys:\n{}",
        ua.proc.tail(60)
    );
    ua.command("hangup", "");
    ua.wait_event("CALL_CLOSED", SETUP);
    let cdrs = wait_calls_done(&edge, 1);
    assert_normal_end(&cdrs[0], "baresip's BYE over TLS");
    let m = scrape(edge.metrics_addr());
    for t in ["decrypt", "encrypt"] {
        let n = metric_sum(&m, "tollgate_media_packets_total", &[("transform", t)]).unwrap_or(0.0);
        assert!(n >= 100.0, "the relay did SRTP {t} ({n} packets)");
    }
    ua.quit();
    let hz = assert_tone(
        &ua.received_wavs()[0],
        TONE_HZ,
        2.0,
        "baresip SRTP over TLS",
    );
    eprintln!("baresip TLS+SRTP: received {hz} Hz (sent {TONE_HZ} Hz)");
}
