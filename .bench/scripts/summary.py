"""Medians over rounds of run.sh rows (results.tsv), and each server's ratio to kek.

    python3 summary.py results.tsv
"""
import collections
import statistics
import sys

SCEN = {"a": "keep-alive, 16 conns", "b": "keep-alive, 64 conns, ok+error mix",
        "c": "Connection: close, 16 conns", "d": "1 conn (latency)",
        "e": "keep-alive, 16 conns, webhook POST: 6 headers (a GitHub signature), 64-byte body"}

rows = collections.defaultdict(list)
with open(sys.argv[1]) as f:
    header = f.readline().rstrip("\n").split("\t")
    for line in f:
        if line.strip():
            r = dict(zip(header, line.rstrip("\n").split("\t")))
            rows[(r["scenario"], r["server"])].append(r)


def med(rs, k):
    return statistics.median(float(r[k]) for r in rs)


for sc in sorted({k[0] for k in rows}):
    print(f"scenario {sc}: {SCEN.get(sc, sc)}")
    base = rows.get((sc, "kek"))
    kek = med(base, "rps") if base else float("nan")
    print(f"  {'server':<12} {'req/s':>8} {'min-max':>15} {'p50 ms':>8} {'p99 ms':>8} {'lines/req':>9} {'RSS MiB':>8} {'kek/this':>9}")
    for (s2, s), rs in sorted(rows.items(), key=lambda kv: -med(kv[1], "rps")):
        if s2 != sc:
            continue
        v = sorted(float(r["rps"]) for r in rs)
        rps = med(rs, "rps")
        print(f"  {s:<12} {rps:>8.0f} {v[0]:>7.0f}-{v[-1]:<7.0f} {med(rs, 'p50_ms'):>8.3f} {med(rs, 'p99_ms'):>8.2f} "
              f"{med(rs, 'lines_per_req'):>9.2f} {med(rs, 'peak_rss_mib'):>8.1f} {kek / rps:>8.2f}x")
    print()
