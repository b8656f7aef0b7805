#!/usr/bin/env python3
"""A raw-UDP UA for e2e_reinvite.rs: places a call with a bearer token through
the edge to its built-in echo, checks RTP comes back, sends a re-INVITE with a
new offer (new local RTP port, a=sendrecv kept), checks the new answer still
anchors media at the edge and RTP flows on the new path, then hangs up.
Prints one line `RESULT {...json...}`; exits 1 with a reason on any failure."""
import json, re, socket, struct, sys

tok, port = sys.argv[1], int(sys.argv[2])
edge = ("127.0.0.1", port)
sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sip.bind(("127.0.0.1", 0)); sip.settimeout(5)
lp = sip.getsockname()[1]

def fail(why):
    print("FAIL", why); sys.exit(1)

def rtp_sock():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); s.settimeout(1); return s

def sdp(p, ver):
    return (f"v=0\r\no=- 1 {ver} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {p} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")

def final(branch):
    while True:
        d = sip.recv(65535).decode(errors="replace")
        if not d.startswith("SIP/2.0"):
            continue
        if branch not in d:
            continue
        code = int(d.split()[1])
        if code >= 200:
            return code, d

def media_of(resp):
    body = resp.split("\r\n\r\n", 1)[1]
    ip = re.search(r"c=IN IP4 (\S+)", body).group(1)
    p = int(re.search(r"m=audio (\d+)", body).group(1))
    return ip, p

def echo_check(s, dest, n=10, seq0=0):
    got = 0
    for i in range(n):
        pkt = struct.pack("!BBHII", 0x80, 0, seq0 + i, (seq0 + i) * 160, 0xBEEF) + bytes([i]) * 160
        s.sendto(pkt, dest)
        try:
            back, _ = s.recvfrom(2048)
            if back[12:] == pkt[12:]:
                got += 1
        except socket.timeout:
            pass
    return got

r1 = rtp_sock()
body = sdp(r1.getsockname()[1], 1)
hdr = (f"Via: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bKri1;rport\r\nFrom: <sip:200@127.0.0.1>;tag=ua\r\n"
       f"To: <sip:14155550100@127.0.0.1>\r\nCall-ID: reinvite-{lp}\r\nCSeq: 1 INVITE\r\nContact: <sip:ua@127.0.0.1:{lp}>\r\n")
sip.sendto((f"INVITE sip:14155550100@127.0.0.1 SIP/2.0\r\n{hdr}Authorization: Bearer {tok}\r\n"
            f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode(), edge)
code, ok = final("z9hG4bKri1")
if code != 200: fail(f"INVITE got {code}")
to = re.search(r"^To:.*$", ok, re.M).group(0)
m1 = media_of(ok)
def ack(branch, cseq):
    sip.sendto((f"ACK sip:tollgate@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{lp};branch={branch};rport\r\n"
                f"From: <sip:200@127.0.0.1>;tag=ua\r\n{to}\r\nCall-ID: reinvite-{lp}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n").encode(), edge)
ack("z9hG4bKri2", 1)
first = echo_check(r1, m1)

r2 = rtp_sock()
body = sdp(r2.getsockname()[1], 2)
sip.sendto((f"INVITE sip:tollgate@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bKri3;rport\r\n"
            f"From: <sip:200@127.0.0.1>;tag=ua\r\n{to}\r\nCall-ID: reinvite-{lp}\r\nCSeq: 2 INVITE\r\n"
            f"Contact: <sip:ua@127.0.0.1:{lp}>\r\nContent-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode(), edge)
code, ok2 = final("z9hG4bKri3")
if code != 200: fail(f"re-INVITE got {code}")
m2 = media_of(ok2)
ack("z9hG4bKri4", 2)
second = echo_check(r2, m2, seq0=100)
old_path = echo_check(r1, m1, n=3, seq0=200)

sip.sendto((f"BYE sip:tollgate@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bKri5;rport\r\n"
            f"From: <sip:200@127.0.0.1>;tag=ua\r\n{to}\r\nCall-ID: reinvite-{lp}\r\nCSeq: 3 BYE\r\nContent-Length: 0\r\n\r\n").encode(), edge)
bye, _ = final("z9hG4bKri5")
print("RESULT " + json.dumps({"first": first, "second": second, "old_path_after": old_path,
                              "m1": list(m1), "m2": list(m2), "bye": bye}))
