"""kek: a request trap.

kek listens on PORT, answers every HTTP request with 200 and logs the whole
story of each request on lines that all start with the request's key, its
arrival time, so that one grep pulls it out:

    PORT=8001 python kek.py
    grep '^2026-11-26T17:42:17.123401Z ' kek.log

One thread runs a selectors loop over every connection.  The loop feeds the
stock BaseHTTPRequestHandler.handle_one_request() one complete request head at
a time from memory, so a client that sends slowly, or not at all, costs a
little memory and no thread.  The log records of one loop round are written
with one write() before any answer of that round is sent: a client that got
its answer can find its whole chain in the log.
"""

import argparse
import email.utils
import io
import json
import logging
import os
import re
import selectors
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs


# -- Settings ------------------------------------------------------------------

DEFAULT_HOST = '0.0.0.0'
DEFAULT_PORT = 8000
LOG_FORMATS = ('text', 'json')

MAX_HEAD_BYTES = 64 * 1024      # request line and header lines together
MAX_HEADERS = 100
MAX_METHOD_CHARS = 32           # longer "methods" are taken for junk at once
MAX_BODY_BYTES = 1024 * 1024    # bodies are read and dropped, never kept
MAX_SHOWN_CHARS = 200           # client text only shown (ids, a bad line) is cut here

HEAD_TIMEOUT = 10.0     # seconds from a request's first byte to its blank line
IDLE_TIMEOUT = 10.0     # seconds without a byte either way: idle, slow body, unread answer
LINGER_TIMEOUT = 2.0    # after a closing answer, seconds to drop what still arrives
SHUTDOWN_GRACE = 3.0    # seconds requests in flight get to finish on SIGTERM
SWEEP_INTERVAL = 0.25   # seconds between checks of every connection's deadline
ACCEPT_PAUSE = 0.1      # seconds without accepting when out of file descriptors

LISTEN_BACKLOG = 1024           # the stock 5 resets bursts of connects
RECV_BYTES = 64 * 1024
MAX_PENDING_OUTPUT = 256 * 1024  # unsent answers before a client's requests wait
ROTATE_CHECK_INTERVAL = 1.0     # seconds between checks that LOG_FILE was moved


# -- Keys ----------------------------------------------------------------------

class Keys:
    """Hands out request keys: the arrival time, UTC, with microseconds.

    A key that would repeat or go backwards moves on by one microsecond, so
    keys are unique within one server and always the same width.
    """

    def __init__(self, clock=time.time_ns):
        self.clock = clock
        self.lock = threading.Lock()
        self.last_us = 0
        self.second = None
        self.prefix = ''

    def next(self):
        with self.lock:
            us = max(self.clock() // 1000, self.last_us + 1)
            self.last_us = us
            second, micro = divmod(us, 1000000)
            if second != self.second:
                self.second = second
                self.prefix = time.strftime('%Y-%m-%dT%H:%M:%S',
                                            time.gmtime(second))
            return '%s.%06dZ' % (self.prefix, micro)


KEYS = Keys()


# -- Logging -------------------------------------------------------------------

LOGGER = logging.getLogger('kek')

# JSON that keeps Cyrillic readable; made once, as json.dumps(ensure_ascii=False)
# builds a new encoder on every call.
READABLE_JSON = json.JSONEncoder(ensure_ascii=False).encode


def escape(text):
    """Return text that cannot split, forge or colour a log line.

    Printable characters stay (Cyrillic stays readable).  Control characters,
    line and paragraph separators, bidi overrides, bytes that were not UTF-8
    (held as surrogates) and the backslash itself become backslash escapes.
    """
    if text.isprintable() and '\\' not in text:
        return text
    return ''.join(c if c.isprintable() and c != '\\'
                   else c.encode('unicode_escape').decode('ascii')
                   for c in text)


# What no kek line shows: the same for every record instead of looked up for
# each one.  Stock formatters read records' __dict__, so these go there too.
RECORD_CONSTANTS = {
    'name': LOGGER.name, 'pathname': '(unknown file)', 'filename': '(unknown file)',
    'module': '(unknown module)', 'lineno': 0, 'funcName': None,
    'stack_info': None, 'exc_text': None, 'thread': None, 'threadName': None,
    'process': None, 'processName': None, 'msecs': 0.0, 'relativeCreated': 0.0}


class Record(logging.LogRecord):
    """A LogRecord made lean: RECORD_CONSTANTS instead of the caller, thread
    and process lookups, which were the largest single cost of a request."""

    def __init__(self, level, msg, args, exc_info, fields, offset_ms, extra):
        self.__dict__.update(RECORD_CONSTANTS)
        self.__dict__.update(fields)
        if extra:
            self.__dict__.update(extra)
        self.offset_ms = offset_ms
        self.levelno = level
        self.levelname = logging.getLevelName(level)
        self.msg = msg
        self.args = args
        self.exc_info = exc_info
        self.created = time.time()


class RequestLog(logging.LoggerAdapter):
    """Logs for one request: each record carries the request's key, the place
    in the call chain that wrote it and the milliseconds since arrival."""

    def __init__(self, key, started, where, request=True):
        super().__init__(LOGGER, {'key': key, 'started': started,
                                  'where': where,
                                  'request': key if request else None})

    def log(self, level, msg, *args, exc_info=None, extra=None):
        """info(), error(), exception() ... end here: make a lean Record and
        hand it to the logger's handlers.  exception() passes exc_info=True."""
        if self.logger.isEnabledFor(level):
            offset_ms = (time.monotonic() - self.extra['started']) * 1000
            self.logger.handle(Record(level, msg, args,
                                      exc_info and sys.exc_info(),
                                      self.extra, offset_ms, extra))

    def at(self, where):
        """The same request's log, written from another place."""
        return RequestLog(self.extra['key'], self.extra['started'], where)

    def child(self, name):
        """The log of a step called from here: WHERE becomes 'here>name'."""
        return self.at(self.extra['where'] + '>' + name)


def server_log():
    """A log for records that belong to no request (start, stop).

    Each record gets a key of its own from KEYS, so its line has the same
    shape as every other, and no request's key ever matches it.
    """
    return RequestLog(KEYS.next(), time.monotonic(), 'main', request=False)


class TextFormatter(logging.Formatter):
    """KEY +OFFSETms LEVEL WHERE MESSAGE, on one line."""

    def format(self, record):
        return '%s +%.3fms %-5s %s %s' % (record.key, record.offset_ms,
                                           record.levelname, record.where,
                                           self.message(record))

    def message(self, record):
        """The message, with the traceback if any, escaped into one line."""
        message = record.getMessage()
        if record.exc_info:
            message += '\n' + self.formatException(record.exc_info)
        return escape(message)


class JsonFormatter(TextFormatter):
    """One JSON object a line: request, offset_ms, level, where, message, and
    the arrival record's fields (method, url, params, client, ...)."""

    def format(self, record):
        fields = {'request': record.request,
                  'offset_ms': round(record.offset_ms, 3),
                  'level': record.levelname, 'where': record.where,
                  'message': self.message(record)}
        if record.request is None:
            fields['time'] = record.key
        for name, value in getattr(record, 'fields', {}).items():
            if name == 'params':
                value = {escape(k): [escape(v) for v in vs]
                         for k, vs in value.items()}
            elif isinstance(value, str):
                value = escape(value)
            fields[name] = value
        return READABLE_JSON(fields)


class LogWriter(logging.Handler):
    """Gathers formatted records; flush() writes them all with one write().

    The loop calls flush() once a round, before it sends that round's answers.
    LOG_FILE is reopened when logrotate has moved it away.  A destination that
    fails is reported once on standard error and the server goes on answering.
    """

    def __init__(self, path=None):
        super().__init__()
        self.path = path
        self.lines = []
        self.failing = False
        self.lost = 0
        self.next_check = 0.0
        self.fd = 1 if path is None else self.open()

    def open(self):
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def handle(self, record):
        """The stock handle() without its filter and lock method calls, which
        cost as much as the formatting: emit() takes the lock itself."""
        self.emit(record)

    def emit(self, record):
        line = self.format(record)
        with self.lock:
            self.lines.append(line)

    def flush(self):
        with self.lock:
            lines, self.lines = self.lines, []
        if not lines:
            return
        if self.path is not None:
            self.reopen_if_moved()
        data = ('\n'.join(lines) + '\n').encode('utf-8', 'backslashreplace')
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as error:
            self.lost += len(lines)
            if not self.failing:
                self.failing = True
                report('cannot write the log to %s: %s; dropping records until'
                       ' it works again' % (self.destination(), error))
            return
        if self.failing:
            report('writing the log to %s works again; %d records were lost'
                   % (self.destination(), self.lost))
            self.failing = False
            self.lost = 0

    def destination(self):
        return 'standard output' if self.path is None else self.path

    def reopen_if_moved(self):
        now = time.monotonic()
        if now < self.next_check:
            return
        self.next_check = now + ROTATE_CHECK_INTERVAL
        try:
            current = os.stat(self.path)
        except OSError:
            current = None
        opened = os.fstat(self.fd)
        if (current is not None and current.st_dev == opened.st_dev
                and current.st_ino == opened.st_ino):
            return
        try:
            fd = self.open()
        except OSError:
            return          # keep writing where we were
        os.close(self.fd)
        self.fd = fd

    def close(self):
        self.flush()
        if self.path is not None:
            os.close(self.fd)
        super().close()


def flush_log():
    for handler in LOGGER.handlers:
        handler.flush()


def report(message):
    """One line on standard error, even if standard error is gone."""
    try:
        os.write(2, ('kek: %s\n' % message).encode('utf-8', 'backslashreplace'))
    except OSError:
        pass


# -- The handler ---------------------------------------------------------------

TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"   # RFC 9110 token characters
METHOD_START = re.compile(rb"[%s]{0,%d}(?: |\Z)"
                          % (TCHAR.encode(), MAX_METHOD_CHARS))
REQUEST_LINE = re.compile(r"([%s]{1,%d}) (\S+) HTTP/1\.(\d)"
                          % (TCHAR, MAX_METHOD_CHARS), re.ASCII)
HEAD_END = re.compile(rb"\n\r?\n")     # the blank line; bare LF line ends are allowed
HEADER_LINE = re.compile(r"([%s]+):[ \t]*(.*?)[ \t]*" % TCHAR, re.ASCII)
DIGITS = re.compile(r"\d+", re.ASCII)
CONTINUE = b'HTTP/1.1 100 Continue\r\n\r\n'
# What json.dumps() gives for the ok body; formatting it costs a tenth.
OK_BODY = '{"request": "%s", "status": "ok"}'


class OutputBuffer(bytearray):
    """The handler's wfile: what it writes waits here until the loop sends it,
    after the round's log records are written."""

    def write(self, data):
        self.extend(data)

    def flush(self):
        pass


class Handler(BaseHTTPRequestHandler):
    """One client connection.  The loop hands it bytes as they arrive; each
    complete request head goes through the stock handle_one_request(), which
    calls parse_request() below and then do_GET (or the fallback)."""

    server_version = 'kek'
    sys_version = ''            # the Server header names no Python version
    protocol_version = 'HTTP/1.1'

    def __init__(self, sock, client_address, server):
        # The stock __init__ would block in handle() until the client leaves.
        self.request = sock
        self.client_address = client_address
        self.server = server
        host, port = client_address[:2]
        self.client = ('[%s]:%d' if ':' in host else '%s:%d') % (host, port)
        self.inbuf = bytearray()
        self.wfile = OutputBuffer()
        self.scanned = 0          # bytes of inbuf already searched for a head
        self.key = None           # the current request's, from its first byte
        self.started = 0.0
        self.log = None           # the current, or last, request's log
        self.body_left = 0
        self.close_connection = False
        self.linger = False       # closing while the client may still send
        self.closing_at = None    # when the answers were sent and we half-closed
        self.closed = False
        self.eof = False          # the client sent all it will send
        self.events = selectors.EVENT_READ
        self.active_at = time.monotonic()

    def __getattr__(self, name):
        """Serve every method other than GET (POST, HEAD, FOO, ...) the same
        way: query() reports the method as an error."""
        if name.startswith('do_'):
            return self.do_GET
        raise AttributeError(name)

    # The loop calls these.

    def on_readable(self):
        try:
            data = self.request.recv(RECV_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b''          # reset by the client: it is gone
        if not data:
            self.on_eof()
            return
        self.active_at = time.monotonic()
        if not self.done():
            self.inbuf += data
            self.handle()
        # else: answered and closing; what still arrives is dropped.

    def on_eof(self):
        self.eof = True
        if self.key is not None:
            self.abandon('the client closed the connection')
        elif self.wfile:
            # Half-closed by the client: send what it asked for, then close.
            self.close_connection = True
            self.server.send_later(self)
        else:
            self.close()

    def done(self):
        """True once the last answer on this connection is written."""
        return self.close_connection and self.key is None

    def handle(self):
        """Handle every request that is complete in inbuf, in order."""
        while (self.inbuf and not self.done()
               and len(self.wfile) < MAX_PENDING_OUTPUT):
            if self.key is None:
                # Blank lines before a request line are skipped (RFC 9112 2.2).
                if self.inbuf[0] in b'\r\n':
                    del self.inbuf[:len(self.inbuf)
                                   - len(self.inbuf.lstrip(b'\r\n'))]
                    continue
                self.key = KEYS.next()
                self.started = time.monotonic()
                self.command = self.request_version = ''
            if self.body_left:
                dropped = min(self.body_left, len(self.inbuf))
                del self.inbuf[:dropped]
                self.body_left -= dropped
                if not self.body_left:
                    self.run_query()
                continue
            if not self.take_head():
                return

    def take_head(self):
        """Run the request whose head is complete in inbuf; False if none is."""
        # Search only the new bytes: a client trickling its head byte by byte
        # must not make every arrival rescan all of it.
        end = HEAD_END.search(self.inbuf, max(0, self.scanned - 2))
        self.scanned = len(self.inbuf)
        size = end.start() + 1 if end else len(self.inbuf)
        if size > MAX_HEAD_BYTES:
            self.fail('request head over %d bytes' % MAX_HEAD_BYTES)
            return False
        if end is None:
            if not METHOD_START.match(self.inbuf):
                self.fail('not an HTTP request: %s' % self.inbuf[
                    :MAX_SHOWN_CHARS].decode('utf-8', 'surrogateescape'))
            return False
        self.rfile = io.BytesIO(self.inbuf[:end.start() + 1])
        del self.inbuf[:end.end()]
        self.scanned = 0
        self.handle_one_request()
        return True

    def send_output(self):
        """Send what the socket takes now; half-close once a closing answer
        is out; watch for writability only while output waits."""
        was_full = len(self.wfile) >= MAX_PENDING_OUTPUT
        if self.wfile:
            try:
                sent = self.request.send(self.wfile)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self.log.at('handler').warning(
                    'client gone before its answer was sent: %s', error)
                self.close()
                return
            if sent:
                del self.wfile[:sent]
                self.active_at = time.monotonic()
        if not self.wfile and self.done() and self.closing_at is None:
            if self.eof or not (self.linger or self.inbuf):
                self.close()        # nothing more is coming: a plain FIN
                return
            # Half-close and drop what still arrives for a while: closing at
            # once could reset the connection and destroy the answer.
            try:
                self.request.shutdown(socket.SHUT_WR)
            except OSError:         # reset by the client meanwhile
                self.close()
                return
            self.closing_at = time.monotonic()
        if was_full and len(self.wfile) < MAX_PENDING_OUTPUT:
            self.handle()       # requests that waited for a slow reader
        events = selectors.EVENT_WRITE if self.wfile else 0
        if len(self.wfile) < MAX_PENDING_OUTPUT and not self.eof:
            events |= selectors.EVENT_READ
        if events != self.events:
            self.events = events
            self.server.selector.modify(self.request, events, self)

    def expired(self, now):
        if self.closing_at is not None:
            return now >= self.closing_at + LINGER_TIMEOUT
        if (self.key is not None and not self.body_left
                and now >= self.started + HEAD_TIMEOUT):
            return True
        return now >= self.active_at + IDLE_TIMEOUT

    def expire(self):
        """The connection missed its deadline: say why, if a request was
        under way, and close."""
        if self.closing_at is not None:
            self.close()
        elif self.wfile:
            self.log.at('handler').error('client did not read its answer for'
                                         ' %g s; connection closed',
                                         IDLE_TIMEOUT)
            self.close()
        elif self.body_left:
            log_arrival(self)
            self.fail('request body stalled: no byte for %g s, %d bytes'
                      ' missing' % (IDLE_TIMEOUT, self.body_left))
        elif self.key is not None:
            self.fail('request head not complete within %g s (%d bytes'
                      ' received)' % (HEAD_TIMEOUT, len(self.inbuf)))
        else:
            self.close()

    def idle(self):
        return (self.key is None and not self.wfile
                and self.closing_at is None)

    def abandon(self, reason):
        """Close in the middle of a request that cannot be answered."""
        if self.body_left:
            log_arrival(self)
            self.handler_log().error('%s; %d body bytes missing',
                                     reason, self.body_left)
        else:
            self.handler_log().error(
                '%s before the request head was complete (%d bytes received)',
                reason, len(self.inbuf))
        self.close()

    def handler_log(self):
        """The log for what the handler itself says about the request."""
        return RequestLog(self.key, self.started, 'handler')

    def close(self):
        if not self.closed:
            self.closed = True
            self.server.forget(self)
            self.request.close()

    # The stock handle_one_request() calls these.

    def parse_request(self):
        """Parse the head strictly, as RFC 9112 asks; False once the error is
        answered.  Sets command, path (the target exactly as sent),
        request_version, close_connection and headers (a dict of lower-case
        names; repeated fields joined with ', ')."""
        head = self.raw_requestline + self.rfile.read()
        if b'\0' in head or head.count(b'\r') != head.count(b'\r\n'):
            return self.send_error(400, 'NUL or bare CR in the request head')
        lines = head.decode('utf-8', 'surrogateescape').replace(
            '\r\n', '\n').split('\n')[:-1]
        match = REQUEST_LINE.fullmatch(lines[0])
        if not match:
            return self.send_error(400, "request line is not 'METHOD TARGET"
                                   " HTTP/1.x': %s" % lines[0][:MAX_SHOWN_CHARS])
        self.command, self.path, minor = match.groups()
        self.request_version = 'HTTP/1.' + minor
        if len(lines) - 1 > MAX_HEADERS:
            return self.send_error(400, 'more than %d header lines'
                                   % MAX_HEADERS)
        headers = {}
        for line in lines[1:]:
            match = HEADER_LINE.fullmatch(line)
            if not match:
                return self.send_error(400, "header line is not 'Name: value'"
                                       ": %s" % line[:MAX_SHOWN_CHARS])
            name, value = match.groups()
            name = name.lower()
            headers[name] = headers[name] + ', ' + value if name in headers else value
        self.headers = headers
        connection = ()
        if 'connection' in headers:
            connection = {token.strip() for token in
                          headers['connection'].lower().split(',')}
        if minor == '0':
            self.close_connection = 'keep-alive' not in connection
        else:
            self.close_connection = 'close' in connection
        return True

    def send_error(self, code, message=None, explain=None):
        """Answer a request that does not parse: 200, the error, and close.

        The stock method sends an HTML page with a 4xx or 5xx status."""
        log = self.handler_log()
        log.error('bad request: %s; client=%s', message, self.client)
        self.fail_with(log, message)
        return False

    def do_GET(self):
        """Every request that parses comes here, GET or not: check how its
        body is framed, drop the body, then run query()."""
        self.log = RequestLog(self.key, self.started, 'query')
        url_path, _, query_string = self.path.partition('?')
        self.url_path = url_path
        self.params = parse_qs(query_string, keep_blank_values=True,
                               errors='surrogateescape')
        problem = self.body_problem()
        if problem:
            log_arrival(self)
            self.fail(problem)
        elif self.body_length:
            if ('100-continue' in self.headers.get('expect', '').lower()
                    and self.request_version != 'HTTP/1.0'):
                self.wfile.write(CONTINUE)
                self.server.send_later(self)
            self.body_left = self.body_length
        else:
            self.run_query()

    def body_problem(self):
        """Set body_length from Content-Length; the error if the body's end
        cannot be known for sure, so the connection must close."""
        self.body_length = 0
        if 'transfer-encoding' in self.headers:
            return 'Transfer-Encoding %s is not supported' % (
                self.headers['transfer-encoding'][:MAX_SHOWN_CHARS])
        if 'content-length' not in self.headers:
            return None
        values = {v.strip() for v in self.headers['content-length'].split(',')}
        if len(values) != 1 or not DIGITS.fullmatch(next(iter(values))):
            return 'Content-Length %s is not one length' % (
                self.headers['content-length'][:MAX_SHOWN_CHARS])
        self.body_length = int(values.pop())
        if self.body_length > MAX_BODY_BYTES:
            return 'body of %d bytes is over %d' % (self.body_length,
                                                   MAX_BODY_BYTES)
        return None

    def run_query(self):
        try:
            errors = query(self)
        except Exception as error:
            self.log.exception('unexpected error')
            errors = ['internal error: %s' % type(error).__name__]
        self.answer(self.log, errors)

    def fail(self, reason):
        """Answer the current request with an error and close."""
        log = self.handler_log()
        log.error('%s; client=%s', reason, self.client)
        self.fail_with(log, reason)

    def fail_with(self, log, reason):
        self.close_connection = self.linger = True
        self.answer(log, [reason])

    def answer(self, log, errors):
        """Write the 200 answer and log it; the request is over."""
        if errors:
            body = json.dumps({'request': self.key, 'status': 'error',
                               'errors': errors}).encode()
        else:
            body = (OK_BODY % self.key).encode()
        if self.server.stopping and not self.close_connection:
            self.close_connection = self.linger = True
        if self.close_connection:
            connection = 'Connection: close\r\n'
        elif self.request_version == 'HTTP/1.0':
            connection = 'Connection: keep-alive\r\n'
        else:
            connection = ''
        head = ('%s 200 OK\r\nServer: %s\r\nDate: %s\r\n'
                'Content-Type: application/json\r\nContent-Length: %d\r\n'
                'X-Request-Id: %s\r\n%s\r\n'
                % (self.protocol_version, self.server_version,
                   self.server.date, len(body), self.key, connection))
        self.wfile.write(head.encode() if self.command == 'HEAD'
                         else head.encode() + body)
        closing = '; closing the connection' if self.close_connection else ''
        if errors:
            log.error('responded 200 status=error%s', closing)
        else:
            log.info('responded 200 status=ok%s', closing)
        self.log = log
        self.key = None
        self.server.send_later(self)


# -- The call chain ------------------------------------------------------------

class ValidationError(Exception):
    """A request that is well formed but not what the chain accepts."""


def log_arrival(request):
    """The first record of a request: what arrived.  The text goes in the
    message; the JSON format takes the same as fields."""
    fields = {'method': request.command, 'url': request.path,
              'params': request.params, 'client': request.client}
    text = '%s %s params=%s client=%s' % (
        request.command, request.path, READABLE_JSON(request.params),
        request.client)
    if request.body_length:
        fields['body_bytes'] = request.body_length
        text += ' body=%d' % request.body_length
    for name in ('x-request-id', 'traceparent'):
        if name in request.headers:
            value = request.headers[name][:MAX_SHOWN_CHARS]
            fields[name.replace('-', '_')] = value
            text += ' %s=%s' % (name, READABLE_JSON(value))
    request.log.info(text, extra={'fields': fields})


def query(request):
    """Log the incoming request, check method, path and parameters, then run
    the chain.  Returns the errors, each also logged; none if all went well."""
    log = request.log
    log_arrival(request)
    errors = []
    if request.command != 'GET':
        errors.append('method %s is not allowed' % request.command)
    if request.url_path != '/api':
        errors.append('path %s is not /api' % request.url_path)
    if '1' in request.params.get('invalid', ()):
        errors.append('parameter invalid=1')
    for error in errors:
        log.error(error)        # no arguments: a '%' in it is only text
    if errors:
        return errors
    try:
        process1(request)
        process2(request)
        process3(request)
    except ValidationError as error:
        return [str(error)]
    return []


def process1(request):
    """The first step of the work; a placeholder that logs."""
    request.log.child('process1').info('done')


def process2(request):
    """Validates: notawaiting=1 is an error, and the chain stops here."""
    log = request.log.child('process2')
    if '1' in request.params.get('notawaiting', ()):
        log.error('validation failed: notawaiting=1')
        raise ValidationError('validation failed: notawaiting=1')
    log.info('done')


def process3(request):
    """The last step of the work; a placeholder that logs."""
    request.log.child('process3').info('done')


# -- The server ----------------------------------------------------------------

class Server:
    """Listens, and runs the loop that drives every connection's Handler."""

    def __init__(self, address):
        host, port = address
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self.socket = socket.socket(family, kind, proto)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(sockaddr)
            self.socket.listen(LISTEN_BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self.waker, self.wake_sender = socket.socketpair()
        self.waker.setblocking(False)
        self.selector.register(self.waker, selectors.EVENT_READ)
        self.handlers = set()
        self.to_send = set()        # handlers with output, sent after the log
        self.stopping = False
        self.accepting = True
        self.resume_accept_at = 0.0
        self.date = email.utils.formatdate(usegmt=True)

    def url(self):
        host, port = self.server_address[:2]
        return 'http://%s:%d' % ('[%s]' % host if ':' in host else host, port)

    def serve_forever(self):
        """Run until shutdown() and until requests in flight are done."""
        stop_at = None
        next_sweep = 0.0
        while True:
            ready = self.selector.select(0 if self.to_send else SWEEP_INTERVAL)
            for key, events in ready:
                if key.fileobj is self.socket:
                    self.accept()
                elif key.fileobj is self.waker:
                    self.waker.recv(4096)
                else:
                    if events & selectors.EVENT_READ:
                        self.guard(key.data, key.data.on_readable)
                    if events & selectors.EVENT_WRITE:
                        self.send_later(key.data)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self.sweep(now)
            flush_log()
            to_send, self.to_send = self.to_send, set()
            for handler in to_send:
                self.guard(handler, handler.send_output)
            if self.stopping:
                if stop_at is None:
                    stop_at = now + SHUTDOWN_GRACE
                    self.stop_accepting()
                for handler in list(self.handlers):
                    if handler.idle():
                        handler.close()
                if not self.handlers:
                    break
                if now >= stop_at:
                    for handler in list(self.handlers):
                        if handler.key is not None:
                            handler.abandon('server stopping')
                        handler.close()
                    flush_log()
                    break

    def guard(self, handler, action):
        """Run one connection's action.  A bug must cost that connection, not
        the server: it is logged with its traceback and the connection closed."""
        if handler.closed:
            return
        try:
            action()
        except Exception:
            server_log().exception('unexpected error on the connection from'
                                   ' %s', handler.client)
            handler.close()

    def accept(self):
        while True:
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as error:
                # Most likely out of file descriptors (EMFILE): accepting
                # again at once would spin; try again in a moment.
                server_log().error('cannot accept connections: %s;'
                                   ' pausing %g s', error, ACCEPT_PAUSE)
                self.stop_accepting()
                self.resume_accept_at = time.monotonic() + ACCEPT_PAUSE
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler = Handler(sock, address, self)
            self.handlers.add(handler)
            self.selector.register(sock, selectors.EVENT_READ, handler)

    def stop_accepting(self):
        if self.accepting:
            self.accepting = False
            self.selector.unregister(self.socket)

    def sweep(self, now):
        """Once every SWEEP_INTERVAL: the Date header, accepting again after a
        pause, and every connection's deadline."""
        self.date = email.utils.formatdate(usegmt=True)
        if (not self.accepting and not self.stopping
                and now >= self.resume_accept_at):
            self.accepting = True
            self.selector.register(self.socket, selectors.EVENT_READ)
        for handler in list(self.handlers):
            if handler.expired(now):
                self.guard(handler, handler.expire)

    def send_later(self, handler):
        """Send handler's output once this round's log records are written."""
        self.to_send.add(handler)

    def forget(self, handler):
        self.handlers.discard(handler)
        self.selector.unregister(handler.request)

    def shutdown(self):
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self.stopping = True
        try:
            self.wake_sender.send(b'x')
        except OSError:
            pass        # the loop is already awake, or gone

    def server_close(self):
        self.selector.close()
        self.socket.close()
        self.waker.close()
        self.wake_sender.close()


# -- Main ----------------------------------------------------------------------

class SettingError(Exception):
    """A bad setting: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise SettingError(message)


def read_settings(argv, environ):
    parser = ArgumentParser(
        prog='kek', description='A request trap: answers every HTTP request'
        ' with 200 and logs its whole story under its arrival time.')
    parser.add_argument('--port', help='TCP port, 0-65535; 0 picks a free'
                        ' one (default: $PORT or %d)' % DEFAULT_PORT)
    parser.add_argument('--host', help='address to bind, IPv4 or IPv6'
                        ' (default: $HOST or %s)' % DEFAULT_HOST)
    args = parser.parse_args(argv)
    port_name, port = (('--port', args.port) if args.port is not None
                       else ('PORT', environ.get('PORT', str(DEFAULT_PORT))))
    if not DIGITS.fullmatch(port) or int(port) > 65535:
        raise SettingError('%s=%r is not a port number (0-65535)'
                           % (port_name, port))
    host_name, host = (('--host', args.host) if args.host is not None
                       else ('HOST', environ.get('HOST', DEFAULT_HOST)))
    log_format = environ.get('LOG_FORMAT', 'text')
    if log_format not in LOG_FORMATS:
        raise SettingError('LOG_FORMAT=%r is not one of %s'
                           % (log_format, ', '.join(LOG_FORMATS)))
    return {'host': host, 'host_name': host_name, 'port': int(port),
            'port_name': port_name, 'log_format': log_format,
            'log_file': environ.get('LOG_FILE') or None}


def main(argv=None, environ=os.environ):
    try:
        settings = read_settings(argv, environ)
        try:
            writer = LogWriter(settings['log_file'])
        except OSError as error:
            raise SettingError('LOG_FILE=%r cannot be opened: %s'
                               % (settings['log_file'], error))
        try:
            server = Server((settings['host'], settings['port']))
        except OSError as error:
            raise SettingError('cannot listen on %s=%r %s=%d: %s' % (
                settings['host_name'], settings['host'],
                settings['port_name'], settings['port'], error))
    except SettingError as error:
        report(error)
        return 2
    formatter = JsonFormatter if settings['log_format'] == 'json' else TextFormatter
    writer.setFormatter(formatter())
    LOGGER.addHandler(writer)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: server.shutdown())
    server_log().info('listening on %s', server.url())
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server_log().info('stopped')
        writer.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
