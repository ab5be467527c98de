"""nginx as the bench scripts' peer: `return 200 "hello\\n"` on loopback, with its own prefix,
pid file, logs and temp dirs under one directory (so it runs as any user, beside another nginx).
Standard library only; a script imports it after putting bench/ on sys.path."""

import os


def nginx_hello_command(prefix, port, workers):
    """Writes PREFIX/nginx.conf (WORKERS workers, 127.0.0.1:PORT) and its directories; returns the
    command that runs nginx on it in the foreground."""
    os.makedirs(os.path.join(prefix, "logs"), exist_ok=True)
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    conf = os.path.join(prefix, "nginx.conf")
    p = prefix
    with open(conf, "w") as f:
        f.write(f"""worker_processes {workers};
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000;
    default_type text/plain;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "hello\\n"; }}
    }}
}}
""")
    return ["nginx", "-p", p, "-c", conf, "-e", os.path.join(p, "logs", "error.log")]
