#!/usr/bin/env python3
"""Raw-UDP user agents for e2e_late_offer.rs.

Mode `routed` plays both legs of a call through the edge: leg A (the caller)
and leg B (the route's destination, whose SIP socket it binds first and
prints as `B_PORT <port>`; then it reads `<edge sip port> <token>` on stdin).
  1. A sends an INVITE without SDP (late offer); B must get it without SDP.
  2. B offers in its 200; A must get an offer naming the edge, answers in its
     ACK; B must get an ACK whose SDP answer names the edge.
  3. RTP both ways must arrive from the edge's ports, never from the peer's.
  4. B sends a re-INVITE with a new offer (a new RTP socket); A answers in its
     200; B gets the answer rewritten by the edge and ACKs; RTP must flow on
     the new edge ports, and the old A-side edge port must be closed.
  5. A hangs up.
Mode `srtp` is step 1-3 of `routed` with RTP/SAVP on both legs (the route
is `srtp`; leg A is offered the profile leg B offered): B offers SDES keys,
A answers with its own, each leg sees only the edge's keys, and packets are
protected and checked with libsrtp (pylibsrtp), independent of the edge's
SRTP, payloads byte-identical both ways.
Mode `echo <token> <edge sip port>` plays leg A only, against the built-in
echo destination: a late-offer INVITE, the echo's offer anchored by the edge,
A's answer in the ACK, RTP echoed back through the edge's port.

Prints one line `RESULT {...json...}`; exits 1 with `FAIL <reason>` on any
protocol failure (the test asserts on the numbers)."""
import base64
import json
import os
import re
import socket
import struct
import sys

try:
    import pylibsrtp
    from pylibsrtp import Policy, Session
except ImportError:  # only the srtp mode needs it; it fails loudly there
    pylibsrtp = None

LO = "127.0.0.1"
TIMEOUT = 5.0
# Packets flows() did not get back as expected: [seq, why], for the report.
MISSED = []


def fail(why):
    print("FAIL", why, flush=True)
    sys.exit(1)


def udp(timeout=TIMEOUT):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((LO, 0))
    s.settimeout(timeout)
    return s


def port(s):
    return s.getsockname()[1]


def sdp(p, ver, tag):
    return (f"v=0\r\no={tag} 1 {ver} IN IP4 {LO}\r\ns=-\r\nc=IN IP4 {LO}\r\nt=0 0\r\n"
            f"m=audio {p} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n")


class Msg:
    def __init__(self, data, src):
        text = data.decode(errors="replace")
        head, _, self.body = text.partition("\r\n\r\n")
        lines = head.split("\r\n")
        self.first = lines[0]
        self.headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.append((name.strip(), value.strip()))
        self.src = src

    def h(self, name):
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def all(self, name):
        return [v for n, v in self.headers if n.lower() == name.lower()]

    @property
    def code(self):
        return int(self.first.split()[1]) if self.first.startswith("SIP/2.0") else None

    @property
    def method(self):
        return None if self.first.startswith("SIP/2.0") else self.first.split()[0]

    def media(self):
        ip = re.search(r"c=IN IP4 (\S+)", self.body)
        m = re.search(r"m=audio (\d+) (\S+)", self.body)
        if not ip or not m:
            return None
        return ip.group(1), int(m.group(1))


def recv(sock, want, what):
    """Next message on `sock` for which want(msg) holds (others are skipped)."""
    while True:
        try:
            data, src = sock.recvfrom(65535)
        except socket.timeout:
            fail(f"timed out waiting for {what}")
        m = Msg(data, src)
        if want(m):
            return m


def final(sock, branch, what):
    return recv(sock, lambda m: m.code is not None and m.code >= 200 and branch in (m.h("Via") or ""), what)


def request(sock, method, what):
    return recv(sock, lambda m: m.method == method, what)


def send(sock, dest, first, headers, body=""):
    text = first + "\r\n"
    for n, v in headers:
        text += f"{n}: {v}\r\n"
    if body:
        text += "Content-Type: application/sdp\r\n"
    text += f"Content-Length: {len(body.encode())}\r\n\r\n{body}"
    sock.sendto(text.encode(), dest)


def respond(sock, req, code, reason, to_tag=None, contact=None, body=""):
    headers = [("Via", v) for v in req.all("Via")]
    to = req.h("To")
    if to_tag and "tag=" not in to:
        to += f";tag={to_tag}"
    headers += [("From", req.h("From")), ("To", to), ("Call-ID", req.h("Call-ID")), ("CSeq", req.h("CSeq"))]
    if contact:
        headers.append(("Contact", contact))
    send(sock, req.src, f"SIP/2.0 {code} {reason}", headers, body)


def uri_of(contact):
    m = re.search(r"<([^>]+)>", contact)
    return m.group(1) if m else contact.split(";")[0]


def rtp(seq):
    return struct.pack("!BBHII", 0x80, 0, seq, seq * 160, 0x5EED) + bytes([seq & 0xFF]) * 160


def flows(src, dest_port, dst, expect_from, n=5, seq0=0):
    """Sends n packets from `src` to the edge's `dest_port`; counts those that
    reach `dst` intact and from the edge's `expect_from` port."""
    got = 0
    for i in range(n):
        pkt = rtp(seq0 + i)
        src.sendto(pkt, (LO, dest_port))
        try:
            while True:
                back, frm = dst.recvfrom(2048)
                if back[12:] == pkt[12:]:
                    break
            if frm == (LO, expect_from):
                got += 1
            else:
                MISSED.append([seq0 + i, f"from {frm[1]}"])
        except socket.timeout:
            MISSED.append([seq0 + i, "lost"])
    return got


def routed():
    b_sip = udp()
    print(f"B_PORT {port(b_sip)}", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 2:
        fail(f"expected '<edge port> <token>' on stdin, got {line}")
    edge = (LO, int(line[0]))
    tok = line[1]
    a_sip, ra, rb = udp(), udp(), udp()
    lp = port(a_sip)
    res = {}

    # 1. A: INVITE without SDP.
    call_id = f"late-{lp}"
    a_from = f"<sip:200@{LO}>;tag=ua"
    send(a_sip, edge, f"INVITE sip:14155550100@{LO} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKlo1;rport"), ("From", a_from),
          ("To", f"<sip:14155550100@{LO}>"), ("Call-ID", call_id), ("CSeq", "1 INVITE"),
          ("Contact", f"<sip:ua@{LO}:{lp}>"), ("Authorization", f"Bearer {tok}")])
    inv_b = request(b_sip, "INVITE", "the INVITE on leg B")
    res["b_invite_body"] = len(inv_b.body)
    edge_b_sip = inv_b.src
    b_contact = f"<sip:service@{LO}:{port(b_sip)}>"
    respond(b_sip, inv_b, 180, "Ringing", "bt", b_contact)
    # 2. B offers in its 200.
    respond(b_sip, inv_b, 200, "OK", "bt", b_contact, sdp(port(rb), 1, "b"))
    ok = final(a_sip, "z9hG4bKlo1", "the 200 on leg A")
    if ok.code != 200:
        fail(f"INVITE got {ok.code}")
    offer_a = ok.media()
    if not offer_a:
        fail(f"no offer in the 200 to A: {ok.body!r}")
    res["offer_to_a"] = list(offer_a)
    a_to = ok.h("To")
    edge_contact_a = uri_of(ok.h("Contact"))
    send(a_sip, edge, f"ACK {edge_contact_a} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKlo2;rport"), ("From", a_from), ("To", a_to),
          ("Call-ID", call_id), ("CSeq", "1 ACK")], sdp(port(ra), 1, "a"))
    ack_b = request(b_sip, "ACK", "the ACK on leg B")
    answer_b = ack_b.media()
    if not answer_b:
        fail(f"no answer in B's ACK: {ack_b.body!r}")
    res["answer_to_b"] = list(answer_b)
    ea, eb = offer_a[1], answer_b[1]
    res["peer_ports_leaked"] = int(ea == port(rb) or eb == port(ra))
    # 3. RTP both ways through the edge.
    res["a_to_b"] = flows(ra, ea, rb, eb, seq0=0)
    res["b_to_a"] = flows(rb, eb, ra, ea, seq0=100)

    # 4. Leg B re-offers: a new RTP socket.
    rb2 = udp()
    b_from = inv_b.h("To") + ("" if "tag=" in inv_b.h("To") else ";tag=bt")
    b_to = inv_b.h("From")
    edge_contact_b = uri_of(inv_b.h("Contact"))
    bp = port(b_sip)
    send(b_sip, edge_b_sip, f"INVITE {edge_contact_b} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{bp};branch=z9hG4bKlo3;rport"), ("From", b_from), ("To", b_to),
          ("Call-ID", inv_b.h("Call-ID")), ("CSeq", "1 INVITE"), ("Contact", b_contact)],
         sdp(port(rb2), 2, "b"))
    reinv_a = request(a_sip, "INVITE", "the re-INVITE on leg A")
    offer_a2 = reinv_a.media()
    if not offer_a2:
        fail(f"no offer in the re-INVITE to A: {reinv_a.body!r}")
    res["reoffer_to_a"] = list(offer_a2)
    respond(a_sip, reinv_a, 200, "OK", None, f"<sip:ua@{LO}:{lp}>", sdp(port(ra), 2, "a"))
    ok_b = final(b_sip, "z9hG4bKlo3", "the 200 to B's re-INVITE")
    if ok_b.code != 200:
        fail(f"B's re-INVITE got {ok_b.code}")
    answer_b2 = ok_b.media()
    if not answer_b2:
        fail(f"no answer in the 200 to B: {ok_b.body!r}")
    res["reanswer_to_b"] = list(answer_b2)
    send(b_sip, edge_b_sip, f"ACK {edge_contact_b} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{bp};branch=z9hG4bKlo4;rport"), ("From", b_from), ("To", ok_b.h("To")),
          ("Call-ID", inv_b.h("Call-ID")), ("CSeq", "1 ACK")])
    request(a_sip, "ACK", "the ACK of the re-INVITE on leg A")
    ea2, eb2 = offer_a2[1], answer_b2[1]
    res["peer_ports_leaked"] += int(ea2 == port(rb2) or eb2 == port(ra))
    res["re_a_to_b"] = flows(ra, ea2, rb2, eb2, seq0=200)
    res["re_b_to_a"] = flows(rb2, eb2, ra, ea2, seq0=300)
    # The old A-side port no longer relays anything, to either B socket
    # (watched for a second each: this is the one wait that passes by
    # timing out).
    old = 0
    for i in range(3):
        ra.sendto(rtp(400 + i), (LO, ea))
    for name, s in (("rb", rb), ("rb2", rb2)):
        s.settimeout(1.0)
        try:
            while True:
                d, frm = s.recvfrom(2048)
                res.setdefault("old_detail", []).append([name, frm[1], d[2:4].hex(), len(d)])
                old += 1
        except socket.timeout:
            pass
    res["old_path_after"] = old
    res["missed"] = MISSED

    # 5. A hangs up.
    send(a_sip, edge, f"BYE {edge_contact_a} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKlo5;rport"), ("From", a_from), ("To", a_to),
          ("Call-ID", call_id), ("CSeq", "2 BYE")])
    bye_b = request(b_sip, "BYE", "the BYE on leg B")
    respond(b_sip, bye_b, 200, "OK")
    res["bye"] = final(a_sip, "z9hG4bKlo5", "the 200 to A's BYE").code
    print("RESULT " + json.dumps(res), flush=True)


def savp(p, ver, tag, key):
    b64 = base64.b64encode(key).decode()
    return (f"v=0\r\no={tag} 1 {ver} IN IP4 {LO}\r\ns=-\r\nc=IN IP4 {LO}\r\nt=0 0\r\n"
            f"m=audio {p} RTP/SAVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
            f"a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{b64}\r\na=sendrecv\r\n")


def crypto_80(body):
    """(tag, key) of the first AES_CM_128_HMAC_SHA1_80 a=crypto in `body`."""
    for tag, key in re.findall(r"^a=crypto:(\d+) AES_CM_128_HMAC_SHA1_80 inline:([A-Za-z0-9+/=]+)", body, re.M):
        return int(tag), base64.b64decode(key)[:30]
    return None


def srtp_flows(tx, src, dest_port, rx, dst, expect_from, n=5, seq0=0):
    """Like flows(), with SRTP: `tx` protects, `rx` (libsrtp, the receiver's
    view of the edge's key) unprotects; counts intact payloads from the edge."""
    got = 0
    for i in range(n):
        plain = rtp(seq0 + i)
        src.sendto(tx.protect(plain), (LO, dest_port))
        try:
            wire, frm = dst.recvfrom(2048)
            back = rx.unprotect(wire)
            if back[12:] == plain[12:] and frm == (LO, expect_from):
                got += 1
        except (socket.timeout, pylibsrtp.Error):
            pass
    return got


def routed_srtp():
    if pylibsrtp is None:
        fail("pylibsrtp missing (pip install pylibsrtp)")
    b_sip = udp()
    print(f"B_PORT {port(b_sip)}", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 2:
        fail(f"expected '<edge port> <token>' on stdin, got {line}")
    edge, tok = (LO, int(line[0])), line[1]
    a_sip, ra, rb = udp(), udp(), udp()
    lp = port(a_sip)
    key_a, key_b = os.urandom(30), os.urandom(30)
    res = {}
    call_id = f"late-srtp-{lp}"
    a_from = f"<sip:200@{LO}>;tag=ua"
    send(a_sip, edge, f"INVITE sip:14155550100@{LO} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKls1;rport"), ("From", a_from),
          ("To", f"<sip:14155550100@{LO}>"), ("Call-ID", call_id), ("CSeq", "1 INVITE"),
          ("Contact", f"<sip:ua@{LO}:{lp}>"), ("Authorization", f"Bearer {tok}")])
    inv_b = request(b_sip, "INVITE", "the INVITE on leg B")
    res["b_invite_body"] = len(inv_b.body)
    b_contact = f"<sip:service@{LO}:{port(b_sip)}>"
    respond(b_sip, inv_b, 200, "OK", "bt", b_contact, savp(port(rb), 1, "b", key_b))
    ok = final(a_sip, "z9hG4bKls1", "the 200 on leg A")
    if ok.code != 200:
        fail(f"INVITE got {ok.code}: {ok.body!r}")
    offer_a, edge_key_a = ok.media(), crypto_80(ok.body)
    if not offer_a or not edge_key_a:
        fail(f"no SRTP offer in the 200 to A: {ok.body!r}")
    res["offer_to_a"] = list(offer_a)
    res["offer_to_a_savp"] = int("RTP/SAVP" in ok.body)
    res["b_key_leaked"] = int(base64.b64encode(key_b).decode()[:20] in ok.body)
    a_to = ok.h("To")
    contact = uri_of(ok.h("Contact"))
    send(a_sip, edge, f"ACK {contact} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKls2;rport"), ("From", a_from), ("To", a_to),
          ("Call-ID", call_id), ("CSeq", "1 ACK")],
         savp(port(ra), 1, "a", key_a).replace("a=crypto:1 ", f"a=crypto:{edge_key_a[0]} "))
    ack_b = request(b_sip, "ACK", "the ACK on leg B")
    answer_b, edge_key_b = ack_b.media(), crypto_80(ack_b.body)
    if not answer_b or not edge_key_b:
        fail(f"no SRTP answer in B's ACK: {ack_b.body!r}")
    res["answer_to_b"] = list(answer_b)
    res["a_key_leaked"] = int(base64.b64encode(key_a).decode()[:20] in ack_b.body)
    prof = Policy.SRTP_PROFILE_AES128_CM_SHA1_80
    tx_a = Session(Policy(key=key_a, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=prof))
    rx_a = Session(Policy(key=edge_key_a[1], ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=prof))
    tx_b = Session(Policy(key=key_b, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=prof))
    rx_b = Session(Policy(key=edge_key_b[1], ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=prof))
    ea, eb = offer_a[1], answer_b[1]
    res["a_to_b"] = srtp_flows(tx_a, ra, ea, rx_b, rb, eb, seq0=0)
    res["b_to_a"] = srtp_flows(tx_b, rb, eb, rx_a, ra, ea, seq0=100)
    send(a_sip, edge, f"BYE {contact} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKls3;rport"), ("From", a_from), ("To", a_to),
          ("Call-ID", call_id), ("CSeq", "2 BYE")])
    bye_b = request(b_sip, "BYE", "the BYE on leg B")
    respond(b_sip, bye_b, 200, "OK")
    res["bye"] = final(a_sip, "z9hG4bKls3", "the 200 to A's BYE").code
    print("RESULT " + json.dumps(res), flush=True)


def echo(tok, edge_port):
    edge = (LO, edge_port)
    a_sip, ra = udp(), udp()
    lp = port(a_sip)
    res = {}
    call_id = f"late-echo-{lp}"
    a_from = f"<sip:200@{LO}>;tag=ua"
    send(a_sip, edge, f"INVITE sip:14155550100@{LO} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKle1;rport"), ("From", a_from),
          ("To", f"<sip:14155550100@{LO}>"), ("Call-ID", call_id), ("CSeq", "1 INVITE"),
          ("Contact", f"<sip:ua@{LO}:{lp}>"), ("Authorization", f"Bearer {tok}")])
    ok = final(a_sip, "z9hG4bKle1", "the 200 on leg A")
    if ok.code != 200:
        fail(f"INVITE got {ok.code}")
    offer = ok.media()
    if not offer:
        fail(f"no offer in the 200 to A: {ok.body!r}")
    res["offer_to_a"] = list(offer)
    a_to = ok.h("To")
    contact = uri_of(ok.h("Contact"))
    send(a_sip, edge, f"ACK {contact} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKle2;rport"), ("From", a_from), ("To", a_to),
          ("Call-ID", call_id), ("CSeq", "1 ACK")], sdp(port(ra), 1, "a"))
    # The echo returns each packet; it comes back from the edge's port.
    res["echoed"] = flows(ra, offer[1], ra, offer[1], n=10)
    res["missed"] = MISSED
    send(a_sip, edge, f"BYE {contact} SIP/2.0",
         [("Via", f"SIP/2.0/UDP {LO}:{lp};branch=z9hG4bKle3;rport"), ("From", a_from), ("To", a_to),
          ("Call-ID", call_id), ("CSeq", "2 BYE")])
    res["bye"] = final(a_sip, "z9hG4bKle3", "the 200 to A's BYE").code
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["routed"]:
        routed()
    elif sys.argv[1:2] == ["srtp"]:
        routed_srtp()
    elif sys.argv[1:2] == ["echo"] and len(sys.argv) == 4:
        echo(sys.argv[2], int(sys.argv[3]))
    else:
        fail("usage: late_offer_ua.py routed | echo TOKEN EDGE_PORT")
