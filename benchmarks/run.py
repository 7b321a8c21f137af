#!/usr/bin/env python3
"""
txcluster benchmark suite: one command, one report.

    python benchmarks/run.py                 # full run (about 15 minutes)
    python benchmarks/run.py --quick --check # CI smoke (about a minute)

Starts every contender on 127.0.0.1 (one plain twistd, txcluster rr /
shared / least-busy, one node process, Node's cluster under SCHED_RR and
SCHED_NONE when `node` is on PATH), loads it with wrk (keep-alive and
`Connection: close`, on a trivial answer and on ~1 ms of CPU per request),
a paced client at a moderate fixed rate, a connect flood
(benchmarks/connflood.c), 32 long-lived connections and a mixed workload,
reads CPU and RSS from /proc, stops it by pid and prints three tables
(throughput and scaling; CPU per connection; latency, placement and memory)
plus the targets of issue 9 with PASS/FAIL.  See benchmarks/README.md for
how each column is measured.

Only the standard library is used here; the contenders run with --python
(default: this interpreter), which needs Twisted and txcluster's
dependencies.  txcluster itself is imported from this source tree.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CORES = len(os.sched_getaffinity(0))

# Targets from issue 9 (2 workers, ratios within one run, same machine).
TARGET_CLOSE_RR_VS_SHARED = 0.75
TARGET_CPU_CLOSE_RR_VS_SHARED_SCALING = 0.95
TARGET_CPU_KEEPALIVE_RR_SCALING = 1.85
TARGET_CPU_KEEPALIVE_SHARED_SCALING = 1.7
TARGET_BUSIEST_LONG = 55.0
TARGET_FLOOD_VS_NODE_RR = 2.0
TARGET_HANDOFF_US_MODERATE = 60.0
TARGET_HANDOFF_US_FLOOD = 25.0
# Kept from issue 4.
TARGET_MASTER_RSS_MB = 40.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# /proc helpers -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (not its children), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
        except OSError:
            pass
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _proc_ticks() -> dict[int, tuple[str, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        out[int(name)] = (head.partition("(")[2], int(fields[11]) + int(fields[12]))
    return out


def busiest_processes(interval: float = 0.5, top: int = 3) -> str:
    """Who keeps the machine busy: the top CPU users over `interval` s."""
    a = _proc_ticks()
    time.sleep(interval)
    b = _proc_ticks()
    mine = {os.getpid()} | {pid for s in Started.registry for pid in ([s.pid] + sorted(s.seen))}
    users = sorted(((b[p][1] - a[p][1], p, b[p][0]) for p in b if p in a), reverse=True)[:top]
    return ", ".join(f"{name}[{pid}]{' (ours)' if pid in mine else ''} {100 * t / CLK_TCK / interval:.0f}%"
                     for t, pid, name in users if t > 0) or "nobody in particular (kernel?)"


def machine_busy(interval: float = 0.25) -> float:
    """Fraction of all CPUs busy over `interval` seconds."""

    def sample():
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + values[4]
        return idle, sum(values[:8])

    i0, t0 = sample()
    time.sleep(interval)
    i1, t1 = sample()
    total = t1 - t0
    return 0.0 if total <= 0 else 1.0 - (i1 - i0) / total


class Idle:
    """Waits for an idle-ish machine before each measurement, within a total
    budget so that a machine that never calms down cannot stretch the run."""

    threshold = 0.15
    budget = 60.0
    interval = 0.25  # seconds per sample
    samples: list = []

    @classmethod
    def wait(cls, limit: float, what: str = "") -> float:
        if cls.budget <= 0:
            # Spent: one sample, for the summary, and no more waiting.
            busy = machine_busy(cls.interval)
            cls.samples.append((what, busy))
            return busy
        limit = max(1.0, min(limit, cls.budget))
        start = time.monotonic()
        deadline = start + limit
        quiet = 0
        busy = 1.0
        while time.monotonic() < deadline:
            busy = machine_busy(cls.interval)
            quiet = quiet + 1 if busy < cls.threshold else 0
            if quiet >= 2:
                break
        else:
            log(f"machine still {busy:.0%} busy after waiting {limit:.0f} s; going on with "
                f"{what or 'warm-up/start'}; top: {busiest_processes()}")
        cls.budget = max(0.0, cls.budget - (time.monotonic() - start))
        if cls.budget <= 0:
            log("the budget for waiting on an idle machine is spent: measuring without waiting from now on")
        cls.samples.append((what, busy))
        return busy

    @classmethod
    def summary(cls) -> str:
        measured = [(w, b) for w, b in cls.samples if w]
        noisy = [(w, b) for w, b in measured if b >= cls.threshold]
        if not noisy:
            return f"machine idle (< {cls.threshold:.0%} CPU busy) before all {len(measured)} measurements"
        worst = max(noisy, key=lambda x: x[1])
        return (f"NOISY: {len(noisy)} of {len(measured)} measurements started on a busy machine "
                f"(other processes; worst {worst[1]:.0%} before {worst[0]}); treat those numbers with care")


def wait_idle(limit: float, what: str = "") -> float:
    return Idle.wait(limit, what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_get(port: int, path: str = "/", timeout: float = 2.0) -> tuple[int, dict, bytes]:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


# Processes: everything started is registered and killed by pid ------------


class Started:
    """A process tree this script started: the pid it spawned plus every
    descendant it has seen."""

    registry: list["Started"] = []

    def __init__(self, name: str, cmd: list[str], env: dict, logpath: str, cwd: str) -> None:
        self.name = name
        self.logpath = logpath
        self.logfile = open(logpath, "wb")
        self.proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=self.logfile,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.pid = self.proc.pid
        self.seen: set[int] = set()
        Started.registry.append(self)

    def remember(self) -> list[int]:
        kids = descendants(self.pid)
        self.seen.update(kids)
        return kids

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            with open(self.logpath, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the pid we spawned, wait, then SIGKILL it and every
        descendant we saw (only those: nothing is killed by name)."""
        if self.running():
            self.remember()
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: still running {grace:.0f} s after SIGTERM; killing it")
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.remember()
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for pid in sorted(self.seen):
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not self.logfile.closed:
            self.logfile.close()
        if self in Started.registry:
            Started.registry.remove(self)

    @classmethod
    def kill_all(cls) -> None:
        for started in list(cls.registry):
            try:
                started.kill()
            except Exception as e:  # keep cleaning up
                log(f"cleanup of {started.name} failed: {e}")


# Contenders ----------------------------------------------------------------


class Contender:
    """One server under test.  `baseline` names the one-process server its
    throughput is a ratio to; `reference` names the mode whose workers'
    CPU per connection its handoff overhead is counted above."""

    kind = "?"
    has_master = True
    baseline: str | None = None
    reference: str | None = None

    def __init__(self, name: str, cfg) -> None:
        self.name = name
        self.cfg = cfg
        self.http_port = free_port()
        self.flood_port = free_port()
        self.dir = tempfile.mkdtemp(prefix=f"{name.replace(' ', '_')}.", dir=cfg.tmp)
        self.proc: Started | None = None
        self.workers_expected = cfg.workers

    # to override
    def command(self) -> tuple[list[str], dict]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def stats(self) -> dict[int, dict]:
        raise NotImplementedError

    # common
    def base_env(self) -> dict:
        env = dict(os.environ)
        env["BENCH_HTTP_PORT"] = str(self.http_port)
        env["BENCH_FLOOD_PORT"] = str(self.flood_port)
        env["BENCH_STATS_DIR"] = self.dir
        env["BENCH_APP"] = self.cfg.app
        env["BENCH_CPU_ITERATIONS"] = str(self.cfg.cpu_iterations)
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.pop("NODE_CLUSTER_SCHED_POLICY", None)
        return env

    def start(self, timeout: float = 40.0) -> None:
        cmd, env = self.command()
        self.proc = Started(self.name, cmd, env, os.path.join(self.dir, "output.log"), self.dir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.running():
                raise BenchError(f"{self.name} exited with {self.proc.proc.returncode} while starting")
            if self.is_ready():
                break
            time.sleep(0.1)
        else:
            raise BenchError(f"{self.name} was not ready after {timeout:.0f} s")
        # Both ports answer, and the expected number of workers is there.
        status, headers, body = http_get(self.http_port)
        if status != 200 or "x-worker" not in headers:
            raise BenchError(f"{self.name}: GET / answered {status} {headers}")
        status, headers, body = http_get(self.http_port, CPU_PATH, timeout=10)
        if status != 200 or body != b"hello\n":
            raise BenchError(f"{self.name}: GET {CPU_PATH} answered {status} {body[:80]!r}")
        with socket.create_connection((HOST, self.flood_port), timeout=2) as s:
            s.settimeout(2)
            if s.recv(1) != b"":
                raise BenchError(f"{self.name}: the flood port did not close the connection")
        pids = self.worker_pids()
        if len(pids) != self.workers_expected:
            raise BenchError(f"{self.name}: expected {self.workers_expected} workers, found {pids}")
        self.proc.remember()

    def master_pid(self) -> int | None:
        return self.proc.pid if self.has_master else None

    def stop(self) -> int | None:
        return self.proc.stop() if self.proc else None

    def tail(self, lines: int = 15) -> str:
        if not self.proc:
            return ""
        return "\n".join(self.proc.log_text().splitlines()[-lines:])


class TwistedContender(Contender):
    """Stats through SIGUSR2: each process writes $BENCH_STATS_DIR/<pid>.json."""

    def stats(self) -> dict[int, dict]:
        pids = self.worker_pids()
        for pid in pids:
            try:
                os.unlink(os.path.join(self.dir, f"{pid}.json"))
            except FileNotFoundError:
                pass
            os.kill(pid, signal.SIGUSR2)
        out: dict[int, dict] = {}
        deadline = time.monotonic() + 5
        while len(out) < len(pids) and time.monotonic() < deadline:
            for pid in pids:
                if pid in out:
                    continue
                try:
                    with open(os.path.join(self.dir, f"{pid}.json")) as f:
                        out[pid] = json.load(f)
                except (FileNotFoundError, ValueError):
                    pass
            if len(out) < len(pids):
                time.sleep(0.01)
        if len(out) < len(pids):
            raise BenchError(f"{self.name}: no statistics from {sorted(set(pids) - set(out))}")
        return out


class SingleTwistd(TwistedContender):
    kind = "single"
    has_master = False
    baseline = "single twistd"

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.workers_expected = 1

    def command(self):
        cmd = [self.cfg.python, "-c", "from twisted.scripts.twistd import run; run()",
               "--pidfile=", "-n", "-y", os.path.join(HERE, "app.tac")]
        return cmd, self.base_env()

    def is_ready(self):
        try:
            return http_get(self.http_port, timeout=0.5)[0] == 200
        except OSError:
            return False

    def worker_pids(self):
        return [self.proc.pid]


class TxCluster(TwistedContender):
    kind = "txcluster"
    baseline = "single twistd"
    reference = "txcluster shared"

    def __init__(self, name, cfg, scheduling: str, workers: int | None = None):
        super().__init__(name, cfg)
        self.scheduling = scheduling
        self.workers_expected = workers or cfg.workers

    def command(self):
        cmd = [self.cfg.python, "-c", "from twisted.scripts.twistd import run; run()",
               "--pidfile=", "-n", "txcluster", "--app", os.path.join(HERE, "app.tac"),
               "--workers", str(self.workers_expected), "--scheduling", self.scheduling,
               "--graceful-timeout", "5"]
        return cmd, self.base_env()

    def is_ready(self):
        text = self.proc.log_text()
        ready = len(re.findall(r"worker \d+ \(pid \d+\) ready in", text))
        return ready >= self.workers_expected

    def worker_pids(self):
        return sorted(children(self.proc.pid))


class NodeCluster(Contender):
    kind = "node"
    baseline = "node single"
    reference = "node none"

    def __init__(self, name, cfg, policy: str | None):
        super().__init__(name, cfg)
        self.policy = policy
        self.stats_port = free_port()

    def command(self):
        env = self.base_env()
        env["BENCH_STATS_PORT"] = str(self.stats_port)
        env["BENCH_WORKERS"] = str(self.cluster_workers())
        if self.policy:
            env["NODE_CLUSTER_SCHED_POLICY"] = self.policy
        return [self.cfg.node, os.path.join(HERE, "node_cluster.js")], env

    def is_ready(self):
        return "ready" in self.proc.log_text().split()

    def cluster_workers(self) -> int:
        return self.workers_expected

    def worker_pids(self):
        return sorted(children(self.proc.pid))

    def stats(self):
        with urllib.request.urlopen(f"http://{HOST}:{self.stats_port}/stats", timeout=5) as r:
            answers = json.load(r)
        if len(answers) != self.workers_expected:
            raise BenchError(f"{self.name}: statistics from {len(answers)} workers only")
        return {a["pid"]: a for a in answers}


class NodeSingle(NodeCluster):
    """One node process serving both ports itself: no cluster module."""

    kind = "single"
    has_master = False
    reference = None

    def __init__(self, name, cfg):
        super().__init__(name, cfg, None)
        self.workers_expected = 1

    def cluster_workers(self) -> int:
        return 0

    def worker_pids(self):
        return [self.proc.pid]


# Load generators -----------------------------------------------------------

#: The CPU-bound request: app.tac and node_cluster.js compute
#: $BENCH_CPU_ITERATIONS rounds of PBKDF2-SHA256 before answering.
CPU_PATH = "/cpu"

CALIBRATE_CPU = """
import hashlib, time
def once(n):
    t = time.process_time()
    hashlib.pbkdf2_hmac("sha256", b"txcluster", b"benchmark", n)
    return time.process_time() - t
print(min(once(20000) for _ in range(5)) / 20000)
"""


def calibrate_cpu(python: str, ms: float) -> tuple[int, float]:
    """PBKDF2 rounds that take `ms` of CPU in the contenders' Python (the
    fastest of 5 tries, so that a busy machine does not inflate it), and the
    seconds one round takes."""
    out = subprocess.run([python, "-c", CALIBRATE_CPU], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise BenchError(f"cannot calibrate the CPU workload: {out.stderr.strip()}")
    per_round = float(out.stdout)
    return max(1, round(ms / 1000.0 / per_round)), per_round


def parse_duration_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(cfg, port: int, seconds: float, close: bool = False, path: str = "/", script: str | None = None) -> dict:
    cmd = [cfg.wrk, "-t1", f"-c{cfg.connections}", f"-d{max(1, round(seconds))}s", "--latency", "--timeout", "5s"]
    if close:
        cmd += ["-H", "Connection: close"]
    if script:
        cmd += ["-s", script]
    cmd.append(f"http://{HOST}:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    text = out.stdout
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {out.stderr.strip() or text.strip()}")
    result = {"output": text}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise BenchError(f"cannot parse wrk output:\n{text}")
    result["rate"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    result["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M)
        result[f"p{pct}"] = parse_duration_ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    result["lost"] = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), m.groups())} if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    result["lost"]["non-2xx"] = int(m.group(1)) if m else 0
    return result


def run_flood(cfg, port: int, seconds: float) -> dict:
    cmd = cfg.flood_cmd + [HOST, str(port), str(cfg.connections), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"completed=(\d+) errors=(\d+) seconds=([\d.]+) rate=([\d.]+)", out.stdout)
    if out.returncode != 0 or not m:
        raise BenchError(f"connflood failed ({out.returncode}): {out.stderr.strip()} {out.stdout.strip()}")
    return {"requests": int(m.group(1)), "lost": {"flood": int(m.group(2))}, "rate": float(m.group(4))}


def run_paced(cfg, port: int, seconds: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--paced-client", HOST, str(port), str(cfg.rate), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    m = re.search(r"completed=(\d+) errors=(\d+) seconds=([\d.]+) rate=([\d.]+) "
                  r"p50=([\d.]+) p99=([\d.]+) late=([\d.]+) bunched=(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise BenchError(f"paced client failed ({out.returncode}): {out.stderr.strip()} {out.stdout.strip()}")
    completed, lost, _, rate, p50, p99, late, bunched = m.groups()
    return {"requests": int(completed), "lost": {"paced": int(lost)}, "rate": float(rate),
            "p50": float(p50), "p99": float(p99), "late_ms": float(late), "bunched": int(bunched)}


def flood_client_python(host: str, port: int, concurrency: int, seconds: float) -> None:
    """Fallback connect-flood client (same output as connflood.c)."""
    ep = select.epoll()
    socks: dict[int, socket.socket] = {}
    errors = completed = 0

    def open_one():
        nonlocal errors
        while True:
            s = socket.socket()
            s.setblocking(False)
            rc = s.connect_ex((host, port))
            if rc in (0, errno.EINPROGRESS):
                socks[s.fileno()] = s
                ep.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
                return
            errors += 1
            s.close()

    for _ in range(concurrency):
        open_one()
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        for fd, ev in ep.poll(0.05):
            s = socks.pop(fd)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err and err not in (errno.ECONNRESET, errno.EPIPE):
                errors += 1
            else:
                completed += 1
            ep.unregister(fd)
            s.close()
            open_one()
    elapsed = time.monotonic() - start
    print(f"completed={completed} errors={errors} seconds={elapsed:.3f} rate={completed / elapsed:.1f}")


def paced_client(host: str, port: int, rate: float, seconds: float) -> None:
    """The moderate load: one `Connection: close` GET / every 1/rate s, on
    schedule whatever the answers' latency (open loop), so that the server
    meets each connection on its own, as it does at moderate load, and a
    slow server is not offered less.  select() rather than epoll: its
    timeout has microseconds, epoll's milliseconds, which would release the
    connections in pairs.  Latency counts from the scheduled start.
    Prints connflood's line plus p50/p99 (ms), the worst lateness of a
    connect against its schedule (ms) and how many connects went out in the
    same turn as another (a busy client bunches them, and they may batch)."""
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    interval = 1.0 / rate
    connecting: dict[socket.socket, float] = {}  # socket -> scheduled start
    reading: dict[socket.socket, list] = {}  # socket -> [scheduled start, answer so far]
    latencies: list[float] = []
    errors = bunched = 0
    late = 0.0
    start = time.monotonic()
    end = start + seconds
    due = start
    while True:
        now = time.monotonic()
        opened = 0
        while due <= now and due < end and len(connecting) + len(reading) < 500:
            late = max(late, now - due)
            bunched += opened > 0
            opened += 1
            s = socket.socket()
            s.setblocking(False)
            if s.connect_ex((host, port)) in (0, errno.EINPROGRESS):
                connecting[s] = due
            else:
                errors += 1
                s.close()
            due += interval
        inflight = len(connecting) + len(reading)
        if due >= end and not inflight:
            break
        if now >= end + 5:
            errors += inflight
            break
        wake = due if due < end else end + 5
        readable, writable, _ = select.select(list(reading), list(connecting), [], max(0.0, wake - now))
        for s in writable:
            scheduled = connecting.pop(s)
            try:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    raise ConnectionError
                s.send(request)
            except OSError:
                errors += 1
                s.close()
                continue
            reading[s] = [scheduled, b""]
        for s in readable:
            state = reading[s]
            try:
                data = s.recv(4096)
            except OSError:
                data = None
            if data:
                state[1] += data
                continue
            del reading[s]
            s.close()
            if data is None or not state[1].startswith(b"HTTP/1.1 200"):
                errors += 1
            else:
                latencies.append(time.monotonic() - state[0])
    latencies.sort()

    def pct(p):
        return 1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else 0.0

    print(f"completed={len(latencies)} errors={errors} seconds={seconds:.3f} rate={len(latencies) / seconds:.1f} "
          f"p50={pct(0.50):.3f} p99={pct(0.99):.3f} late={1000 * late:.3f} bunched={bunched}")


def long_lived(port: int, n: int) -> Counter:
    """Open n keep-alive connections at once, then ask each which worker has it."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((HOST, port))
            socks.append(s)
        pending = list(socks)
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], pending, [], 1)
            pending = [s for s in pending if s not in writable]
        if pending:
            raise BenchError(f"{len(pending)} of {n} connects did not complete")
        for s in socks:
            s.setblocking(True)
            s.settimeout(10)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
        workers = Counter()
        for s in socks:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    raise BenchError("a long-lived connection closed early")
                data += chunk
            m = re.search(rb"(?i)\r\nX-Worker: *(\d+)", data)
            workers[int(m.group(1)) if m else -1] += 1
        return workers
    finally:
        for s in socks:
            s.close()


# Measuring -----------------------------------------------------------------


NOTES: list[str] = []


def busiest(delta: dict[int, int]) -> float | None:
    total = sum(delta.values())
    return 100.0 * max(delta.values()) / total if total and len(delta) > 1 else None


def machine_cpu_seconds() -> float:
    """Busy time of all CPUs: user, nice, system, irq, softirq, steal."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return (sum(values) - values[3] - values[4]) / CLK_TCK


def tree_cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            pass
    return total


class Foreign:
    """CPU used during a measured run by processes that are not the
    contender, the load generator or this script: other work on the machine."""

    threshold = 0.15  # cores (unattributed softirq alone stays below ~0.1)
    extra_budget = 60.0  # seconds of re-runs allowed in a whole run
    noisy: list = []


class CpuClock:
    """CPU seconds, from /proc, of the contender's master and workers, of the
    load generator (this script's children, counted when reaped), of this
    script, and of the whole machine."""

    def __init__(self, c: Contender) -> None:
        self.master = c.master_pid()
        self.workers = c.worker_pids()

    def read(self) -> dict:
        t = os.times()
        return {
            "master": cpu_seconds(self.master) if self.master else 0.0,
            "workers": tree_cpu_seconds(self.workers),
            "loadgen": t.children_user + t.children_system,
            "script": t.user + t.system,
            "machine": machine_cpu_seconds(),
            "time": time.monotonic(),
        }


def measured_run(c: Contender, runner, seconds: float, counter: str) -> dict:
    """One run: the load generator's result, plus the CPU that the master and
    the workers spent per unit the workers counted (`counter`: connections,
    or requests for keep-alive), the load generator's and other processes'
    cores, and each worker's count."""
    before = c.stats()
    clock = CpuClock(c)
    a = clock.read()
    result = runner(seconds)
    b = clock.read()
    after = c.stats()
    used = {k: b[k] - a[k] for k in a}
    elapsed = used["time"]
    delta = {pid: after[pid][counter] - before.get(pid, {}).get(counter, 0) for pid in after}
    counted = sum(delta.values())
    result["per_worker"] = delta
    result["counted"] = counted
    result["master_us"] = used["master"] * 1e6 / counted if c.has_master and counted else None
    result["workers_us"] = used["workers"] * 1e6 / counted if counted else None
    result["loadgen_cores"] = used["loadgen"] / elapsed
    result["cores"] = (used["master"] + used["workers"]) / elapsed
    ours = used["master"] + used["workers"] + used["loadgen"] + used["script"]
    result["foreign_cores"] = max(0.0, (used["machine"] - ours) / elapsed)
    result["noisy"] = result["foreign_cores"] > Foreign.threshold
    if os.environ.get("BENCH_DEBUG"):
        log(f"  machine {used['machine']:.2f} s, ours {ours:.2f} s in {elapsed:.2f} s")
    return result


def describe_run(result: dict) -> str:
    parts = [f"{result['rate']:.0f}/s"]
    if result.get("p50") is not None:
        parts.append(f"p50 {result['p50']:.2f} ms p99 {result['p99']:.2f} ms")
    if result["master_us"]:
        parts.append(f"master {result['master_us']:.0f} µs")
    if result["workers_us"]:
        parts.append(f"workers {result['workers_us']:.0f} µs per counted")
    parts.append(f"per worker {sorted(result['per_worker'].values(), reverse=True)}")
    parts.append(f"load generator {result['loadgen_cores']:.2f} cores")
    parts.append(f"others {result['foreign_cores']:.2f} cores" + (" (NOISY)" if result["noisy"] else ""))
    return ", ".join(parts)


def measure(cfg, c: Contender, what: str, runner, counter: str) -> dict:
    """Warm up once, then cfg.repeat measured runs; the median run by rate is
    kept, CPU per unit and the load generator's cores are medians over runs
    and per-worker counts are summed.

    A run during which other processes used more than Foreign.threshold of a
    core is repeated (within cfg.extra_runs and Foreign.extra_budget) and,
    when clean runs exist, left out of the median."""
    warm = None
    if cfg.warmup > 0:
        wait_idle(cfg.idle_limit, "")
        warm = runner(cfg.warmup)
    runs: list[dict] = []
    attempts = 0
    while True:
        clean = [r for r in runs if not r["noisy"]]
        if len(clean) >= cfg.repeat:
            break
        if len(runs) >= cfg.repeat and (attempts >= cfg.repeat + cfg.extra_runs or Foreign.extra_budget <= 0):
            break
        attempts += 1
        if len(runs) >= cfg.repeat:
            Foreign.extra_budget -= cfg.duration
            log(f"  {c.name} {what}: run {attempts} (another process was busy during an earlier run)")
        wait_idle(cfg.idle_limit, f"{c.name} {what}")
        runs.append(measured_run(c, runner, cfg.duration, counter))
        log(f"  {c.name} {what}: {describe_run(runs[-1])}")
    return summarize(c, what, runs, warm)


def summarize(c: Contender, what: str, runs: list[dict], warm: dict | None) -> dict:
    clean = [r for r in runs if not r["noisy"]]
    pool = sorted(clean or runs, key=lambda r: r["rate"])
    chosen = dict(pool[len(pool) // 2])
    chosen.pop("output", None)
    if not clean:
        Foreign.noisy.append(f"{c.name} {what} ({min(r['foreign_cores'] for r in runs):.2f}+ cores)")
    total: Counter = Counter()
    for r in runs:
        total.update(r["per_worker"])
    chosen["busiest"] = busiest(dict(total))
    for key in ("master_us", "workers_us", "loadgen_cores", "cores"):
        values = [r[key] for r in (clean or runs) if r[key] is not None]
        chosen[key] = statistics.median(values) if values else None
    chosen["rates"] = [r["rate"] for r in runs]
    chosen["all_noisy"] = not clean
    lost: Counter = Counter()
    for r in runs + ([warm] if warm else []):
        lost.update(r.get("lost") or {})
    chosen["lost"] = {k: v for k, v in lost.items() if v}
    if chosen["lost"]:
        NOTES.append(f"{c.name} {what}: lost " + ", ".join(f"{k} {v}" for k, v in sorted(chosen["lost"].items())))
    late = max((r.get("late_ms", 0.0) for r in runs), default=0.0)
    bunched = sum(r.get("bunched", 0) for r in runs) / max(1, sum(r["requests"] for r in runs))
    if late > 5.0 or bunched > 0.02:
        NOTES.append(f"{c.name} {what}: the paced client fell up to {late:.1f} ms behind its schedule and sent "
                     f"{100 * bunched:.1f} % of its connects in the same turn as another")
    return chosen


# One function per measurement; each returns what the report keeps of it.


def measure_keepalive(cfg, c: Contender) -> dict:
    """Trivial answer over wrk's persistent connections: requests/s."""
    return measure(cfg, c, "keep-alive", lambda d: run_wrk(cfg, c.http_port, d), "requests")


def measure_close(cfg, c: Contender) -> dict:
    """Trivial answer, one connection per request (one handoff each)."""
    return measure(cfg, c, "Connection: close", lambda d: run_wrk(cfg, c.http_port, d, close=True), "http")


def measure_cpu_keepalive(cfg, c: Contender) -> dict:
    """About 1 ms of CPU per request over persistent connections."""
    return measure(cfg, c, "CPU keep-alive", lambda d: run_wrk(cfg, c.http_port, d, path=CPU_PATH), "requests")


def measure_cpu_close(cfg, c: Contender) -> dict:
    """About 1 ms of CPU per request, one connection per request."""
    return measure(cfg, c, "CPU Connection: close",
                   lambda d: run_wrk(cfg, c.http_port, d, close=True, path=CPU_PATH), "http")


def measure_moderate(cfg, c: Contender) -> dict:
    """CPU per connection at a fixed, moderate rate, where nothing batches."""
    return measure(cfg, c, f"paced {cfg.rate:g} conn/s", lambda d: run_paced(cfg, c.http_port, d), "http")


def measure_flood(cfg, c: Contender) -> dict:
    """Connect flood on the port that closes at once: the handoff ceiling."""
    return measure(cfg, c, "flood", lambda d: run_flood(cfg, c.flood_port, d), "flood")


def measure_long_lived(cfg, c: Contender) -> dict:
    """The busiest worker's share of cfg.connections keep-alive connections
    opened at once (median over trials)."""
    shares = []
    for _ in range(cfg.long_trials):
        wait_idle(cfg.idle_limit, f"{c.name} long-lived")
        workers = long_lived(c.http_port, cfg.connections)
        shares.append(100.0 * max(workers.values()) / sum(workers.values()))
        time.sleep(0.2)
    log(f"  {c.name} {cfg.connections} long-lived: busiest worker {shares} %")
    return {"shares": shares, "busiest": statistics.median(shares)}


def measure_mixed(cfg, c: Contender, path: str) -> dict:
    """Connection: close, most requests to /, a share to a slow path."""
    script = cfg.mixed_scripts[path]
    return measure(cfg, c, f"mixed {path}", lambda d: run_wrk(cfg, c.http_port, d, close=True, script=script), "http")


MEASUREMENTS = {
    "keepalive": measure_keepalive,
    "close": measure_close,
    "cpu keepalive": measure_cpu_keepalive,
    "cpu close": measure_cpu_close,
    "moderate": measure_moderate,
    "flood": measure_flood,
    "long": measure_long_lived,
}

#: What every contender is measured on; rr and least-busy add "mixed PATH".
FULL_PLAN = tuple(MEASUREMENTS)


def run_measurement(cfg, c: Contender, key: str) -> dict:
    if key.startswith("mixed "):
        return measure_mixed(cfg, c, key.partition(" ")[2])
    return MEASUREMENTS[key](cfg, c)


def check_baseline(c: Contender, key: str, result: dict) -> None:
    """A one-process baseline on CPU-bound work should use a whole core; if
    other processes took part of it, every ratio against it is inflated."""
    if c.baseline == c.name and key.startswith("cpu ") and (result.get("cores") or 1.0) < 0.9:
        NOTES.append(f"{c.name} {key}: the one process used only {result['cores']:.2f} cores (other processes "
                     f"took the rest): the ×1 ratios against it are inflated")


def run_contender(cfg, c: Contender, plan: tuple[str, ...]) -> dict:
    row: dict = {"name": c.name, "kind": c.kind, "baseline": c.baseline, "reference": c.reference}
    log(f"starting {c.name}")
    wait_idle(cfg.idle_limit)
    c.start()
    try:
        log(f"{c.name} ready: pid {c.proc.pid}, workers {c.worker_pids()}")
        for key in plan:
            if key == "long" and len(c.worker_pids()) < 2:
                continue
            row[key] = run_measurement(cfg, c, key)
            check_baseline(c, key, row[key])
        master = c.master_pid()
        row["master_rss"] = rss_mb(master) if master else None
        wrss = [r for r in (rss_mb(p) for p in c.worker_pids()) if r is not None]
        row["worker_rss"] = max(wrss) if wrss else None
        row["worker_rss_all"] = wrss
        row["workers"] = len(c.worker_pids())
    finally:
        code = c.stop()
        row["exit"] = code
        log(f"stopped {c.name} (exit {code})")
    return row


def master_rss_8(cfg) -> dict:
    c = TxCluster("txcluster rr x8", cfg, "rr", workers=8)
    log("starting txcluster rr with 8 workers (master RSS)")
    wait_idle(cfg.idle_limit)
    c.start(timeout=60)
    try:
        # A little traffic through every worker first.
        run_wrk(cfg, c.http_port, 1, close=True)
        run_flood(cfg, c.flood_port, 1)
        out = {
            "master_rss": rss_mb(c.proc.pid),
            "worker_rss": max(filter(None, (rss_mb(p) for p in c.worker_pids())), default=None),
            "workers": len(c.worker_pids()),
        }
        log(f"  master RSS with 8 workers: {out['master_rss']:.1f} MB")
        return out
    finally:
        c.stop()


# Report --------------------------------------------------------------------


def fmt(value, spec: str = ".0f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def lat(r: dict | None) -> str:
    if not r or r.get("p50") is None:
        return "–"
    return f"{r['p50']:.2f} / {r['p99']:.1f}"


def render_table(headers: list[str], rows: list[list[str]], align: str) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        out = []
        for i, cell in enumerate(cells):
            out.append(cell.ljust(widths[i]) if align[i] == "l" else cell.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":" if a == "r" else ":" + "-" * (w + 1)) for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def get(value, *path):
    for p in path:
        value = value.get(p) if isinstance(value, dict) else None
    return value


class Results:
    """The rows by contender name, and what is derived from them."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows
        self.by = {r["name"]: r for r in rows}

    def get(self, name: str, *path):
        return get(self.by.get(name), *path)

    def scaling(self, name: str, key: str) -> float | None:
        """Throughput as a multiple of one process of the same server."""
        row = self.by.get(name)
        rate, base = get(row, key, "rate"), self.get(get(row, "baseline") or "", key, "rate")
        return rate / base if rate is not None and base else None

    def limit(self, name: str, key: str) -> float | None:
        """The physical limit of that ratio: the cores left by the load generator."""
        g = self.get(name, key, "loadgen_cores")
        return None if g is None else CORES - g

    def handoff_us(self, name: str, key: str) -> float | None:
        """Master plus workers CPU per connection above what the reference
        mode's workers (txcluster shared, node none) spend."""
        ref = self.get(name, "reference")
        workers, ref_workers = self.get(name, key, "workers_us"), self.get(ref or "", key, "workers_us")
        if workers is None or ref_workers is None:
            return None
        return (self.get(name, key, "master_us") or 0.0) + workers - ref_workers

    def lost(self) -> tuple[int, list[str]]:
        total, where = 0, []
        for r in self.rows:
            for key, value in r.items():
                n = sum((get(value, "lost") or {}).values())
                if n:
                    total += n
                    where.append(f"{r['name']} {key} {n}")
        return total, where


def ratio_cell(res: Results, name: str, key: str) -> str:
    x = res.scaling(name, key)
    if x is None:
        return "–"
    if res.get(name, "baseline") == name:
        return "1.00"
    return f"{x:.2f} ({fmt(res.limit(name, key), '.2f')})"


def throughput_table(res: Results, failures: list[str], skipped: list[str]) -> str:
    workloads = [("keepalive", "ka req/s"), ("close", "close conn/s"), ("cpu keepalive", "cpu ka req/s"),
                 ("cpu close", "cpu close conn/s"), ("flood", "flood conn/s")]
    headers = ["contender"]
    for key, label in workloads:
        headers += [label, "×1 (limit)"]
    table = []
    for r in res.rows:
        cells = [r["name"]]
        for key, _ in workloads:
            cells += [fmt(get(r, key, "rate")), ratio_cell(res, r["name"], key)]
        table.append(cells)
    for name in failures:
        table.append([name + " (FAILED)"] + ["–"] * (len(headers) - 1))
    for name in skipped:
        table.append([name + " (skipped)"] + ["–"] * (len(headers) - 1))
    return render_table(headers, table, "l" + "r" * (len(headers) - 1))


def cpu_table(cfg, res: Results) -> str:
    headers = ["CPU µs per connection", "paced conn/s", "paced p50 / p99 ms", "master", "workers", "handoff",
               "flood master", "flood workers", "flood handoff"]
    table = []
    for r in res.rows:
        name = r["name"]
        cells = [name, fmt(res.get(name, "moderate", "rate")), lat(r.get("moderate"))]
        for key in ("moderate", "flood"):
            handoff = "ref" if res.get(name, "reference") == name else fmt(res.handoff_us(name, key))
            cells += [fmt(res.get(name, key, "master_us")), fmt(res.get(name, key, "workers_us")), handoff]
        table.append(cells)
    return render_table(headers, table, "l" + "r" * (len(headers) - 1))


def placement_table(cfg, res: Results) -> str:
    headers = ["contender", "ka p50 / p99 ms", "close p50 / p99 ms", "cpu ka p50 / p99 ms", "cpu close p50 / p99 ms",
               "busiest close %", "busiest cpu ka %", f"busiest {cfg.connections} long %",
               *(f"mixed {path} p50 / p99 ms" for path in cfg.mixed_paths), "master RSS MB", "worker RSS MB"]
    table = []
    for r in res.rows:
        table.append([
            r["name"],
            *(lat(r.get(key)) for key in ("keepalive", "close", "cpu keepalive", "cpu close")),
            fmt(get(r, "close", "busiest"), ".1f"),
            fmt(get(r, "cpu keepalive", "busiest"), ".1f"),
            fmt(get(r, "long", "busiest"), ".1f"),
            *(lat(r.get("mixed " + path)) for path in cfg.mixed_paths),
            fmt(r.get("master_rss"), ".1f"),
            fmt(r.get("worker_rss"), ".1f"),
        ])
    return render_table(headers, table, "l" + "r" * (len(headers) - 1))


RR, SH, LB = "txcluster rr", "txcluster shared", "txcluster least-busy"
SG, NS, NR, NN = "single twistd", "node single", "node rr", "node none"


def targets(cfg, res: Results, rss8: dict | None) -> list[list[str]]:
    """Issue 9's targets (and issue 4's still meaningful), each with its
    measurement in this run, then context rows without a goal."""
    rows: list[list[str]] = []

    def check(label, value, goal, passed, measured):
        if value is None:
            rows.append([label, "n/a", goal, "SKIP"])
        else:
            rows.append([label, measured, goal, "PASS" if passed(value) else "FAIL"])

    def at_least(label, value, goal, measured):
        check(label, value, f"≥ {goal:g}×", lambda v: v >= goal, measured)

    def at_most(label, value, goal, unit, measured):
        check(label, value, f"≤ {goal:g} {unit}", lambda v: v <= goal, measured)

    def scaled(name, key):
        x, lim = res.scaling(name, key), res.limit(name, key)
        return None if x is None else f"{x:.2f}× (limit {fmt(lim, '.2f')}×)"

    def rates(a, b, key):
        ra, rb = res.get(a, key, "rate"), res.get(b, key, "rate")
        value = ra / rb if ra is not None and rb else None
        return value, (f"{value:.2f}× ({ra:.0f} / {rb:.0f})" if value is not None else "")

    value, text = rates(RR, SH, "close")
    at_least("trivial close: rr / shared", value, TARGET_CLOSE_RR_VS_SHARED, text)
    rr, sh, nr = (res.scaling(n, "cpu close") for n in (RR, SH, NR))
    at_least("CPU close: rr's scaling / shared's", rr / sh if rr and sh else None, TARGET_CPU_CLOSE_RR_VS_SHARED_SCALING,
             f"{rr / sh:.2f} ({rr:.2f}× / {sh:.2f}×)" if rr and sh else "")
    check("CPU close: rr's scaling against node rr's", rr - nr if rr and nr else None, "≥ node rr's",
          lambda v: v >= 0, f"{rr:.2f}× vs {nr:.2f}×" if rr and nr else "")
    at_least("CPU keep-alive: rr scaling", res.scaling(RR, "cpu keepalive"), TARGET_CPU_KEEPALIVE_RR_SCALING,
             scaled(RR, "cpu keepalive"))
    at_least("CPU keep-alive: shared scaling", res.scaling(SH, "cpu keepalive"), TARGET_CPU_KEEPALIVE_SHARED_SCALING,
             scaled(SH, "cpu keepalive"))
    for name in (SH, RR):
        busiest_long = res.get(name, "long", "busiest")
        at_most(f"{name.split()[-1]} busiest worker, {cfg.connections} long-lived", busiest_long, TARGET_BUSIEST_LONG,
                "%", f"{fmt(busiest_long, '.1f')} %")
    value, text = rates(RR, NR, "flood")
    at_least("connect flood: rr / node rr", value, TARGET_FLOOD_VS_NODE_RR, text)
    for key, goal, where in (("moderate", TARGET_HANDOFF_US_MODERATE, f"at {cfg.rate:g} conn/s"),
                             ("flood", TARGET_HANDOFF_US_FLOOD, "under flood")):
        h = res.handoff_us(RR, key)
        detail = (f"{h:.0f} µs (master {fmt(res.get(RR, key, 'master_us'))} + workers "
                  f"{fmt(res.get(RR, key, 'workers_us'))} − shared workers {fmt(res.get(SH, key, 'workers_us'))})"
                  if h is not None else "")
        at_most(f"rr handoff overhead {where}", h, goal, "µs", detail)
    lost, where = res.lost()
    check("zero loss in every mode", lost if res.rows else None, "0 lost", lambda v: v == 0,
          f"{lost} lost" + (f" ({'; '.join(where)})" if where else ""))
    rss = (rss8 or {}).get("master_rss")
    at_most("rr master RSS with 8 workers", rss, TARGET_MASTER_RSS_MB, "MB", f"{fmt(rss, '.1f')} MB")

    # Context, no goal.
    sh_close = res.scaling(SH, "close")
    if sh_close is not None:
        rows.append(["(context) shared close / single twistd (kept)", f"{sh_close:.2f}×", "–", ""])
    for key, where in (("moderate", f"at {cfg.rate:g} conn/s"), ("flood", "under flood")):
        floor = res.get(SG, key, "workers_us")
        if floor is not None:
            rows.append([f"(floor) single twistd, all its CPU per connection {where}", f"{floor:.0f} µs", "–", ""])
    for path in cfg.mixed_paths:
        rr_p99, lb_p99 = res.get(RR, "mixed " + path, "p99"), res.get(LB, "mixed " + path, "p99")
        if rr_p99 is not None and lb_p99 is not None:
            rows.append([f"(context) mixed {path} p99: least-busy vs rr", f"{lb_p99:.1f} vs {rr_p99:.1f} ms", "–", ""])
    return rows


def report(cfg, rows: list[dict], failures: list[str], skipped: list[str], rss8: dict | None) -> tuple[str, list]:
    res = Results(rows)
    goals = targets(cfg, res, rss8)
    parts = [
        "Throughput; ×1 = ÷ one process of the same server (txcluster: one twistd; Node: one node), "
        f"in brackets the physical limit ({CORES} cores − the load generator's cores in that run)",
        throughput_table(res, failures, skipped),
        f"CPU per connection from /proc (µs): paced = open-loop Connection: close GET / at {cfg.rate:g} conn/s; "
        "handoff = master + workers − the reference mode's workers (txcluster shared, node none)",
        cpu_table(cfg, res),
        "Latency, placement (busiest worker's share), memory",
        placement_table(cfg, res),
        render_table(["target (issue 9)", "measured", "goal", "result"], goals, "llll"),
    ]
    return "\n\n".join(parts), goals


# Setup ---------------------------------------------------------------------


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: apt-get install -y wrk")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    apt = ["apt-get", "install", "-y", "-q", "wrk"]
    if os.geteuid() != 0 and shutil.which("sudo"):
        apt = ["sudo", "-E"] + apt
    rc = subprocess.run(apt, env=env, stdout=subprocess.DEVNULL, timeout=300).returncode
    if rc != 0:
        update = (["sudo", "-E"] if apt[0] == "sudo" else []) + ["apt-get", "update", "-q"]
        subprocess.run(update, env=env, stdout=subprocess.DEVNULL, timeout=300)
        subprocess.run(apt, env=env, stdout=subprocess.DEVNULL, timeout=300)
    found = shutil.which("wrk")
    if not found:
        raise BenchError("wrk is not installed and `apt-get install -y wrk` failed")
    return found


def build_flood(tmp: str) -> list[str]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc:
        exe = os.path.join(tmp, "connflood")
        rc = subprocess.run([gcc, "-O2", "-o", exe, os.path.join(HERE, "connflood.c")],
                            capture_output=True, text=True, timeout=60)
        if rc.returncode == 0:
            return [exe]
        log(f"cannot compile connflood.c ({rc.stderr.strip()}); using the Python client")
    return [sys.executable, os.path.abspath(__file__), "--flood-client"]


def check_python(python: str) -> None:
    try:
        probe = subprocess.run([python, "-c", "import twisted, attrs, zope.interface"], capture_output=True,
                               text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    except OSError as e:
        raise BenchError(f"cannot run {python}: {e}")
    if probe.returncode != 0:
        raise BenchError(f"{python} cannot import Twisted/attrs (use --python, e.g. /tmp/venv/bin/python): "
                         f"{probe.stderr.strip().splitlines()[-1:]}")


def versions(cfg) -> str:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            return "?"

    tw = out([cfg.python, "-c", "import twisted, sys; print(twisted.version.short(), sys.version.split()[0])"]).split()
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "?"
    except Exception:
        commit = "?"
    wrk = out([cfg.wrk, "--version"]).split("\n")[0].split(" Copyright")[0] or "?"
    cpus = os.cpu_count()
    node = out([cfg.node, "--version"]) if cfg.node else "absent"
    return (f"{time.strftime('%Y-%m-%d %H:%M')}, commit {commit}; {cpus} CPUs, Linux {platform.release()}; "
            f"Python {tw[1] if len(tw) > 1 else '?'}, Twisted {tw[0] if tw else '?'}, Node {node}, {wrk}; "
            f"{cfg.workers} workers, wrk -t1 -c{cfg.connections}, {cfg.repeat}×{cfg.duration:g} s per "
            f"measurement (median) after {cfg.warmup:g} s warm-up, app={cfg.app}")


MIXED_PATHS = {
    "/chunk": "4-20 ms of CPU in 1 ms slices, a reactor turn between slices",
    "/block": "blocks the worker for 2-10 ms",
    "/stall": "blocks the worker for 20-60 ms in a sleeping synchronous call",
    "/slow": "answers after a non-blocking 50-200 ms deferLater",
}

#: The share of a mixed workload's requests that go to its slow path.
MIXED_SHARES = {"/stall": 0.01}

MIXED_LUA = """
-- most requests fast, SHARE of them to PATH
request = function()
  if math.random() < SHARE then
    return wrk.format("GET", "PATH")
  end
  return wrk.format("GET", "/")
end
"""


def mixedShare(path: str) -> float:
    return MIXED_SHARES.get(path, 0.10)


def parse_args(argv):
    p = argparse.ArgumentParser(description="txcluster benchmark: three tables, issue 9's targets.")
    p.add_argument("--quick", action="store_true", help="short smoke run (1 s per measurement, no warm-up)")
    p.add_argument("--check", action="store_true", help="exit 1 if a contender failed or the table did not print")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 5, --quick 1)")
    p.add_argument("--repeat", type=int, help="measured runs per measurement, median kept (default 3, --quick 1)")
    p.add_argument("--warmup", type=float, help="warm-up seconds before each measurement (default 2, --quick 0)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--connections", type=int, default=32, help="wrk -c, flood concurrency, long-lived count")
    p.add_argument("--rate", type=float, default=1500.0, help="the paced client's connections/s (default 1500)")
    p.add_argument("--cpu-ms", type=float, default=1.0, help="CPU per request of the CPU-bound workload (default 1)")
    p.add_argument("--python", default=None, help="interpreter for the Twisted contenders (default: this one)")
    p.add_argument("--app", choices=("raw", "web"), default="raw", help="raw protocol (default) or twisted.web")
    p.add_argument("--mixed", default="/chunk,/stall",
                   help="comma-separated slow paths for the mixed workload, each a separate measurement: "
                        "/chunk, /block, /stall, /slow (default /chunk,/stall)")
    p.add_argument("--only", default="", help="comma-separated contender names to run (e.g. 'txcluster rr,node rr')")
    p.add_argument("--no-node", action="store_true", help="skip the Node contenders")
    p.add_argument("--json", help="also write every raw result to this file")
    p.add_argument("--flood-client", nargs=4, metavar=("HOST", "PORT", "CONC", "SECONDS"), help=argparse.SUPPRESS)
    p.add_argument("--paced-client", nargs=4, metavar=("HOST", "PORT", "RATE", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.workers < 1 or args.connections < 1 or args.rate <= 0 or args.cpu_ms <= 0:
        p.error("--workers, --connections, --rate and --cpu-ms must be positive")
    args.mixed_paths = [x.strip() for x in args.mixed.split(",") if x.strip()]
    unknown = [x for x in args.mixed_paths if x not in MIXED_PATHS]
    if unknown:
        p.error(f"--mixed: unknown paths {unknown}; choose from {sorted(MIXED_PATHS)}")
    return args


def configure(cfg) -> None:
    """Defaults that depend on --quick, and what the run needs on disk."""
    cfg.duration = cfg.duration or (1.0 if cfg.quick else 5.0)
    cfg.repeat = cfg.repeat or (1 if cfg.quick else 3)
    cfg.warmup = cfg.warmup if cfg.warmup is not None else (0.0 if cfg.quick else 2.0)
    cfg.idle_limit = 3.0 if cfg.quick else 10.0
    # The smoke neither waits long for a quiet machine nor re-runs noisy runs.
    Idle.budget = 3.0 if cfg.quick else 45.0
    Idle.interval = 0.1 if cfg.quick else 0.25
    cfg.long_trials = 1 if cfg.quick else 3
    cfg.extra_runs = 0 if cfg.quick else 2
    Foreign.extra_budget = 0.0 if cfg.quick else 45.0
    cfg.python = cfg.python or sys.executable
    cfg.tmp = tempfile.mkdtemp(prefix="txcluster-bench.")
    check_python(cfg.python)
    cfg.wrk = ensure_wrk()
    cfg.flood_cmd = build_flood(cfg.tmp)
    cfg.node = None if cfg.no_node else shutil.which("node")
    cfg.cpu_iterations, cfg.cpu_round = calibrate_cpu(cfg.python, cfg.cpu_ms)
    log(f"CPU workload: {cfg.cpu_iterations} PBKDF2-SHA256 rounds per request "
        f"({cfg.cpu_iterations * cfg.cpu_round * 1000:.2f} ms here)")
    cfg.mixed_scripts = {}
    for path in cfg.mixed_paths:
        cfg.mixed_scripts[path] = os.path.join(cfg.tmp, f"mixed{path.replace('/', '_')}.lua")
        with open(cfg.mixed_scripts[path], "w") as f:
            f.write(MIXED_LUA.replace("PATH", path).replace("SHARE", repr(mixedShare(path))))


def contenders(cfg) -> list[tuple]:
    """(contender factory, plan) in running order; the one-process baselines
    first, so that a ratio's denominator is measured before it is needed."""
    mixed = tuple("mixed " + path for path in cfg.mixed_paths)
    out = [
        (lambda: SingleTwistd(SG, cfg), FULL_PLAN),
        (lambda: TxCluster(RR, cfg, "rr"), FULL_PLAN + mixed),
        (lambda: TxCluster(SH, cfg, "shared"), FULL_PLAN),
        (lambda: TxCluster(LB, cfg, "least-busy"), FULL_PLAN + mixed),
    ]
    if cfg.node:
        out += [
            (lambda: NodeSingle(NS, cfg), FULL_PLAN),
            (lambda: NodeCluster(NR, cfg, None), FULL_PLAN),
            (lambda: NodeCluster(NN, cfg, "none"), FULL_PLAN),
        ]
    return out


def print_report(cfg, rows, failures, skipped, rss8, elapsed) -> list:
    table, goals = report(cfg, rows, failures, skipped, rss8)
    print()
    print(f"txcluster benchmark — {versions(cfg)}")
    print(f"CPU-bound workload: GET {CPU_PATH}, {cfg.cpu_iterations} rounds of PBKDF2-SHA256 per request "
          f"({cfg.cpu_iterations * cfg.cpu_round * 1000:.2f} ms of CPU in one Python process here)")
    for path in cfg.mixed_paths:
        share = round(100 * mixedShare(path))
        print(f"mixed {path}: Connection: close, {100 - share} % GET /, {share} % GET {path} ({MIXED_PATHS[path]})")
    if rss8:
        print(f"txcluster rr with 8 workers: master RSS {rss8['master_rss']:.1f} MB, "
              f"largest worker {fmt(rss8['worker_rss'], '.1f')} MB")
    print()
    print(table)
    print()
    for note in NOTES:
        print(f"note: {note}")
    if Foreign.noisy:
        print(f"NOISY: other processes used more than {Foreign.threshold:.2f} of a core during every run of: "
              + "; ".join(Foreign.noisy))
    else:
        print(f"clean: every reported measurement has runs during which other processes used "
              f"< {Foreign.threshold:.2f} of a core")
    print(Idle.summary())
    print(f"total time {elapsed:.0f} s" + (f"; FAILED: {', '.join(failures)}" if failures else ""))
    sys.stdout.flush()
    return goals


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.flood_client:
        h, port, conc, secs = cfg.flood_client
        flood_client_python(h, int(port), int(conc), float(secs))
        return 0
    if cfg.paced_client:
        h, port, rate, secs = cfg.paced_client
        paced_client(h, int(port), float(rate), float(secs))
        return 0
    started_at = time.monotonic()

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)  # also when started in the background (SIGINT ignored)
    failures: list[str] = []
    skipped: list[str] = []
    rows: list[dict] = []
    rss8 = None
    printed = False
    cfg.tmp = None
    try:
        configure(cfg)
        if not cfg.node:
            skipped += [NS, NR, NN]
            log("node is not on PATH (or --no-node): skipping the Node contenders")
        only = {s.strip() for s in cfg.only.split(",") if s.strip()}
        for make, plan in contenders(cfg):
            c = make()
            if only and c.name not in only:
                continue
            try:
                rows.append(run_contender(cfg, c, plan))
            except (BenchError, subprocess.TimeoutExpired, OSError) as e:
                failures.append(c.name)
                log(f"{c.name} FAILED: {e!r}\n--- last output of {c.name} ---\n{c.tail()}")
        if not only or "txcluster rr x8" in only:
            try:
                rss8 = master_rss_8(cfg)
            except (BenchError, subprocess.TimeoutExpired, OSError) as e:
                failures.append("txcluster rr x8")
                log(f"txcluster rr with 8 workers FAILED: {e}")
        goals = print_report(cfg, rows, failures, skipped, rss8, time.monotonic() - started_at)
        printed = True
        if cfg.json:
            with open(cfg.json, "w") as f:
                json.dump({"config": versions(cfg), "cpu_iterations": cfg.cpu_iterations, "rows": rows,
                           "rss8": rss8, "targets": goals, "failures": failures, "skipped": skipped},
                          f, indent=1, default=str)
    except BenchError as e:
        log(f"benchmark failed: {e}")
    except KeyboardInterrupt:
        log("interrupted; stopping everything this run started")
        Started.kill_all()
        return 130
    finally:
        Started.kill_all()
        if cfg.tmp:
            shutil.rmtree(cfg.tmp, ignore_errors=True)
    if cfg.check and (failures or not printed):
        return 1
    return 0 if printed else 1


if __name__ == "__main__":
    sys.exit(main())
