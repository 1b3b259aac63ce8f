#!/usr/bin/env bash
# User and kernel CPU time per request of one proxy under wrk: utime and
# stime of all its threads (workers included) from /proc, over 4 s of a
# 64-connection small keep-alive load, after a 1 s warm-up.
#
#   benches/load/cpu_split.sh TARGET DIR
#
# TARGET: switchyard, nginx or haproxy. DIR: an OUT directory of
# benches/load/run.sh, whose 2-worker configs are used (CONFIG=lean or
# equivalent, as that run was). SY: the switchyard binary
# (target/perf/switchyard). Ports as in run.sh (upstream 18001/18002,
# proxy 18080). Loopback only; what it starts it stops.
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${1:?TARGET}
D=${2:?DIR of a run.sh output}
UP=target/release/examples/bench_upstream
SY=${SY:-target/perf/switchyard}
export PATH=$PATH:/usr/sbin
PIDS=()
trap 'for p in "${PIDS[@]:-}"; do [ -n "$p" ] && { kill "$p" 2>/dev/null || true; }; done; true' EXIT
"$UP" 18001 18002 1 >/dev/null 2>&1 &
PIDS+=($!)
rm -f "$D/switchyard-state-w2.json"
case $T in
  switchyard) "$SY" run --config "$D/switchyard-w2.toml" >/dev/null 2>&1 & ;;
  haproxy) haproxy -f "$D/haproxy-w2.cfg" >/dev/null 2>&1 & ;;
  nginx) nginx -c "$D/nginx-w2.conf" >/dev/null 2>&1 & ;;
  *) echo "unknown target $T" >&2; exit 2 ;;
esac
TP=$!
PIDS+=("$TP")
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/18080) 2>/dev/null && break; sleep 0.1; done
wrk -t1 -c64 -d1s http://127.0.0.1:18080/ >/dev/null 2>&1
# The target and its worker processes (nginx).
PL="$TP $(pgrep -P "$TP" | tr '\n' ' ' || true)"
snap() {
  local p t s
  for p in $PL; do
    for t in /proc/"$p"/task/*; do
      s=$(cat "$t/stat" 2>/dev/null) || continue
      s=${s##*) }
      # After "comm": state is field 1, utime 12, stime 13.
      set -- $s
      echo "${12} ${13}"
    done
  done | awk '{u += $1; k += $2} END {print u + 0, k + 0}'
}
OUTF=$(mktemp)
wrk -t1 -c64 -d5s http://127.0.0.1:18080/ >"$OUTF" 2>&1 &
WP=$!
sleep 0.5
A=$(snap)
sleep 4
B=$(snap)
wait "$WP"
RPS=$(awk '/Requests\/sec/ {print $2}' "$OUTF")
rm -f "$OUTF"
HZ=$(getconf CLK_TCK)
echo "$A $B" | awk -v r="$RPS" -v hz="$HZ" -v t="$T" '{
  u = ($3 - $1) * 1e6 / hz / (r * 4); k = ($4 - $2) * 1e6 / hz / (r * 4)
  printf "%s: %.0f req/s, user %.2f us/req, kernel %.2f us/req, total %.2f, kernel share %.0f%%\n", t, r, u, k, u + k, 100 * k / (u + k)
}'
