"""A misbehaving S3 endpoint for fault tests: a TCP proxy on 127.0.0.1 in front of moto.

Everything the platform sends to S3 (s3fs, boto3, pyarrow) goes through it byte for byte,
unless a fault window is open. A window opens at once, or at the first request whose request
line contains a given text (``on="results/slides"``: the PUT of a slides file), and lasts a
given number of seconds; several windows queue up, each waiting for the one before. While
one is open the proxy:

- ``drop``: resets every connection (new ones on accept, open ones on their next bytes), as a
  dead load balancer or a flapping network does;
- ``slowdown``: answers every request ``503 SlowDown`` (S3's throttling reply) and closes;
- ``stall``: holds all traffic until the window closes, then lets it through (a stalled
  endpoint; clients see a long response time, not an error, while it is shorter than their
  read timeout);
- ``lose``: passes each request on, then resets the connection instead of relaying the answer:
  the request took effect, the client cannot know (a timeout after the server acted).

It runs in threads of the test process, one per connection; ``hits`` counts what each mode did,
so a test can tell that its fault really met the traffic.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlparse

Mode = Literal["drop", "slowdown", "stall", "lose"]
METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ")
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)
SLOWDOWN = (
    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
    + f"Content-Length: {len(SLOWDOWN_BODY)}\r\n".encode()
    + b"Connection: close\r\nx-amz-request-id: proxy\r\n\r\n"
    + SLOWDOWN_BODY
)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST, not a polite FIN: the client sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass
class _Window:
    mode: Mode
    seconds: float
    on: str | None  # opens at the first request whose request line contains this
    until: float = 0.0


class S3Proxy:
    """``with S3Proxy(moto_url) as proxy:`` then point the store's endpoint at ``proxy.url``."""

    def __init__(self, upstream: str):
        u = urlparse(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.hits: Counter[str] = Counter()
        self.requests: list[str] = []  # request lines seen, in order
        self._lock = threading.Lock()
        self._windows: list[_Window] = []  # waiting to open, in order
        self._open: _Window | None = None
        self.scheduled = 0
        self._opened = 0
        self._closed = threading.Event()

    def __enter__(self) -> S3Proxy:
        threading.Thread(target=self._accept, daemon=True, name="s3-proxy").start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self._listener.close()

    # --- control --------------------------------------------------------------------------
    def fail(self, mode: Mode, seconds: float, on: str | None = None) -> None:
        """Misbehave as ``mode`` for ``seconds``, from now or from the first request whose
        request line contains ``on``. Windows queue up: each opens once the one before it has
        closed and its own trigger comes."""
        with self._lock:
            self._windows.append(_Window(mode, seconds, on))
            self.scheduled += 1

    def heal(self) -> None:
        """Back to a faithful proxy at once."""
        with self._lock:
            self._windows.clear()
            self._open = None

    def wait_healed(self, timeout: float) -> bool:
        """Block until every window asked for has opened and closed again (False at the
        timeout): a window opens at its first request, which a busy machine may delay."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._windows and (
                    self._open is None or time.monotonic() >= self._open.until
                ):
                    return True
            time.sleep(0.05)
        return False

    @property
    def opened(self) -> int:
        """How many of the windows asked for have opened so far."""
        with self._lock:
            return self._opened

    def _active(self, first_line: str | None = None) -> Mode | None:
        now = time.monotonic()
        with self._lock:
            if self._open is not None and now < self._open.until:
                return self._open.mode
            self._open = None
            if self._windows:
                w = self._windows[0]
                if w.on is None or (first_line is not None and w.on in first_line):
                    self._windows.pop(0)
                    w.until = now + w.seconds
                    self._open, self._opened = w, self._opened + 1
                    return w.mode
            return None

    def _stall_until(self) -> float:
        with self._lock:
            w = self._open
            return w.until if w is not None and w.mode == "stall" else 0.0

    # --- traffic --------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        mode = self._active()
        if mode == "drop":
            self._count("drop")
            _reset(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            _reset(client)
            return
        try:
            self._pump(client, upstream)
        finally:
            client.close()
            upstream.close()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        losing = False  # a request went on in a ``lose`` window: its answer never comes back
        while not self._closed.is_set():
            ready, _, _ = select.select([client, upstream], [], [], 0.5)
            for sock in ready:
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                if sock is upstream:
                    if losing and not data.startswith(b"HTTP/1.1 100 "):  # not an interim
                        # answer to ``Expect: 100-continue``: the body must still go through
                        self._count("lose")
                        _reset(client)
                        return
                    client.sendall(data)
                    continue
                line = None
                if data.startswith(METHODS):
                    line = data.split(b"\r\n", 1)[0].decode("latin-1")
                    with self._lock:
                        self.requests.append(line)
                mode = self._active(line)
                if mode == "drop":
                    self._count("drop")
                    _reset(client)
                    return
                if mode == "slowdown":
                    self._count("slowdown")
                    with contextlib.suppress(OSError):
                        client.sendall(SLOWDOWN)
                    return
                if mode == "stall":
                    self._count("stall")
                    while (wait := self._stall_until() - time.monotonic()) > 0:
                        time.sleep(min(wait, 0.1))
                losing = losing or mode == "lose"
                upstream.sendall(data)

    def _count(self, mode: str) -> None:
        with self._lock:
            self.hits[mode] += 1
