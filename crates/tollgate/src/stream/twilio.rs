//! The Twilio Media Streams message set (SPEC §10), sans-IO: the JSON text
//! frames the edge sends (`connected`, `start`, `media`, `dtmf`, `mark`,
//! `stop`) and the ones it takes from the backend (`media`, `mark`,
//! `clear`). Audio is base64 `audio/x-mulaw`, 8000 Hz, mono.
//!
//! What the backend sends is untrusted: a message is parsed into
//! [`FromBackend`] or refused with a [`ProtocolError`] naming what was wrong;
//! events this edge does not act on are [`FromBackend::Ignored`] (the
//! protocol lets servers send others, e.g. Telnyx variants).

use base64::Engine;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// Most base64 characters of one backend `media` payload (about 15 s of
/// audio): bigger is refused as a protocol error.
pub const MAX_PAYLOAD_B64: usize = 160_000;
/// Longest mark name taken.
pub const MAX_MARK_NAME: usize = 256;

/// What a message from the backend asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromBackend {
    /// µ-law audio to play into the call.
    Media(Vec<u8>),
    /// Echo this name once the audio before it has played.
    Mark(String),
    /// Drop the audio queued (barge-in).
    Clear,
    /// A well-formed event this edge has no use for.
    Ignored,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("not JSON")]
    NotJson,
    #[error("no \"event\" string")]
    NoEvent,
    #[error("media without a base64 payload")]
    BadPayload,
    #[error("media payload over {MAX_PAYLOAD_B64} characters")]
    PayloadTooLarge,
    #[error("mark without a name (or one over {MAX_MARK_NAME} bytes)")]
    BadMark,
}

/// Parses one text frame from the backend.
pub fn parse(text: &str) -> Result<FromBackend, ProtocolError> {
    let v: Value = serde_json::from_str(text).map_err(|_| ProtocolError::NotJson)?;
    let event = v
        .get("event")
        .and_then(Value::as_str)
        .ok_or(ProtocolError::NoEvent)?;
    match event {
        "media" => {
            let p = v
                .pointer("/media/payload")
                .and_then(Value::as_str)
                .ok_or(ProtocolError::BadPayload)?;
            if p.len() > MAX_PAYLOAD_B64 {
                return Err(ProtocolError::PayloadTooLarge);
            }
            base64::engine::general_purpose::STANDARD
                .decode(p)
                .map(FromBackend::Media)
                .map_err(|_| ProtocolError::BadPayload)
        }
        "mark" => match v.pointer("/mark/name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n.len() <= MAX_MARK_NAME => {
                Ok(FromBackend::Mark(n.to_owned()))
            }
            _ => Err(ProtocolError::BadMark),
        },
        "clear" => Ok(FromBackend::Clear),
        _ => Ok(FromBackend::Ignored),
    }
}

/// What `start` tells the backend about the call.
#[derive(Debug, Clone, Default)]
pub struct StartInfo {
    pub stream_sid: String,
    /// The call's id (leg B's Call-ID: the CDR's and the webhooks' `call_id`).
    pub call_sid: String,
    /// The key the call was admitted under.
    pub account_sid: String,
    /// The call's runtime parameters (SPEC §3a: model, record, ...).
    pub custom: BTreeMap<String, String>,
}

/// The messages of one stream, numbered as the protocol wants
/// (`sequenceNumber` from 1, media `chunk` from 1, `timestamp` in ms since
/// the stream started).
#[derive(Debug)]
pub struct Encoder {
    stream_sid: String,
    call_sid: String,
    account_sid: String,
    seq: u64,
    chunk: u64,
}

impl Encoder {
    pub fn new(info: &StartInfo) -> Encoder {
        Encoder {
            stream_sid: info.stream_sid.clone(),
            call_sid: info.call_sid.clone(),
            account_sid: info.account_sid.clone(),
            seq: 0,
            chunk: 0,
        }
    }

    fn next(&mut self) -> String {
        self.seq += 1;
        self.seq.to_string()
    }

    /// The first message (it carries no sequence number).
    pub fn connected(&self) -> String {
        json!({"event": "connected", "protocol": "Call", "version": "1.0.0"}).to_string()
    }

    pub fn start(&mut self, info: &StartInfo) -> String {
        json!({
            "event": "start",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "start": {
                "streamSid": self.stream_sid,
                "accountSid": self.account_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": info.custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        })
        .to_string()
    }

    /// One frame of the caller's audio (µ-law), `ms` after the stream start.
    pub fn media(&mut self, ulaw: &[u8], ms: u64) -> String {
        self.chunk += 1;
        let payload = base64::engine::general_purpose::STANDARD.encode(ulaw);
        json!({
            "event": "media",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": self.chunk.to_string(),
                "timestamp": ms.to_string(),
                "payload": payload,
            },
        })
        .to_string()
    }

    pub fn dtmf(&mut self, digit: char) -> String {
        json!({
            "event": "dtmf",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "dtmf": {"track": "inbound_track", "digit": digit.to_string()},
        })
        .to_string()
    }

    pub fn mark(&mut self, name: &str) -> String {
        json!({
            "event": "mark",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "mark": {"name": name},
        })
        .to_string()
    }

    pub fn stop(&mut self) -> String {
        json!({
            "event": "stop",
            "sequenceNumber": self.next(),
            "streamSid": self.stream_sid,
            "stop": {"accountSid": self.account_sid, "callSid": self.call_sid},
        })
        .to_string()
    }
}

/// The digit of an RFC 4733 telephone-event code (0-15), `None` for the
/// other events (tones, flash, ...).
pub fn dtmf_digit(event: u8) -> Option<char> {
    match event {
        0..=9 => Some(char::from(b'0' + event)),
        10 => Some('*'),
        11 => Some('#'),
        12..=15 => Some(char::from(b'A' + event - 12)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StartInfo {
        StartInfo {
            stream_sid: "MZ1".into(),
            call_sid: "c1".into(),
            account_sid: "k1".into(),
            custom: [("model".to_string(), "gpt-x".to_string())].into(),
        }
    }

    #[test]
    fn the_edge_messages_carry_the_fields_the_protocol_names() {
        let i = info();
        let mut e = Encoder::new(&i);
        let v: Value = serde_json::from_str(&e.connected()).unwrap();
        assert_eq!(v["event"], "connected");
        let v: Value = serde_json::from_str(&e.start(&i)).unwrap();
        assert_eq!(v["sequenceNumber"], "1");
        assert_eq!(v["start"]["callSid"], "c1");
        assert_eq!(v["start"]["customParameters"]["model"], "gpt-x");
        assert_eq!(v["start"]["mediaFormat"]["encoding"], "audio/x-mulaw");
        let v: Value = serde_json::from_str(&e.media(&[0xFF, 0x00], 20)).unwrap();
        assert_eq!(v["sequenceNumber"], "2");
        assert_eq!(v["media"]["chunk"], "1");
        assert_eq!(v["media"]["timestamp"], "20");
        assert_eq!(v["media"]["payload"], "/wA=");
        let v: Value = serde_json::from_str(&e.dtmf('#')).unwrap();
        assert_eq!(v["dtmf"]["digit"], "#");
        let v: Value = serde_json::from_str(&e.mark("m")).unwrap();
        assert_eq!(v["mark"]["name"], "m");
        let v: Value = serde_json::from_str(&e.stop()).unwrap();
        assert_eq!(
            (v["event"].as_str(), v["sequenceNumber"].as_str()),
            (Some("stop"), Some("5"))
        );
    }

    #[test]
    fn backend_messages_parse_or_name_what_is_wrong() {
        assert_eq!(
            parse(r#"{"event":"media","streamSid":"MZ1","media":{"payload":"/wA="}}"#),
            Ok(FromBackend::Media(vec![0xFF, 0x00]))
        );
        assert_eq!(
            parse(r#"{"event":"mark","mark":{"name":"x"}}"#),
            Ok(FromBackend::Mark("x".into()))
        );
        assert_eq!(parse(r#"{"event":"clear"}"#), Ok(FromBackend::Clear));
        assert_eq!(parse(r#"{"event":"other"}"#), Ok(FromBackend::Ignored));
        assert_eq!(parse("garbage"), Err(ProtocolError::NotJson));
        assert_eq!(parse("{}"), Err(ProtocolError::NoEvent));
        assert_eq!(
            parse(r#"{"event":"media","media":{"payload":"!!"}}"#),
            Err(ProtocolError::BadPayload)
        );
        assert_eq!(
            parse(r#"{"event":"mark","mark":{}}"#),
            Err(ProtocolError::BadMark)
        );
        let big = format!(
            r#"{{"event":"media","media":{{"payload":"{}"}}}}"#,
            "A".repeat(MAX_PAYLOAD_B64 + 4)
        );
        assert_eq!(parse(&big), Err(ProtocolError::PayloadTooLarge));
    }

    #[test]
    fn dtmf_codes_map_to_digits() {
        assert_eq!(dtmf_digit(0), Some('0'));
        assert_eq!(dtmf_digit(9), Some('9'));
        assert_eq!(dtmf_digit(10), Some('*'));
        assert_eq!(dtmf_digit(11), Some('#'));
        assert_eq!(dtmf_digit(15), Some('D'));
        assert_eq!(dtmf_digit(16), None);
    }
}
