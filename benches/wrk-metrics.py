#!/usr/bin/env python3
"""Server-side view of a wrk run: the difference of two /metrics scrapes (before, after).

Prints group commits (count, mean size, mean time, how many over 10/20/50 ms), the
writer's checkpoint pauses (every queued write waits for one) and the webhook handler
time (p50/p99/p99.9 as histogram-bucket bounds, and how many took over 15/25/50/100 ms):
the part of the latency wrk measures that the daemon itself spends, apart from the
client and the scheduler.
"""

import re
import sys


def parse(path):
    values = {}
    for line in open(path, encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            pass
    return values


def histogram(before, after, name, label=""):
    buckets = []
    for key, value in after.items():
        m = re.fullmatch(rf'{name}_bucket\{{(.*?)le="([^"]+)"\}}', key)
        if m and label in m.group(1):
            bound = float("inf") if m.group(2) == "+Inf" else float(m.group(2))
            buckets.append((bound, value - before.get(key, 0.0)))
    buckets.sort()
    count = buckets[-1][1] if buckets else 0.0
    total = sum(v - before.get(k, 0.0) for k, v in after.items()
                if k.startswith(f"{name}_sum") and label in k)
    return buckets, count, total


def quantile(buckets, count, q):
    for bound, cumulative in buckets:
        if count and cumulative >= q * count:
            return bound
    return float("nan")


def over(buckets, count, seconds):
    below = max((c for b, c in buckets if b <= seconds), default=0.0)
    return int(count - below)


def main():
    before, after = parse(sys.argv[1]), parse(sys.argv[2])
    commits, n, total = histogram(before, after, "cashout_recon_store_commit_seconds")
    sizes, _, writes = histogram(before, after, "cashout_recon_store_group_size")
    if n:
        print(f"server: {int(n)} group commits, {writes / n:.1f} writes each, "
              f"{1000 * total / n:.2f} ms mean commit; over 10/20/50 ms: "
              f"{over(commits, n, 0.010)}/{over(commits, n, 0.020)}/{over(commits, n, 0.050)}")
    pauses, k, paused = histogram(before, after, "cashout_recon_store_checkpoint_pause_seconds")
    if k:
        print(f"server: {int(k)} checkpoint pauses of the writer, {1000 * paused / k:.1f} ms mean, "
              f"<= {1000 * quantile(pauses, k, 1.0):g} ms max (bucket bound)")
    handled, m, _ = histogram(before, after, "cashout_recon_webhook_seconds", 'provider="fiserv"')
    if m:
        print(f"server: webhook handling p50 <= {1000 * quantile(handled, m, 0.5):g} ms, "
              f"p99 <= {1000 * quantile(handled, m, 0.99):g} ms, "
              f"p99.9 <= {1000 * quantile(handled, m, 0.999):g} ms (bucket bounds); "
              f"over 15/25/50/100 ms: {over(handled, m, 0.015)}/{over(handled, m, 0.025)}/"
              f"{over(handled, m, 0.050)}/{over(handled, m, 0.100)} of {int(m)}")


if __name__ == "__main__":
    main()
