-- A POST with a small body: a request wrk never retries (see bench/lossless/run.py).
wrk.method = "POST"
wrk.body = "strict=1&lost=never"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
