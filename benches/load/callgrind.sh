#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: a
# deterministic figure for before/after comparisons on a noisy machine
# (wall-clock load tests on a shared 2-core box vary by +-10 % or more).
#
#   benches/load/callgrind.sh                 # target/perf/switchyard
#   SY=/tmp/old-switchyard benches/load/callgrind.sh
#   REQUESTS=20000 WORKLOAD=big benches/load/callgrind.sh
#   CONFIG=lean benches/load/callgrind.sh     # request id, forwarding and
#                                             # pool headers, sticky cookie off
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
trap 'for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done; true' EXIT
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
curl -fsS -X POST http://127.0.0.1:18901/api/v1/services/web/split -d '{"green":10}' -o /dev/null
path=/
[ "$WORKLOAD" = big ] && path=/64k
h2load --h1 -n 2000 -c 16 "http://127.0.0.1:18080$path" >"$OUT/warmup.txt"
callgrind_control -i on "$VG" >/dev/null
h2load --h1 -n "$REQUESTS" -c 16 "http://127.0.0.1:18080$path" >"$OUT/load.txt"
callgrind_control -d "$VG" >/dev/null
callgrind_control -i off "$VG" >/dev/null
ok=$(awk '/^status codes:/ {print $3}' "$OUT/load.txt")
kill "$VG"
wait "$VG" 2>/dev/null || true
file=$OUT/callgrind.out.1 # the dump taken right after the load
callgrind_annotate --inclusive=no "$file" 2>/dev/null | head -80 >"$OUT/top.txt" || true
callgrind_annotate --inclusive=yes "$file" 2>/dev/null | head -120 >"$OUT/top-inclusive.txt" || true
ir=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$OUT/top.txt")
echo "workload $WORKLOAD: $REQUESTS requests ($ok 2xx), $ir instructions, $((ir / REQUESTS)) Ir/request"
echo "top functions: $OUT/top.txt (self), $OUT/top-inclusive.txt (inclusive)"
