//! `tollgate_sip::message::parse` on arbitrary bytes (one UDP datagram).
//!
//! Oracles: no panic; every accessor of a parsed message is total; a parsed
//! message serialises (`to_bytes`) to something that parses back to the same
//! normalised message (Content-Length aside: `to_bytes` writes exactly one,
//! equal to the body length) (so a value that survived parsing can never smuggle a
//! CR/LF or a second message into what the edge sends on); a stateless
//! response can be built for any parsed request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate_sip::message::{self, parse, Message, SipUri};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = parse(data) else { return };
    let _ = (m.method(), m.status(), m.call_id(), m.cseq(), m.top_via());
    let _ = (m.from_tag(), m.to_tag());
    if let Some(uri) = m.request_uri() {
        let _ = SipUri::parse(uri);
    }
    for name in ["From", "To", "Contact", "P-Asserted-Identity"] {
        if let Some(v) = m.header(name) {
            let _ = message::name_addr_uri(v);
            let _ = message::header_user(v);
            let _ = message::header_param(v, "tag");
        }
    }
    for v in m.headers_named("Via") {
        for part in message::split_commas(v) {
            let _ = message::Via::parse(part);
        }
    }
    // to_bytes writes its own Content-Length, so compare modulo that header
    let bytes = m.to_bytes();
    let again = parse(&bytes).unwrap_or_else(|e| {
        panic!(
            "re-parse of serialised message failed: {e:?}\n{}",
            String::from_utf8_lossy(&bytes)
        )
    });
    let cls: Vec<&str> = again.headers_named("Content-Length").collect();
    assert_eq!(
        cls,
        vec![again.body.len().to_string().as_str()],
        "serialised message must carry exactly one, correct Content-Length"
    );
    let strip = |x: &Message| {
        let mut x = x.clone();
        x.remove_headers("Content-Length");
        x
    };
    assert_eq!(
        strip(&again),
        strip(&m),
        "parse(to_bytes(m)) != m (Content-Length aside)"
    );
    if m.method().is_some() {
        let r = message::response_to(&m, 400, "Bad Request", Some("fuzz"));
        let rb = r.to_bytes();
        assert!(
            parse(&rb).is_ok(),
            "stateless 400 does not parse:\n{}",
            String::from_utf8_lossy(&rb)
        );
    }
});
