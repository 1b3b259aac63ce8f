#!/bin/bash
# HEALTHCHECK probe of the switchyard image: GET /healthz on the admin
# listener; exit 0 on a 200 answer, 1 otherwise.
#
# Why bash and /dev/tcp: the runtime image has no curl or wget, and
# `switchyard ctl` has no health subcommand. Installing curl would add a
# few MiB and its CVE stream to the image for one request; bash is already
# in debian:bookworm-slim. Unlike a bare TCP connect, this checks that the
# admin server answers HTTP with 200.
#
# The address comes from SWITCHYARD_ADMIN (the same variable `switchyard
# ctl` reads), default http://127.0.0.1:9901, so setting it once covers
# both when admin.listen is moved.
set -u
admin=${SWITCHYARD_ADMIN:-http://127.0.0.1:9901}
hostport=${admin#http://}
hostport=${hostport%%/*}
host=${hostport%:*}
port=${hostport##*:}
host=${host#[}   # [::1]:9901
host=${host%]}
if ! exec 3<>"/dev/tcp/$host/$port"; then
  echo "healthcheck: cannot connect to $hostport"
  exit 1
fi
printf 'GET /healthz HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$hostport" >&3
# Bounded: HEALTHCHECK --timeout also kills a hung probe.
if ! IFS= read -r -t 2 status <&3; then
  echo "healthcheck: no answer from $hostport"
  exit 1
fi
case $status in
  "HTTP/1."?" 200"*) exit 0 ;;
  *) echo "healthcheck: $hostport/healthz answered: ${status%$'\r'}"; exit 1 ;;
esac
