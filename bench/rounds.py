#!/usr/bin/env python3
"""Paired per-round comparison of two proxies in result files' per-round blocks (the
`## Per round` lines bench.py prints): for p99, CPU and user CPU a request, the rounds where
the first is at or under the second, a two-sided sign test (ties left out, as the test does),
and the median of the per-round ratios with a bootstrap 95 % interval. Rounds of one scenario
are paired; rounds of several files are pooled. A round line that cannot be read (a value
missing) is reported and left out with its pair.

    python3 bench/rounds.py gateway@pgo nginx bench/results/round2-ids-rate21.md [more.md ...]
"""

import math
import random
import re
import statistics
import sys

LINE = re.compile(r"^\s*round (\d+) (\S+)\s.*?p99 ([\d,.]+) ms\s+([\d,.]+) µs CPU/req \(\s*([\d,.]+) user\)")


def rounds(path):
    """{(scenario, round, proxy): (p99 ms, CPU µs, user µs)} of one result file."""
    out, scenario = {}, ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("== "):
                scenario = line[3:].strip()
            elif line.lstrip().startswith("round "):
                m = LINE.match(line)
                if not m:
                    print(f"{path}: left out, unread: {line.strip()}", file=sys.stderr)
                    continue
                key = (scenario, int(m[1]), m[2])
                if key in out:
                    sys.exit(f"{path}: round {m[1]} of {m[2]} twice in {scenario!r}")
                out[key] = tuple(float(m[i].replace(",", "")) for i in (3, 4, 5))
    return out


def sign_test(under, n):
    """Two-sided p of `under` or fewer (or as many more) of n untied pairs, each side at 1/2."""
    if n == 0:
        return 1.0
    k = min(under, n - under)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def bootstrap_median(ratios, draws=10000, seed=1):
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(draws))
    return meds[int(0.025 * draws)], meds[int(0.975 * draws) - 1]


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    a, b, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
    pairs = []
    for path in paths:
        data = rounds(path)
        for (scenario, rnd, name), va in sorted(data.items()):
            if name == a and (scenario, rnd, b) in data:
                pairs.append((va, data[(scenario, rnd, b)]))
    if not pairs:
        sys.exit(f"no round has both {a} and {b}")
    print(f"{a} against {b}: {len(pairs)} rounds from {len(paths)} file(s)")
    for i, what in ((0, "p99"), (1, "CPU a request"), (2, "user CPU a request")):
        ratios = [x[i] / y[i] for x, y in pairs]
        under = sum(x[i] <= y[i] for x, y in pairs)
        ties = sum(x[i] == y[i] for x, y in pairs)
        lo, hi = bootstrap_median(ratios)
        p = sign_test(under - ties, len(pairs) - ties)
        p = f"{p:.2f}" if p >= 0.01 else "< 0.01"
        print(f"  {what:19} at or under in {under} of {len(pairs)} (sign test p {p}); "
              f"median ratio {statistics.median(ratios):.3f}× (95 % {lo:.3f}-{hi:.3f}×)")


if __name__ == "__main__":
    main()
