#!/usr/bin/env python3
"""A SIP/TLS UAC for tests/e2e_tls.rs over Python's `ssl` module (OpenSSL),
an implementation independent of the edge's rustls.

Modes (all print `RESULT {json}` lines on stdout; exit 0 on success):

  calls     place one call per token (INVITE with SDP -> 200 -> ACK -> BYE ->
            200) over --conns TLS connections, calls on a connection one after
            the other; success when every call completed.
  probe     handshake, then one OPTIONS; reports whether the edge answered or
            refused the connection (`refused` with the OpenSSL reason). With
            TLS 1.3 a refused client certificate shows after the client's
            side of the handshake, so the probe waits for the first read.
  reload    call 1 up on connection 1 (INVITE/200/ACK), print the server
            certificate's fingerprint, wait for a `go` line on stdin, then
            open connection 2 (fingerprint printed; a call placed on it too)
            and end call 1 with BYE on connection 1.

Tokens come one per line from --tokens FILE."""
import argparse, base64, hashlib, json, os, socket, ssl, sys, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["calls", "probe", "reload"])
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--ca", required=True)
ap.add_argument("--cert")
ap.add_argument("--key")
ap.add_argument("--tokens")
ap.add_argument("--to", default="15551230000")
ap.add_argument("--from-user", default="tlsuac")
ap.add_argument("--conns", type=int, default=4)
ap.add_argument("--timeout", type=float, default=15.0)
ap.add_argument("--savp", action="store_true", help="offer RTP/SAVP with an SDES a=crypto")
args = ap.parse_args()
HOST = "127.0.0.1"


def result(**kw):
    print("RESULT " + json.dumps(kw), flush=True)


def context():
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.check_hostname = True  # the server certificate names IP 127.0.0.1
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    return ctx


class Conn:
    """One TLS connection with Content-Length framing."""

    def __init__(self):
        raw = socket.create_connection((HOST, args.port), timeout=args.timeout)
        self.s = context().wrap_socket(raw, server_hostname=HOST)
        self.s.settimeout(args.timeout)
        self.local = "%s:%d" % self.s.getsockname()[:2]
        self.buf = b""
        der = self.s.getpeercert(binary_form=True)
        self.fingerprint = hashlib.sha256(der).hexdigest()

    def send(self, text):
        self.s.sendall(text.encode())

    def recv_msg(self):
        while True:
            self.buf = self.buf.lstrip(b"\r\n")
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end >= 0:
                head = self.buf[:head_end].decode(errors="replace")
                cl = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() in ("content-length", "l"):
                        cl = int(value.strip())
                total = head_end + 4 + cl
                if len(self.buf) >= total:
                    msg = self.buf[:total].decode(errors="replace")
                    self.buf = self.buf[total:]
                    return msg
            chunk = self.s.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed by the edge")
            self.buf += chunk

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def header(msg, name):
    for line in msg.split("\r\n")[1:]:
        if not line:
            break
        n, _, v = line.partition(":")
        if n.strip().lower() == name.lower():
            return v.strip()
    return None


def status(msg):
    if not msg.startswith("SIP/2.0 "):
        return None
    return int(msg.split()[1])


def uri_of(name_addr):
    if "<" in name_addr:
        return name_addr[name_addr.index("<") + 1 : name_addr.index(">")]
    return name_addr.split(";")[0]


class Call:
    n = 0

    def __init__(self, conn, token):
        Call.n += 1
        self.c = conn
        self.token = token
        self.call_id = "tls-%d-%d-%s@test" % (os.getpid(), Call.n, os.urandom(4).hex())
        self.tag = os.urandom(4).hex()
        self.to_tag = None
        self.target = None
        self.cseq = 1

    def via(self):
        return "Via: SIP/2.0/TLS %s;branch=z9hG4bK%s;rport\r\n" % (self.c.local, os.urandom(6).hex())

    def common(self, method, cseq, to_tag=True):
        to = "<sip:%s@%s:%d>" % (args.to, HOST, args.port)
        if to_tag and self.to_tag:
            to += ";tag=" + self.to_tag
        return (
            self.via()
            + "Max-Forwards: 70\r\n"
            + "From: <sip:%s@%s>;tag=%s\r\n" % (args.from_user, HOST, self.tag)
            + "To: %s\r\n" % to
            + "Call-ID: %s\r\n" % self.call_id
            + "CSeq: %d %s\r\n" % (cseq, method)
            + "Contact: <sips:%s@%s>\r\n" % (args.from_user, self.c.local)
        )

    def final(self, method):
        """Responses until a final one for `method`; in-dialog requests from
        the edge are not expected here."""
        while True:
            m = self.c.recv_msg()
            code = status(m)
            if code is None:
                raise RuntimeError("unexpected request from the edge: " + m.split("\r\n")[0])
            cseq = header(m, "CSeq") or ""
            if header(m, "Call-ID") != self.call_id or not cseq.endswith(method):
                continue
            if code >= 200:
                return code, m

    def invite(self):
        proto = "RTP/SAVP" if args.savp else "RTP/AVP"
        sdp = (
            "v=0\r\no=tls 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            "m=audio 40000 %s 0\r\na=rtpmap:0 PCMU/8000\r\n" % proto
        )
        if args.savp:
            key = base64.b64encode(os.urandom(30)).decode()
            sdp += "a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:%s\r\n" % key
        req = (
            "INVITE sips:%s@%s:%d SIP/2.0\r\n" % (args.to, HOST, args.port)
            + self.common("INVITE", 1, to_tag=False)
            + "Authorization: Bearer %s\r\n" % self.token
            + "Content-Type: application/sdp\r\n"
            + "Content-Length: %d\r\n\r\n%s" % (len(sdp), sdp)
        )
        self.c.send(req)
        code, resp = self.final("INVITE")
        if code != 200:
            raise RuntimeError("INVITE got %d: %s" % (code, resp.split("\r\n")[0]))
        to = header(resp, "To") or ""
        self.to_tag = to.split("tag=")[1].split(";")[0] if "tag=" in to else None
        self.target = uri_of(header(resp, "Contact") or "")
        if not self.target:
            raise RuntimeError("200 without Contact")
        self.contact = self.target
        body = resp.split("\r\n\r\n", 1)[1]
        m = [l for l in body.split("\r\n") if l.startswith("m=audio ")]
        self.answer = "%s%s" % (
            m[0].split()[2] if m else "none",
            " crypto" if "\r\na=crypto:" in body else "",
        )
        ack = "ACK %s SIP/2.0\r\n" % self.target + self.common("ACK", 1) + "Content-Length: 0\r\n\r\n"
        self.c.send(ack)
        return resp

    def bye(self):
        self.cseq += 1
        req = "BYE %s SIP/2.0\r\n" % self.target + self.common("BYE", self.cseq) + "Content-Length: 0\r\n\r\n"
        self.c.send(req)
        code, _ = self.final("BYE")
        if code != 200:
            raise RuntimeError("BYE got %d" % code)


def tokens():
    with open(args.tokens) as f:
        return [l.strip() for l in f if l.strip()]


def mode_calls():
    toks = tokens()
    conns = max(1, min(args.conns, len(toks)))
    done, errors, contacts, answers = [0], [], set(), set()
    lock = threading.Lock()

    def worker(i):
        try:
            c = Conn()
        except Exception as e:  # noqa: BLE001 - report whatever failed
            with lock:
                errors.append("connect: %r" % e)
            return
        for tok in toks[i::conns]:
            try:
                call = Call(c, tok)
                call.invite()
                call.bye()
                with lock:
                    done[0] += 1
                    contacts.add(call.contact)
                    answers.add(call.answer)
            except Exception as e:  # noqa: BLE001
                with lock:
                    errors.append(repr(e))
                break
        c.close()

    t0 = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result(completed=done[0], calls=len(toks), connections=conns, errors=errors[:5],
           contacts=sorted(contacts), answers=sorted(answers), seconds=round(time.time() - t0, 2))
    sys.exit(0 if done[0] == len(toks) and not errors else 1)


def mode_probe():
    try:
        c = Conn()
        c.send(
            "OPTIONS sips:%s:%d SIP/2.0\r\n" % (HOST, args.port)
            + "Via: SIP/2.0/TLS %s;branch=z9hG4bKprobe%s\r\n" % (c.local, os.urandom(4).hex())
            + "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=p1\r\n"
            + "To: <sip:probe@127.0.0.1>\r\nCall-ID: probe-%s\r\nCSeq: 1 OPTIONS\r\n" % os.urandom(4).hex()
            + "Content-Length: 0\r\n\r\n"
        )
        m = c.recv_msg()
        result(refused=False, status=status(m))
        c.close()
    except socket.timeout:
        # No answer is not a refusal: the test must not pass on silence.
        result(refused=False, error="timeout")
    except (ssl.SSLError, ConnectionError, OSError) as e:
        result(refused=True, error="%s: %s" % (type(e).__name__, e))


def mode_reload():
    toks = tokens()
    c1 = Conn()
    call1 = Call(c1, toks[0])
    call1.invite()
    result(phase="up", fingerprint=c1.fingerprint)
    line = sys.stdin.readline()
    if line.strip() != "go":
        result(error="no go")
        sys.exit(1)
    # The test has replaced the files and reloaded; a new handshake now.
    c2 = Conn()
    call2 = Call(c2, toks[1])
    call2.invite()
    call2.bye()
    # The call made before the reload ends normally on its connection.
    call1.bye()
    result(phase="done", fingerprint_new=c2.fingerprint, fingerprint_old=c1.fingerprint)
    c1.close()
    c2.close()


{"calls": mode_calls, "probe": mode_probe, "reload": mode_reload}[args.mode]()
