"""The byte-counting proxy of the deployment tests pairs every response with its request."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from helpers import proxy as proxy_module
from helpers.proxy import CountingProxy

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def _serve_instant_responses(server: socket.socket, requests: int) -> None:
    """Answer each request of one keep-alive connection as soon as its head has arrived."""
    conn, _ = server.accept()
    with conn:
        buffer = b""
        for _ in range(requests):
            while b"\r\n\r\n" not in buffer:
                buffer += conn.recv(4096)
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            body_size = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(buffer) < body_size:
                buffer += conn.recv(4096)
            buffer = buffer[body_size:]
            conn.sendall(RESPONSE)


def test_a_response_that_beats_the_request_bookkeeping_is_still_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    # Reading a request slowly on the proxy's side used to let the upstream's answer arrive before the
    # request was recorded; the response was then dropped (a CI run under load measured 404 B too few)
    feed = proxy_module._HttpSplitter.feed

    def slow_feed(self: proxy_module._HttpSplitter, data: bytes) -> None:
        feed(self, data)
        if data.startswith(b"POST"):
            time.sleep(0.2)

    monkeypatch.setattr(proxy_module._HttpSplitter, "feed", slow_feed)
    upstream = socket.create_server(("127.0.0.1", 0))
    requests = 3
    server = threading.Thread(target=_serve_instant_responses, args=(upstream, requests), daemon=True)
    server.start()
    proxy = CountingProxy(upstream.getsockname())
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as client:
            for i in range(requests):
                body = b"x" * (10 + i)
                head = b"POST /v1/fleet/pull-object HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body)
                client.sendall(head + body)
                received = b""
                while len(received) < len(RESPONSE):
                    received += client.recv(4096)
                assert received == RESPONSE
            time.sleep(0.3)  # let the proxy's threads finish their bookkeeping
    finally:
        proxy.close()
        upstream.close()
    assert [e.request_body for e in proxy.exchanges] == [10, 11, 12]
    assert [e.response_body for e in proxy.exchanges] == [5, 5, 5]
    assert all(e.status == 200 for e in proxy.exchanges)
