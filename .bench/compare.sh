#!/bin/bash
# Side-by-side throughput of kek and its peers, A B A B … so the machine's drift hits all alike.
#
#   .bench/compare.sh [NAME ...]      (from anywhere; default: kek aiohttp_app twisted_web flask_dev)
#   (also stdlib_loop, kek's one-loop ceiling, and kek_signed, kek checking webhook.lua's signature;
#   kek_proxied, kek with TRUSTED_PROXIES=127.0.0.1, for scenario f; kek_quiet, LOG_SKIP=/healthz, for h;
#   kek_tls and aiohttp_tls, each serving HTTPS with one P-256 certificate, for s and t;
#   kek_w2, WORKERS=2 appending to LOG_FILE, and kek_w2_relay, WORKERS=2 with the log on standard output)
#
# Environment: ROUNDS=3, SCEN="a b c d" (see run.sh; e is a webhook-like POST), DURATION=10, PIN=1 (server on core 0,
# wrk on core 1), OUT=/tmp/kek-bench/compare, LOG_FORMAT and
# WEBHOOK_SECRET (kek's: the peers log text and check nothing; webhook.lua's signature is made with
# WEBHOOK_SECRET=kek-bench-secret). Installs wrk
# and the peers' pinned packages (.bench/requirements.txt) on first use, in a venv of their own
# (BENCH_VENV), never the project's. Prints medians and each peer's ratio to kek.
set -u
BENCH=$(cd "$(dirname "$0")" && pwd)
. "$BENCH/lib.sh"
servers=${*:-$SERVERS_ALL}
ROUNDS=${ROUNDS:-3}
SCEN=${SCEN:-a b c d}
export PIN=${PIN:-1} DURATION=${DURATION:-10} PROJECT
OUT=${OUT:-/tmp/kek-bench/compare}
rm -rf "$OUT"; mkdir -p "$OUT"
bench_setup
for r in $(seq "$ROUNDS"); do
    for s in $servers; do
        TAG="round$r" OUT=$OUT "$BENCH/run.sh" "$s" $SCEN
    done
done
echo
"$SYS_PY" "$BENCH/scripts/summary.py" "$OUT/results.tsv"
