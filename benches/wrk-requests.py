#!/usr/bin/env python3
"""Pre-signed Fiserv webhooks for wrk (benches/wrk-ingest.lua): wrk's Lua has no HMAC.

Writes COUNT lines, one unique "Requested" cash-out each, tab-separated:
    x-timestamp  x-request-id  x-hmac-signature  body
with x-hmac-signature = Base64(HMAC-SHA256(secret, apikey || x-timestamp || body || path)),
SPEC section 4.1. Bodies are padded to --body-bytes (default 1024) inside "endToEnd".
The timestamp is "now": use the file within the provider's tolerance (default 300 s).
"""

import argparse
import base64
import hashlib
import hmac
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--api-key", default="wrk-api-key")
    parser.add_argument("--path", default="/webhooks/fiserv")
    parser.add_argument("--body-bytes", type=int, default=1024)
    parser.add_argument("--run-id", default=str(int(time.time())))
    args = parser.parse_args()

    secret = args.secret.encode()
    key = args.api_key.encode()
    path = args.path.encode()
    now = time.gmtime()
    ts = str(int(time.time()))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", now)
    with open(args.out, "w", encoding="ascii") as out:
        for seq in range(args.count):
            txid = f"WRK{args.run_id}{seq:09d}"
            cents = 100 + seq % 1_000_000
            head = (
                f'{{"txid":"{txid}","status":1,"failReason":null,'
                f'"amount":"{cents // 100}.{cents % 100:02d}","currency":"BRL","endToEnd":"'
            )
            tail = (
                f'","confirmationKey":null,"createdAt":"{stamp}","updatedAt":"{stamp}"}}'
            )
            padding = max(0, args.body_bytes - len(head) - len(tail))
            body = head + "E" * padding + tail
            mac = hmac.new(secret, key + ts.encode() + body.encode() + path, hashlib.sha256)
            signature = base64.b64encode(mac.digest()).decode()
            out.write(f"{ts}\treq-{txid}\t{signature}\t{body}\n")


if __name__ == "__main__":
    main()
