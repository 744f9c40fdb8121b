#!/usr/bin/env python3
"""gRPC unary calls side by side: the gateway and nginx (grpc_pass) in front of the same gRPC
server (services/grpc-echo), and the server called directly.

The proxy runs with one worker/thread on CPU 0; the gRPC server and h2load (HTTP/2 in the
clear, prior knowledge, a framed `test.Echo/Unary` request body) share CPU 1. Runs are
interleaved for several rounds; per setup the median calls/s, p50/p99 latency, CPU time per
call of the proxy and of the server, and the gateway's ratios to nginx. Every setup is first
checked with a real gRPC call (`grpc-echo call`). Results go to stdout and to
bench/results/grpc.md. Run it through `bench/run-grpc`.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

ECHO = os.path.join(B.RELEASE, "grpc-echo")
PATH = "/test.Echo/Unary"


class GatewayGrpc(B.Proxy):
    name = "gateway"

    def command(self, scenario):
        self.admin = B.free_port()
        cfg = self.write("gateway.yaml", (
            "threads: 1\nh2c: true\n"
            "forwarding: { x_forwarded: false, request_id: false, traceparent: false }\n"
            f"listeners:\n  http: {{ address: \"127.0.0.1:{self.port}\" }}\n"
            f"admin: {{ address: \"127.0.0.1:{self.admin}\" }}\n"
            f"upstreams:\n  g: {{ targets: [\"{self.backends[0]}\"], protocol: h2c, timeouts: {{ idle: 60s }} }}\n"
            "routes:\n  - { name: echo, upstream: g, match: { path_prefix: /test.Echo/ } }\n"
        ))
        return [os.path.join(B.RELEASE, "gateway"), "run", "-c", cfg], {"RUST_LOG": "warn"}


class NginxGrpc(B.Proxy):
    name = "nginx"
    binary = "nginx"

    def command(self, scenario):
        conf = self.write("nginx.conf", f"""
worker_processes 1;
daemon off;
error_log {self.dir}/error.log warn;
pid {self.dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  # Client and upstream connections kept for the whole run, as the gateway keeps them
  # (nginx's default closes each after 1,000 requests, and h2load does not reconnect).
  keepalive_requests 10000000;
  upstream g {{ server {self.backends[0]}; keepalive 64; keepalive_requests 10000000; }}
  server {{
    listen 127.0.0.1:{self.port} http2;
    http2_max_concurrent_streams 128;
    location /test.Echo/ {{ grpc_pass grpc://g; }}
  }}
}}
""")
        return ["nginx", "-c", conf, "-p", self.dir], None


class Direct(B.Proxy):
    """No proxy: the load goes to the gRPC server itself (the port is the server's)."""

    name = "direct"

    def start(self, scenario):
        self.port = int(self.backends[0].rsplit(":", 1)[1])

    def stop(self):
        pass

    def pid(self):
        return None


def framed_request(workdir):
    """The body of one `Unary` call: a gRPC frame around `Msg { text: "hello" }`."""
    message = b"\x0a\x05hello"
    path = os.path.join(workdir, "unary.bin")
    with open(path, "wb") as f:
        f.write(b"\x00" + len(message).to_bytes(4, "big") + message)
    return path


def load(port, body, seconds, conns, streams, logdir):
    log = os.path.join(logdir, "h2load.log")
    out = B.run_load([
        "h2load", "-c", str(conns), "-m", str(streams), "-D", str(seconds), "-d", body,
        "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", log,
        f"http://127.0.0.1:{port}{PATH}",
    ])
    m = B.re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    res = {"requests": int(m.group(2)), "errors": int(m.group(3)) + int(m.group(4))}
    times = sorted(int(line.split("\t")[2]) for line in open(log) if line.count("\t") >= 2)
    res["p50"] = times[len(times) // 2] / 1000.0 if times else float("nan")
    res["p99"] = times[min(len(times) - 1, int(len(times) * 0.99))] / 1000.0 if times else float("nan")
    os.remove(log)
    return res


def measure(proxy, server_pid, body, args, workdir):
    pid = proxy.pid()
    cpu0 = B.cpu_seconds(pid) if pid else 0.0
    srv0 = B.cpu_seconds(server_pid)
    t0 = time.perf_counter()
    r = load(proxy.port, body, args.seconds, args.conns, args.streams, workdir)
    elapsed = time.perf_counter() - t0
    cpu = (B.cpu_seconds(pid) - cpu0) if pid else float("nan")
    srv = B.cpu_seconds(server_pid) - srv0
    n = r["requests"] or 1
    r["rps"] = r["requests"] / elapsed
    r["cpu_us"] = cpu / n * 1e6
    r["server_us"] = srv / n * 1e6
    r["rss_mb"] = B.memory_kb(pid, "VmHWM") / 1024 if pid else float("nan")
    return r


def check(proxy):
    out = subprocess.run([ECHO, "call", f"http://127.0.0.1:{proxy.port}"], capture_output=True, text=True, timeout=10)
    if out.returncode != 0:
        raise RuntimeError(f"{proxy.name}: the gRPC call failed: {out.stderr or out.stdout}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--streams", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(B.ROOT, "bench", "results", "grpc.md"))
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="gateway-grpc-bench-")
    port = B.free_port()
    server = subprocess.Popen(["taskset", "-c", B.LOAD_CPU, ECHO, f"127.0.0.1:{port}", "echo"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    B.wait_port(port)
    body = framed_request(workdir)
    setups = [Direct(workdir, [f"127.0.0.1:{port}"]), GatewayGrpc(workdir, [f"127.0.0.1:{port}"])]
    nginx = NginxGrpc(workdir, [f"127.0.0.1:{port}"])
    if nginx.available():
        setups.append(nginx)
    else:
        print("skipping nginx: not installed", file=sys.stderr)
    results = {s.name: [] for s in setups}
    try:
        for rnd in range(args.rounds):
            for s in setups:
                s.start({})
                try:
                    check(s)
                    load(s.port, body, 1, args.conns, args.streams, workdir)  # warm-up
                    r = measure(s, server.pid, body, args, workdir)
                    if r["errors"]:
                        print(f"  WARNING: {s.name} had {r['errors']} failed calls", flush=True)
                    print(f"  round {rnd + 1} {s.name:8} {r['rps']:10,.0f} calls/s  p50 {B.fmt(r['p50'], 2)} ms  "
                          f"p99 {B.fmt(r['p99'], 2)} ms  proxy {B.fmt(r['cpu_us'])} µs/call  server {B.fmt(r['server_us'])} µs/call",
                          flush=True)
                    results[s.name].append(r)
                finally:
                    s.stop()
    finally:
        server.kill()
        B.shutil.rmtree(workdir, ignore_errors=True)
    report = render(results, args)
    print("\n" + report)
    with open(args.out, "w") as f:
        f.write(report)


def render(results, args):
    med = lambda name, key: statistics.median(r[key] for r in results[name]) if results.get(name) else float("nan")
    lines = [
        "# gRPC unary calls: gateway vs nginx grpc_pass vs direct",
        "",
        f"h2load, {args.conns} connections x {args.streams} streams, h2c both sides, one proxy worker on CPU 0, "
        f"server and load on CPU 1; median of {args.rounds} rounds of {args.seconds} s.",
        "",
        "| setup | calls/s | p50 ms | p99 ms | proxy CPU µs/call | server CPU µs/call | proxy RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in results:
        lines.append(f"| {name} | {med(name, 'rps'):,.0f} | {B.fmt(med(name, 'p50'), 2)} | {B.fmt(med(name, 'p99'), 2)} | "
                     f"{B.fmt(med(name, 'cpu_us'))} | {B.fmt(med(name, 'server_us'))} | {B.fmt(med(name, 'rss_mb'))} |")
    if "nginx" in results:
        lines += ["", f"- gateway / nginx CPU per call: {med('gateway', 'cpu_us') / med('nginx', 'cpu_us'):.2f}x",
                  f"- gateway / nginx calls/s: {med('gateway', 'rps') / med('nginx', 'rps'):.2f}x"]
    lines.append(f"- gateway / direct calls/s: {med('gateway', 'rps') / med('direct', 'rps'):.2f}x")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
