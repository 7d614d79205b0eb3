"""Tests of kek: the server runs in a thread on an ephemeral port and logs to a
file the tests read back; whole-process behaviour runs `python kek.py`."""

import calendar
import http.client
import json
import logging
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import kek

KEK = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'kek.py')
KEY = r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z'
# The README's grammar of a text line: KEY +OFFSETms LEVEL WHERE MESSAGE.
LINE = re.compile(r'(%s) \+(\d+\.\d{3})ms (INFO |WARNING|ERROR) (\S+) (.*)'
                  % KEY)


def wait_for(predicate, timeout=5.0, what='condition'):
    """Poll predicate until it returns something true, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError('timed out waiting for %s' % what)
        time.sleep(0.01)


def parse_responses(data):
    """Split raw bytes into (status line, headers, body) answers."""
    answers = []
    while data:
        head, _, data = data.partition(b'\r\n\r\n')
        lines = head.decode('latin-1').split('\r\n')
        headers = dict(line.split(': ', 1) for line in lines[1:])
        length = 0 if ' 100 ' in lines[0] else int(headers['Content-Length'])
        answers.append((lines[0], headers, data[:length]))
        data = data[length:]
    return answers


def recv_until_closed(sock, timeout=5.0):
    sock.settimeout(timeout)
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b''.join(chunks)
        chunks.append(chunk)


class Trap:
    """kek's Server in a background thread, logging to tmp_path/kek.log."""

    def __init__(self, tmp_path, formatter):
        self.log_path = tmp_path / 'kek.log'
        self.writer = kek.LogWriter(str(self.log_path))
        self.writer.setFormatter(formatter)
        kek.LOGGER.addHandler(self.writer)
        kek.LOGGER.setLevel(logging.INFO)
        kek.LOGGER.propagate = False
        self.server = kek.Server(('127.0.0.1', 0))
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)
        assert not self.thread.is_alive()
        self.server.server_close()
        kek.LOGGER.removeHandler(self.writer)
        self.writer.close()

    def request(self, method='GET', url='/api?x=1', body=None, headers=None):
        conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=5)
        conn.request(method, url, body=body, headers=headers or {})
        answer = conn.getresponse()
        data = answer.read()
        conn.close()
        return answer, data

    def connect(self):
        return socket.create_connection(('127.0.0.1', self.port), timeout=5)

    def exchange(self, data):
        """Send raw bytes and read until the server closes."""
        with self.connect() as sock:
            sock.sendall(data)
            return recv_until_closed(sock)

    def lines(self):
        return self.log_path.read_text(encoding='utf-8').splitlines()

    def chain(self, key):
        """(level, where, message) of every record of one request: grep '^KEY '."""
        return [LINE.fullmatch(line).group(3, 4, 5)
                for line in self.lines() if line.startswith(key + ' ')]

    def wait_chain(self, key, count):
        return wait_for(lambda: len(self.chain(key)) >= count
                        and self.chain(key), what='%d records' % count)

    def keys(self):
        return list(dict.fromkeys(LINE.fullmatch(line).group(1)
                                  for line in self.lines()
                                  if ' main ' not in line))


@pytest.fixture
def trap(tmp_path):
    server = Trap(tmp_path, kek.TextFormatter())
    yield server
    server.stop()
    # Whatever the test sent, every line keeps the README's grammar.
    for line in server.lines():
        assert LINE.fullmatch(line), line


@pytest.fixture
def json_trap(tmp_path):
    server = Trap(tmp_path, kek.JsonFormatter())
    yield server
    server.stop()


@pytest.fixture
def fast(monkeypatch):
    """Deadlines of a fraction of a second, checked often."""
    monkeypatch.setattr(kek, 'HEAD_TIMEOUT', 0.5)
    monkeypatch.setattr(kek, 'IDLE_TIMEOUT', 0.5)
    monkeypatch.setattr(kek, 'LINGER_TIMEOUT', 0.3)
    monkeypatch.setattr(kek, 'SWEEP_INTERVAL', 0.05)


def error_body(data):
    body = json.loads(data)
    assert body['status'] == 'error'
    return body['errors']


# -- The chain of one request --------------------------------------------------

def test_ok_request_answers_200_and_logs_the_whole_chain(trap):
    answer, data = trap.request(url='/api?x=1')
    key = answer.getheader('X-Request-Id')
    assert answer.status == 200
    assert answer.getheader('Content-Type') == 'application/json'
    assert int(answer.getheader('Content-Length')) == len(data)
    assert json.loads(data) == {'request': key, 'status': 'ok'}
    assert re.fullmatch(KEY, key)
    chain = trap.chain(key)
    assert [(level, where) for level, where, _ in chain] == [
        ('INFO ', 'query'), ('INFO ', 'query>process1'),
        ('INFO ', 'query>process2'), ('INFO ', 'query>process3'),
        ('INFO ', 'query')]
    assert re.fullmatch(r'GET /api\?x=1 params=\{"x": \["1"\]\} '
                        r'client=127\.0\.0\.1:\d+', chain[0][2])
    assert chain[-1][2] == 'responded 200 status=ok'


def test_grep_on_a_key_prints_that_request_and_nothing_else(trap):
    keys = [trap.request(url='/api?n=%d' % n)[0].getheader('X-Request-Id')
            for n in range(3)]
    lines = trap.lines()
    assert 'listening' not in ''.join(lines)     # in-thread: no main records
    for n, key in enumerate(keys):
        mine = [line for line in lines if line.startswith(key + ' ')]
        assert len(mine) == 5
        assert '/api?n=%d ' % n in mine[0]
    assert len(lines) == 15


def test_offsets_grow_along_the_chain(trap):
    key = trap.request()[0].getheader('X-Request-Id')
    offsets = [float(LINE.fullmatch(line).group(2)) for line in trap.lines()
               if line.startswith(key)]
    assert offsets == sorted(offsets)


@pytest.mark.parametrize('method', ['POST', 'PUT', 'DELETE', 'OPTIONS', 'PATCH',
                                    'FOO', 'get'])
def test_every_method_but_get_is_an_error_answered_200(trap, method):
    answer, data = trap.request(method, '/api?x=1', body=b'data')
    key = answer.getheader('X-Request-Id')
    assert answer.status == 200
    assert error_body(data) == ['method %s is not allowed' % method]
    chain = trap.chain(key)
    assert chain[0][2].startswith('%s /api?x=1 ' % method)
    assert chain[0][2].endswith(' body=4')
    assert chain[1] == ('ERROR', 'query', 'method %s is not allowed' % method)
    assert chain[2] == ('ERROR', 'query', 'responded 200 status=error')
    assert len(chain) == 3          # no processX ran


def test_head_gets_the_same_headers_and_no_body(trap):
    conn = http.client.HTTPConnection('127.0.0.1', trap.port, timeout=5)
    conn.request('HEAD', '/api')
    head = conn.getresponse()
    assert head.read() == b''
    key = head.getheader('X-Request-Id')
    assert head.status == 200
    assert head.getheader('Content-Type') == 'application/json'
    # The same connection still works: no stray body was sent after the head.
    conn.request('GET', '/api')
    assert conn.getresponse().status == 200
    conn.close()
    expected = json.dumps({'request': key, 'status': 'error',
                           'errors': ['method HEAD is not allowed']})
    assert int(head.getheader('Content-Length')) == len(expected)


def test_server_header_does_not_reveal_python(trap):
    answer, _ = trap.request()
    assert answer.getheader('Server') == 'kek'
    assert answer.getheader('Date').endswith(' GMT')


@pytest.mark.parametrize('path', ['/', '/api/', '/apix', '/API', '//api',
                                  '/api/../api', 'http://x/api', '/%61pi'])
def test_path_other_than_api_as_sent_is_an_error(trap, path):
    with trap.connect() as sock:
        sock.sendall(b'GET %s?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close'
                     b'\r\n\r\n' % path.encode())
        [(status, headers, body)] = parse_responses(recv_until_closed(sock))
    assert status == 'HTTP/1.1 200 OK'
    assert error_body(body) == ['path %s is not /api' % path]
    chain = trap.chain(headers['X-Request-Id'])
    assert chain[1] == ('ERROR', 'query', 'path %s is not /api' % path)
    assert len(chain) == 3


@pytest.mark.parametrize('url', ['/api?invalid=1', '/api?invalid=%31',
                                 '/api?invalid=0&invalid=1',
                                 '/api?%69nvalid=1'])
def test_invalid_1_is_an_error(trap, url):
    answer, data = trap.request(url=url)
    assert error_body(data) == ['parameter invalid=1']
    chain = trap.chain(answer.getheader('X-Request-Id'))
    assert chain[1] == ('ERROR', 'query', 'parameter invalid=1')
    assert len(chain) == 3


@pytest.mark.parametrize('url', ['/api?invalid=01', '/api?invalid=',
                                 '/api?invalid=2', '/api?notinvalid=1'])
def test_other_values_of_invalid_are_fine(trap, url):
    answer, data = trap.request(url=url)
    assert json.loads(data)['status'] == 'ok'
    assert len(trap.chain(answer.getheader('X-Request-Id'))) == 5


def test_any_url_with_invalid_1_logs_each_error_on_its_own(trap):
    answer, data = trap.request('POST', '/any_url?invalid=1', body=b'')
    errors = ['method POST is not allowed', 'path /any_url is not /api',
              'parameter invalid=1']
    assert error_body(data) == errors
    chain = trap.chain(answer.getheader('X-Request-Id'))
    assert chain[1:4] == [('ERROR', 'query', e) for e in errors]
    assert chain[4] == ('ERROR', 'query', 'responded 200 status=error')


@pytest.mark.parametrize('url', ['/api?notawaiting=1', '/api?notawaiting=%31',
                                 '/api?notawaiting=2&notawaiting=1'])
def test_notawaiting_1_fails_in_process2_and_stops_the_chain(trap, url):
    answer, data = trap.request(url=url)
    assert error_body(data) == ['validation failed: notawaiting=1']
    chain = trap.chain(answer.getheader('X-Request-Id'))
    assert chain[1:] == [
        ('INFO ', 'query>process1', 'done'),
        ('ERROR', 'query>process2', 'validation failed: notawaiting=1'),
        ('ERROR', 'query', 'responded 200 status=error')]


def test_notawaiting_other_values_are_fine(trap):
    answer, data = trap.request(url='/api?notawaiting=0&notawaiting=')
    assert json.loads(data)['status'] == 'ok'


def test_unexpected_exception_is_logged_with_traceback_and_answered(trap,
                                                                    monkeypatch):
    def broken(request):
        return 1 / 0
    monkeypatch.setattr(kek, 'process3', broken)
    answer, data = trap.request()
    assert answer.status == 200
    assert error_body(data) == ['internal error: ZeroDivisionError']
    chain = trap.chain(answer.getheader('X-Request-Id'))
    level, where, message = chain[-2]
    assert (level, where) == ('ERROR', 'query')
    assert message.startswith('unexpected error\\nTraceback (most recent call')
    assert 'ZeroDivisionError: division by zero' in message
    assert chain[-1] == ('ERROR', 'query', 'responded 200 status=error')


def test_bug_outside_query_costs_one_connection_not_the_server(trap,
                                                               monkeypatch):
    def broken(self):
        raise RuntimeError('bug')
    monkeypatch.setattr(kek.Handler, 'body_problem', broken)
    with trap.connect() as sock:
        sock.sendall(b'GET /api HTTP/1.1\r\n\r\n')
        assert recv_until_closed(sock) == b''
    line = wait_for(lambda: [l for l in trap.lines() if 'unexpected' in l])[0]
    assert re.search(r' ERROR main unexpected error on the connection from '
                     r'127\.0\.0\.1:\d+\\nTraceback .*RuntimeError: bug', line)
    monkeypatch.undo()
    assert trap.request()[0].status == 200


# -- Keys ----------------------------------------------------------------------

def test_key_is_the_utc_arrival_time_with_microseconds():
    second = calendar.timegm((2026, 11, 26, 17, 42, 17))
    keys = kek.Keys(clock=lambda: (second * 1000000 + 123401) * 1000 + 999)
    assert keys.next() == '2026-11-26T17:42:17.123401Z'


def test_equal_clock_readings_still_give_unique_growing_keys():
    keys = kek.Keys(clock=lambda: 1764179000999999000)
    got = [keys.next() for _ in range(3)]
    assert got == ['2025-11-26T17:43:20.999999Z', '2025-11-26T17:43:21.000000Z',
                   '2025-11-26T17:43:21.000001Z']


def test_a_clock_going_backwards_never_repeats_a_key():
    readings = iter([5000000000, 4000000000, 5000000000, 6000000000])
    keys = kek.Keys(clock=lambda: next(readings))
    assert [keys.next() for _ in range(4)] == [
        '1970-01-01T00:00:05.000000Z', '1970-01-01T00:00:05.000001Z',
        '1970-01-01T00:00:05.000002Z', '1970-01-01T00:00:06.000000Z']


def test_keys_from_many_threads_at_once_are_unique():
    keys = kek.Keys(clock=lambda: 1764179000000000000)
    got = []
    threads = [threading.Thread(target=lambda: got.extend(
        keys.next() for _ in range(100))) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 2000
    assert all(len(key) == 27 for key in got)


def test_200_requests_from_20_threads_get_200_keys_and_their_own_chains(trap):
    answers = {}

    def client(t):
        conn = http.client.HTTPConnection('127.0.0.1', trap.port, timeout=10)
        for n in range(10):
            conn.request('GET', '/api?t=%d&n=%d' % (t, n))
            answer = conn.getresponse()
            answer.read()
            answers[(t, n)] = answer.getheader('X-Request-Id')
        conn.close()
    threads = [threading.Thread(target=client, args=(t,)) for t in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(answers.values())) == 200
    for (t, n), key in answers.items():
        chain = trap.chain(key)
        assert len(chain) == 5
        assert chain[0][2].startswith('GET /api?t=%d&n=%d ' % (t, n))


# -- What is logged of the client's headers -----------------------------------

def test_client_ids_are_logged_escaped_and_capped(trap):
    long_id = 'x' * 500
    answer, _ = trap.request(headers={'X-Request-Id': 'abc "1"',
                                      'traceparent': long_id})
    key = answer.getheader('X-Request-Id')
    assert key != 'abc "1"'             # the client's id never replaces the key
    arrival = trap.chain(key)[0][2]
    assert arrival.endswith(' x-request-id="abc \\\\"1\\\\""'
                            ' traceparent="%s"' % ('x' * kek.MAX_SHOWN_CHARS))


def test_authorization_and_cookie_are_never_logged(trap):
    trap.request(headers={'Authorization': 'Bearer s3cr3t-token',
                          'Cookie': 'session=c00kie-value'})
    text = trap.log_path.read_text()
    assert 's3cr3t' not in text and 'c00kie' not in text


# -- The log cannot be forged --------------------------------------------------

def test_hostile_bytes_never_split_forge_or_colour_a_line(trap):
    other = trap.request()[0].getheader('X-Request-Id')
    target = ('/api?q=%0d%0a' + other + '%20+0.000ms%20ERROR&c=\x1b[31m'
              '\u202e\u2028\u2029\u0085"\'\\').encode() + b'\xff\xfe&r=\xd0\xbf'
    head = (b'GET ' + target + b' HTTP/1.1\r\nHost: x\r\nConnection: close\r\n'
            b'X-Request-Id: \x1b[0m' + other.encode() + b' \xe2\x80\xae\r\n\r\n')
    [(status, headers, body)] = parse_responses(trap.exchange(head))
    key = headers['X-Request-Id']
    lines = trap.lines()
    assert len(lines) == 10             # two chains of five, one line each
    assert len(trap.chain(other)) == 5
    arrival = trap.chain(key)[0][2]
    for escaped in ('\\x1b[31m', '\\u202e', '\\u2028', '\\u2029', '\\x85',
                    '\\udcff\\udcfe', '\\\\', '\\\\u001b[0m',
                    '\\\\r\\\\n'):   # CR LF: JSON-escaped, then escaped
        assert escaped in arrival
    assert '"r": ["п"]' in arrival      # readable text stays readable
    assert json.loads(body)['status'] == 'ok'


def test_escape_keeps_printable_text_and_escapes_the_rest():
    assert kek.escape('Привет /api?x=1 "q"') == 'Привет /api?x=1 "q"'
    assert kek.escape('a\nb\r\t\x00\x1b\x7f') == 'a\\nb\\r\\t\\x00\\x1b\\x7f'
    assert kek.escape('\u202e\u2028\udcff\\') == '\\u202e\\u2028\\udcff\\\\'
    assert kek.escape('\U000e0001') == '\\U000e0001'


def test_json_log_has_one_object_per_line_with_the_arrival_fields(json_trap):
    answer, _ = json_trap.request(url='/api?x=1&x=%0a', headers={
        'X-Request-Id': 'id-1', 'traceparent': 'tp'})
    key = answer.getheader('X-Request-Id')
    records = [json.loads(line) for line in json_trap.lines()]
    assert [r['where'] for r in records] == [
        'query', 'query>process1', 'query>process2', 'query>process3', 'query']
    assert all(r['request'] == key for r in records)
    arrival = records[0]
    assert arrival['method'] == 'GET' and arrival['url'] == '/api?x=1&x=%0a'
    assert arrival['params'] == {'x': ['1', '\\n']}
    assert arrival['client'].startswith('127.0.0.1:')
    assert arrival['x_request_id'] == 'id-1' and arrival['traceparent'] == 'tp'
    assert records[-1]['level'] == 'INFO'
    assert records[-1]['message'] == 'responded 200 status=ok'
    assert records[1]['offset_ms'] <= records[-1]['offset_ms']


def test_json_log_of_a_body_an_exception_and_a_server_record(json_trap,
                                                             monkeypatch):
    answer, _ = json_trap.request('POST', body=b'0123456789')
    assert json.loads(json_trap.lines()[0])['body_bytes'] == 10
    monkeypatch.setattr(kek, 'process1', lambda request: 1 / 0)
    key = json_trap.request()[0].getheader('X-Request-Id')
    records = [json.loads(line) for line in json_trap.lines()]
    error = [r for r in records if r['request'] == key][1]
    assert error['level'] == 'ERROR' and error['where'] == 'query'
    assert error['message'].startswith('unexpected error\\nTraceback')
    assert 'ZeroDivisionError' in error['message']
    kek.server_log().info('a server record')
    kek.flush_log()
    record = json.loads(json_trap.lines()[-1])
    assert record['request'] is None and re.fullmatch(KEY, record['time'])
    assert record['where'] == 'main' and record['message'] == 'a server record'
