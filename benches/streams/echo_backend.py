#!/usr/bin/env python3
"""A Twilio Media Streams backend for benches/streams/stream_vs_relay.py:
sends every `media` payload it gets straight back as a `media` message (the
caller hears itself, as through the echo of a relayed call). Prints its port."""
import asyncio
import json
import sys

import websockets


async def handler(ws):
    sid = None
    try:
        async for m in ws:
            msg = json.loads(m)
            ev = msg.get("event")
            if ev == "start":
                sid = msg.get("streamSid")
            elif ev == "media":
                await ws.send(json.dumps({"event": "media", "streamSid": sid,
                                          "media": {"payload": msg["media"]["payload"]}}))
    except websockets.ConnectionClosed:
        pass  # the edge stopped (the bench ends each mode's edge)


async def main():
    async with websockets.serve(handler, "127.0.0.1", 0, ping_interval=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
