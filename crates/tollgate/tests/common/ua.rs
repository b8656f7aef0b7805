//! SIP user agents: [`SipMsg`] parsing, [`Req`], [`UdpUa`], [`TcpUa`],
//! [`MiniUas`] (a scriptable leg B), response assertions.

use super::*;

// ---------------------------------------------------------------------------
// SIP messages
// ---------------------------------------------------------------------------

fn expand_compact(name: &str) -> String {
    let n = name.trim().to_ascii_lowercase();
    match n.as_str() {
        "i" => "call-id",
        "m" => "contact",
        "e" => "content-encoding",
        "l" => "content-length",
        "c" => "content-type",
        "f" => "from",
        "s" => "subject",
        "k" => "supported",
        "t" => "to",
        "v" => "via",
        "o" => "event",
        "r" => "refer-to",
        "u" => "allow-events",
        "b" => "referred-by",
        "x" => "session-expires",
        _ => return n,
    }
    .to_string()
}

#[derive(Clone, Debug)]
pub struct SipMsg {
    pub raw: Vec<u8>,
    pub start: String,
    /// (lowercased, compact forms expanded, value trimmed); one entry per header line.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl SipMsg {
    pub fn parse(raw: &[u8]) -> Option<SipMsg> {
        let (head_end, sep) = find(raw, b"\r\n\r\n")
            .map(|p| (p, 4))
            .or_else(|| find(raw, b"\n\n").map(|p| (p, 2)))?;
        let head = String::from_utf8_lossy(&raw[..head_end]).replace("\r\n", "\n");
        let mut lines: Vec<String> = vec![];
        for l in head.split('\n') {
            if (l.starts_with(' ') || l.starts_with('\t')) && !lines.is_empty() {
                let last = lines.last_mut().unwrap();
                last.push(' ');
                last.push_str(l.trim());
            } else {
                lines.push(l.to_string());
            }
        }
        let start = lines.first()?.trim_end().to_string();
        let mut headers = vec![];
        for l in &lines[1..] {
            if let Some((n, v)) = l.split_once(':') {
                headers.push((expand_compact(n), v.trim().to_string()));
            }
        }
        let body = raw[head_end + sep..].to_vec();
        Some(SipMsg {
            raw: raw.to_vec(),
            start,
            headers,
            body,
        })
    }
    pub fn is_response(&self) -> bool {
        self.start.starts_with("SIP/2.0 ")
    }
    pub fn code(&self) -> Option<u16> {
        if !self.is_response() {
            return None;
        }
        self.start.split_whitespace().nth(1)?.parse().ok()
    }
    pub fn method(&self) -> Option<&str> {
        if self.is_response() {
            None
        } else {
            self.start.split_whitespace().next()
        }
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        let n = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
    }
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        let n = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == n)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn call_id(&self) -> Option<&str> {
        self.header("call-id")
    }
    pub fn cseq(&self) -> Option<(u32, String)> {
        let v = self.header("cseq")?;
        let mut it = v.split_whitespace();
        Some((it.next()?.parse().ok()?, it.next()?.to_string()))
    }
    pub fn top_via(&self) -> Option<&str> {
        self.header("via")
            .map(|v| v.split(',').next().unwrap().trim())
    }
    pub fn via_branch(&self) -> Option<String> {
        param(self.top_via()?, "branch")
    }
    pub fn to_tag(&self) -> Option<String> {
        param(self.header("to")?, "tag")
    }
    pub fn from_tag(&self) -> Option<String> {
        param(self.header("from")?, "tag")
    }
    /// URI inside the Contact header (`<...>` stripped).
    pub fn contact_uri(&self) -> Option<String> {
        let c = self.header("contact")?;
        Some(match (c.find('<'), c.find('>')) {
            (Some(a), Some(b)) if b > a => c[a + 1..b].to_string(),
            _ => c.split(';').next().unwrap().trim().to_string(),
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.raw).into_owned()
    }
    /// Request-URI (requests only).
    pub fn ruri(&self) -> Option<&str> {
        if self.is_response() {
            None
        } else {
            self.start.split_whitespace().nth(1)
        }
    }
    /// User part of the URI in a name-addr / URI header value.
    pub fn uri_user(v: &str) -> Option<String> {
        let u = match (v.find('<'), v.find('>')) {
            (Some(a), Some(b)) if b > a => &v[a + 1..b],
            _ => v,
        };
        let rest = u.split_once(':')?.1;
        let (user, _) = rest.split_once('@')?;
        Some(user.split(';').next().unwrap().to_string())
    }
}

/// `;name=value` parameter of a header value (case-insensitive name).
pub fn param(v: &str, name: &str) -> Option<String> {
    for p in v.split(';').skip(1) {
        let (k, val) = p.split_once('=').unwrap_or((p, ""));
        if k.trim().eq_ignore_ascii_case(name) {
            return Some(val.trim().trim_matches('"').to_string());
        }
    }
    None
}

pub fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    if n.is_empty() || h.len() < n.len() {
        return None;
    }
    h.windows(n.len()).position(|w| w == n)
}

/// Parse an auth header value `Scheme k=v, k="v", ...` -> (scheme, params lowercased keys).
pub fn parse_challenge(v: &str) -> (String, HashMap<String, String>) {
    let v = v.trim();
    let (scheme, rest) = v.split_once(|c: char| c.is_whitespace()).unwrap_or((v, ""));
    let mut m = HashMap::new();
    let b = rest.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i].is_ascii_whitespace()) {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let k = rest[ks..i].trim().to_ascii_lowercase();
        let mut val = String::new();
        if i < b.len() && b[i] == b'=' {
            i += 1;
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if i < b.len() && b[i] == b'"' {
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\\' && i + 1 < b.len() {
                        i += 1;
                    }
                    val.push(b[i] as char);
                    i += 1;
                }
                i += 1;
            } else {
                let vs = i;
                while i < b.len() && b[i] != b',' {
                    i += 1;
                }
                val = rest[vs..i].trim().to_string();
            }
        }
        if !k.is_empty() {
            m.insert(k, val);
        }
    }
    (scheme.to_string(), m)
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

pub const SDP_OFFER: &str = "v=0\r\no=tgtest 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 49170 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub ruri: String,
    pub transport: &'static str,
    pub branch: String,
    pub from: String,
    pub to: String,
    pub call_id: String,
    pub cseq: u32,
    pub cseq_method: String,
    pub contact: bool,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
}

impl Req {
    pub fn new(method: &str, ruri: &str, from_user: &str, to: &str) -> Req {
        Req {
            method: method.into(),
            ruri: ruri.into(),
            transport: "UDP",
            branch: unique("z9hG4bK-tg"),
            from: format!("<sip:{from_user}@127.0.0.1>;tag={}", unique("ft")),
            to: to.into(),
            call_id: unique("call-") + "@tgtest",
            cseq: 1,
            cseq_method: method.into(),
            contact: method == "INVITE",
            headers: vec![],
            body: vec![],
            content_type: None,
        }
    }
    /// INVITE sip:TO_USER@EDGE with an SDP offer, From user FROM_USER.
    pub fn invite(edge: SocketAddr, to_user: &str, from_user: &str) -> Req {
        let mut r = Req::new(
            "INVITE",
            &format!("sip:{to_user}@{edge}"),
            from_user,
            &format!("<sip:{to_user}@{edge}>"),
        );
        r.body = SDP_OFFER.as_bytes().to_vec();
        r.content_type = Some("application/sdp".into());
        r
    }
    pub fn options(edge: SocketAddr) -> Req {
        Req::new(
            "OPTIONS",
            &format!("sip:{edge}"),
            "probe",
            &format!("<sip:{edge}>"),
        )
    }
    pub fn tcp(mut self) -> Self {
        self.transport = "TCP";
        self
    }
    pub fn header(mut self, n: &str, v: &str) -> Self {
        self.headers.push((n.into(), v.into()));
        self
    }
    pub fn bearer(self, token: &str) -> Self {
        self.header("Authorization", &format!("Bearer {token}"))
    }
    pub fn render(&self, local: SocketAddr) -> Vec<u8> {
        let mut s = format!(
            "{} {} SIP/2.0\r\nVia: SIP/2.0/{} {};branch={};rport\r\nMax-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {} {}\r\n",
            self.method, self.ruri, self.transport, local, self.branch, self.from, self.to, self.call_id, self.cseq, self.cseq_method
        );
        if self.contact {
            s.push_str(&format!(
                "Contact: <sip:tgtest@{local};transport={}>\r\n",
                self.transport.to_ascii_lowercase()
            ));
        }
        for (n, v) in &self.headers {
            s.push_str(&format!("{n}: {v}\r\n"));
        }
        if let Some(ct) = &self.content_type {
            s.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        s.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut b = s.into_bytes();
        b.extend_from_slice(&self.body);
        b
    }
    /// ACK for a non-2xx final response (same branch, RFC 3261 17.1.1.3).
    pub fn ack_non2xx(&self, resp: &SipMsg) -> Req {
        let mut a = self.clone();
        a.method = "ACK".into();
        a.cseq_method = "ACK".into();
        a.to = resp.header("to").unwrap_or(&self.to).to_string();
        a.headers.retain(|(n, _)| n.eq_ignore_ascii_case("Route"));
        a.body.clear();
        a.content_type = None;
        a.contact = false;
        a
    }
    /// A new in-dialog request after a 2xx (new branch, To tag, R-URI = Contact).
    pub fn in_dialog(&self, resp: &SipMsg, method: &str, cseq: u32) -> Req {
        let mut a = self.clone();
        a.method = method.into();
        a.cseq_method = method.into();
        a.cseq = cseq;
        a.branch = unique("z9hG4bK-tg");
        a.ruri = resp.contact_uri().unwrap_or_else(|| self.ruri.clone());
        a.to = resp.header("to").unwrap_or(&self.to).to_string();
        a.headers.clear();
        a.body.clear();
        a.content_type = None;
        a.contact = false;
        a
    }
    pub fn matches(&self, m: &SipMsg) -> bool {
        m.is_response()
            && m.call_id() == Some(self.call_id.as_str())
            && m.cseq()
                .is_some_and(|(n, meth)| n == self.cseq && meth == self.cseq_method)
            && m.via_branch().as_deref() == Some(self.branch.as_str())
    }
}

/// Response to a received request (copies Via/From/To/Call-ID/CSeq).
pub fn make_response(
    req: &SipMsg,
    code: u16,
    reason: &str,
    to_tag: &str,
    extra: &str,
    body: &str,
) -> Vec<u8> {
    let mut s = format!("SIP/2.0 {code} {reason}\r\n");
    for v in req.headers_all("via") {
        s.push_str(&format!("Via: {v}\r\n"));
    }
    s.push_str(&format!("From: {}\r\n", req.header("from").unwrap_or("")));
    let to = req.header("to").unwrap_or("");
    if param(to, "tag").is_none() && code > 100 {
        s.push_str(&format!("To: {to};tag={to_tag}\r\n"));
    } else {
        s.push_str(&format!("To: {to}\r\n"));
    }
    s.push_str(&format!(
        "Call-ID: {}\r\nCSeq: {}\r\n",
        req.call_id().unwrap_or(""),
        req.header("cseq").unwrap_or("")
    ));
    s.push_str(extra);
    if !body.is_empty() {
        s.push_str("Content-Type: application/sdp\r\n");
    }
    s.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.into_bytes()
}

// ---------------------------------------------------------------------------
// UDP user agent
// ---------------------------------------------------------------------------

pub struct Outcome {
    pub provisional: Vec<SipMsg>,
    pub fin: SipMsg,
}

pub struct UdpUa {
    pub sock: UdpSocket,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    stash: VecDeque<SipMsg>,
}

impl UdpUa {
    pub fn new(remote: SocketAddr) -> UdpUa {
        UdpUa::from_ip(remote, "127.0.0.1")
    }
    /// A UA sending from `ip` (on Linux every 127.0.0.0/8 address is a
    /// loopback source without setup: 127.0.0.2 is "another host").
    pub fn from_ip(remote: SocketAddr, ip: &str) -> UdpUa {
        let sock = UdpSocket::bind(format!("{ip}:0")).expect("bind a loopback source");
        let local = sock.local_addr().unwrap();
        UdpUa {
            sock,
            local,
            remote,
            stash: VecDeque::new(),
        }
    }
    pub fn send_raw(&self, b: &[u8]) {
        self.sock.send_to(b, self.remote).expect("udp send");
    }
    pub fn send(&self, r: &Req) {
        self.send_raw(&r.render(self.local));
    }
    fn recv_one(&self, timeout: Duration) -> Option<SipMsg> {
        let mut buf = vec![0u8; 70000];
        self.sock
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .unwrap();
        match self.sock.recv_from(&mut buf) {
            Ok((n, _)) => SipMsg::parse(&buf[..n]).or_else(|| {
                Some(SipMsg {
                    raw: buf[..n].to_vec(),
                    start: String::new(),
                    headers: vec![],
                    body: vec![],
                })
            }),
            Err(_) => None,
        }
    }
    /// Next message satisfying `pred` within `timeout`; others are stashed.
    pub fn recv_where(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&SipMsg) -> bool,
    ) -> Option<SipMsg> {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i);
        }
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let m = self.recv_one(left)?;
            if pred(&m) {
                return Some(m);
            }
            self.stash.push_back(m);
        }
    }
    pub fn recv_any(&mut self, timeout: Duration) -> Option<SipMsg> {
        self.recv_where(timeout, |_| true)
    }
    /// Client transaction: send (retransmitting per T1=500 ms doubling up to
    /// 4 s until a provisional/final arrives), return provisionals and the
    /// final. Non-2xx finals to INVITE are ACKed here.
    pub fn transact(&mut self, req: &Req, timeout: Duration) -> Option<Outcome> {
        let bytes = req.render(self.local);
        self.send_raw(&bytes);
        let end = Instant::now() + timeout;
        let mut rto = Duration::from_millis(500);
        let mut next_rt = Instant::now() + rto;
        let mut got_any = false;
        let mut provisional = vec![];
        loop {
            let now = Instant::now();
            if now >= end {
                return None;
            }
            let wait = if got_any {
                end - now
            } else {
                next_rt.saturating_duration_since(now).min(end - now)
            };
            match self.recv_where(wait, |m| req.matches(m)) {
                Some(m) => {
                    got_any = true;
                    if m.code().is_some_and(|c| c < 200) {
                        provisional.push(m);
                        continue;
                    }
                    if req.method == "INVITE" && m.code().is_some_and(|c| c >= 300) {
                        self.send(&req.ack_non2xx(&m));
                    }
                    return Some(Outcome {
                        provisional,
                        fin: m,
                    });
                }
                None => {
                    if !got_any && Instant::now() >= next_rt {
                        self.send_raw(&bytes);
                        rto = (rto * 2).min(Duration::from_secs(4));
                        next_rt = Instant::now() + rto;
                    }
                }
            }
        }
    }
    /// Final response to `req` (panics with a clear message on timeout).
    pub fn call(&mut self, req: &Req) -> SipMsg {
        match self.transact(req, Duration::from_secs(10)) {
            Some(o) => o.fin,
            None => panic!(
                "no final response within 10 s to:\n{}",
                String::from_utf8_lossy(&req.render(self.local))
            ),
        }
    }
    /// OPTIONS to the edge; Some(code) of the final response.
    pub fn options_code(&mut self, timeout: Duration) -> Option<u16> {
        let r = Req::options(self.remote);
        self.transact(&r, timeout).and_then(|o| o.fin.code())
    }
    /// ACK a 2xx and BYE the dialog; returns the BYE's final code.
    pub fn ack_and_bye(&mut self, invite: &Req, ok: &SipMsg) -> Option<u16> {
        self.send(&invite.in_dialog(ok, "ACK", invite.cseq));
        let bye = invite.in_dialog(ok, "BYE", invite.cseq + 1);
        self.transact(&bye, Duration::from_secs(10))
            .and_then(|o| o.fin.code())
    }
}

// ---------------------------------------------------------------------------
// TCP user agent
// ---------------------------------------------------------------------------

pub enum TcpRead {
    Msg(SipMsg),
    Timeout,
    Closed,
}

pub struct TcpUa {
    pub stream: TcpStream,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    buf: Vec<u8>,
    closed: bool,
}

impl TcpUa {
    pub fn connect(remote: SocketAddr) -> TcpUa {
        let stream = TcpStream::connect_timeout(&remote, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("tcp connect {remote}: {e}"));
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap();
        TcpUa {
            stream,
            local,
            remote,
            buf: vec![],
            closed: false,
        }
    }
    /// Write; returns false if the peer has closed.
    pub fn send_raw(&mut self, b: &[u8]) -> bool {
        self.stream.write_all(b).is_ok()
    }
    pub fn send(&mut self, r: &Req) -> bool {
        let b = r.render(self.local);
        self.send_raw(&b)
    }
    fn take_frame(&mut self) -> Option<SipMsg> {
        // RFC 3261 7.5: CRLFs before a start line are ignored (also keep-alive pongs)
        let skip = self
            .buf
            .iter()
            .take_while(|b| **b == b'\r' || **b == b'\n')
            .count();
        self.buf.drain(..skip);
        let he = find(&self.buf, b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&self.buf[..he]).to_string();
        let mut cl = 0usize;
        for l in head.split("\r\n").skip(1) {
            if let Some((n, v)) = l.split_once(':') {
                if expand_compact(n) == "content-length" {
                    cl = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let total = he + 4 + cl;
        if self.buf.len() < total {
            return None;
        }
        let raw: Vec<u8> = self.buf.drain(..total).collect();
        SipMsg::parse(&raw)
    }
    pub fn read_msg(&mut self, timeout: Duration) -> TcpRead {
        let end = Instant::now() + timeout;
        loop {
            if let Some(m) = self.take_frame() {
                return TcpRead::Msg(m);
            }
            if self.closed {
                return TcpRead::Closed;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return TcpRead::Timeout;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp) {
                Ok(0) => self.closed = true,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return TcpRead::Timeout
                }
                Err(_) => self.closed = true,
            }
        }
    }
    /// Send and wait for the final response (no retransmission on TCP); ACKs non-2xx INVITE finals.
    pub fn transact(&mut self, req: &Req, timeout: Duration) -> Option<Outcome> {
        if !self.send(req) {
            return None;
        }
        let end = Instant::now() + timeout;
        let mut provisional = vec![];
        loop {
            match self.read_msg(end.saturating_duration_since(Instant::now())) {
                TcpRead::Msg(m) if req.matches(&m) => {
                    if m.code().is_some_and(|c| c < 200) {
                        provisional.push(m);
                        continue;
                    }
                    if req.method == "INVITE" && m.code().is_some_and(|c| c >= 300) {
                        let ack = req.ack_non2xx(&m);
                        self.send(&ack);
                    }
                    return Some(Outcome {
                        provisional,
                        fin: m,
                    });
                }
                TcpRead::Msg(_) => continue,
                _ => return None,
            }
        }
    }
    pub fn close(self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------
// A scriptable destination (leg B) over UDP
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UasMode {
    /// INVITE -> 486 Busy Here (proves a call got past authentication).
    Busy,
    /// INVITE -> 180, 200 (SDP); BYE -> 200.
    Answer,
    /// INVITE -> 180 and nothing more; CANCEL -> 200 + 487.
    Ring,
}

/// A destination UAS on 127.0.0.1:<ephemeral> that records every request.
pub struct MiniUas {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<SipMsg>>>,
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl MiniUas {
    pub fn start(mode: UasMode) -> MiniUas {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rx, st) = (received.clone(), stop.clone());
        let handle = thread::spawn(move || {
            let mut invites: HashMap<String, SipMsg> = HashMap::new();
            let mut buf = vec![0u8; 70000];
            while !st.load(Ordering::Relaxed) {
                let Ok((n, src)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                let Some(m) = SipMsg::parse(&buf[..n]) else {
                    continue;
                };
                if m.is_response() {
                    rx.lock().unwrap().push(m);
                    continue;
                }
                rx.lock().unwrap().push(m.clone());
                let tag = format!(
                    "uas{}",
                    m.call_id()
                        .map(|c| hex(&sha256(c.as_bytes()))[..8].to_string())
                        .unwrap_or_default()
                );
                let contact = format!("Contact: <sip:uas@{addr}>\r\n");
                let method = m.method().unwrap_or("").to_string();
                let send = |b: Vec<u8>| {
                    let _ = sock.send_to(&b, src);
                };
                match method.as_str() {
                    "INVITE" => match mode {
                        UasMode::Busy => send(make_response(&m, 486, "Busy Here", &tag, "", "")),
                        UasMode::Answer => {
                            send(make_response(&m, 180, "Ringing", &tag, &contact, ""));
                            let sdp = format!("v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio {} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n", addr.port() + 2);
                            send(make_response(&m, 200, "OK", &tag, &contact, &sdp));
                        }
                        UasMode::Ring => {
                            send(make_response(&m, 180, "Ringing", &tag, &contact, ""));
                            invites.insert(m.call_id().unwrap_or("").to_string(), m.clone());
                        }
                    },
                    "ACK" => {}
                    "CANCEL" => {
                        send(make_response(&m, 200, "OK", &tag, "", ""));
                        if let Some(inv) = invites.remove(m.call_id().unwrap_or("")) {
                            send(make_response(&inv, 487, "Request Terminated", &tag, "", ""));
                        }
                    }
                    _ => send(make_response(&m, 200, "OK", &tag, "", "")),
                }
            }
        });
        MiniUas {
            addr,
            received,
            stop,
            handle: Some(handle),
        }
    }
    pub fn route(&self) -> String {
        format!("sip:service@{}", self.addr)
    }
    pub fn requests(&self, method: &str) -> Vec<SipMsg> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|m| m.method() == Some(method))
            .cloned()
            .collect()
    }
    pub fn count(&self, method: &str) -> usize {
        self.requests(method).len()
    }
    /// Wait until at least `n` requests of `method` arrived.
    pub fn wait_for(&self, method: &str, n: usize, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.count(method) >= n {
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.count(method) >= n
    }
}

impl Drop for MiniUas {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Response assertions
// ---------------------------------------------------------------------------

pub fn www_auth(resp: &SipMsg) -> Vec<(String, HashMap<String, String>)> {
    resp.headers_all("www-authenticate")
        .iter()
        .map(|v| parse_challenge(v))
        .collect()
}

/// 401 with `WWW-Authenticate: Bearer realm="tollgate", error="invalid_token"`.
pub fn is_invalid_token(resp: &SipMsg) -> bool {
    resp.code() == Some(401)
        && www_auth(resp).iter().any(|(s, p)| {
            s.eq_ignore_ascii_case("Bearer")
                && p.get("realm").map(|r| r.as_str()) == Some(REALM)
                && p.get("error").map(|r| r.as_str()) == Some("invalid_token")
        })
}

pub fn assert_invalid_token(resp: &SipMsg, case: &str) {
    assert!(
        is_invalid_token(resp),
        "[{case}] expected 401 with WWW-Authenticate: Bearer realm=\"{REALM}\", error=\"invalid_token\"; got:\n{}",
        resp.text()
    );
}

/// The default no-credential challenge (SPEC §4): 401 with Digest
/// challenges only (realm and nonce), no Bearer or other scheme.
pub fn assert_digest_challenges(resp: &SipMsg) {
    let ch = www_auth(resp);
    let all_digest = ch.iter().all(|(s, p)| {
        s.eq_ignore_ascii_case("Digest")
            && p.get("realm").map(String::as_str) == Some(REALM)
            && p.get("nonce").is_some_and(|n| !n.is_empty())
    });
    assert!(
        resp.code() == Some(401) && !ch.is_empty() && all_digest,
        "expected 401 with only Digest realm=\"{REALM}\" nonce=... challenges, got:\n{}",
        resp.text()
    );
}

/// The no-credential challenge with `[sip] bearer_challenge = true`: 401
/// with a Bearer challenge (no error) and at least one Digest challenge,
/// same realm.
pub fn assert_both_challenges(resp: &SipMsg) {
    let ch = www_auth(resp);
    let bearer = ch.iter().any(|(s, p)| {
        s.eq_ignore_ascii_case("Bearer")
            && p.get("realm").map(String::as_str) == Some(REALM)
            && !p.contains_key("error")
    });
    let digest = ch.iter().any(|(s, p)| {
        s.eq_ignore_ascii_case("Digest")
            && p.get("realm").map(String::as_str) == Some(REALM)
            && p.get("nonce").is_some_and(|n| !n.is_empty())
    });
    assert!(
        resp.code() == Some(401) && ch.len() >= 2 && bearer && digest,
        "expected 401 with >=2 WWW-Authenticate (Bearer realm=\"{REALM}\" and Digest realm=\"{REALM}\" nonce=...), got:\n{}",
        resp.text()
    );
}
