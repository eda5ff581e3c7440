#!/usr/bin/env bash
# Webhook ingestion under an external load generator (wrk), against /healthz in the same run.
#
#   benches/wrk-ingest.sh                 # 64 connections, 2 threads, 10 s per target
#   CONNECTIONS=64 THREADS=2 DURATION=15s WARMUP=3s BODY_BYTES=1024 benches/wrk-ingest.sh
#   NO_BUILD=1 BIN=target/release/cashout-recon benches/wrk-ingest.sh
#
# Builds release, starts `cashout-recon serve` on loopback with a fresh store and config in
# a temporary directory, runs wrk (--latency) first against GET /healthz and then against
# POST /webhooks/fiserv with unique pre-signed ~1 KB webhooks (benches/wrk-requests.py,
# replayed by benches/wrk-ingest.lua), checks that the store holds one event per 2xx
# answer, and prints 2xx/s, latency percentiles and the ingest / healthz ratio.
# Needs: wrk, python3 and curl.
set -euo pipefail

cd "$(dirname "$0")/.."
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
BODY_BYTES=${BODY_BYTES:-1024}
RATE_GUESS=${RATE_GUESS:-20000}   # webhooks/s used to size the request file (no repeats below it)
LOG_LEVEL=${LOG_LEVEL:-info}

command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install -y wrk)" >&2; exit 2; }
if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release --quiet
fi
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/cashout-recon}

WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [[ -n "$SERVER_PID" ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "the daemon died; its log:" >&2
        tail -n 30 "$WORK/serve.log" >&2
    fi
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
API_KEY=wrk-api-key
cat >"$WORK/config.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"

[store]
path = "bench.db"

[reports]
dir = "reports"

[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["WRK_FISERV_SECRET"]
TOML

seconds() { local d=$1; case $d in *ms) echo "0.${d%ms}";; *s) echo "${d%s}";; *m) echo $(( ${d%m} * 60 ));; *) echo "$d";; esac; }
TOTAL_S=$(python3 -c "print(int(float('$(seconds "$DURATION")') + float('$(seconds "$WARMUP")') + 2))")
COUNT=$(( RATE_GUESS * TOTAL_S ))
echo "generating $COUNT signed webhooks of $BODY_BYTES bytes …"
python3 benches/wrk-requests.py --count "$COUNT" --out "$WORK/requests.tsv" --secret "$SECRET" \
    --api-key "$API_KEY" --body-bytes "$BODY_BYTES"

WRK_FISERV_SECRET=$SECRET RUST_LOG=$LOG_LEVEL "$BIN" serve --config "$WORK/config.toml" \
    >"$WORK/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 300); do
    if curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; exit 1; }
    sleep 0.1
done

run_wrk() { # NAME DURATION URL [ARGS…]
    local name=$1 duration=$2 url=$3; shift 3
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency --timeout 10s \
        -s benches/wrk-ingest.lua "$url" "$@" >"$WORK/$name.out" 2>&1
}
result() { grep '^WRK_RESULT' "$WORK/$1.out" | sed 's/^WRK_RESULT //'; }
field() { result "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

BASE=http://127.0.0.1:$PORT
run_wrk healthz-warmup "$WARMUP" "$BASE/healthz"
run_wrk healthz "$DURATION" "$BASE/healthz"
# The warm-up of the webhook route uses its own slice of the file (no repeats later).
head -n $(( COUNT / 5 )) "$WORK/requests.tsv" >"$WORK/warmup.tsv"
tail -n +$(( COUNT / 5 + 1 )) "$WORK/requests.tsv" >"$WORK/measured.tsv"
run_wrk ingest-warmup "$WARMUP" "$BASE/webhooks/fiserv" -- "$WORK/warmup.tsv" "$API_KEY" "$THREADS"
curl -fsS "$BASE/metrics" >"$WORK/metrics.before"
python3 benches/wrk-threads.py snap "$SERVER_PID" >"$WORK/threads.before" 2>/dev/null || true
run_wrk ingest "$DURATION" "$BASE/webhooks/fiserv" -- "$WORK/measured.tsv" "$API_KEY" "$THREADS"
python3 benches/wrk-threads.py snap "$SERVER_PID" >"$WORK/threads.after" 2>/dev/null || true
curl -fsS "$BASE/metrics" >"$WORK/metrics.after"

echo
echo "== GET /healthz ($CONNECTIONS connections, $THREADS threads, $DURATION)"
sed -n '/Latency Distribution/,/requests in/p' "$WORK/healthz.out"
echo "== POST /webhooks/fiserv (unique signed ~${BODY_BYTES}-byte webhooks)"
sed -n '/Latency Distribution/,/requests in/p' "$WORK/ingest.out"
grep -h 'Non-2xx' "$WORK/ingest.out" || true
echo
printf '%-10s %10s %9s %9s %9s %9s %9s %8s\n' target 2xx/s p50_ms p90_ms p99_ms p99.9_ms max_ms non2xx
for name in healthz ingest; do
    printf '%-10s %10s %9s %9s %9s %9s %9s %8s\n' "$name" "$(field $name ok_per_sec)" \
        "$(field $name p50_ms)" "$(field $name p90_ms)" "$(field $name p99_ms)" \
        "$(field $name p999_ms)" "$(field $name max_ms)" "$(field $name non_2xx)"
done
RATIO=$(python3 -c "print(f'{$(field ingest ok_per_sec) / $(field healthz ok_per_sec):.3f}')")
echo "ingest / healthz throughput: $RATIO (goal >= 0.30); ingest p99 $(field ingest p99_ms) ms (goal <= 15)"
python3 benches/wrk-metrics.py "$WORK/metrics.before" "$WORK/metrics.after" || true
python3 benches/wrk-threads.py diff "$WORK/threads.before" "$WORK/threads.after" 2>/dev/null || true
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (other processes share the cores and the disk)"
REPEATS=$(field ingest repeats)
[[ "$REPEATS" == 0 ]] || echo "warning: $REPEATS requests repeated (answered duplicate): raise RATE_GUESS"

# Stop the daemon (drains) and count stored webhook events against 2xx answers.
kill -TERM "$SERVER_PID"; wait "$SERVER_PID" || true; SERVER_PID=
STORED=$(python3 - "$WORK/bench.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(db.execute("SELECT COUNT(*) FROM events WHERE source = 'webhook'").fetchone()[0])
PY
)
ACKED=$(( $(field ingest-warmup ok) + $(field ingest ok) ))
echo "store: $STORED webhook events, $ACKED answered 2xx (warm-up included)"
echo "log: $(wc -l <"$WORK/serve.log") lines, $(wc -c <"$WORK/serve.log") bytes"
# Every 2xx answer must be stored. The store may hold a few more: the requests in flight
# when wrk stopped (at most one per connection and run) were committed, never counted.
if (( STORED < ACKED || STORED > ACKED + 2 * CONNECTIONS )); then
    if [[ "$REPEATS" == 0 && "$(field ingest-warmup repeats)" == 0 ]]; then
        echo "MISMATCH between the store and the 2xx answers" >&2
        exit 1
    fi
fi
