#!/usr/bin/env python3
"""Summarises benches/load/run.sh rows: medians over rounds, then ratios.

usage: summarize.py results.tsv [more.tsv ...]

Several files (runs of the same binaries) are pooled: every round of
every file counts once in the medians; memory figures come from the last
file that has them.
"""

import csv
import statistics
import sys
from collections import defaultdict


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main(paths):
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(csv.DictReader(f, delimiter="\t"))
    load = defaultdict(lambda: defaultdict(list))
    memory = {}
    switch = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["round"] == "memory":
            memory[r["workload"]] = int(r["rss_kib"])
            continue
        key = (int(r["workers"]), r["target"], r["workload"])
        for f in ("rps", "p50_us", "p99_us", "errors", "cpu_us_per_req", "cpu_util", "rss_kib"):
            try:
                v = float(r[f])
            except ValueError:
                v = float("nan")
            if r["target"].startswith("switchyard-"):
                switch[r["target"]][f].append(v)
            else:
                load[key][f].append(v)

    workloads = ["small", "big", "h2", "close"]
    names = {"small": "small body, keep-alive", "big": "64 KiB body", "h2": "HTTP/2 h2c",
             "close": "new connection per request"}
    out = []
    if load:
        n_rounds = max(len(v["rps"]) for v in load.values())
        out.append(f"## Load (medians over {n_rounds} rounds)\n")
        out.append("| workers | workload | target | req/s | p50 µs | p99 µs | errors | proxy CPU µs/req | CPU cores | RSS MiB |")
        out.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        workers = sorted({k[0] for k in load if k[0] > 0})
        for w in workers:
            for wl in workloads:
                for t in ("direct", "switchyard", "baseline", "nginx", "haproxy"):
                    key = (0 if t == "direct" else w, t, wl)
                    if key not in load:
                        continue
                    m = load[key]
                    out.append(
                        f"| {w} | {names[wl]} | {t} | {med(m['rps']):,.0f} | {med(m['p50_us']):.0f} | "
                        f"{med(m['p99_us']):.0f} | {sum(m['errors']):.0f} | {med(m['cpu_us_per_req']):.1f} | "
                        f"{med(m['cpu_util']):.2f} | {med(m['rss_kib']) / 1024:.1f} |"
                    )
        out.append("")
        out.append("## Ratios (switchyard / other; req/s higher is better, p99 and CPU/req lower is better)\n")
        out.append("| workers | workload | req/s ÷ nginx | req/s ÷ HAProxy | req/s ÷ direct | p99 ÷ nginx | p99 ÷ HAProxy | CPU/req ÷ nginx | CPU/req ÷ HAProxy |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")

        def ratio(w, wl, f, other):
            a = load.get((w, "switchyard", wl))
            b = load.get((0 if other == "direct" else w, other, wl))
            if not a or not b:
                return "–"
            x, y = med(a[f]), med(b[f])
            return f"{x / y:.2f}" if y else "–"

        for w in workers:
            for wl in workloads:
                if (w, "switchyard", wl) not in load:
                    continue
                out.append(
                    f"| {w} | {names[wl]} | {ratio(w, wl, 'rps', 'nginx')} | {ratio(w, wl, 'rps', 'haproxy')} | "
                    f"{ratio(w, wl, 'rps', 'direct')} | {ratio(w, wl, 'p99_us', 'nginx')} | "
                    f"{ratio(w, wl, 'p99_us', 'haproxy')} | {ratio(w, wl, 'cpu_us_per_req', 'nginx')} | "
                    f"{ratio(w, wl, 'cpu_us_per_req', 'haproxy')} |"
                )
        if any(k[1] == "baseline" for k in load):
            out.append("")
            out.append("## A/B: switchyard ÷ baseline binary\n")
            out.append("| workers | workload | req/s | p99 | CPU/req |")
            out.append("| --- | --- | ---: | ---: | ---: |")
            for w in workers:
                for wl in workloads:
                    if (w, "baseline", wl) in load:
                        out.append(f"| {w} | {names[wl]} | {ratio(w, wl, 'rps', 'baseline')} | "
                                   f"{ratio(w, wl, 'p99_us', 'baseline')} | {ratio(w, wl, 'cpu_us_per_req', 'baseline')} |")
        out.append("")
    if switch:
        s, x = switch.get("switchyard-steady"), switch.get("switchyard-switching")
        out.append("## Switch every 100 ms under load (switchyard, small body)\n")
        out.append("| run | req/s | p50 µs | p99 µs | failed or non-2xx | proxy CPU µs/req |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, m in (("no switching", s), ("switch/split every 100 ms", x)):
            if m:
                out.append(f"| {name} | {med(m['rps']):,.0f} | {med(m['p50_us']):.0f} | {med(m['p99_us']):.0f} | "
                           f"{sum(m['errors']):.0f} | {med(m['cpu_us_per_req']):.1f} |")
        if s and x:
            out.append("")
            out.append(f"switching ÷ steady: req/s {med(x['rps']) / med(s['rps']):.3f}, "
                       f"p99 {med(x['p99_us']) / med(s['p99_us']):.3f}")
        out.append("")
    if memory:
        out.append("## Memory (switchyard RSS)\n")
        out.append("| measure | MiB |")
        out.append("| --- | ---: |")
        for k, v in memory.items():
            label = {"idle": "idle", "upload_growth": "growth during the streamed upload"}.get(k, k)
            if k.startswith("idle_conns_"):
                label = f"with {k[len('idle_conns_'):]} idle keep-alive client connections"
            out.append(f"| {label} | {v / 1024:.1f} |")
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
