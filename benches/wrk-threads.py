#!/usr/bin/env python3
"""Where the cores went during a wrk run (Linux): benches/wrk-ingest.sh snapshots before and after.

    wrk-threads.py snap DAEMON_PID > before.json     (run from the shell that runs wrk)
    wrk-threads.py diff before.json after.json

Per thread group of the daemon (HTTP workers, store writer, checkpointer, the rest): cores
used and cores' worth of time spent runnable but waiting for a core, from
/proc/PID/task/*/schedstat; the load generator's cores (the CPU time of the shell's
finished children between the snapshots: wrk); and the rest of the machine's busy time
(/proc/stat) as other processes. If that last figure is not near 0 the run was disturbed.
"""

import glob
import json
import os
import sys
import time

GROUPS = [("actix-server wo", "http workers"), ("store-writer", "store writer"),
          ("store-checkpoin", "checkpointer")]


def snap(pid):
    threads = {}
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            comm = open(f"{task}/comm").read().strip()
            run, wait, _ = map(int, open(f"{task}/schedstat").read().split())
        except (OSError, ValueError):
            continue
        threads[task] = [comm, run, wait]
    cpu = open("/proc/stat").readline().split()[1:]
    busy = sum(int(v) for i, v in enumerate(cpu[:8]) if i not in (3, 4))
    parent = open(f"/proc/{os.getppid()}/stat").read().rsplit(")", 1)[1].split()
    children = int(parent[13]) + int(parent[14])  # cutime + cstime of the shell
    return {"at": time.monotonic(), "threads": threads, "busy": busy, "children": children}


def diff(before, after):
    seconds = after["at"] - before["at"]
    tick = os.sysconf("SC_CLK_TCK")
    groups = {}
    for task, (comm, run, wait) in after["threads"].items():
        _, run0, wait0 = before["threads"].get(task, [comm, 0, 0])
        name = next((label for prefix, label in GROUPS if comm.startswith(prefix)), "rest of the daemon")
        used, waited = groups.get(name, (0.0, 0.0))
        groups[name] = (used + (run - run0) / 1e9 / seconds, waited + (wait - wait0) / 1e9 / seconds)
    daemon = sum(used for used, _ in groups.values())
    wrk = (after["children"] - before["children"]) / tick / seconds
    machine = (after["busy"] - before["busy"]) / tick / seconds
    parts = [f"{name} {used:.2f} (+{waited:.2f} waiting)" for name, (used, waited) in
             sorted(groups.items(), key=lambda item: -item[1][0])]
    print(f"cores during the run: {', '.join(parts)}; wrk {wrk:.2f}; "
          f"other processes {max(machine - daemon - wrk, 0.0):.2f}; of {os.cpu_count()}")


if __name__ == "__main__":
    if sys.argv[1] == "snap":
        json.dump(snap(sys.argv[2]), sys.stdout)
    else:
        diff(json.load(open(sys.argv[2])), json.load(open(sys.argv[3])))
