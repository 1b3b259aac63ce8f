#!/usr/bin/env bash
# CPU per accepted routing change, with the history full (500 entries).
#
#   benches/load/switch_cost.sh            # 300 changes measured
#   SY=/path/to/switchyard CHANGES=500 benches/load/switch_cost.sh
#
# Starts the bench upstream and switchyard (1 worker, file state in a
# temporary directory), makes 600 changes through the admin API to fill the
# history, then CHANGES more as fast as one keep-alive client can
# (benches/load/switcher.py with no pause), and prints the proxy's CPU time
# (user + system, from /proc) and the wall time per change, and the state
# file's size. Every change is a real one: persisted (write, fsync,
# rename, fsync of the directory), published to the data plane, recorded.
# Loopback only; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CHANGES=${CHANGES:-300}
ADMIN=18901
if [ -z "${SY:-}" ]; then
  cargo build -q --profile perf --bin switchyard
  SY=$ROOT/target/perf/switchyard
fi
cargo build -q --release --example bench_upstream
UP=$ROOT/target/release/examples/bench_upstream
DIR=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
cat >"$DIR/switchyard.toml" <<TOML
[proxy]
listen = "127.0.0.1:18080"
workers = 1
access_log = false
[admin]
listen = "127.0.0.1:$ADMIN"
[state]
path = "$DIR/state.json"
[[service]]
name = "web"
hosts = ["*"]
path_prefix = "/"
initial = "blue"
[service.blue]
backends = ["127.0.0.1:18001"]
[service.green]
backends = ["127.0.0.1:18002"]
TOML
"$UP" 18001 18002 1 >/dev/null 2>&1 &
PIDS+=($!)
"$SY" run --config "$DIR/switchyard.toml" >"$DIR/switchyard.log" 2>&1 &
SY_PID=$!
PIDS+=("$SY_PID")
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$ADMIN") 2>/dev/null && break
  sleep 0.1
done
python3 benches/load/switcher.py "127.0.0.1:$ADMIN" web 600 0 >/dev/null
ticks() { local s; s=$(cat "/proc/$SY_PID/stat"); s=${s##*) }; set -- $s; echo $((${12} + ${13})); }
HZ=$(getconf CLK_TCK)
c0=$(ticks)
t0=$(date +%s%N)
python3 benches/load/switcher.py "127.0.0.1:$ADMIN" web "$CHANGES" 0
c1=$(ticks)
t1=$(date +%s%N)
awk -v c=$((c1 - c0)) -v hz="$HZ" -v t=$((t1 - t0)) -v n="$CHANGES" -v size="$(stat -c %s "$DIR/state.json")" 'BEGIN {
  printf "per change: CPU %.3f ms, wall %.3f ms; state file %d bytes\n", c / hz * 1000 / n, t / 1e6 / n, size
}'
