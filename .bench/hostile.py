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

kek runs pinned to core 0 and the clients to core 1 (taskset), as in run.sh.
Each scenario starts its own kek and prints one line of figures.
"""

import os
import re
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

KEK = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'kek.py')
GET = b'GET /api?x=1 HTTP/1.1\r\nHost: x\r\n\r\n'


class Kek:
    """`python kek.py` on a free port of 127.0.0.1, on core 0."""

    def __init__(self, nofile=4096, **env):
        self.log = tempfile.mktemp(prefix='kek-hostile-', suffix='.log')
        environ = dict(os.environ, HOST='127.0.0.1', PORT='0',
                       LOG_FILE=self.log, **env)
        self.proc = subprocess.Popen(
            ['taskset', '-c', '0', sys.executable, KEK], env=environ,
            stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE,
                                                  (nofile, nofile)))
        line = self.proc.stderr.readline()
        self.port = int(re.search(r':(\d+),', line).group(1))
        self.address = ('127.0.0.1', self.port)

    def rss_kib(self, field='VmRSS'):
        with open('/proc/%d/status' % self.proc.pid) as status:
            return int(re.search(r'%s:\s+(\d+)' % field, status.read()).group(1))

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        size = os.path.getsize(self.log)
        os.unlink(self.log)
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
    return [subprocess.Popen(['taskset', '-c', '1', 'nice', '-n', '10',
                              sys.executable, __file__, '--attack', code]
                             + [str(arg) for arg in args])
            for _ in range(count)]


def attack_pipeline(port):
    """Keep 2,000 pipelined GETs in flight, reading the answers."""
    sock = socket.create_connection(('127.0.0.1', int(port)))
    batch = GET * 2000

    def read():
        while sock.recv(1 << 20):
            pass
    threading.Thread(target=read, daemon=True).start()
    while True:
        sock.sendall(batch)


def attack_heads(port):
    """Send 64 KiB heads of \\xff, one after another, reading the answers."""
    head = b'GET /' + b'\xff' * 65000 + b' HTTP/1.1\r\nHost: x\r\n\r\n'
    sock = socket.create_connection(('127.0.0.1', int(port)))
    while True:
        request(sock, head)


def stop_all(processes):
    for process in processes:
        process.kill()
        process.wait()


def beside(attack):
    """Another client's latencies over 10 s while 8 clients run attack, and
    the bytes of log kek wrote."""
    kek = Kek()
    swarm = attackers(attack, 8, kek.port)
    time.sleep(2)           # the attack under way
    times = latencies(kek, 10)
    stop_all(swarm)
    return times, kek.stop()


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


SCENARIOS = {'pipeline': pipeline, 'heads': heads, 'trickle': trickle,
             'bodies': bodies, 'memory': memory, 'parse': parse}

if __name__ == '__main__':
    if sys.argv[1:2] == ['--attack']:
        globals()[sys.argv[2]](*sys.argv[3:])
    else:
        os.sched_setaffinity(0, {1})
        for scenario in sys.argv[1:] or SCENARIOS:
            SCENARIOS[scenario]()
