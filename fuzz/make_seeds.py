#!/usr/bin/env python3
"""Render crates/tollgate/tests/corpus/*.sip into fuzz seed inputs.

  fuzz/seeds/sip_message/<name>   one message per file (placeholders filled)
  fuzz/seeds/sip_stream/<name>    3-byte header (max_len=65535 LE, seed) + the
                                  message twice with a CRLF keep-alive between

Same rules as tests/e2e_malformed.rs: leading ';;' lines are metadata, bare LF
becomes CRLF unless ';; crlf: keep', {CL} is the body length.
"""
import os, re, sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "crates", "tollgate", "tests", "corpus")
FIX = {b"{EDGE}": b"127.0.0.1:5060", b"{LOCAL}": b"127.0.0.1:5070", b"{TRANSPORT}": b"UDP",
       b"{BRANCH}": b"z9hG4bK-seed-1", b"{CALLID}": b"seed-call@127.0.0.1", b"{TAG}": b"seedtag"}


def render(data):
    meta = {}
    while data.startswith(b";;"):
        line, _, data = data.partition(b"\n")
        k, _, v = line[2:].decode("utf-8", "replace").partition(":")
        meta[k.strip()] = v.strip()
    if meta.get("crlf") != "keep":
        data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    for k, v in FIX.items():
        data = data.replace(k, v)
    if b"{CL}" in data:
        rest = data.lstrip(b"\r\n")
        p = rest.find(b"\r\n\r\n")
        body = len(rest) - p - 4 if p >= 0 else 0
        if p < 0:
            p = rest.find(b"\n\n")
            body = len(rest) - p - 2 if p >= 0 else 0
        data = data.replace(b"{CL}", str(body).encode())
    return data


def main():
    out_m = os.path.join(HERE, "seeds", "sip_message")
    out_s = os.path.join(HERE, "seeds", "sip_stream")
    os.makedirs(out_m, exist_ok=True)
    os.makedirs(out_s, exist_ok=True)
    n = 0
    for name in sorted(os.listdir(CORPUS)):
        if not name.endswith(".sip"):
            continue
        msg = render(open(os.path.join(CORPUS, name), "rb").read())
        stem = name[:-4]
        open(os.path.join(out_m, stem), "wb").write(msg)
        open(os.path.join(out_s, stem), "wb").write(b"\xff\xff\x2a" + msg + b"\r\n\r\n" + msg)
        n += 1
    print(f"{n} seeds per target in {os.path.join(HERE, 'seeds')}", file=sys.stderr)


if __name__ == "__main__":
    main()
