"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the moto S3 server, for fault tests.

Every request is forwarded to the upstream endpoint unless the fault policy picks it: then the proxy
answers ``503 SlowDown`` or ``500 InternalError`` without forwarding, resets the connection before
forwarding, answers slowly, forwards the request and then drops the response (the write happened, the
client never hears so: the case that makes retried conditional PUTs tricky), or answers ``403
AccessDenied`` to writes (a read-only bucket). Choices come from a seeded RNG, so a run is
reproducible in its fault mix; counts of what was injected are kept for the test's report.

Only loopback traffic: the upstream must be a 127.0.0.1 endpoint.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "slow", "drop_after_write")
_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>fault-proxy</RequestId></Error>"
)
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade"}


@dataclass
class FaultPolicy:
    """What to inject.

    Args:
        rate: fraction of requests that get a fault (0 turns faults off).
        faults: which faults to draw from, uniformly.
        seed: RNG seed.
        slow_seconds: delay of a ``slow`` answer.
        read_only: answer 403 AccessDenied to every PUT, POST and DELETE (independent of ``rate``).
        methods: only requests with these methods get faults (None: all).
        path_contains: only requests whose path contains this get faults (None: all).
    """

    rate: float = 0.0
    faults: tuple[str, ...] = FAULTS
    seed: int = 0
    slow_seconds: float = 0.3
    read_only: bool = False
    methods: tuple[str, ...] | None = None
    path_contains: str | None = None
    injected: Counter = field(default_factory=Counter)
    requests: int = 0
    log: list = field(default_factory=list)  # (method, path, fault or None) per request, in order

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, method: str, path: str = "") -> str | None:
        with self._lock:
            self.requests += 1
            fault = self._draw(method, path)
            if fault is not None:
                self.injected[fault] += 1
            self.log.append((method, path, fault))
            return fault

    def _draw(self, method: str, path: str) -> str | None:
        if self.read_only and method in ("PUT", "POST", "DELETE"):
            return "read_only"
        if self.methods is not None and method not in self.methods:
            return None
        if self.path_contains is not None and self.path_contains not in path:
            return None
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return None
        fault = self._rng.choice(self.faults)
        if fault == "drop_after_write" and method not in ("PUT", "POST", "DELETE"):
            fault = "reset"
        return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = self.rfile.readline()
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _error(self, status: int, code: str, message: str) -> None:
        body = _ERROR_BODY.format(code=code, message=message).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        if code == "SlowDown":
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        # RST instead of FIN: the client sees "connection reset by peer"
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close_connection = True
        self.connection.close()

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP and k.lower() != "expect"}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            upstream.close()

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.policy.draw(self.command, self.path)
        if fault == "read_only":
            return self._error(403, "AccessDenied", "Access Denied (read-only bucket, fault proxy)")
        if fault == "slowdown":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "internal":
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "reset":
            return self._reset()
        if fault == "slow":
            time.sleep(self.server.policy.slow_seconds)
        status, reason, headers, data = self._forward(body)
        if fault == "drop_after_write":
            return self._reset()  # upstream applied the write; the client never gets the answer
        self.send_response(status, reason)
        for key, value in headers:
            # HEAD: the upstream's Content-Length is the object's size, not this empty body's
            if key.lower() not in _HOP_BY_HOP and (key.lower() != "content-length" or self.command == "HEAD"):
                self.send_header(key, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: str, policy: FaultPolicy) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the fault proxy only fronts a loopback endpoint, not {upstream}")
        self.upstream_host, self.upstream_port = parts.hostname, parts.port or 80
        self.policy = policy
        super().__init__(("127.0.0.1", 0), _Handler)


class FaultProxy:
    """``with FaultProxy(moto_endpoint, FaultPolicy(rate=0.1)) as proxy: proxy.endpoint_url``."""

    def __init__(self, upstream: str, policy: FaultPolicy | None = None) -> None:
        self.policy = policy or FaultPolicy()
        self._server = _ProxyServer(upstream, self.policy)
        self.endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="s3-fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
