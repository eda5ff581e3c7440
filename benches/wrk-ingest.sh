#!/usr/bin/env bash
# Webhook ingestion under an external load generator (wrk), against /healthz in the same run.
#
#   benches/wrk-ingest.sh                 # SQLite, 64 connections, 2 threads, 10 s per target
#   CONNECTIONS=64 THREADS=2 DURATION=15s WARMUP=3s BODY_BYTES=1024 benches/wrk-ingest.sh
#   NO_BUILD=1 BIN=target/release/cashout-recon benches/wrk-ingest.sh
#   BACKEND=postgres benches/wrk-ingest.sh               # one daemon on a fresh PostgreSQL database
#   BACKEND=postgres INSTANCES=2 benches/wrk-ingest.sh   # two daemons on one database
#   RUNS=9 benches/wrk-ingest.sh          # nine runs back to back, then the spread and median
#
# RUNS=N (N > 1) builds once and runs the whole measurement N times (fresh daemon and store
# each), printing each run's line and then the ratio's min / median / max, how many runs
# reached 0.30, and the p99 range: on a small shared machine one run's ratio swings by
# +-10 % with `/healthz`, so judge a change by the median of several runs (or by runs
# alternated with the tree before it), not by one.
#
# Builds release, starts `cashout-recon serve` on loopback with a fresh store and config in
# a temporary directory, runs wrk (--latency) first against GET /healthz and then against
# POST /webhooks/fiserv with unique pre-signed ~1 KB webhooks (benches/wrk-requests.py
# writes them as complete requests, one file per daemon and wrk thread, replayed by
# benches/wrk-ingest.lua), checks that the store holds one event per 2xx answer, and
# prints 2xx/s, latency percentiles and the ingest / healthz ratio.
#
# BACKEND=postgres: the store is a database created for the run on the server of
# $CASHOUT_RECON_DATABASE_URL (or of the variable URL_ENV names; its role may CREATE
# DATABASE; the database the URL names is not touched) and dropped afterwards.
# INSTANCES=N (postgres only) starts N daemons on that database and splits the load: one
# wrk per daemon, each with CONNECTIONS/N connections, THREADS/N threads (at least 1) and
# its own slice of the webhooks, run at the same time; their latency histograms are merged
# (benches/wrk-merge.py) into one line of figures.
# Needs: wrk, python3 and curl (and psql for BACKEND=postgres).
set -euo pipefail

cd "$(dirname "$0")/.."
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
BODY_BYTES=${BODY_BYTES:-1024}
RATE_GUESS=${RATE_GUESS:-45000}   # webhooks/s used to size the request file (no repeats below it)
LOG_LEVEL=${LOG_LEVEL:-info}
BACKEND=${BACKEND:-sqlite}
INSTANCES=${INSTANCES:-1}
URL_ENV=${URL_ENV:-CASHOUT_RECON_DATABASE_URL}
MAX_CONNECTIONS=${MAX_CONNECTIONS:-16}   # postgres: store.max_connections of each daemon

command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install -y wrk)" >&2; exit 2; }
case $BACKEND in
    sqlite)
        [[ "$INSTANCES" == 1 ]] || { echo "INSTANCES applies to BACKEND=postgres (SQLite takes one daemon)" >&2; exit 2; }
        ;;
    postgres)
        command -v psql >/dev/null || { echo "BACKEND=postgres needs psql (apt-get install -y postgresql-client)" >&2; exit 2; }
        SERVER_URL=${!URL_ENV:-}
        [[ -n "$SERVER_URL" ]] || {
            echo "BACKEND=postgres needs a server: set \$$URL_ENV (or name another variable in URL_ENV) to a" \
                 "connection string whose role may CREATE DATABASE, e.g. postgres://user:password@127.0.0.1:5432/postgres" >&2
            exit 2
        }
        ;;
    *) echo "BACKEND must be sqlite or postgres, not $BACKEND" >&2; exit 2 ;;
esac
[[ "$INSTANCES" =~ ^[1-9][0-9]*$ ]] && (( INSTANCES <= CONNECTIONS )) \
    || { echo "INSTANCES must be between 1 and CONNECTIONS ($CONNECTIONS)" >&2; exit 2; }
RUNS=${RUNS:-1}
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a positive integer, not $RUNS" >&2; exit 2; }
if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --release --quiet
fi
TARGET=${CARGO_TARGET_DIR:-target}
BIN=${BIN:-$TARGET/release/cashout-recon}

if (( RUNS > 1 )); then
    SUMMARIES=()
    for run in $(seq 1 "$RUNS"); do
        out=$(RUNS=1 NO_BUILD=1 BIN="$BIN" bash "$0" 2>&1) \
            || { echo "run $run failed:" >&2; tail -n 20 <<<"$out" >&2; exit 1; }
        line=$(grep '^WRK_SUMMARY' <<<"$out")
        echo "run $run/$RUNS: ${line#WRK_SUMMARY }"
        SUMMARIES+=("$line")
    done
    printf '%s\n' "${SUMMARIES[@]}" | python3 -c '
import statistics, sys
runs = [dict(f.split("=", 1) for f in line.split()[1:]) for line in sys.stdin if line.strip()]
ratios = [float(r["ok_per_sec"]) / float(r["healthz_ok_per_sec"]) for r in runs]
p99 = [float(r["p99_ms"]) for r in runs]
ok = [float(r["ok_per_sec"]) for r in runs]
print(f"{len(runs)} runs: ingest {min(ok) / 1000:.1f}k - {max(ok) / 1000:.1f}k/s (median {statistics.median(ok) / 1000:.1f}k); "
      f"ingest / healthz {min(ratios):.3f} - {max(ratios):.3f}, median {statistics.median(ratios):.3f}, "
      f"{sum(r >= 0.30 for r in ratios)} of {len(runs)} at or above 0.30; p99 {min(p99):.1f} - {max(p99):.1f} ms")
'
    exit 0
fi

WORK=$(mktemp -d)
SERVER_PIDS=()
DATABASE=
cleanup() {
    local i pid
    for i in "${!SERVER_PIDS[@]}"; do
        pid=${SERVER_PIDS[$i]}
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "daemon $i died; its log:" >&2
            tail -n 30 "$WORK/serve-$i.log" >&2
        else
            kill -TERM "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        fi
    done
    if [[ -n "$DATABASE" ]]; then
        psql "$SERVER_URL" -qAtc "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" >/dev/null \
            || echo "could not drop the database $DATABASE" >&2
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
SECRET=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
API_KEY=wrk-api-key
if [[ "$BACKEND" == postgres ]]; then
    DATABASE=cashout_recon_wrk_$(python3 -c 'import uuid; print(uuid.uuid4().hex)')
    psql "$SERVER_URL" -qAtc "CREATE DATABASE $DATABASE" >/dev/null
    # The server URL with the new database (URL or key=value form).
    DATABASE_URL=$(python3 - "$SERVER_URL" "$DATABASE" <<'PY'
import sys
url, name = sys.argv[1], sys.argv[2]
if "://" not in url:
    print(f"{url} dbname={name}")
else:
    base, _, query = url.partition("?")
    scheme, _, rest = base.partition("://")
    authority = rest.split("/", 1)[0]
    print(f"{scheme}://{authority}/{name}" + (f"?{query}" if query else ""))
PY
)
    STORE_KEYS="backend = \"postgres\"
url_env = \"WRK_DATABASE_URL\"
max_connections = $MAX_CONNECTIONS"
else
    DATABASE_URL=
    STORE_KEYS='path = "bench.db"'
fi

PORTS=()
for i in $(seq 0 $(( INSTANCES - 1 ))); do
    PORTS+=("$(free_port)")
    mkdir -p "$WORK/instance-$i"
    cat >"$WORK/instance-$i/config.toml" <<TOML
[server]
listen = "127.0.0.1:${PORTS[$i]}"

[store]
$STORE_KEYS

[reports]
dir = "reports"

[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["WRK_FISERV_SECRET"]
TOML
done

seconds() { local d=$1; case $d in *ms) echo "0.${d%ms}";; *s) echo "${d%s}";; *m) echo $(( ${d%m} * 60 ));; *) echo "$d";; esac; }
TOTAL_S=$(python3 -c "print(int(float('$(seconds "$DURATION")') + float('$(seconds "$WARMUP")') + 2))")
COUNT=$(( RATE_GUESS * TOTAL_S ))
echo "generating $COUNT signed webhooks of $BODY_BYTES bytes …"
# Each daemon's wrk threads replay their own files (the warm-up takes the first fifth, no
# repeats later).
PER_THREADS=$(( THREADS / INSTANCES )); (( PER_THREADS >= 1 )) || PER_THREADS=1
HOSTS=$(printf '127.0.0.1:%s,' "${PORTS[@]}"); HOSTS=${HOSTS%,}
python3 benches/wrk-requests.py --count "$COUNT" --out-dir "$WORK" --secret "$SECRET" \
    --api-key "$API_KEY" --body-bytes "$BODY_BYTES" --hosts "$HOSTS" --threads "$PER_THREADS"

for i in "${!PORTS[@]}"; do
    WRK_FISERV_SECRET=$SECRET WRK_DATABASE_URL=$DATABASE_URL RUST_LOG=$LOG_LEVEL \
        "$BIN" serve --config "$WORK/instance-$i/config.toml" >"$WORK/serve-$i.log" 2>&1 &
    SERVER_PIDS+=($!)
done
for i in "${!PORTS[@]}"; do
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:${PORTS[$i]}/readyz" >/dev/null 2>&1; then break; fi
        kill -0 "${SERVER_PIDS[$i]}" 2>/dev/null || { cat "$WORK/serve-$i.log" >&2; exit 1; }
        sleep 0.1
    done
done

# Each wrk gets CONNECTIONS/INSTANCES connections (the remainder to the first ones).
connections_of() { echo $(( CONNECTIONS / INSTANCES + ($1 < CONNECTIONS % INSTANCES ? 1 : 0) )); }

run_wrk() { # NAME DURATION PATH [REQUESTS_PREFIX]: one wrk per daemon at once, then merged
    local name=$1 duration=$2 path=$3 requests=${4:-} i pids=()
    for i in "${!PORTS[@]}"; do
        local args=()
        [[ -z "$requests" ]] || args=(-- "$requests-$i")
        WRK_LATENCY_OUT="$WORK/$name-$i.latency" wrk -t"$PER_THREADS" -c"$(connections_of "$i")" \
            -d"$duration" --latency --timeout 10s -s benches/wrk-ingest.lua \
            "http://127.0.0.1:${PORTS[$i]}$path" "${args[@]}" >"$WORK/$name-$i.out" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i"; done
    python3 benches/wrk-merge.py "$WORK/$name" "$INSTANCES" >"$WORK/$name.out"
}
result() { grep '^WRK_RESULT' "$WORK/$1.out" | sed 's/^WRK_RESULT //'; }
field() { result "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
snapshot() { # SUFFIX: every daemon's metrics and threads
    local i
    for i in "${!PORTS[@]}"; do
        curl -fsS "http://127.0.0.1:${PORTS[$i]}/metrics" >"$WORK/metrics-$i.$1"
        python3 benches/wrk-threads.py snap "${SERVER_PIDS[$i]}" >"$WORK/threads-$i.$1" 2>/dev/null || true
    done
}

# The request files (~1 GB at the default rate) are still dirty in the page cache: written
# back during the measured run they would throttle the daemon's fsyncs (block-layer
# writeback throttling) and be measured as its tail. Flush them first.
sync

run_wrk healthz-warmup "$WARMUP" /healthz
run_wrk healthz "$DURATION" /healthz
run_wrk ingest-warmup "$WARMUP" /webhooks/fiserv "$WORK/warmup"
snapshot before
run_wrk ingest "$DURATION" /webhooks/fiserv "$WORK/measured"
snapshot after

STORE_LABEL=$BACKEND
[[ "$BACKEND" == sqlite ]] || STORE_LABEL="postgres x$INSTANCES"
echo
echo "== $STORE_LABEL: GET /healthz ($CONNECTIONS connections over $INSTANCES daemon(s), $THREADS threads, $DURATION)"
sed -n '/Latency Distribution/,/requests in/p' "$WORK/healthz-0.out"
echo "== $STORE_LABEL: POST /webhooks/fiserv (unique signed ~${BODY_BYTES}-byte webhooks)"
sed -n '/Latency Distribution/,/requests in/p' "$WORK/ingest-0.out"
(( INSTANCES == 1 )) || echo "(wrk's own output above is daemon 0's; the table below merges all $INSTANCES)"
grep -h 'Non-2xx' "$WORK"/ingest-*.out || true
echo
printf '%-10s %10s %9s %9s %9s %9s %9s %8s %8s\n' target 2xx/s p50_ms p90_ms p99_ms p99.9_ms max_ms non2xx failed
for name in healthz ingest; do
    printf '%-10s %10s %9s %9s %9s %9s %9s %8s %8s\n' "$name" "$(field $name ok_per_sec)" \
        "$(field $name p50_ms)" "$(field $name p90_ms)" "$(field $name p99_ms)" \
        "$(field $name p999_ms)" "$(field $name max_ms)" "$(field $name non_2xx)" \
        "$(field $name transport_errors)"
done
RATIO=$(python3 -c "print(f'{$(field ingest ok_per_sec) / $(field healthz ok_per_sec):.3f}')")
echo "ingest / healthz throughput: $RATIO (goal >= 0.30 on SQLite); ingest p99 $(field ingest p99_ms) ms (goal <= 15 on SQLite, <= 25 on one PostgreSQL instance)"
for i in "${!PORTS[@]}"; do
    (( INSTANCES == 1 )) || echo "-- daemon $i"
    python3 benches/wrk-metrics.py "$WORK/metrics-$i.before" "$WORK/metrics-$i.after" || true
    python3 benches/wrk-threads.py diff "$WORK/threads-$i.before" "$WORK/threads-$i.after" 2>/dev/null || true
done
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) (other processes share the cores and the disk)"
REPEATS=$(field ingest repeats)
[[ "$REPEATS" == 0 ]] || echo "warning: $REPEATS requests repeated (answered duplicate): raise RATE_GUESS"

# Stop the daemons (they drain) and count stored webhook events against 2xx answers.
for pid in "${SERVER_PIDS[@]}"; do kill -TERM "$pid"; done
for pid in "${SERVER_PIDS[@]}"; do wait "$pid" || true; done
SERVER_PIDS=()
COUNT_SQL="SELECT COUNT(*) FROM events WHERE source = 'webhook'"
if [[ "$BACKEND" == postgres ]]; then
    STORED=$(psql "$DATABASE_URL" -qAtc "$COUNT_SQL")
else
    STORED=$(python3 - "$WORK/instance-0/bench.db" "$COUNT_SQL" <<'PY'
import sqlite3, sys
db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
print(db.execute(sys.argv[2]).fetchone()[0])
PY
)
fi
ACKED=$(( $(field ingest-warmup ok) + $(field ingest ok) ))
echo "store: $STORED webhook events, $ACKED answered 2xx (warm-up included)"
for i in "${!PORTS[@]}"; do
    echo "log of daemon $i: $(wc -l <"$WORK/serve-$i.log") lines, $(wc -c <"$WORK/serve-$i.log") bytes"
done
echo "WRK_SUMMARY backend=$BACKEND instances=$INSTANCES ok_per_sec=$(field ingest ok_per_sec) p50_ms=$(field ingest p50_ms) p90_ms=$(field ingest p90_ms) p99_ms=$(field ingest p99_ms) p999_ms=$(field ingest p999_ms) non_2xx=$(field ingest non_2xx) healthz_ok_per_sec=$(field healthz ok_per_sec) stored=$STORED acked=$ACKED load=$(cut -d' ' -f1 /proc/loadavg)"
# Every 2xx answer must be stored. The store may hold a few more: the requests in flight
# when wrk stopped (at most one per connection and run) were committed, never counted.
if (( STORED < ACKED || STORED > ACKED + 2 * CONNECTIONS )); then
    if [[ "$REPEATS" == 0 && "$(field ingest-warmup repeats)" == 0 ]]; then
        echo "MISMATCH between the store and the 2xx answers" >&2
        exit 1
    fi
fi
