//! Heap allocations per call through the sans-IO B2BUA (issue 13, item 2):
//! a counting global allocator, N whole calls (INVITE with a bearer token,
//! 100, 180, 200, ACK, BYE, 200) through the real parser and core, counted
//! only while the core runs (the test's own message building is not). The
//! ceiling pins today's figure with a little room, so a change that adds
//! allocations to the call path fails here and must say why.
//!
//! Metrics are not recorded here (no recorder installed: the `metrics`
//! macros are no-ops), so the figure leaves out the recorder's own cost.
//!
//! cargo test -p tollgate-sip --test alloc_per_call -- --nocapture

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate_keys::{jwt, Claims, KeyKind, Limits, MemoryKeyStore, MemoryReplayCache};
use tollgate_sip::b2bua::Config;
use tollgate_sip::message::{parse, reason_phrase, response_to, Header, Message};
use tollgate_sip::{B2bua, MediaProfile, Peer, Route, SipUri, TimerConfig, Transport};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; the counter
// is a relaxed atomic and allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations per call: 633 when this test was written, 621 once the
/// per-call metrics were handles (`core_metrics`), 604 once timer entries
/// shared their transaction's key; pinned with 10 % room: the test fails
/// above `CEILING`, and says so below `CEILING / 2` so the pin can be
/// lowered.
const CEILING: u64 = 665;
const NOW: i64 = 1_800_000_000;

fn udp(port: u16) -> Peer {
    Peer {
        transport: Transport::Udp,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        flow: None,
    }
}

struct World {
    core: B2bua,
    a: Peer,
    b: Peer,
    t: Instant,
}

impl World {
    /// Feeds `data` from `peer` to the core, counting what it allocates,
    /// and returns what the core sent, parsed (not counted).
    fn feed(&mut self, data: &[u8], peer: &Peer) -> Vec<(Peer, Message)> {
        COUNTING.store(true, Ordering::Relaxed);
        self.core.handle_datagram(self.t, NOW, data, peer.clone());
        let out: Vec<_> = self.core.txn.out.drain(..).collect();
        self.core.events.clear();
        COUNTING.store(false, Ordering::Relaxed);
        out.into_iter()
            .map(|t| {
                let m = parse(&t.data).expect("the core sends what it parses");
                (t.peer, m)
            })
            .collect()
    }
}

fn to(peer: &Peer, sent: &[(Peer, Message)]) -> Vec<Message> {
    sent.iter()
        .filter(|(p, _)| p.addr == peer.addr)
        .map(|(_, m)| m.clone())
        .collect()
}

fn text(m: &Message) -> Vec<u8> {
    m.to_bytes().to_vec()
}

fn one_call(w: &mut World, i: usize, token: &str) {
    let sdp = "v=0\r\no=a 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n";
    let invite = format!(
        "INVITE sip:+14155550100@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKi{i};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:+14155550199@127.0.0.1>;tag=a{i}\r\n\
To: <sip:+14155550100@127.0.0.1>\r\n\
Call-ID: call-{i}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:a@127.0.0.1:5070>\r\n\
Authorization: Bearer {token}\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    );
    let (a, b) = (w.a.clone(), w.b.clone());
    let sent = w.feed(invite.as_bytes(), &a);
    let b_invite = to(&b, &sent).pop().expect("leg B's INVITE");
    let ringing = response_to(&b_invite, 180, reason_phrase(180), Some("b1"));
    w.feed(&text(&ringing), &b);
    let mut ok = response_to(&b_invite, 200, "OK", Some("b1"));
    ok.headers.push(Header {
        name: "Contact".into(),
        value: "<sip:agent@127.0.0.1:5080>".into(),
    });
    ok.headers.push(Header {
        name: "Content-Type".into(),
        value: "application/sdp".into(),
    });
    ok.body = bytes::Bytes::from(sdp.replace("4000", "6000"));
    let sent = w.feed(&text(&ok), &b);
    let a_ok = to(&a, &sent)
        .into_iter()
        .find(|m| m.status() == Some(200))
        .expect("200 to leg A");
    let a_tag = a_ok.to_tag().expect("a To tag").to_string();
    let in_dialog = |method: &str, cseq: u32| {
        format!(
            "{method} sip:tollgate@127.0.0.1:5060 SIP/2.0\r\n\
Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK{method}{i};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:+14155550199@127.0.0.1>;tag=a{i}\r\n\
To: <sip:+14155550100@127.0.0.1>;tag={a_tag}\r\n\
Call-ID: call-{i}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let sent = w.feed(in_dialog("ACK", 1).as_bytes(), &a);
    assert_eq!(to(&b, &sent).len(), 1, "the ACK reaches leg B");
    let mut sent = w.feed(in_dialog("BYE", 2).as_bytes(), &a);
    let b_bye = to(&b, &sent).pop().expect("leg B's BYE");
    let bye_ok = response_to(&b_bye, 200, "OK", None);
    sent.extend(w.feed(&text(&bye_ok), &b));
    assert!(
        to(&a, &sent).iter().any(|m| m.status() == Some(200)),
        "leg A's BYE is answered"
    );
    assert_eq!(w.core.calls_active(), 0, "the call is over");
}

#[test]
fn allocations_per_call_stay_pinned() {
    let store = Arc::new(MemoryKeyStore::new());
    let (_, key) = store
        .create(
            "alloc",
            KeyKind::Secret,
            None,
            Limits::default(),
            None,
            NOW as u64,
        )
        .unwrap();
    let b = udp(5080);
    let cfg = Config {
        realm: "tollgate".into(),
        digest_algorithms: vec![tollgate_keys::Algorithm::Sha256],
        nonce_lifetime_secs: 300,
        bearer_challenge: false,
        digest_by_source: Vec::new(),
        timers: TimerConfig::default(),
        invite_timeout: Duration::from_secs(60),
        local: HashMap::from([(Transport::Udp, SocketAddr::from(([127, 0, 0, 1], 5060)))]),
        advertise: None,
        max_message_bytes: tollgate_sip::message::DEFAULT_MAX_MESSAGE_BYTES,
        routes: vec![Route {
            model: None,
            prefix: None,
            auth: None,
            targets: Vec::new(),
            ping_interval: None,
            target: SipUri::parse("sip:agent@127.0.0.1:5080").unwrap(),
            target_text: "sip:agent@127.0.0.1:5080".into(),
            peer: b.clone(),
            media: MediaProfile::Rtp,
            sdes_over_cleartext: false,
        }],
        numbers: Default::default(),
        checks_numbers: true,
    };
    let mut w = World {
        core: B2bua::new(cfg, store, Arc::new(MemoryReplayCache::new()), [9; 32]),
        a: udp(5070),
        b,
        t: Instant::now(),
    };
    const WARM: usize = 50;
    const N: usize = 500;
    let tokens: Vec<String> = (0..WARM + N)
        .map(|i| {
            jwt::mint(
                &key,
                &Claims {
                    iat: NOW,
                    exp: NOW + 600,
                    jti: format!("alloc-{i}"),
                    to: "+14155550100".into(),
                    from: "+14155550199".into(),
                    model: None,
                    webhook: None,
                    record: None,
                    max_duration: None,
                },
            )
        })
        .collect();
    for (i, tok) in tokens.iter().enumerate().take(WARM) {
        one_call(&mut w, i, tok);
    }
    ALLOCS.store(0, Ordering::Relaxed);
    for (i, tok) in tokens.iter().enumerate().skip(WARM) {
        one_call(&mut w, i, tok);
    }
    let per_call = ALLOCS.load(Ordering::Relaxed) / N as u64;
    println!("allocations per call: {per_call}");
    assert!(
        per_call <= CEILING,
        "{per_call} allocations per call, more than the pinned {CEILING}"
    );
    assert!(
        per_call > CEILING / 2,
        "{per_call} allocations per call: well under the pin {CEILING}, lower it"
    );
}
