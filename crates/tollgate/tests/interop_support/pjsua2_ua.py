"""A PJSIP user agent (pjsua2, the stack Asterisk's chan_pjsip is built on)
for tests/interop.rs: one digest call to the edge, a tone WAV played into
it, what comes back recorded, hold (re-INVITE a=sendonly) and resume
(re-INVITE a=sendrecv), then BYE. Prints one `EVENT ...` line per step;
exits 0 only when every step happened, 1 (with the reason) otherwise.

usage: pjsua2_ua.py EDGE_HOST:PORT USER PASSWORD SIP_PORT TO_USER TONE.wav OUT.wav [CA.pem]

With CA.pem, signaling is TLS to EDGE (its certificate verified against
CA.pem) and media is SRTP, mandatory, keyed by SDES (RFC 4568) over that TLS
hop; the re-INVITEs of hold and resume re-key it.
"""
import os
import sys
import time

try:
    import pjsua2 as pj
except ImportError as e:  # the test names the package to install
    print(f"FAIL cannot import pjsua2 ({e}): run scripts/install-interop-deps.sh", flush=True)
    sys.exit(3)

EDGE, USER, PASSWORD, SIP_PORT, TO_USER, TONE, OUT = sys.argv[1:8]
CA = sys.argv[8] if len(sys.argv) > 8 else None
SIP_PORT = int(SIP_PORT)
state = {"confirmed": False, "disconnected": False, "media": None, "last_code": None}


def say(*a):
    print("EVENT", *a, flush=True)


class Call(pj.Call):
    def __init__(self, acc):
        super().__init__(acc)
        self.player = None
        self.recorder = None

    def onCallState(self, prm):
        ci = self.getInfo()
        state["last_code"] = ci.lastStatusCode
        if ci.state == pj.PJSIP_INV_STATE_CONFIRMED:
            state["confirmed"] = True
            say("confirmed", ci.lastStatusCode)
        if ci.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            state["disconnected"] = True
            say("disconnected", ci.lastStatusCode, ci.lastReason)

    def onCallMediaState(self, prm):
        ci = self.getInfo()
        for i, mi in enumerate(ci.media):
            if mi.type != pj.PJMEDIA_TYPE_AUDIO:
                continue
            state["media"] = mi.status
            say("media", mi.status, "dir", mi.dir)
            if mi.status == pj.PJSUA_CALL_MEDIA_ACTIVE:
                am = self.getAudioMedia(i)
                if self.player is None:
                    self.player = pj.AudioMediaPlayer()
                    self.player.createPlayer(TONE, 0)
                    self.recorder = pj.AudioMediaRecorder()
                    self.recorder.createRecorder(OUT)
                self.player.startTransmit(am)
                am.startTransmit(self.recorder)


def run_until(ep, cond, secs, what):
    end = time.time() + secs
    while time.time() < end:
        ep.libHandleEvents(20)
        if cond():
            return
    print(f"FAIL timeout waiting for {what}", flush=True)
    sys.exit(1)


def pump(ep, secs):
    end = time.time() + secs
    while time.time() < end:
        ep.libHandleEvents(20)


ep = pj.Endpoint()
ep.libCreate()
cfg = pj.EpConfig()
cfg.uaConfig.threadCnt = 0
cfg.uaConfig.mainThreadOnly = True
cfg.logConfig.level = 4
cfg.logConfig.consoleLevel = 4
cfg.medConfig.clockRate = 8000
cfg.medConfig.sndClockRate = 8000
cfg.medConfig.noVad = True
ep.libInit(cfg)
tc = pj.TransportConfig()
tc.port = SIP_PORT
tc.boundAddress = "127.0.0.1"
tc.publicAddress = "127.0.0.1"
if CA:
    tc.tlsConfig.CaListFile = CA
    tc.tlsConfig.verifyServer = True
    tc.tlsConfig.method = pj.PJSIP_TLSV1_2_METHOD
    ep.transportCreate(pj.PJSIP_TRANSPORT_TLS, tc)
else:
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
ep.libStart()
ep.audDevManager().setNullDev()
say("version", ep.libVersion().full)

ac = pj.AccountConfig()
ac.idUri = f"sip:{USER}@{EDGE}"
PARAMS = ";transport=tls" if CA else ""
if CA:
    ac.mediaConfig.srtpUse = pj.PJMEDIA_SRTP_MANDATORY
    ac.mediaConfig.srtpSecureSignaling = 1  # SDES keys only over TLS
ac.regConfig.registerOnAdd = False
ac.sipConfig.authCreds.append(pj.AuthCredInfo("digest", "tollgate", USER, 0, PASSWORD))
ac.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
ac.mediaConfig.transportConfig.publicAddress = "127.0.0.1"
ac.mediaConfig.transportConfig.port = SIP_PORT + 2
acc = pj.Account()
acc.create(ac)

call = Call(acc)
prm = pj.CallOpParam(True)
call.makeCall(f"sip:{TO_USER}@{EDGE}{PARAMS}", prm)
run_until(ep, lambda: state["confirmed"] or state["disconnected"], 30, "the 200 OK")
if not state["confirmed"]:
    print(f"FAIL call not answered: {state['last_code']}", flush=True)
    sys.exit(1)
run_until(ep, lambda: state["media"] == pj.PJSUA_CALL_MEDIA_ACTIVE, 10, "active media")
pump(ep, 4)

# Hold: re-INVITE with a=sendonly; the answer puts us on local hold.
call.setHold(pj.CallOpParam(True))
run_until(ep, lambda: state["media"] == pj.PJSUA_CALL_MEDIA_LOCAL_HOLD, 15, "local hold")
say("held")
pump(ep, 1)
# Resume: re-INVITE with a=sendrecv.
rp = pj.CallOpParam(True)
rp.opt.flag = pj.PJSUA_CALL_UNHOLD
call.reinvite(rp)
run_until(ep, lambda: state["media"] == pj.PJSUA_CALL_MEDIA_ACTIVE, 15, "resumed media")
say("resumed")
pump(ep, 4)

call.hangup(pj.CallOpParam(True))
run_until(ep, lambda: state["disconnected"], 15, "the BYE's answer")
call.recorder = None  # closes the WAV (header written)
call.player = None
pump(ep, 0.5)
say("done")
# pjsua2's Python objects and libDestroy() disagree on teardown order
# (an assertion in pjsua_call_set_user_data): leave without it.
sys.stdout.flush()
os._exit(0)
