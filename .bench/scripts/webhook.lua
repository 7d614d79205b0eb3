-- a webhook-like POST: a handful of headers and a small JSON body
-- (every server answers it with the method error), then the same KEKSTAT
-- line as stats.lua
wrk.method = "POST"
wrk.path = "/api?source=ci"
wrk.body = '{"event": "push", "ref": "refs/heads/main", "after": "3cd8d079"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["User-Agent"] = "GitHub-Hookshot/1c9ab2c"
wrk.headers["X-GitHub-Event"] = "push"
wrk.headers["X-Request-Id"] = "8f2b6a2e-4f7d-11ef-9a3c-0242ac120002"
wrk.headers["Authorization"] = "Bearer 0123456789abcdef0123456789abcdef"
-- GitHub's signature of the body with the secret "kek-bench-secret": run kek
-- with WEBHOOK_SECRET=kek-bench-secret and each request is "signature ok"
-- (python3 -c 'import hmac; print(hmac.new(b"kek-bench-secret", BODY,
-- "sha256").hexdigest())')
wrk.headers["X-Hub-Signature-256"] = "sha256=8f9f6942e1d0bdf16dd045c564f881f31defc3b4d4190efa9ecfb40ebb1a84ca"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("KEKSTAT requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d p50_us=%d p99_us=%d mean_us=%.1f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
