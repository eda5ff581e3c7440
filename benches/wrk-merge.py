#!/usr/bin/env python3
"""Merges the runs of several wrk processes started at once (benches/wrk-ingest.sh, one per daemon).

    wrk-merge.py PREFIX N  → reads PREFIX-0.out … PREFIX-(N-1).out (their "WRK_RESULT" lines,
                             from benches/wrk-ingest.lua) and PREFIX-i.latency (their latency
                             histograms, "µs count" per line) and prints one WRK_RESULT line:
                             counts and 2xx/s summed, percentiles of the merged histogram.
With N = 1 the line is wrk's own.
"""

import sys

SUMMED = ("requests", "ok", "non_2xx", "transport_errors", "ok_per_sec", "repeats")
PERCENTILES = (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99), ("p999_ms", 99.9))


def result(path):
    for line in open(path, encoding="utf-8"):
        if line.startswith("WRK_RESULT "):
            return dict(field.split("=", 1) for field in line.split()[1:])
    sys.exit(f"{path}: no WRK_RESULT line (did wrk fail?)")


def histogram(path):
    counts = {}
    for line in open(path, encoding="utf-8"):
        value, count = map(int, line.split())
        counts[value] = counts.get(value, 0) + count
    return counts


def percentile(counts, total, p):
    """wrk's own rule (stats_percentile): the first value whose running count reaches the rank."""
    rank = round(p / 100 * total + 0.5)
    running = 0
    for value in sorted(counts):
        running += counts[value]
        if running >= rank:
            return value
    return 0


def main():
    prefix, n = sys.argv[1], int(sys.argv[2])
    runs = [result(f"{prefix}-{i}.out") for i in range(n)]
    if n == 1:
        print("WRK_RESULT " + " ".join(f"{k}={v}" for k, v in runs[0].items()))
        return
    merged = {}
    for i in range(n):
        for value, count in histogram(f"{prefix}-{i}.latency").items():
            merged[value] = merged.get(value, 0) + count
    total = sum(merged.values())
    out = {}
    for key in SUMMED:
        value = sum(float(run[key]) for run in runs)
        out[key] = f"{value:.1f}" if key == "ok_per_sec" else str(int(value))
    out["seconds"] = f"{max(float(run['seconds']) for run in runs):.3f}"
    for key, p in PERCENTILES:
        out[key] = f"{percentile(merged, total, p) / 1000:.2f}"
    out["max_ms"] = f"{max(float(run['max_ms']) for run in runs):.2f}"
    print("WRK_RESULT " + " ".join(f"{k}={v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
