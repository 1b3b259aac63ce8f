#!/usr/bin/env bash
# A blue/green + canary release through switchyard, as a CI/CD job runs it.
#
#   docs/release.sh SERVICE ADDR [ADDR...]
#
# 1. finds the idle pool of SERVICE (the one taking no traffic);
# 2. deploys: points the idle pool at ADDR... (`ctl set-pool`);
# 3. waits until every new backend passes its health check (`ctl wait-healthy`);
# 4. smoke-tests the new version through the proxy with the preview header,
#    which reaches the idle pool and never the live one;
# 5. ramps traffic to it, STEPS percent at a time (default 10 50 100), pausing
#    PAUSE seconds after each step while it keeps probing the new pool and
#    watching its 5xx ratio in switchyard's own metrics;
# 6. on any failure once traffic has moved: `ctl rollback`, exit 1.
#
# MODE=rollout replaces 5 and 6 by a progressive rollout (README "Progressive
# rollouts", SPEC §10): `ctl rollout start SERVICE --plan PLAN` (a
# [[rollout_plan]] of the proxy's config), then `ctl rollout status SERVICE
# --wait --timeout ROLLOUT_TIMEOUT`. The proxy steps the weights, judges the
# canary against the live pool with its own per-request data and rolls back by
# itself; the script reports how it ended:
#   status exit 0 (succeeded)            -> "released", exit 0
#   status exit 4 (rolled back, aborted) -> the report's reason, exit 1
#   status exit 5 (still running)        -> left running, exit 3
#
# Every change is made with --if-generation, so if a person or another
# pipeline changes the service meanwhile, the next step is refused (412) and
# the job stops without touching what they did.
#
# Exit status: 0 released; 1 failed (rolled back if traffic had moved);
# 2 usage error; 3 (MODE=rollout) the rollout still runs at ROLLOUT_TIMEOUT. Needs bash, curl, jq and the switchyard binary.
#
# Settings (environment):
#   SWITCHYARD        switchyard binary                 (switchyard)
#   SWITCHYARD_ADMIN  admin API URL, read by ctl too    (http://127.0.0.1:9901)
#   SWITCHYARD_TOKEN or SWITCHYARD_TOKEN_FILE           admin token, read by ctl
#   PROXY_URL         where clients reach the service   (http://127.0.0.1:8080)
#   SMOKE_HOST        Host header for smoke requests    (from PROXY_URL)
#   SMOKE_PATHS       paths that must answer 2xx        (/)
#   SMOKE_EXPECT      text every smoke answer must contain (none)
#   PREVIEW_HEADER    the service's [service.preview] header (x-switchyard-pool)
#   PREVIEW_TOKEN     its token, if the service sets one (none)
#   HEALTH_TIMEOUT    how long the new backends may take to become healthy (120s)
#   STEPS             percent of traffic on the new pool, step by step (10 50 100)
#   PAUSE             seconds to watch after each step  (60)
#   CHECK_INTERVAL    seconds between checks during a pause (5)
#   MAX_ERROR_RATIO   5xx ratio of the new pool that aborts (0.05)
#   MIN_REQUESTS      requests needed before the ratio counts (20)
#   VERSION           a label for the history's reasons  (the addresses)
#   MODE              ramp (steps above) or rollout      (ramp)
#   PLAN              MODE=rollout: the rollout plan's name (required)
#   ROLLOUT_TIMEOUT   MODE=rollout: how long to wait for it to end (30m)
set -uo pipefail

SWITCHYARD=${SWITCHYARD:-switchyard}
export SWITCHYARD_ADMIN=${SWITCHYARD_ADMIN:-http://127.0.0.1:9901}
PROXY_URL=${PROXY_URL:-http://127.0.0.1:8080}
SMOKE_PATHS=${SMOKE_PATHS:-/}
SMOKE_EXPECT=${SMOKE_EXPECT:-}
SMOKE_HOST=${SMOKE_HOST:-}
PREVIEW_HEADER=${PREVIEW_HEADER:-x-switchyard-pool}
PREVIEW_TOKEN=${PREVIEW_TOKEN:-}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-120s}
STEPS=${STEPS:-10 50 100}
PAUSE=${PAUSE:-60}
CHECK_INTERVAL=${CHECK_INTERVAL:-5}
MAX_ERROR_RATIO=${MAX_ERROR_RATIO:-0.05}
MIN_REQUESTS=${MIN_REQUESTS:-20}
MODE=${MODE:-ramp}
PLAN=${PLAN:-}
ROLLOUT_TIMEOUT=${ROLLOUT_TIMEOUT:-30m}

log() { printf '%s release: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

if [ $# -lt 2 ]; then
  echo "usage: $0 SERVICE ADDR [ADDR...]" >&2
  exit 2
fi
SERVICE=$1
shift
BACKENDS=("$@")
VERSION=${VERSION:-${BACKENDS[*]}}
for tool in curl jq; do
  command -v "$tool" >/dev/null || { echo "$0: needs $tool" >&2; exit 2; }
done
case $MODE in
  ramp) ;;
  rollout)
    if [ -z "$PLAN" ]; then
      echo "$0: MODE=rollout needs PLAN (the name of a [[rollout_plan]])" >&2
      exit 2
    fi ;;
  *) echo "$0: MODE: \"$MODE\" is neither ramp nor rollout" >&2; exit 2 ;;
esac
for pct in $STEPS; do
  if ! [[ $pct =~ ^[0-9]+(\.[0-9]{1,2})?$ ]] || ! awk -v p="$pct" 'BEGIN { exit !(p > 0 && p <= 100) }'; then
    echo "$0: STEPS: \"$pct\" is not a percentage in (0, 100]" >&2
    exit 2
  fi
done

GENERATION=
# ctl ARGS...: runs `switchyard ctl --json`, keeps the service's new
# generation, prints nothing on success; on failure, ctl's message is on stderr.
ctl() {
  local out
  out=$("$SWITCHYARD" ctl --json "$@") || return 1
  GENERATION=$(jq -r '.generation // empty' <<<"$out")
}

# Undo the traffic moves made so far, unless someone else changed the
# service after our last step (then leave it to them).
MOVED=0
rollback_and_die() {
  log "FAILED: $*"
  if [ "$MOVED" = 1 ]; then
    log "rolling back $SERVICE"
    if "$SWITCHYARD" ctl --if-generation "$GENERATION" \
        --reason "release $VERSION aborted: $*" rollback "$SERVICE" >&2; then
      log "rolled back: all traffic on $LIVE again"
    else
      log "rollback refused (see above); check the service by hand: $SWITCHYARD ctl status $SERVICE"
    fi
  fi
  exit 1
}

# --- 1. which pool is idle? --------------------------------------------------
status=$("$SWITCHYARD" ctl --json status "$SERVICE") || die "cannot read the state of $SERVICE"
LIVE=$(jq -r .live <<<"$status")
GENERATION=$(jq -r .generation <<<"$status")
case $LIVE in
  blue) IDLE=green ;;
  green) IDLE=blue ;;
  *) die "$SERVICE is split ($(jq -c .weights <<<"$status")): a release is already under way; finish or roll it back first" ;;
esac
log "$SERVICE: live pool $LIVE, deploying $VERSION to $IDLE (generation $GENERATION)"

# --- 2. deploy to the idle pool -----------------------------------------------
ctl --if-generation "$GENERATION" --reason "deploy $VERSION" \
  set-pool "$SERVICE" "$IDLE" "${BACKENDS[@]}" || die "set-pool refused"

# --- 3. wait for health ---------------------------------------------------------
"$SWITCHYARD" ctl wait-healthy "$SERVICE" "$IDLE" --timeout "$HEALTH_TIMEOUT" >&2 \
  || die "the new backends did not become healthy; no traffic was moved"

# --- 4. smoke tests through the preview header ----------------------------------
preview=$IDLE
[ -n "$PREVIEW_TOKEN" ] && preview="$IDLE;token=$PREVIEW_TOKEN"
host_args=()
[ -n "$SMOKE_HOST" ] && host_args=(-H "Host: $SMOKE_HOST")

# smoke: every path answers 2xx from the new pool (and the expected text).
smoke() {
  local path body
  for path in $SMOKE_PATHS; do
    body=$(curl -sS --fail --max-time 10 "${host_args[@]}" \
      -H "$PREVIEW_HEADER: $preview" "$PROXY_URL$path") \
      || { log "smoke $path: request failed"; return 1; }
    if [ -n "$SMOKE_EXPECT" ] && [[ $body != *"$SMOKE_EXPECT"* ]]; then
      log "smoke $path: answer lacks \"$SMOKE_EXPECT\": ${body:0:200}"
      return 1
    fi
  done
}
smoke || die "smoke tests of $IDLE failed; no traffic was moved"
log "smoke tests of $IDLE passed"

# --- 5'. MODE=rollout: the proxy steps, watches and rolls back --------------------
if [ "$MODE" = rollout ]; then
  "$SWITCHYARD" ctl --if-generation "$GENERATION" --reason "release $VERSION" \
    rollout start "$SERVICE" --plan "$PLAN" >&2 \
    || die "rollout start refused (see above); no traffic was moved"
  log "rollout of $VERSION to $IDLE started (plan $PLAN); waiting up to $ROLLOUT_TIMEOUT"
  report=$("$SWITCHYARD" ctl --json rollout status "$SERVICE" --wait --timeout "$ROLLOUT_TIMEOUT")
  rc=$?
  state=$(jq -r '.state // "unknown"' <<<"$report" 2>/dev/null)
  reason=$(jq -r '.reason // ""' <<<"$report" 2>/dev/null)
  impact=$(jq -r '"\(.impact.canary_requests // 0) canary requests, \(.impact.user_failures // 0) user failures"' <<<"$report" 2>/dev/null)
  case $rc in
    0)
      log "released $VERSION: $IDLE is live (rollout succeeded; $impact)"
      exit 0 ;;
    4)
      log "FAILED: rollout $state: $reason ($impact)"
      log "all traffic on $LIVE again; the report: $SWITCHYARD ctl rollout status $SERVICE"
      exit 1 ;;
    5)
      log "rollout still $state after $ROLLOUT_TIMEOUT: $reason"
      log "left running; follow it with: $SWITCHYARD ctl rollout status $SERVICE --wait"
      exit 3 ;;
    *)
      die "cannot read the rollout of $SERVICE (ctl exit $rc); check it by hand: $SWITCHYARD ctl rollout status $SERVICE" ;;
  esac
fi

# --- 5. ramp, watching ------------------------------------------------------------
# counts: "TOTAL FIVE_XX" of requests the idle pool answered, from /metrics.
counts() {
  curl -sS --fail --max-time 5 "$SWITCHYARD_ADMIN/metrics" | awk -v s="service=\"$SERVICE\"" -v p="pool=\"$IDLE\"" '
    /^switchyard_requests_total\{/ && index($0, s) && index($0, p) {
      total += $NF; if (index($0, "code=\"5xx\"")) bad += $NF }
    END { printf "%d %d\n", total, bad }'
}

# watch SECONDS: probe and check the error ratio until SECONDS have passed.
watch_for() {
  local until=$((SECONDS + ${1%.*})) base now total bad
  base=$(counts) || return 1
  while :; do
    smoke || return 1
    now=$(counts) || return 1
    read -r total bad <<<"$(awk -v a="$base" -v b="$now" 'BEGIN {
      split(a, x, " "); split(b, y, " "); print y[1] - x[1], y[2] - x[2] }')"
    if [ "$total" -ge "$MIN_REQUESTS" ] &&
      awk -v b="$bad" -v t="$total" -v m="$MAX_ERROR_RATIO" 'BEGIN { exit !(b / t > m) }'; then
      log "$IDLE answered $bad of $total requests with 5xx (limit $MAX_ERROR_RATIO)"
      return 1
    fi
    [ "$SECONDS" -ge "$until" ] && break
    sleep "$CHECK_INTERVAL"
  done
  log "watched $1 s: $total requests on $IDLE, $bad 5xx"
}

for pct in $STEPS; do
  if [ "$pct" = 100 ]; then
    ctl --if-generation "$GENERATION" --reason "release $VERSION: all traffic" \
      switch "$SERVICE" "$IDLE" || rollback_and_die "switch to $IDLE refused"
  else
    green=$pct
    [ "$IDLE" = blue ] && green=$(awk -v p="$pct" 'BEGIN { print 100 - p }')
    ctl --if-generation "$GENERATION" --reason "release $VERSION: $pct %" \
      split "$SERVICE" --green "$green" || rollback_and_die "split to $pct % refused"
  fi
  MOVED=1
  log "$pct % of traffic on $IDLE (generation $GENERATION); watching for $PAUSE s"
  watch_for "$PAUSE" || rollback_and_die "$IDLE misbehaved at $pct %"
done

if [ "${pct:-}" = 100 ]; then
  log "released $VERSION: $IDLE is live (generation $GENERATION)"
else
  log "stopped at ${pct:-0} % on $IDLE as STEPS asks (generation $GENERATION); finish with: $SWITCHYARD ctl switch $SERVICE $IDLE"
fi
