# shellcheck shell=bash
# Helpers for run.sh and compare.sh: how to start each named server, wait until it answers,
# measure its process tree, stop it by PID.
BENCH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=${PROJECT:-$(cd "$BENCH/.." && pwd)}  # the kek checkout this .bench/ belongs to
BENCH_VENV=${BENCH_VENV:-/tmp/kek-bench-venv} # the peers' third-party packages live here only
VENV_PY=$BENCH_VENV/bin/python
SYS_PY=${SYS_PY:-python3}
SERVERS_ALL="kek aiohttp_app twisted_web flask_dev"
BENCH_CERT=${BENCH_CERT:-/tmp/kek-bench/tls/cert.pem}  # made by bench_setup, for kek_tls and aiohttp_tls
BENCH_KEY=${BENCH_KEY:-/tmp/kek-bench/tls/key.pem}
TLS_ENV=(env TLS_CERT="$BENCH_CERT" TLS_KEY="$BENCH_KEY")

# setup: wrk from Debian, the peers' packages in their own venv (never the project's)
bench_setup() {
    command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
    if [ ! -s "$BENCH_CERT" ]; then     # one P-256 certificate for every HTTPS server
        mkdir -p "$(dirname "$BENCH_CERT")"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
            -keyout "$BENCH_KEY" -out "$BENCH_CERT" -subj /CN=localhost \
            -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
    fi
    if [ ! -x "$VENV_PY" ]; then
        "$SYS_PY" -m venv "$BENCH_VENV"
        "$VENV_PY" -m pip install -q -r "$BENCH/requirements.txt"
    fi
}

# server_cmd NAME -> sets array CMD (the command that becomes the server PID)
server_cmd() {
    case "$1" in
        kek) CMD=("$SYS_PY" "$PROJECT/kek.py") ;;
        kek_signed) CMD=(env WEBHOOK_SECRET=kek-bench-secret "$SYS_PY" "$PROJECT/kek.py") ;;  # checks webhook.lua's signature
        kek_proxied) CMD=(env TRUSTED_PROXIES=127.0.0.1 "$SYS_PY" "$PROJECT/kek.py") ;;  # reads f's X-Forwarded-For
        kek_quiet) CMD=(env LOG_SKIP=/healthz "$SYS_PY" "$PROJECT/kek.py") ;;  # h's /healthz unlogged
        kek_tls) CMD=("${TLS_ENV[@]}" "$SYS_PY" "$PROJECT/kek.py") ;;  # HTTPS and HTTP on one port
        kek_w2) CMD=(env WORKERS=2 "$SYS_PY" "$PROJECT/kek.py") ;;  # a parent, two workers, each appending to LOG_FILE
        kek_wn) CMD=(env WORKERS="${BENCH_WORKERS:-auto}" "$SYS_PY" "$PROJECT/kek.py") ;;  # WORKERS=BENCH_WORKERS (auto: one a CPU)
        kek_w2_relay) CMD=(env -u LOG_FILE WORKERS=2 "$SYS_PY" "$PROJECT/kek.py") ;;  # the log on standard output: the parent relays each worker's lines
        aiohttp_tls) CMD=("${TLS_ENV[@]}" "$VENV_PY" "$BENCH/peers/aiohttp_app.py") ;;  # HTTPS only
        flask_dev|twisted_web|aiohttp_app) CMD=("$VENV_PY" "$BENCH/peers/$1.py") ;;
        stdlib_loop) CMD=("$SYS_PY" "$BENCH/peers/stdlib_loop.py") ;;   # kek's ceiling: no protections
        *) echo "unknown server: $1 (known: $SERVERS_ALL kek_signed kek_proxied kek_quiet kek_tls aiohttp_tls kek_w2 kek_w2_relay kek_wn stdlib_loop)" >&2; return 1 ;;
    esac
}

# start_server NAME PORT LOG OUTFILE [taskset-prefix...] -> sets SERVER_PID
start_server() {
    local name=$1 port=$2 log=$3 out=$4
    shift 4
    server_cmd "$name" || return 1
    HOST=127.0.0.1 PORT=$port LOG_FILE=$log "$@" "${CMD[@]}" >"$out" 2>&1 &
    SERVER_PID=$!
}

# wait_ready PORT PID -> 0 when GET /api?x=1 answers within 20 s
wait_ready() {
    local port=$1 pid=$2 i
    for i in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || return 1
        curl -sk -o /dev/null --max-time 1 "${SCHEME:-http}://127.0.0.1:$port/api?x=1" && return 0
        sleep 0.1
    done
    return 1
}

# descendants PID -> PID and all its descendants, one per line
descendants() {
    local p=$1 c
    echo "$p"
    for c in $(awk -v p="$p" '$4 == p {print $1}' /proc/[0-9]*/stat 2>/dev/null); do
        descendants "$c"
    done
}

# tree_kib PID FIELD -> sum of FIELD (VmHWM or VmRSS, kB) over the tree
tree_kib() {
    local total=0 p v
    for p in $(descendants "$1"); do
        v=$(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null)
        total=$((total + ${v:-0}))
    done
    echo "$total"
}

# log_lines FILE -> line count once it has stopped growing (asynchronous writers)
log_lines() {
    local a b
    a=$(wc -l <"$1" 2>/dev/null || echo 0)
    while sleep 0.3; b=$(wc -l <"$1" 2>/dev/null || echo 0); [ "$a" != "$b" ]; do a=$b; done
    echo "$a"
}

# stop_server PID: SIGTERM, wait up to 15 s, then SIGKILL; always reaps
stop_server() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "warning: $pid ignored SIGTERM for 15 s, killing" >&2
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    return 0
}
