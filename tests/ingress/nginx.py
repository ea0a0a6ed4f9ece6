"""A real nginx in front of real api processes, configured as ingress-nginx renders the chart's
Ingress (charts/agent-orchestrator/values.yaml `exposure.ingress.annotations`).

Until these tests only a plain TCP proxy (tests/e2e/ingress_proxy.py) stood in for the
ingress: it forwards bytes, so nothing an HTTP proxy does (its own error pages, its body
limit, the headers it adds, its upstream choice by cookie) was ever exercised.

What is reproduced from ingress-nginx's template, as far as plain nginx can: HTTP/1.1 to the
upstream with a keep-alive pool, `Upgrade`/`Connection` for WebSockets, `X-Request-ID`
(the client's, or one made up), `X-Real-IP`, `X-Forwarded-For/-Host/-Port/-Proto`,
`client_max_body_size 1m` (proxy-body-size), proxy_read/send_timeout 3600, request and
response buffering, `proxy_next_upstream error timeout` with 3 tries, and cookie affinity
`ao-affinity` (a `map` of the cookie to an upstream whose other server is its backup, and the
cookie set to the server that actually answered, as the balanced mode re-pins a client whose
pod is gone).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from services.cli.embedded import free_port, stop_process

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
COOKIE = "ao-affinity"


def _config(root: Path, port: int, a: int, b: int, read_timeout: int) -> str:
    upstream_opts = "keepalive 320;\n    keepalive_timeout 60s;\n    keepalive_requests 10000;"
    # As root the master would hand its workers to `nobody`, who cannot enter pytest's tmp dir.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log info;
events {{ worker_connections 512; }}
http {{
  client_body_temp_path {root}/body;
  proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi;
  uwsgi_temp_path {root}/uwsgi;
  scgi_temp_path {root}/scgi;
  log_format upstreaminfo '$remote_addr [$time_local] "$request" $status $body_bytes_sent '
                          '$request_length $request_time [$upstream_addr] $upstream_status '
                          '$req_id';
  access_log {root}/access.log upstreaminfo;

  # ingress-nginx: with upstream keep-alive on, an empty Upgrade means an empty Connection.
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  map $http_x_request_id $req_id {{ default $http_x_request_id; '' $request_id; }}

  upstream api_rr {{ server 127.0.0.1:{a}; server 127.0.0.1:{b}; {upstream_opts} }}
  upstream api_a {{ server 127.0.0.1:{a}; server 127.0.0.1:{b} backup; {upstream_opts} }}
  upstream api_b {{ server 127.0.0.1:{b}; server 127.0.0.1:{a} backup; {upstream_opts} }}
  map $http_cookie $affinity_upstream {{
    "~(^|;\\s*){COOKIE}=a(;|$)" api_a;
    "~(^|;\\s*){COOKIE}=b(;|$)" api_b;
    default api_rr;
  }}
  # Set only when an upstream answered (an empty add_header adds nothing): nginx's own
  # answers leave the client's cookie as it was, as ingress-nginx's do.
  map $upstream_addr $affinity_cookie {{
    "~127\\.0\\.0\\.1:{a}$" "{COOKIE}=a; Path=/; Max-Age=10800; SameSite=Lax; HttpOnly";
    "~127\\.0\\.0\\.1:{b}$" "{COOKIE}=b; Path=/; Max-Age=10800; SameSite=Lax; HttpOnly";
    default "";
  }}

  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 1m;
    location / {{
      add_header Set-Cookie $affinity_cookie always;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Request-ID $req_id;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $remote_addr;
      proxy_set_header X-Forwarded-Host $host;
      proxy_set_header X-Forwarded-Port $server_port;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header X-Forwarded-Scheme $scheme;
      proxy_set_header X-Scheme $scheme;
      proxy_set_header Proxy "";
      proxy_connect_timeout 5s;
      proxy_send_timeout {read_timeout}s;
      proxy_read_timeout {read_timeout}s;
      proxy_buffering on;
      proxy_request_buffering on;
      proxy_buffer_size 4k;
      proxy_buffers 4 4k;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries 3;
      proxy_pass http://$affinity_upstream;
    }}
  }}
}}
"""


class Nginx:
    """One nginx master and worker of the test's own, stopped by `stop()`."""

    def __init__(self, root: Path, a: int, b: int, *, read_timeout: int = 3600) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        (root / "nginx.conf").write_text(_config(root, self.port, a, b, read_timeout))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        conf = self.root / "nginx.conf"
        with (self.root / "stderr.log").open("wb") as sink:
            self.process = subprocess.Popen(
                [NGINX, "-p", str(self.root), "-c", str(conf), "-g", "daemon off;"],
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while True:  # listening: its first answer is the upstreams' business
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "stderr.log").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)

    def access_log(self) -> str:
        return (self.root / "access.log").read_text(errors="replace")
