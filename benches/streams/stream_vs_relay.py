#!/usr/bin/env python3
"""CPU per call-second of streamed calls (SPEC §10) next to plain relayed RTP
calls, in the same run, on the same edge binary (issue 16's performance
point: streamed at most 3x the relay's CPU per call-second).

Both modes carry the same media: each call's caller sends 50 packets/s
(172-byte PCMU RTP) and gets 50/s back.
  * relay:  caller -> edge -> a SIP destination (this script) that echoes
            every RTP packet -> edge -> caller.
  * stream: caller -> edge -> WebSocket backend (echo_backend.py, `websockets`)
            that sends every `media` payload back -> edge (paced playout) ->
            caller.
For each mode a fresh edge (release build) is started, --calls calls set up
over SIP (bearer JWT minted here), media run for --secs, and the edge's CPU
(utime+stime from /proc/<pid>/stat over the window) divided by calls x secs.
The echoing peers' CPU is not counted. --repeats alternates the modes.

Quick:  benches/streams/stream_vs_relay.py --calls 50 --secs 10
Full:   benches/streams/stream_vs_relay.py --calls 200 --secs 30 --repeats 3
Needs:  cargo build --release -p tollgate; scripts/install-streams-deps.sh
        (the venv's `websockets` for the backend; --venv to point elsewhere).
Ports: 127.0.0.1 only; edge media --media-ports (default 16000-16999).
"""
import argparse
import hashlib
import hmac
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "benches", "rtp_relay"))
import procstat  # noqa: E402
from rtp_relay_bench import SERVICE, b64url, sdp, sdp_port_crypto, sip_header, sip_response  # noqa: E402


def mint(api_key, model):
    """A bearer JWT (SPEC §3a) for `model`."""
    kid = api_key.split("_")[2]
    now = int(time.time())
    sk = hmac.new(api_key.encode(), b"tollgate-sip-token-v1", hashlib.sha256).digest()
    h = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode())
    c = b64url(json.dumps({"iat": now, "exp": now + 3600, "jti": os.urandom(12).hex(), "to": SERVICE,
                           "from": "bench", "model": model}, separators=(",", ":")).encode())
    sig = hmac.new(sk, f"{h}.{c}".encode(), hashlib.sha256).digest()
    return f"{h}.{c}.{b64url(sig)}"


class Echo:
    """The relay mode's destination: a SIP UAS that answers with a fresh RTP
    socket per call and echoes every packet on it."""

    def __init__(self):
        self.sip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sip.bind(("127.0.0.1", 0))
        self.rtp = []
        self.stop = False
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stop:
            socks = [self.sip] + self.rtp
            r, _, _ = select.select(socks, [], [], 0.1)
            for s in r:
                data, src = s.recvfrom(65535)
                if s is not self.sip:
                    s.sendto(data, src)
                    continue
                msg = data.decode(errors="replace")
                method = msg.split(" ", 1)[0]
                if method == "INVITE":
                    r2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    r2.bind(("127.0.0.1", 0))
                    self.rtp.append(r2)
                    self.sip.sendto(sip_response(msg, 200, "OK", sdp(r2.getsockname()[1], origin="echo")), src)
                elif method != "ACK" and not method.startswith("SIP/"):
                    self.sip.sendto(sip_response(msg, 200, "OK"), src)


def start_edge(args, tmp, routes):
    d = f"{tmp}/edge-{time.time_ns()}"
    os.makedirs(d)
    cfg = f"{d}/tollgate.toml"
    with open(cfg, "w") as f:
        f.write('[sip]\nlisten = ["udp:127.0.0.1:0"]\n[metrics]\nlisten = "127.0.0.1:0"\n'
                '[admin]\nlisten = "127.0.0.1:0"\n'
                f'[media]\nports = "{args.media_ports}"\ntimeout_s = 600\n'
                '[streams]\nallow_cidrs = ["127.0.0.1/32"]\n' + routes)
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    proc = subprocess.Popen([args.tollgate, "serve", "--data-dir", f"{d}/data", "--config", cfg],
                            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            stderr=open(f"{d}/stderr.log", "w"), env=env)
    key = sip = None
    end = time.time() + 20
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("tollgate: first secret key (shown once): "):
            key = line.split(": ", 2)[2].strip()
        elif line.startswith("tollgate: listening sip udp "):
            h, p = line.split()[4].rsplit(":", 1)
            sip = (h, int(p))
        elif line.strip() == "tollgate: ready":
            break
    if not (key and sip):
        procstat.stop(proc)
        raise SystemExit(f"tollgate did not start; see {d}/stderr.log")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    return proc, key, sip, d


def call(ua, edge_sip, key, model, i):
    """INVITE + ACK; returns (caller RTP socket, the edge's media address)."""
    rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rtp.bind(("127.0.0.1", 0))
    lp, cid, tag = ua.getsockname()[1], f"bench-{i}-{time.time_ns()}@bench", f"a{i}"
    body = sdp(rtp.getsockname()[1], origin="caller")
    inv = (f"INVITE sip:{SERVICE}@127.0.0.1 SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bK{i}x{time.time_ns()}\r\nMax-Forwards: 70\r\n"
           f"From: <sip:bench@127.0.0.1>;tag={tag}\r\nTo: <sip:{SERVICE}@127.0.0.1>\r\n"
           f"Call-ID: {cid}\r\nCSeq: 1 INVITE\r\nContact: <sip:bench@127.0.0.1:{lp}>\r\n"
           f"Authorization: Bearer {mint(key, model)}\r\n"
           f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    ua.sendto(inv, edge_sip)
    end = time.time() + 10
    while time.time() < end:
        r, _, _ = select.select([ua], [], [], 0.5)
        if not r:
            continue
        msg = ua.recvfrom(65535)[0].decode(errors="replace")
        if not msg.startswith("SIP/2.0 ") or sip_header(msg, "Call-ID") != cid:
            continue
        code = int(msg.split()[1])
        if code < 200:
            continue
        if code != 200:
            raise SystemExit(f"call {i}: edge answered {code}")
        ack = (f"ACK sip:{SERVICE}@127.0.0.1 SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP 127.0.0.1:{lp};branch=z9hG4bKack{i}x{time.time_ns()}\r\n"
               f"Max-Forwards: 70\r\nFrom: <sip:bench@127.0.0.1>;tag={tag}\r\nTo: {sip_header(msg, 'To')}\r\n"
               f"Call-ID: {cid}\r\nCSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n").encode()
        ua.sendto(ack, edge_sip)
        port, _, _ = sdp_port_crypto(msg.split("\r\n\r\n", 1)[1])
        return rtp, ("127.0.0.1", port)
    raise SystemExit(f"call {i}: no answer")


def run_mode(args, tmp, mode, backend_port):
    echo = Echo() if mode == "relay" else None
    if mode == "relay":
        routes = f'[[routes]]\ntarget = "sip:echo@127.0.0.1:{echo.sip.getsockname()[1]}"\nmedia = "rtp"\n'
    else:
        routes = f'[[routes]]\ntarget = "ws://127.0.0.1:{backend_port}/"\n'
    proc, key, edge_sip, d = start_edge(args, tmp, routes)
    try:
        ua = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ua.bind(("127.0.0.1", 0))
        calls = [call(ua, edge_sip, key, mode, i) for i in range(args.calls)]
        got = [0]
        stop = threading.Event()

        def drain():
            socks = [s for s, _ in calls]
            while not stop.is_set():
                r, _, _ = select.select(socks, [], [], 0.1)
                for s in r:
                    s.recvfrom(2048)
                    got[0] += 1

        t = threading.Thread(target=drain, daemon=True)
        t.start()
        payload = bytes(range(160))
        seq, ts = 0, 0
        warm = time.time() + 1.0
        cpu0 = t0 = None
        sent = 0
        nxt = time.time()
        while True:
            now = time.time()
            if cpu0 is None and now >= warm:
                cpu0, t0, got[0], sent = procstat.cpu_seconds(proc.pid), now, 0, 0
            if t0 is not None and now - t0 >= args.secs:
                break
            seq, ts = (seq + 1) & 0xFFFF, (ts + 160) & 0xFFFFFFFF
            hdr = bytes([0x80, 0]) + seq.to_bytes(2, "big") + ts.to_bytes(4, "big")
            for i, (s, dst) in enumerate(calls):
                s.sendto(hdr + (0x1000 + i).to_bytes(4, "big") + payload, dst)
            sent += len(calls)
            nxt += 0.02
            time.sleep(max(0.0, nxt - time.time()))
        cpu = procstat.cpu_seconds(proc.pid) - cpu0
        secs = time.time() - t0
        stop.set()
        t.join()
        return cpu, secs, sent, got[0]
    finally:
        procstat.stop(proc)
        if echo:
            echo.stop = True
        shutil.rmtree(f"{d}/data", ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tollgate", default=os.path.join(ROOT, "target/release/tollgate"))
    ap.add_argument("--venv", default=os.path.join(ROOT, ".venv/streams"))
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--secs", type=float, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--media-ports", default="16000-16999")
    ap.add_argument("--tmp", default="/tmp/tollgate-bench/streams")
    args = ap.parse_args()
    os.makedirs(args.tmp, exist_ok=True)
    backend = subprocess.Popen([os.path.join(args.venv, "bin/python"), os.path.join(HERE, "echo_backend.py")],
                               stdout=subprocess.PIPE, text=True)
    try:
        port = int(backend.stdout.readline())
        per = {"relay": [], "stream": []}
        for r in range(args.repeats):
            for mode in ("relay", "stream"):
                cpu, secs, sent, got = run_mode(args, args.tmp, mode, port)
                ms = 1000 * cpu / (args.calls * secs)
                per[mode].append(ms)
                print(f"{mode:6} repeat {r}: {args.calls} calls x {secs:.1f} s: edge CPU {cpu:.2f} s = "
                      f"{ms:.3f} ms per call-second; packets back {got}/{sent} ({100 * got / max(sent, 1):.1f} %)",
                      flush=True)
        relay, stream = min(per["relay"]), min(per["stream"])
        print(f"RATIO stream/relay CPU per call-second (best of {args.repeats}): {stream / relay:.2f} "
              f"(target <= 3): relay {relay:.3f} ms, stream {stream:.3f} ms")
    finally:
        procstat.stop(backend)


if __name__ == "__main__":
    main()
