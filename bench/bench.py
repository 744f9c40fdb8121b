#!/usr/bin/env python3
"""Side-by-side benchmark of the gateway against nginx, HAProxy, Caddy and a bare Pingora proxy.

Every proxy runs with one worker/thread on CPU 0, in front of the same two backends; the load
generator and the backends share CPU 1. Proxies are run interleaved (A B C ... A B C ...) for
several rounds; per proxy the harness reports the median req/s, p50/p99 latency, CPU time per
request (utime+stime of the proxy's processes over the requests served) and peak RSS, and the
ratios of the gateway to the others. Results go to stdout and to bench/results/latest.md.

Run it through bench/run, which installs the tools and builds the release binaries.
"""

import argparse
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE = os.path.join(ROOT, "target", "release")
TICK = os.sysconf("SC_CLK_TCK")
MAXCONN = 10100
GZIP_LEVEL = 5
PROXY_CPU = "0"
LOAD_CPU = "1"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listening on {port}")


def tree(pid):
    """pid and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        except (OSError, IndexError, ValueError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_times(pid):
    """User and kernel CPU seconds of `pid` and its children."""
    user = system = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime
            system += int(fields[12])  # stime
        except (OSError, IndexError):
            pass
    return user / TICK, system / TICK


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def memory_kb(pid, key):
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


class Proxy:
    """A proxy under test: writes its config, starts pinned to PROXY_CPU, stops."""

    name = "?"
    binary = None
    variant = False

    def supports(self, scenario):
        """Whether this proxy can serve the scenario at all."""
        return True

    @property
    def of(self):
        """The proxy this one stands for in a scenario's list (a baseline build's: its own)."""
        return self.name

    def __init__(self, workdir, backends):
        self.dir = os.path.join(workdir, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.backends = backends
        self.proc = None
        self.port = None
        self.log = None

    def available(self):
        return self.binary is None or shutil.which(self.binary) or os.path.exists(self.binary)

    def start(self, scenario):
        self.port = free_port()
        cmd, env = self.command(scenario)
        self.log = open(os.path.join(self.dir, "log.txt"), "ab")
        self.proc = subprocess.Popen(
            ["taskset", "-c", PROXY_CPU] + cmd,
            stdout=self.log,
            stderr=self.log,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        wait_port(self.port)
        time.sleep(0.2)

    def stop(self):
        """SIGINT (what each proxy does on it: the gateway's quick stop lets an instrumented
        build write its profile), then SIGKILL for whatever is left of its group after 3 s."""
        if self.proc:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=3)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            finally:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()
            self.proc = None
        if self.log:
            self.log.close()

    def pid(self):
        return self.proc.pid

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path


CERTS = {}


def make_certs(workdir):
    """One ECDSA P-256 certificate for every proxy (made with `gateway certs`), and HAProxy's
    combined PEM."""
    d = os.path.join(workdir, "certs")
    subprocess.run([os.path.join(RELEASE, "gateway"), "certs", "--dir", d, "localhost", "127.0.0.1"],
                   check=True, capture_output=True)
    CERTS["cert"] = os.path.join(d, "localhost.pem")
    CERTS["key"] = os.path.join(d, "localhost-key.pem")
    CERTS["combined"] = os.path.join(d, "combined.pem")
    with open(CERTS["combined"], "w") as f:
        f.write(open(CERTS["cert"]).read() + open(CERTS["key"]).read())


JWT_SECRET = "bench-secret-bench-secret-bench-secret-0123"


def hs256_token():
    import base64, hashlib, hmac, json
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps({"sub": "bench-user", "exp": 4000000000}).encode())
    sig = hmac.new(JWT_SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def route_prefixes(scenario):
    return [f"/r{i}/" for i in range(scenario.get("routes", 0))]


class Gateway(Proxy):
    name = "gateway"

    forwarding = ""
    upstream_extra = ""

    def config(self, scenario):
        b = self.backends
        routes = "".join(
            f"  - {{ name: r{i}, upstream: b, match: {{ path_prefix: {p} }} }}\n"
            for i, p in enumerate(route_prefixes(scenario))
        )
        self.admin = free_port()
        tls = ""
        if scenario.get("tls"):
            tls = f", tls: {{ certificates: [ {{ cert: \"{CERTS['cert']}\", key: \"{CERTS['key']}\" }} ] }}"
        chain, policies = "", ""
        if scenario.get("chain"):
            chain = (
                f"auth:\n  hs: {{ secret: \"{JWT_SECRET}\", forward_claims: {{ sub: X-User-Id }} }}\n"
                f"rate_limits:\n  per_user: {{ rate: 100000000/s, burst: 100000000, key: \"jwt:sub\" }}\n"
                f"access_log: {{ path: \"{os.path.join(self.dir, 'access.log')}\" }}\n"
            )
            policies = ", auth: hs, rate_limit: per_user"
        if scenario.get("gzip"):
            chain += f"policies:\n  squeeze: {{ compress: {{ encodings: [gzip], levels: {{ gzip: {GZIP_LEVEL} }} }} }}\n"
            policies = ", policies: [squeeze]"
        return (
            f"threads: 1\nh2c: {'true' if scenario.get('h2') else 'false'}\n{self.forwarding}{chain}"
            f"listeners:\n  http: {{ address: \"127.0.0.1:{self.port}\"{tls} }}\n"
            f"admin: {{ address: \"127.0.0.1:{self.admin}\" }}\n"
            f"upstreams:\n  b:\n    targets: [\"{b[0]}\", \"{b[1]}\"]\n    timeouts: {{ idle: 60s }}\n{self.upstream_extra}"
            f"routes:\n{routes}  - {{ name: all, upstream: b{policies} }}\n"
        )

    def command(self, scenario):
        self.cfg = self.write("gateway.yaml", self.config(scenario))
        return [os.path.join(RELEASE, "gateway"), "run", "-c", self.cfg], {"RUST_LOG": "warn"}

    def reload_time(self, scenario):
        """Seconds from a changed file on disk to the new configuration serving."""
        def generation():
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/ready", timeout=2) as r:
                return int(re.search(rb'"config_generation":(\d+)', r.read()).group(1))
        before = generation()
        text = open(self.cfg).read() + "# touched\n"
        t0 = time.perf_counter()
        with open(self.cfg + ".tmp", "w") as f:
            f.write(text)
        os.rename(self.cfg + ".tmp", self.cfg)
        while generation() == before:
            time.sleep(0.001)
        return time.perf_counter() - t0


class GatewayPlain(Gateway):
    """The gateway with no headers added (no X-Forwarded-*, X-Real-IP, X-Request-Id)."""

    name = "gateway-plain"
    forwarding = "forwarding: { x_forwarded: false, request_id: false, traceparent: false }\n"


class GatewayH2Upstream(Gateway):
    """The gateway speaking HTTP/2 in the clear (h2c) to the backends instead of HTTP/1.1."""

    name = "gateway-h2up"
    variant = True
    upstream_extra = "    protocol: h2c\n"


class Bare(Proxy):
    name = "bare-pingora"

    def command(self, scenario):
        args = ["--h2c"] if scenario.get("h2") else []
        if scenario.get("tls"):
            args += ["--tls", CERTS["cert"], CERTS["key"]]
        return [os.path.join(RELEASE, "bare-pingora")] + args + [f"127.0.0.1:{self.port}"] + self.backends, None


class Lean(Proxy):
    """pingora-core's HTTP/1.1 sessions driven directly (bench/lean-pingora): the floor of a
    proxy path of the gateway's own below Pingora's proxy. HTTP/1.1 GETs only."""

    name = "lean-pingora"
    variant = True

    def supports(self, scenario):
        return not (scenario.get("tls") or scenario.get("h2"))

    def command(self, scenario):
        return [os.path.join(RELEASE, "lean-pingora"), f"127.0.0.1:{self.port}"] + self.backends, None


class LeanGateway(Gateway):
    """The gateway's phases on pingora-core's HTTP/1.1 sessions (bench/lean-gateway), with the
    gateway's default headers: what a request path of the gateway's own would cost. HTTP/1.1
    GETs only; its configuration's listener is not bound (it listens on the proxy's port)."""

    name = "lean-gateway"
    variant = True

    def supports(self, scenario):
        return not (scenario.get("tls") or scenario.get("h2"))

    def command(self, scenario):
        # The configuration names the port lean-gateway listens on; it binds it itself.
        self.cfg = self.write("lean-gateway.yaml", self.config(scenario))
        return [os.path.join(RELEASE, "lean-gateway"), self.cfg, f"127.0.0.1:{self.port}"], {"RUST_LOG": "warn"}


class LeanGatewayPlain(LeanGateway):
    """`lean-gateway` with no headers added, as gateway-plain: with `lean-gateway`, what the
    added headers cost off Pingora's proxy."""

    name = "lean-gateway-plain"
    forwarding = GatewayPlain.forwarding


class Nginx(Proxy):
    name = "nginx"
    binary = "nginx"

    def command(self, scenario):
        b = self.backends
        locations = "".join(
            f"    location {p} {{ proxy_pass http://b; }}\n" for p in route_prefixes(scenario)
        )
        http2 = " http2" if scenario.get("h2") else ""
        gzip = ""
        if scenario.get("gzip"):
            gzip = (f"    gzip on; gzip_proxied any; gzip_vary on; gzip_comp_level {GZIP_LEVEL};\n"
                    "    gzip_types application/json; gzip_min_length 1024;\n")
        if scenario.get("tls"):
            http2 += f" ssl;\n    ssl_certificate {CERTS['cert']};\n    ssl_certificate_key {CERTS['key']};\n    ssl_protocols TLSv1.3"
        cfg = f"""
worker_processes 1;
daemon off;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections {MAXCONN * 2}; }}
worker_rlimit_nofile {MAXCONN * 2 + 100};
http {{
  access_log off;
  client_body_temp_path {self.dir}/body;
  proxy_temp_path {self.dir}/proxy;
  fastcgi_temp_path {self.dir}/fastcgi;
  uwsgi_temp_path {self.dir}/uwsgi;
  scgi_temp_path {self.dir}/scgi;
  keepalive_requests 1000000;
  upstream b {{ server {b[0]}; server {b[1]}; keepalive 1024; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{self.port}{http2};
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Request-Id $request_id;
    add_header X-Request-Id $request_id always;
{gzip}{locations}    location / {{ proxy_pass http://b; }}
  }}
}}
"""
        return ["nginx", "-c", self.write("nginx.conf", cfg), "-p", self.dir], None


class HAProxy(Proxy):
    name = "haproxy"
    binary = "haproxy"

    def command(self, scenario):
        b = self.backends
        rules = "".join(f"  use_backend b if {{ path_beg {p} }}\n" for p in route_prefixes(scenario))
        proto = " proto h2" if scenario.get("h2") else ""
        if scenario.get("tls"):
            proto += f" ssl crt {CERTS['combined']} ssl-min-ver TLSv1.3"
        cfg = f"""
global
  nbthread 1
  maxconn {MAXCONN}
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
frontend f
  bind 127.0.0.1:{self.port}{proto}
  unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt:%pid
  unique-id-header X-Request-Id
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-request set-header X-Real-IP %[src]
  http-response set-header X-Request-Id %[unique-id]
{rules}  default_backend b
backend b
  balance roundrobin
  http-reuse always
  server s1 {b[0]}
  server s2 {b[1]}
"""
        return ["haproxy", "-db", "-f", self.write("haproxy.cfg", cfg)], None


class Caddy(Proxy):
    name = "caddy"
    binary = "caddy"

    def command(self, scenario):
        b = self.backends
        protocols = "\n  servers {\n    protocols h1 h2c\n  }" if scenario.get("h2") else ""
        cfg = f"""{{
  admin off
  auto_https off{protocols}
}}
{'https' if scenario.get('tls') else 'http'}://127.0.0.1:{self.port} {{
  {f"tls {CERTS['cert']} {CERTS['key']}" if scenario.get('tls') else ''}
  reverse_proxy {b[0]} {b[1]} {{
    lb_policy round_robin
    header_up X-Request-Id {{http.request.uuid}}
    header_down X-Request-Id {{http.request.uuid}}
  }}
}}
"""
        return ["caddy", "run", "--adapter", "caddyfile", "--config", self.write("Caddyfile", cfg)], {
            "GOMAXPROCS": "1",
            "HOME": self.dir,
            "XDG_DATA_HOME": self.dir,
            "XDG_CONFIG_HOME": self.dir,
        }


def run_load(cmd):
    out = subprocess.run(["taskset", "-c", LOAD_CPU] + cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr or out.stdout}")
    return out.stdout


def to_ms(value, unit):
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(port, path, seconds, conns, scenario=None):
    scenario = scenario or {}
    scheme = "https" if scenario.get("tls") else "http"
    headers = ["-H", f"Authorization: Bearer {hs256_token()}"] if scenario.get("chain") else []
    if scenario.get("gzip"):
        headers += ["-H", "Accept-Encoding: gzip"]
    out = run_load(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"] + headers + [f"{scheme}://127.0.0.1:{port}{path}"])
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(map(int, m.groups())) if m else 0
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))

    def parse(s):
        m = re.match(r"([\d.]+)(us|ms|s)", s)
        return to_ms(*m.groups()) if m else float("nan")

    return {"requests": total, "errors": errors, "p50": parse(lat.get("50", "")), "p99": parse(lat.get("99", ""))}


def h2load(port, path, seconds, conns, streams=10, rps=None, h1=False, logdir=None):
    cmd = ["h2load", "-c", str(conns), "-D", str(seconds), "-m", str(streams)]
    if h1:
        cmd += ["--h1"]
    if rps:
        cmd += ["--rps", str(rps)]
    log = None
    if logdir:
        log = os.path.join(logdir, "h2load.log")
        cmd += ["--log-file", log]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = run_load(cmd)
    done = int(re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out).group(2))
    res = {"requests": done, "errors": 0, "p50": float("nan"), "p99": float("nan")}
    if log and os.path.exists(log):
        times = sorted(int(line.split("\t")[2]) for line in open(log) if line.count("\t") >= 2)
        if times:
            res["p50"] = times[len(times) // 2] / 1000.0
            res["p99"] = times[min(len(times) - 1, int(len(times) * 0.99))] / 1000.0
        os.remove(log)
    return res


def backend_connections(backends):
    """Connections the backend process has accepted so far, this query's own among them: the
    bench backend's `/_connections` count, or nginx's `stub_status` "accepts"."""
    port = backends[0].rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_connections", timeout=5) as r:
        text = r.read().decode()
    if text.strip().isdigit():
        return int(text)
    # Active connections: N\nserver accepts handled requests\n A H R\n...
    return int(text.splitlines()[2].split()[0])


def measure(proxy, scenario, seconds, workdir):
    port = proxy.port
    pid = proxy.pid()
    kind = scenario["load"]
    conns0 = backend_connections(proxy.backends)
    user0, system0 = cpu_times(pid)
    t0 = time.perf_counter()
    if kind == "wrk":
        load = lambda: wrk(port, scenario["path"], seconds, scenario.get("conns", 64), scenario)
    elif kind == "h2":
        load = lambda: h2load(port, scenario["path"], seconds, scenario.get("conns", 64), logdir=workdir)
    elif kind == "rate":
        load = lambda: h2load(port, scenario["path"], seconds, 64, streams=1, rps=scenario["rps"] // 64, h1=True, logdir=workdir)
    else:
        raise ValueError(kind)
    # Upstream connections are also counted over the run's steady middle, from one second in to
    # one second before its end: the load generator's start and its end (clients closing with
    # requests in flight, whose upstream connections a proxy may then not keep) stay out of it.
    done = {}
    runner = threading.Thread(target=lambda: done.update(r=load()))
    runner.start()
    steady = []
    for at in (1.0, seconds - 1.0):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        steady.append((backend_connections(proxy.backends), time.perf_counter()))
    runner.join()
    r = done["r"]
    elapsed = time.perf_counter() - t0
    user1, system1 = cpu_times(pid)
    user, cpu = user1 - user0, user1 + system1 - user0 - system0
    r["rps"] = r["requests"] / elapsed
    r["cpu_us"] = cpu / r["requests"] * 1e6 if r["requests"] else float("nan")
    r["user_us"] = user / r["requests"] * 1e6 if r["requests"] else float("nan")
    r["rss_mb"] = memory_kb(pid, "VmHWM") / 1024
    # Less the three queries' own connections.
    opened = backend_connections(proxy.backends) - conns0 - 3
    r["upstream_conns_per_1k"] = opened / r["requests"] * 1000 if r["requests"] else float("nan")
    # The window's requests estimated at the run's mean rate; less the second query's connection.
    (c_a, t_a), (c_b, t_b) = steady
    in_window = r["rps"] * (t_b - t_a)
    r["steady_conns_per_1k"] = (c_b - c_a - 1) / in_window * 1000 if in_window else float("nan")
    if scenario.get("gzip"):
        r["body_bytes"] = response_bytes(port, scenario["path"])
    return r


def response_bytes(port, path):
    """Body bytes of one answer to a client accepting gzip (as sent: still compressed)."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") != "gzip":
            raise RuntimeError(f"port {port}: {path} came back without gzip")
    return len(body)


def idle_connections(proxy, count):
    """RSS of the proxy holding `count` idle keep-alive client connections."""
    base = memory_kb(proxy.pid(), "VmRSS")
    socks = []
    req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(req)
        socks.append(s)
    for s in socks:
        s.settimeout(5)
        try:
            s.recv(4096)
        except OSError:
            pass
    time.sleep(1)
    rss = memory_kb(proxy.pid(), "VmRSS")
    for s in socks:
        s.close()
    return {"rss_mb": rss / 1024, "per_conn_kb": (rss - base) / count}


SCENARIOS = {
    "http1": {"title": "HTTP/1.1, 64 connections, 13-byte body", "load": "wrk", "path": "/"},
    "h2": {"title": "HTTP/2 (h2c) downstream, 64 connections x 10 streams", "load": "h2", "path": "/", "h2": True},
    "rate": {"title": "latency at a fixed rate (set by --rate)", "load": "rate", "path": "/", "rps": 10000},
    "body1k": {"title": "1 KiB response body", "load": "wrk", "path": "/1k"},
    "body64k": {"title": "64 KiB response body", "load": "wrk", "path": "/64k"},
    "routes1000": {"title": "1,000-route config, request matches the last route", "load": "wrk", "path": "/r999/x", "routes": 1000},
    "idle10k": {"title": "idle keep-alive connections (RSS)", "load": "idle"},
    "tls": {"title": "HTTPS (TLS 1.3, ECDSA P-256), 64 connections, 13-byte body", "load": "wrk", "path": "/", "tls": True},
    "tls16k": {"title": "HTTPS (TLS 1.3), 16 KiB response body", "load": "wrk", "path": "/16k", "tls": True},
    "tls64k": {"title": "HTTPS (TLS 1.3), 64 KiB response body", "load": "wrk", "path": "/64k", "tls": True},
    "gzip16k": {"title": "gzip (same level) of a 16 KiB JSON answer, gateway vs nginx", "load": "wrk", "path": "/json16k",
                "gzip": True, "only": ["gateway", "nginx"], "conns": 16},
    "gzip256k": {"title": "gzip (same level) of a 256 KiB JSON answer, gateway vs nginx", "load": "wrk", "path": "/json256k",
                 "gzip": True, "only": ["gateway", "nginx"], "conns": 16},
    "floor": {"title": "HTTP/1.1, 64 connections, 13-byte body: the gateway and Pingora's proxy against pingora-core's sessions driven directly",
              "load": "wrk", "path": "/", "only": ["gateway", "gateway-plain", "bare-pingora", "lean-gateway", "lean-gateway-plain", "lean-pingora", "nginx"]},
    "upstream-h2": {"title": "HTTP/1.1 clients, the gateway's upstream connections HTTP/1.1 (pooled) vs HTTP/2 (h2c, multiplexed)",
                    "load": "wrk", "path": "/", "only": ["gateway", "gateway-h2up"]},
    "chain": {"title": "full chain: TLS + JWT (HS256) + rate limit per user + metrics + JSON access log (gateway) vs bare Pingora with TLS",
              "load": "wrk", "path": "/", "tls": True, "chain": True, "only": ["gateway", "bare-pingora"]},
}

def baseline_of(cls, directory, label):
    """`cls` running the binaries of another build in `directory` (`--baseline DIR[=LABEL]`),
    named `NAME@LABEL`, beside this build's: an A/B of a change in one run."""

    class Baseline(cls):
        name = f"{cls.name}@{label}"
        of = cls.name

        def command(self, scenario):
            cmd, env = super().command(scenario)
            return [os.path.join(directory, os.path.basename(cmd[0]))] + cmd[1:], env

    return Baseline


PROXIES = {"gateway": Gateway, "gateway-plain": GatewayPlain, "gateway-h2up": GatewayH2Upstream, "bare-pingora": Bare, "lean-pingora": Lean, "lean-gateway": LeanGateway, "lean-gateway-plain": LeanGatewayPlain, "nginx": Nginx, "haproxy": HAProxy, "caddy": Caddy}


BACKENDS = {
    "bench": "bench/backend (hyper, one thread): `Content-Length` and `Date` only",
    "nginx": "nginx 1 worker, `keepalive_requests` raised to 1,000,000 (`Server`, `Date`, `Content-Type`, `Connection` on every answer)",
    "nginx-default": "nginx 1 worker, its default `keepalive_requests 1000`: it closes each upstream connection after 1,000 requests",
}


def start_backend(kind, backends, workdir):
    """The two backends the proxies share, on CPU LOAD_CPU: the bench backend, or one nginx
    worker listening on both addresses with the same paths (`/` 13 bytes, `/1k`, `/16k`,
    `/64k`, `/health`) and `stub_status` at `/_connections`."""
    if kind == "bench":
        return subprocess.Popen(
            ["taskset", "-c", LOAD_CPU, os.path.join(RELEASE, "bench-backend")] + backends,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    d = os.path.join(workdir, "nginx-backend")
    os.makedirs(os.path.join(d, "www"), exist_ok=True)
    for name, size in (("1k", 1024), ("16k", 16384), ("64k", 65536)):
        with open(os.path.join(d, "www", name), "wb") as f:
            f.write(b"x" * size)
    keepalive = "keepalive_requests 1000000;" if kind == "nginx" else ""
    listen = "".join(f"    listen {b};\n" for b in backends)
    cfg = f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections {MAXCONN * 2}; }}
worker_rlimit_nofile {MAXCONN * 2 + 100};
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  default_type text/plain;
  {keepalive}
  server {{
{listen}    root {d}/www;
    location = / {{ return 200 "hello world!\\n"; }}
    location = /health {{ return 200 "ok\\n"; }}
    location = /_connections {{ stub_status; }}
  }}
}}
"""
    path = os.path.join(d, "nginx.conf")
    with open(path, "w") as f:
        f.write(cfg)
    return subprocess.Popen(
        ["taskset", "-c", LOAD_CPU, "nginx", "-c", path, "-p", d],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # Its own process group, so that stopping it stops nginx's worker too.
        start_new_session=True,
    )


def fmt(v, digits=1):
    return "—" if v is None or v != v else f"{v:,.{digits}f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated: " + ", ".join(SCENARIOS))
    ap.add_argument("--proxies", default=None, help="comma-separated: " + ", ".join(PROXIES)
                    + " (a variant (gateway-h2up, lean-pingora, lean-gateway, lean-gateway-plain) runs where a scenario names it, and also, when named"
                    " here, in scenarios that name no proxies and that it can serve)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rate", type=int, default=0, help="fixed rate for 'rate' (default: half of nginx's http1 req/s, or 10000)")
    ap.add_argument("--idle", type=int, default=10000)
    ap.add_argument("--gzip-level", type=int, default=5, help="gzip level for gzip16k and gzip256k (both proxies)")
    ap.add_argument("--backend", default="bench", choices=list(BACKENDS),
                    help="what the proxies forward to: " + "; ".join(f"{k}: {v}" for k, v in BACKENDS.items()))
    ap.add_argument("--baseline", metavar="DIR[=LABEL]", action="append", default=[],
                    help="also run the gateway, gateway-plain and bare Pingora built in DIR (another build's target/release) "
                         "as NAME@LABEL (default label: base); may be repeated")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "latest.md"))
    args = ap.parse_args()

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # HAProxy reserves two descriptors per connection it may accept.
    if 2 * (args.idle + 100) + 100 > hard:
        args.idle = max((hard - 100) // 2 - 100, 100)
        print(f"open-file limit {hard}: idle scenario uses {args.idle} connections", file=sys.stderr)
    global MAXCONN, GZIP_LEVEL
    MAXCONN = args.idle + 100
    GZIP_LEVEL = args.gzip_level
    workdir = tempfile.mkdtemp(prefix="gateway-bench-")
    b_ports = [free_port(), free_port()]
    backends = [f"127.0.0.1:{p}" for p in b_ports]
    backend = start_backend(args.backend, backends, workdir)
    for p in b_ports:
        wait_port(p)
    make_certs(workdir)

    named = set(args.proxies.split(",")) if args.proxies else set()
    proxies = []
    for name in (args.proxies or ",".join(PROXIES)).split(","):
        p = PROXIES[name](workdir, backends)
        if p.available():
            proxies.append(p)
        else:
            print(f"skipping {name}: not installed", file=sys.stderr)
        for base in args.baseline if name in ("gateway", "gateway-plain", "bare-pingora") else []:
            directory, _, label = base.partition("=")
            proxies.append(baseline_of(PROXIES[name], directory, label or "base")(workdir, backends))

    results = {}  # scenario -> proxy -> list of runs
    extra = {}
    try:
        for sname in args.scenarios.split(","):
            scenario = dict(SCENARIOS[sname])
            if sname == "rate":
                nginx_rps = [r["rps"] for r in results.get("http1", {}).get("nginx", [])]
                scenario["rps"] = args.rate or (int(statistics.median(nginx_rps) / 2) if nginx_rps else 10000)
                scenario["title"] = f"latency at a fixed {scenario['rps']:,} req/s (HTTP/1.1)"
            SCENARIOS[sname]["title"] = scenario["title"]
            print(f"\n== {scenario['title']}", flush=True)
            # A variant of the gateway runs only where a scenario names it, or where `--proxies`
            # names it and the scenario names none; never where it cannot serve.
            these = [p for p in proxies
                     if p.of in scenario.get("only", [p.of] if not p.variant or p.of in named else [])
                     and p.supports(scenario)]
            results[sname] = {p.name: [] for p in these}
            for rnd in range(args.rounds if scenario["load"] != "idle" else 1):
                for p in these:
                    p.start(scenario)
                    try:
                        if scenario["load"] == "idle":
                            r = idle_connections(p, args.idle)
                            print(f"  {p.name:13} {r['rss_mb']:8.1f} MB RSS, {r['per_conn_kb']:6.1f} kB/conn", flush=True)
                        else:
                            if args.warmup:
                                wrk(p.port, scenario["path"], args.warmup, 64, scenario) if not scenario.get("h2") else h2load(p.port, scenario["path"], args.warmup, 64)
                            r = measure(p, scenario, args.seconds, workdir)
                            if r["errors"]:
                                print(f"  WARNING: {p.name} had {r['errors']} failed requests", flush=True)
                            print(
                                f"  round {rnd + 1} {p.name:13} {r['rps']:10,.0f} req/s  p50 {fmt(r['p50'], 2)} ms  p99 {fmt(r['p99'], 2)} ms  "
                                f"{r['cpu_us']:6.1f} µs CPU/req ({r['user_us']:4.1f} user)  {r['rss_mb']:6.1f} MB  upstream conns/1k {r['steady_conns_per_1k']:.3f} steady, {r['upstream_conns_per_1k']:.2f} whole",
                                flush=True,
                            )
                            if sname == "routes1000" and type(p) is Gateway:
                                extra.setdefault("reload", []).append(p.reload_time(scenario))
                        results[sname][p.name].append(r)
                    finally:
                        p.stop()
    finally:
        os.killpg(backend.pid, signal.SIGKILL)
        backend.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    report = render(results, extra, proxies, args)
    print("\n" + report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)


def render(results, extra, proxies, args):
    cpu_model = ""
    try:
        cpu_model = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"# Benchmark results",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')} · {os.cpu_count()} CPUs ({cpu_model}) · proxy pinned to CPU {PROXY_CPU}, "
        f"load and backends on CPU {LOAD_CPU} · {args.rounds} interleaved rounds of {args.seconds}s, medians",
        "",
        f"Backend: {BACKENDS[args.backend]}. Upstream connections opened per 1,000 requests: over the "
        "steady middle of each run (from 1 s in to 1 s before its end), and over the whole run (with "
        "the load generator's start and end, where clients close with requests in flight).",
        "",
    ]
    for sname, per_proxy in results.items():
        lines += [f"## {SCENARIOS[sname]['title']}", ""]
        if SCENARIOS[sname]["load"] == "idle":
            lines += ["| proxy | RSS with connections (MB) | per connection (kB) |", "|---|---:|---:|"]
            for name, runs in per_proxy.items():
                if runs:
                    lines.append(f"| {name} | {fmt(runs[0]['rss_mb'])} | {fmt(runs[0]['per_conn_kb'])} |")
            lines.append("")
            continue
        med = {}
        for name, runs in per_proxy.items():
            if runs:
                med[name] = {k: statistics.median(r[k] for r in runs) for k in ("rps", "p50", "p99", "cpu_us", "rss_mb", "steady_conns_per_1k", "upstream_conns_per_1k")}
        gz = SCENARIOS[sname].get("gzip")
        for name, runs in per_proxy.items():
            if gz and runs:
                med[name]["body_bytes"] = statistics.median(r["body_bytes"] for r in runs)
        lines += ["| proxy | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MB | upstream conns / 1k req, steady | whole run |" + (" bytes sent |" if gz else ""),
                  "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gz else "")]
        for name, m in med.items():
            lines.append(f"| {name} | {fmt(m['rps'], 0)} | {fmt(m['p50'], 2)} | {fmt(m['p99'], 2)} | {fmt(m['cpu_us'])} | {fmt(m['rss_mb'])} | {fmt(m['steady_conns_per_1k'], 3)} | {fmt(m['upstream_conns_per_1k'], 2)} |"
                         + (f" {fmt(m['body_bytes'], 0)} |" if gz else ""))
        ratios = []
        for mine in ("gateway", "gateway-plain", "lean-gateway", "lean-gateway-plain", "lean-pingora", "bare-pingora"):
            if mine not in med:
                continue
            g = med[mine]
            bases = [n for n in med if n.startswith(mine + "@")]
            others = {"lean-gateway": ["gateway", "lean-pingora"],
                      "lean-gateway-plain": ["gateway", "gateway-plain", "lean-gateway", "lean-pingora"]}.get(mine, [])
            for other in bases + others + ["bare-pingora", "nginx", "haproxy", "caddy"]:
                if other == mine:
                    continue
                if other in med:
                    o = med[other]
                    ratios.append(
                        f"{mine}/{other}: CPU per request {g['cpu_us'] / o['cpu_us']:.2f}×, req/s {g['rps'] / o['rps']:.2f}×"
                        + (f", upstream connections (steady) {g['steady_conns_per_1k'] / o['steady_conns_per_1k']:.2f}×"
                           if o['steady_conns_per_1k'] > 0 else "")
                        + (f", bytes sent {g['body_bytes'] / o['body_bytes']:.3f}×" if gz else "")
                    )
        lines += [""] + [f"- {r}" for r in ratios]
        if sname == "routes1000" and extra.get("reload"):
            lines.append(f"- gateway reload of the 1,000-route file (change on disk → serving): median {statistics.median(extra['reload']) * 1000:.0f} ms")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
