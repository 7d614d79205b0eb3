#!/usr/bin/env bash
# A real browser against kek over HTTPS (issue 21): kek is started with a fresh
# self-signed certificate, and headless Chromium, trusting only that
# certificate's key (by its SPKI hash), loads /api?client=chromium.  Passes
# only when the page holds kek's JSON answer, and kek's log holds that
# request's arrival with its tls facts (TLS 1.2/1.3, the server name
# localhost, alpn_offered naming h2, a JA4) and its answer.  Needs
# chromium-headless-shell or chromium (installed with apt-get if missing) and
# openssl, so it is not part of CI.  Run from anywhere: bash .e2e/https.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

browser=$(command -v chromium-headless-shell || command -v chromium || true)
if [ -z "$browser" ]; then
    echo "e2e-https.sh: installing chromium-headless-shell (apt-get)" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
        chromium-headless-shell >/dev/null
    browser=$(command -v chromium-headless-shell)
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$work/key.pem" -out "$work/cert.pem" -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
spki=$(openssl x509 -in "$work/cert.pem" -pubkey -noout \
    | openssl pkey -pubin -outform der \
    | openssl dgst -sha256 -binary | base64)

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="https://localhost:$port/api?client=chromium"

TLS_CERT="$work/cert.pem" TLS_KEY="$work/key.pem" PORT=$port HOST=127.0.0.1 \
    LOG_FILE="$work/kek.log" "$python" kek.py 2>/dev/null &
pids+=($!)
for _ in $(seq 100); do     # listening, or 10 s have passed
    grep -q 'listening on' "$work/kek.log" 2>/dev/null && break
    sleep 0.1
done

echo "$("$browser" --version 2>/dev/null) loads $url (trusting SPKI $spki)"
dom=$(timeout 60 "$browser" --headless --no-sandbox --disable-gpu \
    --no-first-run --disable-background-networking --disable-component-update \
    --disable-sync --disable-extensions --user-data-dir="$work/profile" \
    --ignore-certificate-errors-spki-list="$spki" \
    --virtual-time-budget=10000 --dump-dom "$url" 2>/dev/null || true)

"$python" - "$work/kek.log" "$dom" <<'PY'
import json, re, sys
log_path, dom = sys.argv[1:]
answer = re.search(r'\{"request": "([^"]+)", "status": "ok"\}', dom)
if not answer:
    print('the page says: ' + (dom[:300] or '(nothing)'))
    sys.exit('FAIL: the page does not hold an ok answer from kek')
key = answer.group(1)
print('the page holds the answer of request ' + key)
lines = open(log_path).read().splitlines()
chain = [line for line in lines if line.startswith(key + ' ')]
print('\n'.join(re.sub(r' headers=\[.*$', ' headers=[...]', line)
                for line in chain))
arrival = [line for line in chain if ' GET /api?client=chromium ' in line]
if not arrival or ' tls=' not in arrival[0]:
    sys.exit('FAIL: no arrival with tls facts for %s in the log' % key)
text = arrival[0]
tls, _ = json.JSONDecoder().raw_decode(text, text.index(' tls=') + 5)
problems = []
if tls.get('version') not in ('TLSv1.2', 'TLSv1.3'):
    problems.append('version %r' % tls.get('version'))
if tls.get('server_name') != 'localhost':
    problems.append('server_name %r' % tls.get('server_name'))
if 'h2' not in (tls.get('alpn_offered') or []):
    problems.append('alpn_offered %r has no h2' % tls.get('alpn_offered'))
if not re.fullmatch(r't1[23]d\w{6}_[0-9a-f]{12}_[0-9a-f]{12}',
                    tls.get('ja4') or ''):
    problems.append('ja4 %r' % tls.get('ja4'))
if not chain[-1].endswith('responded 200 status=ok'):
    problems.append('the last record is not the ok answer')
if problems:
    sys.exit('FAIL: ' + '; '.join(problems))
print('PASS: chromium over %s, %s, alpn %s of %s, ja4 %s' % (
    tls['version'], tls['cipher'], tls['alpn'], tls['alpn_offered'],
    tls['ja4']))
PY
