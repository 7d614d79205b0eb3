#!/usr/bin/env bash
# A real browser against kek (issue 15): a page served from one origin PUTs a
# JSON body with a custom header to kek on another origin, so the browser
# sends a preflight first.  Passes only when the page read X-Request-Id from
# kek's answer, and kek's log holds that request's whole chain after its
# preflight's.  Needs Debian's chromium (installed with apt-get if missing),
# so it is not part of CI.  Run from anywhere: bash .e2e/browser.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

if ! command -v chromium >/dev/null; then
    echo "browser.sh: installing chromium (apt-get)" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
kek_port=$(free_port)
page_port=$(free_port)
kek_url="http://127.0.0.1:$kek_port"
page_origin="http://localhost:$page_port"       # another origin than kek's

PORT=$kek_port HOST=127.0.0.1 LOG_FILE="$work/kek.log" "$python" kek.py 2>/dev/null &
pids+=($!)
mkdir "$work/site"
cat > "$work/site/index.html" <<HTML
<!doctype html>
<title>kek from a browser</title>
<pre id="result">waiting</pre>
<script>
const show = text => { document.getElementById('result').textContent = text; };
fetch('$kek_url/api?from=browser', {
    method: 'PUT',
    headers: {'Content-Type': 'application/json', 'X-Trace-Id': 'trace-42'},
    body: JSON.stringify({hello: 'kek'}),
}).then(answer => answer.json().then(body => show(
    'status=' + answer.status + ' key=' + answer.headers.get('X-Request-Id')
    + ' body.request=' + body.request)))
  .catch(error => show('failed: ' + error));
</script>
HTML
"$python" -m http.server "$page_port" --bind 127.0.0.1 --directory "$work/site" \
    >/dev/null 2>&1 &
pids+=($!)

for _ in $(seq 100); do     # both listening, or 10 s have passed
    if grep -q 'listening on' "$work/kek.log" 2>/dev/null \
            && "$python" -c "import socket; socket.create_connection(('127.0.0.1', $page_port)).close()" 2>/dev/null; then
        break
    fi
    sleep 0.1
done

echo "page $page_origin/ calls kek at $kek_url with $(chromium --version 2>/dev/null)"
dom=$(timeout 60 chromium --headless --no-sandbox --disable-gpu \
    --no-first-run --disable-background-networking --disable-component-update \
    --disable-sync --disable-extensions --user-data-dir="$work/profile" \
    --virtual-time-budget=10000 --dump-dom "$page_origin/" 2>/dev/null)

"$python" - "$work/kek.log" "$dom" "$page_origin" <<'PY'
import re, sys
log_path, dom, origin = sys.argv[1:]
result = re.search(r'<pre id="result">(.*?)</pre>', dom)
result = result.group(1) if result else '(no page)'
print('the page says: ' + result)
read = re.fullmatch(r'status=200 key=(\S+) body\.request=(\S+)', result)
if not read or read.group(1) != read.group(2):
    sys.exit('FAIL: the page did not read X-Request-Id from the answer')
key = read.group(1)
lines = open(log_path).read().splitlines()
chain = [n for n, line in enumerate(lines) if line.startswith(key + ' ')]
said = 'preflight for PUT from %s, headers content-type, x-trace-id' % origin
preflights = [line.split(' ', 1)[0] for line in lines if line.endswith(said)]
if not preflights:
    sys.exit('FAIL: no preflight in the log: ' + said)
before = [n for n, line in enumerate(lines)
          if line.startswith(preflights[-1] + ' ')]
print('\n'.join(lines[n] for n in before + chain))
if not (chain and ' PUT /api?from=browser ' in lines[chain[0]]
        and lines[chain[-1]].endswith('responded 200 status=error')):
    sys.exit('FAIL: the PUT request has no whole chain in the log')
if not (before[-1] < chain[0]
        and lines[before[-1]].endswith('responded 200 status=error')):
    sys.exit("FAIL: the preflight's chain does not come whole before the PUT's")
print('PASS: preflight %s, then PUT %s read by the page' % (preflights[-1], key))
PY
