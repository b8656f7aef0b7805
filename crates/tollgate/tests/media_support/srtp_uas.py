#!/usr/bin/env python3
"""An RTP/SAVP destination (leg B) for tests/e2e_media.rs, with libsrtp
(pylibsrtp) as the SRTP implementation independent of Tollgate's.

    srtp_uas.py --suite AES_CM_128_HMAC_SHA1_80|AES_CM_128_HMAC_SHA1_32|AEAD_AES_128_GCM

SIP over UDP on 127.0.0.1:<ephemeral>. Every INVITE is answered 200 OK with
RTP/SAVP and an a=crypto of the chosen suite (tag taken from the edge's
offer, our own random key); BYE -> 200; ACK ignored; retransmitted INVITEs get
the same 200 again.

Media: every SRTP packet on our RTP socket is unprotected with libsrtp using
the edge's key for that suite (from its SDP offer). For each good one we send
back an RTP packet protected with our key: our own SSRC (0x0B0B0B0B), our own
sequence numbers, the same PT/marker, and payload = received payload XOR 0x5A,
so the caller can check the B->A direction byte for byte.

Stdout: one JSON object per line (flushed), the test's only view of us:
  {"ev":"ready","sip":"127.0.0.1:P","rtp":"127.0.0.1:P"}
  {"ev":"invite","call_id":..,"offer":SDP,"tag":N,"edge_rtp":"ip:port"}
  {"ev":"rtp","seq":..,"ts":..,"ssrc":..,"pt":..,"marker":..,"payload":hex,
   "wire_len":N,"plain_len":N,"src":"ip:port","reply_seq":N}
  {"ev":"srtp_error","error":..,"wire_len":N,"src":..}
  {"ev":"sent","kind":K,"seq":N,"payload":hex}       (stdin commands)
  {"ev":"bye","call_id":..}
  {"ev":"error","msg":..}
Stdin commands (one per line), all aimed at the edge's leg-B RTP port:
  badtag            a new packet, properly protected, last tag byte flipped
  replay            the last packet we sent, byte for byte, again
  stranger          a new, properly protected packet from another socket
  stranger_badtag   like badtag, from another socket
  quit
"""
import argparse, base64, json, os, re, select, socket, struct, sys

try:
    import pylibsrtp
    from pylibsrtp import Policy, Session
except ImportError as e:  # the test must fail loudly, never skip
    print(json.dumps({"ev": "error", "msg": f"pylibsrtp missing: {e}"}), flush=True)
    sys.exit(3)

PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": (Policy.SRTP_PROFILE_AES128_CM_SHA1_80, 30),
    "AES_CM_128_HMAC_SHA1_32": (Policy.SRTP_PROFILE_AES128_CM_SHA1_32, 30),
    "AEAD_AES_128_GCM": (Policy.SRTP_PROFILE_AEAD_AES_128_GCM, 28),
}
OUR_SSRC = 0x0B0B0B0B


def emit(**kw):
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def header(msg, name):
    for line in msg.split("\r\n"):
        if ":" in line:
            n, v = line.split(":", 1)
            if n.strip().lower() == name.lower():
                return v.strip()
    return None


def headers_all(msg, name):
    out = []
    for line in msg.split("\r\n")[1:]:
        if line == "":
            break
        if ":" in line:
            n, v = line.split(":", 1)
            if n.strip().lower() == name.lower():
                out.append(v.strip())
    return out


def response(req, code, reason, to_tag, contact, body=b"", ctype=None):
    lines = [f"SIP/2.0 {code} {reason}"]
    for v in headers_all(req, "via") + headers_all(req, "v"):
        lines.append(f"Via: {v}")
    for n in ("From", "Call-ID", "CSeq"):
        lines.append(f"{n}: {header(req, n)}")
    to = header(req, "To")
    if to_tag and ";tag=" not in to:
        to += f";tag={to_tag}"
    lines.append(f"To: {to}")
    if contact:
        lines.append(f"Contact: {contact}")
    if ctype:
        lines.append(f"Content-Type: {ctype}")
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Call:
    def __init__(self, suite, offer, rtp_port):
        self.offer = offer
        m = re.search(r"^m=audio (\d+) (\S+)", offer, re.M)
        c = re.search(r"^c=IN IP4 (\S+)", offer, re.M)
        if not m or not c:
            raise ValueError("offer has no m=audio / c=")
        if m.group(2) != "RTP/SAVP":
            raise ValueError(f"offer proto is {m.group(2)}, want RTP/SAVP")
        self.edge_rtp = (c.group(1), int(m.group(1)))
        profile, keylen = PROFILES[suite]
        edge_key = None
        for tag, s, key in re.findall(r"^a=crypto:(\d+) (\S+) inline:([A-Za-z0-9+/=]+)", offer, re.M):
            if s == suite:
                self.tag, edge_key = int(tag), base64.b64decode(key)
                break
        if edge_key is None:
            raise ValueError(f"edge offered no {suite}")
        if len(edge_key) != keylen:
            raise ValueError(f"edge {suite} key is {len(edge_key)} bytes, want {keylen}")
        self.our_key = os.urandom(keylen)
        self.rx = Session(Policy(key=edge_key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=profile))
        self.tx = Session(Policy(key=self.our_key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=profile))
        self.seq = 1000
        self.ts = 50000
        self.last_sent = None
        self.answer = (
            "v=0\r\no=srtp-uas 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {rtp_port} RTP/SAVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
            "a=rtpmap:101 telephone-event/8000\r\na=sendrecv\r\n"
            f"a=crypto:{self.tag} {suite} inline:{base64.b64encode(self.our_key).decode()}\r\n"
        ).encode()

    def packet(self, pt, marker, payload):
        self.seq = (self.seq + 1) & 0xFFFF
        self.ts = (self.ts + 160) & 0xFFFFFFFF
        plain = struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, self.seq, self.ts, OUR_SSRC) + payload
        return self.seq, self.tx.protect(plain)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", required=True, choices=sorted(PROFILES))
    args = ap.parse_args()
    sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sip.bind(("127.0.0.1", 0))
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    sip_addr, rtp_addr = sip.getsockname(), rtp.getsockname()
    contact = f"<sip:uas@{sip_addr[0]}:{sip_addr[1]}>"
    emit(ev="ready", sip=f"{sip_addr[0]}:{sip_addr[1]}", rtp=f"{rtp_addr[0]}:{rtp_addr[1]}",
         stranger=f"{stranger.getsockname()[0]}:{stranger.getsockname()[1]}")
    calls = {}  # call-id -> (Call, 200 bytes)
    current = None
    stdin_open = True
    while True:
        rl = [sip, rtp] + ([sys.stdin] if stdin_open else [])
        r, _, _ = select.select(rl, [], [], 1.0)
        if sip in r:
            data, src = sip.recvfrom(65535)
            msg = data.decode("utf-8", "replace")
            first = msg.split("\r\n", 1)[0]
            if first.startswith("SIP/2.0"):
                continue
            method = first.split(" ", 1)[0]
            cid = header(msg, "Call-ID") or header(msg, "i")
            if method == "INVITE":
                if cid in calls:
                    sip.sendto(calls[cid][1], src)
                    continue
                body = msg.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in msg else ""
                try:
                    call = Call(args.suite, body, rtp_addr[1])
                except Exception as e:  # noqa: BLE001
                    emit(ev="error", msg=f"bad offer: {e}", offer=body)
                    sip.sendto(response(msg, 488, "Not Acceptable Here", "uas1", None), src)
                    continue
                ok = response(msg, 200, "OK", "uas1", contact, call.answer, "application/sdp")
                calls[cid] = (call, ok)
                current = call
                emit(ev="invite", call_id=cid, offer=body, tag=call.tag,
                     edge_rtp=f"{call.edge_rtp[0]}:{call.edge_rtp[1]}")
                sip.sendto(ok, src)
            elif method == "ACK":
                pass
            elif method == "BYE":
                sip.sendto(response(msg, 200, "OK", None, None), src)
                emit(ev="bye", call_id=cid)
            else:
                sip.sendto(response(msg, 200, "OK", None, None), src)
        if rtp in r:
            wire, src = rtp.recvfrom(4096)
            if current is None:
                emit(ev="srtp_error", error="no call", wire_len=len(wire), src=f"{src[0]}:{src[1]}")
                continue
            try:
                plain = current.rx.unprotect(wire)
            except pylibsrtp.Error as e:
                emit(ev="srtp_error", error=str(e), wire_len=len(wire), src=f"{src[0]}:{src[1]}")
                continue
            b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", plain[:12])
            payload = plain[12:]
            rseq, out = current.packet(b1 & 0x7F, b1 >> 7, bytes(x ^ 0x5A for x in payload))
            current.last_sent = out
            rtp.sendto(out, current.edge_rtp)
            emit(ev="rtp", seq=seq, ts=ts, ssrc=ssrc, pt=b1 & 0x7F, marker=b1 >> 7, payload=payload.hex(),
                 wire_len=len(wire), plain_len=len(plain), src=f"{src[0]}:{src[1]}", reply_seq=rseq,
                 encrypted=wire[12:len(plain)] != payload)
        if stdin_open and sys.stdin in r:
            line = sys.stdin.readline()
            if not line:
                stdin_open = False
                continue
            cmd = line.strip()
            if cmd == "quit":
                return
            if current is None:
                emit(ev="error", msg=f"{cmd}: no call yet")
                continue
            if cmd in ("badtag", "stranger_badtag"):
                payload = (b"BADTAG" * 30)[:160]
                seq, out = current.packet(0, 0, payload)
                out = out[:-1] + bytes([out[-1] ^ 0xFF])
                (stranger if cmd == "stranger_badtag" else rtp).sendto(out, current.edge_rtp)
            elif cmd == "replay":
                if current.last_sent is None:
                    emit(ev="error", msg="replay: nothing sent yet")
                    continue
                out = current.last_sent
                seq = struct.unpack("!H", out[2:4])[0]
                payload = b""
                rtp.sendto(out, current.edge_rtp)
            elif cmd == "stranger":
                payload = (b"STRANGER" * 20)[:160]
                seq, out = current.packet(0, 0, payload)
                stranger.sendto(out, current.edge_rtp)
            else:
                emit(ev="error", msg=f"unknown command {cmd!r}")
                continue
            emit(ev="sent", kind=cmd, seq=seq, payload=payload.hex())


if __name__ == "__main__":
    main()
