#!/usr/bin/env bash
# Load benchmarks: switchyard against nginx and HAProxy, on loopback.
#
#   benches/load/run.sh                      # everything, ~10 minutes
#   ROUNDS=5 DURATION=10 benches/load/run.sh # longer, steadier
#   PHASES=load WORKERS=1 benches/load/run.sh
#
# What it does (see benches/load/README.md for the method):
#   1. installs (apt) or finds nginx, haproxy, wrk, h2load; builds switchyard
#      and the bench helpers with `--profile perf`;
#   2. starts one upstream process (examples/bench_upstream.rs: blue and green);
#   3. phase `load`: ROUNDS rounds, interleaved: direct to the upstream, then
#      switchyard, nginx, HAProxy (order rotated each round), each a 90/10
#      blue/green weighted reverse proxy with upstream keep-alive, at each
#      worker count in WORKERS; workloads: small body keep-alive (wrk, CONNS
#      connections), 64 KiB body, HTTP/2 h2c (h2load), new connection per
#      request (Connection: close);
#   4. phase `switch`: small-body load on switchyard with and without the
#      admin API switching/splitting every 100 ms;
#   5. phase `memory`: switchyard idle RSS, RSS with IDLE_CONNS idle
#      keep-alive client connections, RSS growth during a 1 GiB upload;
#   6. prints medians over the rounds and ratios; raw rows are in $OUT.
#
# Placement (PIN=1, the default): with 1 worker the load generator is pinned
# to CPU 0 and the server side (proxy and upstream) to CPU 1, so the server
# side is the bottleneck; direct runs use the same placement without the
# proxy. With 2 workers nothing is pinned (2 cores).
#
# Environment: ROUNDS (3), DURATION seconds per measurement (5), WORKERS
# ("1 2"), CONNS (64), PHASES ("load switch memory"), TARGETS ("switchyard
# nginx haproxy"), WORKLOADS ("small big h2 close"), DIRECT (1: measure the
# upstream alone), SY_BASE (a baseline switchyard binary: add `baseline` to
# TARGETS for an A/B run), MIRROR (a percent: `switchyard` mirrors that
# share of blue's requests to green; `baseline` does not), IDLE_CONNS (10000),
# UPLOAD_MIB (1024), PIN (1), UP_THREADS (upstream threads, 1), OUT (target/bench-load/DATE),
# CONFIG (equivalent: every proxy adds a request id, forwarding headers and
# the pool header; lean: none of them, and no sticky cookie).
# Loopback only. Every process started here is stopped on exit.

set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
WORKERS=${WORKERS:-"1 2"}
CONNS=${CONNS:-64}
PHASES=${PHASES:-"load switch memory"}
IDLE_CONNS=${IDLE_CONNS:-10000}
UPLOAD_MIB=${UPLOAD_MIB:-1024}
PIN=${PIN:-1}
OUT=${OUT:-$ROOT/target/bench-load/$(date +%Y%m%d-%H%M%S)}
# The 10k idle connections need descriptors (as many as the hard limit allows).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

BLUE=18001
GREEN=18002
PROXY=18080   # HTTP/1.1 (switchyard: also h2c)
PROXY_H2=18081 # h2c for nginx and HAProxy
ADMIN=18901

RESULTS=$OUT/results.tsv
LOG=$OUT/run.log
echo -e "round\tworkers\ttarget\tworkload\trps\tp50_us\tp99_us\terrors\tcpu_us_per_req\tcpu_util\trss_kib" >"$RESULTS"

log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

# ---------------------------------------------------------------- cleanup
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  sleep 0.3
  for p in "${PIDS[@]:-}"; do
    [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop() { # stop PID: TERM, wait up to 5 s, then KILL
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

wait_port() { # wait_port PORT: up to 10 s
  local i
  for i in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  log "port $1 did not open"
  return 1
}

# ---------------------------------------------------------------- tools
need_tools() {
  local missing=()
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v h2load >/dev/null || missing+=(nghttp2-client)
  command -v python3 >/dev/null || missing+=(python3)
  command -v curl >/dev/null || missing+=(curl)
  command -v taskset >/dev/null || missing+=(util-linux)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # Do not let the packages start their own services (an existing
    # policy-rc.d is left as it is).
    local policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      policy=/usr/sbin/policy-rc.d
    fi
    apt-get install -y -qq "${missing[@]}" >/dev/null
    [ -z "$policy" ] || rm -f "$policy"
  fi
  export PATH=$PATH:/usr/sbin
}

build() {
  # Two invocations on purpose: building the examples enables the
  # dev-dependencies' features (tokio "test-util", ...), which must not leak
  # into the measured binary. The helpers use the release profile, which
  # `cargo test --release` shares.
  log "building switchyard (--profile perf) and the bench helpers (--release)"
  cargo build -q --profile perf --bin switchyard
  cargo build -q --release --example bench_upstream --example bench_idle_conns
  SY=$ROOT/target/perf/switchyard
  UP=$ROOT/target/release/examples/bench_upstream
  IDLE=$ROOT/target/release/examples/bench_idle_conns
}

# ---------------------------------------------------------------- placement
# Command prefixes (taskset or nothing). Used as "${LOADGEN[@]}" cmd ... so
# that `cmd &` forks the command itself and $! is its pid.
LOADGEN=()
ON_PROXY=()
place() { # place WORKERS: sets LOADGEN, ON_PROXY; moves the upstream
  if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ] && [ "$1" = 1 ]; then
    # The load generator gets a core of its own, so that the server side
    # (proxy and upstream, on the other core) is the bottleneck.
    LOADGEN=(taskset -c 0)
    ON_PROXY=(taskset -c 1)
    taskset -a -p -c 1 "$UP_PID" >/dev/null
  else
    LOADGEN=()
    ON_PROXY=()
    taskset -a -p -c "0-$(($(nproc) - 1))" "$UP_PID" >/dev/null
  fi
}
place_direct() { place 1; }

# ---------------------------------------------------------------- /proc
proc_tree() { # PID and its descendants
  local c
  echo "$1"
  for c in $(pgrep -P "$1" 2>/dev/null); do proc_tree "$c"; done
}
cpu_ticks() { # utime+stime of PID and its children, in clock ticks
  local t=0 p s
  for p in $(proc_tree "$1"); do
    s=$(cat "/proc/$p/stat" 2>/dev/null) || continue
    s=${s##*) }
    # fields after "comm": state is field 3, utime 14, stime 15
    set -- $s
    t=$((t + ${12} + ${13}))
  done
  echo "$t"
}
rss_kib() { # VmRSS of PID and its children
  local t=0 p r
  for p in $(proc_tree "$1"); do
    r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    t=$((t + ${r:-0}))
  done
  echo "$t"
}
HZ=$(getconf CLK_TCK)

# ---------------------------------------------------------------- upstream
start_upstream() {
  "$UP" "$BLUE" "$GREEN" "${UP_THREADS:-1}" >>"$OUT/upstream.log" 2>&1 &
  UP_PID=$!
  PIDS+=("$UP_PID")
  wait_port "$BLUE"
  wait_port "$GREEN"
}

# ---------------------------------------------------------------- proxies
write_configs() { # write_configs WORKERS
  local w=$1
  # CONFIG=lean: each proxy's leanest 90/10 split: no request id, no
  # forwarding headers, no pool header, no sticky cookie (switchyard's
  # extras off; nginx and HAProxy without the lines that add them).
  local sy_lean="" sy_sticky="" ng_extra hp_extra
  ng_extra=$(cat <<'NG'
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id;
      add_header X-Switchyard-Pool $pool;
NG
)
  hp_extra=$(cat <<'HP'
  option forwardfor
  http-request set-var(txn.rid) uuid
  http-request set-header X-Request-Id %[var(txn.rid)]
  http-request set-header X-Forwarded-Proto http
  http-request set-header X-Forwarded-Host %[req.hdr(host)]
  http-response set-header X-Request-Id %[var(txn.rid)]
  http-response set-header X-Switchyard-Pool %[srv_name]
HP
)
  if [ "${CONFIG:-equivalent}" = lean ]; then
    sy_lean=$'request_id = false\nforwarded_headers = false\nadd_pool_header = false'
    sy_sticky=$'[service.sticky]\ncookie = ""'
    ng_extra=""
    hp_extra=""
  fi
  cat >"$OUT/switchyard-w$w.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY"
workers = $w
access_log = false
$sy_lean
[admin]
listen = "127.0.0.1:$ADMIN"
[state]
path = "$OUT/switchyard-state-w$w.json"
[[service]]
name = "web"
hosts = ["*"]
path_prefix = "/"
initial = "blue"
[service.blue]
backends = ["127.0.0.1:$BLUE"]
[service.green]
backends = ["127.0.0.1:$GREEN"]
$sy_sticky
EOF
  # nginx: what switchyard does per request, as far as nginx can:
  # forwarding headers, a request id both ways, the pool in the response.
  # Buffers large enough that a 64 KiB response never goes to a temp file;
  # no per-connection request cap (switchyard has none).
  mkdir -p "$OUT/nginx-tmp"
  cat >"$OUT/nginx-w$w.conf" <<EOF
worker_processes $w;
daemon off;
pid $OUT/nginx-w$w.pid;
error_log $OUT/nginx-error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx-tmp/body;
  proxy_temp_path $OUT/nginx-tmp/proxy;
  fastcgi_temp_path $OUT/nginx-tmp/fcgi;
  uwsgi_temp_path $OUT/nginx-tmp/uwsgi;
  scgi_temp_path $OUT/nginx-tmp/scgi;
  keepalive_requests 10000000;
  keepalive_timeout 90s;
  http2_max_requests 10000000;
  upstream app {
    server 127.0.0.1:$BLUE weight=9;
    server 127.0.0.1:$GREEN weight=1;
    keepalive 512;
    keepalive_requests 10000000;
  }
  map \$upstream_addr \$pool { "127.0.0.1:$GREEN" green; default blue; }
  server {
    listen 127.0.0.1:$PROXY backlog=4096;
    listen 127.0.0.1:$PROXY_H2 http2 backlog=4096;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
$ng_extra
      proxy_buffer_size 16k;
      proxy_buffers 16 16k;
      proxy_busy_buffers_size 32k;
      client_max_body_size 0;
      proxy_request_buffering off;
    }
  }
}
EOF
  # HAProxy: the same, in its terms.
  cat >"$OUT/haproxy-w$w.cfg" <<EOF
global
  nbthread $w
  maxconn 9000
defaults
  mode http
  timeout connect 2s
  timeout client 90s
  timeout server 60s
  timeout http-keep-alive 90s
  timeout http-request 10s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:$PROXY backlog 4096
  bind 127.0.0.1:$PROXY_H2 proto h2 backlog 4096
  default_backend be
backend be
  balance roundrobin
$hp_extra
  server blue 127.0.0.1:$BLUE weight 90
  server green 127.0.0.1:$GREEN weight 10
EOF
}

TARGET_PID=""
start_target() { # start_target NAME WORKERS
  local name=$1 w=$2
  case $name in
    direct)
      TARGET_PID=$UP_PID
      return 0
      ;;
    switchyard | baseline)
      # `baseline`: another switchyard binary (SY_BASE=path), for A/B runs.
      local bin=$SY
      [ "$name" = baseline ] && bin=${SY_BASE:?SY_BASE=path of the baseline binary}
      rm -f "$OUT/switchyard-state-w$w.json"
      "${ON_PROXY[@]}" "$bin" run --config "$OUT/switchyard-w$w.toml" >>"$OUT/switchyard.log" 2>&1 &
      TARGET_PID=$!
      ;;
    nginx)
      "${ON_PROXY[@]}" nginx -c "$OUT/nginx-w$w.conf" >>"$OUT/nginx.log" 2>&1 &
      TARGET_PID=$!
      ;;
    haproxy)
      "${ON_PROXY[@]}" haproxy -db -f "$OUT/haproxy-w$w.cfg" >>"$OUT/haproxy.log" 2>&1 &
      TARGET_PID=$!
      ;;
  esac
  PIDS+=("$TARGET_PID")
  if ! wait_port "$PROXY"; then
    log "$name did not start; see $OUT/$name.log"
    exit 1
  fi
  if [ "$name" = switchyard ] || [ "$name" = baseline ]; then
    wait_port "$ADMIN"
    curl -fsS -X POST "http://127.0.0.1:$ADMIN/api/v1/services/web/split" \
      -d '{"green":10}' -o /dev/null
  fi
  # MIRROR=PCT: `switchyard` (not `baseline`) also copies PCT % of the
  # requests blue serves to green (SPEC §9), so an A/B run with SY_BASE set
  # to the same binary measures what mirroring costs the clients.
  if [ "$name" = switchyard ] && [ -n "${MIRROR:-}" ]; then
    curl -fsS -X PUT "http://127.0.0.1:$ADMIN/api/v1/services/web/mirror" \
      -d "{\"to\":\"green\",\"percent\":$MIRROR}" -o /dev/null
  fi
}
stop_target() {
  [ "$TARGET_PID" = "$UP_PID" ] || stop "$TARGET_PID"
  TARGET_PID=""
  sleep 0.5 # let the kernel settle the closed sockets
}

url_of() { # url_of TARGET WORKLOAD
  local port=$PROXY
  [ "$1" = direct ] && port=$BLUE
  if [ "$2" = h2 ] && { [ "$1" = nginx ] || [ "$1" = haproxy ]; }; then
    port=$PROXY_H2
  fi
  case $2 in
    big) echo "http://127.0.0.1:$port/64k" ;;
    *) echo "http://127.0.0.1:$port/" ;;
  esac
}

# ---------------------------------------------------------------- measuring
to_us() { # "312.00us" "1.20ms" "2.1s" -> microseconds
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") print n; else if (u == "ms") print n * 1000;
    else if (u == "s") print n * 1000000; else print n }'
}

# measure TARGET WORKLOAD SECONDS FILE: runs the load generator, prints
# "rps p50_us p99_us errors requests" (one line).
measure() {
  local target=$1 workload=$2 secs=$3 file=$4 url
  url=$(url_of "$target" "$workload")
  case $workload in
    small | big | close)
      local hdr=()
      [ "$workload" = close ] && hdr=(-H "Connection: close")
      "${LOADGEN[@]}" timeout $((secs + 30)) wrk -t1 -c"$CONNS" -d"${secs}s" --latency "${hdr[@]}" "$url" >"$file" 2>&1 || true
      local rps p50 p99 non2xx sock reqs
      rps=$(awk '/^Requests\/sec:/ {print $2}' "$file")
      p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$file")")
      p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$file")")
      reqs=$(awk '/requests in/ {print $1}' "$file")
      non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$file")
      sock=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$file")
      echo "${rps:-0} ${p50:-0} ${p99:-0} $(( ${non2xx:-0} + ${sock:-0} )) ${reqs:-0}"
      ;;
    h2)
      # 8 connections x 8 concurrent streams = 64 requests in flight.
      # No --warm-up-time: the proxy is warm already, and the CPU time
      # measured around this call must cover only the counted requests.
      "${LOADGEN[@]}" timeout $((secs + 30)) h2load -t1 -c8 -m8 -D "$secs" \
        --log-file="$file.reqs" "$url" >"$file" 2>&1 || true
      local rps reqs failed
      rps=$(awk '/^finished in/ {gsub(",", ""); print $4}' "$file")
      reqs=$(awk '/^requests:/ {print $8}' "$file")
      failed=$(awk '/^requests:/ {print $10 + $12 + $14}' "$file")
      local non2xx
      non2xx=$(awk '/^status codes:/ {gsub(",", ""); print $5 + $7 + $9}' "$file")
      local pct
      pct=$(awk -F'\t' '{print $3}' "$file.reqs" 2>/dev/null | sort -n | awk '
        { v[NR] = $1 } END { if (NR == 0) { print "0 0"; exit }
          i50 = int(NR * 0.50); if (i50 < 1) i50 = 1; i99 = int(NR * 0.99); if (i99 < 1) i99 = 1;
          print v[i50], v[i99] }')
      rm -f "$file.reqs"
      echo "${rps:-0} $pct $(( ${failed:-0} + ${non2xx:-0} )) ${reqs:-0}"
      ;;
  esac
}

# run_one ROUND WORKERS TARGET WORKLOAD: measures and appends a row.
run_one() {
  local round=$1 w=$2 target=$3 workload=$4
  local file=$OUT/raw-r$round-w$w-$target-$workload.txt
  local t0 t1 c0 c1 line rps p50 p99 err reqs cpu util rss
  c0=$(cpu_ticks "$TARGET_PID")
  t0=$(date +%s.%N)
  line=$(measure "$target" "$workload" "$DURATION" "$file")
  t1=$(date +%s.%N)
  c1=$(cpu_ticks "$TARGET_PID")
  rss=$(rss_kib "$TARGET_PID")
  read -r rps p50 p99 err reqs <<<"$line"
  # CPU per request in microseconds; utilisation in cores.
  cpu=$(awk -v d=$((c1 - c0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.2f", d / hz * 1e6 / n; else print 0 }')
  util=$(awk -v d=$((c1 - c0)) -v hz="$HZ" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", d / hz / (b - a) }')
  echo -e "$round\t$w\t$target\t$workload\t$rps\t$p50\t$p99\t$err\t$cpu\t$util\t$rss" >>"$RESULTS"
  log "  r$round w$w $target $workload: ${rps} req/s p50 ${p50}us p99 ${p99}us errors $err cpu/req ${cpu}us util ${util} rss ${rss}KiB"
}

read -r -a WORKLOADS <<<"${WORKLOADS:-small big h2 close}"
read -r -a PROXIES <<<"${TARGETS:-switchyard nginx haproxy}"

phase_load() {
  local round w target wl order i n
  n=${#PROXIES[@]}
  for round in $(seq "$ROUNDS"); do
    log "round $round/$ROUNDS"
    # Direct: the upstream alone, no proxy (the physical limit).
    if [ "${DIRECT:-1}" = 1 ]; then
      place_direct
      TARGET_PID=$UP_PID
      for wl in "${WORKLOADS[@]}"; do
        run_one "$round" 0 direct "$wl"
      done
    fi
    for w in $WORKERS; do
      place "$w"
      # Rotate the order each round so no proxy always goes first.
      order=()
      for i in $(seq 0 $((n - 1))); do order+=("${PROXIES[$(((i + round) % n))]}"); done
      for target in "${order[@]}"; do
        start_target "$target" "$w"
        # Warm up: fill the upstream pools, fault the pages in.
        "${LOADGEN[@]}" timeout 20 wrk -t1 -c"$CONNS" -d1s "$(url_of "$target" small)" >/dev/null 2>&1 || true
        for wl in "${WORKLOADS[@]}"; do
          run_one "$round" "$w" "$target" "$wl"
        done
        stop_target
      done
    done
  done
}

# ---------------------------------------------------------------- switch
# The admin API flips the routing every 100 ms while wrk runs: split 10,
# switch green, split 50, switch blue, ... (benches/load/switcher.py, one
# keep-alive admin connection, DURATION*10 calls, on the load generator's CPU).
phase_switch() {
  local w round kind file line rps p50 p99 err reqs sw_pid changes c0 c1 cpu
  w=${SWITCH_WORKERS:-1}
  place "$w"
  start_target switchyard "$w"
  "${LOADGEN[@]}" timeout 20 wrk -t1 -c"$CONNS" -d1s "$(url_of switchyard small)" >/dev/null 2>&1 || true
  for round in $(seq "$ROUNDS"); do
    for kind in steady switching; do
      file=$OUT/raw-switch-r$round-$kind.txt
      sw_pid=""
      if [ "$kind" = switching ]; then
        "${LOADGEN[@]}" python3 "$ROOT/benches/load/switcher.py" "127.0.0.1:$ADMIN" web \
          $((DURATION * 10)) 0.1 >>"$OUT/switcher.log" 2>&1 &
        sw_pid=$!
        PIDS+=("$sw_pid")
      fi
      c0=$(cpu_ticks "$TARGET_PID")
      line=$(measure switchyard small "$DURATION" "$file")
      c1=$(cpu_ticks "$TARGET_PID")
      if [ -n "$sw_pid" ]; then wait "$sw_pid" 2>/dev/null || true; fi
      read -r rps p50 p99 err reqs <<<"$line"
      cpu=$(awk -v d=$((c1 - c0)) -v hz="$HZ" -v n="$reqs" 'BEGIN { if (n > 0) printf "%.2f", d / hz * 1e6 / n; else print 0 }')
      echo -e "$round\t$w\tswitchyard-$kind\tsmall\t$rps\t$p50\t$p99\t$err\t$cpu\t0\t$(rss_kib "$TARGET_PID")" >>"$RESULTS"
      log "  switch r$round $kind: $rps req/s p50 ${p50}us p99 ${p99}us errors $err cpu/req ${cpu}us"
    done
  done
  changes=$(curl -fsS "http://127.0.0.1:$ADMIN/api/v1/services/web" | python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])')
  log "  routing generation after the switch phase: $changes; switcher: $(grep -h '^ok' "$OUT/switcher.log" | tr '\n' ' ')"
  stop_target
}

# ---------------------------------------------------------------- memory
phase_memory() {
  local w=${MEMORY_WORKERS:-2} idle10k before peak r line up_pid
  place "$w"
  start_target "${MEMORY_TARGET:-switchyard}" "$w"
  sleep 1
  local idle
  idle=$(rss_kib "$TARGET_PID")
  log "  memory: idle RSS ${idle} KiB"

  # IDLE_CONNS idle keep-alive connections, one request each.
  local mark=$OUT/idle-conns.out
  "${LOADGEN[@]}" timeout 120 "$IDLE" "127.0.0.1:$PROXY" "$IDLE_CONNS" 8 >"$mark" 2>&1 &
  local idle_pid=$!
  PIDS+=("$idle_pid")
  local i
  for i in $(seq 600); do
    grep -q '^ready' "$mark" && break
    kill -0 "$idle_pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 2
  idle10k=$(rss_kib "$TARGET_PID")
  local opened
  opened=$(awk '/^ready/ {print $2}' "$mark")
  log "  memory: RSS with ${opened:-0} idle client connections ${idle10k} KiB"
  wait "$idle_pid" 2>/dev/null || true
  sleep 1

  # A streamed upload of UPLOAD_MIB MiB (chunked, from /dev/zero).
  before=$(rss_kib "$TARGET_PID")
  peak=$before
  (head -c $((UPLOAD_MIB * 1024 * 1024)) /dev/zero |
    timeout 300 curl -sS -T - -X POST "http://127.0.0.1:$PROXY/upload" -o "$OUT/upload.out") &
  up_pid=$!
  PIDS+=("$up_pid")
  for i in $(seq 3000); do
    kill -0 "$up_pid" 2>/dev/null || break
    r=$(rss_kib "$TARGET_PID")
    [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.1
  done
  wait "$up_pid" 2>/dev/null || true
  log "  memory: upload of $(tr -d '\n' <"$OUT/upload.out" 2>/dev/null) bytes: RSS before ${before} KiB, peak ${peak} KiB"
  echo -e "memory\t$w\tswitchyard\tidle\t0\t0\t0\t0\t0\t0\t$idle" >>"$RESULTS"
  echo -e "memory\t$w\tswitchyard\tidle_conns_${opened:-0}\t0\t0\t0\t0\t0\t0\t$idle10k" >>"$RESULTS"
  echo -e "memory\t$w\tswitchyard\tupload_growth\t0\t0\t0\t0\t0\t0\t$((peak - before))" >>"$RESULTS"
  stop_target
}

# ---------------------------------------------------------------- main
need_tools
build
log "output in $OUT (ROUNDS=$ROUNDS DURATION=${DURATION}s WORKERS='$WORKERS' CONNS=$CONNS PIN=$PIN)"
{
  echo "date: $(date -Is)"
  echo "kernel: $(uname -r), cpus: $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
  echo "switchyard: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)"
  echo "nginx: $(nginx -v 2>&1)"
  echo "haproxy: $(haproxy -v | head -1)"
  echo "wrk: $(wrk -v 2>&1 | head -1)"
  echo "h2load: $(h2load --version)"
} >"$OUT/env.txt"
for w in $WORKERS; do write_configs "$w"; done
write_configs "${SWITCH_WORKERS:-1}"
write_configs "${MEMORY_WORKERS:-2}"
start_upstream

for phase in $PHASES; do
  log "phase $phase"
  "phase_$phase"
done

python3 "$ROOT/benches/load/summarize.py" "$RESULTS" | tee "$OUT/summary.md"
log "raw rows: $RESULTS; summary: $OUT/summary.md"
