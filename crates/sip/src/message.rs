//! SIP messages: reading them off the wire (RFC 3261 §7, with the leniencies of
//! RFC 4475) and writing them back.
//!
//! The wire text is normalised here before anything else looks at it: header
//! folding is undone, compact names (`v:`, `i:`, `f:` …) are expanded,
//! `Name : value` spacing and LF-only line ends are accepted, comma-separated
//! `Via` values are split, and the body is cut to `Content-Length`. URIs are
//! then parsed with `rsip` (behind [`SipUri`]), whose own message parser
//! rejects all of the above. Nothing in this module panics on any input; every
//! refusal is a [`ParseError`] that never embeds the raw input.

use bytes::{BufMut, Bytes, BytesMut};
use std::borrow::Cow;
use std::fmt;

/// Largest message accepted on any transport (datagram or framed stream).
pub const MAX_MESSAGE_LEN: usize = 65_535;
/// Default of `[sip] max_message_bytes`: larger messages are refused (513).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Most header lines one message may carry.
pub const MAX_HEADERS: usize = 256;
/// Longest single header line (after unfolding).
pub const MAX_HEADER_LEN: usize = 8_192;

/// Why a message could not be read. The texts name the defect only, never
/// the input (which may carry credentials).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("empty message")]
    Empty,
    #[error("message larger than {MAX_MESSAGE_LEN} bytes")]
    TooLarge,
    #[error("message is not valid UTF-8 in its header section")]
    NotUtf8,
    #[error("malformed start line")]
    StartLine,
    #[error("unsupported SIP version")]
    Version,
    #[error("malformed request URI")]
    RequestUri,
    #[error("malformed header line")]
    HeaderLine,
    #[error("too many headers or header too long")]
    HeaderLimit,
    #[error("missing or malformed {0} header")]
    Header(&'static str),
    #[error("CSeq method does not match the request method")]
    CSeqMethod,
    #[error("Content-Length does not match the body")]
    ContentLength,
}

/// A header: its canonical name (long form) and its trimmed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: Cow<'static, str>,
    pub value: String,
}

/// The first line of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartLine {
    Request { method: String, uri: String },
    Response { code: u16, reason: String },
}

/// A parsed, normalised SIP message. Values in it are untrusted: they came from
/// the wire and are only checked for syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub start: StartLine,
    pub headers: Vec<Header>,
    pub body: Bytes,
}

/// The topmost `Via`, split into what the transaction layer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Via {
    pub transport: String,
    pub host: String,
    pub port: Option<u16>,
    pub branch: Option<String>,
    pub rport: bool,
}

/// `CSeq` number and method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CSeq {
    pub seq: u32,
    pub method: String,
}

fn expand_compact(name: &str) -> &str {
    if name.len() != 1 {
        return name;
    }
    match name.as_bytes()[0].to_ascii_lowercase() {
        b'v' => "Via",
        b'i' => "Call-ID",
        b'f' => "From",
        b't' => "To",
        b'm' => "Contact",
        b'l' => "Content-Length",
        b'c' => "Content-Type",
        b'k' => "Supported",
        b's' => "Subject",
        b'e' => "Content-Encoding",
        b'o' => "Event",
        b'u' => "Allow-Events",
        b'r' => "Refer-To",
        b'b' => "Referred-By",
        b'x' => "Session-Expires",
        b'a' => "Accept-Contact",
        b'j' => "Reject-Contact",
        b'd' => "Request-Disposition",
        b'y' => "Identity",
        b'n' => "Identity-Info",
        _ => name,
    }
}

/// Canonical spelling of the headers this edge reads or writes, so that
/// lookups and output are uniform whatever case the peer used.
fn canonical(name: &str) -> Cow<'static, str> {
    const KNOWN: &[&str] = &[
        "Via",
        "Call-ID",
        "From",
        "To",
        "CSeq",
        "Contact",
        "Content-Length",
        "Content-Type",
        "Max-Forwards",
        "Authorization",
        "WWW-Authenticate",
        "Route",
        "Record-Route",
        "Allow",
        "Supported",
        "Require",
        "User-Agent",
        "Server",
        "Retry-After",
        "P-Asserted-Identity",
        "Proxy-Authorization",
    ];
    let name = expand_compact(name);
    for k in KNOWN {
        if k.eq_ignore_ascii_case(name) {
            return Cow::Borrowed(k);
        }
    }
    Cow::Owned(name.to_string())
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

fn find_head_end(data: &[u8]) -> Option<(usize, usize)> {
    // Returns (end of header section, start of body). CRLFCRLF or LFLF.
    let mut i = 0;
    while i < data.len() {
        if data[i] == b'\n' {
            if data.get(i + 1) == Some(&b'\n') {
                return Some((i, i + 2));
            }
            if data.get(i + 1) == Some(&b'\r') && data.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

/// Reads one message (a datagram, or one frame cut by [`crate::framing`]).
pub fn parse(data: &[u8]) -> Result<Message, ParseError> {
    if data.len() > MAX_MESSAGE_LEN {
        return Err(ParseError::TooLarge);
    }
    // Leading CRLFs are tolerated (RFC 3261 §7.5).
    let start = data
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .ok_or(ParseError::Empty)?;
    let data = &data[start..];
    let (head_end, body_start) = match find_head_end(data) {
        Some(x) => x,
        // A datagram without the blank line: accept it as header-only.
        None => (data.len(), data.len()),
    };
    let head = std::str::from_utf8(&data[..head_end]).map_err(|_| ParseError::NotUtf8)?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().ok_or(ParseError::Empty)?;
    let start = parse_start_line(first)?;

    // Unfold and split header lines in one pass; only a folded header
    // allocates for its joined line.
    let mut headers = Vec::with_capacity(16);
    let mut lines = lines.peekable();
    while let Some(line) = lines.next() {
        if line.is_empty() {
            continue;
        }
        if line.starts_with([' ', '\t']) {
            return Err(ParseError::HeaderLine);
        }
        let mut folded: Option<String> = None;
        while let Some(next) = lines.peek() {
            if !next.starts_with([' ', '\t']) {
                break;
            }
            let f = folded.get_or_insert_with(|| line.to_string());
            f.push(' ');
            f.push_str(next.trim());
            lines.next();
        }
        let line = folded.as_deref().unwrap_or(line);
        if line.len() > MAX_HEADER_LEN {
            return Err(ParseError::HeaderLimit);
        }
        let (name, value) = line.split_once(':').ok_or(ParseError::HeaderLine)?;
        let name = name.trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(is_token_char) {
            return Err(ParseError::HeaderLine);
        }
        let name = canonical(name);
        let value = value.trim();
        if value.bytes().any(|b| b == 0) {
            return Err(ParseError::HeaderLine);
        }
        if name == "Via" {
            for part in split_commas(value) {
                headers.push(Header {
                    name: name.clone(),
                    value: part.to_string(),
                });
            }
        } else {
            headers.push(Header {
                name,
                value: value.to_string(),
            });
        }
        if headers.len() > MAX_HEADERS {
            return Err(ParseError::HeaderLimit);
        }
    }

    let rest = &data[body_start.min(data.len())..];
    let mut lengths = headers.iter().filter(|h| h.name == "Content-Length");
    let length = lengths.next();
    if lengths.next().is_some() {
        // RFC 4475 §3.1.2.12: which one frames the body is ambiguous
        // (request smuggling on streams).
        return Err(ParseError::ContentLength);
    }
    let body = match length {
        Some(h) => {
            let n: usize = h.value.parse().map_err(|_| ParseError::ContentLength)?;
            if n > rest.len() {
                return Err(ParseError::ContentLength);
            }
            Bytes::copy_from_slice(&rest[..n])
        }
        None => Bytes::copy_from_slice(rest),
    };
    let msg = Message {
        start,
        headers,
        body,
    };
    msg.validate()?;
    Ok(msg)
}

/// Splits a header value at commas that are outside quotes and angle brackets.
pub fn split_commas(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let (mut quoted, mut angle, mut escaped, mut from) = (false, false, false, 0);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                parts.push(value[from..i].trim());
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(value[from..].trim());
    parts.into_iter().filter(|p| !p.is_empty())
}

fn parse_start_line(line: &str) -> Result<StartLine, ParseError> {
    if let Some(rest) = line.strip_prefix("SIP/") {
        let mut it = rest.splitn(3, ' ');
        let version = it.next().ok_or(ParseError::StartLine)?;
        if version != "2.0" {
            return Err(ParseError::Version);
        }
        let code = it.next().ok_or(ParseError::StartLine)?;
        if code.len() != 3 {
            return Err(ParseError::StartLine);
        }
        let code: u16 = code.parse().map_err(|_| ParseError::StartLine)?;
        if !(100..700).contains(&code) {
            return Err(ParseError::StartLine);
        }
        let reason = it.next().unwrap_or("").to_string();
        return Ok(StartLine::Response { code, reason });
    }
    let mut it = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (it.next(), it.next(), it.next(), it.next())
    else {
        return Err(ParseError::StartLine);
    };
    if method.is_empty() || !method.bytes().all(is_token_char) {
        return Err(ParseError::StartLine);
    }
    if !version.eq_ignore_ascii_case("SIP/2.0") {
        return Err(ParseError::Version);
    }
    SipUri::parse(uri).map_err(|_| ParseError::RequestUri)?;
    Ok(StartLine::Request {
        method: method.to_string(),
        uri: uri.to_string(),
    })
}

impl Message {
    /// Mandatory headers (RFC 3261 §8.1.1) and their syntax.
    fn validate(&self) -> Result<(), ParseError> {
        for name in ["Call-ID", "CSeq", "From", "To", "Max-Forwards"] {
            if self.headers_named(name).nth(1).is_some() {
                return Err(ParseError::Header(name));
            }
        }
        self.call_id().ok_or(ParseError::Header("Call-ID"))?;
        let cseq = self.cseq().ok_or(ParseError::Header("CSeq"))?;
        self.top_via().ok_or(ParseError::Header("Via"))?;
        let from = self.header("From").ok_or(ParseError::Header("From"))?;
        let to = self.header("To").ok_or(ParseError::Header("To"))?;
        let has_scheme = |u: &str| {
            u.split_once(':').is_some_and(|(scheme, rest)| {
                !scheme.is_empty()
                    && scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    && !rest.is_empty()
            })
        };
        name_addr_uri(from)
            .filter(|u| has_scheme(u))
            .ok_or(ParseError::Header("From"))?;
        name_addr_uri(to)
            .filter(|u| has_scheme(u))
            .ok_or(ParseError::Header("To"))?;
        if let StartLine::Request { method, .. } = &self.start {
            if *method != cseq.method && !(method == "ACK" && cseq.method == "INVITE") {
                return Err(ParseError::CSeqMethod);
            }
            if let Some(mf) = self.header("Max-Forwards") {
                mf.parse::<u8>()
                    .map_err(|_| ParseError::Header("Max-Forwards"))?;
            }
        }
        Ok(())
    }

    pub fn method(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { method, .. } => Some(method),
            StartLine::Response { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match &self.start {
            StartLine::Response { code, .. } => Some(*code),
            StartLine::Request { .. } => None,
        }
    }

    pub fn request_uri(&self) -> Option<&str> {
        match &self.start {
            StartLine::Request { uri, .. } => Some(uri),
            StartLine::Response { .. } => None,
        }
    }

    /// First value of a header (canonical long name, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// Every value of a header, in order.
    pub fn headers_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    pub fn call_id(&self) -> Option<&str> {
        self.header("Call-ID").filter(|v| !v.is_empty())
    }

    pub fn cseq(&self) -> Option<CSeq> {
        let v = self.header("CSeq")?;
        let mut it = v.split_whitespace();
        let seq = it.next()?.parse::<u32>().ok()?;
        let method = it.next()?;
        if it.next().is_some() || !method.bytes().all(is_token_char) {
            return None;
        }
        Some(CSeq {
            seq,
            method: method.to_string(),
        })
    }

    pub fn top_via(&self) -> Option<Via> {
        Via::parse(self.header("Via")?)
    }

    pub fn from_tag(&self) -> Option<&str> {
        tag_of(self.header("From")?)
    }

    pub fn to_tag(&self) -> Option<&str> {
        tag_of(self.header("To")?)
    }

    /// Sets or replaces the first header of that name.
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self
            .headers
            .iter_mut()
            .find(|h| h.name.eq_ignore_ascii_case(name))
        {
            Some(h) => h.value = value,
            None => self.headers.push(Header {
                name: name.to_string().into(),
                value,
            }),
        }
    }

    pub fn remove_headers(&mut self, name: &str) {
        self.headers.retain(|h| !h.name.eq_ignore_ascii_case(name));
    }

    /// A `multipart/mixed` (or `/alternative`, `/related`) body that carries
    /// one `application/sdp` part, as SIP-I/SIP-T carriers send (SDP plus
    /// ISUP, RFC 3204), becomes that SDP alone: the edge relays media, not
    /// ISUP, and the SDP must be anchored like any other (RFC 5621 bodies).
    /// Returns true when the body was replaced. Other bodies are left alone.
    pub fn reduce_multipart_to_sdp(&mut self) -> bool {
        let Some(ct) = self.header("Content-Type") else {
            return false;
        };
        let Some(sdp) = multipart_sdp(ct, &self.body) else {
            return false;
        };
        self.body = sdp;
        self.set_header("Content-Type", "application/sdp");
        self.remove_headers("Content-Disposition");
        self.remove_headers("MIME-Version");
        true
    }

    /// Serialises the message; `Content-Length` is always recomputed.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(512 + self.body.len());
        match &self.start {
            StartLine::Request { method, uri } => {
                out.put_slice(method.as_bytes());
                out.put_u8(b' ');
                out.put_slice(uri.as_bytes());
                out.put_slice(b" SIP/2.0\r\n");
            }
            StartLine::Response { code, reason } => {
                out.put_slice(format!("SIP/2.0 {code} {reason}\r\n").as_bytes());
            }
        }
        for h in &self.headers {
            if h.name == "Content-Length" {
                continue;
            }
            out.put_slice(h.name.as_bytes());
            out.put_slice(b": ");
            out.put_slice(h.value.as_bytes());
            out.put_slice(b"\r\n");
        }
        out.put_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
        out.put_slice(&self.body);
        out.freeze()
    }
}

impl fmt::Display for Message {
    /// A one-line summary safe for logs (no header values).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.start {
            StartLine::Request { method, .. } => write!(f, "{method} request"),
            StartLine::Response { code, .. } => write!(f, "{code} response"),
        }
    }
}

/// Value of a `;name=value` parameter in a header value (outside `<...>`).
pub fn header_param<'a>(value: &'a str, name: &str) -> Option<&'a str> {
    let params = match value.rfind('>') {
        Some(i) => &value[i + 1..],
        None => value.split_once(';').map(|(_, p)| p).unwrap_or(""),
    };
    let params = params.strip_prefix(';').unwrap_or(params);
    for p in params.split(';') {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        if k.trim().eq_ignore_ascii_case(name) {
            return Some(v.trim());
        }
    }
    None
}

fn tag_of(value: &str) -> Option<&str> {
    header_param(value, "tag").filter(|t| !t.is_empty())
}

/// The URI of a name-addr or addr-spec header value (From, To, Contact, Route).
pub fn name_addr_uri(value: &str) -> Option<&str> {
    let value = value.trim();
    if !quotes_balanced(value) {
        return None;
    }
    if let Some(open) = find_unquoted(value, '<') {
        let close = value[open..].find('>')? + open;
        Some(&value[open + 1..close])
    } else {
        // addr-spec: parameters after ';' belong to the header, not the URI.
        let uri = value.split(';').next()?.trim();
        (!uri.is_empty()).then_some(uri)
    }
}

/// Every quoted string is closed (backslash escapes honoured).
fn quotes_balanced(s: &str) -> bool {
    let (mut quoted, mut escaped) = (false, false);
    for c in s.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            _ => {}
        }
    }
    !quoted
}

fn find_unquoted(s: &str, needle: char) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == needle && !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// A SIP or tel URI, parsed with rsip for its syntax, with the user part taken
/// from the text itself (rsip reads `sip:first.last@host` with no user).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SipUri {
    pub scheme: String,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub transport: Option<String>,
}

impl SipUri {
    pub fn parse(text: &str) -> Result<SipUri, ParseError> {
        let (scheme, rest) = text.split_once(':').ok_or(ParseError::RequestUri)?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme == "tel" {
            let user = rest.split(';').next().unwrap_or("");
            if user.is_empty() {
                return Err(ParseError::RequestUri);
            }
            return Ok(SipUri {
                scheme,
                user: Some(user.to_string()),
                host: String::new(),
                port: None,
                transport: None,
            });
        }
        if scheme != "sip" && scheme != "sips" {
            return Err(ParseError::RequestUri);
        }
        if text.len() > 2048 || text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ParseError::RequestUri);
        }
        let uri = rsip::Uri::try_from(text).map_err(|_| ParseError::RequestUri)?;
        let (user, hostpart) = match rest.rfind('@') {
            Some(i) => (Some(&rest[..i]), &rest[i + 1..]),
            None => (None, rest),
        };
        let user = user.map(|u| u.split(':').next().unwrap_or(u).to_string());
        if user.as_deref() == Some("") {
            return Err(ParseError::RequestUri);
        }
        let hostport = hostpart.split([';', '?']).next().unwrap_or("");
        let (host, port) = split_host_port(hostport).ok_or(ParseError::RequestUri)?;
        if host.is_empty() {
            return Err(ParseError::RequestUri);
        }
        let transport = uri.transport().map(|t| t.to_string().to_ascii_lowercase());
        Ok(SipUri {
            scheme,
            user,
            host: host.to_string(),
            port,
            transport,
        })
    }
}

fn split_host_port(s: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let close = rest.find(']')?;
        let host = &rest[..close];
        let after = &rest[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((s, None)),
    }
}

/// The user part of the URI in a name-addr header value, if any.
pub fn header_user(value: &str) -> Option<String> {
    SipUri::parse(name_addr_uri(value)?).ok()?.user
}

impl Via {
    pub fn parse(value: &str) -> Option<Via> {
        let value = value.trim();
        let (proto, rest) = value.split_once(char::is_whitespace)?;
        let mut parts = proto.split('/');
        let (Some(name), Some(ver), Some(transport), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        if !name.trim().eq_ignore_ascii_case("SIP") || ver.trim() != "2.0" {
            return None;
        }
        let transport = transport.trim().to_ascii_uppercase();
        if transport.is_empty() || !transport.bytes().all(is_token_char) {
            return None;
        }
        let mut it = rest.split(';');
        let sent_by = it.next()?.trim();
        let (host, port) = split_host_port(sent_by)?;
        if host.is_empty() || host.bytes().any(|b| b <= b' ') {
            return None;
        }
        let mut branch = None;
        let mut rport = false;
        for p in it {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let k = k.trim();
            if k.eq_ignore_ascii_case("branch") {
                let v = v.trim();
                if v.is_empty() {
                    return None;
                }
                branch = Some(v.to_string());
            } else if k.eq_ignore_ascii_case("rport") {
                rport = true;
            }
        }
        Some(Via {
            transport,
            host: host.to_string(),
            port,
            branch,
            rport,
        })
    }
}

/// Builds a response to `req` with the headers RFC 3261 §8.2.6 copies.
/// `to_tag` is added to To when it has none.
pub fn response_to(req: &Message, code: u16, reason: &str, to_tag: Option<&str>) -> Message {
    let mut headers = Vec::with_capacity(8);
    for h in &req.headers {
        match &*h.name {
            "Via" | "From" | "Call-ID" | "CSeq" => headers.push(h.clone()),
            "To" => {
                let mut v = h.value.clone();
                if let Some(tag) = to_tag {
                    if tag_of(&v).is_none() {
                        v.push_str(";tag=");
                        v.push_str(tag);
                    }
                }
                headers.push(Header {
                    name: "To".into(),
                    value: v,
                });
            }
            _ => {}
        }
    }
    Message {
        start: StartLine::Response {
            code,
            reason: reason.to_string(),
        },
        headers,
        body: Bytes::new(),
    }
}

/// The one `application/sdp` part of a multipart body (RFC 2046 §5.1), or
/// None: not multipart, no boundary, no SDP part, or more than one.
fn multipart_sdp(content_type: &str, body: &[u8]) -> Option<Bytes> {
    let (mime, params) = content_type.split_once(';')?;
    if !mime.trim().to_ascii_lowercase().starts_with("multipart/") {
        return None;
    }
    let boundary = params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
    })?;
    if boundary.is_empty() || boundary.len() > 70 {
        return None;
    }
    let delim = format!("--{boundary}");
    let text = body;
    let mut found: Option<Bytes> = None;
    // Parts sit between delimiter lines; the last delimiter ends with "--".
    let mut starts = Vec::new();
    let mut i = 0;
    while let Some(off) = find(&text[i..], delim.as_bytes()) {
        let at = i + off;
        // A delimiter starts a line.
        if at == 0 || text[at - 1] == b'\n' {
            starts.push(at);
        }
        i = at + delim.len();
    }
    for w in starts.windows(2) {
        let (a, b) = (w[0] + delim.len(), w[1]);
        let part = &text[a..b];
        // Skip the rest of the delimiter line.
        let nl = part.iter().position(|c| *c == b'\n')?;
        let part = &part[nl + 1..];
        // Part headers end at an empty line (CRLF CRLF or LF LF).
        let (head_end, sep) = match find(part, b"\r\n\r\n") {
            Some(p) => (p, 4),
            None => match find(part, b"\n\n") {
                Some(p) => (p, 2),
                None if part.starts_with(b"\r\n") => (0, 2),
                None => continue,
            },
        };
        let head = std::str::from_utf8(&part[..head_end]).ok()?;
        let is_sdp = head.lines().any(|l| {
            l.split_once(':').is_some_and(|(n, v)| {
                n.trim().eq_ignore_ascii_case("content-type")
                    && v.trim().to_ascii_lowercase().starts_with("application/sdp")
            })
        });
        if !is_sdp {
            continue;
        }
        if found.is_some() {
            return None; // two SDP parts: ambiguous
        }
        let mut content = &part[head_end + sep..];
        // The CRLF before the next delimiter belongs to the delimiter.
        if let Some(c) = content.strip_suffix(b"\r\n") {
            content = c;
        } else if let Some(c) = content.strip_suffix(b"\n") {
            content = c;
        }
        found = Some(Bytes::copy_from_slice(content));
    }
    found
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The reason phrase RFC 3261 gives a status code.
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        180 => "Ringing",
        181 => "Call Is Being Forwarded",
        183 => "Session Progress",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        416 => "Unsupported URI Scheme",
        420 => "Bad Extension",
        481 => "Call/Transaction Does Not Exist",
        482 => "Loop Detected",
        483 => "Too Many Hops",
        484 => "Address Incomplete",
        486 => "Busy Here",
        487 => "Request Terminated",
        488 => "Not Acceptable Here",
        491 => "Request Pending",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Server Time-out",
        513 => "Message Too Large",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {

    fn sipi_invite(boundary_param: &str, sdp_ct: &str, eol: &str) -> Vec<u8> {
        let body = format!(
            "--b1{eol}Content-Type: {sdp_ct}{eol}{eol}v=0{eol}o=- 1 1 IN IP4 192.0.2.1{eol}s=-{eol}c=IN IP4 192.0.2.1{eol}t=0 0{eol}m=audio 4000 RTP/AVP 0{eol}{eol}--b1{eol}Content-Type: application/ISUP;version=itu-t92+{eol}Content-Disposition: signal;handling=optional{eol}{eol}\x01\x00\x49{eol}--b1--{eol}"
        );
        format!(
            "INVITE sip:1@example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:1@example.com>\r\nCall-ID: mp1\r\nCSeq: 1 INVITE\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed;{boundary_param}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[test]
    fn multipart_sipi_body_is_reduced_to_its_sdp_part() {
        for (bp, eol) in [
            ("boundary=b1", "\r\n"),
            ("boundary=\"b1\"", "\r\n"),
            (" boundary=b1", "\n"),
        ] {
            let mut m = parse(&sipi_invite(bp, "application/sdp", eol)).unwrap();
            assert!(m.reduce_multipart_to_sdp(), "{bp:?} {eol:?}");
            assert_eq!(m.header("Content-Type"), Some("application/sdp"));
            assert!(m.header("MIME-Version").is_none());
            let body = std::str::from_utf8(&m.body).unwrap();
            assert!(body.starts_with("v=0"), "{body:?}");
            assert!(body.ends_with(&format!("RTP/AVP 0{eol}")), "{body:?}");
            assert!(!body.contains("ISUP") && !body.contains("--b1"), "{body:?}");
            // It serialises and parses back with the new length.
            let again = parse(&m.to_bytes()).unwrap();
            assert_eq!(again.body, m.body);
        }
    }

    #[test]
    fn multipart_without_one_sdp_part_is_left_alone() {
        // No SDP part.
        let mut m = parse(&sipi_invite("boundary=b1", "text/plain", "\r\n")).unwrap();
        let before = m.body.clone();
        assert!(!m.reduce_multipart_to_sdp());
        assert_eq!(m.body, before);
        // Wrong boundary.
        let mut m = parse(&sipi_invite("boundary=zz", "application/sdp", "\r\n")).unwrap();
        assert!(!m.reduce_multipart_to_sdp());
        // Not multipart at all.
        let mut m = parse(
            b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK2\r\nFrom: <sip:a@x>;tag=1\r\nTo: <sip:x>\r\nCall-ID: o\r\nCSeq: 1 OPTIONS\r\nContent-Type: application/sdp\r\nContent-Length: 3\r\n\r\nv=0",
        )
        .unwrap();
        assert!(!m.reduce_multipart_to_sdp());
        // Two SDP parts: ambiguous, left alone (the B2BUA then answers 415).
        let two = "--b1\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--b1\r\nContent-Type: application/sdp\r\n\r\nv=0\r\n--b1--\r\n";
        assert_eq!(
            multipart_sdp("multipart/mixed;boundary=b1", two.as_bytes()),
            None
        );
        // Garbage never panics.
        for junk in [
            "--b1",
            "--b1\r\n",
            "--b1--",
            "x--b1\r\n--b1",
            "--b1\r\nContent-Type: application/sdp",
        ] {
            let _ = multipart_sdp("multipart/mixed; boundary=b1", junk.as_bytes());
        }
    }

    use super::*;

    const INVITE: &str = "INVITE sip:+15551234@edge.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5060;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: <sip:+15551234@edge.example.com>\r\n\
From: \"Alice\" <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@10.0.0.1>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\r\nv=0\nEXTRA";

    #[test]
    fn parses_a_plain_invite_and_cuts_the_body() {
        let m = parse(INVITE.as_bytes()).unwrap();
        assert_eq!(m.method(), Some("INVITE"));
        assert_eq!(&m.body[..], b"v=0\n");
        let via = m.top_via().unwrap();
        assert_eq!(via.branch.as_deref(), Some("z9hG4bK776asdhds"));
        assert!(via.rport);
        assert_eq!(via.port, Some(5060));
        assert_eq!(m.from_tag(), Some("1928301774"));
        assert_eq!(m.to_tag(), None);
        assert_eq!(m.cseq().unwrap().seq, 314159);
        assert_eq!(
            header_user(m.header("To").unwrap()).as_deref(),
            Some("+15551234")
        );
    }

    #[test]
    fn compact_folded_lf_and_spaced_forms_are_normalised() {
        let text = "OPTIONS sip:first.last@example.com SIP/2.0\n\
v: SIP/2.0/TCP h.example.com;branch=z9hG4bKa, SIP/2.0/UDP second.example.com;branch=z9hG4bKb\n\
i: abc\n\
f : <sip:first.last@example.com>\n ;tag=x\n\
t:\t<sip:b@example.com>\n\
CSeq: 1 OPTIONS\n\
l: 0\n\n";
        let m = parse(text.as_bytes()).unwrap();
        assert_eq!(m.headers_named("Via").count(), 2);
        assert_eq!(m.call_id(), Some("abc"));
        assert_eq!(m.from_tag(), Some("x"));
        assert_eq!(
            header_user(m.header("From").unwrap()).as_deref(),
            Some("first.last")
        );
        let round = parse(&m.to_bytes()).unwrap();
        assert_eq!(round, m);
    }

    #[test]
    fn refuses_what_it_must() {
        let cases: &[(&str, ParseError)] = &[
            ("", ParseError::Empty),
            ("\r\n\r\n", ParseError::Empty),
            (
                "INVITE sip:a@b SIP/7.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 INVITE\r\n\r\n",
                ParseError::Version,
            ),
            (
                "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCSeq: 1 INVITE\r\n\r\n",
                ParseError::Header("Call-ID"),
            ),
            (
                "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 BYE\r\n\r\n",
                ParseError::CSeqMethod,
            ),
            (
                "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 INVITE\r\nContent-Length: 50\r\n\r\nshort",
                ParseError::ContentLength,
            ),
            (
                "INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 INVITE\r\nContent-Length: -3\r\n\r\n",
                ParseError::ContentLength,
            ),
            (
                "INVITE not a uri SIP/2.0\r\n\r\n",
                ParseError::StartLine,
            ),
        ];
        for (text, err) in cases {
            assert_eq!(parse(text.as_bytes()).unwrap_err(), *err, "{text:?}");
        }
    }

    #[test]
    fn ambiguous_messages_are_refused() {
        let base = "OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: 1\r\nCSeq: 1 OPTIONS\r\n";
        let two_lengths = format!("{base}Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(
            parse(two_lengths.as_bytes()),
            Err(ParseError::ContentLength)
        );
        let two_to = format!("{base}To: <sip:c@d>\r\n\r\n");
        assert_eq!(parse(two_to.as_bytes()), Err(ParseError::Header("To")));
        let open_quote = base.replace("From: <sip:a@b>;tag=1", "From: \"Alice <sip:a@b>;tag=1");
        assert_eq!(
            parse(open_quote.as_bytes()),
            Err(ParseError::Header("From"))
        );
        assert!(parse(format!("{base}\r\n").as_bytes()).is_ok());
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678u32;
        let base = INVITE.as_bytes();
        for _ in 0..5000 {
            let mut v = base.to_vec();
            for _ in 0..4 {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let i = (seed as usize >> 4) % v.len();
                v[i] = (seed >> 20) as u8;
            }
            let _ = parse(&v);
        }
    }

    #[test]
    fn header_params_and_uris() {
        assert_eq!(
            header_param("\"A;tag=no\" <sip:a@b;tag=no>;tag=yes", "tag"),
            Some("yes")
        );
        assert_eq!(header_param("sip:a@b;tag=t1", "tag"), Some("t1"));
        let u = SipUri::parse("sip:agent@127.0.0.1:5080;transport=tcp").unwrap();
        assert_eq!(u.port, Some(5080));
        assert_eq!(u.transport.as_deref(), Some("tcp"));
        assert_eq!(u.user.as_deref(), Some("agent"));
        assert!(SipUri::parse("http://x").is_err());
        assert_eq!(
            SipUri::parse("tel:+1-555-1234;phone-context=x")
                .unwrap()
                .user
                .as_deref(),
            Some("+1-555-1234")
        );
    }
}
