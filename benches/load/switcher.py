#!/usr/bin/env python3
"""Flips switchyard's routing through the admin API every INTERVAL seconds.

usage: switcher.py ADMIN_ADDR SERVICE COUNT [INTERVAL]

Cycles split 10 -> switch green -> split 50 -> switch blue, COUNT calls in
all, over one keep-alive connection. Prints "ok N failed M" at the end.
"""

import http.client
import json
import sys
import time


def main():
    addr, service, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    interval = float(sys.argv[4]) if len(sys.argv) > 4 else 0.1
    host, port = addr.rsplit(":", 1)
    steps = [("split", {"green": 10}), ("switch", {"to": "green"}),
             ("split", {"green": 50}), ("switch", {"to": "blue"})]
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    ok = failed = 0
    start = time.monotonic()
    for i in range(count):
        action, body = steps[i % len(steps)]
        try:
            conn.request("POST", f"/api/v1/services/{service}/{action}", json.dumps(body),
                         {"content-type": "application/json", "x-change-reason": "bench"})
            resp = conn.getresponse()
            resp.read()
            if resp.status == 200:
                ok += 1
            else:
                failed += 1
        except (OSError, http.client.HTTPException):
            failed += 1
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
        # Keep to the schedule: one call every INTERVAL from the start.
        delay = start + (i + 1) * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(f"ok {ok} failed {failed}")


if __name__ == "__main__":
    main()
