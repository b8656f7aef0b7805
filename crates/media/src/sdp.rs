//! SDP (RFC 4566) as an offer/answer body (RFC 3264), with SDES crypto
//! attributes (RFC 4568): parsed losslessly enough to rewrite `c=`, `o=`, the
//! `m=` port and proto, `a=rtcp`, `a=rtcp-mux` and `a=crypto`, and to keep
//! everything else (codecs, `a=sendrecv`/`sendonly`/`recvonly`/`inactive`,
//! `a=ptime`, ...) as it was.
//!
//! Input is untrusted: every malformed body is an [`SdpError`] (the B2BUA
//! answers 488), never a panic.

use std::net::IpAddr;

use base64::Engine as _;

use crate::srtp::{SrtpKeys, Suite};

/// Largest SDP body we accept.
pub const MAX_SDP_LEN: usize = 16 * 1024;
const MAX_MEDIA: usize = 16;

/// Why an SDP body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    #[error("SDP body is empty, too long or not UTF-8")]
    Encoding,
    #[error("SDP does not start with v=0")]
    Version,
    #[error("SDP line {0} is not <type>=<value>")]
    Line(usize),
    #[error("malformed m= line")]
    MediaLine,
    #[error("too many m= lines")]
    TooManyMedia,
    #[error("malformed or unsupported c= line")]
    Connection,
    #[error("malformed o= line")]
    Origin,
    #[error("malformed a=rtcp attribute")]
    Rtcp,
}

/// One `<type>=<value>` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub kind: char,
    pub value: String,
}

/// One `m=` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// `audio`, `video`, ...
    pub kind: String,
    pub port: u16,
    /// The `/<number of ports>` suffix, if any.
    pub port_count: Option<u16>,
    /// `RTP/AVP`, `RTP/SAVP`, ...
    pub proto: String,
    pub formats: Vec<String>,
    /// The lines after `m=`, in order.
    pub lines: Vec<Line>,
}

/// A session description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDescription {
    /// Session-level lines, `v=` first.
    pub session: Vec<Line>,
    pub media: Vec<Media>,
}

/// Media direction attribute (RFC 3264 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaDirection {
    SendRecv,
    SendOnly,
    RecvOnly,
    Inactive,
}

impl MediaDirection {
    fn parse(a: &str) -> Option<MediaDirection> {
        Some(match a {
            "sendrecv" => MediaDirection::SendRecv,
            "sendonly" => MediaDirection::SendOnly,
            "recvonly" => MediaDirection::RecvOnly,
            "inactive" => MediaDirection::Inactive,
            _ => return None,
        })
    }
}

/// An RFC 4568 `a=crypto` attribute with a suite and key we support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crypto {
    pub tag: u32,
    pub suite: Suite,
    pub keys: SrtpKeys,
}

impl Crypto {
    /// The attribute value (after `a=`).
    pub fn to_attribute(&self) -> String {
        format!(
            "crypto:{} {} inline:{}",
            self.tag,
            self.suite.sdes_name(),
            base64::engine::general_purpose::STANDARD.encode(self.keys.concat())
        )
    }

    /// Parses the value of an `a=crypto:` attribute (without `crypto:`).
    /// `None` when the suite, key length or key parameters are unsupported
    /// (lifetimes other than 2^31 or more, MKI, several keys): RFC 4568 has the
    /// answerer skip such lines.
    pub fn parse(value: &str) -> Option<Crypto> {
        let mut it = value.split_ascii_whitespace();
        let tag = it.next()?;
        if tag.is_empty() || tag.len() > 9 || !tag.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let tag: u32 = tag.parse().ok()?;
        let suite = Suite::from_sdes_name(it.next()?)?;
        let key_params = it.next()?;
        if key_params.contains(';') {
            return None; // several keys
        }
        let inline = key_params.strip_prefix("inline:")?;
        let mut parts = inline.split('|');
        let b64 = parts.next()?;
        for p in parts {
            if p.contains(':') {
                return None; // MKI
            }
            // Lifetime: "2^N" or a decimal; accept only long ones.
            let ok = match p.strip_prefix("2^") {
                Some(n) => n.parse::<u32>().is_ok_and(|n| n >= 31),
                None => p.parse::<u64>().is_ok_and(|n| n >= 1 << 31),
            };
            if !ok {
                return None;
            }
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(b64))
            .ok()?;
        let keys = SrtpKeys::split(suite, &raw).ok()?;
        // Session parameters (UNENCRYPTED_SRTP, KDR=, ...) change the transform:
        // refuse them rather than get them wrong.
        if it.next().is_some() {
            return None;
        }
        Some(Crypto { tag, suite, keys })
    }
}

fn parse_line(n: usize, raw: &str) -> Result<Line, SdpError> {
    let b = raw.as_bytes();
    if b.len() < 2 || b[1] != b'=' || !b[0].is_ascii_lowercase() {
        return Err(SdpError::Line(n));
    }
    Ok(Line {
        kind: b[0] as char,
        value: raw[2..].to_string(),
    })
}

fn parse_media(value: &str) -> Result<Media, SdpError> {
    let mut it = value.split(' ').filter(|s| !s.is_empty());
    let kind = it.next().ok_or(SdpError::MediaLine)?;
    let port = it.next().ok_or(SdpError::MediaLine)?;
    let proto = it.next().ok_or(SdpError::MediaLine)?;
    let formats: Vec<String> = it.map(str::to_string).collect();
    if formats.is_empty() || !kind.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(SdpError::MediaLine);
    }
    let (port, port_count) = match port.split_once('/') {
        Some((p, n)) => (p, Some(n.parse().map_err(|_| SdpError::MediaLine)?)),
        None => (port, None),
    };
    let port = port.parse().map_err(|_| SdpError::MediaLine)?;
    Ok(Media {
        kind: kind.to_string(),
        port,
        port_count,
        proto: proto.to_string(),
        formats,
        lines: Vec::new(),
    })
}

/// `IN IP4 <addr>[/ttl]` -> the address.
fn parse_connection(value: &str) -> Result<IpAddr, SdpError> {
    let mut it = value.split(' ').filter(|s| !s.is_empty());
    let (net, at, addr) = (it.next(), it.next(), it.next());
    if net != Some("IN") || it.next().is_some() {
        return Err(SdpError::Connection);
    }
    let addr = addr.ok_or(SdpError::Connection)?;
    let addr = addr.split('/').next().unwrap_or(addr);
    let ip: IpAddr = addr.parse().map_err(|_| SdpError::Connection)?;
    match (at, ip) {
        (Some("IP4"), IpAddr::V4(_)) | (Some("IP6"), IpAddr::V6(_)) => Ok(ip),
        _ => Err(SdpError::Connection),
    }
}

fn connection_value(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("IN IP4 {a}"),
        IpAddr::V6(a) => format!("IN IP6 {a}"),
    }
}

impl SessionDescription {
    /// Parses and checks an SDP body (CRLF or LF line ends).
    pub fn parse(body: &[u8]) -> Result<SessionDescription, SdpError> {
        if body.is_empty() || body.len() > MAX_SDP_LEN {
            return Err(SdpError::Encoding);
        }
        let text = std::str::from_utf8(body).map_err(|_| SdpError::Encoding)?;
        let mut session = Vec::new();
        let mut media: Vec<Media> = Vec::new();
        for (n, raw) in text.split('\n').enumerate() {
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            if raw.is_empty() {
                continue;
            }
            let line = parse_line(n + 1, raw)?;
            if n == 0 && (line.kind != 'v' || line.value != "0") {
                return Err(SdpError::Version);
            }
            match line.kind {
                'm' => {
                    if media.len() == MAX_MEDIA {
                        return Err(SdpError::TooManyMedia);
                    }
                    media.push(parse_media(&line.value)?);
                }
                'c' => {
                    parse_connection(&line.value)?;
                    match media.last_mut() {
                        Some(m) => m.lines.push(line),
                        None => session.push(line),
                    }
                }
                'o' => {
                    if !media.is_empty() || line.value.split(' ').count() != 6 {
                        return Err(SdpError::Origin);
                    }
                    session.push(line);
                }
                _ => match media.last_mut() {
                    Some(m) => m.lines.push(line),
                    None => session.push(line),
                },
            }
        }
        if session.first().map(|l| l.kind) != Some('v') {
            return Err(SdpError::Version);
        }
        let sdp = SessionDescription { session, media };
        for m in &sdp.media {
            if let Some(v) = m.attribute("rtcp") {
                parse_rtcp(v)?;
            }
        }
        Ok(sdp)
    }

    /// The body, with CRLF line ends.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::with_capacity(512);
        for l in &self.session {
            push_line(&mut out, l.kind, &l.value);
        }
        for m in &self.media {
            push_line(&mut out, 'm', &m.m_line());
            for l in &m.lines {
                push_line(&mut out, l.kind, &l.value);
            }
        }
        out.into_bytes()
    }

    /// The session-level connection address.
    pub fn session_connection(&self) -> Option<IpAddr> {
        self.session
            .iter()
            .find(|l| l.kind == 'c')
            .and_then(|l| parse_connection(&l.value).ok())
    }

    /// The address media `i` is sent to: its own `c=`, else the session's.
    pub fn connection(&self, i: usize) -> Option<IpAddr> {
        self.media
            .get(i)
            .and_then(Media::own_connection)
            .or_else(|| self.session_connection())
    }

    /// The direction of media `i` (media-level attribute, else session-level,
    /// else sendrecv).
    pub fn direction(&self, i: usize) -> MediaDirection {
        let from = |lines: &[Line]| {
            lines
                .iter()
                .filter(|l| l.kind == 'a')
                .find_map(|l| MediaDirection::parse(&l.value))
        };
        self.media
            .get(i)
            .and_then(|m| from(&m.lines))
            .or_else(|| from(&self.session))
            .unwrap_or(MediaDirection::SendRecv)
    }

    /// Points the session at `ip`: `o=` address and `c=` lines (session and
    /// every media section that has its own).
    pub fn set_address(&mut self, ip: IpAddr) {
        let conn = connection_value(ip);
        let mut has_session_c = false;
        for l in &mut self.session {
            match l.kind {
                'c' => {
                    l.value = conn.clone();
                    has_session_c = true;
                }
                'o' => {
                    let mut f: Vec<&str> = l.value.split(' ').collect();
                    if f.len() == 6 {
                        let (at, addr) = match ip {
                            IpAddr::V4(_) => ("IP4", ip.to_string()),
                            IpAddr::V6(_) => ("IP6", ip.to_string()),
                        };
                        f[4] = at;
                        f[5] = &addr;
                        l.value = f.join(" ");
                    }
                }
                _ => {}
            }
        }
        for m in &mut self.media {
            let mut found = false;
            for l in m.lines.iter_mut().filter(|l| l.kind == 'c') {
                l.value = conn.clone();
                found = true;
            }
            if !found && !has_session_c {
                m.lines.insert(
                    0,
                    Line {
                        kind: 'c',
                        value: conn.clone(),
                    },
                );
            }
        }
    }
}

fn push_line(out: &mut String, kind: char, value: &str) {
    out.push(kind);
    out.push('=');
    out.push_str(value);
    out.push_str("\r\n");
}

/// `a=rtcp:<port> [IN IP4 <addr>]` (RFC 3605).
fn parse_rtcp(value: &str) -> Result<(u16, Option<IpAddr>), SdpError> {
    let (port, rest) = match value.split_once(' ') {
        Some((p, r)) => (p, Some(r)),
        None => (value, None),
    };
    let port = port.trim().parse().map_err(|_| SdpError::Rtcp)?;
    let addr = match rest {
        Some(r) => Some(parse_connection(r.trim()).map_err(|_| SdpError::Rtcp)?),
        None => None,
    };
    Ok((port, addr))
}

impl Media {
    fn m_line(&self) -> String {
        let port = match self.port_count {
            Some(n) => format!("{}/{n}", self.port),
            None => self.port.to_string(),
        };
        format!(
            "{} {port} {} {}",
            self.kind,
            self.proto,
            self.formats.join(" ")
        )
    }

    fn own_connection(&self) -> Option<IpAddr> {
        self.lines
            .iter()
            .find(|l| l.kind == 'c')
            .and_then(|l| parse_connection(&l.value).ok())
    }

    /// Values of `a=<name>` and `a=<name>:<value>` attributes.
    pub fn attributes<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.lines
            .iter()
            .filter(|l| l.kind == 'a')
            .filter_map(move |l| {
                let v = l.value.strip_prefix(name)?;
                if v.is_empty() {
                    Some(v)
                } else {
                    v.strip_prefix(':')
                }
            })
    }

    /// The first `a=<name>` value.
    pub fn attribute<'a>(&'a self, name: &'a str) -> Option<&'a str> {
        self.attributes(name).next()
    }

    /// Removes every `a=<name>` attribute.
    pub fn remove_attribute(&mut self, name: &str) {
        self.lines.retain(|l| {
            !(l.kind == 'a'
                && l.value
                    .strip_prefix(name)
                    .is_some_and(|v| v.is_empty() || v.starts_with(':')))
        });
    }

    /// Appends `a=<value>`.
    pub fn push_attribute(&mut self, value: impl Into<String>) {
        self.lines.push(Line {
            kind: 'a',
            value: value.into(),
        });
    }

    /// Whether this is audio over RTP we can relay (AVP or SAVP, with or
    /// without feedback).
    pub fn is_rtp_audio(&self) -> bool {
        self.kind == "audio"
            && matches!(
                self.proto.as_str(),
                "RTP/AVP" | "RTP/SAVP" | "RTP/AVPF" | "RTP/SAVPF"
            )
    }

    /// Whether the proto is secure (`RTP/SAVP`, `RTP/SAVPF`).
    pub fn is_secure(&self) -> bool {
        self.proto.starts_with("RTP/SAVP")
    }

    /// The crypto attributes we support, in offer order.
    pub fn cryptos(&self) -> Vec<Crypto> {
        self.attributes("crypto")
            .filter_map(Crypto::parse)
            .collect()
    }

    /// Whether `a=rtcp-mux` is present (RFC 5761).
    pub fn rtcp_mux(&self) -> bool {
        self.attribute("rtcp-mux").is_some()
    }

    /// The RTCP port and address of `a=rtcp`, if present.
    pub fn rtcp(&self) -> Option<(u16, Option<IpAddr>)> {
        self.attribute("rtcp").and_then(|v| parse_rtcp(v).ok())
    }

    /// Marks the stream rejected/disabled (RFC 3264 §6, §8.2): port 0, no
    /// crypto or RTCP attributes.
    pub fn reject(&mut self) {
        self.port = 0;
        self.port_count = None;
        for a in ["crypto", "rtcp", "rtcp-mux"] {
            self.remove_attribute(a);
        }
    }

    /// Switches the proto between AVP and SAVP (keeping a trailing F).
    pub fn set_secure(&mut self, secure: bool) {
        let f = if self.proto.ends_with('F') { "F" } else { "" };
        self.proto = format!("RTP/{}AVP{f}", if secure { "S" } else { "" });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFER: &str = "v=0\r\n\
o=alice 2890844526 2890844526 IN IP4 198.51.100.7\r\n\
s=-\r\n\
c=IN IP4 198.51.100.7\r\n\
t=0 0\r\n\
m=audio 49170 RTP/SAVP 0 8 101\r\n\
a=rtpmap:0 PCMU/8000\r\n\
a=rtpmap:101 telephone-event/8000\r\n\
a=fmtp:101 0-16\r\n\
a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR|2^20|1:32\r\n\
a=crypto:2 AES_CM_128_HMAC_SHA1_32 inline:NzB4d1BINUAvLEw6UzF3WSJ+PSdFcGdUJShpX1Zj\r\n\
a=crypto:3 AES_CM_128_HMAC_SHA1_80 inline:d0RmdmcmVCspeEc3QGZiNWpVLFJhQX1cfHAwJSoj|2^31\r\n\
a=rtcp:49171\r\n\
a=sendonly\r\n\
m=video 51372 RTP/AVP 99\r\n\
a=rtpmap:99 h263-1998/90000\r\n";

    #[test]
    fn parse_offer() {
        let sdp = SessionDescription::parse(OFFER.as_bytes()).unwrap();
        assert_eq!(sdp.media.len(), 2);
        let a = &sdp.media[0];
        assert!(a.is_rtp_audio() && a.is_secure());
        assert_eq!((a.port, a.formats.len()), (49170, 3));
        assert_eq!(sdp.connection(0), Some("198.51.100.7".parse().unwrap()));
        assert_eq!(sdp.direction(0), MediaDirection::SendOnly);
        assert_eq!(sdp.direction(1), MediaDirection::SendRecv);
        assert_eq!(a.rtcp(), Some((49171, None)));
        // Tag 1 has an MKI (unsupported), tag 2 is kept, tag 3 has a long lifetime.
        let c: Vec<u32> = a.cryptos().iter().map(|c| c.tag).collect();
        assert_eq!(c, vec![2, 3]);
        assert_eq!(a.cryptos()[0].suite, Suite::AesCm128HmacSha1_32);
        assert!(!sdp.media[1].is_rtp_audio());
        // Round trip is exact for CRLF input.
        assert_eq!(sdp.to_bytes(), OFFER.as_bytes());
    }

    #[test]
    fn rewrite() {
        let mut sdp = SessionDescription::parse(OFFER.as_bytes()).unwrap();
        sdp.set_address("203.0.113.1".parse().unwrap());
        let m = &mut sdp.media[0];
        m.port = 30000;
        m.set_secure(false);
        m.remove_attribute("crypto");
        m.remove_attribute("rtcp");
        m.push_attribute("rtcp:30001");
        sdp.media[1].reject();
        let text = String::from_utf8(sdp.to_bytes()).unwrap();
        assert!(text.contains("o=alice 2890844526 2890844526 IN IP4 203.0.113.1\r\n"));
        assert!(text.contains("c=IN IP4 203.0.113.1\r\n"));
        assert!(text.contains("m=audio 30000 RTP/AVP 0 8 101\r\n"));
        assert!(text.contains("a=rtcp:30001\r\n") && !text.contains("crypto"));
        assert!(text.contains("a=sendonly\r\n"));
        assert!(text.contains("m=video 0 RTP/AVP 99\r\n"));
        assert!(!text.contains("198.51.100.7"));
        // And parses again.
        SessionDescription::parse(text.as_bytes()).unwrap();
    }

    #[test]
    fn crypto_attribute_round_trip() {
        for suite in Suite::ALL {
            let c = Crypto {
                tag: 7,
                suite,
                keys: SrtpKeys::generate(suite).unwrap(),
            };
            let a = c.to_attribute();
            assert_eq!(Crypto::parse(a.strip_prefix("crypto:").unwrap()), Some(c));
        }
        assert_eq!(Crypto::parse("1 AES_CM_128_HMAC_SHA1_80 inline:AAAA"), None);
        assert_eq!(
            Crypto::parse("1 F8_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR"),
            None
        );
        assert_eq!(
            Crypto::parse("1 AES_CM_128_HMAC_SHA1_80 inline:PS1uQCVeeCFCanVmcjkpPywjNWhcYD0mXXtxaVBR UNENCRYPTED_SRTP"),
            None
        );
    }

    #[test]
    fn malformed_is_an_error() {
        for bad in [
            "",
            "x",
            "o=a 1 1 IN IP4 1.2.3.4\r\n",
            "v=1\r\n",
            "v=0\r\nm=audio\r\n",
            "v=0\r\nm=audio 99999 RTP/AVP 0\r\n",
            "v=0\r\nm=audio 1 RTP/AVP\r\n",
            "v=0\r\nc=IN IP4 not-an-address\r\n",
            "v=0\r\nc=IN IP6 1.2.3.4\r\n",
            "v=0\r\nXY\r\n",
            "v=0\r\nm=audio 1 RTP/AVP 0\r\na=rtcp:x\r\n",
            "v=0\r\nm=audio 1 RTP/AVP 0\r\no=a 1 1 IN IP4 1.2.3.4\r\n",
        ] {
            assert!(
                SessionDescription::parse(bad.as_bytes()).is_err(),
                "{bad:?}"
            );
        }
        assert!(SessionDescription::parse(&[0xff, 0xfe]).is_err());
        // LF-only is fine.
        let lf = OFFER.replace("\r\n", "\n");
        assert_eq!(
            SessionDescription::parse(lf.as_bytes()).unwrap(),
            SessionDescription::parse(OFFER.as_bytes()).unwrap()
        );
    }

    /// Mutated inputs (bytes flipped, deleted, duplicated, truncated): an
    /// error or a description, never a panic; whatever parses re-serialises
    /// to something that parses to the same thing.
    #[test]
    fn mutated_inputs_never_panic() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b" =:/\r\n0123456789aAmcvo.-|^^;";
        for _ in 0..20_000 {
            let mut b = OFFER.as_bytes().to_vec();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() as usize) % b.len().max(1);
                match rnd() % 5 {
                    0 => b[i] = alphabet[(rnd() as usize) % alphabet.len()],
                    1 => {
                        b.remove(i);
                    }
                    2 => b.insert(i, alphabet[(rnd() as usize) % alphabet.len()]),
                    3 => b.truncate(i),
                    _ => b[i] = rnd() as u8,
                }
                if b.is_empty() {
                    break;
                }
            }
            if let Ok(sdp) = SessionDescription::parse(&b) {
                let again = SessionDescription::parse(&sdp.to_bytes()).expect("re-parse");
                assert_eq!(again, sdp);
                for i in 0..sdp.media.len() {
                    let _ = (sdp.connection(i), sdp.direction(i), sdp.media[i].cryptos());
                    let _ = sdp.media[i].rtcp();
                }
            }
        }
    }
}
