"""A byte-counting TCP proxy for plain-HTTP/1.1 traffic between SuperNodes and a SuperLink.

It forwards every byte unchanged and, on the side, splits each direction of each connection into
HTTP messages (head and body, by ``Content-Length`` or chunked encoding), so that the bytes that
crossed the wire can be told apart by endpoint: headers, bodies, polling, the FAB download.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

__all__ = ["Exchange", "CountingProxy"]


@dataclass
class Exchange:
    """One request and its response, as they crossed the wire."""

    path: str
    request_head: int = 0
    request_body: int = 0
    response_head: int = 0
    response_body: int = 0
    status: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return self.request_head + self.request_body + self.response_head + self.response_body


class _HttpSplitter:
    """Incremental HTTP/1.1 message splitter: feed bytes, get (head bytes, body bytes, first line) per message."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done: list[tuple[int, int, str]] = []
        self._head: tuple[int, str] | None = None  # (head size, first line) of the message being read
        self._body_left = 0
        self._chunked = False
        self._body = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while self._step():
            pass

    def _step(self) -> bool:
        if self._head is None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return False
            head, self.buffer = self.buffer[: end + 4], self.buffer[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
            self._head, self._body = (len(head), lines[0]), 0
            self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            self._body_left = int(headers.get("content-length", "0")) if not self._chunked else 0
            return True
        if self._chunked:
            return self._step_chunk()
        take = min(self._body_left, len(self.buffer))
        self._body += take
        self._body_left -= take
        self.buffer = self.buffer[take:]
        if self._body_left == 0:
            self._finish()
            return True
        return False

    def _step_chunk(self) -> bool:
        end = self.buffer.find(b"\r\n")
        if end < 0:
            return False
        size = int(self.buffer[:end].split(b";")[0], 16)
        need = end + 2 + size + 2
        if size == 0:  # the last chunk, then (no trailers) an empty line
            if len(self.buffer) < end + 4:
                return False
            self._body += end + 4
            self.buffer = self.buffer[end + 4 :]
            self._finish()
            return True
        if len(self.buffer) < need:
            return False
        self._body += need  # chunk framing counts as body bytes: it is on the wire either way
        self.buffer = self.buffer[need:]
        return True

    def _finish(self) -> None:
        assert self._head is not None
        self.done.append((self._head[0], self._body, self._head[1]))
        self._head = None


class CountingProxy:
    """Listen on ``127.0.0.1:port``, forward to ``target``, and record every :class:`Exchange`."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", port))
        self.port: int = self.server.getsockname()[1]
        self.exchanges: list[Exchange] = []
        self.raw = {"up": 0, "down": 0}  # every byte forwarded, node -> SuperLink and back
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            pending: list[Exchange] = []
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, "up", pending), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down", pending), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str, pending: list[Exchange]) -> None:
        splitter = _HttpSplitter()
        try:
            while data := src.recv(65536):
                # Record before forwarding: once a request is forwarded its response may arrive on the
                # other thread at once, and a response with no recorded request would go uncounted
                splitter.feed(data)
                with self._lock:
                    self.raw[direction] += len(data)
                    self._record(splitter, direction, pending)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _record(self, splitter: _HttpSplitter, direction: str, pending: list[Exchange]) -> None:
        for head, body, first_line in splitter.done:
            if direction == "up":  # a request: "POST /v1/fleet/pull-messages HTTP/1.1"
                exchange = Exchange(
                    path=first_line.split(" ")[1] if " " in first_line else first_line,
                    request_head=head,
                    request_body=body,
                )
                pending.append(exchange)
                self.exchanges.append(exchange)
            elif pending:  # the response to the oldest open request on this connection
                exchange = pending.pop(0)
                exchange.response_head, exchange.response_body = head, body
                exchange.status = int(first_line.split(" ")[1]) if first_line.count(" ") >= 1 else 0
        splitter.done.clear()

    def by_path(self) -> dict[str, dict[str, int]]:
        """Per endpoint: requests, head and body bytes each way."""
        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        with self._lock:
            for e in self.exchanges:
                t = totals[e.path]
                t["requests"] += 1
                t["request_head"] += e.request_head
                t["request_body"] += e.request_body
                t["response_head"] += e.response_head
                t["response_body"] += e.response_body
        return {k: dict(v) for k, v in totals.items()}

    def close(self) -> None:
        self._closed.set()
        self.server.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass


#: Fleet API endpoints whose bodies carry messages: node -> SuperLink requests, SuperLink -> node responses.
PUSH_PATHS = ("/v1/fleet/push-messages", "/v1/fleet/push-object")
PULL_PATHS = ("/v1/fleet/pull-messages", "/v1/fleet/pull-object")
IDLE_PATHS = ("/v1/fleet/send-node-heartbeat",)
FAB_PATH = "/v1/fleet/get-fab"


def classify(exchanges: list[Exchange]) -> dict[str, dict[str, int]]:
    """Split the wire bytes into what ``summary.json`` reports separately, each as ``{"up": .., "down": ..}``.

    - ``message_bodies``: bodies of push requests (up) and of pull responses that carried something (down).
    - ``http_headers``: request heads (up) and response heads (down) of every exchange.
    - ``idle``: bodies of heartbeats and of polls that found nothing (their heads are in ``http_headers``).
    - ``fab_download``: bodies of ``get-fab`` requests and responses.
    - ``control``: every other body (pull requests naming object ids, push responses, run info, ...).
    """
    out = {k: {"up": 0, "down": 0} for k in ("message_bodies", "http_headers", "idle", "fab_download", "control")}
    for e in exchanges:
        out["http_headers"]["up"] += e.request_head
        out["http_headers"]["down"] += e.response_head
        if e.path in IDLE_PATHS or (e.path in PULL_PATHS and e.response_body == 0):
            kind_up, kind_down = "idle", "idle"
        elif e.path == FAB_PATH:
            kind_up, kind_down = "fab_download", "fab_download"
        else:
            kind_up = "message_bodies" if e.path in PUSH_PATHS else "control"
            kind_down = "message_bodies" if e.path in PULL_PATHS else "control"
        out[kind_up]["up"] += e.request_body
        out[kind_down]["down"] += e.response_body
    return out
