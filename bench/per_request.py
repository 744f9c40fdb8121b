#!/usr/bin/env python3
"""What a proxy's request costs the machine at a fixed rate, beyond its CPU time: TCP segments
(`nstat`, machine-wide), context switches of the proxy's threads (`/proc`), and the backend's
CPU time, each divided by the requests served. Uses bench.py's proxies, backend and load.

    python3 bench/per_request.py gateway,nginx 24000 5 2    # proxies, req/s, seconds, rounds
    python3 bench/per_request.py gateway,gateway=DIR=before,nginx 24000 5 2   # and the gateway
                                                            # binary in DIR, labelled "before"

Run after bench/run has built the binaries and installed the tools.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402

SEGMENTS = ["TcpOutSegs", "TcpInSegs", "TcpExtDelayedACKs"]


def threads(pid):
    """Per thread of pid's process tree: name, voluntary and involuntary context switches."""
    out = {}
    for p in B.tree(pid):
        for t in os.listdir(f"/proc/{p}/task"):
            try:
                with open(f"/proc/{p}/task/{t}/status") as f:
                    fields = dict(line.split(":", 1) for line in f if ":" in line)
                out[(p, t)] = (fields["Name"].strip(), int(fields["voluntary_ctxt_switches"]),
                               int(fields["nonvoluntary_ctxt_switches"]))
            except (OSError, KeyError, ValueError):
                pass
    return out


def counters():
    text = subprocess.run(["nstat", "-az", "--json"], capture_output=True, text=True, check=True).stdout
    data = json.loads(text)
    return data.get("kernel", data)


def main():
    names, rps, seconds = sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3])
    rounds = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    workdir = tempfile.mkdtemp(prefix="gateway-per-request-")
    ports = [B.free_port(), B.free_port()]
    backends = [f"127.0.0.1:{p}" for p in ports]
    backend = B.start_backend("bench", backends, workdir)
    try:
        for p in ports:
            B.wait_port(p)
        B.make_certs(workdir)
        scenario = dict(B.SCENARIOS["rate"], rps=rps)
        for rnd in range(rounds):
            for spec in names:
                name, _, base = spec.partition("=")
                cls = B.PROXIES[name]
                if base:
                    directory, _, label = base.partition("=")
                    cls = B.baseline_of(cls, directory, label or "base")
                proxy = cls(workdir, backends)
                name = proxy.name
                proxy.start(scenario)
                try:
                    B.h2load(proxy.port, "/", 1, 64)
                    t0, n0, b0 = threads(proxy.pid()), counters(), sum(B.cpu_times(backend.pid))
                    r = B.measure(proxy, scenario, seconds, workdir)
                    t1, n1, b1 = threads(proxy.pid()), counters(), sum(B.cpu_times(backend.pid))
                    n = r["requests"]
                    # A thread started during the run counts from zero.
                    vol = sum(v[1] - t0.get(k, (v[0], 0, 0))[1] for k, v in t1.items()) / n
                    inv = sum(v[2] - t0.get(k, (v[0], 0, 0))[2] for k, v in t1.items()) / n
                    segs = ", ".join(f"{k} {(n1[k] - n0[k]) / n:.3f}" for k in SEGMENTS if k in n1)
                    print(f"round {rnd + 1} {name:13} {r['rps']:8,.0f} req/s  p99 {r['p99']:.2f} ms  "
                          f"CPU {r['cpu_us']:.1f} µs ({r['user_us']:.1f} user)  context switches "
                          f"{vol:.4f} voluntary, {inv:.4f} involuntary  threads {len(t1)}  "
                          f"backend CPU {(b1 - b0) / n * 1e6:.1f} µs  {segs}", flush=True)
                finally:
                    proxy.stop()
    finally:
        os.killpg(backend.pid, signal.SIGKILL)
        backend.wait()


if __name__ == "__main__":
    main()
