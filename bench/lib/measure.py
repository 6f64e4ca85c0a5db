#!/usr/bin/env python3
"""Measurement driver and report for bench/run.sh (stdlib only).

    measure.py freeports N           print N free loopback TCP ports
    measure.py wait-http URL [HOST]  wait (<= 30 s) until URL answers any HTTP status
    measure.py run                   preflight, warm-up, rounds, RSS check, report

`run` reads its inputs from the environment that run.sh exports (see
`Config`) and the scenario table $WORK/scenarios.tsv, whose columns are:
name, label, proxy, mode, tool, url, host, pid, admin.
"""
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

# ----------------------------------------------------------------- helpers


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_ports(n):
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def http_get(url, host=None, timeout=5):
    req = urllib.request.Request(url)
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_http(url, host=None, seconds=30):
    deadline = time.time() + seconds
    last = None
    while time.time() < deadline:
        try:
            return http_get(url, host, timeout=2)
        except Exception as e:  # connection refused while starting
            last = e
            time.sleep(0.1)
    raise SystemExit(f"{url} never answered: {last}")


def proc_status(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def proc_tree(pid):
    """pid and its direct children (nginx master + workers)."""
    pids = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
    except FileNotFoundError:
        pass
    return pids


def tree_rss_kib(pid):
    total = 0
    for p in proc_tree(pid):
        v = proc_status(p, "VmRSS")
        if v:
            total += v
    return total


class RssSampler(threading.Thread):
    """Samples the summed VmRSS of a process tree every `interval` seconds."""

    def __init__(self, pid, interval=0.25, on_sample=None):
        super().__init__(daemon=True)
        self.pid, self.interval, self.on_sample = pid, interval, on_sample
        self.peak = 0
        self.samples = []
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.is_set():
            v = tree_rss_kib(self.pid)
            self.samples.append(v)
            self.peak = max(self.peak, v)
            if self.on_sample:
                self.on_sample(v)
            self.stop_event.wait(self.interval)

    def stop(self):
        self.stop_event.set()
        self.join()
        return self.peak


# ---------------------------------------------------------------- config


class Config:
    def __init__(self):
        e = os.environ
        self.work = e["WORK"]
        self.duration = float(e.get("DURATION", "5"))
        self.c1_duration = float(e.get("C1_DURATION", "2"))
        self.rounds = int(e.get("ROUNDS", "3"))
        self.connections = int(e.get("CONNECTIONS", "50"))
        self.warmup = float(e.get("WARMUP", "1"))
        self.h2_clients = int(e.get("H2_CLIENTS", "50"))
        self.h2_streams = int(e.get("H2_STREAMS", "10"))
        self.rss_seconds = int(e.get("RSS_SECONDS", "30"))
        self.rss_connections = int(e.get("RSS_CONNECTIONS", "128"))
        self.rss_url = e.get("RSS_URL", "")
        self.rss_pid = int(e.get("RSS_PID", "0") or 0)
        self.rss_admin = e.get("RSS_ADMIN", "")
        self.shadow_log = e["SHADOW_LOG"]
        self.blackhole_stats = e["BLACKHOLE_STATS"]
        self.lua = e["WRK_LUA"]
        self.results_md = e["RESULTS_MD"]
        self.results_json = e.get("RESULTS_JSON", "")
        self.command = e.get("BENCH_COMMAND", "bench/run.sh")
        self.versions = e.get("BENCH_VERSIONS", "")


class Scenario:
    def __init__(self, row):
        (self.name, self.label, self.proxy, self.mode, self.tool, self.url,
         self.host, pid, self.admin) = row
        self.pid = int(pid) if pid not in ("", "-") else 0
        self.admin = "" if self.admin == "-" else self.admin

    @property
    def mirrored(self):
        return self.mode in ("mirror", "blackhole", "analysis")

    @property
    def sink(self):
        if self.mode in ("mirror", "analysis"):
            return "shadow"
        if self.mode == "blackhole":
            return "blackhole"
        return None


def load_scenarios(cfg):
    rows = []
    with open(os.path.join(cfg.work, "scenarios.tsv")) as f:
        for line in f:
            line = line.rstrip("\n")
            if line and not line.startswith("#"):
                rows.append(Scenario(line.split("\t")))
    return rows


# -------------------------------------------------------------- counters


class ShadowCounter:
    """Counts lines of the healthy shadow's access log (one line per request)."""

    def __init__(self, path):
        self.path, self.offset, self.count = path, 0, 0

    def read(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self.offset += len(data)
        self.count += data.count(b"\n")
        return self.count


def blackhole_stats(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {"connections": 0, "open": 0, "requests": 0, "bytes": 0}


METRIC_RE = re.compile(r'^umbra_mirror_requests_total\{([^}]*)\}\s+([0-9.eE+-]+)')


def umbra_counters(admin):
    """umbra_mirror_requests_total summed by outcome (+ inflight gauge)."""
    out = {}
    try:
        _, body = http_get(f"http://{admin}/metrics", timeout=5)
    except Exception as e:
        log(f"umbra admin {admin}: {e}")
        return out
    for line in body.decode(errors="replace").splitlines():
        m = METRIC_RE.match(line)
        if m:
            outcome = re.search(r'outcome="([^"]*)"', m.group(1))
            if outcome:
                k = outcome.group(1)
                out[k] = out.get(k, 0) + float(m.group(2))
        elif line.startswith("umbra_mirror_inflight"):
            try:
                out["inflight"] = float(line.split()[-1])
            except ValueError:
                pass
    return out


ENVOY_KEYS = [
    "upstream_rq_total", "upstream_rq_completed", "upstream_rq_2xx",
    "upstream_rq_pending_overflow", "upstream_cx_overflow", "upstream_rq_timeout",
    "upstream_rq_pending_active", "upstream_rq_active", "upstream_cx_total",
    "upstream_rq_rx_reset", "upstream_rq_tx_reset", "retry_or_shadow_abandoned",
]


def envoy_counters(admin):
    out = {}
    try:
        _, body = http_get(
            f"http://{admin}/stats?filter=^cluster%5C.(primary|shadow|blackhole)%5C.", timeout=5)
    except Exception as e:
        log(f"envoy admin {admin}: {e}")
        return out
    for line in body.decode(errors="replace").splitlines():
        name, _, value = line.partition(": ")
        parts = name.split(".")
        if len(parts) == 3 and parts[2] in ENVOY_KEYS:
            try:
                out[f"{parts[1]}.{parts[2]}"] = float(value)
            except ValueError:
                pass
    return out


def analysis_counts(admin):
    """Pairs umbra's shadow analysis compared (GET /shadow/report) and
    dropped (umbra_shadow_dropped_total, any reason), or None."""
    try:
        _, body = http_get(f"http://{admin}/shadow/report", timeout=5)
        compared = int(sum(r.get("compared", 0) for r in json.loads(body).get("routes", [])))
        _, body = http_get(f"http://{admin}/metrics", timeout=5)
        dropped = int(sum(float(line.split()[-1])
                          for line in body.decode(errors="replace").splitlines()
                          if line.startswith("umbra_shadow_dropped_total")))
        return {"compared": compared, "dropped": dropped}
    except Exception:
        return None


def diff(after, before):
    gauges = ("inflight", "upstream_rq_pending_active", "upstream_rq_active", "open")
    out = {}
    for k, v in after.items():
        if any(k.endswith(g) for g in gauges):
            out[k] = v
        else:
            out[k] = v - before.get(k, 0)
    return out


# ------------------------------------------------------------------ loads


# The body of the `wrk-post` scenarios: a small JSON document as an API
# call carries (mirrored with the request: the tee and the shadow's body),
# padded with trailing whitespace to 256 bytes.
POST_BODY = json.dumps({"order": {"id": 12345, "items": [{"sku": "A-1", "qty": 2}] * 6,
                                  "note": "x" * 40}}, separators=(",", ":")).ljust(256)


def run_wrk(cfg, sc, connections, duration):
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency",
           "-s", cfg.lua, "-H", f"Host: {sc.host}", sc.url]
    env = None
    if sc.tool == "wrk-post":
        # report.lua turns every request into a POST with this body.
        env = dict(os.environ, WRK_BODY=POST_BODY)
        cmd[-1:-1] = ["-H", "Content-Type: application/json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, env=env)
    m = re.search(r"^BENCH_JSON (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed ({p.returncode}): {p.stdout}\n{p.stderr}")
    j = json.loads(m.group(1))
    secs = j["duration_us"] / 1e6
    errors = j["err_connect"] + j["err_read"] + j["err_write"] + j["err_timeout"] + j["err_status"]
    return {
        "cmd": ("POST of 256 B (bench/lib/measure.py POST_BODY): " if env else "")
        + shlex.join(cmd).replace(f" -s {shlex.quote(cfg.lua)}", ""),
        "requests": j["requests"], "rps": j["requests"] / secs if secs else 0.0,
        "p50_ms": j["p50_us"] / 1000, "p99_ms": j["p99_us"] / 1000,
        "errors": errors, "timeouts": j["err_timeout"], "non2xx": j["err_status"],
    }


def run_h2load(cfg, sc, clients, streams, duration):
    logf = os.path.join(cfg.work, f"h2load-{sc.name}.log")
    cmd = ["h2load", "-t1", f"-c{clients}", f"-m{streams}", "-D", f"{duration:g}",
           "--log-file", logf, "-H", f":authority: {sc.host}", sc.url]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = p.stdout
    m_fin = re.search(r"finished in ([0-9.]+)(m?s), ([0-9.]+) req/s", out)
    m_req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    if not m_fin or not m_req:
        raise RuntimeError(f"h2load failed ({p.returncode}): {out}\n{p.stderr}")
    lat = []
    with open(logf) as f:
        for line in f:
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] != "-1":
                lat.append(int(parts[2]))
    os.unlink(logf)
    lat.sort()

    def pct(q):
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))] / 1000

    succeeded = int(m_req.group(4))
    return {
        "cmd": shlex.join(cmd).replace(f" --log-file {shlex.quote(logf)}", ""),
        "requests": succeeded, "rps": float(m_fin.group(3)),
        "p50_ms": pct(50), "p99_ms": pct(99),
        "errors": int(m_req.group(5)) + int(m_req.group(6)) + int(m_req.group(7)),
        "timeouts": int(m_req.group(7)), "non2xx": 0,
    }


def load(cfg, sc, connections=None, duration=None, single=False):
    duration = cfg.duration if duration is None else duration
    if sc.tool == "h2load":
        if single:
            return run_h2load(cfg, sc, 1, 1, duration)
        return run_h2load(cfg, sc, cfg.h2_clients, cfg.h2_streams, duration)
    return run_wrk(cfg, sc, 1 if single else (connections or cfg.connections), duration)


# ---------------------------------------------------------------- measure


class Counters:
    def __init__(self, cfg):
        self.cfg = cfg
        self.shadow = ShadowCounter(cfg.shadow_log)

    def snapshot(self, sc):
        snap = {"shadow": self.shadow.read()}
        bh = blackhole_stats(self.cfg.blackhole_stats)
        snap.update({f"blackhole_{k}": v for k, v in bh.items()})
        if sc.proxy == "umbra" and sc.admin:
            snap.update({f"umbra.{k}": v for k, v in umbra_counters(sc.admin).items()})
        if sc.proxy == "envoy" and sc.admin:
            snap.update({f"envoy.{k}": v for k, v in envoy_counters(sc.admin).items()})
        return snap

    def settle(self, sc):
        """Wait until mirrors stop arriving (the shadow log flushes every 200 ms)."""
        if not sc.mirrored:
            time.sleep(0.3)
            return
        time.sleep(0.5)
        key = "shadow" if sc.sink == "shadow" else "blackhole_requests"
        last, stable, deadline = None, 0, time.time() + 4
        while time.time() < deadline:
            snap = self.snapshot(sc)
            cur = snap.get(key)
            stable = stable + 1 if cur == last else 0
            if stable >= 2:
                return
            last = cur
            time.sleep(0.3)


def preflight(cfg, scenarios, counters):
    notes = {}
    for sc in scenarios:
        # (HTTP/2 scenarios are checked over HTTP/1.1: the listeners serve both)
        before = counters.snapshot(sc)
        try:
            status, body = http_get(sc.url, sc.host)
        except Exception as e:
            status, body = f"error {e}", b""
        ok = status == 200 and len(body) == 1024
        msg = f"{sc.name}: status {status}, body {len(body)} B"
        if sc.mirrored:
            key = "shadow" if sc.sink == "shadow" else "blackhole_requests"
            got = 0
            for _ in range(30):
                time.sleep(0.1)
                got = counters.snapshot(sc)[key] - before[key]
                if got:
                    break
            msg += f", {sc.sink} received {got}"
            ok = ok and got >= 1
        log(("preflight ok   " if ok else "preflight FAIL ") + msg)
        if not ok:
            notes[sc.name] = msg
    return notes


def measure_once(cfg, sc, counters):
    before = counters.snapshot(sc)
    sampler = RssSampler(sc.pid) if sc.pid else None
    if sampler:
        sampler.start()
    try:
        r = load(cfg, sc)
    finally:
        if sampler:
            sampler.stop()
    counters.settle(sc)
    after = counters.snapshot(sc)
    r["delta"] = diff(after, before)
    r["rss_sampled_kib"] = sampler.peak if sampler else None
    try:
        c1 = load(cfg, sc, duration=cfg.c1_duration, single=True)
        r["c1_p50_ms"], r["c1_requests"] = c1["p50_ms"], c1["requests"]
        r["c1_cmd"] = c1["cmd"]
    except Exception as e:
        log(f"{sc.name}: 1-connection run failed: {e}")
        r["c1_p50_ms"], r["c1_requests"] = None, 0
    # let the 1-connection run's mirrors land before the next scenario's snapshot
    counters.settle(sc)
    return r


def rss_check(cfg):
    if cfg.rss_seconds <= 0 or not cfg.rss_pid:
        return None
    sc = Scenario(["rss", "umbra blackholed mirror, RSS check", "umbra", "blackhole", "wrk",
                   cfg.rss_url, "blackhole", str(cfg.rss_pid), cfg.rss_admin])
    counters = Counters(cfg)
    before = counters.snapshot(sc)
    log(f"RSS check: {cfg.rss_seconds} s, {cfg.rss_connections} connections, blackholed shadow")
    samples = []
    sampler = RssSampler(cfg.rss_pid, interval=1.0, on_sample=samples.append)
    sampler.start()
    try:
        r = run_wrk(cfg, sc, cfg.rss_connections, cfg.rss_seconds)
    finally:
        sampler.stop()
    time.sleep(0.5)
    after = counters.snapshot(sc)
    r["delta"] = diff(after, before)
    r["rss_samples_mib"] = [round(s / 1024, 1) for s in samples]
    r["rss_peak_sampled_kib"] = max(samples) if samples else None
    r["vmhwm_kib"] = proc_status(cfg.rss_pid, "VmHWM")
    r["connections"] = cfg.rss_connections
    r["seconds"] = cfg.rss_seconds
    log(f"RSS check: {r['rps']:.0f} req/s, peak sampled RSS {r['rss_peak_sampled_kib'] / 1024:.1f} MiB, "
        f"VmHWM {(r['vmhwm_kib'] or 0) / 1024:.1f} MiB")
    return r


# ----------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_ms(v):
    if v is None:
        return "n/a"
    if v >= 1000:
        return f"{v / 1000:.2f} s"
    if v >= 10:
        return f"{v:.1f} ms"
    if v >= 1:
        return f"{v:.2f} ms"
    return f"{v:.3f} ms"


def fmt_mib(kib):
    return "n/a" if not kib else f"{kib / 1024:.1f} MiB"


def summarize(scenarios, results):
    rows = {}
    for sc in scenarios:
        rs = results.get(sc.name, [])
        if not rs:
            continue
        primary = sum(r["requests"] for r in rs)
        sink = None
        if sc.sink == "shadow":
            sink = sum(r["delta"].get("shadow", 0) for r in rs)
        elif sc.sink == "blackhole":
            sink = sum(r["delta"].get("blackhole_requests", 0) for r in rs)
        counters = {}
        for r in rs:
            for k, v in r["delta"].items():
                if k.startswith(("umbra.", "envoy.")):
                    if k.endswith(("inflight", "_active")):
                        counters[k] = v  # gauge: last value
                    else:
                        counters[k] = counters.get(k, 0) + v
        c1_reqs = [r.get("c1_requests", 0) for r in rs]
        rows[sc.name] = {
            "label": sc.label, "proxy": sc.proxy, "mode": sc.mode,
            "rps": med([r["rps"] for r in rs]),
            "rps_all": [r["rps"] for r in rs],
            "p50_ms": med([r["p50_ms"] for r in rs]),
            "p99_ms": med([r["p99_ms"] for r in rs]),
            "c1_p50_ms": med([r.get("c1_p50_ms") for r in rs]),
            "c1_requests": min(c1_reqs) if c1_reqs else 0,
            "errors": sum(r["errors"] for r in rs),
            "timeouts": sum(r["timeouts"] for r in rs),
            "primary": primary, "sink": sink, "sink_kind": sc.sink,
            "delivered": (sink / primary) if (sink is not None and primary) else None,
            "rss_sampled_kib": max([r["rss_sampled_kib"] or 0 for r in rs]) or None,
            "vmhwm_kib": rs[-1].get("vmhwm_kib"),
            "analysis": rs[-1].get("analysis"),
            "counters": counters,
            "cmd": rs[0]["cmd"], "c1_cmd": rs[0].get("c1_cmd"),
        }
    return rows


def targets(rows, rss):
    def get(name, key):
        r = rows.get(name)
        return r.get(key) if r else None

    out = []

    def ratio(desc, a, b, key, op, bound, fmt="{:.2f}"):
        va, vb = get(a, key), get(b, key)
        if va is None or vb is None or vb == 0:
            out.append((desc, "n/a", f"{op} {bound}", "n/a"))
            return
        v = va / vb
        ok = v >= bound if op == "≥" else v <= bound
        out.append((desc, fmt.format(v), f"{op} {bound}", "PASS" if ok else "FAIL"))

    ratio("umbra mirror ÷ nginx mirror (req/s)", "umbra-mirror", "nginx-mirror", "rps", "≥", 2.0)
    ratio("umbra mirror ÷ Envoy mirror (req/s)", "umbra-mirror", "envoy-mirror", "rps", "≥", 1.5)
    ratio("umbra no-mirror ÷ nginx no-mirror (req/s)", "umbra-nomirror", "nginx-nomirror", "rps", "≥", 1.0)
    ratio("umbra no-mirror ÷ Envoy no-mirror (req/s)", "umbra-nomirror", "envoy-nomirror", "rps", "≥", 1.3)
    ratio("umbra mirror ÷ umbra no-mirror (req/s)", "umbra-mirror", "umbra-nomirror", "rps", "≥", 0.65)
    ratio("umbra blackholed ÷ umbra mirror (req/s)", "umbra-blackhole", "umbra-mirror", "rps", "≥", 0.95)
    ratio("umbra blackholed ÷ umbra mirror (p99)", "umbra-blackhole", "umbra-mirror", "p99_ms", "≤", 1.1)
    for mode in ("nomirror", "mirror"):
        a, b = get(f"umbra-{mode}", "c1_p50_ms"), get(f"nginx-{mode}", "c1_p50_ms")
        desc = f"umbra p50 @1 conn ≤ nginx p50 @1 conn ({'no mirror' if mode == 'nomirror' else 'mirror'})"
        if a is None or b is None:
            out.append((desc, "n/a", "≤ 1.00×", "n/a"))
        else:
            out.append((desc, f"{fmt_ms(a)} vs {fmt_ms(b)}", "≤ 1.00×", "PASS" if a <= b else "FAIL"))
    peak = None
    if rss and (rss.get("vmhwm_kib") or rss.get("rss_peak_sampled_kib")):
        peak = max(rss.get("vmhwm_kib") or 0, rss.get("rss_peak_sampled_kib") or 0)
        src = f"{rss['seconds']} s RSS check"
    elif get("umbra-blackhole", "vmhwm_kib"):
        peak = get("umbra-blackhole", "vmhwm_kib")
        src = "umbra-blackhole scenario"
    if peak:
        out.append((f"umbra peak RSS with blackholed shadow ({src})", fmt_mib(peak), "≤ 64 MiB",
                    "PASS" if peak <= 64 * 1024 else "FAIL"))
    else:
        out.append(("umbra peak RSS with blackholed shadow", "n/a", "≤ 64 MiB", "n/a"))
    ratio("umbra mirror+analysis ÷ umbra mirror only (req/s)", "umbra-analysis", "umbra-mirror", "rps", "≥", 0.8)
    return out


def machine():
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except FileNotFoundError:
        pass
    load = open("/proc/loadavg").read().split()[:3]
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": " ".join(os.uname()[2:3]) + " " + os.uname().machine,
            "loadavg_before": " ".join(load)}


def counters_text(r):
    c = r["counters"]
    if r["proxy"] == "umbra":
        keys = ["sent", "completed", "failed", "timeout", "dropped_overload",
                "dropped_unresponsive", "skipped_sampling", "body_too_large", "inflight"]
        parts = [f"{k}={int(c['umbra.' + k])}" for k in keys if c.get("umbra." + k)]
        text = "umbra_mirror_requests_total: " + (", ".join(parts) or "all 0")
        if r.get("analysis") is not None:
            a = r["analysis"]
            text += f"; analysis compared {a['compared']:,} pairs, dropped {a['dropped']:,} (whole run)"
        return text
    if r["proxy"] == "envoy":
        cl = {"mirror": "shadow", "blackhole": "blackhole"}.get(r["mode"])
        if not cl:
            return f"primary upstream_rq_total={int(c.get('envoy.primary.upstream_rq_total', 0))}"
        keys = ["upstream_rq_total", "upstream_rq_2xx", "upstream_rq_pending_overflow",
                "upstream_cx_overflow", "upstream_rq_timeout", "upstream_rq_pending_active",
                "upstream_rq_active"]
        parts = [f"{k}={int(c.get(f'envoy.{cl}.{k}', 0))}" for k in keys]
        ab = int(c.get("envoy.primary.retry_or_shadow_abandoned", 0))
        return f"cluster.{cl}: " + ", ".join(parts) + f"; primary.retry_or_shadow_abandoned={ab}"
    return ""


def render(cfg, scenarios, rows, rss, notes, mach, started, finished):
    L = []
    L.append("# umbra benchmark results")
    L.append("")
    L.append(f"- Machine: {mach['nproc']} CPUs, {mach['cpu']}, kernel {mach['kernel']}; "
             f"load average before the run {mach['loadavg_before']}")
    L.append(f"- Run: {started} → {finished}")
    L.append(f"- Command: `{cfg.command}`")
    L.append(f"- Load: each scenario `wrk -t1 -c{cfg.connections} -d{cfg.duration:g}s --latency` keep-alive "
             f"(HTTP/2: `h2load -t1 -c{cfg.h2_clients} -m{cfg.h2_streams} -D {cfg.duration:g}`), then "
             f"`-c1 -d{cfg.c1_duration:g}s` for p50 @1 conn; {cfg.rounds} round(s), scenarios alternating "
             f"round-robin, median per scenario. Backends: one nginx, 1 worker, static 1 KiB responses.")
    if cfg.versions:
        L.append(f"- Versions: {cfg.versions}")
    L.append("")
    L.append("| scenario | req/s | p50 | p99 | p50 @1 conn | peak RSS | mirrors delivered | errors |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for sc in scenarios:
        r = rows.get(sc.name)
        if not r:
            continue
        if r["proxy"] == "umbra":
            rss_txt = fmt_mib(r["vmhwm_kib"])
        elif r["rss_sampled_kib"]:
            rss_txt = f"({fmt_mib(r['rss_sampled_kib'])})"
        else:
            rss_txt = "–"
        if r["delivered"] is None:
            dl = "–"
        elif r["sink_kind"] == "blackhole":
            dl = f"{100 * r['delivered']:.1f}% reached blackhole"
        else:
            dl = f"{100 * r['delivered']:.1f}%"
        c1 = fmt_ms(r["c1_p50_ms"])
        if r["c1_requests"] < 100:
            c1 += f" ({r['c1_requests']} req)"
        err = str(r["errors"])
        if r["timeouts"]:
            err += f" ({r['timeouts']} timeouts)"
        L.append(f"| {r['label']} | {r['rps']:,.0f} | {fmt_ms(r['p50_ms'])} | {fmt_ms(r['p99_ms'])} | "
                 f"{c1} | {rss_txt} | {dl} | {err} |")
    L.append("")
    L.append("Peak RSS: umbra = VmHWM of a umbra process dedicated to that scenario (all rounds); "
             "(in parentheses) = highest VmRSS sampled during that scenario, whole process tree, "
             "shared by the scenarios of that proxy. Mirrors delivered = requests received by the "
             "healthy shadow ÷ primary requests completed by the client (for blackholed scenarios: "
             "requests that reached the blackhole). Errors = wrk socket errors + non-2xx, summed over rounds.")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| check | value | target | result |")
    L.append("|---|---:|---:|:---:|")
    tg = targets(rows, rss)
    for desc, val, tgt, res in tg:
        L.append(f"| {desc} | {val} | {tgt} | {'**FAIL**' if res == 'FAIL' else res} |")
    passed = sum(1 for t in tg if t[3] == "PASS")
    failed = sum(1 for t in tg if t[3] == "FAIL")
    L.append("")
    L.append(f"{passed} passed, {failed} failed, {len(tg) - passed - failed} not measured.")
    L.append("")
    if rss:
        L.append("## RSS under saturating load, blackholed shadow")
        L.append("")
        L.append(f"Fresh umbra process, `wrk -t1 -c{rss['connections']} -d{rss['seconds']}s` with `Host: blackhole`: "
                 f"{rss['rps']:,.0f} req/s, p99 {fmt_ms(rss['p99_ms'])}, errors {rss['errors']}; "
                 f"peak VmRSS sampled each second **{fmt_mib(rss['rss_peak_sampled_kib'])}**, "
                 f"VmHWM {fmt_mib(rss['vmhwm_kib'])}.")
        L.append("")
        L.append(f"RSS samples (MiB): {' '.join(str(s) for s in rss['rss_samples_mib'])}")
        c = {k[6:]: int(v) for k, v in rss["delta"].items() if k.startswith("umbra.") and v}
        L.append("")
        L.append(f"Mirror counters: {c}; blackhole saw {int(rss['delta'].get('blackhole_connections', 0))} "
                 f"connections, {int(rss['delta'].get('blackhole_requests', 0))} requests.")
        L.append("")
    L.append("## Mirror accounting (summed over rounds)")
    L.append("")
    L.append("| scenario | primary completed | received by shadow | proxy counters |")
    L.append("|---|---:|---:|---|")
    for sc in scenarios:
        r = rows.get(sc.name)
        if not r or not sc.mirrored:
            continue
        recv = "–" if r["sink"] is None else f"{int(r['sink']):,} ({r['sink_kind']})"
        L.append(f"| {r['label']} | {r['primary']:,} | {recv} | {counters_text(r)} |")
    L.append("")
    L.append("## Per-round req/s")
    L.append("")
    L.append("| scenario | " + " | ".join(f"round {i + 1}" for i in range(cfg.rounds)) + " |")
    L.append("|---|" + "---:|" * cfg.rounds)
    for sc in scenarios:
        r = rows.get(sc.name)
        if r:
            vals = [f"{v:,.0f}" for v in r["rps_all"]] + [""] * (cfg.rounds - len(r["rps_all"]))
            L.append(f"| {r['label']} | " + " | ".join(vals) + " |")
    L.append("")
    L.append("## Commands")
    L.append("")
    L.append("```")
    for sc in scenarios:
        r = rows.get(sc.name)
        if r:
            L.append(f"{sc.name}: {r['cmd']}")
    L.append("```")
    if notes:
        L.append("")
        L.append("## Preflight failures")
        L.append("")
        for k, v in notes.items():
            L.append(f"- {v}")
    return "\n".join(L) + "\n"


# -------------------------------------------------------------------- run


def cmd_run():
    cfg = Config()
    scenarios = load_scenarios(cfg)
    counters = Counters(cfg)
    mach = machine()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    notes = preflight(cfg, scenarios, counters)
    if cfg.warmup > 0:
        log(f"warm-up: {cfg.warmup:g} s per scenario")
        for sc in scenarios:
            try:
                load(cfg, sc, duration=cfg.warmup)
            except Exception as e:
                log(f"warm-up {sc.name} failed: {e}")
        time.sleep(0.5)
    results = {sc.name: [] for sc in scenarios}
    for rnd in range(cfg.rounds):
        for sc in scenarios:
            try:
                r = measure_once(cfg, sc, counters)
            except Exception as e:
                log(f"round {rnd + 1} {sc.name}: FAILED: {e}")
                continue
            results[sc.name].append(r)
            d = r["delta"]
            extra = ""
            if sc.sink == "shadow":
                extra = f", shadow got {int(d.get('shadow', 0))}"
            elif sc.sink == "blackhole":
                extra = f", blackhole got {int(d.get('blackhole_requests', 0))}"
            log(f"round {rnd + 1}/{cfg.rounds} {sc.name:16s} {r['rps']:9.0f} req/s  p50 {fmt_ms(r['p50_ms'])}"
                f"  p99 {fmt_ms(r['p99_ms'])}  p50@1 {fmt_ms(r['c1_p50_ms'])}  errors {r['errors']}{extra}")
    for sc in scenarios:
        if sc.proxy == "umbra" and sc.pid and results[sc.name]:
            results[sc.name][-1]["vmhwm_kib"] = proc_status(sc.pid, "VmHWM")
            results[sc.name][-1]["analysis"] = analysis_counts(sc.admin)
    rss = rss_check(cfg)
    finished = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    rows = summarize(scenarios, results)
    md = render(cfg, scenarios, rows, rss, notes, mach, started, finished)
    os.makedirs(os.path.dirname(cfg.results_md), exist_ok=True)
    with open(cfg.results_md, "w") as f:
        f.write(md)
    if cfg.results_json:
        with open(cfg.results_json, "w") as f:
            json.dump({"machine": mach, "rows": rows, "rss": rss, "raw": results,
                       "preflight_failures": notes}, f, indent=1, default=str)
    print(md)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd = sys.argv[1]
    if cmd == "freeports":
        print(" ".join(str(p) for p in free_ports(int(sys.argv[2]))))
    elif cmd == "wait-http":
        wait_http(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    elif cmd == "run":
        cmd_run()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
