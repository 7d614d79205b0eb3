#!/bin/bash
# Benchmark one named kek peer with wrk on loopback.
#
#   .bench/run.sh NAME [SCENARIO ...]      NAME: kek, aiohttp_app, twisted_web or flask_dev
#   (kek is started as `python kek.py` from the checkout this .bench/ is in)
#
# Scenarios (default: a b c d), each against a freshly started server:
#   a  keep-alive, 16 connections, 2 wrk threads, GET /api?x=1
#   b  keep-alive, 64 connections, 2 threads, rotating /api?x=1, /api?notawaiting=1, /nope?invalid=1
#   c  "Connection: close" on every request, 16 connections, 2 threads, GET /api?x=1
#   d  1 connection, 1 thread, keep-alive, GET /api?x=1 (latency)
#   e  keep-alive, 16 connections, 2 threads, a webhook-like POST: 5 headers, a 64-byte JSON body
#   f  as a, with an X-Forwarded-For of two hops (for kek_proxied: TRUSTED_PROXIES=127.0.0.1)
#   h  as a, on GET /healthz (for kek_quiet: LOG_SKIP=/healthz)
#   s  as a, over HTTPS (for kek_tls and aiohttp_tls: TLS_CERT, a P-256 certificate)
#   t  as c, over HTTPS: a new connection and TLS handshake for every request
#
# Environment:
#   DURATION=10      seconds of load per scenario (wrk -d)
#   PIN=0|1          1: server on core 0, wrk on core 1 (taskset); 0: both float on both cores
#   PORT=18700       port on 127.0.0.1
#   OUT=DIR          where logs, server output and results.tsv go (default: /tmp/kek-bench/adhoc)
#   TAG=text         free text copied into results.tsv (e.g. the round number)
#   WRK_THREADS=2, WRK_CONNS=16   wrk's threads and connections in a and c (for kek_wn on a big machine)
#
# Prints one line per scenario and appends it to $OUT/results.tsv:
#   server scenario pin rps p50_ms p99_ms non2xx sock_err peak_rss_mib log_lines requests lines_per_req
#   srv_cpu wrk_cpu other_cpu   (% of one core during the load: server tree, wrk, everything
#                                else on the machine -- a check that nothing else competed)
set -u
. "$(dirname "$0")/lib.sh"

name=${1:?usage: run.sh NAME [a b c d]}
shift
scenarios=${*:-a b c d}
DURATION=${DURATION:-10}
PIN=${PIN:-0}
PORT=${PORT:-18700}
OUT=${OUT:-/tmp/kek-bench/adhoc}
TAG=${TAG:-}
WRK_THREADS=${WRK_THREADS:-2}   # a and c only: more on a machine with more cores
WRK_CONNS=${WRK_CONNS:-16}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)   # absolute: the servers run in other folders
server_cmd "$name" >/dev/null || exit 2

if [ "$PIN" = 1 ]; then
    SRV_PIN=(taskset -c 0); WRK_PIN=(taskset -c 1)
else
    SRV_PIN=(); WRK_PIN=()
fi
URL=http://127.0.0.1:$PORT/api?x=1
TSV=$OUT/results.tsv
[ -s "$TSV" ] || printf 'tag\tserver\tscenario\tpin\trps\tp50_ms\tp99_ms\tnon2xx\tsock_err\tpeak_rss_mib\tlog_lines\trequests\tlines_per_req\tsrv_cpu\twrk_cpu\tother_cpu\n' >"$TSV"
HZ=$(getconf CLK_TCK)
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
tree_ticks() { local t=0 p; for p in $(descendants "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
TIMES=$OUT/.times.$$
# CPU seconds of this shell's reaped children (wrk): `times` must run in this shell, not in $(...)
child_secs() { tail -1 "$TIMES" | awk '{ split($1,a,/[ms]/); split($2,b,/[ms]/); print a[1]*60+a[2]+b[1]*60+b[2] }'; }

for sc in $scenarios; do
    case $sc in
        a) WRK_ARGS=(-t"$WRK_THREADS" -c"$WRK_CONNS" -s "$BENCH/scripts/stats.lua" "$URL") ;;
        b) WRK_ARGS=(-t2 -c64 -s "$BENCH/scripts/mixed.lua" "http://127.0.0.1:$PORT") ;;
        c) WRK_ARGS=(-t"$WRK_THREADS" -c"$WRK_CONNS" -H "Connection: close" -s "$BENCH/scripts/stats.lua" "$URL") ;;
        d) WRK_ARGS=(-t1 -c1 -s "$BENCH/scripts/stats.lua" "$URL") ;;
        e) WRK_ARGS=(-t2 -c16 -s "$BENCH/scripts/webhook.lua" "http://127.0.0.1:$PORT") ;;
        f) WRK_ARGS=(-t2 -c16 -H "X-Forwarded-For: 203.0.113.7, 198.51.100.2" -s "$BENCH/scripts/stats.lua" "$URL") ;;
        h) WRK_ARGS=(-t2 -c16 -s "$BENCH/scripts/stats.lua" "http://127.0.0.1:$PORT/healthz") ;;
        s) WRK_ARGS=(-t2 -c16 -s "$BENCH/scripts/stats.lua" "https://127.0.0.1:$PORT/api?x=1") ;;
        t) WRK_ARGS=(-t2 -c16 -H "Connection: close" -s "$BENCH/scripts/stats.lua" "https://127.0.0.1:$PORT/api?x=1") ;;
        *) echo "unknown scenario $sc" >&2; continue ;;
    esac
    log=$OUT/$name.$sc.log
    rm -f "$log"
    start_server "$name" "$PORT" "$log" "$OUT/$name.$sc.server-out" "${SRV_PIN[@]}"
    pid=$SERVER_PID
    SCHEME=http; [ "$name" = aiohttp_tls ] && SCHEME=https
    if ! SCHEME=$SCHEME wait_ready "$PORT" "$pid"; then
        echo "$name $sc: server did not answer" >&2
        stop_server "$pid"
        continue
    fi
    before=$(log_lines "$log")
    times >"$TIMES"; m0=$(busy); s0=$(tree_ticks "$pid"); c0=$(child_secs); t0=$(date +%s.%N)
    wrk_out=$(timeout $((DURATION + 30)) "${WRK_PIN[@]}" wrk "${WRK_ARGS[@]:0:${#WRK_ARGS[@]}-1}" \
              -d"${DURATION}s" --timeout 2s "${WRK_ARGS[-1]}" 2>&1)
    times >"$TIMES"; m1=$(busy); s1=$(tree_ticks "$pid"); c1=$(child_secs); t1=$(date +%s.%N)
    cpu=$(awk -v m=$((m1 - m0)) -v s=$((s1 - s0)) -v c0="$c0" -v c1="$c1" -v t0="$t0" -v t1="$t1" -v hz="$HZ" \
        'BEGIN { dt = t1 - t0; srv = 100 * s / hz / dt; w = 100 * (c1 - c0) / dt; o = 100 * m / hz / dt - srv - w;
                 if (o < 0) o = 0; printf "%.0f\t%.0f\t%.0f", srv, w, o }')
    rss_kib=$(tree_kib "$pid" VmHWM)
    stop_server "$pid"
    after=$(log_lines "$log")
    echo "$wrk_out" >"$OUT/$name.$sc.wrk"
    stat=$(echo "$wrk_out" | grep '^KEKSTAT' || true)
    if [ -z "$stat" ]; then
        echo "$name $sc: wrk gave no result: $(echo "$wrk_out" | tail -2)" >&2
        continue
    fi
    eval "$(echo "${stat#KEKSTAT }" | tr ' ' '\n' | sed 's/^/W_/')"
    line=$(awk -v tag="$TAG" -v s="$name" -v sc="$sc" -v pin="$PIN" -v r="$W_requests" -v d="$W_duration_us" \
        -v p50="$W_p50_us" -v p99="$W_p99_us" -v st="$W_status" \
        -v se=$((W_connect + W_read + W_write + W_timeout)) -v rss="$rss_kib" -v ll=$((after - before)) \
        -v cpu="$cpu" \
        'BEGIN { printf "%s\t%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%d\t%d\t%.1f\t%d\t%d\t%.2f\t%s\n",
                 tag, s, sc, pin, r / (d / 1e6), p50 / 1000, p99 / 1000, st, se, rss / 1024, ll, r, (r ? ll / r : 0), cpu }')
    echo "$line" >>"$TSV"
    echo "$line" | awk -F'\t' '{ printf "%-14s %s pin=%s  %8s req/s  p50 %7s ms  p99 %8s ms  non2xx %-6s sockerr %-5s rss %6s MiB  log %s/%s = %s lines/req  cpu srv/wrk/other %s/%s/%s%%\n",
                                 $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16 }'
done
rm -f "$TIMES"
