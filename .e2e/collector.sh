#!/usr/bin/env bash
# Many machines, one store (issue 22): two keks (INSTANCE=web1 and web2) of two
# workers each write JSON lines to their own LOG_FILE; rsyslog (Debian's
# package: imfile on both files, mmjsonparse, maxMessageSize raised from its
# 8 KiB default, which silently drops a longer record) carries them into one
# merged store.  Clients send each kek plain GETs with a traceparent, and
# POSTs whose 20 KB bodies are shown whole (LOG_BODY=65536: records past
# rsyslog's default limit).  Passes only when
# a query by key on the merged store gives, for every request, its whole
# story and nothing else (each record exactly as its kek wrote it), both
# workers of each kek served, and no key names two requests.  Needs
# rsyslogd (installed with apt-get if missing), so it is not part of CI.
# Run from anywhere: bash .e2e/collector.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}

rsyslogd=$(command -v rsyslogd || true)
if [ -z "$rsyslogd" ]; then
    echo "collector.sh: installing rsyslog (apt-get)" >&2
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq rsyslog >/dev/null
    rsyslogd=$(command -v rsyslogd)
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/spool"
touch "$work/web1.jsonl" "$work/web2.jsonl"

cat > "$work/rsyslog.conf" <<EOF
global(workDirectory="$work/spool" maxMessageSize="256k")
module(load="imfile")
module(load="mmjsonparse")
template(name="line" type="string" string="%msg%\n")
ruleset(name="kek") {
    action(type="mmjsonparse" cookie="")
    if \$parsesuccess == "OK" then
        action(type="omfile" file="$work/store.jsonl" template="line")
}
input(type="imfile" file="$work/web1.jsonl" tag="kek" ruleset="kek")
input(type="imfile" file="$work/web2.jsonl" tag="kek" ruleset="kek")
EOF
"$rsyslogd" -n -f "$work/rsyslog.conf" -i "$work/rsyslog.pid" &
pids+=($!)

ports=()
for instance in web1 web2; do
    port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    INSTANCE=$instance WORKERS=2 LOG_FORMAT=json LOG_BODY=65536 LOG_FILE="$work/$instance.jsonl" \
        HOST=127.0.0.1 PORT=$port "$python" kek.py 2>"$work/$instance.err" &
    pids+=($!)
    ports+=("$port")
done

"$python" - "$work" "${ports[@]}" <<'EOF'
import http.client, json, os, sys, threading, time

work, ports = sys.argv[1], [int(port) for port in sys.argv[2:]]
for port in ports:                      # both keks answer
    deadline = time.monotonic() + 10
    while True:
        try:
            http.client.HTTPConnection('127.0.0.1', port, timeout=1).connect()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit('collector.sh: kek on port %d did not start' % port)
            time.sleep(0.05)

def client(port, n):
    for i in range(n):
        conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
        if i % 5 == 0:
            conn.request('POST', '/api?i=%d' % i, body='x' * 20000,
                         headers={'Content-Type': 'text/plain'})
        else:
            conn.request('GET', '/api?i=%d' % i, headers={
                'traceparent': '00-0af7651916cd43dd8448eb211c80319c-'
                               'b7ad6b716920%04x-01' % i})
        answer = conn.getresponse()
        answer.read()
        assert answer.status == 200
        conn.close()

threads = [threading.Thread(target=client, args=(port, 100))
           for port in ports for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
EOF

for pid in "${pids[@]:1}"; do kill -TERM "$pid"; done     # the keks
for pid in "${pids[@]:1}"; do wait "$pid"; done

"$python" - "$work" <<'EOF'
import collections, json, sys, time

work = sys.argv[1]
written = []
for instance in ('web1', 'web2'):
    with open('%s/%s.jsonl' % (work, instance)) as log:
        written += [line.rstrip('\n') for line in log]
deadline = time.monotonic() + 30        # until rsyslog has carried them all
while True:
    try:
        with open(work + '/store.jsonl') as store:
            stored = [line.rstrip('\n') for line in store]
    except FileNotFoundError:
        stored = []
    if len(stored) >= len(written) or time.monotonic() > deadline:
        break
    time.sleep(0.2)

def by_key(lines):
    stories = collections.defaultdict(list)
    for line in lines:
        record = json.loads(line)
        if record['request'] is not None:
            stories[record['request']].append(line)
    return stories

kept, merged = by_key(written), by_key(stored)
failures = []
if len(stored) != len(written):
    failures.append('%d records written, %d in the store'
                    % (len(written), len(stored)))
for key, story in kept.items():
    # The query by key: every record of the store whose request is key.
    if merged.get(key) != story:
        failures.append('%s: %d records written, the store gives %d'
                        % (key, len(story), len(merged.get(key, []))))
served = collections.defaultdict(set)
requests = 0
for key, story in merged.items():
    records = [json.loads(line) for line in story]
    arrival = records[0]
    requests += 1
    served[arrival['instance']].add(arrival['worker'])
    if not key.endswith('~' + arrival['instance']):
        failures.append('%s: not the key of %s' % (key, arrival['instance']))
    if [r['where'] for r in records][-1:] != ['query'] or not \
            records[-1]['message'].startswith('responded 200'):
        failures.append('%s: its story does not end with its answer' % key)
    if sum(r.get('method') is not None for r in records) != 1:
        failures.append('%s: names %d requests' % (key, sum(
            r.get('method') is not None for r in records)))
longest = max(len(line) for line in stored)
print('collector.sh: %d records from 2 keks of 2 workers in one store, %d'
      ' requests, the longest record %d bytes; workers that served: %s'
      % (len(stored), requests, longest,
         ', '.join('%s %s' % (name, sorted(workers))
                   for name, workers in sorted(served.items()))))
if any(len(workers) < 2 for workers in served.values()) or len(served) != 2:
    failures.append('not every worker of each kek served')
for failure in failures[:20]:
    print('FAIL ' + failure)
if failures:
    sys.exit(1)
key = sorted(merged)[0]
print('query by key %s: %d records, its whole story:' % (key, len(merged[key])))
for line in merged[key]:
    record = json.loads(line)
    print('  %s %s %s' % (record['where'], record['level'], record['message']))
print('PASS')
EOF
