"""kek: a request trap.

kek listens on PORT, answers every HTTP request with 200 and logs the whole
story of each request on lines that all start with the request's key, its
arrival time, so that one grep pulls it out:

    PORT=8001 python kek.py
    grep '^2026-11-26T17:42:17.123401Z ' kek.log

One thread runs a selectors loop over every connection.  A connection is a
BaseHTTPRequestHandler fed from memory: the stock handle_one_request() gets
one complete request head at a time and calls parse_request(), then do_GET
(or the fallback that serves every other method), so a client that sends
slowly, or not at all, costs a little memory and no thread.  Everything
about one request lives in a Request, which query() and the chain get.  The
log records of one loop round are written before any answer of that round
is sent: a client that got its answer can find its whole chain in the log.

The file reads top-down: settings, keys, logging, what is never logged,
parsing and framing, the connection, the call chain, the server, main.
"""

import argparse
import email.utils
import hashlib
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
MAX_PORT = 65535
LOG_FORMATS = ('text', 'json')
LOG_HEADERS_VALUES = ('on', 'off')
DEFAULT_LOG_BODY = 1024         # bytes of each body shown on its body record

# At most 65536: the stock handle_one_request() answers a longer request
# line itself, with a 414.
MAX_HEAD_BYTES = 64 * 1024      # request line and header lines together
MAX_HEADERS = 100
MAX_METHOD_CHARS = 32           # longer "methods" are taken for junk at once
MAX_BODY_BYTES = 1024 * 1024    # bodies are read and dropped, never kept
MAX_SHOWN_CHARS = 200           # client text only shown (a header value, a bad line) is cut here
MAX_SCHEME_CHARS = 32           # an Authorization scheme longer than this may be the secret
MAX_LENGTH_DIGITS = 15          # a longer Content-Length is refused unread
MAX_CHUNK_SIZE_DIGITS = 16      # hex digits of a chunk size, leading zeros included
MAX_CHUNK_LINE_BYTES = 4096     # a chunk-size line with its extensions
MAX_TRAILER_BYTES = 8 * 1024    # all trailer lines of a chunked body together

HEAD_TIMEOUT = 10.0     # seconds from a request's first byte to its blank line
IDLE_TIMEOUT = 10.0     # seconds without a byte either way: idle, slow body, unread answer
LINGER_TIMEOUT = 2.0    # after a closing answer, seconds to drop what still arrives
SHUTDOWN_GRACE = 3.0    # seconds requests in flight get to finish on SIGTERM
SWEEP_INTERVAL = 0.25   # seconds between checks of every connection's deadline
ACCEPT_PAUSE = 0.1      # seconds without accepting when out of file descriptors

LISTEN_BACKLOG = 1024           # the stock 5 resets bursts of connects
RECV_BYTES = 64 * 1024
MAX_PENDING_OUTPUT = 256 * 1024  # unsent answers before a client's requests wait


# What main() sets from LOG_HEADERS and LOG_BODY.
LOG_HEADERS = True
LOG_BODY = DEFAULT_LOG_BODY


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
            us = self.clock() // 1000
            if us <= self.last_us:
                us = self.last_us + 1
            self.last_us = us
            second, micro = divmod(us, 1000000)
            if second != self.second:
                self.second = second
                self.prefix = time.strftime('%Y-%m-%dT%H:%M:%S',
                                            time.gmtime(second))
            return f'{self.prefix}.{micro:06d}Z'


KEYS = Keys()


# -- Logging -------------------------------------------------------------------

LOGGER = logging.getLogger('kek')


def not_json(value):
    raise TypeError('%r is not JSON' % (value,))


# json.dumps(ensure_ascii=False), which keeps Cyrillic readable, with its C
# encoder made once: JSONEncoder.encode() makes a new one on every call,
# which cost a twentieth of a request (two to seven calls each).  The
# arguments are JSONEncoder.iterencode()'s: markers (None: no check for
# cycles, kek's values have none), default, the string encoder, indent,
# key separator, item separator, sort_keys, skipkeys, allow_nan.
JSON_CHUNKS = json.encoder.c_make_encoder(
    None, not_json, json.encoder.encode_basestring, None, ': ', ', ',
    False, False, True)


def to_json(value):
    """json.dumps(value, ensure_ascii=False), made faster."""
    return ''.join(JSON_CHUNKS(value, 0))


# Characters Python calls printable that show as nothing: Hangul fillers,
# the blank Braille pattern, Khmer inherent vowels, the grapheme joiner.
INVISIBLE = re.compile('[\u034f\u115f\u1160\u17b4\u17b5\u2800\u3164\uffa0]')


def shows_as_itself(text):
    """True if every character of text shows as itself on a line."""
    return text.isprintable() and (text.isascii()
                                   or INVISIBLE.search(text) is None)


def escape(text):
    """Return text that cannot split, forge or colour a log line.

    Printable characters stay (Cyrillic stays readable).  Control characters,
    line and paragraph separators, bidi overrides, invisible characters, bytes
    that were not UTF-8 (held as surrogates) and the backslash itself become
    backslash escapes.
    """
    if text.isascii() and text.isprintable() and '\\' not in text:
        return text         # the common case, checked first
    if shows_as_itself(text) and '\\' not in text:
        return text
    return ''.join(c if shows_as_itself(c) and c != '\\'
                   else c.encode('unicode_escape').decode('ascii')
                   for c in text)


def json_escape(char):
    code = ord(char)
    if code > 0xFFFF:       # a surrogate pair, as JSON spells it
        code -= 0x10000
        return '\\u%04x\\u%04x' % (0xD800 + (code >> 10), 0xDC00 + (code & 0x3FF))
    return '\\u%04x' % code


def json_text(value):
    """value as JSON that json.loads() reads back and that is safe on a log
    line: what JSON leaves raw but would not show as itself (bidi overrides,
    U+2028, DEL, invisible characters, surrogates) becomes a \\u escape."""
    text = to_json(value)
    if shows_as_itself(text):
        return text
    return ''.join(c if shows_as_itself(c) else json_escape(c) for c in text)


# The attributes of a LogRecord that no kek line shows: the same for every
# record instead of looked up for each one (the caller, the thread, the
# process).  A handler of one's own may have a stock Formatter that reads
# them from the record's __dict__ ('%(lineno)d'): Record.complete() puts
# them there for it.
RECORD_CONSTANTS = {
    'name': LOGGER.name, 'pathname': '(unknown file)', 'filename': '(unknown file)',
    'module': '(unknown module)', 'lineno': 0, 'funcName': None,
    'stack_info': None, 'exc_text': None, 'thread': None, 'threadName': None,
    'process': None, 'processName': None, 'taskName': None, 'msecs': 0.0,
    'relativeCreated': 0.0}


LEVEL_NAMES = {level: logging.getLevelName(level)
               for level in (logging.DEBUG, logging.INFO, logging.WARNING,
                             logging.ERROR, logging.CRITICAL)}


class Record(logging.LogRecord):
    """A LogRecord made lean: only what kek's formatters read.  The stock
    LogRecord's caller, thread and process lookups were the largest single
    cost of a request."""

    fields = None       # an arrival, body or refusal record's fields
    text_line = None    # the function that writes them on a text line

    def __init__(self, level, msg, args, exc_info, context, offset_ms, extra):
        self.__dict__.update(context)       # key, where, request
        if extra:
            self.__dict__.update(extra)
        self.offset_ms = offset_ms
        self.levelno = level
        self.levelname = LEVEL_NAMES[level]
        self.msg = msg
        self.args = args
        self.exc_info = exc_info

    def complete(self):
        """Add what a stock LogRecord has, for a handler of one's own."""
        self.__dict__.update(RECORD_CONSTANTS)
        self.created = time.time()


class RequestLog(logging.LoggerAdapter):
    """Logs for one request: each record carries the request's key, the place
    in the call chain that wrote it and the milliseconds since arrival.

    info(), error() and exception() make a lean Record and hand it to the
    logger's handlers themselves: the stock path through LoggerAdapter.log(),
    Logger.log() and Logger.handle() (its filters and hierarchy walk; kek's
    logger does not propagate) was a third of a request."""

    def __init__(self, key, started, where, request=True):
        # What LoggerAdapter.__init__() sets, without the call.
        self.logger = LOGGER
        self.extra = {'key': key, 'started': started, 'where': where,
                      'request': key if request else None}

    def log(self, level, msg, *args, exc_info=None, extra=None):
        self.emit(level, msg, args, exc_info, extra)

    def info(self, msg, *args, extra=None):
        self.emit(logging.INFO, msg, args, None, extra)

    def error(self, msg, *args, exc_info=None, extra=None):
        self.emit(logging.ERROR, msg, args, exc_info, extra)

    def exception(self, msg, *args, exc_info=True, extra=None):
        self.emit(logging.ERROR, msg, args, exc_info, extra)

    def emit(self, level, msg, args, exc_info, extra):
        if not self.logger.isEnabledFor(level):
            return
        offset_ms = (time.monotonic() - self.extra['started']) * 1000
        record = Record(level, msg, args, exc_info and sys.exc_info(),
                        self.extra, offset_ms, extra)
        for handler in self.logger.handlers:
            if level >= handler.level:
                if not isinstance(handler, LogWriter):
                    record.complete()
                handler.handle(record)

    def at(self, where):
        """The same request's log, written from another place."""
        log = RequestLog.__new__(RequestLog)
        log.logger = LOGGER
        log.extra = dict(self.extra, where=where)
        return log

    def child(self, name):
        """The log of a step called from here: WHERE becomes 'here>name'."""
        log = RequestLog.__new__(RequestLog)
        log.logger = LOGGER
        log.extra = dict(self.extra, where=self.extra['where'] + '>' + name)
        return log


def server_log():
    """A log for records that belong to no request (start, stop).

    Each record gets a key of its own from KEYS, so its line has the same
    shape as every other, and no request's key ever matches it.
    """
    return RequestLog(KEYS.next(), time.monotonic(), 'main', request=False)


class TextFormatter(logging.Formatter):
    """KEY +OFFSETms LEVEL WHERE MESSAGE, on one line: the message, with
    the traceback if any, escaped into it.  A record with fields (arrival,
    body, refusal) has a function that writes them on a text line, each
    value escaped in the grammar of its place."""

    def format(self, record):
        if record.exc_info:
            message = escape(self.with_traceback(record))
        elif record.text_line:
            message = record.text_line(record)
        else:
            message = escape(record.getMessage())
        return (f'{record.key} +{record.offset_ms:.3f}ms {record.levelname:<5}'
                f' {record.where} {message}')

    def with_traceback(self, record):
        """The message and its traceback, as they are: each format escapes."""
        return record.getMessage() + '\n' + self.formatException(record.exc_info)


class JsonFormatter(TextFormatter):
    """One JSON object a line: request, offset_ms, level, where, message, and
    the fields of arrival, body and refusal records (method, url, params,
    client, headers, sha256, ...).  Client text is escaped once, by JSON;
    the message of a record with fields is only a brief of them ("GET
    /api?x=1", "body 32 bytes").

    The key, level and WHERE are kek's own ASCII, so the line is put together
    around them and only the message and the fields go through the encoder.
    """

    def format(self, record):
        if record.exc_info:
            message = json_text(self.with_traceback(record))
        else:
            message = json_text(record.getMessage())
        line = ('{"request": %s, "offset_ms": %.3f, "level": "%s", "where": "%s",'
                ' "message": %s' % (
                    'null' if record.request is None else '"%s"' % record.key,
                    record.offset_ms, record.levelname, record.where, message))
        if record.request is None:      # a server record: its key is a time
            line += ', "time": "%s"' % record.key
        if record.fields:   # the fields' own object, its '{' dropped, ends it
            return line + ', ' + json_text(record.fields)[1:]
        return line + '}'


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
        self.reopen_requested = False
        self.fd = 1 if path is None else self.open()

    def open(self):
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def emit(self, record):
        """Keep the record's line for flush().  A list's append() needs no
        lock: a line another thread adds while flush() swaps the list lands
        in the old one, which is then written, or in the new one."""
        self.lines.append(self.formatter.format(record))

    # The stock handle() without its filters and lock, which cost as much as
    # the formatting.
    handle = emit

    def flush(self):
        lines = self.lines
        self.lines = []
        if self.path is not None and (lines or self.reopen_requested):
            self.reopen_if_moved()
        if not lines:
            return
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

    def request_reopen(self):
        """SIGHUP: reopen LOG_FILE before the next write, moved or not."""
        self.reopen_requested = True

    def reopen_if_moved(self):
        """Before every write: if LOG_FILE is no longer the file we hold
        (logrotate renamed or removed it, maybe creating a new one), open
        the path anew, so that no record lands in a rotated file.  One stat
        a loop round."""
        try:
            current = os.stat(self.path)
        except OSError:
            current = None
        opened = os.fstat(self.fd)
        if (not self.reopen_requested and current is not None
                and current.st_dev == opened.st_dev
                and current.st_ino == opened.st_ino):
            return
        self.reopen_requested = False
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


# -- What is never logged ------------------------------------------------------

TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"   # RFC 9110 token characters
TOKEN = re.compile(r"[%s]+" % TCHAR, re.ASCII)

# Header and form field names whose values are credentials: only their
# length is logged.  Literal words, so the search cannot backtrack.
SECRET_NAME = re.compile('token|secret|password|passwd|api-key|apikey|session'
                         '|auth|credential')


def shown(text):
    """Client text only shown (a header value, a bad line): cut at
    MAX_SHOWN_CHARS, and the cut said."""
    if len(text) <= MAX_SHOWN_CHARS:
        return text
    return '%s...(%d chars in all)' % (text[:MAX_SHOWN_CHARS], len(text))


def byte_count(text):
    """How many bytes the client sent for text (decoded with surrogateescape)."""
    return len(text) if text.isascii() else len(
        text.encode('utf-8', 'surrogateescape'))


def shown_header(name, value):
    """A header's value as the log shows it: credentials never, the rest cut
    at MAX_SHOWN_CHARS."""
    lower = name.lower()
    if lower == 'authorization' or lower == 'proxy-authorization':
        scheme, blank, credentials = value.partition(' ')
        if blank and len(scheme) <= MAX_SCHEME_CHARS and TOKEN.fullmatch(scheme):
            return '%s <%d bytes>' % (scheme, byte_count(credentials))
        return '<%d bytes>' % byte_count(value)
    if lower == 'cookie' or lower == 'set-cookie':
        names = [part.partition('=')[0].strip(' \t')
                 for part in value.split(';')]
        return '<cookies: %s>' % shown(', '.join(names))
    if SECRET_NAME.search(lower):
        return '<%d bytes>' % byte_count(value)
    return shown(value)


# -- Parsing and framing -------------------------------------------------------

METHOD_START = re.compile(rb"[%s]{0,%d}(?: |\Z)"
                          % (TCHAR.encode(), MAX_METHOD_CHARS))
REQUEST_LINE = re.compile(r"([%s]{1,%d}) (\S+) HTTP/1\.([01])"
                          % (TCHAR, MAX_METHOD_CHARS), re.ASCII)
# Any control character but tab.  Searched for once the CRLF line ends are
# gone, so it also finds a bare CR or LF.  One character class: no backtracking.
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
DIGITS = re.compile(r"[0-9]+")
HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]+")
CONTINUE = b'HTTP/1.1 100 Continue\r\n\r\n'


class Refused(Exception):
    """A request kek answers with this error and then closes the connection:
    its head does not parse, its body's framing is broken or too large, it
    is not HTTP/1.x at all, or it came too slowly.  After it, where the next
    request would start cannot be known."""


class Request:
    """Everything about one request.  It is made at the request's first byte,
    filled in as its head and body arrive, handed to query() and the chain,
    and dropped once its answer is written.  What is not known yet is None:
    the head's fields stay None until the whole head has parsed."""

    method = None       # 'GET', 'POST', 'FOO' ...
    target = None       # the request target exactly as sent: '/api?x=1'
    path = None         # the path the chain checks: '/api'
    params = None       # the query's parameters, {name: [value, ...]}
    version = None      # 'HTTP/1.1' or 'HTTP/1.0'
    headers = None      # {lower-case name: value}, repeated fields joined
    header_list = None  # [(name as sent, value), ...], in order
    keep_alive = False  # another request may follow on the connection
    declared = None     # the body's length as declared, or 'chunked'
    reader = None       # the reader of what is still to come: HeadReader,
                        # then the one the body's framing asks for
    body = None         # what the log shows of the body: a Body

    def __init__(self, key, started, client):
        self.key = key
        self.started = started          # time.monotonic() at the first byte
        self.client = client            # the peer, 'host:port'
        self.log = RequestLog(key, started, 'query')
        self.reader = HeadReader()


def starts_request(inbuf):
    """Drop the blank lines that may come before a request line (RFC 9112
    2.2); True if inbuf then starts a request, False if it holds nothing
    yet, or what may be the start of a PROXY v2 header, which begins like
    two blank lines."""
    if inbuf[0] != 13:          # not a CR: the common case
        return True
    if PROXY_V2_SIGNATURE.startswith(inbuf[:len(PROXY_V2_SIGNATURE)]):
        return len(inbuf) >= len(PROXY_V2_SIGNATURE)
    blank = 0
    while inbuf.startswith(b'\r\n', blank):
        blank += 2
    del inbuf[:blank]
    return bool(inbuf) and inbuf != b'\r'


class HeadReader:
    """Reads a request head: the request line and header lines up to the
    blank line.  Only new bytes are searched, so a client trickling its head
    byte by byte does not make every arrival rescan all of it."""

    def __init__(self):
        self.scanned = 0        # bytes of inbuf already searched

    def read(self, inbuf):
        """Take the head from inbuf once it is complete, each line with its
        CRLF; None until then.  Raises Refused for what cannot be the start
        of an HTTP/1.x request, or a head over MAX_HEAD_BYTES."""
        if inbuf[0] in FOREIGN_FIRST_BYTES:
            foreign = foreign_protocol(inbuf)
            if foreign:
                raise Refused('not an HTTP/1.x request: %s' % foreign)
        new = self.scanned
        end = inbuf.find(b'\r\n\r\n', max(0, new - 3))
        self.scanned = len(inbuf)
        size = len(inbuf) if end < 0 else end + 2
        if size > MAX_HEAD_BYTES:
            raise Refused('request head over %d bytes' % MAX_HEAD_BYTES)
        # Every LF among the new bytes must end a CRLF; else the head could
        # end, or a field start, where a front end sees none.
        if (inbuf.count(b'\n', new, size)
                != inbuf.count(b'\r\n', max(0, new - 1), size)):
            raise Refused('bare LF (not CRLF) in the request head')
        if end < 0:
            if not METHOD_START.match(inbuf):
                raise Refused('not an HTTP request: %s'
                              % as_text(inbuf[:MAX_SHOWN_CHARS]))
            return None
        head = bytes(inbuf[:end + 2])
        del inbuf[:end + 4]
        return head


def parse_head(request, head):
    """Parse a complete head (request line and header lines, each ended by
    CRLF) strictly, as RFC 9112 asks, into request; raises Refused.  Each
    step is linear in the head's size: no pattern here can backtrack."""
    problem = control_problem(head.replace(b'\r\n', b''))
    if problem:
        raise Refused('%s in the request head' % problem)
    lines = head.decode('utf-8', 'surrogateescape').split('\r\n')[:-1]
    match = REQUEST_LINE.fullmatch(lines[0])
    if not match:
        raise Refused("request line is not 'METHOD TARGET HTTP/1.x': %s"
                      % shown(lines[0]))
    method, target, minor = match.groups()
    if '#' in target:
        raise Refused('request target with a # fragment')
    if len(lines) - 1 > MAX_HEADERS:
        raise Refused('more than %d header lines' % MAX_HEADERS)
    headers = {}
    header_list = []
    hosts = 0
    for line in lines[1:]:
        field = split_field(line)
        if field is None:
            raise Refused("header line is not 'Name: value': %s" % shown(line))
        name, value = field
        header_list.append((name, value))
        name = name.lower()
        if name in headers:
            headers[name] += ', ' + value
        else:
            headers[name] = value
        if name == 'host':
            hosts += 1
    if hosts > 1 or (hosts == 0 and minor == '1'):
        raise Refused('%d Host headers in an HTTP/1.%s request' % (hosts, minor))
    connection = ()
    if 'connection' in headers:
        connection = {token.strip(' \t') for token in
                      headers['connection'].lower().split(',')}
    path, _, query = target.partition('?')
    request.method, request.target, request.version = (
        method, target, 'HTTP/1.' + minor)
    request.path = target_path(path)
    request.params = parse_query(query)
    request.headers, request.header_list = headers, header_list
    request.keep_alive = ('keep-alive' in connection if minor == '0'
                          else 'close' not in connection)


def split_field(line):
    """(name, value) of a header or trailer line 'Name: value', the value
    without the blanks around it; None if the line is not one."""
    name, colon, value = line.partition(':')
    if not colon or not TOKEN.fullmatch(name):
        return None
    return name, value.strip(' \t')


def control_problem(data):
    """The error for a control character in data, or None if it has none."""
    match = CONTROL.search(data)
    if match is None:
        return None
    char = match.group()
    if char == b'\r':
        return 'bare CR (not CRLF)'
    return 'control character 0x%02x' % char[0]


def parse_query(query):
    """The query's parameters, as parse_qs(keep_blank_values=True) gives
    them: repeated names kept, values percent-decoded, bytes that are not
    UTF-8 kept as surrogates.  Most queries have nothing to decode, and are
    split here at a fifth of parse_qs's cost."""
    if '%' in query or '+' in query:
        return parse_qs(query, keep_blank_values=True, errors='surrogateescape')
    params = {}
    for field in query.split('&'):
        if field:
            name, _, value = field.partition('=')
            if name in params:
                params[name].append(value)
            else:
                params[name] = [value]
    return params


def target_path(path):
    """The path of a request target (the part before '?') as sent; the
    absolute form that proxies send (http://host/api) names its path after
    the authority."""
    if path.startswith('/'):
        return path             # the origin form, by far the most common
    scheme, sep, rest = path.partition('://')
    if sep and scheme.lower() in ('http', 'https'):
        return '/' + rest.partition('/')[2]
    return path


def body_reader(request):
    """The reader for the request's body, or None if it has none.  Raises
    Refused if the body's end cannot be known for sure, or is too far."""
    coding = request.headers.get('transfer-encoding')
    length = request.headers.get('content-length')
    if coding is not None:
        if request.version == 'HTTP/1.0':
            raise Refused('Transfer-Encoding on an HTTP/1.0 request')
        if length is not None:
            raise Refused('Transfer-Encoding together with Content-Length')
        if coding.lower() != 'chunked':
            raise Refused('Transfer-Encoding %s is not supported, only'
                          ' chunked' % shown(coding))
        request.declared = 'chunked'
        return ChunkedReader()
    if length is None:
        return None
    # Equal repeated values are one length (RFC 9110 8.6); spaces and tabs
    # around each are allowed, and nothing else.
    values = {value.strip(' \t') for value in length.split(',')}
    value = values.pop() if len(values) == 1 else ''
    if not DIGITS.fullmatch(value):
        raise Refused('Content-Length %s is not one length' % shown(length))
    if len(value) > MAX_LENGTH_DIGITS:      # before int() reads them all
        raise Refused('Content-Length of %d digits is over %d'
                      % (len(value), MAX_LENGTH_DIGITS))
    size = request.declared = int(value)
    if size > MAX_BODY_BYTES:
        raise Refused('body of %d bytes is over %d' % (size, MAX_BODY_BYTES))
    return LengthReader(size) if size else None


class Body:
    """What the log shows of a request body, fed the decoded bytes as they
    arrive: size, SHA-256 and the first `keep` bytes.  The body itself is
    never kept, so a connection's memory is bounded by `keep`."""

    def __init__(self, keep):
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.keep = keep
        self.preview = bytearray()

    def add(self, data):
        self.size += len(data)
        self.sha256.update(data)
        if len(self.preview) < self.keep:
            self.preview += data[:self.keep - len(self.preview)]


class LengthReader:
    """Reads a body of Content-Length bytes."""

    def __init__(self, length):
        self.left = length

    def read(self, inbuf, body):
        """Move the body's bytes from inbuf into body; True once all came."""
        data = inbuf[:self.left]
        del inbuf[:len(data)]
        self.left -= len(data)
        body.add(data)
        return not self.left

    def missing(self):
        return '%d body bytes missing' % self.left


# The steps of a chunked body (RFC 9112 7.1).
CHUNK_SIZE = 'chunk size'       # a chunk-size line, with extensions
CHUNK_DATA = 'chunk data'
CHUNK_END = 'chunk end'         # the CRLF after a chunk's data
TRAILER = 'trailer'             # trailer lines, up to a blank line


class ChunkedReader:
    """Reads a chunked body, decoding it into body as bytes arrive.

    Chunk extensions and trailer fields are checked and dropped.  A line is
    searched only in its new bytes, and never past its limit, so a client
    trickling a line that never ends costs linear time and bounded memory.
    """

    def __init__(self):
        self.step = CHUNK_SIZE
        self.left = 0               # bytes of the current chunk's data to come
        self.scanned = 0            # bytes of an unfinished line already searched
        self.trailer_bytes = 0
        self.trailer_lines = 0

    def read(self, inbuf, body):
        """Decode what inbuf holds into body; True once the body is complete.
        Raises Refused on the first byte that breaks the framing."""
        while inbuf:
            if self.step is CHUNK_DATA:
                data = inbuf[:self.left]
                del inbuf[:len(data)]
                self.left -= len(data)
                body.add(data)
                if not self.left:
                    self.step = CHUNK_END
            elif self.step is CHUNK_END:
                if inbuf == b'\r':
                    return False        # its LF is still on the way
                if not inbuf.startswith(b'\r\n'):
                    raise Refused('chunk data not followed by CRLF')
                del inbuf[:2]
                self.step = CHUNK_SIZE
            elif self.step is CHUNK_SIZE:
                line = self.take_line(inbuf, MAX_CHUNK_LINE_BYTES,
                                      'chunk size line')
                if line is None:
                    return False
                self.start_chunk(line, body)
            else:
                line = self.take_line(inbuf, MAX_TRAILER_BYTES
                                      - self.trailer_bytes, 'trailer')
                if line is None:
                    return False
                if not line:
                    return True
                self.check_trailer(line)
        return False

    def take_line(self, inbuf, limit, what):
        """Take one CRLF-ended line from inbuf, without its CRLF; None if
        it has not all arrived yet."""
        end = inbuf.find(b'\n', self.scanned, limit + 2)
        if end < 0:
            if len(inbuf) > limit + 1:
                raise Refused('%s over %d bytes' % (what, limit))
            self.scanned = len(inbuf)
            return None
        self.scanned = 0
        line = bytes(inbuf[:end + 1])
        del inbuf[:end + 1]
        problem = (control_problem(line[:-2]) if line.endswith(b'\r\n')
                   else 'bare LF (not CRLF)')
        if problem:
            raise Refused('%s in a %s' % (problem, what))
        return line[:-2]

    def start_chunk(self, line, body):
        size, _, extensions = line.partition(b';')
        if extensions:
            size = size.rstrip(b' \t')      # BWS before the ';'
        if (len(size) > MAX_CHUNK_SIZE_DIGITS
                or not HEX_DIGITS.fullmatch(size)):
            raise Refused('chunk size %s is not 1 to %d hex digits' % (
                shown(size.decode('latin-1')), MAX_CHUNK_SIZE_DIGITS))
        self.left = int(size, 16)
        if body.size + self.left > MAX_BODY_BYTES:
            raise Refused('chunked body over %d bytes' % MAX_BODY_BYTES)
        self.step = CHUNK_DATA if self.left else TRAILER

    def check_trailer(self, line):
        self.trailer_bytes += len(line) + 2
        self.trailer_lines += 1
        if self.trailer_lines > MAX_HEADERS:
            raise Refused('more than %d trailer lines' % MAX_HEADERS)
        if split_field(line.decode('latin-1')) is None:
            raise Refused("trailer line is not 'Name: value': %s"
                          % shown(line.decode('latin-1')))

    def missing(self):
        return 'chunked body not complete (%s)' % self.step


# What other protocols send first, to name them when they reach kek.
PROXY_V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
HTTP2_PREFACE = b'PRI * HTTP/2.0'
FOREIGN_FIRST_BYTES = b'\x16P\r'      # TLS, the HTTP/2 PRI or PROXY, PROXY v2


def foreign_protocol(data):
    """What non-HTTP/1 traffic data starts with, or None."""
    if data.startswith(b'\x16\x03'):
        name = tls_server_name(data)
        return 'a TLS handshake on a plain HTTP port, %s' % (
            'server name %s' % shown(as_text(name)) if name
            else 'no server name in its first bytes')
    if data.startswith(HTTP2_PREFACE):
        return 'the HTTP/2 connection preface (PRI * HTTP/2.0)'
    if data.startswith(b'PROXY '):
        return 'a PROXY protocol v1 header: %s' % shown(as_text(
            data[:MAX_HEAD_BYTES].partition(b'\r\n')[0]))
    if data.startswith(PROXY_V2_SIGNATURE):
        return 'a PROXY protocol v2 header'
    return None


def tls_server_name(data):
    """The server name (SNI) a TLS ClientHello in data asks for, or None if
    the bytes at hand do not hold one.  Each step moves forward, so this is
    linear in the bytes read."""
    def number(at, size):
        if at + size > len(data):
            raise IndexError(at)
        return int.from_bytes(data[at:at + size], 'big')
    try:
        if number(5, 1) != 1:                   # not a ClientHello
            return None
        at = 5 + 4 + 2 + 32     # record and handshake headers, version, random
        at += 1 + number(at, 1)                 # session id
        at += 2 + number(at, 2)                 # cipher suites
        at += 1 + number(at, 1)                 # compression methods
        end = at + 2 + number(at, 2)            # the extensions
        at += 2
        while at + 4 <= end:
            kind, size = number(at, 2), number(at + 2, 2)
            if kind == 0:   # server_name: list length, name type, name length
                length = number(at + 7, 2)
                name = bytes(data[at + 9:at + 9 + length])
                return name if name and len(name) == length else None
            at += 4 + size
    except IndexError:
        pass
    return None


def as_text(data):
    """Client bytes as text for a message; bytes that are not UTF-8 are kept
    as surrogates, which escape() shows as \\udcXX."""
    return bytes(data).decode('utf-8', 'surrogateescape')


# -- The connection ------------------------------------------------------------

# A connection's states.  A connection moves only as MOVES allows (h11's
# _state.py keeps its table the same way), so a mistake in the order of
# things raises instead of leaving a connection half done.
IDLE = 'idle'           # between requests: waiting for a request's first byte
HEAD = 'head'           # a request has begun: waiting for its blank line
BODY = 'body'           # reading the request's body through its reader
CLOSING = 'closing'     # the last answer is written and nothing more is
                        # expected: send it, then close
DRAINING = 'draining'   # the last answer is written, but the client may still
                        # be sending: drop what arrives, send the answer,
                        # half-close, then linger
FINISHING = 'finishing'  # the client has half-closed: send what waits, close
LINGER = 'linger'       # half-closed: dropping what still arrives until
                        # LINGER_TIMEOUT (closing at once could reset the
                        # connection and destroy the answer)
CLOSED = 'closed'

MOVES = {
    IDLE: {HEAD, FINISHING, CLOSED},
    HEAD: {BODY, IDLE, CLOSING, DRAINING, CLOSED},
    BODY: {IDLE, CLOSING, DRAINING, CLOSED},
    CLOSING: {DRAINING, FINISHING, CLOSED},
    DRAINING: {FINISHING, LINGER, CLOSED},
    FINISHING: {CLOSED},
    LINGER: {CLOSED},
    CLOSED: set(),
}
SERVING = (IDLE, HEAD, BODY)            # states that read requests
DROPPING = (CLOSING, DRAINING, LINGER)  # states that drop what arrives


class OutputBuffer(bytearray):
    """The connection's wfile: what it writes waits here until the loop
    sends it, after the round's log records are written."""

    def write(self, data):
        self.extend(data)

    def flush(self):
        pass


class Connection(BaseHTTPRequestHandler):
    """One client connection, driven by the loop: receive() takes what
    arrives, serve() runs the requests it completes, send_output() sends
    their answers.  Each complete head goes through the stock
    handle_one_request(), which calls parse_request(), then do_GET or the
    fallback for every other method; a body then goes to the reader its
    framing asks for.

    self.connection is the socket, as in StreamRequestHandler; self.request
    is the request under way, a Request: what query(request) gets.
    """

    def __init__(self, sock, client_address, server):
        # The stock __init__ would block in handle() until the client leaves.
        self.connection = sock
        self.client_address = client_address
        self.server = server
        host, port = client_address[:2]
        self.client = ('[%s]:%d' if ':' in host else '%s:%d') % (host, port)
        self.state = IDLE
        self.request = None       # the request under way
        self.log = None           # the latest request's: news of the
                                  # connection is told there
        self.inbuf = bytearray()
        self.wfile = OutputBuffer()
        self.dropped = 0          # bytes that arrived after the last request
        self.dropped_start = b''  # the start of the first of them, to show
        self.active_at = time.monotonic()   # the last progress either way
        self.linger_until = 0.0
        self.events = selectors.EVENT_READ  # what the loop watches it for

    @property
    def command(self):
        """The request's method: the stock handle_one_request() dispatches
        on it."""
        return self.request.method

    def __getattr__(self, name):
        """Every other method (POST, HEAD, FOO ...) is served by do_GET."""
        if name.startswith('do_'):
            return self.do_GET
        raise AttributeError(name)

    def move(self, state):
        """The one place the state changes, checked against MOVES."""
        if state not in MOVES[self.state]:
            raise RuntimeError('a connection cannot go from %s to %s'
                               % (self.state, state))
        self.state = state

    # What the loop calls.

    def receive(self):
        """Take what the client sent; True if it left bytes to serve."""
        try:
            data = self.connection.recv(RECV_BYTES)
        except BlockingIOError:
            return False
        except OSError:
            data = b''          # reset by the client: it is gone
        if not data:
            self.end_of_input()
            return False
        if self.state in DROPPING:
            if self.state is CLOSING:
                self.move(DRAINING)     # it is still sending: linger after
            self.drop(data)     # not progress: only sending the answer is
            return False
        # Between requests only a request's first byte is progress (begin()
        # counts it), not blank lines: else two bytes every few seconds
        # would hold a connection open for ever.
        if self.state is not IDLE:
            self.active_at = time.monotonic()
        self.inbuf += data
        return True

    def serve(self):
        """Serve every request that is complete in inbuf, in order, while
        there is room for their answers."""
        try:
            while (self.inbuf and len(self.wfile) < MAX_PENDING_OUTPUT
                   and self.state in SERVING):
                if self.state is IDLE and not self.begin():
                    return
                if self.state is BODY:
                    if not self.read_body():
                        return
                elif not self.take_head():
                    return
        except Refused as refusal:
            self.refuse(str(refusal))

    def send_output(self):
        """Send what the socket takes; once the last answer is out, close or
        half-close.  True if requests that waited for room can be served."""
        was_full = len(self.wfile) >= MAX_PENDING_OUTPUT
        if self.wfile:
            try:
                sent = self.connection.send(self.wfile)
            except BlockingIOError:
                sent = 0
            except OSError as error:
                self.log.at('handler').error(
                    'client gone before its answer was sent: %s', error)
                self.close()
                return False
            if sent:
                del self.wfile[:sent]
                self.active_at = time.monotonic()
        if not self.wfile:
            if self.state is CLOSING or self.state is FINISHING:
                self.close()        # nothing more is coming: a plain FIN
            elif self.state is DRAINING:
                self.half_close()
        return (was_full and len(self.wfile) < MAX_PENDING_OUTPUT
                and self.state in SERVING and bool(self.inbuf))

    def wants(self):
        """What to watch for: room to send while output waits, bytes while
        the client may send and its answers do not pile up."""
        events = selectors.EVENT_WRITE if self.wfile else 0
        if self.state is not FINISHING and len(self.wfile) < MAX_PENDING_OUTPUT:
            events |= selectors.EVENT_READ
        return events

    def expired(self, now):
        if self.state is LINGER:
            return now >= self.linger_until
        if self.state is HEAD and now >= self.request.started + HEAD_TIMEOUT:
            return True
        return now >= self.active_at + IDLE_TIMEOUT

    def expire(self):
        """The connection missed its deadline: say why, if a request or an
        answer was under way, and close."""
        if self.wfile:
            self.log.at('handler').error('client did not read its answer for'
                                         ' %g s; connection closed', IDLE_TIMEOUT)
            self.close()
        elif self.state is BODY:
            self.refuse('request body stalled: no byte for %g s, %s'
                        % (IDLE_TIMEOUT, self.request.reader.missing()))
        elif self.state is HEAD:
            self.refuse('request head not complete within %g s (%d bytes'
                        ' received)' % (HEAD_TIMEOUT, len(self.inbuf)))
        else:
            self.close()

    def idle(self):
        """True when closing the connection loses nothing: no request under
        way, none waiting in inbuf, and no answer waiting to be sent."""
        return (self.state is IDLE or self.state is LINGER) and not (
            self.wfile or self.inbuf)

    def abandon(self, reason):
        """Close in the middle of a request that cannot be answered."""
        request = self.request
        log = request.log.at('handler')
        if self.state is BODY:
            log_arrival(request)
            log.error('%s; %s', reason, request.reader.missing())
        else:
            log.error('%s before the request head was complete (%d bytes'
                      ' received)', reason, len(self.inbuf))
        self.close()

    def close(self):
        if self.state is CLOSED:
            return
        if self.dropped:
            self.log.at('handler').error(
                '%d bytes after the last request dropped unread: %s',
                self.dropped, as_text(self.dropped_start))
        self.move(CLOSED)
        self.server.forget(self)
        self.connection.close()

    # A request, from its first byte to its answer.

    def begin(self):
        """Start a request at inbuf's first byte that can start one."""
        if not starts_request(self.inbuf):
            return False
        self.move(HEAD)
        started = self.active_at = time.monotonic()
        self.request = Request(KEYS.next(), started, self.client)
        self.log = self.request.log
        return True

    def take_head(self):
        """Run the request whose head is complete in inbuf; False if none is."""
        head = self.request.reader.read(self.inbuf)
        if head is None:
            return False
        self.rfile = io.BytesIO(head)
        self.handle_one_request()
        return True

    def parse_request(self):
        """The stock handle_one_request() calls this: parse the head into the
        request (or raise Refused), so that do_GET or the fallback runs."""
        head = self.raw_requestline + self.rfile.read()
        self.rfile = self.raw_requestline = None    # the head is the request's
        parse_head(self.request, head)
        return True

    def do_GET(self):
        """Every request that parses comes here, GET or not: its body's
        reader is chosen, and the chain runs once the body has all come."""
        request = self.request
        request.reader = body_reader(request)
        if request.reader is None:
            self.run_chain()
            return
        if ('100-continue' in request.headers.get('expect', '').lower()
                and request.version != 'HTTP/1.0'):
            self.wfile.write(CONTINUE)
        request.body = Body(LOG_BODY)
        self.move(BODY)

    def read_body(self):
        """Feed inbuf to the body reader; False if it needs more bytes."""
        request = self.request
        if not request.reader.read(self.inbuf, request.body):
            return False
        self.run_chain()
        return True

    def run_chain(self):
        request = self.request
        try:
            errors = query(request)
        except Exception as error:
            request.log.exception('unexpected error')
            errors = ['internal error: %s' % type(error).__name__]
        self.answer(errors, request.log)

    def refuse(self, reason):
        """The one way a request is refused: its arrival if its head parsed,
        the reason, the 200 answer with it, then the close."""
        request = self.request
        log = request.log.at('handler')
        if request.method is not None:
            log_arrival(request)
        log.error('refused: %s' % reason, extra={
            'fields': {'client': self.client}, 'text_line': refusal_text})
        del self.inbuf[:]       # what it still holds belongs to this request
        self.answer([reason], log, refused=True)

    def answer(self, errors, log, refused=False):
        """Write the 200 answer and log it: the request is over."""
        request = self.request
        closing = refused or not request.keep_alive or self.server.stopping
        self.wfile.write(answer_bytes(request, errors, closing, self.server.date))
        said = '; closing the connection' if closing else ''
        if errors:
            log.error('responded 200 status=error%s', said)
        else:
            log.info('responded 200 status=ok%s', said)
        self.request = None
        self.log = log
        if not closing:
            self.move(IDLE)
        elif refused or self.inbuf:
            self.drop(self.inbuf)       # pipelined after the last request
            del self.inbuf[:]
            self.move(DRAINING)
        else:
            self.move(CLOSING)

    # After the last answer.

    def drop(self, data):
        """Count, and keep the start of, bytes that arrive after the last
        request: they are never read as a request."""
        if data and not self.dropped:
            self.dropped_start = bytes(data[:MAX_SHOWN_CHARS])
        self.dropped += len(data)

    def end_of_input(self):
        """The client has sent all it will send (or reset the connection)."""
        if self.state is HEAD or self.state is BODY:
            self.abandon('the client closed the connection')
        elif self.wfile:
            self.move(FINISHING)    # send what it asked for, then close
        else:
            self.close()

    def half_close(self):
        """Shut our side once the last answer is out, and drop what still
        arrives for LINGER_TIMEOUT."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:         # reset by the client meanwhile
            self.close()
            return
        self.move(LINGER)
        self.linger_until = time.monotonic() + LINGER_TIMEOUT


# What json.dumps() gives for the ok body; formatting it costs a tenth.
OK_BODY = '{"request": "%s", "status": "ok"}\n'
# The Server header names no Python version.
ANSWER_HEAD = ('HTTP/1.1 200 OK\r\nServer: kek\r\nDate: %s\r\n'
               'Content-Type: application/json\r\nContent-Length: %d\r\n'
               'X-Content-Type-Options: nosniff\r\nX-Request-Id: %s\r\n%s\r\n')


def answer_bytes(request, errors, closing, date):
    """The whole 200 answer to request: its head, and its JSON body unless
    the method was HEAD.  The body is ASCII (json.dumps() escapes the
    rest), so its length in characters is its length in bytes."""
    if errors:
        body = json.dumps({'request': request.key, 'status': 'error',
                           'errors': errors}) + '\n'
    else:
        body = OK_BODY % request.key
    if closing:
        connection = 'Connection: close\r\n'
    elif request.version == 'HTTP/1.0':
        connection = 'Connection: keep-alive\r\n'
    else:
        connection = ''
    head = ANSWER_HEAD % (date, len(body), request.key, connection)
    return (head if request.method == 'HEAD' else head + body).encode()


# -- The call chain ------------------------------------------------------------

class ValidationError(Exception):
    """A request that is well formed but not what the chain accepts."""


def log_arrival(request):
    """The first record of a request: what arrived, as fields.  Each format
    writes them in its own grammar, so each value is escaped once: JSON
    as they are, a text line through arrival_text()."""
    fields = {'method': request.method, 'url': request.target,
              'params': request.params, 'client': request.client}
    if request.declared == 'chunked':
        fields['transfer_encoding'] = 'chunked'
    elif request.declared:
        fields['body_bytes'] = request.declared
    for name in ('x-request-id', 'traceparent'):
        if name in request.headers:
            fields[name.replace('-', '_')] = shown(request.headers[name])
    if LOG_HEADERS:
        fields['headers'] = [(name, shown_header(name, value))
                             for name, value in request.header_list]
    request.log.info('%s %s' % (request.method, request.target),
                     extra={'fields': fields, 'text_line': arrival_text})


def arrival_text(record):
    """The arrival on a text line: the URL as text, the parameters, the
    client's ids and the headers as JSON."""
    fields = record.fields
    text = '%s %s params=%s client=%s' % (
        fields['method'], escape(fields['url']), json_text(fields['params']),
        fields['client'])
    if 'transfer_encoding' in fields:
        text += ' body=chunked'
    elif 'body_bytes' in fields:
        text += ' body=%d' % fields['body_bytes']
    for name in ('x_request_id', 'traceparent'):
        if name in fields:
            text += ' %s=%s' % (name.replace('_', '-'), json_text(fields[name]))
    if 'headers' in fields:
        text += ' headers=' + json_text(fields['headers'])
    return text


def log_body(request):
    """The body record, once a body has arrived whole: its size (decoded,
    for either framing), type, SHA-256 and first LOG_BODY bytes.  A form's
    fields are shown like the query's, secret-looking ones by length only."""
    body = request.body
    fields = {'body_bytes': body.size,
              'content_type': shown(request.headers.get('content-type', '')),
              'sha256': body.sha256.hexdigest()}
    if body.keep:
        preview = as_text(body.preview)
        media_type = fields['content_type'].partition(';')[0].strip(' \t')
        if media_type.lower() == 'application/x-www-form-urlencoded':
            fields['form'] = {
                name: ['<%d bytes>' % byte_count(value) for value in values]
                if SECRET_NAME.search(name.lower()) else values
                for name, values in parse_qs(
                    preview, keep_blank_values=True,
                    errors='surrogateescape').items()}
        else:
            fields['preview'] = preview
        if body.size > len(body.preview):
            fields['preview_bytes'] = len(body.preview)
    request.log.info('body %d bytes' % body.size,
                     extra={'fields': fields, 'text_line': body_text})


def body_text(record):
    """The body record on a text line: the type and preview or form as
    JSON."""
    fields = record.fields
    text = 'body %d bytes type=%s sha256=%s' % (
        fields['body_bytes'], json_text(fields['content_type']),
        fields['sha256'])
    if 'form' in fields:
        text += ' form=' + json_text(fields['form'])
    elif 'preview' in fields:
        text += ' preview=' + json_text(fields['preview'])
    if 'preview_bytes' in fields:
        text += ' (the first %d bytes)' % fields['preview_bytes']
    return text


def refusal_text(record):
    """A refusal on a text line: the peer first, then why."""
    return 'client=%s %s' % (record.fields['client'],
                             escape(record.getMessage()))


def query(request):
    """Log the incoming request, check method, path and parameters, then run
    the chain.  Returns the errors, each also logged; none if all went well."""
    log = request.log
    log_arrival(request)
    if request.body is not None:
        log_body(request)
    errors = []
    if request.method != 'GET':
        errors.append('method %s is not allowed' % request.method)
    if request.path != '/api':
        errors.append('path %s is not /api' % request.path)
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
    """Listens, and runs the loop that drives every Connection.

    A round of the loop: take the bytes that arrived, give each connection
    with bytes to serve its turn, check deadlines, write the round's log
    records, then send the answers and watch each connection for what it
    waits for next.
    """

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
        self.connections = set()
        self.ready = set()          # connections with bytes to serve
        self.touched = set()        # connections that did something this round
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
            for key, events in self.selector.select(self.wait(next_sweep)):
                conn = key.data
                if key.fileobj is self.socket:
                    self.accept()
                elif key.fileobj is self.waker:
                    self.waker.recv(4096)
                else:
                    self.touched.add(conn)
                    if events & selectors.EVENT_READ:
                        self.run(conn, conn.receive)
            ready, self.ready = self.ready, set()
            for conn in ready:
                self.touched.add(conn)
                self.run(conn, conn.serve)
            now = time.monotonic()
            if not self.accepting and not self.stopping and now >= self.resume_accept_at:
                self.accepting = True
                self.selector.register(self.socket, selectors.EVENT_READ)
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self.sweep(now)
            flush_log()
            touched, self.touched = self.touched, set()
            for conn in touched:
                self.run(conn, conn.send_output)
                if conn.state is not CLOSED:
                    self.watch(conn)
            if self.stopping:
                if stop_at is None:
                    stop_at = now + SHUTDOWN_GRACE
                    self.stop_accepting()
                for conn in list(self.connections):
                    if conn.idle():
                        conn.close()
                if not self.connections:
                    break
                if now >= stop_at:
                    for conn in list(self.connections):
                        if conn.state is HEAD or conn.state is BODY:
                            conn.abandon('server stopping')
                        conn.close()
                    flush_log()
                    break

    def wait(self, next_sweep):
        """How long select() may wait: not at all while connections have
        bytes to serve, else until the next sweep or the end of a pause."""
        if self.ready:
            return 0
        wake_at = next_sweep
        if not self.accepting and not self.stopping:
            wake_at = min(wake_at, self.resume_accept_at)
        return max(0.0, wake_at - time.monotonic())

    def run(self, conn, action):
        """Run one connection's action.  A bug must cost that connection, not
        the server: it is logged with its traceback and the connection closed."""
        if conn.state is CLOSED:
            return
        try:
            if action():
                self.ready.add(conn)
        except Exception:
            server_log().exception('unexpected error on the connection from'
                                   ' %s', conn.client)
            conn.close()

    def watch(self, conn):
        """Watch conn for what it now waits for; a connection that still has
        bytes to serve is served next round without reading more."""
        events = conn.wants()
        if events != conn.events:
            conn.events = events
            self.selector.modify(conn.connection, events, conn)

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
            conn = Connection(sock, address, self)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def stop_accepting(self):
        if self.accepting:
            self.accepting = False
            self.selector.unregister(self.socket)

    def sweep(self, now):
        """Once every SWEEP_INTERVAL: the Date header and every connection's
        deadline."""
        self.date = email.utils.formatdate(usegmt=True)
        for conn in list(self.connections):
            if conn.expired(now):
                self.touched.add(conn)
                self.run(conn, conn.expire)

    def forget(self, conn):
        self.connections.discard(conn)
        self.ready.discard(conn)
        self.selector.unregister(conn.connection)

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


SETTINGS_HELP = """\
environment (an argument wins over its variable):
  PORT=N           TCP port, 0-%(max_port)d; 0 picks a free one (default %(port)d)
  HOST=H           address to bind, IPv4 or IPv6 (default %(host)s)
  LOG_FILE=PATH    append the log to PATH; reopened when moved away or on
                   SIGHUP (default: standard output)
  LOG_FORMAT=F     text or json (default text)
  LOG_HEADERS=X    on or off: every header on the arrival record, credentials
                   redacted (default on)
  LOG_BODY=N       bytes of each body shown on its body record, 0-%(max_body)d
                   (default %(body)d)

a text log line: KEY +OFFSETms LEVEL WHERE MESSAGE, where KEY is the request's
arrival time; grep '^KEY ' prints that request's whole story.
""" % {'port': DEFAULT_PORT, 'max_port': MAX_PORT, 'host': DEFAULT_HOST,
       'max_body': MAX_BODY_BYTES, 'body': DEFAULT_LOG_BODY}


def number_up_to(text, maximum):
    """True if text is a decimal number from 0 to maximum; its length is
    checked before int() reads it."""
    return (DIGITS.fullmatch(text) is not None
            and len(text) <= len(str(maximum)) and int(text) <= maximum)


def read_settings(argv, environ):
    """The settings from arguments and environment; SettingError names the
    first bad one."""
    parser = ArgumentParser(
        prog='kek', description='A request trap: answers every HTTP request'
        ' with 200 and logs its whole story under its arrival time.',
        epilog=SETTINGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--port', help='TCP port, 0-%d; 0 picks a free'
                        ' one (default: $PORT or %d)' % (MAX_PORT, DEFAULT_PORT))
    parser.add_argument('--host', help='address to bind, IPv4 or IPv6'
                        ' (default: $HOST or %s)' % DEFAULT_HOST)
    args = parser.parse_args(argv)
    port_name, port = (('--port', args.port) if args.port is not None
                       else ('PORT', environ.get('PORT', str(DEFAULT_PORT))))
    if not number_up_to(port, MAX_PORT):
        raise SettingError('%s=%r is not a port number (0-%d)'
                           % (port_name, port, MAX_PORT))
    host_name, host = (('--host', args.host) if args.host is not None
                       else ('HOST', environ.get('HOST', DEFAULT_HOST)))
    if not host:
        raise SettingError('%s=%r is empty: name an address, or leave it'
                           ' unset for %s' % (host_name, host, DEFAULT_HOST))
    log_file = environ.get('LOG_FILE')
    if log_file == '':
        raise SettingError("LOG_FILE='' is empty: name a file, or leave it"
                           " unset for standard output")
    log_format = environ.get('LOG_FORMAT', 'text')
    if log_format not in LOG_FORMATS:
        raise SettingError('LOG_FORMAT=%r is not one of %s'
                           % (log_format, ', '.join(LOG_FORMATS)))
    log_headers = environ.get('LOG_HEADERS', 'on')
    if log_headers not in LOG_HEADERS_VALUES:
        raise SettingError('LOG_HEADERS=%r is not one of %s'
                           % (log_headers, ', '.join(LOG_HEADERS_VALUES)))
    log_body = environ.get('LOG_BODY', str(DEFAULT_LOG_BODY))
    if not number_up_to(log_body, MAX_BODY_BYTES):
        raise SettingError('LOG_BODY=%r is not a number of bytes (0-%d)'
                           % (log_body, MAX_BODY_BYTES))
    return {'host': host, 'host_name': host_name, 'port': int(port),
            'port_name': port_name, 'log_format': log_format,
            'log_file': log_file, 'log_headers': log_headers == 'on',
            'log_body': int(log_body)}


def keep_standard_fds_open():
    """Put /dev/null where standard input, output or error is closed, so
    that neither the log file nor the listening socket becomes fd 1 or 2 and
    gets written to as if it were standard output or error."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free descriptor is fd: those below it are open.
            os.open(os.devnull, os.O_RDWR)


def main(argv=None, environ=os.environ):
    keep_standard_fds_open()
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
    global LOG_HEADERS, LOG_BODY
    LOG_HEADERS, LOG_BODY = settings['log_headers'], settings['log_body']
    formatter = JsonFormatter if settings['log_format'] == 'json' else TextFormatter
    writer.setFormatter(formatter())
    LOGGER.addHandler(writer)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: server.shutdown())
    signal.signal(signal.SIGHUP, lambda signum, frame: writer.request_reopen())
    server_log().info('listening on %s', server.url())
    if settings['log_file']:
        report('listening on %s, logging to %s' % (server.url(),
                                                   settings['log_file']))
    try:
        server.serve_forever()
    finally:
        server.server_close()
        server_log().info('stopped')
        writer.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
