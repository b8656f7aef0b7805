#!/usr/bin/env python3
"""SIP calls-per-second, three ways in ONE run, same method as the peers kit
(shared/peers/lib/cps_sweep.py), all on 127.0.0.1:

  direct    SIPp UAC -> SIPp UAS (the load generator's own ceiling)
  kamailio  SIPp UAC -> Kamailio (tm+sl+rr, 407 digest on every INVITE) -> UAS
  edge      SIPp UAC -> Tollgate (release build, per-call bearer token) -> UAS

Per mode and repeat: fresh UAS (+ Kamailio / edge); rates stepped up; each
step = rate x duration calls (-m), bounded by SIPp -recv_timeout and a
wall-clock cap (duration + 40 s, then the UAC is stopped by PID). A step
passes if failed calls < 0.5 % of created, the steady creation rate (10 %..90 %
of calls) >= 95 % of target and every call ended. Stepping stops at the first
failing step; the figure is the highest passing rate. CPU % (100 % = one core)
per process from /proc/<pid>/stat over [t0+2 s, t0+duration] (Kamailio: its
process tree; the edge: all its threads).

Tokens for the edge are minted here with hmac (SPEC 3a: HS256, signing key =
HMAC-SHA256(full key, "tollgate-sip-token-v1"), unique jti), one per call, into
the UAC's -inf CSV. The edge gets a key from `tollgate keys create`.

Prints one line per step, a SUMMARY line per mode, the ratios edge/kamailio
and edge/direct, and CPU ms per call for the edge and Kamailio.

With --state redis (issue 12) the edge runs twice in the same run: embedded
(mode edge) and on a redis-server of its own on 127.0.0.1 (mode edge-redis,
[state] url, a key with a cps limit so that every INVITE runs the admission
script: jti single use + GCRA). Per edge-redis step it prints the Redis round
trips per INVITE from INFO commandstats (EVALSHA calls minus the CDR
publications, counted by their XADD; target 1) and redis-server's CPU, and at
the end RATIO edge-redis/edge (target >= 0.8) and CPU per call of both.

Quick run:  benches/sipp_cps.py --only edge --rates 200,400 --duration 5 --repeats 1
Redis:      benches/sipp_cps.py --only edge --state redis --rates 500,1000,2000 --repeats 1
Full run:   benches/sipp_cps.py            (about 30 min on 2 cores)
"""
import argparse, base64, csv, hashlib, hmac, json, os, shutil, signal, statistics
import subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS_SIPP = os.path.join(ROOT, "crates", "tollgate", "tests", "sipp")
DEFAULT_PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")
SIPP = "sipp"
KAMAILIO = "/usr/sbin/kamailio"
BUF = "4194304"
SERVICE = "15551230000"
TICK = os.sysconf("SC_CLK_TCK")

DEFAULT_RATES = {
    "direct": "2000,4000,8000,12000,16000,20000,24000",
    "kamailio": "500,1000,1500,1750,2000,2250,2500,2750,3000",
    "edge": "200,500,1000,1500,2000,2500,3000,3500,4000,5000,6000",
}

# ---------------------------------------------------------------- /proc helpers


def _children(pid):
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree_rss_kib(pid):
    """Resident memory of a process and its descendants, KiB (0 if gone)."""
    total = 0
    for p in tree(pid) if pid else []:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pid):
    """utime+stime of pid, all its threads."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return 0.0
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu(pid):
    return sum(cpu_seconds(p) for p in tree(pid))


def system_busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK


def udp_port_busy(port):
    for fn in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(fn) as f:
                if any(l.split()[1].endswith(f":{port:04X}") for l in f.readlines()[1:]):
                    return True
        except OSError:
            pass
    return False


def wait_udp_listen(port, timeout=15.0):
    want = f"0100007F:{port:04X}"
    end = time.time() + timeout
    while time.time() < end:
        with open("/proc/net/udp") as f:
            if any(want == l.split()[1] for l in f.readlines()[1:]):
                return True
        time.sleep(0.05)
    return False


def udp_rcvbuf_errors():
    with open("/proc/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def stop(proc, grace=5.0):
    """SIGTERM the Popen by its PID, wait, SIGKILL only that PID if needed."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def wait_bounded(proc, limit):
    """Wait for proc up to limit s, then SIGTERM / SIGKILL it by PID. -> (rc, timed_out)."""
    end = time.time() + limit
    while proc.poll() is None:
        if time.time() > end:
            stop(proc)
            return proc.returncode, True
        time.sleep(0.1)
    return proc.returncode, False


def install_sigterm():
    def h(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, h)
    signal.signal(signal.SIGHUP, h)

# ---------------------------------------------------------------- SIPp stats


def parse_stat(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    hdr, data = rows[0], [r for r in rows[1:] if len(r) >= len(rows[0]) - 1]
    idx = {h: i for i, h in enumerate(hdr)}

    def num(r, k):
        return float(r[idx[k]])

    def epoch(r, k):
        return float(r[idx[k]].split("\t")[-1])

    last = data[-1]
    res = {k: num(last, k) for k in ("TotalCallCreated", "SuccessfulCall(C)", "FailedCall(C)", "Retransmissions(C)")}
    total = res["TotalCallCreated"]
    pts = [(epoch(r, "CurrentTime"), num(r, "TotalCallCreated")) for r in data]
    lo = [p for p in pts if p[1] >= 0.1 * total]
    hi = [p for p in pts if p[1] <= 0.9 * total]
    res["steady_rate"] = float("nan")
    if lo and hi and hi[-1][0] > lo[0][0]:
        res["steady_rate"] = (hi[-1][1] - lo[0][1]) / (hi[-1][0] - lo[0][0])
    if "ResponseTime1(C)" in idx:
        h, m, s, us = last[idx["ResponseTime1(C)"]].split(":")
        res["rtd_ms"] = (int(h) * 3600 + int(m) * 60 + int(s)) * 1000 + int(us) / 1000
    return res

# ---------------------------------------------------------------- tokens


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def mint_tokens(key, n, tag):
    kid = key[6:].split("_")[0]
    sk = hmac.new(key.encode(), b"tollgate-sip-token-v1", hashlib.sha256).digest()
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}, separators=(",", ":")).encode())
    now = int(time.time())
    out = []
    for i in range(n):
        claims = {"iat": now - 5, "exp": now + 3000, "jti": f"b{tag}-{i}-{os.urandom(6).hex()}",
                  "to": SERVICE, "from": "sipp"}
        si = head + "." + b64url(json.dumps(claims, separators=(",", ":")).encode())
        out.append(si + "." + b64url(hmac.new(sk, si.encode(), hashlib.sha256).digest()))
    return out

# ---------------------------------------------------------------- daemons


def start_uas(a, tmp):
    p = subprocess.Popen(
        [SIPP, "-sf", f"{a.kit}/sipp/uas.xml", "-i", "127.0.0.1", "-p", str(a.uas_port),
         "-mp", str(a.port_base + 40), "-cp", str(a.port_base + 46),
         "-nostdin", "-buff_size", BUF, "-trace_err", "-error_file", f"{tmp}/uas_err.log",
         "-max_socket", "4096"],
        stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/uas.stderr", "w"), stdin=subprocess.DEVNULL, cwd=tmp)
    if not wait_udp_listen(a.uas_port):
        stop(p)
        raise SystemExit("UAS did not start")
    return p


def start_kamailio(a, tmp):
    os.makedirs(f"{tmp}/kamrun", exist_ok=True)
    cmd = [KAMAILIO, "-f", f"{a.kit}/kamailio/kamailio.cfg", "-DD", "-E", "-m", "1024", "-M", "16",
           "-Y", f"{tmp}/kamrun", "-P", f"{tmp}/kamailio.pid", "-A", f"KAM_CHILDREN={a.children}",
           "-A", f"KAM_LISTEN=udp:127.0.0.1:{a.proxy_port}", "-A", f'UAS_ADDR="sip:127.0.0.1:{a.uas_port}"',
           "-A", "WITH_AUTH"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/kamailio.log", "a"),
                         stdin=subprocess.DEVNULL, cwd=tmp)
    if not wait_udp_listen(a.proxy_port):
        stop(p)
        raise SystemExit(f"kamailio did not start, see {tmp}/kamailio.log")
    time.sleep(0.5)
    return p


def start_redis(a, tmp):
    """A redis-server of the bench's own on 127.0.0.1:<port-base + 30>."""
    d = tempfile.mkdtemp(prefix="redis-", dir=tmp)
    p = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(a.redis_port),
                          "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", d],
                         stdout=open(f"{tmp}/redis.log", "a"), stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    end = time.time() + 10
    while time.time() < end:
        if redis_cli(a, "PING") == "PONG":
            return p
        time.sleep(0.1)
    stop(p)
    raise SystemExit(f"redis-server on {a.redis_port} did not answer, see {tmp}/redis.log")


def redis_cli(a, *args):
    r = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(a.redis_port), *args],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip()


def redis_calls(a):
    """INFO commandstats as {command: calls} (script-run commands included)."""
    out = {}
    for line in redis_cli(a, "INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_") and ":" in line:
            name, rest = line[len("cmdstat_"):].split(":", 1)
            for f in rest.split(","):
                if f.startswith("calls="):
                    out[name] = int(f[len("calls="):])
    return out


def edge_config(a, tmp, redis):
    cfg = f"{tmp}/tollgate.toml"
    state = (f'\n[state]\nurl = "redis://127.0.0.1:{a.redis_port}/0"\nnode = "bench"\n'
             if redis else "")
    with open(cfg, "w") as f:
        f.write(f"""[sip]
listen = ["udp:127.0.0.1:{a.proxy_port}"]
realm = "tollgate"
digest_algorithms = ["MD5", "SHA-256"]

[metrics]
listen = "127.0.0.1:0"

[media]
# Every call is anchored (4 ports a call): room for ~10k calls in flight.
ports = "20000-59999"

[admin]
listen = "127.0.0.1:0"

[[routes]]
target = "sip:service@127.0.0.1:{a.uas_port}"
media = "rtp"
{state}""")
    return cfg


def start_edge(a, tmp, data_dir, cfg):
    env = dict(os.environ, RUST_LOG=a.edge_log)
    p = subprocess.Popen([a.tollgate, "serve", "--data-dir", data_dir, "--config", cfg],
                         stdout=subprocess.PIPE, stderr=open(f"{tmp}/edge.stderr", "a"),
                         stdin=subprocess.DEVNULL, cwd=tmp, env=env, text=True)
    end = time.time() + 20
    while time.time() < end:
        line = p.stdout.readline()
        if not line:
            break
        if line.strip() == "tollgate: ready":
            # keep draining stdout so the edge never blocks on a full pipe
            import threading
            threading.Thread(target=lambda: [None for _ in p.stdout], daemon=True).start()
            return p
    stop(p)
    raise SystemExit(f"edge did not print 'tollgate: ready', see {tmp}/edge.stderr")

# ---------------------------------------------------------------- steps


def run_step(a, mode, tmp, rate, daemons, tag, key):
    calls = int(rate * a.duration)
    stat = f"{tmp}/uac_{tag}_{rate}.csv"
    target = f"127.0.0.1:{a.uas_port if mode == 'direct' else a.proxy_port}"
    scen = {"direct": f"{a.kit}/sipp/uac.xml", "kamailio": f"{a.kit}/sipp/uac_auth.xml",
            "edge": f"{TESTS_SIPP}/uac_bearer.xml", "edge-redis": f"{TESTS_SIPP}/uac_bearer.xml"}[mode]
    cmd = [SIPP, "-sf", scen, target, "-i", "127.0.0.1", "-p", str(a.uac_port),
           "-mp", str(a.port_base + 50), "-cp", str(a.port_base + 56), "-nostdin",
           "-r", str(rate), "-m", str(calls), "-d", str(a.call_ms), "-l", str(max(3 * rate, 1000)),
           "-buff_size", BUF, "-max_socket", "4096", "-s", SERVICE,
           "-recv_timeout", "10s", "-default_behaviors", "all,-abortunexp",
           "-trace_stat", "-stf", stat, "-fd", "1",
           "-trace_err", "-error_file", f"{tmp}/uac_{tag}_{rate}_err.log"]
    if mode == "kamailio":
        cmd += ["-au", "peeruser", "-ap", "secret"]
    if mode.startswith("edge"):
        inf = f"{tmp}/tokens_{tag}_{rate}.csv"
        with open(inf, "w") as f:
            f.write("SEQUENTIAL\n")
            for t in mint_tokens(key, calls, f"{tag}-{rate}"):
                f.write(t + ";\n")
        cmd += ["-inf", inf]
    drops0 = udp_rcvbuf_errors()
    redis0 = redis_calls(a) if mode == "edge-redis" else None
    server = daemons.get("edge")  # (kamailio: its children map one shared segment)
    rss0 = tree_rss_kib(server)
    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{tmp}/uac.stderr", "a"),
                         stdin=subprocess.DEVNULL, cwd=tmp)
    procs = dict(daemons, uac=p.pid)
    win = [t0 + 2.0, t0 + a.duration]
    snaps = []
    try:
        while len(snaps) < 2 and p.poll() is None:
            if time.time() >= win[len(snaps)]:
                snaps.append((time.time(), {n: tree_cpu(pid) for n, pid in procs.items()}, system_busy_seconds()))
                rss1 = tree_rss_kib(server)
            time.sleep(0.05)
        rc, timed_out = wait_bounded(p, max(1.0, t0 + a.duration + 40 - time.time()))
    except BaseException:
        stop(p)
        raise
    drops = udp_rcvbuf_errors() - drops0
    st = parse_stat(stat)
    created = st["TotalCallCreated"] or 1
    fail_pct = 100.0 * st["FailedCall(C)"] / created
    cpu = {}
    if len(snaps) == 2:
        (ta, ca, sa), (tb, cb, sb) = snaps
        for n in procs:
            cpu[n] = 100.0 * (cb[n] - ca[n]) / (tb - ta)
        cpu["other"] = max(0.0, 100.0 * (sb - sa) / (tb - ta) - sum(cpu.values()))
    ok = (not timed_out and fail_pct < a.max_fail_pct and st["steady_rate"] >= 0.95 * rate
          and st["SuccessfulCall(C)"] + st["FailedCall(C)"] >= calls)
    cpus = " ".join(f"{k}={v:.0f}%" for k, v in cpu.items())
    # Every call created in the step is still held at its end (up, or its
    # BYE's transaction lingering 32 s): memory per call of the server.
    if len(snaps) == 2 and rss0:
        held = max(1, int(rate * (a.duration - 0.0)))
        cpus += f" rss={rss1 / 1024:.0f}MiB rss_per_call={(rss1 - rss0) / held:.2f}KiB"
    if redis0 is not None:
        time.sleep(1.0)  # the last CDRs' publication (every 250 ms)
        r1 = redis_calls(a)
        d = {k: r1.get(k, 0) - redis0.get(k, 0) for k in r1}
        invites = max(1, int(created))
        trips = (d.get("evalsha", 0) + d.get("eval", 0) - d.get("xadd", 0)) / invites
        cpus += (f" redis_round_trips_per_invite={trips:.2f} (evalsha={d.get('evalsha', 0)} "
                 f"cdr_xadd={d.get('xadd', 0)} invites={invites})")
    print(f"  [{mode} {tag}] target={rate:>5} cps calls={int(created)} ok={int(st['SuccessfulCall(C)'])} "
          f"failed={int(st['FailedCall(C)'])} ({fail_pct:.2f}%) steady={st['steady_rate']:.0f} cps "
          f"retrans={int(st['Retransmissions(C)'])} udp_rcvbuf_drops={drops} "
          f"rtd_mean={st.get('rtd_ms', float('nan')):.1f}ms cpu(200%=2 cores): {cpus} "
          f"sipp_rc={rc}{' TIMEOUT' if timed_out else ''} -> {'PASS' if ok else 'FAIL'}", flush=True)
    return ok, cpu, st["steady_rate"]


def sweep(a, mode, rates):
    tmp = os.path.join(a.tmp, mode)
    os.makedirs(tmp, exist_ok=True)
    best = []
    for rep in range(1, a.repeats + 1):
        uas = srv = redis = None
        key = None
        try:
            uas = start_uas(a, tmp)
            daemons = {"uas": uas.pid}
            if mode == "kamailio":
                srv = start_kamailio(a, tmp)
                daemons["kamailio"] = srv.pid
            elif mode.startswith("edge"):
                data_dir = tempfile.mkdtemp(prefix=f"data{rep}-", dir=tmp)
                on_redis = mode == "edge-redis"
                if on_redis:
                    redis = start_redis(a, tmp)
                    daemons["redis"] = redis.pid
                cfg = edge_config(a, tmp, on_redis)
                create = [a.tollgate, "keys", "create", "--data-dir", data_dir, "--name", "bench"]
                if on_redis:
                    # A cps limit (far above the load): the admission script
                    # runs its GCRA as well as the jti's SET NX.
                    create += ["--config", cfg, "--cps", "1000000"]
                key = subprocess.run(create, check=True, capture_output=True, text=True,
                                     timeout=60).stdout.strip()
                srv = start_edge(a, tmp, data_dir, cfg)
                daemons["edge"] = srv.pid
            top, top_cpu, top_steady = 0, {}, 0.0
            for rate in rates:
                ok, cpu, steady = run_step(a, mode, tmp, rate, daemons, f"r{rep}", key)
                if not ok:
                    break
                top, top_cpu, top_steady = rate, cpu, steady
                time.sleep(a.settle)
        finally:
            stop(srv)
            stop(uas)
            stop(redis)
        print(f"  [{mode}] repeat {rep}: highest passing rate = {top} cps  cpu@top: "
              + " ".join(f"{k}={v:.0f}%" for k, v in top_cpu.items()), flush=True)
        best.append((top, top_cpu, top_steady))
        time.sleep(2)
    tops = [b[0] for b in best]
    med = statistics.median(tops)
    # CPU per call at the repeat closest to the median
    rep = min(best, key=lambda b: abs(b[0] - med))
    print(f"SUMMARY cps mode={mode} highest_passing_cps min={min(tops)} median={med:g} max={max(tops)} "
          f"repeats={tops} (grid {rates}, {a.duration}s/step, <{a.max_fail_pct}% failed)", flush=True)
    return med, rep


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["direct", "kamailio", "edge"], action="append",
                    help="run only this mode (repeatable); default: all three")
    ap.add_argument("--rates", help="comma-separated rate grid for every mode (default: per mode)")
    ap.add_argument("--duration", type=int, default=20, help="seconds of load per step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--call-ms", type=int, default=1000, help="SIPp -d (pause before BYE)")
    ap.add_argument("--max-fail-pct", type=float, default=0.5)
    ap.add_argument("--settle", type=float, default=4.0, help="idle seconds between steps")
    ap.add_argument("--children", type=int, default=4, help="kamailio UDP children")
    ap.add_argument("--tollgate", default=os.path.join(ROOT, "target", "release", "tollgate"),
                    help="edge binary (default: the release build)")
    ap.add_argument("--edge-log", default="warn", help="RUST_LOG for the edge (per-call logging costs CPU)")
    ap.add_argument("--peers", default=os.environ.get("PEERS_KIT", DEFAULT_PEERS),
                    help="the peers kit (kamailio.cfg, sipp/uac*.xml, sipp/uas.xml); copied to --tmp")
    ap.add_argument("--tmp", default="/tmp/tollgate-bench/cps")
    ap.add_argument("--state", choices=["embedded", "redis"], default="embedded",
                    help="redis: run the edge on a Redis of its own as well (mode edge-redis), next to embedded")
    ap.add_argument("--port-base", type=int, default=int(os.environ.get("BENCH_SIP_PORT_BASE", 5160)),
                    help="proxy/edge=base, UAC=base+10, UAS=base+20; SIPp media/control base+40..+56")
    a = ap.parse_args()
    modes = a.only or ["direct", "kamailio", "edge"]
    if a.state == "redis" and "edge" in modes:
        modes = modes + ["edge-redis"]
        if shutil.which("redis-server") is None:
            raise SystemExit("redis-server not found (Debian: apt-get install redis-server)")
    a.proxy_port, a.uac_port, a.uas_port = a.port_base, a.port_base + 10, a.port_base + 20
    a.redis_port = a.port_base + 30
    if shutil.which(SIPP) is None:
        raise SystemExit("sipp not found (Debian: apt-get install sip-tester)")
    if "kamailio" in modes and not os.path.exists(KAMAILIO):
        raise SystemExit(f"{KAMAILIO} not found (Debian: apt-get install kamailio)")
    if "edge" in modes and not os.access(a.tollgate, os.X_OK):
        raise SystemExit(f"{a.tollgate} missing: cargo build --release -p tollgate (or pass --tollgate)")
    busy = [p for p in (a.proxy_port, a.uac_port, a.uas_port) if udp_port_busy(p)]
    if busy:
        raise SystemExit(f"UDP port(s) {busy} in use; use --port-base / BENCH_SIP_PORT_BASE")
    install_sigterm()
    os.makedirs(a.tmp, exist_ok=True)
    # the peers kit may be read-only where it stands: work on a copy
    kit = os.path.join(a.tmp, "peers-kit")
    shutil.rmtree(kit, ignore_errors=True)
    shutil.copytree(a.peers, kit, ignore=shutil.ignore_patterns("rtpengine"))
    a.kit = kit
    # Every process under test inherits this: an anchored call holds four UDP
    # sockets, so at 5,000 calls/s x 1 s an edge needs ~25,000 descriptors
    # (Kamailio and SIPp get the same room). Root may raise the hard limit.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 17
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} {os.cpu_count()} cores, load {load}; modes={modes} "
          f"duration={a.duration}s call={a.call_ms}ms repeats={a.repeats} ports proxy/edge={a.proxy_port} "
          f"uac={a.uac_port} uas={a.uas_port} edge={a.tollgate} nofile={nofile}", flush=True)
    res = {}
    for m in modes:
        rates = [int(x) for x in (a.rates or DEFAULT_RATES["edge" if m == "edge-redis" else m]).split(",")]
        res[m] = sweep(a, m, rates)

    def per_call_ms(mode, proc):
        med, (top, cpu, steady) = res[mode]
        if not top or proc not in cpu:
            return None
        return cpu[proc] / 100.0 * 1000.0 / top

    print("RESULT " + "  ".join(f"{m}={res[m][0]:g}cps" for m in modes))
    if "edge" in res:
        e = res["edge"][0]
        for other in ("kamailio", "direct"):
            if other in res and res[other][0]:
                print(f"RATIO edge/{other} = {e / res[other][0]:.2f}")
        ms = per_call_ms("edge", "edge")
        if ms is not None:
            print(f"CPU edge = {ms:.3f} ms per call (edge process at {res['edge'][1][0]} cps, "
                  f"{res['edge'][1][1]['edge']:.0f}% of one core)")
    if "edge-redis" in res:
        if res.get("edge", (0,))[0]:
            print(f"RATIO edge-redis/edge = {res['edge-redis'][0] / res['edge'][0]:.2f} (target >= 0.8)")
        ms = per_call_ms("edge-redis", "edge")
        if ms is not None:
            print(f"CPU edge on redis = {ms:.3f} ms per call (edge process at {res['edge-redis'][1][0]} cps)")
        ms = per_call_ms("edge-redis", "redis")
        if ms is not None:
            print(f"CPU redis-server = {ms:.3f} ms per call")
    if "kamailio" in res:
        ms = per_call_ms("kamailio", "kamailio")
        if ms is not None:
            print(f"CPU kamailio = {ms:.3f} ms per call (process tree at {res['kamailio'][1][0]} cps, "
                  f"{res['kamailio'][1][1]['kamailio']:.0f}% of one core)")


if __name__ == "__main__":
    main()
