"""What hostile clients cost kek, measured against `python kek.py` on loopback.

    python3 .bench/hostile.py SCENARIO ...     (from anywhere; all by default)

  pipeline  8 clients each keep 2,000 pipelined GETs in flight; meanwhile a
            ninth client's latency, one request at a time
  heads     8 clients send 64 KiB heads of \\xff bytes, one after another;
            the ninth client's latency
  trickle   90 clients trickle bodies (a byte every 5 s) at RLIMIT_NOFILE=64;
            how long a new client then waits for its answer
  bodies    300 clients send a 1 MiB body each at once, LOG_BODY=65536 (the
            largest); kek's peak RSS
  memory    what one connection costs, 1,000 at a time, in each of its
            states: idle after a request, an unfinished 64 KiB head, a slow
            reader, a body in flight at LOG_BODY=65536
  parse     how long kek takes to answer a 64 KiB head of each of several
            bytes, and how much log that head writes
  shapes    how long kek takes to answer each hostile shape alone (SHAPES
            below: heads of JSON, of secret names, of %%41; bodies of
            multipart parts, of 1-byte chunks, of signed newline chunks
            with WEBHOOK_SECRET=s, of deep or secret JSON and of password=
            text with LOG_BODY=65536), the median of a few sends on new
            connections, next to the plainest input of its size on the wire
            (a head of `a` in a query; a Content-Length body of `a`), and
            the ratio
  beside    4 clients each send one of the worst shapes (BESIDE) back to
            back; a fifth client's latency, one plain GET at a time
  names     4,200 requests, each with a new 60 KB header name of random
            letters; kek's RSS before, after, and after a pause
  halfopen  TLS_CERT set (a P-256 certificate made with openssl): 1,000
            clients each send a whole hello and never answer kek's; kek's
            RSS before and with them open, and how many it kept
  handshakes  4 clients make a new TLS connection for each GET, back to back;
            another client's latency, plain GETs on one connection
  junkhello  200 connections each send 0x16 and junk, then 200 send half a
            hello and stall until the head deadline: what kek said, and how
            long it took

kek runs pinned to core 0 and the clients to core 1 (taskset), as in run.sh.
Each scenario starts its own kek (one for each setting it needs) and prints
one line of figures (a line for each case).  KEK names the kek.py to run
(default: ../kek.py), e.g. the committed one:

    git show HEAD:kek.py > /tmp/kek_base.py
    KEK=/tmp/kek_base.py python3 .bench/hostile.py shapes beside names

Every load is bounded in count and in time, targets 127.0.0.1 only, and
every process started is ended when the script ends, even on an error.
"""

import atexit
import base64
import ctypes
import hmac
import ssl
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

KEK = os.environ.get('KEK') or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', 'kek.py')
GET = b'GET /api?x=1 HTTP/1.1\r\nHost: x\r\n\r\n'
ATTACK_SECONDS = 120        # an attacker ends itself after this, whatever happens
STARTED = []                # every process started, ended at exit


def die_with_parent():
    """In a child, before exec: be killed if this script dies, even by
    SIGKILL (PR_SET_PDEATHSIG survives the exec of taskset and python)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def end_all():
    for process in STARTED:
        if process.poll() is None:
            process.kill()
            process.wait()
    del STARTED[:]


class Kek:
    """`python kek.py` on a free port of 127.0.0.1, on core 0."""

    def __init__(self, nofile=4096, **env):
        self.log = tempfile.mktemp(prefix='kek-hostile-', suffix='.log')
        environ = dict(os.environ, HOST='127.0.0.1', PORT='0',
                       LOG_FILE=self.log, **env)

        def limits():
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
            die_with_parent()
        self.proc = subprocess.Popen(
            ['taskset', '-c', '0', sys.executable, KEK], env=environ,
            stderr=subprocess.PIPE, text=True, preexec_fn=limits)
        STARTED.append(self.proc)
        line = self.proc.stderr.readline()
        found = re.search(r':(\d+),', line)
        if not found:
            self.stop()
            raise RuntimeError('%s did not start: %s' % (KEK, line.strip()))
        # Drain its standard error, so that kek never blocks on it.
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()
        self.port = int(found.group(1))
        self.address = ('127.0.0.1', self.port)

    def rss_kib(self, field='VmRSS'):
        with open('/proc/%d/status' % self.proc.pid) as status:
            return int(re.search(r'%s:\s+(\d+)' % field, status.read()).group(1))

    def stop(self):
        """End kek (again is harmless); the bytes of log it wrote."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            size = os.path.getsize(self.log)
            os.unlink(self.log)
        except OSError:
            size = 0
        return size


def request(sock, data=GET):
    """Send data and read one answer; the seconds it took."""
    started = time.perf_counter()
    sock.sendall(data)
    answer = b''
    while b'}\n' not in answer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError('closed')
        answer += chunk
    return time.perf_counter() - started


def latencies(kek, seconds):
    """A client's round trips, one request at a time, for seconds."""
    times = []
    with socket.create_connection(kek.address) as sock:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            times.append(request(sock))
    return times


def summary(times):
    times = sorted(times)
    return 'median %.1f ms, p90 %.1f ms, %d requests' % (
        1000 * statistics.median(times), 1000 * times[len(times) * 9 // 10],
        len(times))


def attackers(code, count, *args):
    """count processes running code (a function below), at a lower priority
    than the measuring client, on core 1."""
    processes = [subprocess.Popen(['taskset', '-c', '1', 'nice', '-n', '10',
                                   sys.executable, __file__, '--attack', code]
                                  + [str(arg) for arg in args],
                                  preexec_fn=die_with_parent)
                 for _ in range(count)]
    STARTED.extend(processes)
    return processes


def attack_pipeline(port):
    """Keep 2,000 pipelined GETs in flight, reading the answers."""
    sock = socket.create_connection(('127.0.0.1', int(port)))
    batch = GET * 2000

    def read():
        while sock.recv(1 << 20):
            pass
    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + ATTACK_SECONDS
    while time.monotonic() < deadline:
        sock.sendall(batch)


def attack_heads(port):
    """Send 64 KiB heads of \\xff, one after another, reading the answers."""
    head = b'GET /' + b'\xff' * 65000 + b' HTTP/1.1\r\nHost: x\r\n\r\n'
    sock = socket.create_connection(('127.0.0.1', int(port)))
    deadline = time.monotonic() + ATTACK_SECONDS
    while time.monotonic() < deadline:
        request(sock, head)


def stop_all(processes):
    for process in processes:
        process.kill()
        process.wait()


def beside(attack, count=8, args=(), seconds=10, **env):
    """Another client's latencies over seconds while count clients run
    attack (with args after the port) against a kek with env, and the
    bytes of log kek wrote."""
    kek = Kek(**env)
    try:
        swarm = attackers(attack, count, kek.port, *args)
        try:
            time.sleep(2)           # the attack under way
            times = latencies(kek, seconds)
        finally:
            stop_all(swarm)
    finally:
        log = kek.stop()
    return times, log


def pipeline():
    times, log = beside('attack_pipeline')
    print('pipeline: 8 clients with 2,000 pipelined GETs each in flight;'
          ' another client:', summary(times))


def heads():
    times, log = beside('attack_heads')
    print('heads: 8 clients sending 64 KiB heads of \\xff; another client:',
          summary(times), '(log %.1f MB)' % (log / 1e6))


def trickle():
    kek = Kek(nofile=64)
    clients = []
    for _ in range(90):
        try:
            sock = socket.create_connection(kek.address, timeout=5)
            sock.sendall(b'POST /api HTTP/1.1\r\nHost: x\r\n'
                         b'Content-Length: 100000\r\n\r\n')
            clients.append(sock)
        except OSError:
            pass

    def trickling():
        while clients:
            for sock in list(clients):
                try:
                    sock.send(b'x')
                except OSError:
                    clients.remove(sock)
            time.sleep(5)
    threading.Thread(target=trickling, daemon=True).start()
    time.sleep(3)
    waits = []
    for _ in range(5):
        started = time.perf_counter()
        with socket.create_connection(kek.address, timeout=30) as sock:
            request(sock)
        waits.append(time.perf_counter() - started)
        time.sleep(1)
    log = open(kek.log).read()
    kek.stop()
    print('trickle: 90 clients trickling bodies at RLIMIT_NOFILE=64: a new'
          ' client answered in %s ms; %d closed to make room, %d cut as too'
          ' slow' % (', '.join('%.0f' % (1000 * wait) for wait in waits),
                     log.count('make room'), log.count('too slow')))


def bodies():
    kek = Kek(LOG_BODY='65536')
    body = b'x' * (1 << 20)
    head = (b'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n'
            % len(body))
    selector = selectors.DefaultSelector()
    for _ in range(300):
        sock = socket.create_connection(kek.address)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_WRITE, memoryview(head + body))
    started = time.monotonic()
    left = 300
    while left:
        for key, _ in selector.select(1):
            data = key.data
            sent = key.fileobj.send(data[:65536])
            if sent == len(data):
                selector.unregister(key.fileobj)
                left -= 1
            else:
                selector.modify(key.fileobj, selectors.EVENT_WRITE,
                                data[sent:])
    sent_in = time.monotonic() - started
    time.sleep(1)
    peak = kek.rss_kib('VmHWM')
    log = open(kek.log).read()
    kek.stop()
    print('bodies: 300 bodies of 1 MiB at once, LOG_BODY=65536: sent in'
          ' %.1f s, %d body records; kek peak RSS %.1f MiB'
          % (sent_in, log.count(' body 1048576 bytes'), peak / 1024))


def memory():
    states = [
        ('idle after a request', {}, GET),
        ('an unfinished 64 KiB head', {},
         b'GET /' + b'a' * (64 * 1024 - 10)),
        ('a slow reader (answers pending)', {}, None),
        ('a body in flight, LOG_BODY=65536', {'LOG_BODY': '65536'},
         b'POST /api HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n'
         + b'x' * 70000),
    ]
    for name, env, data in states:
        kek = Kek(**env)
        time.sleep(0.5)
        before = kek.rss_kib()
        socks = []
        for _ in range(1000):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(kek.address)
            if data is None:        # pipelined requests it never reads
                sock.setblocking(False)
                try:
                    sock.send(GET * 2000)
                except BlockingIOError:
                    pass
            else:
                sock.sendall(data)
            socks.append(sock)
        time.sleep(3)
        after = kek.rss_kib()
        for sock in socks:
            sock.close()
        kek.stop()
        print('memory: 1,000 connections, %s: %.1f KiB each (RSS %.1f to'
              ' %.1f MiB)' % (name, (after - before) / 1000, before / 1024,
                             after / 1024))


def parse():
    kek = Kek()
    with socket.create_connection(kek.address) as warm:
        request(warm)
    for name, filler in (('\\xff', b'\xff'), ('blanks', b' '), ('%', b'%'),
                         ('%41', b'%41'), ('%%41', b'%%41'),
                         ('%e2%80%ae', b'%e2%80%ae'),
                         ('a=%ff&', b'a=%ff&'), ('\\u202e', '\u202e'.encode()),
                         ('a', b'a')):
        target = b'/api?' + filler * (64000 // len(filler))
        head = b'GET ' + target + b' HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
        size = os.path.getsize(kek.log)
        with socket.create_connection(kek.address) as sock:
            took = request(sock, head)
        time.sleep(0.3)
        print('parse: a %d-byte head of %s answered in %.1f ms, %.1f KiB of'
              ' log' % (len(head), name, 1000 * took,
                        (os.path.getsize(kek.log) - size) / 1024))
    kek.stop()


# -- Hostile shapes: inputs that cost kek more per byte than plain ones -------

HEAD_BYTES = 64000          # a head's size, request line and headers (< 64 KiB)
BODY_BYTES = 1 << 20        # MAX_BODY_BYTES
CHUNKED_BYTES = 128 << 10   # a chunked body, framing included
SECRET = b's'               # WEBHOOK_SECRET of the signed shape
SETTINGS = {'default': {}, 'signed': {'WEBHOOK_SECRET': SECRET.decode()},
            'log_body': {'LOG_BODY': '65536'}}


def repeat(unit, size, end=b''):
    """unit as many times as fit in size bytes with end after it."""
    return unit * ((size - len(end)) // len(unit)) + end


def get_head(target, size=HEAD_BYTES):
    """A GET head of size bytes: target(room) makes its target, room bytes
    long at most."""
    start, end = b'GET ', b' HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n'
    return start + target(size - len(start) - len(end)) + end


def post(body, headers=b'', chunked=False):
    return (b'POST /api HTTP/1.1\r\nHost: x\r\n' + headers
            + (b'Transfer-Encoding: chunked\r\n' if chunked
               else b'Content-Length: %d\r\n' % len(body))
            + b'Connection: close\r\n\r\n' + body)


def plain_of(data):
    """The plainest request of data's size on the wire: a head of `a` in a
    query for a head, a Content-Length body of `a` as long as its body (its
    framing included) for a body."""
    head, _, body = data.partition(b'\r\n\r\n')
    if not body:
        return get_head(lambda room: b'/api?' + b'a' * (room - 5), len(data))
    return post(b'a' * len(body))


def shape_json(room):
    return b'/api?v={' + repeat(b'"":0,', room - 8, b'"key":1}')


def shape_json_quoted(room):
    unit = urllib.parse.quote('"":0,', safe='').encode()
    end = urllib.parse.quote('"key":1}', safe='').encode()
    return b'/api?v=%7B' + repeat(unit, room - 10, end)


def signed_newline_chunks():
    """1-byte newline chunks, with every signature header kek reads, each
    well formed and matching the body under WEBHOOK_SECRET=s."""
    body = repeat(b'1\r\n\n\r\n', CHUNKED_BYTES, b'0\r\n\r\n')
    content = b'\n' * ((CHUNKED_BYTES - 5) // 6)
    stamp = b'%d' % time.time()

    def mac(data, digest='sha256'):
        return hmac.new(SECRET, data, digest)

    def b64(data):
        return base64.b64encode(mac(data).digest())
    headers = [
        (b'X-Hub-Signature-256', b'sha256=' + mac(content).hexdigest().encode()),
        (b'X-Hub-Signature', b'sha1=' + mac(content, 'sha1').hexdigest().encode()),
        (b'X-Gitlab-Token', SECRET),
        (b'Stripe-Signature', b't=%s,v1=%s' % (
            stamp, mac(stamp + b'.' + content).hexdigest().encode())),
        (b'X-Slack-Request-Timestamp', stamp),
        (b'X-Slack-Signature', b'v0=' + mac(
            b'v0:' + stamp + b':' + content).hexdigest().encode()),
        (b'X-Shopify-Hmac-Sha256', b64(content)),
        (b'webhook-id', b'msg_1'), (b'webhook-timestamp', stamp),
        (b'webhook-signature', b'v1,' + b64(b'msg_1.' + stamp + b'.' + content)),
        (b'svix-id', b'msg_2'), (b'svix-timestamp', stamp),
        (b'svix-signature', b'v1,' + b64(b'msg_2.' + stamp + b'.' + content)),
        (b'Paddle-Signature', b'ts=%s;h1=%s' % (
            stamp, mac(stamp + b':' + content).hexdigest().encode())),
    ]
    return post(body, b'Content-Type: application/json\r\n'
                + b''.join(b'%s: %s\r\n' % pair for pair in headers), True)


MULTIPART = b'Content-Type: multipart/form-data; boundary=b\r\n'
JSON = b'Content-Type: application/json\r\n'
# name: (the kek's settings, the request).  Each is its size on the wire:
# a 64 KiB head, a 1 MiB body, or 128 KiB of chunked body.
SHAPES = {
    'json-head': ('default', lambda: get_head(shape_json)),
    'json-head-quoted': ('default', lambda: get_head(shape_json_quoted)),
    'secret-params': ('default', lambda: get_head(
        lambda room: b'/api?' + repeat(b'token=1&', room - 5))),
    '%%41-head': ('default', lambda: get_head(
        lambda room: b'/api?' + repeat(b'%%41', room - 5))),
    'multipart-empty': ('default', lambda: post(
        repeat(b'--b\r\n\r\n\r\n', BODY_BYTES, b'--b--\r\n'), MULTIPART)),
    'multipart-headed': ('default', lambda: post(repeat(
        b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n\r\n',
        BODY_BYTES, b'--b--\r\n'), MULTIPART)),
    '1-byte-chunks': ('default', lambda: post(
        repeat(b'1\r\nx\r\n', CHUNKED_BYTES, b'0\r\n\r\n'), chunked=True)),
    'signed-newline-chunks': ('signed', signed_newline_chunks),
    'json-deep': ('log_body', lambda: post(
        b'{"a":' * ((BODY_BYTES - 1) // 6) + b'1'
        + b'}' * ((BODY_BYTES - 1) // 6), JSON)),
    'json-secret-keys': ('log_body', lambda: post(
        b'[' + repeat(b'{"key":"x"},', BODY_BYTES - 1, b'{"key":"x"}]'), JSON)),
    'password-text': ('log_body', lambda: post(
        repeat(b'password=x ', BODY_BYTES),
        b'Content-Type: text/plain\r\n')),
}
# The shapes the beside scenario loads kek with: the worst of the issue's
# and of the shapes scenario's, 8 s each (2 to start, 6 measured).
BESIDE = ('json-head', 'json-head-quoted', 'json-secret-keys',
          'multipart-empty', '1-byte-chunks', 'signed-newline-chunks')


def exchange(address, data, timeout=30):
    """Send data on a new connection, reading as it goes: the seconds until
    the answer's JSON body ended (or kek closed the connection), and what
    was answered.  kek may answer before all is sent (a refusal): the rest
    is then never sent."""
    sock = socket.create_connection(address, timeout=timeout)
    sock.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    view, answer = memoryview(data), b''
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for key, events in selector.select(1):
                if events & selectors.EVENT_READ:
                    try:
                        chunk = sock.recv(65536)
                    except BlockingIOError:
                        chunk = None
                    except OSError:         # reset: kek closed on us
                        chunk = b''
                    if chunk == b'':
                        return time.perf_counter() - started, answer
                    if chunk:
                        answer += chunk
                        if b'}\n' in answer:
                            return time.perf_counter() - started, answer
                if events & selectors.EVENT_WRITE and view:
                    try:
                        view = view[sock.send(view[:1 << 18]):]
                    except BlockingIOError:
                        pass
                    except OSError:         # closed by kek: read what came
                        view = view[:0]
                    if not view:
                        selector.modify(sock, selectors.EVENT_READ)
        raise TimeoutError('no answer in %d s' % timeout)
    finally:
        selector.close()
        sock.close()


def said(answer):
    """What the answer was: ok, its first error (a POST's is 'method POST
    is not allowed'; a refusal's says why), or none (closed unanswered)."""
    found = re.search(rb'"status": "(\w+)"(?:, "errors": \["([^"]*))?', answer)
    if not found:
        return 'none'
    return found.group(2).decode() if found.group(2) else found.group(1).decode()


def shapes(sends=5):
    for settings in SETTINGS:
        kek = Kek(**SETTINGS[settings])
        try:
            for name, (where, build) in SHAPES.items():
                if where != settings:
                    continue
                data = build()
                plain = plain_of(data)
                exchange(kek.address, plain), exchange(kek.address, data)
                took, plain_took, answers = [], [], set()
                for _ in range(sends):      # in turn: the noise hits both
                    seconds, answer = exchange(kek.address, data)
                    took.append(seconds)
                    answers.add(said(answer))
                    plain_took.append(exchange(kek.address, plain)[0])
                ms, plain_ms = (1000 * statistics.median(took),
                                1000 * statistics.median(plain_took))
                print('shapes: %s (%d bytes%s): %.1f ms, plain %.1f ms,'
                      ' %.1fx (answered %s)'
                      % (name, len(data), ', ' + ' '.join(
                          '%s=%s' % item for item in SETTINGS[settings].items())
                          if settings != 'default' else '', ms, plain_ms,
                          ms / plain_ms, ' | '.join(sorted(answers))),
                      flush=True)
        finally:
            kek.stop()


def attack_shape(port, name):
    """Send the shape name, one after another, a new connection each."""
    data = SHAPES[name][1]()
    deadline = time.monotonic() + ATTACK_SECONDS
    while time.monotonic() < deadline:
        try:
            exchange(('127.0.0.1', int(port)), data)
        except OSError:
            time.sleep(0.01)


def beside_shapes():
    for name in BESIDE:
        times, log = beside('attack_shape', 4, (name,), 6,
                            **SETTINGS[SHAPES[name][0]])
        print('beside: 4 clients sending %s back to back; another client:'
              % name, summary(times), '(log %.1f MB)' % (log / 1e6),
              flush=True)


def names(count=4200, seconds=45):
    kek = Kek()
    try:
        time.sleep(0.5)
        before = kek.rss_kib()
        letters = bytes(ord('a') + byte % 26 for byte in range(256))
        started = time.monotonic()
        sent = 0
        while sent < count and time.monotonic() - started < seconds:
            name = os.urandom(60000).translate(letters)
            exchange(kek.address, b'GET /api HTTP/1.1\r\nHost: x\r\n' + name
                     + b': 1\r\nConnection: close\r\n\r\n')
            sent += 1
        took = time.monotonic() - started
        after = kek.rss_kib()
        time.sleep(5)               # nothing sent: no collection made to run
        later, peak = kek.rss_kib(), kek.rss_kib('VmHWM')
    finally:
        kek.stop()
    print('names: %d requests with new 60 KB header names in %.1f s: kek RSS'
          ' %.1f MiB before, %.1f after, %.1f 5 s later (peak %.1f)'
          % (sent, took, before / 1024, after / 1024, later / 1024,
             peak / 1024))


TLS_FILES = {}


def tls_env():
    """TLS_CERT and TLS_KEY of a P-256 certificate made once, for localhost."""
    if not TLS_FILES:
        folder = tempfile.mkdtemp(prefix='kek-hostile-tls-')
        TLS_FILES.update(TLS_CERT=os.path.join(folder, 'cert.pem'),
                         TLS_KEY=os.path.join(folder, 'key.pem'))
        subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt',
                        'ec_paramgen_curve:P-256', '-nodes', '-keyout',
                        TLS_FILES['TLS_KEY'], '-out', TLS_FILES['TLS_CERT'],
                        '-subj', '/CN=localhost', '-addext',
                        'subjectAltName=DNS:localhost,IP:127.0.0.1'],
                       check=True, capture_output=True)
    return dict(TLS_FILES)


def client_tls():
    context = ssl.create_default_context(cafile=tls_env()['TLS_CERT'])
    context.set_alpn_protocols(['http/1.1'])
    return context


def a_hello():
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_hostname='localhost')
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def log_says(kek, text):
    with open(kek.log, errors='replace') as log:
        return sum(text in line for line in log)


def halfopen(count=1000):
    kek = Kek(nofile=4096, **tls_env())
    socks = []
    try:
        time.sleep(0.5)
        before = kek.rss_kib()
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
        for _ in range(count):
            sock = socket.create_connection(kek.address)
            sock.sendall(a_hello())
            socks.append(sock)
        time.sleep(1)
        during = kek.rss_kib()
        refused = log_says(kek, 'hands at most at once')
        # A client that comes now: the oldest handshake makes room for it.
        started = time.monotonic()
        try:
            with client_tls().wrap_socket(socket.create_connection(
                    kek.address, timeout=5), server_hostname='localhost') as sock:
                request(sock, GET)
            served = 'served in %.1f ms' % ((time.monotonic() - started) * 1000)
        except OSError as error:
            served = 'NOT served (%s)' % error
        for sock in socks:
            sock.close()
        time.sleep(1)
        after = kek.rss_kib()
    finally:
        kek.stop()
    print('halfopen: %d hellos never answered: kek RSS %.1f MiB before, %.1f'
          ' with them open (%d kept, %d oldest closed at MAX_HANDSHAKES: %.0f'
          ' KiB a handshake kept), %.1f once they closed; a new HTTPS client'
          ' %s' % (count, before / 1024, during / 1024, count - refused,
                   refused, (during - before) / max(1, count - refused),
                   after / 1024, served))


def attack_handshakes(port):
    """A new TLS connection for each GET, one after another."""
    context = client_tls()
    deadline = time.monotonic() + ATTACK_SECONDS
    while time.monotonic() < deadline:
        try:
            with context.wrap_socket(socket.create_connection(
                    ('127.0.0.1', int(port))), server_hostname='localhost') as sock:
                request(sock, GET.replace(b'\r\n\r\n',
                                          b'\r\nConnection: close\r\n\r\n'))
        except OSError:
            time.sleep(0.01)


def handshakes():
    times, log = beside('attack_handshakes', 4, (), 10, **tls_env())
    print('handshakes: 4 clients shaking hands for each GET; another client:',
          summary(times), '(log %.1f MB)' % (log / 1e6), flush=True)


def junkhello(count=200):
    kek = Kek(**tls_env())
    try:
        started = time.monotonic()
        for _ in range(count):
            exchange(kek.address, b'\x16junk that is no TLS\r\n\r\n')
        junk = time.monotonic() - started
        hello = a_hello()[:60]
        socks = []
        started = time.monotonic()
        for _ in range(count):
            sock = socket.create_connection(kek.address)
            sock.sendall(hello)
            socks.append(sock)
        for sock in socks:
            sock.settimeout(30)
            while sock.recv(4096):
                pass
            sock.close()
        stalled = time.monotonic() - started
        time.sleep(0.5)
        said = (log_says(kek, 'not TLS after all'),
                log_says(kek, 'not finished: not complete within'))
    finally:
        kek.stop()
    print('junkhello: %d of 0x16 and junk in %.2f s, %d said not TLS after all;'
          ' %d stalled hellos closed after %.1f s, %d said not complete'
          % (count, junk, said[0], count, stalled, said[1]))


SCENARIOS = {'pipeline': pipeline, 'heads': heads, 'trickle': trickle,
             'bodies': bodies, 'memory': memory, 'parse': parse,
             'shapes': shapes, 'beside': beside_shapes, 'names': names,
             'halfopen': halfopen, 'handshakes': handshakes,
             'junkhello': junkhello}

if __name__ == '__main__':
    if sys.argv[1:2] == ['--attack']:
        globals()[sys.argv[2]](*sys.argv[3:])
    else:
        unknown = set(sys.argv[1:]) - set(SCENARIOS)
        if unknown:
            sys.exit('no scenario %s; there are %s' % (
                ', '.join(sorted(unknown)), ', '.join(SCENARIOS)))
        atexit.register(end_all)
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
        os.sched_setaffinity(0, {1})
        try:
            for scenario in sys.argv[1:] or SCENARIOS:
                SCENARIOS[scenario]()
        finally:
            end_all()
