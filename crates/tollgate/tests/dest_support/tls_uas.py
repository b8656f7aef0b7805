#!/usr/bin/env python3
"""A SIP-over-TLS destination (leg B) for tests/e2e_destinations.rs, built on
Python's ssl module (OpenSSL): independent of the edge's rustls.

    tls_uas.py --cert server.pem --key server.key

Listens on 127.0.0.1:<ephemeral> (TLS over TCP). INVITE -> 200 OK with an
RTP/SAVP answer carrying our own a=crypto (the suite and tag of the offer's
first a=crypto; RTP/AVP when the offer has none); ACK ignored; BYE, OPTIONS
and others -> 200. Connections are kept open and reused by the peer.

Media: one RTP socket for every call; each SRTP packet is unprotected with
libsrtp (pylibsrtp) under the key the edge offered for the call it comes
from (by source address, the offer's c=/m=), and reported.

Stdout, one JSON object per line (flushed):
  {"ev":"ready","addr":"127.0.0.1:P"}
  {"ev":"conn","sni":NAME}                  (each TLS connection accepted)
  {"ev":"invite","call_id":..,"ruri":..,"contact":..,"crypto":BOOL,"savp":BOOL}
  {"ev":"bye","call_id":..}
  {"ev":"rtp","call_id":..,"seq":N,"payload":HEX}     (decrypted by libsrtp)
  {"ev":"srtp_error","error":..}
  {"ev":"tls_error","error":..}
"""
import argparse, base64, json, os, re, socket, ssl, struct, sys, threading

try:
    import pylibsrtp
    from pylibsrtp import Policy, Session
except ImportError as e:  # the test must fail loudly, never skip
    print(json.dumps({"ev": "error", "msg": f"pylibsrtp missing: {e}"}), flush=True)
    sys.exit(3)

PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    "AEAD_AES_128_GCM": Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
}
# (ip, port) of the edge's leg-B media -> (call-id, libsrtp session)
sessions = {}

lock = threading.Lock()


def emit(**kw):
    with lock:
        sys.stdout.write(json.dumps(kw) + "\n")
        sys.stdout.flush()


def header(head, name):
    for line in head.split("\r\n")[1:]:
        if ":" in line:
            n, v = line.split(":", 1)
            if n.strip().lower() == name.lower():
                return v.strip()
    return None


def headers_all(head, name):
    out = []
    for line in head.split("\r\n")[1:]:
        if ":" in line:
            n, v = line.split(":", 1)
            if n.strip().lower() == name.lower():
                out.append(v.strip())
    return out


def response(head, code, reason, tag, extra="", body=""):
    lines = [f"SIP/2.0 {code} {reason}"]
    for v in headers_all(head, "via"):
        lines.append(f"Via: {v}")
    lines.append(f"From: {header(head, 'from')}")
    to = header(head, "to") or ""
    if ";tag=" not in to and code > 100:
        to += f";tag={tag}"
    lines.append(f"To: {to}")
    lines.append(f"Call-ID: {header(head, 'call-id')}")
    lines.append(f"CSeq: {header(head, 'cseq')}")
    if extra:
        lines.append(extra)
    if body:
        lines.append("Content-Type: application/sdp")
    lines.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


def remember_key(call_id, offer):
    m = re.search(r"^a=crypto:\d+ (\S+) inline:([A-Za-z0-9+/=]+)", offer, re.M)
    c = re.search(r"^c=IN IP4 (\S+)", offer, re.M)
    a = re.search(r"^m=audio (\d+)", offer, re.M)
    if not (m and c and a) or m.group(1) not in PROFILES:
        return
    key = base64.b64decode(m.group(2))
    rx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=PROFILES[m.group(1)]))
    with lock:
        sessions[(c.group(1), int(a.group(1)))] = (call_id, rx)


def media(rtp):
    while True:
        wire, src = rtp.recvfrom(4096)
        with lock:
            found = sessions.get(src)
        if found is None:
            emit(ev="srtp_error", error=f"no call for {src}")
            continue
        try:
            plain = found[1].unprotect(wire)
        except pylibsrtp.Error as e:
            emit(ev="srtp_error", error=str(e))
            continue
        seq = struct.unpack("!H", plain[2:4])[0]
        emit(ev="rtp", call_id=found[0], seq=seq, payload=plain[12:].hex())


def answer_sdp(offer, port):
    m = re.search(r"^a=crypto:(\d+) (\S+) inline:", offer, re.M)
    if m:
        key = base64.b64encode(os.urandom(30)).decode()
        proto, crypto = "RTP/SAVP", f"a=crypto:{m.group(1)} {m.group(2)} inline:{key}\r\n"
    else:
        proto, crypto = "RTP/AVP", ""
    return (
        "v=0\r\no=uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\n{crypto}"
    )


def serve(conn, addr):
    buf = b""
    tag = "tls" + os.urandom(4).hex()
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head_b, rest = buf.split(b"\r\n\r\n", 1)
            head = head_b.decode(errors="replace").lstrip("\r\n")
            if not head:
                buf = rest
                continue
            n = int(header(head, "content-length") or 0)
            while len(rest) < n:
                data = conn.recv(65536)
                if not data:
                    return
                rest += data
            body, buf = rest[:n].decode(errors="replace"), rest[n:]
            start = head.split("\r\n", 1)[0]
            if start.startswith("SIP/2.0"):
                continue
            method, ruri = start.split(" ")[0], start.split(" ")[1]
            if method == "INVITE":
                emit(ev="invite", call_id=header(head, "call-id"), ruri=ruri,
                     contact=header(head, "contact"),
                     crypto="a=crypto:" in body, savp="RTP/SAVP" in body)
                remember_key(header(head, "call-id"), body)
                sdp = answer_sdp(body, RTP_PORT)
                contact = f"Contact: <sips:uas@{LISTEN}>"
                conn.sendall(response(head, 200, "OK", tag, contact, sdp))
            elif method == "ACK":
                pass
            else:
                if method == "BYE":
                    emit(ev="bye", call_id=header(head, "call-id"))
                conn.sendall(response(head, 200, "OK", tag))
    except (OSError, ValueError) as e:
        emit(ev="conn_error", error=str(e))
    finally:
        conn.close()


def main():
    global LISTEN, RTP_PORT
    ap = argparse.ArgumentParser()
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    a = ap.parse_args()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(a.cert, a.key)
    snis = {}

    def on_sni(sslobj, name, _ctx):
        snis[id(sslobj)] = name

    ctx.sni_callback = on_sni
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    RTP_PORT = rtp.getsockname()[1]
    threading.Thread(target=media, args=(rtp,), daemon=True).start()
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    LISTEN = "%s:%d" % srv.getsockname()
    emit(ev="ready", addr=LISTEN)
    while True:
        raw, addr = srv.accept()
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            emit(ev="tls_error", error=str(e))
            raw.close()
            continue
        emit(ev="conn", sni=snis.pop(id(conn), None))
        threading.Thread(target=serve, args=(conn, addr), daemon=True).start()


LISTEN = ""
RTP_PORT = 0
if __name__ == "__main__":
    main()
