"""What checking a webhook's signature costs kek, on a machine too noisy
for two wrk runs to tell 10% apart.

    python3 .bench/signature_cost.py [BLOCKS]      (default 60)

One process, one connection fed webhook.lua's request from memory: blocks
of 400 requests without WEBHOOK_SECRET and with it, in turn, so whatever
else the machine does hits both alike.  Prints the median time a request
takes in each, and the median and quartiles of the blocks' ratios.  The
request carries its X-Hub-Signature-256 in both; only the check differs.
What it leaves out (the socket calls, the loop's wait) is the same with and
without the check, so a whole server's ratio is a little nearer 1.
"""
import importlib.util
import logging
import os
import socket
import statistics
import sys
import tempfile
import time

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = b'kek-bench-secret'        # the secret webhook.lua's signature is made with
BODY = b'{"event": "push", "ref": "refs/heads/main", "after": "3cd8d079"}'
REQUEST = (b'POST /api?source=ci HTTP/1.1\r\nHost: 127.0.0.1:18700\r\n'
           b'Content-Type: application/json\r\n'
           b'User-Agent: GitHub-Hookshot/1c9ab2c\r\nX-GitHub-Event: push\r\n'
           b'X-Request-Id: 8f2b6a2e-4f7d-11ef-9a3c-0242ac120002\r\n'
           b'Authorization: Bearer 0123456789abcdef0123456789abcdef\r\n'
           b'X-Hub-Signature-256: sha256=8f9f6942e1d0bdf16dd045c564f881f31d'
           b'efc3b4d4190efa9ecfb40ebb1a84ca\r\n'
           b'Content-Length: %d\r\n\r\n' % len(BODY) + BODY)
BLOCK = 400


def load_kek():
    spec = importlib.util.spec_from_file_location(
        'kek', os.path.join(PROJECT, 'kek.py'))
    kek = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kek)
    return kek


def main():
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    kek = load_kek()
    log = tempfile.NamedTemporaryFile(prefix='kek-signature-cost-')
    writer = kek.LogWriter(log.name)
    writer.setFormatter(kek.TextFormatter())
    kek.LOGGER.addHandler(writer)
    kek.LOGGER.setLevel(logging.INFO)
    kek.LOGGER.propagate = False
    server = kek.Server(('127.0.0.1', 0))
    client = socket.create_connection(server.server_address)
    while not server.connections:
        server.accept()
    connection = next(iter(server.connections))

    def block(secret):
        """Microseconds a request, over BLOCK requests."""
        kek.SETTINGS.webhook_secret = secret    # (a Settings field since 52189c4)
        started = time.perf_counter()
        for n in range(BLOCK):
            connection.inbuf += REQUEST
            connection.serve()
            del connection.wfile[:]
            if n % 16 == 15:        # as a loop round of 16 connections
                writer.flush()
        writer.flush()
        return (time.perf_counter() - started) / BLOCK * 1e6

    for n in range(5):              # warm up
        block(None), block(SECRET)
    plain, signed = [], []
    for n in range(blocks):
        plain.append(block(None))
        signed.append(block(SECRET))
        with open(log.name, 'rb') as written:
            if b' WARNING ' in written.read():
                sys.exit('a signature did not hold: see ' + log.name)
        os.ftruncate(writer.fd, 0)
    ratios = [b / a for a, b in zip(plain, signed)]
    low, middle, high = statistics.quantiles(ratios, n=4)
    print('without WEBHOOK_SECRET %.1f us a request, with it %.1f us (medians'
          ' of %d blocks of %d)' % (statistics.median(plain),
                                    statistics.median(signed), blocks, BLOCK))
    print('with / without: median %.3f, quartiles %.3f-%.3f'
          % (statistics.median(ratios), low, high))
    client.close()
    server.server_close()


if __name__ == '__main__':
    main()
