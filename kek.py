"""kek: a request trap.

kek listens on PORT, answers every HTTP request with 200 and logs the whole
story of each request on lines that all start with the request's key, its
arrival time, so that one grep pulls it out:

    PORT=8001 python kek.py
    grep '^2026-11-26T17:42:17.123401Z ' kek.log

How it works.  One thread runs a selectors loop over every connection.  A
round of the loop (Server.round()) takes the bytes that arrived and serves
the requests they complete, at most MAX_REQUESTS_A_TURN a connection, checks
deadlines, writes the round's log records, then sends the answers: a client
that got its answer can find its whole chain in the log.  While the log
cannot take writes (LogWriter is WAITING) a round is Server.wait_for_log():
nothing is read or sent until it can.  At its connection limit, or out of
file descriptors, it closes the connection that makes the least progress (an
idle or trickling one before a body above MIN_BODY_RATE).  Slow or idle
clients cost a little memory and no thread; each connection's deadline() is
checked every SWEEP_INTERVAL.

With TLS_CERT set, a connection whose first byte is 0x16 shakes hands in
memory (a TLS: an ssl.SSLObject over two MemoryBIOs), inside the same loop
and under the same deadlines; what it decrypts goes where a plain
connection's bytes go, and its answers are encrypted on their way out.

A connection is a Connection, a BaseHTTPRequestHandler fed from memory: the
stock handle_one_request() gets one complete request head at a time and
calls parse_request(), then do_GET (or the fallback that serves every other
method).  Its life is a named state, moved only by the events of MOVES (h11
keeps its table so): greeting and handshake (TLS_CERT set), idle, head,
body, then after the last answer closing, draining, finishing, linger and
closed.  Everything about one request lives in a Request, made at its first
byte, handed to query() and the chain, and dropped once its answer is
written.

One request's path: bytes -> HeadReader.read() -> parse_head() (facts, or
Refused with its raw evidence) -> do_GET -> body_reader() -> LengthReader or
ChunkedReader feeding a Body (size, SHA-256, preview, parts, signatures) ->
query(request) -> log_arrival(), log_body() (fields from "What the log
shows") -> log_signatures(), log_preflight() -> process1/2/3 -> answer() ->
answer_bytes() -> LogWriter.flush() -> send.

With WORKERS=N the process that binds the port is a parent (Parent): it
forks N workers, each the one-process kek above on the inherited listener
with keys of its own (Keys: worker i takes the microseconds that are i
modulo N+1), and keeps them: restarts one that dies, passes signals on,
and relays their records to standard output a whole line at a time.

The file reads top-down, each section using only what came before it (but
the connection, which calls query() of the call chain after it):

    Settings                limits, and the Settings each setting declared once
    Text and HTTP grammar   JSON and escaping, tokens, unquote(), parse_query()
    Keys                    the arrival-time keys
    Reading requests        Request, the head, the body readers: facts only
    What the log shows      the only road from client bytes to a record
    Records                 RequestLog, the record kinds (TEXT_LINES), writer
    Signatures              webhook senders' HMACs checked as the body streams
    CORS                    the Access-Control-* answer, preflights named
    TLS                     HTTPS on the same port: the context, handshakes
    The connection          Connection, its states and moves
    The call chain          query(), process1(), process2(), process3()
    The server              the loop: rounds, sweeps, the stop step
    Processes               one serving process, or a parent and its workers
    Main                    settings read and checked, the server run
"""

import argparse
import base64
import binascii
import email.utils
import errno
import functools
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import mmap
import os
import re
import resource
import select
import selectors
import signal
import socket
import ssl
import stat
import struct
import sys
import textwrap
import threading
import time
import unicodedata
import zlib
from http.server import BaseHTTPRequestHandler


# -- Settings ------------------------------------------------------------------

DEFAULT_HOST = '0.0.0.0'
DEFAULT_PORT = 8000
MAX_PORT = 65535
LOG_FORMATS = ('text', 'json')
DEFAULT_LOG_BODY = 1024         # bytes of each body shown on its body record
MAX_LOG_BODY = 64 * 1024        # so that 1,000 connections fit in 256 MiB
# What a request may be.  MAX_HEAD_BYTES is at most 65536: the stock
# handle_one_request() answers a longer request line itself, with a 414.
MAX_HEAD_BYTES = 64 * 1024      # request line and header lines together
MAX_HEADERS = 100
MAX_PARAMS = 1000               # query parameters (PHP's max_input_vars)
MAX_METHOD_CHARS = 32           # longer "methods" are taken for junk at once
MAX_BODY_BYTES = 1024 * 1024    # bodies are read and dropped, never kept
MAX_LENGTH_DIGITS = 15          # a longer Content-Length is refused unread
MAX_CHUNK_SIZE_DIGITS = 16      # hex digits of a chunk size, leading zeros included
MAX_CHUNK_LINE_BYTES = 4096     # a chunk-size line with its extensions
MAX_TRAILER_BYTES = 8 * 1024    # all trailer lines of a chunked body together
MAX_CHUNKS = 4096               # a chunk costs a few microseconds of Python:
                                # 1 MiB in chunks of 256 bytes, and no tinier
# What the log shows of a request: every client text is cut where its
# escaped form passes one of these (and twice its own size, plus
# SHOWN_SLACK), the cut said, so that the log of a request is at most about
# twice the bytes it sent, plus a few KiB.
MAX_SHOWN_CHARS = 200           # a header value, a parameter, a bad line
MAX_SHOWN_URL = 2048            # the URL of an arrival
MAX_SHOWN_PARAMS = 100          # parameter values shown of a query or form
MAX_SHOWN_PARTS = 50            # parts shown of a multipart body
MAX_NAME_CHARS = 256            # a longer name counts as secret, unread
SHOWN_SLACK = 16
QUOTED_BYTES = 4096             # of bytes kek did not parse, kept to show
HEAD_TIMEOUT = 10.0     # seconds from a request's first byte to its blank line
IDLE_TIMEOUT = 10.0     # seconds without a byte either way: idle, slow body, unread answer
MIN_BODY_RATE = 500     # bytes a second a body must average after IDLE_TIMEOUT
                        # (Apache mod_reqtimeout's MinRate)
LINGER_TIMEOUT = 2.0    # after a closing answer, seconds to drop what still arrives
SHUTDOWN_GRACE = 3.0    # seconds requests in flight get to finish on SIGTERM
SWEEP_INTERVAL = 0.25   # seconds between checks of every connection's deadline
ACCEPT_PAUSE = 0.1      # seconds without accepting when out of file
                        # descriptors and no connection can make room
# What one client may take of the loop and of memory.
MAX_REQUESTS_A_TURN = 8         # pipelined requests served a round, a connection
LISTEN_BACKLOG = 1024           # the stock 5 resets bursts of connects
MAX_ACCEPTS_A_ROUND = LISTEN_BACKLOG    # one process takes all that wait
RECV_BYTES = MAX_HEAD_BYTES + 1  # a head, and the byte that makes it too long:
                                # what inbuf holds at most
MAX_PENDING_OUTPUT = 64 * 1024  # unsent answers before a client's requests wait
RESERVED_FDS = 16               # descriptors kept for the log, the listener...
LOG_FLUSH_BYTES = 256 * 1024    # records written in a round before its end
# When the log cannot take writes (SPEC 5, the log under faults).
MAX_PENDING_LOG_BYTES = 16 * 1024 * 1024   # records kept while they wait:
                                # reading stops, so only a round's and the
                                # closes' records come; past it, counted
LOG_RETRY_INTERVAL = 1.0        # seconds between tries (the SPEC says 2 at most)
LOG_GIVE_UP = 60.0              # seconds of a log that fails before kek stops
LOG_SLOW_READER = 1.0           # seconds a full pipe may wait unsaid: a reader
                                # that falls behind for a moment is no failure
# WORKERS=N (SPEC 6).
MAX_WORKERS = 256       # processes; past the cores they only share them
MAX_INSTANCE_CHARS = 32  # INSTANCE ends every key: keep keys short


# Each setting, declared once (Setting): its variable, its argument if it
# has one, its default, how its text is read, and its help.  Settings holds
# their values; main() reads them into SETTINGS, the one every request
# reads, before the server starts.

def number_up_to(maximum, what):
    """A reader of a decimal number from 0 to maximum; its length is checked
    before int() reads it."""
    def read(text):
        if not (text.isascii() and text.isdigit()
                and len(text) <= len(str(maximum)) and int(text) <= maximum):
            raise ValueError('is not %s (0-%d)' % (what, maximum))
        return int(text)
    return read


def one_of(values):
    """A reader of one of values' keys: what it stands for."""
    def read(text):
        if text not in values:
            raise ValueError('is not one of %s' % ', '.join(values))
        return values[text]
    return read


def not_empty(advice, value=str):
    """A reader of any text but ''."""
    def read(text):
        if not text:
            raise ValueError('is empty: ' + advice)
        return value(text)
    return read


def networks(text):
    """A reader of comma-separated addresses and CIDR networks, each read
    by ipaddress (an address is a network of one)."""
    found = []
    for item in text.split(','):
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError('is not a list of addresses and networks: %r is'
                             ' neither (as in 127.0.0.1,10.0.0.0/8,::1)'
                             % item) from None
    return Networks(found)


class Networks(tuple):
    """The networks of TRUSTED_PROXIES, hashed once: they are part of the
    key of trusted()'s cache, and ipaddress hashes each in Python."""

    def __new__(cls, items):
        self = super().__new__(cls, items)
        self.hash = tuple.__hash__(self)
        return self

    def __hash__(self):
        return self.hash


def exact_paths(text):
    """A reader of comma-separated paths, each as a request's path is sent:
    '/' first, no blank, no '?'."""
    found = set()
    for item in text.split(','):
        if not (item[:1] == '/' and item.isascii() and item.isprintable()
                and ' ' not in item and '?' not in item and '#' not in item):
            raise ValueError("is not a list of paths: %r does not start with"
                             " '/' or holds a blank, '?' or '#' (as in"
                             " /healthz,/ping)" % item)
        found.add(item)
    return frozenset(found)


def worker_count(text):
    """A reader of WORKERS: 1 to MAX_WORKERS, or 'auto', one for each CPU
    kek may run on (its affinity, as a container's cpuset limits it)."""
    if text == 'auto':
        return min(MAX_WORKERS, len(os.sched_getaffinity(0)))
    if not (text.isascii() and text.isdigit() and len(text) <= 3
            and 1 <= int(text) <= MAX_WORKERS):
        raise ValueError('is not a number of processes (1-%d) or auto'
                         % MAX_WORKERS)
    return int(text)


INSTANCE_NAME = re.compile(r'[A-Za-z0-9._-]{1,%d}' % MAX_INSTANCE_CHARS)


def instance_name(text):
    """A reader of INSTANCE: ASCII letters, digits, '-', '_' and '.', as a
    key's end must be (no blank, nothing a grep or a shell reads)."""
    if not INSTANCE_NAME.fullmatch(text):
        raise ValueError("is not a name of 1-%d letters, digits, '-', '_' or"
                         " '.' (as in web2)" % MAX_INSTANCE_CHARS)
    return text


class Setting:
    """One setting: its environment variable (and argument), its default,
    its reader (text to value; ValueError says what is wrong) and its
    help.  A secret's text is never shown, in an error or anywhere."""

    def __init__(self, name, shape, default, read, help, argument=None,
                 secret=False, shown_default=None):
        self.name = name
        self.attribute = name.lower()
        self.shape = shape              # what --help says it takes: PORT=N
        self.default = default
        self.read = read
        self.help = help
        self.argument = argument
        self.secret = secret
        self.shown_default = (str(default) if shown_default is None
                              else shown_default)


ON_OFF = {'on': True, 'off': False}


class Settings:
    """What kek runs with, one attribute a setting: the defaults, or what
    read_settings() found.  sources names where each value came from (PORT,
    --port), for the errors that name it."""

    DECLARED = (
        Setting('PORT', 'N', DEFAULT_PORT,
                number_up_to(MAX_PORT, 'a port number'),
                'TCP port, 0-%d; 0 picks a free one' % MAX_PORT, '--port'),
        Setting('HOST', 'H', DEFAULT_HOST,
                not_empty('name an address, or leave it unset for %s'
                          % DEFAULT_HOST),
                'address to bind, IPv4 or IPv6', '--host'),
        Setting('LOG_FILE', 'PATH', None,
                not_empty('name a file, or leave it unset for standard output'),
                'append the log to PATH; reopened when moved away or on'
                ' SIGHUP', shown_default='standard output'),
        Setting('LOG_FORMAT', 'F', 'text',
                one_of({name: name for name in LOG_FORMATS}),
                ' or '.join(LOG_FORMATS)),
        Setting('LOG_HEADERS', 'X', True, one_of(ON_OFF),
                'on or off: every header on the arrival record, credentials'
                ' redacted', shown_default='on'),
        Setting('LOG_BODY', 'N', DEFAULT_LOG_BODY,
                number_up_to(MAX_LOG_BODY, 'a number of bytes'),
                'bytes of each body shown on its body record, 0-%d'
                % MAX_LOG_BODY),
        Setting('CORS', 'X', True, one_of(ON_OFF),
                'on or off: let pages in browsers on any origin call kek and'
                ' read its answers', shown_default='on'),
        Setting('WEBHOOK_SECRET', 'S', None,
                not_empty('set the secret, or leave it unset to check no'
                          ' signature',
                          lambda text: text.encode('utf-8', 'surrogateescape')),
                "the webhook senders' shared secret: each request's signature"
                ' is checked and the result logged.  From the environment'
                ' only, and never printed', secret=True, shown_default='unset'),
        Setting('TLS_CERT', 'PATH', None,
                not_empty('name a PEM file, or leave it unset for plain HTTP'
                          ' only'),
                'a PEM certificate, or chain, and its key unless TLS_KEY names'
                ' it: then a connection that begins with a TLS hello is served'
                ' as HTTPS, any other as HTTP, on the same port',
                shown_default='unset'),
        Setting('TLS_KEY', 'PATH', None,
                not_empty("name a PEM file, or leave it unset if the key is in"
                          " TLS_CERT's"),
                "the certificate's private key, PEM, without a password",
                shown_default="in TLS_CERT's file"),
        Setting('TLS_CLIENT_CA', 'PATH', None,
                not_empty('name a PEM file, or leave it unset to ask for no'
                          ' client certificate'),
                'PEM certificates of the CAs whose client certificates kek asks'
                ' for and checks (mutual TLS); needs TLS_CERT',
                shown_default='unset'),
        Setting('TRUSTED_PROXIES', 'LIST', (), networks,
                'comma-separated addresses and CIDR networks of your proxies'
                ' (127.0.0.1,10.0.0.0/8,::1): from them, X-Forwarded-For,'
                ' Forwarded and a PROXY protocol header name the client',
                shown_default='none'),
        Setting('LOG_SKIP', 'PATHS', frozenset(), exact_paths,
                'comma-separated exact paths (/healthz,/ping) whose plain GETs'
                ' are answered as usual but only counted, every 10 s',
                shown_default='none'),
        Setting('WORKERS', 'N', 1, worker_count,
                'processes serving the port, 1-%d, or auto: one for each CPU'
                % MAX_WORKERS, '--workers'),
        Setting('INSTANCE', 'NAME', None, instance_name,
                'a name for this kek among several, at the end of every key'
                ' (KEY~NAME) and in every JSON record', shown_default='unset'),
        # Its text is checked by read_settings(), which has the grammar of a
        # header name and the signature schemes.
        Setting('WEBHOOK_SIGNATURE_HEADER', 'NAME', None, str.lower,
                'a header your own sender puts an HMAC-SHA256 of the body in,'
                ' hex or base64; needs WEBHOOK_SECRET', shown_default='unset'),
    )

    tls = None      # the ssl.SSLContext TLS_CERT and the rest make, if set

    def __init__(self, **values):
        for setting in self.DECLARED:
            setattr(self, setting.attribute, setting.default)
        self.sources = {}
        self.__dict__.update(values)

    def update(self, other):
        """Take other's values: main() sets SETTINGS so."""
        self.__dict__.update(vars(other))


SETTINGS = Settings()


# -- Text and HTTP grammar -----------------------------------------------------

# The small helpers every later section shares: JSON and escaping for the
# log's lines, the token grammar, percent-decoding and queries, media types,
# byte counts.

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


# Characters that show as nothing (Unicode's default-ignorable code points:
# the soft hyphen, zero-width and bidi controls, variation selectors, tag
# characters, Hangul fillers...), the blank Braille pattern, and the few
# that fonts draw as nothing (U+1D159 MUSICAL SYMBOL NULL NOTEHEAD, U+16FE4
# KHITAN SMALL SCRIPT FILLER).  Python calls some of them printable.
INVISIBLE = re.compile(
    '[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f'
    '\u202a-\u202e\u2060-\u206f\u2800\u3164\ufe00-\ufe0f\ufeff\uffa0'
    '\ufff0-\ufff8\U00016fe4\U0001bca0-\U0001bca3\U0001d159'
    '\U0001d173-\U0001d17a\U000e0000-\U000e0fff]')
# A combining mark with no letter to sit on (at the start, or after a blank
# or ASCII punctuation) shows as nothing, or on the quote before it: the
# blocks of combining marks in common use.
BASELESS_MARK = re.compile(
    '(?<![^\\s!-/:-@\\[-`{-~])[\u0300-\u036f\u0483-\u0489\u0591-\u05bd'
    '\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06dc\u0e31\u0e34-\u0e3a'
    '\u0e47-\u0e4e\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f'
    '\U0001d165-\U0001d169\U0001d16d-\U0001d172\U0001d17b-\U0001d182'
    '\U0001d185-\U0001d18b\U0001d1aa-\U0001d1ad]')


def shows_as_itself(text):
    """True if every character of text shows as itself on a line."""
    return text.isprintable() and (text.isascii() or (
        INVISIBLE.search(text) is None and BASELESS_MARK.search(text) is None))


def escaped_each(text, escaped):
    """text with each character that does not show as itself, and each
    baseless mark, written by escaped()."""
    baseless = {mark.start() for mark in BASELESS_MARK.finditer(text)}
    return ''.join(
        escaped(char) if (n in baseless or not char.isprintable()
                          or INVISIBLE.match(char)) else char
        for n, char in enumerate(text))


def backslash_escape(char):
    return char.encode('unicode_escape').decode('ascii')


def escape(text):
    """Return text that cannot split, forge or colour a log line.

    Printable characters stay (Cyrillic stays readable).  Control characters,
    line and paragraph separators, bidi overrides, invisible characters,
    baseless combining marks, bytes that were not UTF-8 (held as surrogates)
    and the backslash itself become backslash escapes.
    """
    if text.isascii() and text.isprintable() and '\\' not in text:
        return text         # the common case, checked first
    if shows_as_itself(text) and '\\' not in text:
        return text
    return escaped_each(text.replace('\\', '\\\\'), backslash_escape)


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
    text = ''.join(JSON_CHUNKS(value, 0))     # to_json(value)
    if text.isascii() and text.isprintable() or shows_as_itself(text):
        return text
    return escaped_each(text, json_escape)


TCHAR = r"!#$%&'*+.^_`|~0-9A-Za-z-"   # RFC 9110 token characters
TOKEN = re.compile(r"[%s]+" % TCHAR, re.ASCII)
TOKEN_CHARS = ("!#$%&'*+.^_`|~-0123456789abcdefghijklmnopqrstuvwxyz"
               "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def in_bytes(size):
    return '1 byte' if size == 1 else '%d bytes' % size


def byte_count(text):
    """How many bytes the client sent for text (decoded with surrogateescape)."""
    return len(text) if text.isascii() else len(
        text.encode('utf-8', 'surrogateescape'))


def media_type(content_type):
    """'text/plain' of 'Text/Plain; charset=utf-8'."""
    return content_type.partition(';')[0].strip(' \t').lower()


# Media types whose body is never taken for a form, whatever it looks like.
def is_json_type(media):
    return media == 'application/json' or media.endswith('+json')


def is_xml_type(media):
    return media.endswith('/xml') or media.endswith('+xml')


# Any control character but tab.  Searched for once the CRLF line ends are
# gone, so it also finds a bare CR or LF.  One character class: no backtracking.
CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
CONTROL_BUT_CRLF = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
DIGITS = re.compile(r"[0-9]+")
HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]+")
PERCENT = re.compile(rb'%([0-9A-Fa-f]{2})')
LONE_PERCENT = re.compile(rb'%(?![0-9A-Fa-f]{2})')
PERCENT_TO_QP = bytes.maketrans(b'%', b'=')


def unquote(text):
    """text with '+' as a blank and %XX escapes decoded, as parse_qs()
    decodes a query's names and values (bytes that are not UTF-8 kept as
    surrogates), but in C where urllib takes a Python step for every '%'.
    When every '%' starts an escape, they are quoted-printable's '=XX'
    (once the '=' already there are written '=3D'), which binascii decodes."""
    if '+' in text:
        text = text.replace('+', ' ')
    if '%' not in text:
        return text
    data = text.encode('utf-8', 'surrogateescape')
    if LONE_PERCENT.search(data) is None:
        data = binascii.a2b_qp(data.replace(b'=', b'=3D').translate(
            PERCENT_TO_QP))
    else:
        parts = PERCENT.split(data)
        decoded = bytes.fromhex(b''.join(parts[1::2]).decode('ascii'))
        parts[1::2] = [decoded[n:n + 1] for n in range(len(decoded))]
        data = b''.join(parts)
    return data.decode('utf-8', 'surrogateescape')


def parse_query(query, limit=MAX_PARAMS):
    """The query's parameters, as parse_qs(keep_blank_values=True) gives
    them: repeated names kept, names and values decoded by unquote(); at
    most limit of them."""
    fields = query.split('&', limit)
    if len(fields) > limit:
        fields.pop()            # the rest, unread
    decode = '%' in query or '+' in query
    params = {}
    for field in fields:
        if field:
            name, _, value = field.partition('=')
            if decode:
                name, value = unquote(name), unquote(value)
            if name in params:
                params[name].append(value)
            else:
                params[name] = [value]
    return params


def target_path(path):
    """The path of a request target (the part before '?') that does not
    start with '/': the absolute form that proxies send (http://host/api)
    names its path after the authority; anything else is its own path."""
    scheme, sep, rest = path.partition('://')
    if sep and scheme.lower() in ('http', 'https'):
        return '/' + rest.partition('/')[2]
    return path


def as_text(data):
    """Client bytes as text for a message; bytes that are not UTF-8 are kept
    as surrogates, which escape() shows as \\udcXX."""
    return bytes(data).decode('utf-8', 'surrogateescape')


# -- Keys ----------------------------------------------------------------------

class Keys:
    """Hands out request keys: the arrival time, UTC, with microseconds.

    A key that would repeat or go backwards moves on, so keys are unique
    within one server and always the same width.  Worker i of WORKERS=N
    takes only the microseconds that are i modulo N+1 (stride N+1, offset
    i; the parent offset 0): no two processes can hand out the same key,
    and none needs a lock another holds.  With INSTANCE every key ends in
    '~NAME'.
    """

    def __init__(self, clock=time.time_ns, stride=1, offset=0, suffix=''):
        self.clock = clock
        self.lock = threading.Lock()
        self.stride = stride
        self.offset = offset
        self.suffix = suffix
        self.shared = None          # (share())
        self.last_us = 0
        self.stamp = (None, '')     # a second, and its text: one tuple, so
                                    # that now() reads a pair that matches

    def second_text(self, second):
        if second != self.stamp[0]:
            self.stamp = (second, time.strftime('%Y-%m-%dT%H:%M:%S',
                                                time.gmtime(second)))
        return self.stamp[1]

    def share(self, shared, stride, offset):
        """Take the microseconds that are offset modulo stride, and keep
        the last key in shared (an mmap of 8 bytes a process, at offset):
        a worker started again in a dead one's place goes on after that
        one's last key, which may have run ahead of the clock."""
        self.stride, self.offset, self.shared = stride, offset, shared
        self.last_us = max(self.last_us,
                           struct.unpack_from('q', shared, offset * 8)[0])

    def next(self):
        with self.lock:
            us = self.clock() // 1000
            us += (self.offset - us) % self.stride
            if us <= self.last_us:
                us = self.last_us + self.stride
            self.last_us = us
            if self.shared is not None:
                struct.pack_into('q', self.shared, self.offset * 8, us)
            second, micro = divmod(us, 1000000)
            return f'{self.second_text(second)}.{micro:06d}Z{self.suffix}'

    def now(self):
        """The time now in a key's format, without the suffix: a record's
        own time (JSON's "time"), for collectors.  Not unique."""
        second, micro = divmod(self.clock() // 1000, 1000000)
        return f'{self.second_text(second)}.{micro:06d}Z'


KEYS = Keys()


# -- Reading requests ----------------------------------------------------------

# A request as data (Request), its head read and parsed, its body read
# through the reader its framing asks for, and other protocols named.  Facts
# only: what is wrong raises Refused with the reason and the raw evidence,
# and nothing here decides what the log shows.

METHOD_START = re.compile(rb"[%s]{0,%d}(?: |\Z)"
                          % (TCHAR.encode(), MAX_METHOD_CHARS))
REQUEST_LINE = re.compile(r"([%s]{1,%d}) (\S+) HTTP/1\.([01])"
                          % (TCHAR, MAX_METHOD_CHARS), re.ASCII)
# RFC 9112 7.1.1: *( BWS ";" BWS name [ BWS "=" BWS ( token / quoted-string ) ]).
# Blanks, ';', '=' and a name or value each start with a character the
# others cannot, so nothing backtracks.
CHUNK_EXTENSIONS = re.compile(
    rb'(?:[ \t]*;[ \t]*[%s]+(?:[ \t]*=[ \t]*(?:[%s]+|"(?:[^"\\]|\\.)*"))?)+'
    % (TCHAR.encode(), TCHAR.encode()))
CONTINUE = b'HTTP/1.1 100 Continue\r\n\r\n'


class Refused(Exception):
    """A request kek answers with this error and then closes the connection:
    its head does not parse, its body's framing is broken or too large, it
    is not HTTP/1.x at all, or it came too slowly.  After it, where the next
    request would start cannot be known.

    It carries facts, raw: the reason, with '%s' where the evidence goes,
    and the evidence as what it is ('bytes', 'header' ...) and the bytes or
    text themselves.  Only "What the log shows" makes text of the evidence
    (shown_refusal()); a parser never decides what the log shows."""

    def __init__(self, reason, kind=None, *evidence):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind            # a key of EVIDENCE, or None
        self.evidence = evidence


class Request:
    """Everything about one request.  It is made at the request's first byte,
    filled in as its head and body arrive, handed to query() and the chain,
    and dropped once its answer is written.  What is not known yet is None:
    the head's fields stay None until the whole head has parsed."""

    method = None       # 'GET', 'POST', 'FOO' ...
    target = None       # the request target exactly as sent: '/api?x=1'
    path = None         # the path the chain checks: '/api'
    query = None        # the target's part after '?', as sent
    params = None       # the query's parameters, {name: [value, ...]}
    version = None      # 'HTTP/1.1' or 'HTTP/1.0'
    headers = None      # {lower-case name: value}, repeated fields joined
    header_list = None  # [(name as sent, value), ...], in order
    keep_alive = False  # another request may follow on the connection
    declared = None     # the body's length as declared, or 'chunked'
    reader = None       # the reader of what is still to come: HeadReader,
                        # then the one the body's framing asks for
    body = None         # what the log shows of the body: a Body
    body_started = None  # time.monotonic() when the head was done
    via = None          # the trusted proxy the client came through
    tls = None          # over TLS: what the log shows of it (shown_tls())
    handshake = None    # a TLS handshake that never finished: its first bytes
    quiet = False       # to a path of LOG_SKIP, with no other error: counted
    forwarding = None   # why a trusted proxy's header named no client:
                        # (header, what is wrong, the hop as sent)

    def __init__(self, key, started, client, log):
        self.key = key
        self.started = started          # time.monotonic() at the first byte
        self.client = client            # the peer, 'host:port', or the
                                        # client a trusted proxy named
        self.log = log                  # its RequestLog
        self.reader = HeadReader()

    def due(self):
        """When the head, or the body, must have come: the head within
        HEAD_TIMEOUT of the first byte; the body after IDLE_TIMEOUT, with one
        more second for every MIN_BODY_RATE bytes that came (as Apache's
        mod_reqtimeout MinRate)."""
        if self.body is None:
            return self.started + HEAD_TIMEOUT
        return self.body_started + IDLE_TIMEOUT + self.body.size / MIN_BODY_RATE

    def overdue(self, active_at, received):
        """Why the request is refused when its deadline, or IDLE_TIMEOUT
        without a byte, has passed (received: bytes of its head so far)."""
        now = time.monotonic()
        if self.body is None:
            return ('request head not complete within %g s (%d bytes'
                    ' received)' % (HEAD_TIMEOUT, received))
        if now >= active_at + IDLE_TIMEOUT:
            return ('request body stalled: no byte for %g s, %s'
                    % (IDLE_TIMEOUT, self.reader.missing()))
        return ('request body too slow: %d bytes in %.1f s, under %d bytes a'
                ' second; %s' % (self.body.size, now - self.body_started,
                                 MIN_BODY_RATE, self.reader.missing()))


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
                raise foreign
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
                raise Refused('not an HTTP request: %s', 'bytes',
                              bytes(inbuf[:QUOTED_BYTES]), len(inbuf))
            return None
        head = bytes(inbuf[:end + 2])
        del inbuf[:end + 4]
        return head


def parse_head(request, head):
    """Parse a complete head (request line and header lines, each ended by
    CRLF) strictly, as RFC 9112 asks, into request; raises Refused.  Each
    step is linear in the head's size: no pattern here can backtrack."""
    # Every LF ends a CRLF (HeadReader made sure), so a CR more is bare.
    control = CONTROL_BUT_CRLF.search(head)
    if control:
        raise Refused('control character 0x%02x in the request head'
                      % control.group()[0])
    if head.count(b'\r') != head.count(b'\n'):
        raise Refused('bare CR (not CRLF) in the request head')
    lines = head.decode('utf-8', 'surrogateescape').split('\r\n')[:-1]
    match = REQUEST_LINE.fullmatch(lines[0])
    if not match:
        raise Refused("request line is not 'METHOD TARGET HTTP/1.x': %s",
                      'bytes', lines[0], None)
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
        if field is None and line[:1] in (' ', '\t') and header_list:
            name = header_list[-1][0]       # obs-fold: a part of its value
            raise Refused("header line is not 'Name: value': a continuation"
                          " %s", 'continuation', name, line.strip(' \t'))
        if field is None:
            raise Refused("header line is not 'Name: value': %s",
                          'header line', line)
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
    if query.count('&') >= MAX_PARAMS:
        raise Refused('a query of more than %d parameters' % MAX_PARAMS)
    request.method, request.target, request.version = (
        method, target, 'HTTP/1.' + minor)
    request.path = path if path.startswith('/') else target_path(path)
    request.query = query
    request.params = parse_query(query) if query else {}
    request.headers, request.header_list = headers, header_list
    request.keep_alive = ('keep-alive' in connection if minor == '0'
                          else 'close' not in connection)


def split_field(line):
    """(name, value) of a header or trailer line 'Name: value', the value
    without the blanks around it; None if the line is not one.  A name is a
    token: stripping its token characters leaves nothing."""
    name, colon, value = line.partition(':')
    if not colon or not name or name.strip(TOKEN_CHARS):
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
                          ' chunked', 'header', 'Transfer-Encoding', coding)
        request.declared = 'chunked'
        return ChunkedReader()
    if length is None:
        return None
    # Equal repeated values are one length (RFC 9110 8.6); spaces and tabs
    # around each are allowed, and nothing else.
    values = {value.strip(' \t') for value in length.split(',')}
    value = values.pop() if len(values) == 1 else ''
    if not DIGITS.fullmatch(value):
        raise Refused('Content-Length %s is not one length', 'header',
                      'Content-Length', length)
    if len(value) > MAX_LENGTH_DIGITS:      # before int() reads them all
        raise Refused('Content-Length of %d digits is over %d'
                      % (len(value), MAX_LENGTH_DIGITS))
    size = request.declared = int(value)
    if size > MAX_BODY_BYTES:
        raise Refused('body of %d bytes is over %d' % (size, MAX_BODY_BYTES))
    return LengthReader(size) if size else None


# Content codings decoded for a body's record (RFC 9110 8.4.1), and how
# zlib reads each: gzip's members, and deflate, which RFC 9110 means
# zlib-wrapped but some senders send raw (browsers read both).
DECODED_CODINGS = {'gzip': 16 + zlib.MAX_WBITS, 'x-gzip': 16 + zlib.MAX_WBITS,
                   'deflate': zlib.MAX_WBITS}
RAW_DEFLATE_BITS = -zlib.MAX_WBITS
DECODED_STEP = 64 * 1024        # decoded bytes made at a time: what a bomb
                                # costs a connection's memory at most


def zlib_wrapped(head):
    """Whether two bytes begin a zlib stream (RFC 1950 2.2): method 8, and
    a check that makes them a multiple of 31."""
    return head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0


class Decoder:
    """Decodes a body's Content-Encoding as its bytes arrive, for its
    record only: size, the first `keep` bytes.  It stops past MAX_BODY_BYTES
    decoded, so a decompression bomb costs no more than any body, and at the
    first error, after which the body is shown as it came."""

    def __init__(self, coding, keep):
        self.coding = coding
        self.keep = keep
        self.size = 0
        self.preview = bytearray()
        self.over = False           # passed MAX_BODY_BYTES: decoded no further
        self.error = None           # why the bytes do not decode, once known
        self.head = b''             # deflate's first bytes, to tell its wrapper
        self.stream = None
        if coding != 'deflate':
            self.stream = zlib.decompressobj(DECODED_CODINGS[coding])

    def decode(self, data):
        """Yield the decoded bytes of data, DECODED_STEP at most at a time."""
        if self.stream is None:
            data = self.head + data
            if len(data) < 2:
                self.head = data
                return
            self.head = b''
            self.stream = zlib.decompressobj(
                zlib.MAX_WBITS if zlib_wrapped(data) else RAW_DEFLATE_BITS)
        while data and not self.over and self.error is None:
            if self.stream.eof:     # gzip: another member may follow
                if self.coding == 'deflate':
                    self.error = 'bytes after the end of its deflate stream'
                    return
                self.stream = zlib.decompressobj(DECODED_CODINGS['gzip'])
            try:
                out = self.stream.decompress(
                    data, min(DECODED_STEP, MAX_BODY_BYTES + 1 - self.size))
            except zlib.error as error:
                self.error = str(error)
                return
            data = self.stream.unconsumed_tail or self.stream.unused_data
            self.size += len(out)
            self.over = self.size > MAX_BODY_BYTES
            if len(self.preview) < self.keep:
                self.preview += out[:self.keep - len(self.preview)]
            yield out

    def finish(self):
        """Once the body is whole: say if its compressed stream was cut."""
        if self.error is None and not self.over and (
                self.stream is None or not self.stream.eof):
            self.error = 'its %s stream is cut short' % self.coding


def body_coding(request):
    """The body's Content-Encoding, lowercased, or None for identity."""
    coding = request.headers.get('content-encoding', 'identity')
    coding = coding.strip(' \t').lower()
    return None if coding == 'identity' else coding


class Body:
    """What the log shows of a request body, fed its bytes as they arrive
    (the framing's, not its Content-Encoding's): size, SHA-256, the first
    `keep` bytes, the parts of a multipart/form-data body, the MACs of its
    signatures, and through a Decoder what its gzip or deflate decodes to.
    The body itself is never kept, so a connection's memory is bounded by
    `keep` (and DECODED_STEP)."""

    def __init__(self, keep, parts=None, signatures=None, decoder=None):
        self.size = 0
        self.sha256 = hashlib.sha256()
        self.keep = keep
        self.preview = bytearray()
        self.parts = parts          # a MultipartReader, or None
        self.signatures = signatures    # Signatures, or None
        self.decoder = decoder      # a Decoder, or None

    def add(self, data):
        self.size += len(data)
        self.sha256.update(data)
        if len(self.preview) < self.keep:
            self.preview += data[:self.keep - len(self.preview)]
        if self.signatures:
            for signature in self.signatures:
                signature.add(data)     # a signature covers what was sent
        if self.decoder is not None:
            for decoded in self.decoder.decode(data):
                if self.parts is not None:
                    self.parts.add(decoded)
        elif self.parts is not None:
            self.parts.add(data)


BOUNDARY = re.compile(r';[ \t]*boundary=(?:"([^"]{1,70})"|([^\s;"]{1,70}))',
                      re.IGNORECASE)
MAX_PART_HEAD_BYTES = 8 * 1024
MAX_PARTS = 1000                # werkzeug's max_form_parts: past it, a body's
                                # parts are no longer read, and it says so
# The steps of a multipart body (RFC 2046 5.1.1, RFC 7578).
PREAMBLE = 'preamble'           # up to the first delimiter
DELIMITED = 'delimited'         # after a delimiter: CRLF, or '--' at the end
PART_HEAD = 'part head'         # a part's header lines, up to a blank line
PART_DATA = 'part data'         # up to the next delimiter
EPILOGUE = 'epilogue'           # after the last one, or after a broken part


def multipart_reader(request):
    """A MultipartReader for a multipart/form-data body, if any of a body
    is shown at all; else None.  Without a boundary its parts cannot be
    told apart, and none of it is shown: its files may be anywhere."""
    content_type = request.headers.get('content-type', '')
    if not SETTINGS.log_body or media_type(content_type) != 'multipart/form-data':
        return None
    match = BOUNDARY.search(content_type)
    if match is None:
        reader = MultipartReader(b'')
        reader.stop('no boundary in its Content-Type')
        return reader
    return MultipartReader((match.group(1) or match.group(2)).encode(
        'utf-8', 'surrogateescape'))


class Part:
    """One part of a multipart body, as it came: its head (the header lines,
    raw), its size, and the first QUOTED_BYTES of its contents."""

    def __init__(self, head):
        self.head = head
        self.size = 0
        self.start = bytearray()


class MultipartReader:
    """The parts of a multipart/form-data body, fed its bytes as they arrive
    (facts only: what the log shows of them is shown_parts()'s).  At most
    MAX_SHOWN_PARTS parts are kept, each with at most QUOTED_BYTES of its
    contents, and the bytes between two feeds are at most a delimiter
    long, so memory is bounded; past MAX_PARTS parts, it stops reading.
    Each feed is searched by position, never copied part by part."""

    def __init__(self, boundary):
        self.delimiter = b'\r\n--' + boundary
        self.buffer = b'\r\n'       # the first delimiter has no CRLF before it
        self.step = PREAMBLE
        self.parts = []             # the first MAX_SHOWN_PARTS parts
        self.count = 0              # parts in all
        self.part = None            # the part being read, if kept
        self.broken = None          # why the body is not well formed

    def add(self, data):
        buffer = self.buffer + data
        at = 0                      # buffer[:at] is read
        while at < len(buffer):
            if self.step is PREAMBLE or self.step is PART_DATA:
                found = buffer.find(self.delimiter, at)
                end = found if found >= 0 else max(
                    at, len(buffer) - len(self.delimiter))
                if self.step is PART_DATA and self.part is not None:
                    self.take(buffer, at, end)
                at = end
                if found < 0:
                    break
                at += len(self.delimiter)
                self.step = DELIMITED
            elif self.step is DELIMITED:
                if len(buffer) - at < 2:
                    break
                if buffer.startswith(b'--', at):
                    self.step = EPILOGUE
                elif buffer.startswith(b'\r\n', at):
                    at += 2
                    self.step = PART_HEAD
                else:
                    self.stop('a delimiter not followed by CRLF')
            elif self.step is PART_HEAD:
                end = buffer.find(b'\r\n\r\n', at, at + MAX_PART_HEAD_BYTES + 4)
                if buffer.startswith(b'\r\n', at):
                    end = at - 2        # an empty head: its blank line alone
                if end == -1:
                    if len(buffer) - at > MAX_PART_HEAD_BYTES:
                        self.stop('a part head over %d bytes'
                                  % MAX_PART_HEAD_BYTES)
                    break
                self.start_part(buffer[at:max(end, at)])
                at = end + 4
            else:
                at = len(buffer)        # the epilogue is not looked at
        self.buffer = buffer[at:]

    def stop(self, why):
        self.broken = why
        self.step = EPILOGUE

    def start_part(self, head):
        self.count += 1
        if self.count > MAX_PARTS:
            self.stop('more than %d parts' % MAX_PARTS)
            return
        self.part = None
        if len(self.parts) < MAX_SHOWN_PARTS:
            self.part = Part(as_text(head))
            self.parts.append(self.part)
        self.step = PART_DATA

    def take(self, buffer, start, end):
        part = self.part
        part.size += end - start
        keep = min(QUOTED_BYTES, SETTINGS.log_body) - len(part.start)
        if keep > 0:
            part.start += buffer[start:min(end, start + keep)]

    def finish(self):
        """The body has all come: what is left is the last part's."""
        if self.step is not EPILOGUE:
            if self.step is PART_DATA and self.part is not None:
                self.take(self.buffer, 0, len(self.buffer))
            self.broken = self.broken or 'no closing delimiter'
            self.step = EPILOGUE


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
        self.size = 0               # bytes of data so far
        self.chunks = 0
        self.scanned = 0            # bytes of an unfinished line already searched
        self.trailer_bytes = 0
        self.trailer_lines = 0

    def read(self, inbuf, body):
        """Decode what inbuf holds into body; True once the body is complete.
        Raises Refused on the first byte that breaks the framing.  The data
        of all the chunks at hand goes to body at once: its hashes and
        signatures are updated once a read, not once a chunk."""
        pieces = []
        try:
            return self.decode(inbuf, pieces)
        finally:
            if pieces:
                body.add(b''.join(pieces))

    def decode(self, inbuf, pieces):
        while inbuf:
            if self.step is CHUNK_DATA:
                data = bytes(inbuf[:self.left])
                del inbuf[:len(data)]
                self.left -= len(data)
                self.size += len(data)
                pieces.append(data)
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
                self.start_chunk(line)
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

    def start_chunk(self, line):
        size, semicolon, extensions = line.partition(b';')
        if semicolon:
            size = size.rstrip(b' \t')      # BWS before the ';'
        if (len(size) > MAX_CHUNK_SIZE_DIGITS
                or not HEX_DIGITS.fullmatch(size)):
            raise Refused('chunk size is not 1 to %d hex digits: %%s'
                          % MAX_CHUNK_SIZE_DIGITS, 'bytes', line, None)
        if semicolon and not CHUNK_EXTENSIONS.fullmatch(semicolon + extensions):
            raise Refused("chunk extension is not ';name' or ';name=value':"
                          ' %s', 'bytes', line, None)
        self.left = int(size, 16)
        self.chunks += self.left > 0        # the last chunk is no chunk
        if self.size + self.left > MAX_BODY_BYTES:
            raise Refused('chunked body over %d bytes' % MAX_BODY_BYTES)
        if self.chunks > MAX_CHUNKS:
            raise Refused('chunked body of more than %d chunks' % MAX_CHUNKS)
        self.step = CHUNK_DATA if self.left else TRAILER

    def check_trailer(self, line):
        self.trailer_bytes += len(line) + 2
        self.trailer_lines += 1
        if self.trailer_lines > MAX_HEADERS:
            raise Refused('more than %d trailer lines' % MAX_HEADERS)
        if split_field(line.decode('latin-1')) is None:
            raise Refused("trailer line is not 'Name: value': %s",
                          'header line', line)

    def missing(self):
        return 'chunked body not complete (%s)' % self.step


# What other protocols send first, to name them when they reach kek.
PROXY_V2_SIGNATURE = b'\r\n\r\n\x00\r\nQUIT\n'
HTTP2_PREFACE = b'PRI * HTTP/2.0'
PROXY_V1 = re.compile(rb'PROXY (?:TCP[46] [0-9A-Fa-f.:]{2,39} [0-9A-Fa-f.:]{2,39}'
                      rb' [0-9]{1,5} [0-9]{1,5}|UNKNOWN(?: [ -~]{0,92})?)')
PROXY_V1_BYTES = 107                # its longest line, with CRLF
FOREIGN_FIRST_BYTES = b'\x16P\r'      # TLS, the HTTP/2 PRI or PROXY, PROXY v2


def foreign_protocol(data):
    """The refusal of non-HTTP/1 traffic that data starts with, or None."""
    if data.startswith(b'\x16\x03'):
        return Refused('not an HTTP/1.x request: a TLS handshake on a plain'
                       ' HTTP port (TLS_CERT makes kek serve HTTPS here), %s',
                       'hello', client_hello(data))
    if data.startswith(HTTP2_PREFACE):
        return Refused('not an HTTP/1.x request: the HTTP/2 connection preface'
                       ' (PRI * HTTP/2.0)')
    if data.startswith(b'PROXY '):
        line = re.split(rb'[\r\n]', data[:PROXY_V1_BYTES + 1], maxsplit=1)[0]
        return Refused('not an HTTP/1.x request: a PROXY protocol v1 header:'
                       ' %s', 'proxy line', line)
    if data.startswith(PROXY_V2_SIGNATURE):
        return Refused('not an HTTP/1.x request: a PROXY protocol v2 header')
    return None


# A TLS ClientHello (RFC 8446 4.1.2), read for what it offers: the facts
# a plain port can tell of a TLS client, and its JA4 (FoxIO's JA4.md).
JA4_VERSIONS = {0x0304: '13', 0x0303: '12', 0x0302: '11', 0x0301: '10',
                0x0300: 's3'}
TLS_VERSION_NAMES = {0x0304: 'TLS 1.3', 0x0303: 'TLS 1.2', 0x0302: 'TLS 1.1',
                     0x0301: 'TLS 1.0', 0x0300: 'SSL 3.0'}
SERVER_NAME, ALPN, SIGNATURE_ALGORITHMS, SUPPORTED_VERSIONS = 0, 16, 13, 43
MAX_HELLO_VALUES = 512      # ciphers, extensions, ALPN names... read of each:
                            # a record of 16 KiB holds at most 8,192 of them


def grease(value):
    """RFC 8701's reserved values (0x0a0a, 0x1a1a ...), left out of JA4."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


class Hello:
    """What a ClientHello offers; `whole` if all of it was at hand."""

    def __init__(self):
        self.version = 0
        self.ciphers = []
        self.extensions = []
        self.server_name = None
        self.alpn = []
        self.signature_algorithms = []
        self.versions = []
        self.whole = False


def values(data, size):
    """The big-endian numbers of `size` bytes each in data, at most
    MAX_HELLO_VALUES of them."""
    return [int.from_bytes(data[at:at + size], 'big')
            for at in range(0, min(len(data), size * MAX_HELLO_VALUES)
                            - size + 1, size)]


def client_hello(data):
    """The Hello of the TLS record data begins with, or None if it is no
    ClientHello.  Each step moves forward: linear in the bytes read."""
    def number(at, size):
        if at + size > len(data):
            raise IndexError(at)
        return int.from_bytes(data[at:at + size], 'big')
    hello = Hello()
    try:
        if number(5, 1) != 1:                   # not a ClientHello
            return None
        hello.version = number(9, 2)
        at = 5 + 4 + 2 + 32     # record and handshake headers, version, random
        at += 1 + number(at, 1)                 # session id
        size = number(at, 2)
        hello.ciphers = values(data[at + 2:at + 2 + size], 2)
        at += 2 + size
        at += 1 + number(at, 1)                 # compression methods
        end = at + 2 + number(at, 2)            # the extensions
        at += 2
        while at + 4 <= end and len(hello.extensions) < MAX_HELLO_VALUES:
            kind, size = number(at, 2), number(at + 2, 2)
            number(at + 4, size)                # all of it is here
            hello.extensions.append(kind)
            body = data[at + 4:at + 4 + size]
            if kind == SERVER_NAME and size >= 5:   # list, type, length, name
                hello.server_name = bytes(body[5:5 + number(at + 7, 2)]) or None
            elif kind == ALPN:
                hello.alpn = alpn_names(body[2:])
            elif kind == SIGNATURE_ALGORITHMS:
                hello.signature_algorithms = values(body[2:], 2)
            elif kind == SUPPORTED_VERSIONS:
                hello.versions = values(body[1:], 2)
            at += 4 + size
        hello.whole = at == end == 5 + 4 + number(6, 3)
    except IndexError:
        pass
    return hello


def alpn_names(data):
    """The protocol names of an ALPN extension (RFC 7301 3.1)."""
    names = []
    at = 0
    while at < len(data) and len(names) < MAX_HELLO_VALUES:
        size = data[at]
        names.append(bytes(data[at + 1:at + 1 + size]))
        at += 1 + size
    return names


def ja4_hash(items):
    return hashlib.sha256(','.join(items).encode()).hexdigest()[:12] \
        if items else '000000000000'


def ja4(hello):
    """The JA4 fingerprint of a whole ClientHello (FoxIO's JA4.md, the
    BSD-licensed part): a_b_c, GREASE values left out everywhere."""
    ciphers = [value for value in hello.ciphers if not grease(value)]
    extensions = [value for value in hello.extensions if not grease(value)]
    versions = [value for value in hello.versions if not grease(value)]
    alpn = hello.alpn[0] if hello.alpn else b''
    if not alpn:
        ends = '00'
    elif (alpn[:1] + alpn[-1:]).isalnum() and alpn[:1].isascii() and \
            alpn[-1:].isascii():
        ends = (alpn[:1] + alpn[-1:]).decode('ascii')
    else:
        ends = alpn.hex()[0] + alpn.hex()[-1]
    a = 't%s%s%02d%02d%s' % (
        JA4_VERSIONS.get(max(versions, default=hello.version), '00'),
        'd' if SERVER_NAME in extensions else 'i',
        min(len(ciphers), 99), min(len(extensions), 99), ends)
    b = ja4_hash(sorted('%04x' % value for value in ciphers))
    c = sorted('%04x' % value for value in extensions
               if value not in (SERVER_NAME, ALPN))
    algorithms = ['%04x' % value for value in hello.signature_algorithms
                  if not grease(value)]
    if algorithms:      # (then 000d is among the extensions)
        c = [','.join(c) + '_' + ','.join(algorithms)]
    return '%s_%s_%s' % (a, b, ja4_hash(c))


# Behind a proxy (SPEC 3): a peer of TRUSTED_PROXIES may send a PROXY
# protocol header first (HAProxy's proxy-protocol.txt, v1 and v2), and its
# requests' X-Forwarded-For or Forwarded name the hops before it.
PROXY_V2_HEAD_BYTES = 16            # signature, version and command, family, length
MAX_PROXY_V2_BYTES = 16 + 4096      # with its TLVs (AWS's VPC endpoint id,
                                    # HAProxy's TLS facts): a few hundred bytes
PROXY_V2_ADDRESSES = {0x11: (socket.AF_INET, 4), 0x21: (socket.AF_INET6, 16)}
MAX_FORWARDED_HOPS = 32             # hops read from the right of a header:
                                    # each costs a parse, and no real chain is longer


def proxy_header(inbuf):
    """The PROXY protocol header inbuf starts with, as (source, length):
    source is (host, port), or None when it names none (v1 UNKNOWN, v2
    LOCAL, a family other than TCP over IPv4 or IPv6); length is what to
    drop from inbuf, 0 if inbuf starts with no such header.  None while
    inbuf may still be the start of one; Refused if it is a broken one."""
    if inbuf.startswith(b'PROXY '):
        end = inbuf.find(b'\r\n', 0, PROXY_V1_BYTES)
        if end < 0:
            if len(inbuf) < PROXY_V1_BYTES:
                return None
            raise Refused('PROXY protocol v1 header from a trusted proxy not'
                          ' ended within %d bytes: %s' % (PROXY_V1_BYTES, '%s'),
                          'proxy line', bytes(inbuf[:PROXY_V1_BYTES]))
        line = bytes(inbuf[:end])
        if not PROXY_V1.fullmatch(line):
            raise Refused('PROXY protocol v1 header from a trusted proxy does'
                          ' not parse: %s', 'proxy line', line)
        fields = line.decode('ascii').split(' ')
        if fields[1] == 'UNKNOWN':
            return None, end + 2
        family = 4 if fields[1] == 'TCP4' else 6
        try:
            host = ipaddress.ip_address(fields[2])
            ports = [int(port) for port in fields[4:6]
                     if port == str(int(port)) and int(port) <= MAX_PORT]
        except ValueError:
            host = None
        if host is None or host.version != family or len(ports) != 2:
            raise Refused('PROXY protocol v1 header from a trusted proxy names'
                          ' no %s address and port: %s' % (fields[1], '%s'),
                          'proxy line', line)
        return (str(host), ports[0]), end + 2
    if inbuf.startswith(PROXY_V2_SIGNATURE):
        if len(inbuf) < PROXY_V2_HEAD_BYTES:
            return None
        command, family = inbuf[12], inbuf[13]
        size = PROXY_V2_HEAD_BYTES + int.from_bytes(inbuf[14:16], 'big')
        if command >> 4 != 2 or command & 0xF > 1:
            raise Refused('PROXY protocol v2 header from a trusted proxy with'
                          ' version and command 0x%02x, not 0x20 or 0x21'
                          % command)
        if size > MAX_PROXY_V2_BYTES:
            raise Refused('PROXY protocol v2 header from a trusted proxy of %d'
                          ' bytes, over %d' % (size, MAX_PROXY_V2_BYTES))
        if len(inbuf) < size:
            return None
        if command & 0xF == 0 or family not in PROXY_V2_ADDRESSES:
            return None, size       # LOCAL (a health check), or no address
        kind, width = PROXY_V2_ADDRESSES[family]
        if size < PROXY_V2_HEAD_BYTES + 2 * width + 4:
            raise Refused('PROXY protocol v2 header from a trusted proxy too'
                          ' short for its addresses: %d bytes' % size)
        at = PROXY_V2_HEAD_BYTES
        host = socket.inet_ntop(kind, bytes(inbuf[at:at + width]))
        port = int.from_bytes(inbuf[at + 2 * width:at + 2 * width + 2], 'big')
        return (host, port), size
    if b'PROXY '.startswith(inbuf[:6]) or PROXY_V2_SIGNATURE.startswith(
            inbuf[:len(PROXY_V2_SIGNATURE)]):
        return None         # too short to tell yet
    return None, 0


@functools.lru_cache(maxsize=1024)      # hosts of at most 45 characters: 100 KiB
def trusted(host, networks):
    """True if host (an address as text) is in TRUSTED_PROXIES; an IPv4
    address mapped into IPv6 (::ffff:10.0.0.5, a dual-stack socket's
    peers) is read as itself.  Cached: a few addresses come again and again,
    and ipaddress takes microseconds to read one."""
    address = ipaddress.ip_address(host)
    if address.version == 6 and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


# A hop of X-Forwarded-For or Forwarded's for=: an address, with a port
# perhaps, an IPv6 one in brackets if it has a port.
HOP = re.compile(r'(\[[0-9A-Fa-f:.]{2,45}\]|[0-9.]{7,15}|[0-9A-Fa-f:.]{2,45})'
                 r'(?::([0-9]{1,5}))?')
MAX_HOP_CHARS = 45 + 2 + 6      # '[' IPv6 in its longest text ']' ':' port


@functools.lru_cache(maxsize=1024)      # hops of at most 53 characters: 250 KiB
def hop_address(text):
    """(host, port or None) of one hop, or None if it names no address.
    Remembered: a proxy forwards the same few clients again and again."""
    match = HOP.fullmatch(text)
    if match is None:
        return None
    host, port = match.groups()
    if host[0] == '[':
        host = host[1:-1]
        if ':' not in host:
            return None         # brackets hold IPv6 only
    elif port is not None and ':' in host:
        return None             # an IPv6 address with a port needs brackets
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        return None
    if port is not None and (int(port) > MAX_PORT or port != str(int(port))):
        return None
    return host, port and int(port)


def forwarded_hops(value):
    """The for= of each element of a Forwarded header (RFC 7239), quotes
    taken off; None for an element without one."""
    hops = []
    for element in value.split(','):
        hop = None
        for pair in element.split(';'):
            name, equals, text = pair.strip().partition('=')
            if equals and name.lower() == 'for':
                hop = text[1:-1] if text[:1] == text[-1:] == '"' and len(
                    text) > 1 else text
        hops.append(hop)
    return hops


# W3C Trace Context's traceparent, version 00 and the versions after it
# (which may add fields after the flags): lowercase hex only.
TRACEPARENT = re.compile(
    r'([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-[ -~]*)?')


def trace_parent(value):
    """The trace id and parent id of a valid traceparent, or None.  Invalid
    (the caller's trace must then be ignored): version ff, an id of zeros
    only, and anything after version 00's four fields; two traceparent
    headers arrive joined, so they are invalid too."""
    match = TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, more = match.groups()
    if (version == 'ff' or (version == '00' and more is not None)
            or trace_id == '0' * 32 or parent_id == '0' * 16):
        return None
    return trace_id, parent_id


def forward(request):
    """The client a trusted peer's forwarding header names: the first hop,
    from the right, that is not trusted (the hops a client added itself sit
    to its left and are never read).  Sets request.client and request.via,
    or request.forwarding, why the header named no client."""
    headers = request.headers
    if 'x-forwarded-for' in headers:
        name = 'X-Forwarded-For'
        hops = [hop.strip() for hop in headers['x-forwarded-for'].split(',')]
    elif 'forwarded' in headers:
        name = 'Forwarded'
        hops = forwarded_hops(headers['forwarded'])
    else:
        return
    for hop in reversed(hops[-MAX_FORWARDED_HOPS:]):
        found = hop is not None and len(hop) <= MAX_HOP_CHARS and hop_address(hop)
        if not found:
            request.forwarding = (name, 'an element without for=', None) if (
                hop is None) else (name, 'a hop that is not an address', hop)
            return
        host, port = found
        if not trusted(host, SETTINGS.trusted_proxies):
            break
    else:
        if len(hops) > MAX_FORWARDED_HOPS:
            request.forwarding = (name, 'more than %d trusted hops'
                                  % MAX_FORWARDED_HOPS, None)
            return
    request.via = request.via or request.client
    request.client = peer_text(host, port)


def peer_text(host, port=None):
    """host:port as a record shows it, [host]:port for IPv6."""
    if ':' in host:
        host = '[%s]' % host
    return host if port is None else '%s:%d' % (host, port)


# -- What the log shows --------------------------------------------------------

# The only road from a client's bytes to a record.  "Reading requests"
# records what arrived, raw; the functions of this section decide what of it
# a record shows, and every record kind calls them (a new kind of record
# calls them too, and nothing else):
#
#   shown(text)                   any client text: cut, credentials hidden
#   shown_name(name)              a header's, parameter's or field's name
#   shown_header(name, value)     a header's value (LOG_HEADERS respected)
#   shown_headers(header_list)    every header of an arrival, names and values
#   shown_url(target)             a URL or request target
#   shown_params(params, text)    a query's or a form's parameters
#   body_fields(data, media, cut) what a body record shows of a body's start
#   quoted(data, size)            bytes kek did not parse (refusals, junk)
#   shown_parts(reader)           the parts of a multipart body
#   shown_refusal(refusal)        why a request was refused, with its evidence
#
# Each applies the same rules: the name rule (secret_name(): a value whose
# name looks secret shows as its length, '<14 bytes>'), the value rule
# (hide_shapes(): a value shaped like a well-known credential shows as its
# kind and length, '<github token, 40 bytes>', a JWT as what helps debug
# it), nesting (shown_value(): a value that is a URL, a form or JSON is
# shown through the same rules, MAX_NESTING deep) and, for text that has no
# grammar kek knows, the free-text rule (hide_fields(): NAME=VALUE,
# NAME: VALUE, "NAME": "VALUE", <NAME>VALUE</NAME>).  A hidden value is
# always spelled by hidden(): '<SIZE>' or '<KIND, SIZE>'.

MAX_NESTING = 3                 # a URL in a form in JSON...: past it, the length
MAX_CACHED_NAME = 64            # names up to this long are remembered, the rest
                                # judged anew: a cache no client can grow
MAX_FREE_FIELDS = 1000          # NAME=VALUE candidates looked at in one text;
                                # the rest of it is shown as its length
MAX_JWT_CHARS = 8192            # a longer JWT is shown by its length only
MAX_CLAIM_CHARS = 100           # an iss, aud or kid longer than this: its length
MAX_JSON_TOKENS = 4096          # of JSON read for secret keys (a Python step
                                # each): the rest is shown as its length


def hidden(text, kind=None, cut=False):
    """A value as the log shows it in its place: '<14 bytes>', '<github
    token, 40 bytes>', '<7 bytes, cut>' (a value the preview ends in)."""
    return hidden_size(byte_count(text), kind, cut)


def hidden_size(size, kind=None, cut=False):
    """The one spelling of a value the log does not show: its size, after
    its kind if it has one."""
    return '<%s%s%s>' % (kind + ', ' if kind else '', in_bytes(size),
                         ', cut' if cut else '')


def length(value):
    """A value hidden by its name: only its length, '<14 bytes>'."""
    return hidden(value)


# The name rule.  A name (of a header, a query parameter, a form field, a
# JSON key or a multipart part) looks secret when one of its words is one of
# these, or its plural.  Words are split at '-', '_', '.', any other
# punctuation and case changes: 'X-Api-Key', 'access_token', 'accessToken'.
SECRET_WORDS = frozenset((
    'auth', 'authentication', 'authorization', 'authorisation', 'oauth',
    'token', 'secret', 'password', 'passwd', 'pass', 'pwd', 'pw', 'psw',
    'passcode', 'passphrase', 'key', 'apikey', 'session', 'sid', 'credential',
    'creds', 'signature', 'sig', 'sign', 'hmac', 'jwt', 'assertion', 'saml',
    'code', 'otp', 'totp', 'pin', 'csrf', 'xsrf', 'ticket', 'cookie',
    'bearer', 'verifier', 'private', 'privkey', 'mnemonic', 'seed', 'cvc',
    'cvv', 'cvv2', 'ssn'))
# ... or when it has one of these anywhere, for names run together:
# 'accesstoken', 'userpass', 'DBPASS', 'PHPSESSID', 'SAMLart',
# 'oauth_verifier'.  Literal words, so the search cannot backtrack.
SECRET_PARTS = re.compile(
    'token|secret|pass(?!eng|ag|iv|ion)|pwd|credential|signature|session|sessid|csrf|xsrf'
    '|hmac|jwt|apikey|privatekey|privkey|accesskey|authkey|saml|verifier'
    '|mnemonic|authori')
WORD = re.compile('[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+')
# Letters that look Latin but are not (Cyrillic, Greek), read as the Latin
# letter they look like; NFKC first folds the fullwidth and mathematical ones.
LOOKALIKES = str.maketrans(
    'АВСЕНІЈКМОРЅТХУаесіјорѕхуԁԛԝһӏΑΒΕΖΗΙΚΜΝΟΡΤΥΧαιοκνρτυχ',
    'ABCEHIJKMOPSTXYaecijopsxydqwhlABEZHIKMNOPTYXaiokvptux')
# What a name is read without: characters that cannot be seen, and controls.
UNSEEN = re.compile('[\x00-\x1f\x7f-\x9f\u00ad\u034f\u061c\u115f\u1160'
                    '\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e'
                    '\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0'
                    '\U000e0000-\U000e0fff]')


def secret_name(name):
    """True if a value of this name is to be shown by its length only.  A
    name too long to be a real one counts as secret, unread."""
    if len(name) > MAX_CACHED_NAME:
        return len(name) > MAX_NAME_CHARS or judged_secret(name)
    return remembered_secret(name)


def judged_secret(name):
    """The name rule itself: lookalike letters folded, characters that
    cannot be seen dropped ('to\\0ken'), then its words and parts."""
    if not (name.isascii() and name.isprintable()):
        name = UNSEEN.sub('', unicodedata.normalize('NFKC', name)
                          .translate(LOOKALIKES))
    if SECRET_PARTS.search(name.lower()):
        return True
    for word in WORD.findall(name):
        word = word.lower()
        if word in SECRET_WORDS or (word[-1] == 's'
                                    and word[:-1] in SECRET_WORDS):
            return True
    return False


# Names up to MAX_CACHED_NAME characters, 4096 of them: under 1 MiB.
remembered_secret = functools.lru_cache(maxsize=4096)(judged_secret)
# Text in which no name can be secret: none of these is in it, lower-cased.
SECRET_HINTS = tuple(sorted(SECRET_WORDS - {'pw'})) + (
    'pw', 'pass', 'sessid', 'privatekey', 'accesskey', 'authkey', 'verifier',
    # a word whose first letter is a lookalike ('Аuthorization')
    'uthori', 'assw', 'ecret', 'oken', 'ession')


def tree_pattern(words):
    """A pattern that matches the longest of words at a place, written as
    the tree of their letters ('pass(?:code|word)?'): re tries a place
    against a branch or two, where a list of words has it try each."""
    tree = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[''] = {}           # a word ends here

    def branches(node):
        alternatives = [re.escape(char) + branches(child)
                        for char, child in sorted(node.items()) if char]
        if not alternatives:
            return ''
        pattern = '(?:%s)' % '|'.join(alternatives)
        return pattern + '?' if '' in node else pattern
    return branches(tree)


SECRET_HINT = re.compile(tree_pattern(SECRET_HINTS), re.IGNORECASE)
SECRET_HINT_LOWER = re.compile(SECRET_HINT.pattern)
LONG_TEXT = 256     # from here, a C search for each hint beats one pattern


# Controls but tab, CR and LF: what may hide inside a name in ASCII text.
HIDING_CONTROL = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]')


def may_name_a_secret(text):
    """False when no name in text can look secret: most texts."""
    if not text.isascii() or '%' in text or HIDING_CONTROL.search(text):
        return True     # a lookalike letter, an escape or a NUL may spell one
    lower = text.lower()
    if len(text) < LONG_TEXT:
        return SECRET_HINT_LOWER.search(lower) is not None
    return any(hint in lower for hint in SECRET_HINTS)


# The value rule: what a credential looks like, whatever its name (SPEC 3).
# Each kind starts with a literal, so the search only tries where one may
# begin.  A PEM block and userinfo are found apart, in C (hide_shapes()).
CREDENTIALS = (
    ('github token', r'gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{40,}'),
    ('gitlab token', r'gl(?:pat|dt|rt|ptt|soat|oas|cbt|imt|agent)-'
                     r'[A-Za-z0-9_-]{20,}'),
    ('slack token', r'xox[bpareso]-[A-Za-z0-9-]{10,}|xapp-[A-Za-z0-9-]{10,}'),
    ('slack webhook', r'hooks\.slack\.com/(?:services|workflows|triggers)/'
                      r'[A-Za-z0-9/_-]{20,}'),
    ('stripe key', r'[srp]k_(?:live|test)_[A-Za-z0-9]{10,}'),
    ('webhook secret', r'whsec_[A-Za-z0-9+/=]{20,}'),
    ('aws access key', r'(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|ANPA|ANVA|APKA)'
                       r'[A-Z0-9]{16}'),
    ('google api key', r'AIza[A-Za-z0-9_-]{35}'),
    ('npm token', r'npm_[A-Za-z0-9]{36}'),
    ('pypi token', r'pypi-[A-Za-z0-9_-]{50,}'),
    ('anthropic key', r'sk-ant-[A-Za-z0-9_-]{20,}'),
    ('openai key', r'sk-(?:proj|svcacct|admin|None)-[A-Za-z0-9_-]{20,}'
                   r'|sk-[A-Za-z0-9]{48}'),
    ('sendgrid key', r'SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}'),
    ('twilio key', r'SK[0-9a-f]{32}'),
    ('shopify token', r'shp(?:at|ss|ca|pa)_[A-Fa-f0-9]{32}'),
    ('digitalocean token', r'do[opr]_v1_[a-f0-9]{64}'),
    ('telegram bot token', r'[0-9]{8,10}:AA[A-Za-z0-9_-]{33}'),
    ('jwt', r'eyJ[A-Za-z0-9_-]{2,}\.eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*'
            r'(?:\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*)?'),
    ('private key', r'-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY( BLOCK)?-----'),
)
CREDENTIAL = re.compile('|'.join('(%s)' % pattern for _, pattern in CREDENTIALS),
                        re.ASCII)
CREDENTIAL_KINDS = (None,) + tuple(kind for kind, _ in CREDENTIALS)
MIN_CREDENTIAL = 20             # no credential above is shorter
PRIVATE_KEY_END = re.compile(r'-----END [A-Z0-9 ]{0,40}PRIVATE KEY( BLOCK)?-----')
# For the first look, in C: a run of MIN_CREDENTIAL token characters.
RUN_OF = bytes(ord('a') if chr(byte).isascii() and (chr(byte).isalnum()
                                                    or chr(byte) in '_-')
               else ord(' ') for byte in range(256))
RUN = b'a' * MIN_CREDENTIAL


def may_hold_credential(text):
    """False when text cannot hold a credential's shape: most texts.  A
    translate() and a find, in C."""
    if len(text) < MIN_CREDENTIAL:
        return '://' in text and '@' in text
    data = text.encode('utf-8', 'surrogateescape')
    return RUN in data.translate(RUN_OF) or (b'://' in data and b'@' in data)


# Where each credential may begin: a literal found in C (str.find), and how
# far before it the credential starts (a Stripe key's 's', a Telegram
# token's digits).  Only there is CREDENTIAL tried: one pattern of many
# kinds, tried at every character, cost 40 ms for 64 KiB.
CREDENTIAL_HINTS = (
    ('gh', 0), ('github_pat_', 0), ('gl', 0), ('xox', 0), ('xapp-', 0), ('hooks.slack.com/', 0),
    ('k_live_', 1), ('k_test_', 1), ('whsec_', 0), ('AKIA', 0), ('ASIA', 0),
    ('ABIA', 0), ('ACCA', 0), ('AGPA', 0), ('AIDA', 0), ('AROA', 0),
    ('ANPA', 0), ('ANVA', 0), ('APKA', 0), ('AIza', 0), ('npm_', 0),
    ('pypi-', 0), ('sk-', 0), ('SG.', 0), ('SK', 0), ('shp', 0), ('_v1_', 3),
    (':AA', 10), ('eyJ', 0), ('-----BEGIN', 0))
MAX_CREDENTIAL_TRIES = 1000     # places to look at in one text: past them,
                                # all of it is shown as its length


def credential_places(text):
    """Where in text a credential may begin, in order; None if there are
    more than MAX_CREDENTIAL_TRIES such places."""
    places = set()
    for hint, back in CREDENTIAL_HINTS:
        at = text.find(hint)
        while at >= 0:
            places.update(range(max(0, at - back), at + 1) if back > 2
                          else (max(0, at - back),))
            if len(places) > MAX_CREDENTIAL_TRIES:
                return None
            at = text.find(hint, at + 1)
    return sorted(places)


def hide_shapes(text):
    """text with every credential shape hidden (the value rule), and the
    userinfo of every URL in it ('https://ann:<8 bytes>@host')."""
    if not may_hold_credential(text):
        return text
    if '://' in text and '@' in text:
        text = hide_userinfo(text)
    places = credential_places(text)
    if places is None:          # too many to try: none of it is shown
        return length(text)
    parts = []
    done = 0
    for at in places:
        match = CREDENTIAL.match(text, at) if at >= done else None
        if match is None:
            continue
        kind = CREDENTIAL_KINDS[match.lastindex]
        end = match.end()
        if kind == 'private key':       # to its END line, or to the end
            last = PRIVATE_KEY_END.search(text, end)
            end = last.end() if last else len(text)
            shown_text = hidden(text[match.start():end], kind)
        elif kind == 'jwt':
            shown_text = described_jwt(match.group())
        else:
            shown_text = hidden(match.group(), kind)
        parts.append(text[done:match.start()])
        parts.append(shown_text)
        done = end
    if not parts:
        return text
    parts.append(text[done:])
    return ''.join(parts)


# What ends the userinfo of a URL, or shows there was none.
NOT_USERINFO = re.compile(r'[\s/?#"<>\\\[\]{}]')
SCHEME_CHARS = frozenset('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
                         '0123456789+.-')


def hide_userinfo(text):
    """Every scheme://user:password@host in text with the password as its
    length; a user alone too (https://TOKEN@host/).  Each '://' is looked
    at once, and what follows it no further than its authority."""
    parts = []
    done = at = 0
    while True:
        at = text.find('://', at)
        if at < 0:
            break
        start = at + 3
        end = NOT_USERINFO.search(text, start)
        end = len(text) if end is None else end.start()
        sign = text.rfind('@', start, end)
        if sign > start and at and text[at - 1] in SCHEME_CHARS:
            user, colon, password = text[start:sign].partition(':')
            parts.append(text[done:start])
            parts.append(user + ':' + length(password) if colon
                         else length(user))
            done = sign
        at = start
    if not parts:
        return text
    parts.append(text[done:])
    return ''.join(parts)


JWT_FIELDS = ('alg', 'typ', 'kid')
JWT_CLAIMS = ('iss', 'aud')
JWT_TIMES = ('exp', 'nbf', 'iat')
SAFE_CLAIM = re.compile(r'[A-Za-z0-9._:/+=,-]{1,%d}' % MAX_CLAIM_CHARS, re.ASCII)


def described_jwt(token):
    """A JWT as the log shows it: its header's alg, typ and kid, its claims
    iss and aud, and exp, nbf and iat as ages; never its signature, nor any
    other claim (sub, email... may be personal data)."""
    said = []
    if len(token) <= MAX_JWT_CHARS:
        header, payload = (jwt_part(part) for part in token.split('.')[:2])
        for name in JWT_FIELDS:
            said.append(claim(name, header.get(name)))
        for name in JWT_CLAIMS:
            said.append(claim(name, payload.get(name)))
        for name in JWT_TIMES:
            value = payload.get(name)
            if isinstance(value, (int, float)) and abs(value) < 1e11:
                said.append('%s=%s' % (name, age(value, name == 'exp')))
    return '<jwt %s>' % ', '.join(
        [' '.join(part for part in said if part), in_bytes(len(token))])


def jwt_part(part):
    """A JWT's header or payload, decoded; {} if it is not a JSON object."""
    try:
        value = json.loads(base64.urlsafe_b64decode(part + '=' * (-len(part) % 4)))
    except (ValueError, RecursionError):     # nested past json's depth too
        return {}
    return value if isinstance(value, dict) else {}


def claim(name, value):
    """name=value if value is short plain text (a list of them: joined by
    ','); name=<N bytes> if it is anything else."""
    if value is None:
        return ''
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        value = ','.join(value)
    if isinstance(value, str) and SAFE_CLAIM.fullmatch(value) and not (
            may_hold_credential(value) and hide_shapes(value) != value):
        return '%s=%s' % (name, value)
    return '%s=%s' % (name, length(value if isinstance(value, str)
                                   else json.dumps(value)))


def age(when, expires):
    """A time as its distance from now: 'in 4m59s', '3m ago' ('expired 3m
    ago' for exp)."""
    seconds = int(when - time.time())
    words = duration(abs(seconds))
    if seconds >= 0:
        return 'in ' + words
    return ('expired %s ago' if expires else '%s ago') % words


def duration(seconds):
    """4m59s, 2h, 3d4h: its two largest units."""
    units = []
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60), ('s', 1)):
        if seconds >= size or (unit == 's' and not units):
            units.append('%d%s' % (seconds // size, unit))
            seconds %= size
    return ''.join(units[:2])


# The free-text rule: NAME=VALUE, NAME: VALUE, "NAME": "VALUE",
# 'NAME': 'VALUE', <NAME>VALUE</NAME> in text kek has no grammar for.
NAME_CHARS = frozenset('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'
                       '0123456789_.-$')
UNQUOTED_END = re.compile(r'[\s&;,"\'<>]')
# A value already hidden, as hidden() spells it: not hidden again.
HIDDEN = re.compile(r'<(?:[a-z ]{1,24}, )?[0-9]+ bytes?(?:, cut)?>')


# Where a field's name may end in text a hint search cannot read (letters
# that are not ASCII, characters that cannot be seen): before each '=' or
# ':', after each '<'.
SEPARATOR = re.compile('[=:\uff1a<]')
NAME_RUN = re.compile('[%s]*' % re.escape(''.join(sorted(NAME_CHARS))))
BLANKS = (' ', '\t', '\u00a0')


def hide_fields(text):
    """text with the value of every field whose name looks secret shown as
    its length.  Candidate names are found by a C search for a hint, or,
    in text with letters that are not ASCII or characters that cannot be
    seen, at every separator; each is read no further than MAX_NAME_CHARS,
    and once.  Past MAX_FREE_FIELDS candidates, the rest of the text is
    shown as its length."""
    if not may_name_a_secret(text):
        return text
    if text.isascii() and not HIDING_CONTROL.search(text):
        names = hinted_names(text)
    else:
        names = separated_names(text)
    parts = []
    done = 0        # text[:done] is in parts
    for looked, (start, end) in enumerate(names):
        if start < done:
            continue
        if looked >= MAX_FREE_FIELDS:
            parts.append(length(text[done:]))
            done = len(text)
            break
        value = field_value(text, start, end)
        if value is None or not secret_name(text[start:end]):
            continue
        begin, finish = value
        marker = HIDDEN.match(text, begin)
        if marker and marker.end() >= finish:
            continue        # the value is hidden already, by another rule
        parts.append(text[done:begin])
        parts.append(length(text[begin:finish]))
        done = finish
    if not parts:
        return text
    parts.append(text[done:])
    return ''.join(parts)


def hinted_names(text):
    """(start, end) of each name around a hint of SECRET_HINT, each name
    once: a hint inside a name already read is skipped."""
    walked = 0
    for hint in SECRET_HINT.finditer(text):
        start, end = hint.start(), hint.end()
        if start < walked:
            continue
        floor = max(walked, start - MAX_NAME_CHARS)
        while start > floor and text[start - 1] in NAME_CHARS:
            start -= 1
        end = NAME_RUN.match(text, end, end + MAX_NAME_CHARS).end()
        walked = end
        yield start, end


def separated_names(text):
    """(start, end) of the name before each '=' or ':' (and its closing
    quote and blanks), or after each '<', read over letters of any script
    and characters that cannot be seen."""
    walked = 0
    for separator in SEPARATOR.finditer(text):
        at = separator.start()
        if separator.group() == '<':      # <NAME ...> or <ns:NAME ...>
            start = end = at + 1
            while True:
                while (end < len(text) and end < start + MAX_NAME_CHARS
                       and name_char(text[end])):
                    end += 1
                if text[end:end + 1] != ':' or start > at + 1:
                    break           # one namespace, no more
                start = end = end + 1
            walked = end
            yield start, end
            continue
        end = at
        while end > walked and text[end - 1] in BLANKS:
            end -= 1
        if text[end - 1:end] in ('"', "'", ']'):
            end -= 1
            end -= text[end - 1:end] == '\\'
        start = end
        floor = max(walked, end - MAX_NAME_CHARS)
        while start > floor and name_char(text[start - 1]):
            start -= 1
        walked = at + 1
        yield start, end


def name_char(char):
    """A character a name may hold in text that is not plain ASCII: a
    letter of any script, or one that cannot be seen (but a line end)."""
    if char in NAME_CHARS or char.isalnum():
        return True
    return char not in '\t\n\r' and UNSEEN.match(char) is not None


# The indexes a field's name may carry before its separator, as PHP and
# Rails forms write them: password[0], password[], password["x"].  At most
# 8 of 64 characters each: read once, never backtracked.
FIELD_INDEX = re.compile(r'(?:\[[^\[\]\s]{0,64}\]){1,8}')


def field_value(text, start, end):
    """Where the value of the name text[start:end] is, (begin, end), if the
    name is followed as a field's name is: by '=' or ':' (after its closing
    quote, if quoted, and blanks), or it is an XML tag's; else None."""
    before = text[start - 1:start]
    if before == ':':           # <namespace:NAME ...>
        prefix = start - 1
        floor = max(0, prefix - MAX_NAME_CHARS)
        while prefix > floor and name_char(text[prefix - 1]):
            prefix -= 1
        before = '<' if text[prefix - 1:prefix] == '<' else before
    if before == '<':           # <NAME attributes>VALUE</NAME>
        close = text.find('>', end, end + MAX_NAME_CHARS)
        if close < 0 or text[close - 1] == '/':
            return None
        finish = text.find('</', close)     # past CDATA, comments, elements
        return close + 1, len(text) if finish < 0 else finish
    at = end
    if before in ('"', "'"):
        if text[start - 2:start - 1] == '\\':
            before = '\\' + before      # JSON inside a JSON string
        if not text.startswith(before, at):
            return None
        at += len(before)
    if text[at:at + 1] == ']':  # user[password]=...
        at += 1
    index = FIELD_INDEX.match(text, at)     # password[0]:, user[password][0]=
    if index is not None:
        at = index.end()
    while text[at:at + 1] in BLANKS:
        at += 1
    separator = text[at:at + 1]
    if separator not in ('=', ':', '\uff1a') or not separator:
        return None
    at += 1
    while text[at:at + 1] in BLANKS:
        at += 1
    for quote in ('\\"', '"', "'"):
        if text.startswith(quote, at):
            finish = text.find(quote, at + len(quote))
            while finish > 0 and quote != '\\"' and text[finish - 1] == '\\':
                finish = text.find(quote, finish + 1)
            return at + len(quote), len(text) if finish < 0 else finish
    if separator != '=':        # NAME: VALUE, to the end of its line
        finish = min((found for found in (text.find('\n', at), text.find('\r', at))
                      if found >= 0), default=len(text))
        escaped = text.find('\\n', at, finish)     # a newline as JSON writes it
        finish = finish if escaped < 0 else escaped
    else:                       # to a blank or a quote; '<' ends no first
        found = UNQUOTED_END.search(text, at + text.startswith(('<', '>'), at))
        finish = len(text) if found is None else found.start()
    return (at, finish) if finish > at else None


# What may take an escape of up to ESCAPE_CHARS characters on a line
# (\udcff, \u202e): anything but printable ASCII.  Counting it all as the
# longest escape is safe; shows_as_itself() spares the text that has none.
COSTLY = re.compile('[^ -~]')
ESCAPE_CHARS = 6                # \udcff, \u202e
ASTRAL_ESCAPE_CHARS = 10        # \U0001d159


def fit(text, limit):
    """How many characters of text to show: as many as keep its escaped
    form within limit characters, and within twice the text's own size
    (plus SHOWN_SLACK), though an escape takes six or ten characters for one."""
    head = text[:limit]
    if shows_as_itself(head):
        return len(head)
    budget = min(limit, 2 * len(text) + SHOWN_SLACK)
    size = at = 0       # the escaped size of text[:at]
    for match in COSTLY.finditer(text, 0, budget):
        plain = match.start() - at      # plain characters before it
        escape_chars = (ESCAPE_CHARS if match.group() <= '\uffff'
                        else ASTRAL_ESCAPE_CHARS)
        if size + plain + escape_chars > budget:
            return at + min(plain, budget - size)
        size += plain + escape_chars
        at = match.start() + 1
    return min(len(text), at + budget - size)


def cut(text, limit):
    """text cut by fit(), and the cut said."""
    end = fit(text, limit)
    if end >= len(text):
        return text
    return '%s...(%d chars in all)' % (text[:end], len(text))


def shown(text, limit=MAX_SHOWN_CHARS):
    """Client text as the log shows it: every credential's shape hidden,
    then cut at limit, the cut said."""
    if len(text) < MIN_CREDENTIAL and text.isascii() and text.isprintable() and (
            '://' not in text):
        return text         # the common case, checked first
    return cut(hide_shapes(text), limit)


def shown_name(name):
    """A name as the log shows it: cut like a value, at MAX_NAME_CHARS."""
    return shown(name, MAX_NAME_CHARS)


# Authorization schemes shown before the credentials' length (the IANA
# registry, and the usual others).  Anything else may be the secret itself.
KNOWN_SCHEMES = frozenset(scheme.lower() for scheme in (
    'Basic', 'Bearer', 'Digest', 'Negotiate', 'NTLM', 'DPoP', 'HOBA',
    'Mutual', 'SCRAM-SHA-1', 'SCRAM-SHA-256', 'vapid', 'AWS4-HMAC-SHA256',
    'Token', 'OAuth', 'GNAP', 'Concealed', 'PrivateToken', 'Kerberos',
    'Hawk', 'AWS', 'SharedKey', 'SharedAccessSignature', 'ApiKey', 'JWT'))
# Transfer codings shown as they are; any other value is shown as its length.
KNOWN_CODINGS = frozenset(('chunked', 'gzip', 'deflate', 'compress',
                           'identity', 'x-gzip', 'x-compress', 'br', 'zstd',
                           'trailers'))
LENGTH_LIKE = re.compile('[0-9 \t,+.-]{0,40}')
COOKIE_NAME = re.compile('[%s]{1,64}' % TCHAR)
# Headers whose value is a URL, shown as a URL is.
URL_HEADERS = frozenset(('referer', 'origin', 'location', 'content-location',
                         'x-original-url', 'x-original-uri', 'x-rewrite-url',
                         'x-forwarded-uri', 'x-forwarded-url', 'link'))


def shown_header(name, value):
    """A header's value as the log shows it (SPEC 3, "What is never
    logged"): credentials never, the rest cut; only its length when
    LOG_HEADERS is off."""
    if not SETTINGS.log_headers:
        return length(value)
    return header_rule(name)(value)


def header_rule(name):
    """The function that shows a value of the header of this name.  The
    signature header of one's own (WEBHOOK_SIGNATURE_HEADER) is a secret."""
    own = SETTINGS.webhook_signature_header
    if len(name) > MAX_CACHED_NAME:
        return judged_header_rule(name, own)
    return remembered_header_rule(name, own)


def judged_header_rule(name, own):
    lower = name.lower()
    if lower == 'authorization' or lower == 'proxy-authorization':
        return shown_credentials
    if lower == 'cookie' or lower == 'set-cookie':
        return shown_cookies
    if secret_name(name) or lower == own:
        return length
    if lower == 'content-length':
        return shown_content_length
    if lower == 'transfer-encoding':
        return shown_codings
    if lower in URL_HEADERS:
        return shown_url
    return shown_free


# Names up to MAX_CACHED_NAME characters, 4096 of them: under 1 MiB.  The
# key holds WEBHOOK_SIGNATURE_HEADER too, so a new setting needs no clearing.
remembered_header_rule = functools.lru_cache(maxsize=4096)(judged_header_rule)


def shown_headers(header_list):
    """Every header of a request, in order, as (name, value) the log shows
    them (LOG_HEADERS is on): each name cut, each value by its rule.  A
    name is a token, so one shorter than any credential shows as it is."""
    own = SETTINGS.webhook_signature_header
    shown_ones = []
    for name, value in header_list:
        if len(name) <= MAX_CACHED_NAME:
            rule = remembered_header_rule(name, own)
        else:
            rule = judged_header_rule(name, own)
        if len(name) >= MIN_CREDENTIAL:
            name = shown_name(name)
        shown_ones.append((name, rule(value)))
    return shown_ones


# What a header's value holds if it nests a URL, a form or JSON.
NESTS = re.compile(r'[=@{\[/<]')


def shown_free(value):
    """A header's value that has no rule of its own: what nests in it (a
    URL, a form or JSON) by the rules, then shown().  Most have nothing
    that could nest: only their fields by name ('password: ...', as free
    text has them), then shown()."""
    if NESTS.search(value) is None:
        value = hide_fields(value)
        if (len(value) < MIN_CREDENTIAL and value.isascii()
                and value.isprintable()):
            return value        # shown()'s common case, without the call
        return shown(value)
    return shown(shown_value(value))


def shown_credentials(value):
    """Authorization: its scheme if it is a known one, then the length, or
    what a JWT shows of itself."""
    scheme, blank, credentials = value.partition(' ')
    if blank and scheme.lower() in KNOWN_SCHEMES:
        token = credentials.strip(' \t')
        match = CREDENTIAL.fullmatch(token)
        if match and CREDENTIAL_KINDS[match.lastindex] == 'jwt':
            return '%s %s' % (scheme, described_jwt(token))
        return '%s %s' % (scheme, length(credentials))
    return length(value)


def shown_content_length(value):
    return value if LENGTH_LIKE.fullmatch(value) else length(value)


def shown_codings(value):
    codings = {coding.strip(' \t').lower() for coding in value.split(',')}
    return shown(value) if codings <= KNOWN_CODINGS else length(value)


def shown_cookies(value):
    """A Cookie header's names only (RFC 6265: a ';' ends a value even in
    quotes); a pair that has no name, or a name that is not one, as its
    length: browsers send a cookie set without a name as its bare value."""
    names = []
    for pair in value.split(';'):
        pair = pair.strip(' \t')
        name, equals, rest = pair.partition('=')
        if equals and rest.strip('=') and COOKIE_NAME.fullmatch(name):
            names.append(name)
        elif pair:
            names.append(length(pair))
    return '<cookies: %s>' % shown(', '.join(names))


# How a value that may be JSON starts, as sent.
JSON_START = ('{', '[', '%7B', '%7b', '%5B', '%5b')
# What ends a field of a query or a form, as the log reads it: a ';' too, as
# some servers still take it (Rack before 3, Go before 1.17), though kek's
# own parameters are split at '&' only.
FIELD_END = re.compile('([&;])')
# What a URL is cut into: its path, then each of ';' parameters, the '?'
# query and the '#' fragment, whose fields follow the name rule.
URL_PARTS = re.compile('([;?#])')


def shown_url(target, depth=0):
    """A URL or request target as the log shows it: the values of
    secret-looking fields of its path parameters, query and fragment as
    their length, and so a field whose value hides a secret (nesting);
    userinfo as its length, and every credential's shape; everything else
    as sent, cut at MAX_SHOWN_URL."""
    if (len(target) < MIN_CREDENTIAL and target.isascii() and target.isprintable()
            and '@' not in target and not may_name_a_secret(target)):
        return target       # the common case, checked first
    if depth >= MAX_NESTING:
        return length(target)
    pieces = URL_PARTS.split(target)
    path = pieces[0]
    if path[:1] != '/' or path[1:2] == '/':
        path = shown_authority(path)
    if may_name_a_secret(path):
        path = '/'.join(map(shown_segment, path.split('/')))
    for n in range(2, len(pieces), 2):
        pieces[n] = shown_query(pieces[n], depth)
    pieces[0] = path
    return cut(hide_shapes(''.join(pieces)), MAX_SHOWN_URL)


def shown_segment(segment):
    """A path segment by the free-text rule (/api/token=VALUE/), and as its
    length if it hides a secret only once percent-decoded."""
    shown_one = hide_fields(segment)
    if shown_one == segment and '%' in segment:
        text = unquote(segment)
        if hide_fields(text) != text:
            return length(segment)
    return shown_one


def shown_authority(path):
    """scheme://user:password@host/... with the password as its length, and
    so //user:password@host/... and CONNECT's user:password@host:port.  A
    user alone is shown as its length too: a token is often sent that way
    (https://TOKEN@host/)."""
    scheme, sep, rest = path.partition('//')
    if not sep:
        scheme, rest = '', path     # an authority alone
    authority, slash, rest = rest.partition('/')
    userinfo, at, host = authority.rpartition('@')
    if not at:
        return path
    user, colon, password = userinfo.partition(':')
    userinfo = user + ':' + length(password) if colon else length(userinfo)
    return scheme + sep + userinfo + at + host + slash + rest


def shown_query(query, depth=0):
    """A query (or a form, path parameters, a fragment) as sent, but for
    the values of secret-looking names, and values that hide a secret (a
    URL, a form or JSON with one, a credential's shape): their length."""
    if not may_name_a_secret(query) and '@' not in query:
        return query
    fields = FIELD_END.split(query)
    redacted = False
    for n in range(0, len(fields), 2):
        name, equals, value = fields[n].partition('=')
        if not value:
            if '%' in name and hide_fields(unquote(name)) != unquote(name):
                fields[n] = length(name)        # a form, encoded once more
                redacted = True
            continue
        text = unquote(value)
        if secret_name(unquote(name)) or nested(text, depth + 1) != text or (
                text != value and hide_shapes(text) != text):
            fields[n] = name + '=' + length(text)
            redacted = True
    return ''.join(fields) if redacted else query


def shown_value(value, depth=0):
    """A value as it may show: what hides a secret in it shown by its length
    (nested()), and every credential's shape by its kind."""
    if len(value) < MIN_CREDENTIAL and value.isalnum():
        return value        # the common case, checked first
    return hide_shapes(nested(value, depth))


def nested(value, depth=0):
    """A value with what hides a secret in it shown by its length: JSON (as
    Slack posts a form's payload=) with the values of secret-looking keys,
    a URL or a form with theirs, the rest by the free-text rule.
    MAX_NESTING deep, then its length if anything in it may be secret."""
    if not may_name_a_secret(value) and '@' not in value:
        return value
    if depth >= MAX_NESTING:
        return length(value)
    start = value.lstrip(' \t\r\n\ufeff')[:1]
    if start in ('{', '['):
        value = redact_json(value, depth + 1)
    elif '://' in value[:40] or value[:1] == '/':
        value = hide_userinfo(shown_url(value, depth + 1))
    elif '=' in value and FORM.fullmatch(value.strip(' \t\r\n')):
        value = shown_query(value, depth + 1)
    elif '%' in value:          # encoded once more, as a next= URL often is
        text = unquote(value)
        if text != value and nested(text, depth + 1) != text:
            return length(value)
    return hide_fields(value)


# Parameters read from this many characters are all shown as they are, but
# for secret-looking ones: none can be longer, or more.
SHORT_PARAMS = min(MAX_SHOWN_CHARS, 2 * MAX_SHOWN_PARAMS)


def shown_params(params, text):
    """Parameters (read from text, a query or a form) as the log shows them:
    the values of secret-looking names as their length, and what hides a
    secret in a value (shown_value()); every name and value cut, and at
    most MAX_SHOWN_PARAMS values; and how many values there were.  Most are
    short and plain, and all shown as they are."""
    count = sum(map(len, params.values()))
    short = len(text) <= SHORT_PARAMS       # none to cut, nor too many
    if short and not (may_name_a_secret(text) or may_hold_credential(text)):
        return params, count
    shown_ones = {}
    room = MAX_SHOWN_PARAMS
    for name, values in params.items():
        values = values[:room]
        room -= len(values)
        secret = secret_name(name)
        values = [length(value) if secret else shown_value(value)
                  for value in values]
        name = hide_shapes(hide_fields(name))     # a form that lost its '='
        if not short:
            name, values = shown_name(name), [shown(value) for value in values]
        shown_ones[name] = values
        if not room:
            break
    return shown_ones, count


# name=value&name=value..., the last perhaps cut short.  Each part is kept
# apart by a character the others lack ('=', '&'), so nothing backtracks.
FORM = re.compile(r'[^=&\s]+=[^&\s]*(?:&[^=&\s]+=[^&\s]*)*(?:&[^=&\s]*)?')
# What text has not: controls other than tab, CR and LF; bytes that were
# not UTF-8 (held as surrogates).
NOT_TEXT = re.compile('[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]')


def body_kind(text, media, cut):
    """What a body's first bytes are, as the log shows them: 'JSON' (by its
    type, or its first character), 'a form' (by its type, or by its look
    unless its type is JSON or XML), 'text', or else 'binary'.  A body cut
    short may end in the middle of a character."""
    start = text.lstrip(' \t\r\n\ufeff')[:1]
    if (is_json_type(media) and start in ('{', '[', '"')) or (
            not is_xml_type(media) and start in ('{', '[')):
        return 'JSON'
    if media == 'application/x-www-form-urlencoded' or (
            not is_xml_type(media) and FORM.fullmatch(text.strip(' \t\r\n'))):
        return 'a form'
    if NOT_TEXT.search(text, 0, len(text) - 3 if cut else len(text)):
        return 'binary'
    return 'text'


# What a credential is spelled with, and how much of one a cut may leave.
CREDENTIAL_CHARS = ('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
                    '0123456789_.+/=-')
# How each credential of CREDENTIALS begins.
CREDENTIAL_START = re.compile(
    r'gh[pousr]_|github_pat_|gl[a-z]{2,5}-|xox[a-z]-|xapp-|[srp]k_|whsec_'
    r'|A(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|NPA|NVA|PKA|Iza)|npm_|pypi-|sk-|SG\.'
    r'|SK[0-9a-f]|shp[a-z]{2}_|do[opr]_v1_|eyJ|[0-9]{8,10}:AA', re.ASCII)


def hide_cut_end(text):
    """A preview cut short may end inside a credential, too short now for
    its shape to be known: from where one begins in the run of credential
    characters it ends in, it is shown as its length; and so is a URL's
    authority the cut leaves open, which may end in a password."""
    authority = text.rfind('://') + 3
    if (2 < authority < len(text)
            and NOT_USERINFO.search(text, authority) is None):
        return text[:authority] + hidden(text[authority:], cut=True)
    run = len(text) - len(text.rstrip(CREDENTIAL_CHARS))
    start = CREDENTIAL_START.search(text, len(text) - run) if run else None
    if start is None:
        return text
    return text[:start.start()] + hidden(text[start.start():], cut=True)


def binary_may_hide_a_secret(text):
    """Bytes shown in base64 or hex are read by no rule, so they are shown
    only if no secret-looking name or credential's shape is in them, read
    without controls (UTF-16 text is ASCII between NULs) and with lookalike
    letters folded."""
    plain = HIDING_CONTROL.sub('', text).translate(LOOKALIKES)
    return SECRET_HINT.search(plain) is not None or hide_shapes(plain) != plain


def body_fields(data, media, cut):
    """What the body record shows of a body's first bytes (data): a form's
    fields like the query's, JSON with the values of secret-looking keys as
    their length, text by the free-text rule, anything else in base64 —
    unless a credential's shape or a secret-looking name may be in it,
    then by its size only."""
    text = as_text(data)
    kind = body_kind(text, media, cut)
    if kind == 'a form':
        form, count = shown_params(parse_query(text), text)
        if count > MAX_SHOWN_PARAMS:
            return {'form': form, 'form_values': count}
        return {'form': form}
    if kind == 'binary':
        if binary_may_hide_a_secret(text):
            return {'preview_binary': 'not shown: it may hold a secret'}
        return {'preview_base64': base64.b64encode(data).decode('ascii')}
    if kind == 'JSON':
        text = redact_json(text)
    text = hide_fields(text)
    if cut:
        text = hide_cut_end(hide_shapes(text))
    return {'preview': shown(text, 2 * len(data) + SHOWN_SLACK)}


JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"?|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def redact_json(text, depth=0):
    """JSON text (maybe cut short, maybe not JSON at all) with the values of
    secret-looking keys, at any depth, as their length: '"<7 bytes>"', or
    '"<7 bytes, cut>"' where the text ends inside one; and string values
    that hide a secret (nesting) the same.  One pass over its tokens, each
    found by a pattern that cannot backtrack."""
    if not (may_name_a_secret(text) or '\\u' in text or '@' in text):
        return text         # no key can be secret: most bodies
    parts = []
    done = 0                # text[:done] is in parts
    containers = []
    key = None              # a string where a key goes, until its ':'
    value_of = None         # the key whose value is next
    key_next = False
    tokens = JSON_TOKEN.finditer(text)
    for count, token in enumerate(tokens):
        if count >= MAX_JSON_TOKENS:
            parts.append(text[done:token.start()])
            parts.append(length(text[token.start():]))
            return ''.join(parts)
        char = token.group()[0]
        if value_of is not None:
            secret, value_of = secret_name(value_of), None
            if not secret and char == '"' and len(token.group()) > MIN_CREDENTIAL // 2:
                string = json_string(token.group())
                secret = nested(string, depth + 1) != string
            if secret:
                start, end, depth_in = token.start(), token.end(), 0
                if char in '{[':
                    depth_in = 1
                    for inner in tokens:
                        end = inner.end()
                        first = inner.group()[0]
                        depth_in += (first in '{[') - (first in '}]')
                        if not depth_in:
                            break
                value = text[start:end]
                if char == '"':
                    done_string = len(value) > 1 and value.endswith('"')
                    value = value[1:-1] if done_string else value[1:]
                    was_cut = not done_string
                else:
                    was_cut = depth_in > 0 or end == len(text)
                parts.append(text[done:start])
                parts.append('"%s"' % hidden(value, cut=was_cut))
                done = end
                key_next = False
                continue
        if char == '{':
            containers.append(char)
            key_next = True
        elif char == '[':
            containers.append(char)
            key_next = False
        elif char in '}]':
            if containers:
                containers.pop()
            key_next = False
        elif char == ',':
            key_next = bool(containers) and containers[-1] == '{'
        elif char == ':':
            value_of, key = key, None
        elif char == '"' and key_next:
            key = json_string(token.group())
            key_next = False
        else:
            key = None
    parts.append(text[done:])
    return ''.join(parts)


def json_string(token):
    """The text a JSON string token stands for; its raw inside if it is cut
    short or not valid JSON.  Only a token with an escape is decoded."""
    inside = token[1:-1] if len(token) > 1 and token.endswith('"') else token[1:]
    if '\\' not in inside:
        return inside
    try:
        return json.loads(token)
    except ValueError:
        return inside


# What quoted() takes for a header line, one that lost its colon, and a
# request line.
HEADER_LIKE = re.compile(r'((?:[%s]|[^\x00-\x7f]){1,%d})([ \t]*):'
                         % (TCHAR, MAX_NAME_CHARS))
NAME_LIKE = re.compile(r'([%s]{1,%d})[ \t]+' % (TCHAR, MAX_NAME_CHARS), re.ASCII)
REQUEST_LIKE = re.compile(r'[%s]{1,%d}(?= +(?:[/*]|[A-Za-z][A-Za-z0-9+.-]{0,31}:))'
                          % (TCHAR, MAX_METHOD_CHARS), re.ASCII)
VERSION_LIKE = re.compile(r'[A-Za-z]{1,8}/[0-9.]{1,8}', re.ASCII)


def quoted(data, size=None):
    """Client bytes (or text) kek did not parse, as the log may show them: a
    bad line, junk, bytes after the last request.  A line that reads 'Name:
    value' is shown as that header would be, a request line with its URL as
    an arrival's is (all of it up to its version, blanks and all), and
    anything else by its size and kind, with no more of it than LOG_BODY
    would show of a body.  size is that of all the bytes, of which data is
    the start."""
    text = data if isinstance(data, str) else as_text(data)
    if not text:
        return 'an empty line'
    size = byte_count(text) if size is None else size
    line, newline, rest = text.partition('\n')
    line = line[:-1] if newline and line.endswith('\r') else line
    more = ' (%s in all)' % in_bytes(size) if newline else ''
    blanks = len(line) - len(line.lstrip(' \t'))
    method = REQUEST_LIKE.match(line, blanks)
    if method:
        at = len(line) - len(line[method.end():].lstrip(' '))
        rest = line[at:].rstrip(' ')
        target, space, version = rest.rpartition(' ')
        if space and VERSION_LIKE.fullmatch(version):
            return '%s%s %s%s%s' % (line[:at], shown_url(target), version,
                                    line[at + len(rest):], more)
        if ' ' not in line[at:]:
            return '%s%s%s' % (line[:at], shown_url(line[at:]), more)
    header = header_line(line)
    if header is not None:
        return header + more
    kind, shown_text = viewed(text, size, SETTINGS.log_body)
    if not SETTINGS.log_body:
        return '%s, %s' % (in_bytes(size), kind)
    return '%s, %s: %s' % (in_bytes(size), kind, shown_text)


def header_line(line):
    """A line that reads as a header, shown as that header would be: 'Name:
    value', or 'Name value' if the name has a rule of its own (a header
    line that lost its colon: 'Authorization Bearer ...'); else None."""
    blanks = len(line) - len(line.lstrip(' \t'))
    header = HEADER_LIKE.match(line, blanks)
    if header:
        name, value = header.group(1), line[header.end():].strip(' \t')
        return '%s%s%s: %s' % (line[:blanks], shown_name(name), header.group(2),
                               shown_header(name, value))
    header = NAME_LIKE.match(line, blanks)
    if header and header_rule(header.group(1)) is not shown_free:
        return line[:header.end()] + shown_header(header.group(1),
                                                  line[header.end():])
    return None


# A parameter of a part's Content-Disposition, in each spelling RFC 7578
# and RFC 2231 allow: quoted or not, blanks around '=', name*=UTF-8''...
DISPOSITION_PARAMETER = re.compile(
    r';[ \t]*([^\s=;"]{1,%d})[ \t]*=[ \t]*("(?:[^"\\]|\\.)*"|[^;]*)'
    % MAX_NAME_CHARS)
FOLDED = re.compile(r'\r\n[ \t]+')


def part_fields(head):
    """name, filename and type of a part, from its header lines as sent
    (folded lines unfolded; an extended name*= wins over its plain twin);
    None for what it does not say."""
    fields = {}
    for line in FOLDED.sub(' ', head).split('\r\n'):
        header, colon, value = line.partition(':')
        header = header.strip(' \t').lower()
        if header == 'content-type':
            fields['type'] = value.strip(' \t')
        elif header == 'content-disposition':
            for match in DISPOSITION_PARAMETER.finditer(value):
                name, text = match.group(1).lower(), match.group(2).strip(' \t')
                if text.startswith('"'):     # maybe left open
                    text = re.sub(r'\\(.)', r'\1', text[1:-1] if (
                        len(text) > 1 and text.endswith('"')) else text[1:])
                if name.endswith('*'):
                    name, text = name[:-1], extended_value(text)
                    fields[name] = text
                elif name not in fields:
                    fields[name] = text
    return fields


def extended_value(text):
    """An RFC 2231 value, charset'language'percent-encoded, decoded."""
    charset, _, rest = text.partition("'")
    _, _, encoded = rest.partition("'")
    data = unquote(encoded.replace('+', '%2B')).encode('utf-8', 'surrogateescape')
    try:
        return data.decode(charset or 'utf-8')
    except (LookupError, UnicodeError):     # 'idna', 'undefined' ...
        return as_text(data)


def shown_parts(reader):
    """The fields a body record shows of a multipart body's parts: each
    part's name, filename, type and size, and a text field's value by the
    rules of a body — by its length if its name looks secret, not at all
    if it has no name kek can read, or if it is a file."""
    reader.finish()
    parts = []
    for part in reader.parts:
        fields = part_fields(part.head)
        shown_part = {}
        for name in ('name', 'filename', 'type'):
            if name in fields:
                shown_part[name] = (shown_name(fields[name]) if name == 'name'
                                    else shown(fields[name]))
        shown_part['bytes'] = part.size
        name = fields.get('name')
        if 'filename' in fields:
            pass                        # a file: never its contents
        elif not name or secret_name(name):
            shown_part['value'] = hidden_size(part.size)
        else:
            kind, value = viewed(as_text(part.start), part.size,
                                 SETTINGS.log_body)
            shown_part['value'] = (hidden_size(part.size, 'binary')
                                   if kind == 'binary' else value)
        parts.append(shown_part)
    fields = {'parts': parts}
    if reader.count > len(parts):
        fields['parts_count'] = reader.count
    if reader.broken:
        fields['parts_broken'] = reader.broken
    return fields


def shown_header_line(line):
    """A header or trailer line that is not 'Name: value', quoted; only
    its size when LOG_HEADERS is off, as every header value is then."""
    if not SETTINGS.log_headers:
        size = len(line) if isinstance(line, bytes) else byte_count(line)
        return '%s, a header line' % in_bytes(size)
    return quoted(line)


def shown_continuation_of(name, text):
    """A line that continues the value of header name (obs-fold): the start
    of that value may have named a secret ('password=' on the line before),
    so the line is shown by its length."""
    return 'of %s: %s' % (shown_name(name), length(text))


def shown_server_name(name):
    if not name:
        return 'no server name in its first bytes'
    return 'server name %s' % shown(hide_fields(as_text(name)))


def shown_hello(hello):
    """A TLS hello on a plain port: its server name, and if all of it came
    the ALPN names it offers and its JA4."""
    text = shown_server_name(hello and hello.server_name)
    if hello is not None and hello.whole:
        text += ', ALPN %s, JA4 %s' % (json_text(
            [shown_free(as_text(name)) for name in hello.alpn]), ja4(hello))
    return text


def shown_offer(hello):
    """What a TLS client offered, for a record's fields: its server name,
    ALPN names, versions and JA4 (the JA4 only if all the hello came)."""
    if hello is None:
        return {'hello': 'not a TLS ClientHello'}
    name = hello.server_name
    return {'server_name': name and shown(hide_fields(as_text(name))),
            'alpn_offered': [shown_free(as_text(name)) for name in hello.alpn],
            'versions_offered': [
                TLS_VERSION_NAMES.get(value, '0x%04x' % value)
                for value in hello.versions or [hello.version]
                if value and not grease(value)],
            'ja4': ja4(hello) if hello.whole else None}


# The parts of a certificate's names, as OpenSSL's one-line form spells them.
NAME_PARTS = {'commonName': 'CN', 'organizationName': 'O',
              'organizationalUnitName': 'OU', 'countryName': 'C',
              'stateOrProvinceName': 'ST', 'localityName': 'L',
              'emailAddress': 'emailAddress', 'domainComponent': 'DC'}


def shown_distinguished_name(name):
    """A certificate's subject or issuer, as getpeercert() gives it:
    CN=client,O=Example (the client's text, through the rules)."""
    return shown(hide_fields(','.join(
        '%s=%s' % (NAME_PARTS.get(part, part), value)
        for relative in name for part, value in relative)))


def certificate_time(text):
    return time.strftime('%Y-%m-%dT%H:%M:%SZ',
                         time.gmtime(ssl.cert_time_to_seconds(text)))


def shown_tls(facts):
    """What the log shows of a TLS connection (TLS.facts()): what was
    agreed, in OpenSSL's words, then what the client offered and, asked
    for one, the certificate it sent."""
    shown = {'version': facts['version'], 'cipher': facts['cipher'],
             'alpn': facts['alpn']}
    shown.update(shown_offer(facts['hello']))
    if 'cert' in facts:
        if facts['cert'] is None:
            shown['client_cert'] = 'none sent'
        else:
            cert, der = facts['cert']
            shown['client_cert'] = {
                'subject': shown_distinguished_name(cert.get('subject', ())),
                'issuer': shown_distinguished_name(cert.get('issuer', ())),
                'not_before': certificate_time(cert['notBefore']),
                'not_after': certificate_time(cert['notAfter']),
                'sha256': hashlib.sha256(der).hexdigest(),
                'verified': 'against TLS_CLIENT_CA'}
    return shown


def shown_proxy_line(line):
    """A PROXY v1 line: as sent if it is one (by the rules of free text: an
    UNKNOWN line may carry any text after its word), else quoted."""
    if PROXY_V1.fullmatch(line):
        return shown(hide_fields(as_text(line)))
    return quoted(line)


# How each kind of evidence a refusal carries is shown (Refused).
EVIDENCE = {
    'bytes': quoted,                            # data, size (or None)
    'header': shown_header,                     # name, value
    'header line': shown_header_line,           # a line without its colon
    'continuation': shown_continuation_of,      # the name, the line
    'hello': shown_hello,                       # a TLS ClientHello, or None
    'proxy line': shown_proxy_line,             # a PROXY v1 line
}


def shown_refusal(refusal):
    """A refusal's reason, with its evidence shown by the rules above."""
    if refusal.kind is None:
        return refusal.reason
    return refusal.reason % EVIDENCE[refusal.kind](*refusal.evidence)


def viewed(text, size, keep):
    """The kind of some bytes (text: their start, decoded with
    surrogateescape; size bytes in all), and what the log shows of their
    first keep characters, cut: a form, JSON or text with what looks secret
    by its length, anything else in hex, unless it may hide a secret."""
    was_cut = byte_count(text[:keep]) < size
    kind = body_kind(text, '', byte_count(text) < size)
    text = text[:keep]
    if kind == 'binary':
        if binary_may_hide_a_secret(text):
            return kind, '(not shown: it may hold a secret)'
        return kind, text[:MAX_SHOWN_CHARS // 2].encode(
            'utf-8', 'surrogateescape')[:MAX_SHOWN_CHARS // 2].hex()
    if kind == 'a form':
        text = shown_query(text)
    elif kind == 'JSON':
        text = redact_json(text)
    text = hide_fields(text)
    if was_cut:
        text = hide_cut_end(hide_shapes(text))
    return kind, shown(text)


# -- Records -------------------------------------------------------------------

# A record is a message, or, for the kinds of TEXT_LINES, a message and
# fields; everything in it has been through "What the log shows".  Records
# are made lean (Record, RequestLog), built in one place a kind (log_*()),
# formatted as text or JSON lines and written once a loop round (LogWriter).

LOGGER = logging.getLogger('kek')
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
    kind = None         # its row of TEXT_LINES: 'arrival', 'body', 'refusal'

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
        handlers = self.logger.handlers
        if (not (args or exc_info or extra) and len(handlers) == 1
                and type(handlers[0]) is LogWriter and level >= handlers[0].level):
            # Only a message, as most records are, for kek's own writer
            # alone: its line, without a LogRecord, which cost as much.
            writer = handlers[0]
            writer.add(writer.formatter.message_line(
                self.extra, offset_ms, LEVEL_NAMES[level], msg))
            return
        record = Record(level, msg, args, exc_info and sys.exc_info(),
                        self.extra, offset_ms, extra)
        for handler in self.logger.handlers:
            if level >= handler.level:
                if not isinstance(handler, LogWriter):
                    record.complete()
                handler.handle(record)

    def record(self, kind, message, fields, level=logging.INFO):
        """A record of a kind TEXT_LINES knows, with its fields."""
        self.emit(level, message, (), None, {'kind': kind, 'fields': fields})

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


def log_arrival(request):
    """The first record of a request: what arrived, as fields, with what is
    never logged left out.  Each format writes them in its own grammar, so
    each value is escaped once: JSON as they are, a text line through
    arrival_text()."""
    params, count = shown_params(request.params, request.query)
    # The URL's query needs looking at only if a parameter was not shown
    # as it is: a secret-looking one, or one cut.
    url = shown_url(request.target)
    method = shown(request.method)
    fields = {'method': method, 'url': url, 'client': request.client}
    if request.via is not None:
        fields['via'] = request.via
    if request.tls is not None:
        fields['tls'] = request.tls
    if request.declared == 'chunked':
        fields['transfer_encoding'] = 'chunked'
    elif request.declared:
        fields['body_bytes'] = request.declared
    fields['params'] = params
    if count > MAX_SHOWN_PARAMS:
        fields['params_values'] = count
    headers = request.headers
    if 'x-request-id' in headers:
        fields['x_request_id'] = shown_free(headers['x-request-id'])
    if 'traceparent' in headers:
        fields['traceparent'] = shown_free(headers['traceparent'])
        trace = trace_parent(headers['traceparent'])
        if trace is not None:   # (hex ids: nothing the rules would hide)
            fields['trace_id'], fields['span_id'] = trace
    if SETTINGS.log_headers:
        fields['headers'] = shown_headers(request.header_list)
    request.log.record('arrival', '%s %s' % (method, cut(url, MAX_SHOWN_CHARS)),
                       fields)


def log_forwarding(request):
    """Why a trusted proxy's forwarding header named no client: the peer
    is then shown as the client."""
    header, wrong, hop = request.forwarding
    request.log.warning(
        '%s from the trusted proxy %s names no client (%s%s); the client shown'
        ' is the proxy', header, request.client, wrong,
        '' if hop is None else ': ' + json_text(shown_free(hop)))


def arrival_text(record):
    """The arrival on a text line: the URL as text, then kek's own fields
    (the peer, the body's size), and last what the client chose: the
    parameters, its ids and the headers, as JSON.  So the first ' client='
    on the line is always the peer."""
    fields = record.fields
    url = fields['url']
    if not (url.isascii() and url.isprintable() and '\\' not in url):
        url = escape(url)
    text = '%s %s client=%s' % (fields['method'], url, fields['client'])
    if 'via' in fields:
        text += ' via=' + fields['via']
    if 'tls' in fields:
        text += ' tls=' + json_text(fields['tls'])
    if 'transfer_encoding' in fields:
        text += ' body=chunked'
    elif 'body_bytes' in fields:
        text += ' body=%d' % fields['body_bytes']
    text += ' params=' + json_text(fields['params'])
    if 'params_values' in fields:
        text += ' (%d of %d values)' % (MAX_SHOWN_PARAMS, fields['params_values'])
    if 'x_request_id' in fields:
        text += ' x-request-id=' + json_text(fields['x_request_id'])
    if 'traceparent' in fields:
        text += ' traceparent=' + json_text(fields['traceparent'])
    if 'headers' in fields:
        text += ' headers=' + json_text(fields['headers'])
    return text


def plain_text(data):
    """True if data is UTF-8 text with no control but tab and line ends:
    what a body that was not compressed after all looks like."""
    try:
        return not HIDING_CONTROL.search(data.decode('utf-8'))
    except UnicodeDecodeError:
        return False


def log_body(request):
    """The body record, once a body has arrived whole: its size (decoded,
    for either framing), type, SHA-256, and what its first LOG_BODY bytes
    may show (body_fields()), or the summary of its parts."""
    body = request.body
    content_type = request.headers.get('content-type', '')
    coding = body_coding(request)
    fields = {'body_bytes': body.size, 'content_type': shown_free(content_type),
              'sha256': body.sha256.hexdigest()}
    decoder = body.decoder
    size, preview = body.size, body.preview
    if decoder is not None:
        decoder.finish()
        fields['content_encoding'] = coding
        if decoder.error is not None:
            fields['decode_error'] = decoder.error
        else:
            size, preview = decoder.size, decoder.preview
            fields['decoded_bytes'] = size
            if decoder.over:
                fields['decoded_over'] = MAX_BODY_BYTES
    if body.parts is not None and (decoder is None or decoder.error is None):
        fields.update(shown_parts(body.parts))
    elif body.keep and coding is not None and decoder is None:
        # bytes no rule can read
        fields['preview_binary'] = 'not shown: encoded as %s' % shown(coding)
    elif body.keep and 'decode_error' in fields and not plain_text(preview):
        # A cut or damaged stream still inflates, past every rule: in
        # base64, or as a form's name, it would show what it hides.
        fields['preview_binary'] = 'not shown: %s that does not decode' % coding
    elif body.keep:
        cut = size > len(preview)
        fields.update(body_fields(bytes(preview), media_type(content_type), cut))
        if cut:
            fields['preview_bytes'] = len(preview)
    request.log.record('body', 'body %d bytes' % body.size, fields)


def body_text(record):
    """The body record on a text line: its type, and its form, preview or
    parts, as JSON."""
    fields = record.fields
    text = 'body %d bytes' % fields['body_bytes']
    if 'decode_error' in fields:
        text += ' %s that does not decode (%s): shown as it came' % (
            fields['content_encoding'], fields['decode_error'])
    elif 'decoded_over' in fields:
        text += ' %s decoded to over %d bytes, decoded no further' % (
            fields['content_encoding'], fields['decoded_over'])
    elif 'content_encoding' in fields:
        text += ' %s decoded to %d bytes' % (fields['content_encoding'],
                                             fields['decoded_bytes'])
    text += ' type=%s sha256=%s' % (json_text(fields['content_type']),
                                    fields['sha256'])
    for name in ('form', 'preview', 'preview_base64', 'preview_binary', 'parts'):
        if name in fields:
            text += ' %s=%s' % (name, json_text(fields[name]))
    if 'form_values' in fields:
        text += ' (%d of %d values)' % (MAX_SHOWN_PARAMS, fields['form_values'])
    if 'parts_count' in fields:
        text += ' (%d of %d parts)' % (len(fields['parts']),
                                       fields['parts_count'])
    if 'parts_broken' in fields:
        text += ' broken: %s' % fields['parts_broken']
    if 'preview_bytes' in fields:
        text += ' (the first %d bytes)' % fields['preview_bytes']
    return text


def log_abandoned(request, reason, received):
    """The record of a request left in the middle: after its arrival, if
    its head had come (received: the bytes of its head so far)."""
    log = request.log.at('handler')
    if request.handshake is not None:
        log.record('handshake', 'TLS handshake not finished: ' + reason, dict(
            {'client': request.client},
            **shown_offer(client_hello(request.handshake))),
            logging.ERROR)
    elif request.body is not None:
        log_arrival(request)
        log.error('%s; %s', reason, request.reader.missing())
    else:
        log.error('%s; request head not complete (%s received)', reason,
                  in_bytes(received))


def log_refusal(request, log, reason):
    """The record of a refused request, after its arrival if its head
    parsed: why (already shown), and the peer."""
    fields = {'client': request.client}
    if request.method is not None:
        log_arrival(request)
    elif request.tls is not None:
        fields['tls'] = request.tls     # no arrival to show them
    log.record('refusal', 'refused: %s' % reason, fields, logging.ERROR)


def refusal_text(record):
    """A refusal on a text line: the peer first, its TLS if no arrival
    showed it, then why."""
    fields = record.fields
    tls = ' tls=' + json_text(fields['tls']) if 'tls' in fields else ''
    return 'client=%s%s %s' % (fields['client'], tls,
                               escape(record.getMessage()))


# The records with fields, one row a kind: how a text line writes them.  A
# JSON line writes the fields as they are, after the message; every other
# record is a message only.
def handshake_text(record):
    """A TLS handshake that failed, on a text line: the peer, why, and
    what its hello offered."""
    fields = dict(record.fields)
    return 'client=%s %s; hello %s' % (fields.pop('client'),
                                      escape(record.getMessage()),
                                      json_text(fields))


TEXT_LINES = {'arrival': arrival_text, 'body': body_text,
              'refusal': refusal_text, 'handshake': handshake_text}


class TextFormatter(logging.Formatter):
    """KEY +OFFSETms LEVEL WHERE MESSAGE, on one line: the message, with
    the traceback if any, escaped into it.  A record with fields (arrival,
    body, refusal) has a function that writes them on a text line, each
    value escaped in the grammar of its place."""

    def format(self, record):
        if record.kind and not record.exc_info:
            # Fields, each already escaped in the grammar of its place.
            return self.line(record.__dict__, record.offset_ms,
                             record.levelname, TEXT_LINES[record.kind](record))
        message = (self.with_traceback(record) if record.exc_info
                   else record.getMessage())
        return self.message_line(record.__dict__, record.offset_ms,
                                 record.levelname, message)

    def message_line(self, context, offset_ms, levelname, message):
        """The line of a record that is a message and nothing else, escaped:
        format() writes such a record through it, and RequestLog calls it
        without making a record at all.  context holds key and where."""
        if not (message.isascii() and message.isprintable()
                and '\\' not in message):
            message = escape(message)
        return self.line(context, offset_ms, levelname, message)

    def line(self, context, offset_ms, levelname, text):
        return (f'{context["key"]} +{offset_ms:.3f}ms {levelname:<5}'
                f' {context["where"]} {text}')

    def with_traceback(self, record):
        """The message and its traceback, as they are: each format escapes."""
        return record.getMessage() + '\n' + self.formatException(record.exc_info)


class JsonFormatter(TextFormatter):
    """One JSON object a line: request, time, offset_ms, level, where,
    message, instance and worker when set, and the fields of arrival, body
    and refusal records (method, url, params, client, headers, sha256, ...).
    Client text is escaped once, by JSON; the message of a record with
    fields is only a brief of them ("GET /api?x=1", "body 32 bytes").
    time is the record's own, in a key's format: what a collector takes as
    its timestamp.

    The key, level, WHERE, time and instance are kek's own ASCII, so the
    line is put together around them and only the message and the fields
    go through the encoder.
    """

    def __init__(self, instance=None, worker=None):
        super().__init__()
        self.tail = ''      # what ends every record's own part
        if instance is not None:
            self.tail += ', "instance": "%s"' % instance
        if worker is not None:
            self.tail += ', "worker": %d' % worker

    def format(self, record):
        message = (self.with_traceback(record) if record.exc_info
                   else record.getMessage())
        return self.message_line(record.__dict__, record.offset_ms,
                                 record.levelname, message, record.fields)

    def message_line(self, context, offset_ms, levelname, message, fields=None):
        request = context['request']
        line = ('{"request": %s, "time": "%s", "offset_ms": %.3f, "level": "%s",'
                ' "where": "%s", "message": %s%s' % (
                    'null' if request is None else '"%s"' % request,
                    KEYS.now(), offset_ms, levelname, context['where'],
                    json_text(message), self.tail))
        if fields:      # the fields' own object, its '{' dropped, ends it
            return line + ', ' + json_text(fields)[1:]
        return line + '}'


# The writer's states.  While the log cannot take writes its records wait,
# in order, and so does the loop (Server.wait_for_log()).
WRITING = 'writing'     # every record so far is written
WAITING = 'waiting'     # records wait: the log failed, or a pipe was full
SHUT = 'shut'           # closed: what still waits is counted, not written


def ends_its_last_line(fd, path):
    """False if the regular file at fd has a last line that was cut (a
    crash, a full disk): the next record then needs a newline first."""
    held = os.fstat(fd)
    if not stat.S_ISREG(held.st_mode) or not held.st_size:
        return True
    try:
        reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return True         # unreadable to kek: nothing to be done
    try:
        found = os.fstat(reader)
        if (found.st_dev, found.st_ino) != (held.st_dev, held.st_ino):
            return True
        return os.pread(reader, 1, found.st_size - 1) in (b'\n', b'')
    finally:
        os.close(reader)


def identity(path):
    """The device and inode of the symlink at path, or None if none is."""
    try:
        found = os.lstat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if stat.S_ISLNK(found.st_mode) else None


class LogWriter(logging.Handler):
    """Gathers formatted records; flush() writes them with one write().

    The loop calls flush() once a round, before it sends that round's answers.
    LOG_FILE is reopened when logrotate has moved it away.  No write and no
    open can block the loop: a pipe is written without blocking, and a
    FIFO at LOG_FILE is opened so.  What a write does not take waits, in
    order, in `pending` (a record cut part-way is finished first), and the
    writer is WAITING until all of it is written: the loop then reads no
    request and sends no answer, and retries.  The failure is said once on
    standard error, its end in a record.
    """

    def __init__(self, path=None):
        super().__init__()
        self.path = path
        self.lines = []
        self.size = 0               # characters in lines
        self.pending = bytearray()  # encoded records not yet written
        self.pending_records = 0
        self.cut = False            # pending begins in the middle of a record
        self.state = WRITING
        self.error = None           # why the last write or open failed
        self.failed_at = None       # when the log began to fail
        self.waited = 0             # records that waited since
        self.dropped = 0            # records dropped past MAX_PENDING_LOG_BYTES
        self.reopen_requested = False
        self.said = False           # the failure, on standard error
        self.was_blocking = None    # standard output's mode, to give back
        if path is None:
            self.fd = 1
            mode = os.fstat(1).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                self.was_blocking = os.get_blocking(1)
                os.set_blocking(1, False)
        else:
            self.fd = self.open(follow=True)

    def open(self, follow=False):
        """Open LOG_FILE without blocking (a FIFO with no reader fails at
        once), and note which file it is (its device and inode).  A symlink
        at the path is followed only if it is the one the first open found:
        one put there later may be there to send client text into another
        file."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK
        link = identity(self.path)
        if follow:
            self.link = link
        elif link is None or link != self.link:
            flags |= os.O_NOFOLLOW
        fd = os.open(self.path, flags, 0o644)
        opened = os.fstat(fd)
        self.opened = (opened.st_dev, opened.st_ino)
        if not ends_its_last_line(fd, self.path):
            self.pending[:0] = b'\n'     # pending begins a record: never cut
        return fd

    def emit(self, record):
        self.add(self.formatter.format(record))

    def add(self, line):
        """Keep a record's line for flush(), which writes them once they
        pass LOG_FLUSH_BYTES.  A list's append() needs no lock: a line another
        thread adds while flush() swaps the list lands in the old one, which
        is then written, or in the new one."""
        self.lines.append(line)
        self.size += len(line)
        if self.size > LOG_FLUSH_BYTES:
            self.flush()

    def relay(self, data):
        """Whole lines a worker wrote to its pipe (WORKERS=N, the log on
        standard output): written after what waits, as they are."""
        lines = data.count(b'\n')
        self.pending += data
        self.pending_records += lines
        if self.state is WAITING:
            self.waited += lines

    # The stock handle() without its filters and lock, which cost as much as
    # the formatting.
    handle = emit

    def flush(self):
        """Write the records gathered, after any that wait.  One thread at
        a time: another's records may pass LOG_FLUSH_BYTES meanwhile."""
        with self.lock:
            if self.state is not SHUT:  # (logging.shutdown() flushes at exit)
                self.write_gathered()

    def write_gathered(self):
        lines = self.lines
        self.lines = []
        self.size = 0
        if lines:
            data = ('\n'.join(lines) + '\n').encode('utf-8', 'backslashreplace')
            if self.state is WAITING and (
                    len(self.pending) + len(data) > MAX_PENDING_LOG_BYTES):
                self.dropped += len(lines)      # said when writing works
            else:
                self.pending += data
                self.pending_records += len(lines)
                if self.state is WAITING:
                    self.waited += len(lines)
        if self.path is not None and not self.cut and (
                self.pending or self.reopen_requested):
            try:
                self.reopen_if_moved()
            except OSError as error:
                self.fail(error)
                return
        try:
            while self.pending:
                written = os.write(self.fd, self.pending)
                self.cut = self.pending[written - 1] != 0x0A
                del self.pending[:written]
        except OSError as error:        # BlockingIOError (EAGAIN) too
            self.fail(error)
            return
        self.pending_records = 0
        if self.state is WAITING:
            self.recover()

    def waiting(self):
        """True while records wait for the log: nothing may be answered."""
        return self.state is WAITING

    def fail(self, error):
        """A write or an open failed: records wait.  Said once, at once;
        a full pipe only once it has waited LOG_SLOW_READER (note())."""
        self.error = error
        if self.state is WRITING:
            self.state = WAITING
            self.failed_at = time.monotonic()
            self.waited = self.pending_records
            self.said = False
            if not isinstance(error, BlockingIOError):
                self.say_failure()

    def say_failure(self):
        self.said = True
        report('cannot write the log to %s: %s; not reading requests until'
               ' it works again' % (self.destination(), self.error))

    def note(self, now):
        """While records wait: say a full pipe that has waited too long."""
        if (self.state is WAITING and not self.said
                and now - self.failed_at >= LOG_SLOW_READER):
            self.say_failure()

    def recover(self):
        """Every waiting record is written: say for how long it could not
        be, in a main record and on standard error, if its failure was
        said."""
        self.state = WRITING
        if not (self.said or self.dropped):
            return      # a reader behind for a moment: nothing to say
        message = 'the log could not be written for %.1f s (%s); %d records' \
            ' waited' % (time.monotonic() - self.failed_at, self.error,
                         self.waited)
        if self.dropped:
            message += ', and %d more were dropped past %s waiting' % (
                self.dropped, in_bytes(MAX_PENDING_LOG_BYTES))
            self.dropped = 0
        report('writing the log to %s works again' % self.destination())
        server_log().warning(message)
        self.flush()

    def failing_for(self, now):
        """Seconds the log has not taken writes, or 0."""
        return now - self.failed_at if self.state is WAITING else 0.0

    def unwritten(self):
        """Records that could not be written, to say at stop."""
        return self.pending_records + self.dropped

    def destination(self):
        return 'standard output' if self.path is None else self.path

    def request_reopen(self):
        """SIGHUP: reopen LOG_FILE before the next write, moved or not."""
        self.reopen_requested = True

    def reopen_if_moved(self):
        """Before every write: if LOG_FILE is no longer the file we hold
        (logrotate renamed or removed it, maybe creating a new one), open
        the path anew, so that no record lands in a rotated file.  One stat
        a loop round.  An open that fails (the folder is gone, a symlink is
        at the path) raises OSError: the log fails until it can be opened."""
        try:
            current = os.stat(self.path)
            current = (current.st_dev, current.st_ino)
        except OSError:
            current = None
        if not self.reopen_requested and current == self.opened:
            return
        fd = self.open()
        self.reopen_requested = False
        os.close(self.fd)
        self.fd = fd

    def close(self):
        self.flush()
        self.state = SHUT
        self.pending = bytearray()
        if self.path is not None:
            os.close(self.fd)
        elif self.was_blocking is not None:
            os.set_blocking(1, self.was_blocking)
        super().close()


def log_writers():
    return [handler for handler in LOGGER.handlers
            if isinstance(handler, LogWriter)]


def flush_log():
    for handler in LOGGER.handlers:
        handler.flush()


def log_waiting():
    """True while any log has records waiting: nothing may be answered."""
    return any(writer.waiting() for writer in log_writers())


def report(message):
    """One line on standard error, even if standard error is gone."""
    try:
        os.write(2, ('kek: %s\n' % message).encode('utf-8', 'backslashreplace'))
    except OSError:
        pass


# -- Signatures ----------------------------------------------------------------

# The headers webhook senders sign with (SPEC 3, "Signatures"), and the
# scheme of each; then how long after its timestamp the sender's own library
# still takes a request (seconds).
SIGNATURE_SCHEMES = {           # of two headers of a scheme, the first is read
    'x-hub-signature-256': 'github', 'x-hub-signature': 'github',
    'x-gitlab-token': 'gitlab', 'stripe-signature': 'stripe',
    'x-slack-signature': 'slack', 'x-shopify-hmac-sha256': 'shopify',
    'webhook-signature': 'standard', 'svix-signature': 'standard',
    'paddle-signature': 'paddle'}
SIGNATURE_NAMES = frozenset(SIGNATURE_SCHEMES)
TOLERANCES = {'stripe': 300, 'slack': 300, 'standard': 300, 'paddle': 5}
MAX_TIMESTAMP_DIGITS = 12
BASE64_MAC = re.compile('[A-Za-z0-9+/]{43}=')     # of a SHA-256


class Malformed(Exception):
    """A signature header that cannot be read: the reason."""


def signatures_of(request):
    """The Signature of each known signature header of the request (none if
    WEBHOOK_SECRET is unset): the body, as it streams in, is fed to them."""
    if SETTINGS.webhook_secret is None:
        return None
    headers = request.headers
    names = SIGNATURE_NAMES.intersection(headers)
    if len(names) > 1:
        first = {}          # the first header of each scheme
        for name in SIGNATURE_SCHEMES:
            if name in names:
                first.setdefault(SIGNATURE_SCHEMES[name], name)
        names = first.values()
    found = []
    for name in names:
        found.append(Signature(SIGNATURE_SCHEMES[name], name, headers))
    if SETTINGS.webhook_signature_header in headers:
        found.append(Signature('custom', SETTINGS.webhook_signature_header,
                               headers))
    return found


# HMAC's inner and outer pads (RFC 2104), as tables for bytes.translate().
INNER_PAD = bytes(byte ^ 0x36 for byte in range(256))
OUTER_PAD = bytes(byte ^ 0x5C for byte in range(256))


@functools.lru_cache(maxsize=64)
def keyed_hashes(secret, scheme, digest):
    """For each form of the secret the scheme may mean, the inner and outer
    hashes of an HMAC (RFC 2104) keyed with it, begun: a request copies
    them.  hashlib's copies cost a tenth of the hmac module's, which wraps
    the same hashes in Python calls."""
    pairs = []
    block = hashlib.new(digest).block_size
    for key in secret_forms(secret, scheme):
        if key is None:
            continue
        if len(key) > block:
            key = hashlib.new(digest, key).digest()
        key = key.ljust(block, b'\0')
        pairs.append((hashlib.new(digest, key.translate(INNER_PAD)),
                      hashlib.new(digest, key.translate(OUTER_PAD))))
    return pairs


def secret_forms(secret, scheme):
    """The secret as the scheme uses it, and in its other form (or None):
    Standard Webhooks and Svix base64-decode what follows 'whsec_'; the
    others take the secret as it is, though a 'whsec_' secret may be meant
    decoded."""
    decoded = None
    encoded = secret[6:] if secret.startswith(b'whsec_') else secret
    try:
        decoded = base64.b64decode(encoded, validate=True) or None
    except ValueError:
        pass
    if scheme == 'standard' and decoded is not None:
        return decoded, secret
    if secret.startswith(b'whsec_'):
        return secret, decoded
    return secret, None


class Signature:
    """A sender's signature of one request, checked against WEBHOOK_SECRET
    as the body streams in.  The MAC of what is signed (the scheme's prefix,
    then the body) is computed with each form of the secret, a newline the
    body may end in held back: so a mismatch can say whether the body
    without its last newline, or the secret in its other form, would match,
    and never what the MAC is.  Comparisons take constant time."""

    problem = None          # why it cannot be read
    timestamp = None        # the time it says it was signed, if it says
    held = b''              # a CR, LF or CRLF the body may end in

    def __init__(self, scheme, header, headers):
        self.scheme = scheme
        self.given = []             # the MACs sent
        self.macs = []              # (inner, outer) for each form of the secret
        try:
            prefix, digest = self.READERS[scheme](self, headers[header],
                                                  headers)
        except Malformed as malformed:
            self.problem = str(malformed)
            return
        if digest is not None:
            for inner, outer in keyed_hashes(SETTINGS.webhook_secret, scheme,
                                             digest):
                inner = inner.copy()
                if prefix:
                    inner.update(prefix)
                self.macs.append((inner, outer))

    # How each scheme is read: the prefix of what is signed, and the digest.

    def read_github(self, value, headers):
        digest, equals, mac = value.partition('=')      # X-Hub-Signature-256
        if digest not in ('sha256', 'sha1'):            # or the older SHA-1
            raise Malformed('not sha256=SIGNATURE')
        self.given = [self.hex(mac, 64 if digest == 'sha256' else 40)]
        return b'', digest

    def read_gitlab(self, value, headers):
        self.given = [value.encode('utf-8', 'surrogateescape')]
        return None, None           # a token, compared to the secret

    def read_stripe(self, value, headers):
        return self.read_fields(value, ',', 't', 'v1') + b'.', 'sha256'

    def read_slack(self, value, headers):
        version, equals, mac = value.partition('=')
        if version != 'v0':
            raise Malformed('not v0=SIGNATURE')
        self.given = [self.hex(mac, 64)]
        if 'x-slack-request-timestamp' not in headers:
            raise Malformed('no X-Slack-Request-Timestamp')
        timestamp = self.read_timestamp(headers['x-slack-request-timestamp'])
        return b'v0:' + timestamp + b':', 'sha256'

    def read_shopify(self, value, headers):
        self.given = [self.base64(value)]
        return b'', 'sha256'

    def read_standard(self, value, headers):
        kind = 'webhook' if 'webhook-signature' in headers else 'svix'
        if kind + '-id' not in headers or kind + '-timestamp' not in headers:
            raise Malformed('no %s-id or %s-timestamp' % (kind, kind))
        for part in value.split(' '):
            version, comma, mac = part.partition(',')
            if version == 'v1':
                self.given.append(self.base64(mac))
        if not self.given:
            raise Malformed('no v1,SIGNATURE')
        message_id = headers[kind + '-id'].encode('utf-8', 'surrogateescape')
        timestamp = self.read_timestamp(headers[kind + '-timestamp'])
        return message_id + b'.' + timestamp + b'.', 'sha256'

    def read_paddle(self, value, headers):
        return self.read_fields(value, ';', 'ts', 'h1') + b':', 'sha256'

    def read_custom(self, value, headers):
        if value.startswith('sha256='):
            value = value[len('sha256='):]
        # 64 hex digits, or the 44 characters of base64.
        if len(value) != 64 and not BASE64_MAC.fullmatch(value):
            raise Malformed('a signature that is neither 64 hex digits nor'
                            ' the base64 of an HMAC-SHA256')
        self.given = [self.hex(value, 64) if len(value) == 64
                      else self.base64(value)]
        return b'', 'sha256'

    def read_fields(self, value, separator, time_name, mac_name):
        """Stripe's t=TS,v1=MAC and Paddle's ts=TS;h1=MAC, with one or more
        MACs (a secret being rolled signs twice): the timestamp, as signed."""
        fields = [field.strip(' \t').partition('=')
                  for field in value.split(separator)]
        timestamps = [v for k, _, v in fields if k == time_name]
        self.given = [self.hex(v, 64) for k, _, v in fields if k == mac_name]
        if len(timestamps) != 1 or not self.given:
            raise Malformed('not %s=TIMESTAMP%s%s=SIGNATURE'
                            % (time_name, separator, mac_name))
        return self.read_timestamp(timestamps[0])

    # Each scheme's reader, by name.
    READERS = {'github': read_github, 'gitlab': read_gitlab,
               'stripe': read_stripe, 'slack': read_slack,
               'shopify': read_shopify, 'standard': read_standard,
               'paddle': read_paddle, 'custom': read_custom}

    def read_timestamp(self, text):
        if not DIGITS.fullmatch(text) or len(text) > MAX_TIMESTAMP_DIGITS:
            raise Malformed('its timestamp is not a number of seconds')
        self.timestamp = int(text)
        return text.encode()

    def hex(self, text, digits):
        """The bytes of exactly `digits` hex digits."""
        if len(text) == digits:
            try:
                return binascii.a2b_hex(text)
            except ValueError:      # binascii.Error, or not ASCII
                pass
        raise Malformed('a signature that is not %d hex digits' % digits)

    def base64(self, text):
        if not BASE64_MAC.fullmatch(text):
            raise Malformed('a signature that is not the base64 of an'
                            ' HMAC-SHA256')
        return base64.b64decode(text)

    # Fed the body, then asked.

    def add(self, data):
        if self.held:
            data = self.held + data
        if data.endswith((b'\n', b'\r')):
            # The body may end here: its newline held back for the hints.
            cut = 2 if data.endswith(b'\r\n') else 1
            self.held = bytes(data[-cut:])
            data = memoryview(data)[:-cut]
        else:
            self.held = b''
        for inner, outer in self.macs:
            inner.update(data)

    def matches(self, mac, cut=0):
        """True if the MAC of what was signed, its last cut bytes left out,
        is one of those sent.  It uses mac up."""
        inner, outer = mac
        if self.held:
            inner.update(self.held[:len(self.held) - cut])
        outer = outer.copy()
        outer.update(inner.digest())
        digest = outer.digest()
        for given in self.given:
            if hmac.compare_digest(digest, given):
                return True
        return False

    def verdict(self):
        """What the log says of it: 'ok: github', 'mismatch: stripe; ...',
        'malformed: slack; ...'."""
        if self.problem:
            return 'malformed: %s; %s' % (self.scheme, self.problem)
        if self.scheme == 'gitlab':
            ok = hmac.compare_digest(self.given[0], SETTINGS.webhook_secret)
            return '%s: gitlab' % ('ok' if ok else 'mismatch')
        age = self.age() if self.timestamp is not None else ''
        # A copy for the hints, only when the body ends as they say.
        inner, outer = mac = self.macs[0]
        newline = inner.copy() if self.held.endswith(b'\n') else None
        if self.matches(mac):
            return 'ok: ' + self.scheme + ('; but ' + age if age else '')
        hints = [age] if age else []
        if newline is not None:
            if self.matches((newline.copy(), outer), 1):
                hints.append('it would match the body without its last'
                             ' newline')
            if self.held.endswith(b'\r\n') and self.matches((newline, outer), 2):
                hints.append('it would match the body without its last CRLF')
        if len(self.macs) > 1 and self.matches(self.macs[1]):
            hints.append('it would match with the secret %s' % (
                'as it is, not base64-decoded' if self.scheme == 'standard'
                else 'base64-decoded after whsec_'))
        return 'mismatch: %s%s' % (self.scheme, ''.join('; ' + hint
                                                      for hint in hints))

    def age(self):
        """Its timestamp's age, if the sender would refuse it for that."""
        age = int(time.time()) - self.timestamp
        tolerance = TOLERANCES[self.scheme]
        if abs(age) <= tolerance:
            return ''
        return 'its timestamp is %d s %s (%s allows %d s)' % (
            abs(age), 'old' if age > 0 else 'in the future', self.scheme,
            tolerance)


def log_signatures(request):
    """One record for each signature of the request, and 'signature absent'
    for a body that has none, when WEBHOOK_SECRET is set.  The answer does
    not change: kek is no oracle for forging signatures."""
    body = request.body
    signatures = signatures_of(request) if body is None else body.signatures
    if not signatures:
        if body is not None:
            request.log.warning('signature absent')
        return
    for signature in signatures:
        verdict = signature.verdict()
        if verdict.startswith('ok'):
            request.log.info('signature ' + verdict)
        else:
            request.log.warning('signature ' + verdict)


# -- CORS ----------------------------------------------------------------------

# CORS (SPEC 4): what a browser needs to let a page on another origin reach
# kek, and read its answer's X-Request-Id.
ORIGIN = re.compile(r'[A-Za-z][A-Za-z0-9+.-]{0,31}://'
                    r'(?:[A-Za-z0-9._~-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])'
                    r'(?::[0-9]{1,5})?')
TOKEN_LIST = re.compile(r'[%s]{1,%d}(?:[ \t]*,[ \t]*[%s]{1,%d}){0,%d}'
                        % (TCHAR, MAX_NAME_CHARS, TCHAR, MAX_NAME_CHARS,
                           MAX_HEADERS))
PREFLIGHT_MAX_AGE = 600         # seconds a browser may keep a preflight's answer


def cors_headers(request):
    """The Access-Control-* headers of the answer to request (SPEC 4): none
    unless CORS is on and it has an Origin that is a serialized origin;
    nothing a client sent is copied into them unchecked."""
    origin = request.headers.get('origin')
    if not SETTINGS.cors or origin is None or not ORIGIN.fullmatch(origin):
        return ''
    lines = ('Access-Control-Allow-Origin: %s\r\n'
             'Access-Control-Allow-Credentials: true\r\n'
             'Access-Control-Expose-Headers: X-Request-Id\r\n'
             'Vary: Origin\r\n' % origin)
    method = request.headers.get('access-control-request-method')
    if request.method != 'OPTIONS' or method is None:
        return lines
    if TOKEN.fullmatch(method) and len(method) <= MAX_METHOD_CHARS:
        lines += 'Access-Control-Allow-Methods: %s\r\n' % method
    headers = request.headers.get('access-control-request-headers')
    if headers is not None and TOKEN_LIST.fullmatch(headers):
        lines += 'Access-Control-Allow-Headers: %s\r\n' % headers
    lines += 'Access-Control-Max-Age: %d\r\n' % PREFLIGHT_MAX_AGE
    if request.headers.get(
            'access-control-request-private-network', '').lower() == 'true':
        lines += 'Access-Control-Allow-Private-Network: true\r\n'
    return lines


def log_preflight(request):
    """A browser's preflight, named as such, whether CORS is on or off."""
    headers = request.headers
    if (request.method != 'OPTIONS' or 'origin' not in headers
            or 'access-control-request-method' not in headers):
        return
    asked = headers.get('access-control-request-headers')
    if asked and TOKEN_LIST.fullmatch(asked):
        asked = ', '.join(name.strip(' \t') for name in asked.split(','))
    # Header values all, shown as the arrival shows them (by their length
    # only, with LOG_HEADERS off).
    request.log.info('preflight for %s from %s%s' % (
        shown_header('Access-Control-Request-Method',
                     headers['access-control-request-method']),
        shown_header('Origin', headers['origin']),
        ', headers ' + shown_header('Access-Control-Request-Headers', asked)
        if asked else ''))


# -- TLS -----------------------------------------------------------------------

# HTTPS on kek's own port (SPEC 5, TLS).  With TLS_CERT set, a connection
# whose first byte is 0x16, a TLS handshake record, shakes hands in memory:
# an ssl.SSLObject over two ssl.MemoryBIOs, as asyncio's sslproto.py does,
# so kek keeps its own reads, byte caps and deadlines, and reads the hello's
# own bytes for its JA4.  Any other first byte is plain HTTP.
MAX_HANDSHAKE_BYTES = 64 * 1024     # what a client may send before its handshake
                                    # is done: a hello (a browser's, post-quantum
                                    # key share and all, is under 2 KiB) and a
                                    # client certificate chain (Go's maxHandshake)
HELLO_RECORD_BYTES = 5 + 16 * 1024  # a TLS record at its largest: what is
                                    # kept of the hello, for its facts
MAX_HANDSHAKES = 256        # in progress at once: each holds about 45 KiB in
                            # OpenSSL, so at most about 12 MiB
MAX_HANDSHAKE_STEPS = 32    # hellos answered a round: an answer costs 0.2
                            # ms of CPU with a P-256 key (0.5 ms RSA-2048), so
                            # a round spends ~6-16 ms at most on them
TLS_SEND_BYTES = 64 * 1024  # of answers, encrypted at a time
TLS_READ_BYTES = 64 * 1024  # of plaintext, read from OpenSSL at a time
MAX_PEM_BYTES = 1024 * 1024  # a certificate file read at start: a chain is KiBs
# What OpenSSL's reason for a failed handshake means to a client's author.
HANDSHAKE_FAILURES = {
    'TLSV1_ALERT_UNKNOWN_CA': "the client does not trust kek's certificate"
                              ' (it answered: unknown CA)',
    'SSLV3_ALERT_CERTIFICATE_UNKNOWN': "the client does not trust kek's"
                                       ' certificate (it answered: certificate'
                                       ' unknown)',
    'SSLV3_ALERT_BAD_CERTIFICATE': "the client does not accept kek's"
                                   ' certificate (it answered: bad certificate)',
    'TLSV1_ALERT_DECRYPT_ERROR': 'the client could not check the handshake'
                                 ' (it answered: decrypt error)',
    'UNSUPPORTED_PROTOCOL': 'no common protocol version',
    'TLSV1_ALERT_PROTOCOL_VERSION': 'no common protocol version',
    'NO_SHARED_CIPHER': 'no cipher in common',
    'NO_SHARED_SIGNATURE_ALGORITHMS': 'no signature algorithm in common',
    'NO_SUITABLE_KEY_SHARE': 'no key exchange group in common',
    'WRONG_VERSION_NUMBER': 'not TLS after all',
    'PACKET_LENGTH_TOO_LONG': 'not TLS after all: a record longer than TLS'
                              ' allows',
    'RECORD_LAYER_FAILURE': 'not TLS after all',
    'UNEXPECTED_MESSAGE': 'the client broke the handshake (an unexpected'
                          ' message)',
    'DECRYPTION_FAILED_OR_BAD_RECORD_MAC': 'a record that does not decrypt'
                                           ' with the keys agreed',
    'CERTIFICATE_VERIFY_FAILED': 'the client certificate does not verify'
                                 ' against TLS_CLIENT_CA',
}


class KeyWithPassword(Exception):
    """A key file that asks for a password: kek reads none."""


def no_password():
    raise KeyWithPassword


def pem_file(name, path, marker, what):
    """Check that the file setting `name` names holds marker; ValueError
    says what is wrong.  Opened without blocking: a FIFO there cannot hang
    the start."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError('%s=%r is not a file' % (name, path))
            data = os.read(fd, MAX_PEM_BYTES)
        finally:
            os.close(fd)
    except OSError as error:
        raise ValueError('%s=%r cannot be read: %s'
                         % (name, path, error.strerror)) from None
    if marker not in data:
        raise ValueError('%s=%r holds no PEM %s' % (name, path, what))


def tls_context(settings):
    """The ssl.SSLContext of TLS_CERT, TLS_KEY and TLS_CLIENT_CA, or None
    without TLS_CERT; ValueError names the setting and file that is wrong."""
    cert = settings.tls_cert
    if cert is None:
        for name in ('TLS_KEY', 'TLS_CLIENT_CA'):
            if getattr(settings, name.lower()) is not None:
                raise ValueError('%s=%r needs TLS_CERT, the certificate kek'
                                 ' serves HTTPS with' % (
                                     name, getattr(settings, name.lower())))
        return None
    key, key_name = settings.tls_key or cert, 'TLS_KEY' if settings.tls_key \
        else 'TLS_CERT'
    pem_file('TLS_CERT', cert, b'-----BEGIN CERTIFICATE-----', 'certificate')
    pem_file(key_name, key, b'PRIVATE KEY-----', 'private key')
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.3 tickets come after the handshake, and reset clients that
    # close at once (openssl #6342); kek resumes no session anyway.
    context.num_tickets = 0
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(['http/1.1'])
    try:
        context.load_cert_chain(cert, key, password=no_password)
    except KeyWithPassword:
        raise ValueError('%s=%r holds a key with a password: kek reads keys'
                         ' without one (openssl pkey -in KEY -out KEY.plain)'
                         % (key_name, key)) from None
    except ssl.SSLError as error:
        if error.reason == 'KEY_VALUES_MISMATCH':
            raise ValueError('%s=%r holds a key that does not match the'
                             ' certificate of TLS_CERT=%r' % (key_name, key,
                                                              cert)) from None
        raise ValueError('TLS_CERT=%r or %s=%r cannot be read as PEM: %s'
                         % (cert, key_name, key, error)) from None
    if settings.tls_client_ca is not None:
        authorities = settings.tls_client_ca
        pem_file('TLS_CLIENT_CA', authorities, b'-----BEGIN CERTIFICATE-----',
                 'certificate')
        try:
            context.load_verify_locations(authorities)
        except ssl.SSLError as error:
            raise ValueError('TLS_CLIENT_CA=%r cannot be read as PEM'
                             ' certificates: %s' % (authorities, error)) from None
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


def handshake_failure(error, hello):
    """Why a handshake failed, in words (SPEC 3, over TLS), and OpenSSL's
    own reason."""
    reason = getattr(error, 'reason', None) or type(error).__name__
    words = HANDSHAKE_FAILURES.get(reason, 'OpenSSL refused what the client'
                                           ' sent')
    if words == 'no common protocol version' and hello is not None:
        offered = ([value for value in hello.versions if not grease(value)]
                   or [hello.version])
        words += ': the client offers %s, kek speaks TLS 1.2 and 1.3' % (
            ', '.join(TLS_VERSION_NAMES.get(value, '0x%04x' % value)
                      for value in offered))
    elif reason == 'CERTIFICATE_VERIFY_FAILED':
        words += ': %s (the standard library cannot take a certificate it' \
                 ' cannot verify, so the handshake ends)' % error.verify_message
    return '%s (%s)' % (words, reason)


# A TLS connection's own states.
SHAKING = 'shaking'     # the handshake is under way
OPEN = 'open'           # done: requests' bytes flow both ways
SAID_GOODBYE = 'said goodbye'   # kek's close_notify is written


class TLS:
    """One connection's TLS, in memory.  Ciphertext the client sent is fed
    in; shake() takes the handshake a step on, decrypt() gives what it
    carries; what TLS has for the client waits until flush() sends it.
    The hello's first HELLO_RECORD_BYTES are kept, for its facts."""

    def __init__(self, context):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.object = context.wrap_bio(self.incoming, self.outgoing,
                                       server_side=True)
        self.state = SHAKING
        self.started = time.monotonic()
        self.hello = bytearray()    # the first bytes, while shaking hands
        self.received = 0           # bytes of the handshake so far
        self.unsent = b''           # ciphertext the socket has not taken
        self.unsent_plain = 0       # bytes of answers it holds
        self.peer_closed = False    # the client's close_notify came
        self.shown = None           # its facts, as the log shows them
        self.answered_at = None     # when kek sent its first flight

    def feed(self, data):
        """Take the handshake's bytes as they come, keeping the hello's."""
        self.received += len(data)
        if len(self.hello) < HELLO_RECORD_BYTES:
            self.hello += data[:HELLO_RECORD_BYTES - len(self.hello)]
        self.incoming.write(data)

    def shake(self):
        """A step of the handshake: True once it is done.  Raises
        ssl.SSLError, or ValueError for a hello over MAX_HANDSHAKE_BYTES."""
        try:
            self.object.do_handshake()
        except ssl.SSLWantReadError:
            if self.answered_at is None and self.outgoing.pending:
                self.answered_at = time.monotonic()
            if self.received > MAX_HANDSHAKE_BYTES:
                raise ValueError('the client sent over %s without finishing'
                                 ' its handshake' % in_bytes(MAX_HANDSHAKE_BYTES))
            return False
        self.state = OPEN
        return True

    def hello_whole(self):
        """True once the hello's first record has come whole, or its header
        is no TLS record's (OpenSSL says so at its first step): only then is
        a step worth taking."""
        hello = self.hello
        if len(hello) < 5:
            return False
        size = hello[3] << 8 | hello[4]
        return (hello[1] != 3 or size > HELLO_RECORD_BYTES - 5
                or len(hello) >= 5 + size)

    def standing(self):
        """How far the handshake got, least first, for the one that makes
        room at MAX_HANDSHAKES: a hello not whole yet, the oldest; then one
        kek answered longest ago (a client answers in a round trip); last a
        whole hello waiting for its first step (a client that just came)."""
        if self.answered_at is not None:
            return (1, self.answered_at)
        return (2 if self.hello_whole() else 0, self.started)

    def facts(self):
        """What the handshake told, raw: its version, cipher and ALPN, the
        hello, the client's certificate.  The hello's bytes are let go."""
        sslobj = self.object
        facts = {'version': sslobj.version(), 'cipher': sslobj.cipher()[0],
                 'alpn': sslobj.selected_alpn_protocol(),
                 'hello': client_hello(self.hello)}
        self.hello = None
        if sslobj.context.verify_mode is ssl.CERT_OPTIONAL:
            der = sslobj.getpeercert(binary_form=True)
            facts['cert'] = der and (sslobj.getpeercert(), der)
        return facts

    def decrypt(self, data):
        """The plaintext data completes, and all that came before: OpenSSL
        keeps none back (select() would not see it)."""
        if data:
            self.incoming.write(data)
        pieces = []
        try:
            while True:
                piece = self.object.read(TLS_READ_BYTES)
                if not piece:           # the client's close_notify
                    self.peer_closed = True
                    break
                pieces.append(piece)
                # Nothing more to read: no second read (its SSLWantReadError
                # was a tenth of a request over TLS).
                if not (self.incoming.pending or self.object.pending()):
                    break
        except ssl.SSLWantReadError:
            pass
        return b''.join(pieces)

    def flush(self, sock):
        """Send what TLS has for the client: True once all of it is out.
        Raises what sock.send() raises but BlockingIOError.  (A handshake's
        flight, a few KiB, always fits a new connection's socket buffer.)"""
        if self.outgoing.pending:
            self.unsent += self.outgoing.read()
        if self.unsent:
            try:
                self.unsent = self.unsent[sock.send(self.unsent):]
            except BlockingIOError:
                pass
        return not self.unsent

    def send(self, sock, data):
        """Send data's first bytes, encrypted: how many of them are out, 0
        until all of their ciphertext is (the caller offers the same bytes
        again, as it would to sock.send())."""
        if not self.unsent:
            piece = data[:TLS_SEND_BYTES]
            self.object.write(piece)
            self.unsent_plain = len(piece)
        if not self.flush(sock):
            return 0
        sent, self.unsent_plain = self.unsent_plain, 0
        return sent

    def goodbye(self, sock):
        """Write close_notify, as far as the socket takes it at once; the
        client's own is not waited for."""
        if self.state is not OPEN:
            return
        self.state = SAID_GOODBYE
        try:
            self.object.unwrap()
        except ssl.SSLError:
            pass        # SSLWantReadError: the client's close_notify
        try:
            self.flush(sock)
        except OSError:
            pass


# -- The connection ------------------------------------------------------------

def body_of(request):
    """The Body that is fed the request's body: LOG_BODY bytes of it, the
    parts if it is multipart/form-data, the signatures it carries, and a
    Decoder if it is sent gzip or deflate.  A body in any other coding has
    no parts: none could be read from its bytes."""
    coding = body_coding(request)
    decoder = parts = None
    if coding in DECODED_CODINGS:
        decoder = Decoder(coding, SETTINGS.log_body)
    if coding is None or decoder is not None:
        parts = multipart_reader(request)
    return Body(SETTINGS.log_body, parts, signatures_of(request), decoder)


# A connection's states.  A connection moves only as MOVES allows (h11's
# _state.py keeps its table the same way), so a mistake in the order of
# things raises instead of leaving a connection half done.
PREFACE = 'preface'     # from a trusted proxy: a PROXY header may come first
GREETING = 'greeting'   # TLS_CERT is set: the first byte tells HTTPS from HTTP
HANDSHAKE = 'handshake'  # a TLS hello came: shaking hands
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
# What moves a connection from one state to the next: the table is keyed by
# these, as h11's is by event, so each move names its cause.
PREFACE_READ = 'preface read'       # a PROXY header, or none, was read
PLAIN = 'plain'                     # the first byte is not a TLS record's
HELLO = 'hello'                     # the first byte begins a TLS record
SHAKEN = 'shaken'                   # the TLS handshake is done
FIRST_BYTE = 'first byte'           # a request begins
BODY_FOLLOWS = 'body follows'       # its head is read, and it has a body
ANSWERED = 'answered'               # the answer is written; more may come
LAST_ANSWERED = 'last answered'     # the answer is written, and is the last
STILL_SENDING = 'still sending'     # bytes arrive after the last answer
INPUT_ENDED = 'input ended'         # the client half-closed, answers wait
HALF_CLOSED = 'half-closed'         # the last answer is out, our side shut
CLOSE = 'close'
MOVES = {
    PREFACE: {PREFACE_READ: GREETING, FIRST_BYTE: HEAD, CLOSE: CLOSED},
    GREETING: {PLAIN: IDLE, HELLO: HANDSHAKE, FIRST_BYTE: HEAD, CLOSE: CLOSED},
    HANDSHAKE: {SHAKEN: IDLE, FIRST_BYTE: HEAD, CLOSE: CLOSED},
    IDLE: {FIRST_BYTE: HEAD, INPUT_ENDED: FINISHING, CLOSE: CLOSED},
    HEAD: {BODY_FOLLOWS: BODY, ANSWERED: IDLE, LAST_ANSWERED: CLOSING,
           CLOSE: CLOSED},
    BODY: {ANSWERED: IDLE, LAST_ANSWERED: CLOSING, CLOSE: CLOSED},
    CLOSING: {STILL_SENDING: DRAINING, INPUT_ENDED: FINISHING, CLOSE: CLOSED},
    DRAINING: {INPUT_ENDED: FINISHING, HALF_CLOSED: LINGER, CLOSE: CLOSED},
    FINISHING: {CLOSE: CLOSED},
    LINGER: {CLOSE: CLOSED},
    CLOSED: {},
}
SERVING = (PREFACE, GREETING, IDLE, HEAD, BODY)   # states that read requests
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
        self.client = peer_text(host, port)
        self.via = None           # the peer, once a PROXY header named the client
        # A trusted peer's requests name their clients (forward()).
        self.forwards = bool(SETTINGS.trusted_proxies) and trusted(
            host, SETTINGS.trusted_proxies)
        self.state = (PREFACE if self.forwards
                      else GREETING if SETTINGS.tls else IDLE)
        self.tls = None           # a TLS, once its hello came
        self.request = None       # the request under way
        self.log = None           # the latest request's: news go there
        self.inbuf = bytearray()
        self.wfile = OutputBuffer()
        self.dropped = 0          # bytes that arrived after the last request
        self.dropped_start = b''  # the start of the first of them, to show
        self.active_at = time.monotonic()   # the last progress either way
        self.linger_until = 0.0
        self.events = selectors.EVENT_READ  # what the loop watches it for

    @property
    def command(self):
        """The stock handle_one_request() dispatches on the method."""
        return self.request.method

    def __getattr__(self, name):
        """Every other method (POST, HEAD, FOO ...) is served by do_GET."""
        if name.startswith('do_'):
            return self.do_GET
        raise AttributeError(name)

    def move(self, event):
        """The one place the state changes: to where MOVES says event leads
        from it, or RuntimeError."""
        moves = MOVES[self.state]
        if event not in moves:
            raise RuntimeError('a connection cannot take %s when %s'
                               % (event, self.state))
        self.state = moves[event]

    # What the loop calls.

    def receive(self):
        """Take what the client sent and serve(): True if more is left."""
        try:       # what is not served yet is at most a head in the making
            data = self.connection.recv(max(1, RECV_BYTES - len(self.inbuf)))
        except BlockingIOError:
            return False
        except OSError:
            data = b''          # reset by the client: it is gone
        if not data:
            self.end_of_input()
            return False
        if self.tls is not None:
            return self.take_tls(data)
        return self.take(data)

    def take(self, data):
        """Bytes the client sent (decrypted, over TLS): served, or dropped
        after the last answer.  True if requests are left to serve."""
        if self.state in DROPPING:
            if self.state is CLOSING:
                self.move(STILL_SENDING)    # linger after the answer
            self.drop(data)     # not progress: only sending the answer is
            return False
        # Between requests only a request's first byte is progress
        # (begin_request() counts it), not blank lines: else two bytes every
        # few seconds would hold a connection open for ever.
        if self.state is HEAD or self.state is BODY:
            self.active_at = time.monotonic()
        self.inbuf += data
        return self.serve()

    def serve(self):
        """Serve the requests that are complete in inbuf, in order, while
        there is room for their answers, but no more than MAX_REQUESTS_A_TURN
        a round: True if more may wait for the next round."""
        if self.state is HANDSHAKE:     # a step put off (take_tls())
            return self.take_tls(b'')
        try:
            for _ in range(MAX_REQUESTS_A_TURN):
                if not (self.inbuf and len(self.wfile) < MAX_PENDING_OUTPUT
                        and self.state in SERVING):
                    return False
                if self.state is PREFACE and not self.take_preface():
                    return False
                if self.state is GREETING:
                    if self.inbuf[0] == 0x16 and SETTINGS.tls is not None:
                        return self.greet()
                    self.move(PLAIN)
                if self.state is IDLE:
                    if not starts_request(self.inbuf):
                        return False
                    self.begin_request()
                if not (self.read_body() if self.state is BODY
                        else self.take_head()):
                    return False
        except Refused as refusal:
            self.refuse(shown_refusal(refusal))
            return False
        return True

    def send_output(self):
        """Send what the socket takes; once the last answer is out, close or
        half-close.  True if requests that waited for room can be served."""
        was_full = len(self.wfile) >= MAX_PENDING_OUTPUT
        if self.wfile:
            try:
                sent = (self.connection.send(self.wfile) if self.tls is None
                        else self.tls.send(self.connection, self.wfile))
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
        """Room to send while output waits; bytes, unless answers pile up."""
        events = selectors.EVENT_WRITE if self.wfile else 0
        if self.state is not FINISHING and len(self.wfile) < MAX_PENDING_OUTPUT:
            events |= selectors.EVENT_READ
        return events

    def deadline(self):
        """When the connection must have moved on, or expire(): its linger's
        end; else IDLE_TIMEOUT after the last progress, or sooner when its
        request is due (Request.due())."""
        if self.state is LINGER:
            return self.linger_until
        if self.state is HANDSHAKE:
            return self.tls.started + HEAD_TIMEOUT
        idle_until = self.active_at + IDLE_TIMEOUT
        if self.request is not None:
            return min(idle_until, self.request.due())
        return idle_until

    def expire(self):
        """The connection missed its deadline: say why, if a request or an
        answer was under way, and close."""
        if self.wfile:
            self.log.at('handler').error('client did not read its answer for'
                                         ' %g s; connection closed', IDLE_TIMEOUT)
            self.close()
            return
        if self.state is HANDSHAKE:
            self.begin_what_arrived()
            self.abandon('not complete within %g s' % HEAD_TIMEOUT)
            return
        self.begin_what_arrived()
        if self.request is not None:
            self.refuse(self.request.overdue(self.active_at, len(self.inbuf)))
        else:
            self.close()

    def progressing(self, now):
        """True while its request's body arrives above MIN_BODY_RATE."""
        return self.state is BODY and self.request.body.size >= (
            MIN_BODY_RATE * (now - self.request.body_started))

    def idle(self):
        """True when closing the connection loses nothing at all."""
        return self.state in (PREFACE, GREETING, IDLE, LINGER) and not (
            self.wfile or self.inbuf)

    def abandon(self, reason):
        """Close in the middle of a request that cannot be answered."""
        log_abandoned(self.request, reason, len(self.inbuf))
        self.close()

    def shed(self, why):
        """Close at once, to make room for a new client."""
        reason = 'connection closed to make room for a new client: ' + why
        self.begin_what_arrived()
        if self.request is not None:
            log_abandoned(self.request, reason, len(self.inbuf))
        elif self.log is not None:
            self.log.at('handler').error(reason)
        self.close()

    def close(self):
        if self.state is CLOSED:
            return
        if self.dropped:
            self.log.at('handler').error(
                '%d bytes after the last request dropped unread: %s',
                self.dropped, quoted(self.dropped_start, self.dropped))
        self.move(CLOSE)
        self.server.forget(self)
        if self.tls is not None:
            self.tls.goodbye(self.connection)
        self.connection.close()

    # A request, from its first byte to its answer.

    def take_preface(self):
        """Read the PROXY header a trusted peer may send first: the client
        it names is then the connection's.  False until it can be told."""
        try:
            found = proxy_header(self.inbuf)
        except Refused:
            self.begin_request()
            raise
        if found is None:
            return False
        source, size = found
        del self.inbuf[:size]
        if source is not None:
            self.via = self.client
            self.client = peer_text(*source)
            self.forwards = trusted(source[0], SETTINGS.trusted_proxies)
        self.move(PREFACE_READ)
        return bool(self.inbuf)

    def greet(self):
        """The connection's first byte is 0x16, a TLS record: shake hands,
        with what inbuf holds.  True if more is left to serve (take_tls())."""
        self.tls = TLS(SETTINGS.tls)
        self.move(HELLO)
        data = bytes(self.inbuf)
        del self.inbuf[:]
        if len(self.server.handshaking) >= MAX_HANDSHAKES:
            # The one that got least far makes room: refusing the newest
            # let 256 stalled hellos keep every other client out, and
            # closing the oldest let hellos reopened faster than a round
            # trip close a real client's handshake, waiting for its reply.
            least = min(self.server.handshaking,
                        key=lambda conn: conn.tls.standing())
            self.server.run(least, least.tls_failed, (
                'kek shakes %d hands at most at once, and this one had got'
                ' the least far: closed to make room for a new one'
                % MAX_HANDSHAKES))
        self.server.handshaking.add(self)
        return self.take_tls(data)

    def take_tls(self, data):
        """Ciphertext from the client: the handshake's next step, or the
        requests' bytes it carries, taken.  A handshake step costs a fraction
        of a millisecond: past MAX_HANDSHAKE_STEPS a round, it waits for the
        next (serve() takes it up).  True if more is left to serve."""
        tls = self.tls
        try:
            if self.state is HANDSHAKE:
                tls.feed(data)
                data = b''
                # The budget is of answers to hellos, the dear step (a key
                # share and a signature): the client's next flight is cheap,
                # and waiting behind new hellos it could not be taken
                # before the handshake had to make room.
                if tls.answered_at is None:
                    if not tls.hello_whole():
                        return False    # a hello in pieces costs no step
                    if self.server.steps_left <= 0:
                        return True
                    self.server.steps_left -= 1
                done = tls.shake()
                tls.flush(self.connection)      # its next flight
                if not done:
                    return False
                self.move(SHAKEN)
                self.server.handshaking.discard(self)
                tls.shown = shown_tls(tls.facts())
                self.active_at = time.monotonic()
                # kek sends nothing after the client's Finished (no
                # tickets), so the kernel's ACK of it would wait 40 ms, and
                # a client's first request with it, under Nagle: ACK now.
                self.connection.setsockopt(socket.IPPROTO_TCP,
                                           socket.TCP_QUICKACK, 1)
            plain = tls.decrypt(data)
            tls.flush(self.connection)
        except (ssl.SSLError, ValueError) as error:
            try:
                tls.flush(self.connection)      # the alert that says why
            except OSError:
                pass
            self.tls_failed(error)
            return False
        except OSError as error:
            self.tls_failed('the client is gone: %s' % error)
            return False
        more = self.take(plain) if plain else False
        if tls.peer_closed and self.state is not CLOSED:
            self.end_of_input()
            return False
        return more

    def tls_failed(self, error):
        """The handshake, or TLS after it, failed: said under a fresh key
        (with the hello's facts while shaking hands), and closed."""
        if isinstance(error, ssl.SSLError):
            reason = handshake_failure(error, client_hello(self.tls.hello or b''))
        else:
            reason = str(error)
        if self.state is HANDSHAKE:
            self.begin_what_arrived()
            self.abandon(reason)
            return
        reason = 'TLS failed: ' + reason
        self.begin_what_arrived()
        if self.state is HEAD or self.state is BODY:
            self.abandon(reason)
            return
        if self.log is None:
            self.begin_request()
            self.log = self.request.log
        self.log.at('handler').error(reason)
        self.close()

    def shaken_for_nothing(self):
        """A client that shook hands and left without a request: said under
        a fresh key, with what it offered (an HTTP/2-only client does so
        when kek chooses no ALPN)."""
        self.begin_request()
        why = 'the client closed the connection after the TLS handshake,' \
              ' before any request'
        if 'http/1.1' not in self.tls.shown['alpn_offered']:
            why += ' (it offered ALPN %s; kek speaks http/1.1 only)' % (
                json_text(self.tls.shown['alpn_offered']))
        log_refusal(self.request, self.log.at('handler'), why)
        self.close()

    def begin_request(self):
        self.move(FIRST_BYTE)
        started = self.active_at = time.monotonic()
        key = KEYS.next()
        self.request = Request(key, started, self.client,
                               RequestLog(key, started, 'query'))
        self.request.via = self.via
        if self.tls is not None:
            self.request.tls = self.tls.shown
        self.log = self.request.log

    def take_head(self):
        """Run the request whose head is complete in inbuf; False if none is."""
        head = self.request.reader.read(self.inbuf)
        if head is not None:
            self.rfile = io.BytesIO(head)
            self.handle_one_request()
        return head is not None

    def parse_request(self):
        """The stock handle_one_request() calls this: parse the head into the
        request (or raise Refused), so that do_GET or the fallback runs."""
        head = self.raw_requestline + self.rfile.read()
        self.rfile = self.raw_requestline = None    # the head is the request's
        parse_head(self.request, head)
        if self.forwards:
            forward(self.request)
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
        request.body = body_of(request)
        request.body_started = time.monotonic()
        self.move(BODY_FOLLOWS)

    def read_body(self):
        """Feed inbuf to the body reader; False if it needs more bytes."""
        done = self.request.reader.read(self.inbuf, self.request.body)
        if done:
            self.run_chain()
        return done

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
        log_refusal(request, log, reason)
        del self.inbuf[:]       # what it still holds belongs to this request
        self.answer([reason], log, refused=True)

    def answer(self, errors, log, refused=False):
        """Write the 200 answer and log it: the request is over."""
        request = self.request
        closing = refused or not request.keep_alive or self.server.stopping
        self.wfile.write(answer_bytes(request, errors, closing, self.server.date))
        said = '; closing the connection' if closing else ''
        if request.quiet:
            pass            # counted by QUIET instead
        elif errors:
            log.error('responded 200 status=error' + said)
        else:
            log.info('responded 200 status=ok' + said)
        self.request = None
        self.log = log
        if not closing:
            self.move(ANSWERED)
            return
        self.move(LAST_ANSWERED)
        if refused or self.inbuf:       # the client may still be sending
            self.drop(self.inbuf)       # pipelined after the last request
            del self.inbuf[:]
            self.move(STILL_SENDING)

    # After the last answer.

    def drop(self, data):
        """Count bytes after the last request, never read as a request."""
        if data and not self.dropped:
            self.dropped_start = bytes(data[:QUOTED_BYTES])
        self.dropped += len(data)

    def begin_what_arrived(self):
        """Bytes that may begin a request (a PROXY v2 header is not yet told
        from blank lines) begin one, when the connection ends: its news are
        then told under a key."""
        if self.state is HANDSHAKE:
            hello = bytes(self.tls.hello)
            self.begin_request()
            self.request.handshake = hello
        elif self.state in (PREFACE, GREETING, IDLE) and self.inbuf.strip(
                b'\r\n'):
            self.begin_request()

    def end_of_input(self):
        """The client has sent all it will send (or reset the connection)."""
        self.begin_what_arrived()
        if (self.state is IDLE and self.tls is not None and self.log is None
                and not self.wfile):
            self.shaken_for_nothing()
            return
        if self.state is HEAD or self.state is BODY:
            self.abandon('the client closed the connection')
        elif self.wfile:
            self.move(INPUT_ENDED)  # send what it asked for, then close
        else:
            self.close()

    def half_close(self):
        """Shut our side; drop what still arrives for LINGER_TIMEOUT."""
        if self.tls is not None:
            self.tls.goodbye(self.connection)
        try:
            self.connection.shutdown(socket.SHUT_WR)
        except OSError:         # reset by the client meanwhile
            self.close()
            return
        self.move(HALF_CLOSED)
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
    if request.headers is not None:
        connection += cors_headers(request)
    head = ANSWER_HEAD % (date, len(body), request.key, connection)
    return (head if request.method == 'HEAD' else head + body).encode()


# -- The call chain ------------------------------------------------------------

class ValidationError(Exception):
    """A request that is well formed but not what the chain accepts."""


def quiet(request):
    """True for a request to a path of LOG_SKIP that has no other error:
    a plain GET, without a body, invalid=1 or a forwarding fault, is
    counted, not logged; anything else is logged in full."""
    return (request.method == 'GET' and request.body is None
            and '1' not in request.params.get('invalid', ())
            and request.forwarding is None)


class QuietCounts:
    """How many requests to each path of LOG_SKIP were answered unlogged
    since the last report: at most one count a path."""

    def __init__(self):
        self.counts = {}
        self.since = time.monotonic()

    def count(self, path):
        self.counts[path] = self.counts.get(path, 0) + 1

    def report(self, now):
        """A main record for each path counted since the last report."""
        for path, count in sorted(self.counts.items()):
            server_log().info('skipped %d request%s to %s in the last %.0f s',
                              count, 's' * (count != 1), path, now - self.since)
        self.counts = {}
        self.since = now


QUIET = QuietCounts()
QUIET_REPORT_INTERVAL = 10.0    # seconds between the counts of quiet paths


def query(request):
    """Log the incoming request, check method, path and parameters, then run
    the chain.  Returns the errors, each also logged; none if all went well."""
    log = request.log
    if request.path in SETTINGS.log_skip and quiet(request):
        QUIET.count(request.path)
        request.quiet = True
        return ['path %s is not /api' % request.path]
    log_arrival(request)
    if request.forwarding is not None:
        log_forwarding(request)
    if request.body is not None:
        log_body(request)
    if SETTINGS.webhook_secret is not None:
        log_signatures(request)
    log_preflight(request)
    errors = []
    if request.method != 'GET':
        errors.append('method %s is not allowed' % shown(request.method))
    if request.path != '/api':
        errors.append('path %s is not /api'
                      % cut(shown_url(request.path), MAX_SHOWN_CHARS))
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

def connection_limit():
    """How many connections kek keeps at most: what RLIMIT_NOFILE leaves
    once RESERVED_FDS are set aside (the log, the listener, the selector)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - RESERVED_FDS)


def listen(address):
    """A socket listening on address (host, port), without blocking."""
    host, port = address
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def url_of(listener, scheme='http'):
    host, port = listener.getsockname()[:2]
    return '%s://%s:%d' % (scheme, '[%s]' % host if ':' in host else host,
                           port)


class Server:
    """Listens, and runs the loop that drives every Connection.

    A round of the loop: take the bytes that arrived, give each connection
    with bytes to serve its turn, check deadlines, write the round's log
    records, then send the answers and watch each connection for what it
    waits for next.
    """

    parent = None       # a worker's parent's pid: gone, the worker stops
    accepts_a_round = MAX_ACCEPTS_A_ROUND

    def __init__(self, address=None, listener=None):
        """Listen on address, or, in a worker, on its parent's listener."""
        self.socket = listen(address) if listener is None else listener
        self.server_address = self.socket.getsockname()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.socket, selectors.EVENT_READ)
        self.waker, self.wake_sender = socket.socketpair()
        self.waker.setblocking(False)
        self.selector.register(self.waker, selectors.EVENT_READ)
        self.connections = set()
        self.max_connections = connection_limit()
        self.ready = set()          # connections with bytes to serve
        self.handshaking = set()    # connections shaking hands (TLS)
        self.steps_left = MAX_HANDSHAKE_STEPS   # this round's, of handshakes
        self.touched = set()        # connections that did something this round
        self.stopping = False
        self.stop_at = None         # when stopping abandons what is left
        self.gave_up = None         # why kek stops on its own, if it does
        self.next_sweep = 0.0       # when deadlines are checked next
        self.accepting = True
        self.resume_accept_at = 0.0
        self.date = email.utils.formatdate(usegmt=True)

    def serve_forever(self):
        """Run rounds until shutdown() and until requests in flight are
        done: as socketserver's loop, a round, then a stop step."""
        while True:
            if log_waiting():
                self.wait_for_log()
            else:
                self.round()
            if self.stopping and self.stop_step():
                return

    def round(self):
        """One round of the loop (see the class's docstring)."""
        # Connections with requests left from the last round: each gets
        # its turn this round, and is not read until they are served.
        ready, self.ready = self.ready, set()
        self.steps_left = MAX_HANDSHAKE_STEPS
        for key, events in self.selector.select(
                0 if ready else self.wait(self.next_sweep)):
            conn = key.data
            if key.fileobj is self.socket:
                self.accept()
            elif key.fileobj is self.waker:
                self.waker.recv(4096)
            else:
                self.touched.add(conn)
                if events & selectors.EVENT_READ and conn not in ready:
                    self.run(conn, conn.receive)
        for conn in ready:
            self.touched.add(conn)
            self.run(conn, conn.serve)
        now = time.monotonic()
        if (not self.accepting and not self.stopping
                and now >= self.resume_accept_at):
            self.accepting = True
            self.selector.register(self.socket, selectors.EVENT_READ)
        if now >= self.next_sweep:
            self.next_sweep = now + SWEEP_INTERVAL
            self.sweep(now)
        if now >= QUIET.since + QUIET_REPORT_INTERVAL:
            QUIET.report(now)
        flush_log()
        if log_waiting():
            return          # no answer goes out before its records
        touched, self.touched = self.touched, set()
        for conn in touched:
            self.run(conn, self.send, conn)

    def wait_for_log(self):
        """A round while the log cannot take writes: read nothing, accept
        nothing, send nothing; retry writing every LOG_RETRY_INTERVAL, or as
        soon as a full pipe has room.  Past LOG_GIVE_UP, stop as on SIGTERM.
        A SIGTERM wakes it at once."""
        poller = select.poll()
        poller.register(self.waker, select.POLLIN)
        for writer in log_writers():
            if isinstance(writer.error, BlockingIOError):
                poller.register(writer.fd, select.POLLOUT)
        for fd, _ in poller.poll(LOG_RETRY_INTERVAL * 1000):
            if fd == self.waker.fileno():
                self.waker.recv(4096)
        flush_log()
        self.check_parent()
        now = time.monotonic()
        for writer in log_writers():
            writer.note(now)
        failing_for = max(writer.failing_for(now) for writer in log_writers())
        if failing_for >= LOG_GIVE_UP and self.gave_up is None:
            self.gave_up = ('the log could not be written for %d s; stopping'
                            % failing_for)
            report(self.gave_up)
            self.shutdown()

    def stop_step(self):
        """After each round once shutdown() was asked: stop accepting, close
        what is idle, and at SHUTDOWN_GRACE abandon the rest.  True when
        no connection is left."""
        now = time.monotonic()
        if self.stop_at is None:
            self.stop_at = now + SHUTDOWN_GRACE
            self.stop_accepting()
        for conn in list(self.connections):
            if conn.idle():
                conn.close()
        if self.connections and now >= self.stop_at:
            for conn in list(self.connections):
                if conn.wfile and log_waiting():
                    conn.log.at('handler').error(
                        'answer not sent: the log could not be written before'
                        ' the server stopped; connection closed')
                elif conn.wfile:
                    conn.log.at('handler').error(
                        'client did not read its answer before the server'
                        ' stopped; connection closed')
                else:
                    conn.begin_what_arrived()
                    if conn.state is HEAD or conn.state is BODY:
                        conn.abandon('server stopping')
                conn.close()        # (a no-op once abandoned)
            flush_log()
        return not self.connections

    def wait(self, next_sweep):
        """How long select() may wait, when no connection has requests left
        to serve: until the next sweep, or the end of a pause."""
        wake_at = next_sweep
        if not self.accepting and not self.stopping:
            wake_at = min(wake_at, self.resume_accept_at)
        return max(0.0, wake_at - time.monotonic())

    def run(self, conn, action, *args):
        """Run one connection's action; True from it means requests are
        left to serve next round.  A bug must cost that connection, not the
        server: it is logged with its traceback and the connection closed."""
        if conn.state is CLOSED:
            return
        try:
            if action(*args):
                self.ready.add(conn)
        except Exception:
            server_log().exception('unexpected error on the connection from'
                                   ' %s', conn.client)
            conn.close()

    def send(self, conn):
        """Send conn's answers, then watch it for what it waits for next."""
        more = conn.send_output()
        if conn.state is not CLOSED:
            events = conn.wants()
            if events != conn.events:
                conn.events = events
                self.selector.modify(conn.connection, events, conn)
        return more

    def accept(self):
        """Take the connections that wait, at most accepts_a_round of them:
        a worker leaves the rest to the others, woken with it."""
        for _ in range(self.accepts_a_round):
            try:
                sock, address = self.socket.accept()
            except BlockingIOError:
                return
            except OSError as error:
                # Out of file descriptors (EMFILE): make room, and accept
                # again; else accepting again at once would spin, so pause.
                if error.errno in (errno.EMFILE, errno.ENFILE) and self.shed(
                        'kek is out of file descriptors'):
                    continue
                server_log().error('cannot accept connections: %s;'
                                   ' pausing %g s', error, ACCEPT_PAUSE)
                self.stop_accepting()
                self.resume_accept_at = time.monotonic() + ACCEPT_PAUSE
                return
            if len(self.connections) >= self.max_connections:
                self.shed('kek keeps %d connections at most' % self.max_connections)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(sock, address, self)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def shed(self, why):
        """Close the connection that makes the least progress, to make room
        for a new client: one idle or trickling before one whose body
        arrives above MIN_BODY_RATE, whatever the time of its latest byte;
        then the least recent.  False if there is none to close."""
        if not self.connections:
            return False
        now = time.monotonic()
        conn = min(self.connections,
                   key=lambda conn: (conn.progressing(now), conn.active_at))
        self.run(conn, conn.receive)        # what it sent that is not read yet
        self.run(conn, conn.shed, why)
        return True

    def stop_accepting(self):
        if self.accepting:
            self.accepting = False
            self.selector.unregister(self.socket)

    def sweep(self, now):
        """Once every SWEEP_INTERVAL: the Date header, every connection's
        deadline, and in a worker whether its parent is still there."""
        self.date = email.utils.formatdate(usegmt=True)
        self.check_parent()
        for conn in list(self.connections):
            if now >= conn.deadline():
                self.touched.add(conn)
                self.run(conn, conn.expire)

    def check_parent(self):
        """In a worker: stop if its parent is gone (it was killed), once.
        Checked at each sweep, and while the log waits: a log relayed by
        the parent waits for ever once the parent is gone."""
        if (self.parent is not None and not self.stopping
                and os.getppid() != self.parent):
            server_log().error('the parent process %d is gone; stopping',
                               self.parent)
            self.shutdown()

    def forget(self, conn):
        self.connections.discard(conn)
        self.ready.discard(conn)
        self.handshaking.discard(conn)
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


# -- Processes -----------------------------------------------------------------

# kek is one process, or with WORKERS=N a parent and N workers.  serve() is
# the life of a process that serves: signals, the loop, what is left at the
# stop.  The parent is gunicorn's arbiter: it binds the port, forks the
# workers, each serve()s on the inherited listener, and then it only keeps
# them.  Its signal handlers do nothing but wake its loop (set_wakeup_fd
# writes each signal's number to a pipe), which restarts a dead worker
# under its number after a back-off, passes SIGTERM, SIGINT and SIGHUP on,
# and, with the log on standard output, relays each worker's records from
# a pipe of the worker's own, whole lines only: writers sharing a pipe tear
# each other's lines past PIPE_BUF (4 KiB).  To LOG_FILE each worker
# appends itself: one write() a batch to an O_APPEND file is atomic between
# processes on a local file system (not on NFS).

WORKER_CANNOT_START = 3     # a worker's exit status when it cannot start
                            # (gunicorn's): the server stops with exit status 2
FIRST_RESTART_DELAY = 0.1   # seconds before a dead worker is started again,
MAX_RESTART_DELAY = 10.0    # doubled each time it dies young, up to this
YOUNG = 10.0                # seconds: a worker that lived longer waits the
                            # first delay again
STOP_SLACK = 2.0            # seconds past SHUTDOWN_GRACE before SIGKILL
RELAY_READ_BYTES = 64 * 1024    # a pipe's capacity: one read takes what waits
WORKER_ACCEPTS_A_ROUND = 1  # every idle worker wakes for a connection: one
                            # that took them all (wrk's 16 at once) left the
                            # others idle, and kek on one core


def log_to(writer, settings, worker=None):
    """Make writer kek's log, in LOG_FORMAT, a worker's records marked."""
    if settings.log_format == 'json':
        writer.setFormatter(JsonFormatter(settings.instance, worker))
    else:
        writer.setFormatter(TextFormatter())
    LOGGER.addHandler(writer)
    LOGGER.setLevel(logging.INFO)
    LOGGER.propagate = False


def serve(server, writer, settings, worker=None):
    """Run server until SIGTERM or SIGINT, its records to writer; the exit
    status.  One process says that it listens and that it stopped; a
    worker leaves both to its parent."""
    log_to(writer, settings, worker)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda signum, frame: server.shutdown())
    signal.signal(signal.SIGHUP, lambda signum, frame: writer.request_reopen())
    if worker is None:
        say_listening(server.socket, settings)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        QUIET.report(time.monotonic())
        if worker is None:
            server_log().info('stopped')
        lost = close_log(writer)
    return 1 if server.gave_up is not None or lost else 0


def close_log(writer):
    """Close writer, at the stop; True, said on standard error, if records
    could not be written."""
    writer.close()
    if not writer.unwritten():
        return False
    count = writer.unwritten()
    report('%d record%s could not be written to %s: %s' % (
        count, 's' * (count != 1), writer.destination(), writer.error))
    return True


def say_listening(listener, settings, workers=''):
    """The start line, in the log and, with LOG_FILE, on standard error."""
    urls = url_of(listener)
    if settings.tls is not None:
        urls += ' and ' + url_of(listener, 'https')
    server_log().info('listening on %s%s', urls, workers)
    if settings.log_file:
        report('listening on %s%s, logging to %s' % (urls, workers,
                                                     settings.log_file))


def exit_text(status):
    """How a worker ended, from its wait status, in words."""
    if os.WIFSIGNALED(status):
        return 'was killed by %s' % signal.Signals(os.WTERMSIG(status)).name
    return 'exited with status %d' % os.waitstatus_to_exitcode(status)


class Worker:
    """A worker as its parent keeps it: its number, its process while it
    runs, when it is due to start again, and, with the log on standard
    output, the read end of its pipe and the start of a line read from it."""

    def __init__(self, number):
        self.number = number
        self.pid = None
        self.started = None
        self.delay = FIRST_RESTART_DELAY    # before the next restart
        self.start_at = None                # when it is due to start again
        self.pipe = None
        self.partial = b''


# The parent's states.
RUNNING = 'running'     # workers serve; a dead one is started again
STOPPING = 'stopping'   # SIGTERM passed on: waiting for every worker to end


class Parent:
    """The parent of WORKERS=N: forks them, keeps them, relays their log."""

    def __init__(self, listener, writer, settings):
        self.listener = listener        # bound here, served by the workers
        self.writer = writer            # the parent's own records
        self.settings = settings
        self.workers = [Worker(number)
                        for number in range(1, settings.workers + 1)]
        self.relaying = settings.log_file is None
        self.state = RUNNING
        self.stop_at = None
        self.status = 0
        self.wake, self.woken = os.pipe()
        # Each worker's last key, which a worker started in its place goes
        # on from: 8 bytes a worker, shared with them all (MAP_SHARED).
        self.last_keys = mmap.mmap(-1, 8 * (len(self.workers) + 1))

    def run(self):
        """Start every worker, keep them until they have all stopped; the
        exit status."""
        writer = self.writer
        KEYS.share(self.last_keys, len(self.workers) + 1, 0)   # the parent's
        log_to(writer, self.settings)
        os.set_blocking(self.woken, False)
        signal.set_wakeup_fd(self.woken, warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP,
                       signal.SIGCHLD):
            signal.signal(signum, lambda signum, frame: None)
        for worker in self.workers:
            self.start(worker)
        say_listening(self.listener, self.settings, ' with %d workers (pids %s)'
                      % (len(self.workers), ', '.join(
                          str(worker.pid) for worker in self.workers)))
        flush_log()
        while self.state is RUNNING or any(
                worker.pid is not None or worker.pipe is not None
                for worker in self.workers):
            self.round()
        server_log().info('stopped')
        if close_log(writer):
            self.status = max(self.status, 1)
        return self.status

    def start(self, worker):
        """Fork worker: the child serves and never returns from here."""
        flush_log()         # (what waits would be written twice)
        pipe = os.pipe() if self.relaying else None
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            self.become(worker, pipe, parent)
        worker.pid = pid
        worker.started = time.monotonic()
        worker.start_at = None
        if pipe is not None:
            os.close(pipe[1])
            worker.pipe = pipe[0]
            worker.partial = b''

    def become(self, worker, pipe, parent):
        """In the forked child: leave the parent's signals, descriptors and
        log behind, and serve as worker; exit with serve()'s status, or
        WORKER_CANNOT_START."""
        status = WORKER_CANNOT_START
        try:
            # Until serve() has its handlers: a SIGTERM ends it at once (it
            # serves nothing yet), a SIGHUP is moot (it opens LOG_FILE anew).
            signal.set_wakeup_fd(-1)
            for signum, handler in ((signal.SIGCHLD, signal.SIG_DFL),
                                    (signal.SIGTERM, signal.SIG_DFL),
                                    (signal.SIGINT, signal.SIG_DFL),
                                    (signal.SIGHUP, signal.SIG_IGN)):
                signal.signal(signum, handler)
            for fd in [self.wake, self.woken] + [
                    other.pipe for other in self.workers
                    if other.pipe is not None]:
                os.close(fd)
            LOGGER.removeHandler(self.writer)
            if self.writer.path is not None:
                os.close(self.writer.fd)
            if pipe is not None:
                os.dup2(pipe[1], 1)
                os.close(pipe[0])
                os.close(pipe[1])
            KEYS.share(self.last_keys, len(self.workers) + 1, worker.number)
            try:
                writer = LogWriter(self.settings.log_file)
                server = Server(listener=self.listener)
            except OSError as error:
                report('worker %d cannot start: %s' % (worker.number, error))
            else:
                server.parent = parent  # (not getppid(): it may be gone)
                server.accepts_a_round = WORKER_ACCEPTS_A_ROUND
                status = serve(server, writer, self.settings, worker.number)
        finally:
            os._exit(status)

    def round(self):
        """Wait for a signal, a worker's records or the next thing due, and
        act on it."""
        poller = select.poll()
        poller.register(self.wake, select.POLLIN)
        pipes = {}
        if not self.writer.waiting():
            for worker in self.workers:
                if worker.pipe is not None:
                    pipes[worker.pipe] = worker
                    poller.register(worker.pipe, select.POLLIN)
        elif isinstance(self.writer.error, BlockingIOError):
            poller.register(self.writer.fd, select.POLLOUT)
        wait = self.wait()
        for fd, _ in poller.poll(None if wait is None else wait * 1000):
            if fd == self.wake:
                self.take_signals(os.read(self.wake, 64))
            elif fd in pipes:
                self.relay(pipes[fd])
        self.reap()
        now = time.monotonic()
        for worker in self.workers:
            if worker.start_at is not None and now >= worker.start_at:
                self.start(worker)
                server_log().info('worker %d started again: pid %d',
                                  worker.number, worker.pid)
        if self.stop_at is not None and now >= self.stop_at:
            for worker in self.workers:
                if worker.pid:
                    server_log().error('worker %d (pid %d) did not stop in'
                                       ' %.0f s; killed', worker.number,
                                       worker.pid, SHUTDOWN_GRACE + STOP_SLACK)
                    os.kill(worker.pid, signal.SIGKILL)
            self.stop_at = None
        flush_log()
        self.writer.note(now)
        if self.writer.failing_for(now) >= LOG_GIVE_UP and self.state is RUNNING:
            report('the log could not be written for %d s; stopping'
                   % self.writer.failing_for(now))
            self.status = 1
            self.stop()

    def wait(self):
        """Seconds until the next thing due: a restart, the SIGKILL of a
        worker that does not stop, a retry of the log."""
        due = [worker.start_at for worker in self.workers if worker.start_at]
        if self.stop_at is not None:
            due.append(self.stop_at)
        if self.writer.waiting():
            due.append(time.monotonic() + LOG_RETRY_INTERVAL)
        return max(0.0, min(due) - time.monotonic()) if due else None

    def take_signals(self, signums):
        for signum in signums:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif signum == signal.SIGHUP:
                self.writer.request_reopen()
                self.signal_workers(signal.SIGHUP)
            # SIGCHLD only wakes the loop: reap() runs every round.

    def signal_workers(self, signum):
        for worker in self.workers:
            if worker.pid:
                os.kill(worker.pid, signum)

    def stop(self):
        """Stop as one server does: each worker finishes its requests in
        flight, then ends; none starts again."""
        if self.state is STOPPING:
            return
        self.state = STOPPING
        self.listener.close()   # (the workers' stay open until they end)
        self.stop_at = time.monotonic() + SHUTDOWN_GRACE + STOP_SLACK
        for worker in self.workers:
            worker.start_at = None
        self.signal_workers(signal.SIGTERM)

    def reap(self):
        """Every worker that ended: while RUNNING it is started again after
        its back-off, unless it could not start or its log failed, which
        stop the server."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for worker in self.workers:
                if worker.pid == pid:
                    worker.pid = None
                    self.ended(worker, pid, status)

    def ended(self, worker, pid, status):
        # What it wrote that is not relayed yet, to the end of its pipe (no
        # process writes to it any more): before anything about its end.
        while worker.pipe is not None:
            self.relay(worker)
        code = os.waitstatus_to_exitcode(status)
        if code == WORKER_CANNOT_START or code == 1:
            why = ('could not start' if code == WORKER_CANNOT_START
                   else 'stopped: its log could not be written')
            report('worker %d %s; stopping' % (worker.number, why))
            server_log().error('worker %d %s; stopping', worker.number, why)
            self.status = max(self.status, 2 if code == WORKER_CANNOT_START
                              else 1)
            self.stop()
        elif self.state is RUNNING:
            lived = time.monotonic() - worker.started
            if lived >= YOUNG:
                worker.delay = FIRST_RESTART_DELAY
            server_log().warning('worker %d (pid %d) %s after %.1f s; starting'
                                 ' it again in %.1f s', worker.number, pid,
                                 exit_text(status), lived, worker.delay)
            worker.start_at = time.monotonic() + worker.delay
            worker.delay = min(worker.delay * 2, MAX_RESTART_DELAY)

    def relay(self, worker):
        """Read what worker wrote and pass its whole lines on; the end of
        its pipe means it has ended (a line it left cut is dropped, said)."""
        data = os.read(worker.pipe, RELAY_READ_BYTES)
        if not data:
            os.close(worker.pipe)
            worker.pipe = None
            if worker.partial:
                server_log().error('worker %d ended in the middle of a record;'
                                   ' its %d bytes dropped', worker.number,
                                   len(worker.partial))
            return
        data = worker.partial + data
        end = data.rfind(b'\n') + 1
        worker.partial = data[end:]
        if end:
            self.writer.relay(data[:end])


# -- Main ----------------------------------------------------------------------

class SettingError(Exception):
    """A bad setting: reported in one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise SettingError(message)


def settings_help():
    """What --help says after the arguments: each setting as declared, and
    how to read a log line."""
    lines = ['environment (an argument wins over its variable):']
    for setting in Settings.DECLARED:
        head = '  %s=%s' % (setting.name, setting.shape)
        text = '%s (default %s)' % (setting.help, setting.shown_default)
        if len(head) > 18:
            lines.append(head)
            head = ''
        lines.extend(textwrap.wrap(text, 79, initial_indent=head.ljust(19),
                                   subsequent_indent=' ' * 19))
    return '\n'.join(lines + [
        '', "a text log line: KEY +OFFSETms LEVEL WHERE MESSAGE, where KEY is"
        " the request's", "arrival time; grep '^KEY ' prints that request's"
        ' whole story.', ''])


def read_settings(argv, environ):
    """The Settings from arguments and environment; SettingError names the
    first bad one, and never a secret's text."""
    parser = ArgumentParser(
        prog='kek', description='A request trap: answers every HTTP request'
        ' with 200 and logs its whole story under its arrival time.',
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    for setting in Settings.DECLARED:
        if setting.argument:
            parser.add_argument(setting.argument, dest=setting.attribute,
                                help='%s (default: $%s or %s)' % (
                                    setting.help, setting.name,
                                    setting.shown_default))
    for arg in argv:
        name = arg.partition('=')[0]
        if name.startswith('-') and secret_name(name.lstrip('-')):
            raise SettingError('%s: a secret is never an argument (a command'
                               ' line is seen by every user of the machine);'
                               ' set WEBHOOK_SECRET in the environment' % name)
    args, unknown = parser.parse_known_args(argv)
    if unknown:     # named, but not what follows them: a mistyped secret's
        values = sum(not arg.startswith('-') or '=' in arg for arg in unknown)
        text = ' '.join(arg.partition('=')[0] for arg in unknown
                        if arg.startswith('-'))
        if values:
            text += '%s%d value%s, not shown' % (
                text and ' and ', values, 's' * (values > 1))
        raise SettingError('unrecognized arguments: ' + text)
    args = vars(args)
    settings = Settings()
    for setting in Settings.DECLARED:
        source, text = setting.argument, args.get(setting.attribute)
        if text is None:
            source, text = setting.name, environ.get(setting.name)
        if text is None:
            continue
        try:
            value = setting.read(text)
        except ValueError as error:
            if setting.secret:
                raise SettingError('%s %s' % (source, error))
            raise SettingError('%s=%r %s' % (source, text, error))
        setattr(settings, setting.attribute, value)
        settings.sources[setting.attribute] = source
    header = environ.get('WEBHOOK_SIGNATURE_HEADER')
    if header is not None:
        if not TOKEN.fullmatch(header) or len(header) > MAX_NAME_CHARS:
            raise SettingError('WEBHOOK_SIGNATURE_HEADER=%r is not a header'
                               ' name' % header)
        if header.lower() in SIGNATURE_SCHEMES:
            raise SettingError(
                'WEBHOOK_SIGNATURE_HEADER=%r is already read as %s signs'
                % (header, SIGNATURE_SCHEMES[header.lower()]))
        if settings.webhook_secret is None:
            raise SettingError('WEBHOOK_SIGNATURE_HEADER=%r needs'
                               ' WEBHOOK_SECRET, the secret it is made with'
                               % header)
    try:
        settings.tls = tls_context(settings)
    except ValueError as error:
        raise SettingError(error)
    return settings


def keep_standard_fds_open():
    """Put /dev/null where standard input, output or error is closed, so
    that neither the log file nor the listening socket becomes fd 1 or 2 and
    gets written to as if it were standard output or error; the set of
    those that were closed."""
    closed = set()
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            # The lowest free descriptor is fd: those below it are open.
            os.open(os.devnull, os.O_RDWR)
            closed.add(fd)
    return closed


def main(argv=None, environ=os.environ):
    """Run kek with argv (the command line's arguments, sys.argv's by
    default) and environ; the exit status."""
    # Until serve() reopens LOG_FILE on it: logrotate's SIGHUP at kek's
    # start must not end it (its default action).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    closed = keep_standard_fds_open()
    if argv is None:
        argv = sys.argv[1:]     # read here: the check of secrets needs them
    try:
        settings = read_settings(argv, environ)
        if 1 in closed and not settings.log_file:
            raise SettingError('standard output is closed and LOG_FILE is not'
                               ' set: the log would go nowhere')
        try:
            writer = LogWriter(settings.log_file)
        except OSError as error:
            raise SettingError('LOG_FILE=%r cannot be opened: %s'
                               % (settings.log_file, error))
        try:
            listener = listen((settings.host, settings.port))
        except OSError as error:
            raise SettingError('cannot listen on %s=%r %s=%d: %s' % (
                settings.sources.get('host', 'HOST'), settings.host,
                settings.sources.get('port', 'PORT'), settings.port, error))
    except SettingError as error:
        report(error)
        return 2
    SETTINGS.update(settings)
    KEYS.suffix = '' if settings.instance is None else '~' + settings.instance
    if settings.workers > 1:
        return Parent(listener, writer, settings).run()
    return serve(Server(listener=listener), writer, settings)


if __name__ == '__main__':
    sys.exit(main())
