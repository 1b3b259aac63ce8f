#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: a
# deterministic figure for before/after comparisons on a noisy machine
# (wall-clock load tests on a shared 2-core box vary by +-10 % or more).
#
#   benches/load/callgrind.sh                 # target/perf/switchyard
#   SY=/tmp/old-switchyard benches/load/callgrind.sh
#   REQUESTS=20000 WORKLOAD=big benches/load/callgrind.sh
#   WORKLOAD=close benches/load/callgrind.sh  # a new connection per request
#                                             # (wrk, CLOSE_SECONDS=20)
#   CONFIG=lean benches/load/callgrind.sh     # request id, forwarding and
#                                             # pool headers, sticky cookie off
#   ROLLOUT=1 benches/load/callgrind.sh       # the same 90/10 weights, set by
#                                             # a running rollout (one long
#                                             # pause at 10 %) instead of a split
#
# Runs switchyard (workers = 1, access log off, a 90/10 split) under
# callgrind with instrumentation off, warms up, switches instrumentation
# on for exactly REQUESTS keep-alive HTTP/1.1 requests (h2load --h1, 16
# connections), dumps, and prints Ir per request and the top functions.
# Loopback only; everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
REQUESTS=${REQUESTS:-20000}
WORKLOAD=${WORKLOAD:-small}
OUT=${OUT:-$ROOT/target/bench-callgrind/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
export PATH=$PATH:/usr/sbin
for t in valgrind h2load; do
  command -v $t >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq valgrind nghttp2-client >/dev/null
  }
done
if [ -z "${SY:-}" ]; then
  cargo build -q --profile perf --bin switchyard
  SY=$ROOT/target/perf/switchyard
fi
cargo build -q --release --example bench_upstream
UP=$ROOT/target/release/examples/bench_upstream

PIDS=()
trap 'for p in "${PIDS[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; }; done; true' EXIT
wait_port() {
  local i
  for i in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 did not open" >&2
  exit 1
}

"$UP" 18001 18002 1 >"$OUT/upstream.log" 2>&1 &
PIDS+=($!)
lean="" sticky=""
if [ "${CONFIG:-equivalent}" = lean ]; then
  lean=$'request_id = false\nforwarded_headers = false\nadd_pool_header = false'
  sticky=$'[service.sticky]\ncookie = ""'
fi
cat >"$OUT/switchyard.toml" <<CFG
[proxy]
listen = "127.0.0.1:18080"
workers = 1
access_log = false
$lean
[admin]
listen = "127.0.0.1:18901"
[state]
path = "$OUT/state.json"
[[service]]
name = "web"
hosts = ["*"]
path_prefix = "/"
initial = "blue"
[service.blue]
backends = ["127.0.0.1:18001"]
[service.green]
backends = ["127.0.0.1:18002"]
$sticky
CFG
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" \
  "$SY" run --config "$OUT/switchyard.toml" >"$OUT/switchyard.log" 2>&1 &
VG=$!
PIDS+=($VG)
wait_port 18901
wait_port 18080
if [ "${ROLLOUT:-0}" = 1 ]; then
  # The same weights as the static split, held by a rollout whose first
  # step pauses far longer than the run: analysis on, no mirror.
  curl -fsS -X POST http://127.0.0.1:18901/api/v1/services/web/rollout \
    -d '{"plan":{"steps":[{"weight":10,"pause":"1h"},{"weight":100}]}}' -o /dev/null
else
  curl -fsS -X POST http://127.0.0.1:18901/api/v1/services/web/split -d '{"green":10}' -o /dev/null
fi
path=/
[ "$WORKLOAD" = big ] && path=/64k
h2load --h1 -n 2000 -c 16 "http://127.0.0.1:18080$path" >"$OUT/warmup.txt"
callgrind_control -i on "$VG" >/dev/null
if [ "$WORKLOAD" = close ]; then
  # A new connection per request: wrk (which reconnects) for CLOSE_SECONDS;
  # REQUESTS becomes the number it completed.
  wrk -t1 -c16 -d"${CLOSE_SECONDS:-20}" -H "Connection: close" "http://127.0.0.1:18080/" >"$OUT/load.txt"
  REQUESTS=$(awk '/requests in/ {print $1}' "$OUT/load.txt")
  ok=$REQUESTS
  grep -q "Non-2xx\|Socket errors" "$OUT/load.txt" && ok="$REQUESTS (with errors, see load.txt)"
else
  h2load --h1 -n "$REQUESTS" -c 16 "http://127.0.0.1:18080$path" >"$OUT/load.txt"
fi
callgrind_control -d "$VG" >/dev/null
callgrind_control -i off "$VG" >/dev/null
[ "$WORKLOAD" = close ] || ok=$(awk '/^status codes:/ {print $3}' "$OUT/load.txt")
if [ "${ROLLOUT:-0}" = 1 ]; then
  curl -fsS http://127.0.0.1:18901/api/v1/services/web/rollout >"$OUT/rollout.json"
  grep -Eq '"state": *"progressing"' "$OUT/rollout.json" || {
    echo "the rollout is not progressing at 10 %: $(cat "$OUT/rollout.json")" >&2
    exit 1
  }
fi
kill "$VG"
wait "$VG" 2>/dev/null || true
file=$OUT/callgrind.out.1 # the dump taken right after the load
callgrind_annotate --inclusive=no "$file" 2>/dev/null | head -80 >"$OUT/top.txt" || true
callgrind_annotate --inclusive=yes --threshold=100 "$file" 2>/dev/null >"$OUT/top-inclusive-all.txt" || true
head -120 "$OUT/top-inclusive-all.txt" >"$OUT/top-inclusive.txt"
ir=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$OUT/top.txt")
# Calls into the allocator: the callee lines (cfn=) of jemalloc's
# allocating entry points, summed over every caller (names are
# compressed: "(id) name" the first time, "(id)" after).
allocs=$(awk '
  /^c?fn=\(/ { id = $0; sub(/^c?fn=/, "", id); name = id; sub(/\).*/, ")", id)
               sub(/^\([0-9]+\) ?/, "", name); if (name != "") names[id] = name }
  /^cfn=\(/ { callee = id }
  /^calls=/ { n = $0; sub(/^calls=/, "", n); sub(/ .*/, "", n); calls[callee] += n }
  END { t = 0; for (i in calls) if (names[i] ~ /^_rjem_(malloc|mallocx|calloc|realloc|rallocx)$/) t += calls[i]; print t }
' "$file")
echo "workload $WORKLOAD: $REQUESTS requests ($ok 2xx), $ir instructions, $((ir / REQUESTS)) Ir/request, $allocs allocations, $(awk -v a="$allocs" -v n="$REQUESTS" 'BEGIN { printf "%.2f", a / n }') allocations/request"
if [ "${ROLLOUT:-0}" = 1 ]; then
  # Inclusive cost of the driver task's future (ticks, persisting): work
  # per tick (4 a second), not per request. Its poll is inlined into a
  # generic `Pin<P> as Future>::poll` whose first line is in rollout/mod.rs.
  drv=$(awk '/control_plane\/rollout\/mod\.rs:<core::pin::Pin<P> as core::future::future::Future>::poll|rollout::Driver::run::\{\{closure\}\}/ {
    gsub(",", "", $1); if ($1 + 0 > m) m = $1 + 0 } END { print m + 0 }' "$OUT/top-inclusive-all.txt")
  echo "rollout driver task: $drv instructions inclusive, $(( (ir - drv) / REQUESTS )) Ir/request without it"
fi
echo "top functions: $OUT/top.txt (self), $OUT/top-inclusive.txt (inclusive)"
