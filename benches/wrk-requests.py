#!/usr/bin/env python3
"""Pre-signed Fiserv webhooks for wrk (benches/wrk-ingest.lua): wrk's Lua has no HMAC.

Writes COUNT unique "Requested" cash-outs as complete HTTP/1.1 requests, one file per
phase, daemon and wrk thread, so that each wrk thread only reads its own file at start:

    OUT_DIR/warmup-<instance>-<thread>.req     the first fifth (the warm-up run)
    OUT_DIR/measured-<instance>-<thread>.req   the rest (the measured run)

Request k of a phase goes to instance k mod INSTANCES, then thread (k div INSTANCES) mod
THREADS. Each file is one line with its request length L in bytes, then its requests back
to back, every one exactly L bytes (all ids and the signature have a fixed width, and
bodies are padded to --body-bytes inside "endToEnd"), so wrk's Lua cuts them apart with
no parsing: a thread's set-up before wrk starts its clock stays short (wrk starts each
thread right after setting it up, while the next one is still being set up, and counts
what the early ones send).

x-hmac-signature = Base64(HMAC-SHA256(secret, apikey || x-timestamp || body || path)),
SPEC section 4.1. The timestamp is "now": use the files within the provider's tolerance
(default 300 s).
"""

import argparse
import base64
import hashlib
import hmac
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--api-key", default="wrk-api-key")
    parser.add_argument("--path", default="/webhooks/fiserv")
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--run-id", default=str(int(time.time())))
    parser.add_argument(
        "--hosts", required=True, help="host:port of each daemon, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads per daemon")
    args = parser.parse_args()

    hosts = args.hosts.split(",")
    secret = args.secret.encode()
    key = args.api_key.encode()
    path = args.path.encode()
    now = time.gmtime()
    ts = str(int(time.time()))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", now)
    warmup = args.count // 5
    files = {}  # name -> (file, request length)
    try:
        for phase, first, last in (("warmup", 0, warmup), ("measured", warmup, args.count)):
            for seq in range(first, last):
                k = seq - first
                instance = k % len(hosts)
                thread = (k // len(hosts)) % args.threads
                txid = f"WRK{args.run_id}{seq:09d}"
                # 1000.00 to 9999.99: a fixed width, like every other field.
                cents = 100_000 + seq % 900_000
                head = (
                    f'{{"txid":"{txid}","status":1,"failReason":null,'
                    f'"amount":"{cents // 100}.{cents % 100:02d}","currency":"BRL","endToEnd":"'
                )
                tail = f'","confirmationKey":null,"createdAt":"{stamp}","updatedAt":"{stamp}"}}'
                padding = max(0, args.body_bytes - len(head) - len(tail))
                body = (head + "E" * padding + tail).encode()
                mac = hmac.new(secret, key + ts.encode() + body + path, hashlib.sha256)
                signature = base64.b64encode(mac.digest()).decode()
                request = (
                    f"POST {args.path} HTTP/1.1\r\n"
                    f"Host: {hosts[instance]}\r\n"
                    "Content-Type: application/json\r\n"
                    f"apikey: {args.api_key}\r\n"
                    f"x-timestamp: {ts}\r\n"
                    f"x-request-id: req-{txid}\r\n"
                    f"x-hmac-signature: {signature}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "\r\n"
                ).encode() + body
                name = os.path.join(args.out_dir, f"{phase}-{instance}-{thread}.req")
                if name not in files:
                    files[name] = (open(name, "wb"), len(request))
                    files[name][0].write(f"{len(request)}\n".encode())
                out, length = files[name]
                if len(request) != length:
                    raise SystemExit(
                        f"request {seq} is {len(request)} bytes, not {length}: every request"
                        " of a file must have the same length"
                    )
                out.write(request)
    finally:
        for out, _ in files.values():
            out.close()


if __name__ == "__main__":
    main()
