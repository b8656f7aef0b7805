#!/usr/bin/env python3
"""A voice-AI backend for crates/tollgate/tests/e2e_streams.rs: a WebSocket
server (the `websockets` package) that decodes every message of the Twilio
Media Streams protocol with Pipecat's own code (`parse_telephony_websocket`
for `connected`/`start`, `TwilioFrameSerializer` for `media`/`dtmf`, and for
the audio and `clear` it sends), independent of the edge's implementation.

Prints one JSON object per line on stdout: {"ev": "ready", "port": N} first,
then what each connection saw. The URL path picks the behaviour:

  /listen                 record everything, send nothing
  /talk?frames=N&mark=M   after `start`, send N frames (20 ms, a known
                          pattern) as one burst, then mark M (if given)
       &clear_ms=T        ... and `clear` T ms after the burst
  /refuse                 answer the upgrade with HTTP 403
  /close?ms=T             close T ms after `start`
  /garbage?ms=T           send a text frame that is not JSON T ms after `start`
  ...&quiet=1             no line per media message: a `summary` at the end
                          with the count (load test)
  POST (https, --cert)    a webhook receiver: one `webhook` line per event
  /stall                  never read after `start`: a backend that is slow
                          (--max-queue bounds what websockets buffers unread)
"""

import argparse
import asyncio
import audioop
import base64
import hashlib
import hmac
import http.server
import json
import ssl
import sys
import threading
import time
import types
import urllib.parse

import websockets
from websockets.http11 import Response
from websockets.datastructures import Headers

from pipecat.frames.frames import InputAudioRawFrame, InputDTMFFrame, InterruptionFrame, OutputAudioRawFrame
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.serializers.twilio import TwilioFrameSerializer


def emit(**kw):
    kw.setdefault("t", time.monotonic())
    sys.stdout.write(json.dumps(kw) + "\n")
    sys.stdout.flush()


def pattern(i):
    """µ-law frame i of what the backend says: distinct per frame, no 0x7F
    (µ-law's second zero, which a PCM round trip turns into 0xFF)."""
    return bytes(((i * 7 + j) % 254) + (1 if ((i * 7 + j) % 254) >= 0x7F else 0) for j in range(160))


class PipecatSocket:
    """What parse_telephony_websocket reads from: Starlette's iter_text()."""

    def __init__(self, ws):
        self.ws = ws
        self.raw = []

    async def iter_text(self):
        while True:
            m = await self.ws.recv()
            self.raw.append(m)
            yield m


class Webhook(http.server.BaseHTTPRequestHandler):
    """With --cert: an HTTPS receiver for the edge's call webhooks."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        emit(ev="webhook", event=self.headers.get("X-Tollgate-Event"), body=json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def check_signature(secret, header, url):
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        mac = hmac.new(secret.encode(), f"{parts['t']}.{url}".encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(mac, parts["v1"])
    except Exception:
        return False


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--secret", default="")
    ap.add_argument("--max-queue", type=int, default=16)
    ap.add_argument("--cert", help="serve wss:// with this certificate (PEM)")
    ap.add_argument("--key", help="... and this key (PEM)")
    args = ap.parse_args()
    conns = [0]

    def process_request(conn, request):
        path = urllib.parse.urlsplit(request.path).path
        host = request.headers.get("Host", "")
        url = f"{'wss' if args.cert else 'ws'}://{host}{request.path}"
        sig = request.headers.get("X-Tollgate-Signature")
        emit(ev="upgrade", path=request.path, signature=sig,
             signature_ok=bool(sig) and check_signature(args.secret, sig, url))
        if path == "/refuse":
            return Response(403, "Forbidden", Headers([("Content-Length", "0")]), b"")
        return None

    async def handler(ws):
        conns[0] += 1
        cid = conns[0]
        split = urllib.parse.urlsplit(ws.request.path)
        mode = split.path.strip("/")
        q = {k: v[0] for k, v in urllib.parse.parse_qs(split.query).items()}
        shim = PipecatSocket(ws)
        try:
            transport, call = await parse_telephony_websocket(shim)
        except Exception as e:  # noqa: BLE001
            emit(ev="error", conn=cid, error=f"pipecat could not parse the handshake: {e!r}")
            return
        raw = [json.loads(m) for m in shim.raw]
        emit(ev="start", conn=cid, mode=mode, transport=transport,
             call_id=call.get("call_id"), stream_id=call.get("stream_id"),
             body=call.get("body"), first=raw[0] if raw else None,
             raw=raw[1] if len(raw) > 1 else None)
        ser = TwilioFrameSerializer(
            stream_sid=call.get("stream_id"),
            params=TwilioFrameSerializer.InputParams(auto_hang_up=False, sample_rate=8000),
        )
        # What a pipeline's transport does first; the rate is taken from
        # the params (8000: no resampling, so PCM maps 1:1 onto µ-law).
        await ser.setup(types.SimpleNamespace(audio_in_sample_rate=8000))
        tasks = []
        quiet = q.get("quiet") == "1"
        counted = [0]

        async def talk():
            n = int(q.get("frames", "0"))
            for i in range(n):
                ulaw = pattern(i)
                pcm = audioop.ulaw2lin(ulaw, 2)
                msg = await ser.serialize(OutputAudioRawFrame(audio=pcm, sample_rate=8000, num_channels=1))
                sent = base64.b64decode(json.loads(msg)["media"]["payload"])
                if sent != ulaw:
                    emit(ev="error", conn=cid, error="pipecat's µ-law is not the pattern")
                await ws.send(msg)
            emit(ev="talked", conn=cid, frames=n)
            if "mark" in q:
                await ws.send(json.dumps({"event": "mark", "streamSid": call.get("stream_id"),
                                          "mark": {"name": q["mark"]}}))
            if "clear_ms" in q:
                await asyncio.sleep(int(q["clear_ms"]) / 1000)
                await ws.send(await ser.serialize(InterruptionFrame()))
                emit(ev="cleared", conn=cid)

        async def after(ms, what):
            await asyncio.sleep(ms / 1000)
            if what == "close":
                emit(ev="closing", conn=cid)
                await ws.close()
            else:
                emit(ev="garbage", conn=cid)
                await ws.send("this is not JSON")

        if mode == "talk":
            tasks.append(asyncio.create_task(talk()))
        elif mode in ("close", "garbage"):
            tasks.append(asyncio.create_task(after(int(q.get("ms", "200")), mode)))
        if mode == "stall":
            emit(ev="stalling", conn=cid)
            await ws.wait_closed()
            return
        try:
            async for m in ws:
                msg = json.loads(m)
                ev = msg.get("event")
                frame = await ser.deserialize(m)
                if ev == "media" and quiet:
                    counted[0] += 1 if isinstance(frame, InputAudioRawFrame) else 0
                elif ev == "media":
                    payload = base64.b64decode(msg["media"]["payload"])
                    ok = isinstance(frame, InputAudioRawFrame) and frame.audio == audioop.ulaw2lin(payload, 2)
                    emit(ev="media", conn=cid, payload=payload.hex(), pipecat_ok=ok,
                         seq=msg.get("sequenceNumber"), chunk=msg["media"].get("chunk"),
                         ts=msg["media"].get("timestamp"), track=msg["media"].get("track"))
                elif ev == "dtmf":
                    digit = frame.button.value if isinstance(frame, InputDTMFFrame) else None
                    emit(ev="dtmf", conn=cid, digit=msg["dtmf"]["digit"], pipecat_digit=digit)
                else:
                    emit(ev=ev or "unknown", conn=cid, raw=msg)
        except websockets.ConnectionClosed:
            pass
        finally:
            for t in tasks:
                t.cancel()
            if quiet:
                emit(ev="summary", conn=cid, media=counted[0])
            emit(ev="closed", conn=cid)

    tls = None
    if args.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert, args.key)
        hooks = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
        hooks.socket = tls.wrap_socket(hooks.socket, server_side=True)
        threading.Thread(target=hooks.serve_forever, daemon=True).start()
    async with websockets.serve(handler, "127.0.0.1", 0, process_request=process_request,
                                max_queue=args.max_queue, ping_interval=None, ssl=tls) as server:
        port = server.sockets[0].getsockname()[1]
        emit(ev="ready", port=port, hook_port=hooks.server_address[1] if tls else None)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
