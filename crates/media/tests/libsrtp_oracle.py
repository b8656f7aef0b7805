"""libsrtp (through pylibsrtp) as an independent SRTP oracle.

Reads lines from stdin:
  suite <NAME> <key||salt hex>      starts new outbound and inbound sessions
  rtp <plain hex> <protected hex>   a packet as Tollgate protected it
  rtcp <plain hex> <protected hex>
For every packet, libsrtp protects the plaintext (must equal Tollgate's bytes)
and unprotects Tollgate's bytes (must equal the plaintext); prints libsrtp's
protected hex, one line per packet. Exits 1 at the first difference.
"""
import sys

import pylibsrtp
from pylibsrtp import Policy, Session

PROFILES = {
    "AES_CM_128_HMAC_SHA1_80": Policy.SRTP_PROFILE_AES128_CM_SHA1_80,
    "AES_CM_128_HMAC_SHA1_32": Policy.SRTP_PROFILE_AES128_CM_SHA1_32,
    "AEAD_AES_128_GCM": Policy.SRTP_PROFILE_AEAD_AES_128_GCM,
}


def fail(msg):
    print("FAIL " + msg, flush=True)
    sys.exit(1)


tx = rx = None
suite = None
n = 0
for line in sys.stdin:
    parts = line.split()
    if not parts:
        continue
    if parts[0] == "suite":
        suite, key = parts[1], bytes.fromhex(parts[2])
        tx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_OUTBOUND, srtp_profile=PROFILES[suite]))
        rx = Session(Policy(key=key, ssrc_type=Policy.SSRC_ANY_INBOUND, srtp_profile=PROFILES[suite]))
        continue
    kind, plain, ours = parts[0], bytes.fromhex(parts[1]), bytes.fromhex(parts[2])
    n += 1
    try:
        theirs = tx.protect(plain) if kind == "rtp" else tx.protect_rtcp(plain)
    except pylibsrtp.Error as e:
        fail(f"{suite} {kind} #{n}: libsrtp protect: {e}")
    if theirs != ours:
        fail(f"{suite} {kind} #{n}: protect differs\n  libsrtp {theirs.hex()}\n  ours    {ours.hex()}")
    try:
        back = rx.unprotect(ours) if kind == "rtp" else rx.unprotect_rtcp(ours)
    except pylibsrtp.Error as e:
        fail(f"{suite} {kind} #{n}: libsrtp unprotect of ours: {e}")
    if back != plain:
        fail(f"{suite} {kind} #{n}: libsrtp unprotect differs")
    print(theirs.hex(), flush=False)
print("DONE", n, flush=True)
