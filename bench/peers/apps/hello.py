"""The `hello` app shape for the WSGI peers (gunicorn, uWSGI): any request to / gets `hello\n`.

The request body, if any, is read in full first (a strict client POSTs a small body), as any real
app does; the response carries its Content-Length so HTTP/1.1 keep-alive works where the server
supports it.
"""

BODY = b"hello\n"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def application(environ, start_response):
    length = environ.get("CONTENT_LENGTH") or "0"
    if int(length) > 0:
        environ["wsgi.input"].read(int(length))
    start_response("200 OK", HEADERS)
    return [BODY]
