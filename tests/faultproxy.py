"""An HTTP proxy in this process in front of the moto S3 server that answers chosen requests with S3's errors
(503 SlowDown, 403, ...) or drops their connection: the S3 faults of tests/test_ops_s3_faults.py (retries, the
listing, the lease store) and tests/test_ops_read_transient.py (a read's error kind)."""

from __future__ import annotations

import http.client
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers import free_port

SLOWDOWN = (503, "SlowDown", "Please reduce your request rate.")
DENIED = (403, "AccessDenied", "Access Denied")
RESET = "reset"  # a rule's error: the connection is dropped with a TCP reset, no answer


class FaultProxy:
    """Forwards HTTP requests to ``upstream``; a request matching a rule (``method``, a substring of the path,
    of the User-Agent) is answered with the rule's error instead (an S3 XML error of its status, or
    :data:`RESET`), at most ``times`` times. ``log`` holds ``(method, path, status)`` of every request (0: reset)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        self.rules: list[dict] = []
        self.log: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_any(self):
                body = self._body()
                rule = proxy._match(self.command, self.path, self.headers.get("User-Agent", ""))
                if rule is not None and rule["error"] == RESET:  # the connection dropped with a TCP reset
                    proxy._record(self.command, self.path, 0)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" + b"\x00" * 4)
                    self.connection.close()
                    self.close_connection = True
                    return
                if rule is not None:
                    status, code, message = rule["error"]
                    data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>{message}</Message></Error>").encode()
                    proxy._record(self.command, self.path, status)
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                if body or "Content-Length" in self.headers or self.headers.get("Transfer-Encoding"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                proxy._record(self.command, self.path, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = handle_any

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def fail(self, contains: str, error=SLOWDOWN, times: int = 10**9, method: str | None = None,
             agent: str = "") -> None:
        with self.lock:
            self.rules.append({"contains": contains, "error": error, "times": times, "method": method,
                               "agent": agent})

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.log.clear()

    def failed(self, status: int | None = None) -> list[tuple[str, str, int]]:
        with self.lock:
            return [e for e in self.log if e[2] >= 400 and (status is None or e[2] == status)]

    def _match(self, method: str, path: str, agent: str) -> dict | None:
        with self.lock:
            for r in self.rules:
                if r["times"] > 0 and r["contains"] in path and r["method"] in (None, method) \
                        and r["agent"].lower() in agent.lower():
                    r["times"] -= 1
                    return r
        return None

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
