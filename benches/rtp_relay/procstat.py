# Copied from shared/peers/lib/procstat.py (the peers kit), unchanged below this line.
"""Tiny /proc helpers: CPU seconds of a process tree, start/stop by PID."""
import os, signal, subprocess, time

TICK = os.sysconf("SC_CLK_TCK")


def _children(pid):
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def cpu_seconds(pid):
    """utime+stime (s) of pid (all threads) - not of its children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return 0.0
    fields = s[s.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu(pid):
    return sum(cpu_seconds(p) for p in tree(pid))


def snapshot(pids):
    """{name: cpu seconds of tree} for {name: pid}."""
    return {n: tree_cpu(p) for n, p in pids.items()}


def stop(proc, name="", grace=5.0):
    """SIGTERM the Popen by its PID, wait, SIGKILL only that PID if needed."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def udp_port_busy(port):
    """True if anything is bound to udp port (127.0.0.1 or wildcard)."""
    for fn in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(fn) as f:
                for line in f.readlines()[1:]:
                    local = line.split()[1]
                    if local.endswith(f":{port:04X}"):
                        return True
        except OSError:
            pass
    return False


def system_busy_seconds():
    """Busy CPU seconds of the whole machine (all cores) from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / TICK


def udp_rcvbuf_errors():
    """Machine-wide UDP receive-buffer drops (IPv4), /proc/net/snmp."""
    with open("/proc/net/snmp") as f:
        lines = [l.split() for l in f if l.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])


def install_sigterm():
    """Turn SIGTERM/SIGHUP into SystemExit so finally: blocks stop daemons."""
    def h(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, h)
    signal.signal(signal.SIGHUP, h)


def wait_rusage(proc, limit):
    """Wait for Popen up to limit s (then SIGTERM/SIGKILL it by PID).
    Returns (exitcode, rusage of that child, timed_out)."""
    end = time.time() + limit
    timed_out = False
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, ru, timed_out
        if time.time() > end and not timed_out:
            timed_out = True
            os.kill(proc.pid, signal.SIGTERM)
            end = time.time() + 5
        elif timed_out and time.time() > end:
            os.kill(proc.pid, signal.SIGKILL)
            end = time.time() + 3600
        time.sleep(0.1)


def wait_udp_listen(port, timeout=10.0):
    """Wait until something listens on 127.0.0.1:port/udp."""
    want = f"0100007F:{port:04X}"
    end = time.time() + timeout
    while time.time() < end:
        with open("/proc/net/udp") as f:
            if any(want in line.split()[1:2] for line in f.readlines()[1:]):
                return True
        time.sleep(0.1)
    return False
