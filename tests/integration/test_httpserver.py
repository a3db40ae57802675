"""dmr's HTTP/1.1 server (dmr_cli/server/httpserver.py) on a real socket, driven with raw
bytes where framing matters and with httpx where a client's view does."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from dmr_cli.server.httpserver import Connection, Cycle, Server

EVENTS: list[str] = []


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            EVENTS.append(message["type"])
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    path = scope["path"]
    if path == "/echo":  # the whole body back, with a length
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(b"content-length", str(len(body)).encode()), (b"x-path", path.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif path == "/stream":  # three pieces, no length: chunked
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for piece in (b"one ", b"two ", b"three"):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/early":  # answers without reading the body
        await send(
            {"type": "http.response.start", "status": 400, "headers": [(b"content-length", b"4")]}
        )
        await send({"type": "http.response.body", "body": b"no!\n"})
    elif path == "/hang":  # waits for the client to go away, then records how it heard
        hook = scope["extensions"]["dmr.hang_up"]
        heard = asyncio.Event()
        hook(heard.set)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"waiting", "more_body": True})
        await asyncio.wait_for(heard.wait(), 10)
        EVENTS.append("hung up")
    elif path == "/slow":
        await asyncio.sleep(0.5)
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"4")]}
        )
        await send({"type": "http.response.body", "body": b"done"})
    elif path == "/boom":
        raise RuntimeError("the app failed")
    else:
        await send(
            {"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]}
        )
        await send({"type": "http.response.body", "body": b""})


class Running:
    def __init__(self, tmp: Any) -> None:
        self.sock = str(tmp / "s.sock")
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.server = Server(app, graceful_timeout=2.0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.listening.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def _run(self) -> None:
        self.loop.run_until_complete(self.server.serve("", 0, self.sock, self.stop))

    def raw(self, data: bytes, *, read_until_close: bool = True) -> bytes:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(self.sock)
            conn.sendall(data)
            if not read_until_close:
                return conn.recv(65536)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            return b"".join(chunks)

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.sock), base_url="http://x")

    def shutdown(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


@pytest.fixture
def server(tmp_path: Any) -> Iterator[Running]:
    EVENTS.clear()
    running = Running(tmp_path)
    yield running
    running.shutdown()


def test_lifespan_runs_around_serving(server: Running) -> None:
    assert EVENTS == ["lifespan.startup"]
    server.shutdown()
    assert EVENTS[-1] == "lifespan.shutdown"


def test_keep_alive_and_pipelining_answer_in_order(server: Running) -> None:
    requests = b"".join(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(b), b)
        for b in (b"first", b"second")
    )
    requests += b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = server.raw(requests)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.index(b"first") < answer.index(b"second")
    assert answer.endswith(b"\r\n\r\n")  # the last, empty body
    assert b"connection: close" in answer.lower()


def test_chunked_request_body_reaches_the_app(server: Running) -> None:
    request = (
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    answer = server.raw(request)
    assert answer.endswith(b"\r\n\r\nhello world")


def test_response_without_length_is_chunked_and_streams(server: Running) -> None:
    with server.client() as client, client.stream("GET", "/stream") as response:
        assert response.headers["transfer-encoding"] == "chunked"
        assert list(response.iter_bytes()) == [b"one ", b"two ", b"three"]


def test_head_gets_headers_but_no_body(server: Running) -> None:
    answer = server.raw(b"HEAD /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert answer.endswith(b"\r\n\r\n")
    assert b"one" not in answer


def test_expect_100_continue_is_honoured(server: Running) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(server.sock)
        conn.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        )
        assert conn.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(b"abc")
        assert conn.recv(1024).endswith(b"\r\n\r\nabc")


def test_an_early_answer_reaches_a_client_still_sending(server: Running) -> None:
    """A 400 sent before the body was read must not turn into a reset connection."""
    body = b"x" * (4 * 1024 * 1024)
    with server.client() as client:
        response = client.post("/early", content=body)
        assert (response.status_code, response.text) == (400, "no!\n")
        # ... and the connection carries the next request.
        assert client.post("/echo", content=b"again").text == "again"


def test_malformed_request_gets_400_and_a_closed_connection(server: Running) -> None:
    answer = server.raw(b"NOT HTTP AT ALL\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")


def test_app_failure_is_a_500_and_the_server_lives_on(server: Running) -> None:
    with server.client() as client:
        assert client.get("/boom").status_code == 500
        assert client.post("/echo", content=b"still here").text == "still here"


def test_client_hang_up_fires_the_hook(server: Running) -> None:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.connect(server.sock)
        conn.sendall(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"waiting" in conn.recv(1024)
    deadline = time.monotonic() + 10
    while "hung up" not in EVENTS:
        assert time.monotonic() < deadline, "the app never heard of the hang-up"
        time.sleep(0.01)


def test_stop_lets_a_request_in_flight_finish(server: Running) -> None:
    result: dict[str, Any] = {}

    def slow() -> None:
        with server.client() as client:
            result["response"] = client.get("/slow")

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    server.shutdown()
    thread.join(10)
    assert result["response"].text == "done"


def test_finished_exchanges_are_freed_without_the_garbage_collector(server: Running) -> None:
    """Refcounting alone must free a closed connection and its exchanges. Reference cycles
    among them once made the collector run every few requests and, every few thousand, stop
    the daemon for a full collection (~20 ms, with every request in flight waiting)."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        server.raw(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        with server.client() as client:
            assert client.post("/echo", content=b"kept alive").text == "kept alive"
            assert client.get("/boom").status_code == 500
        deadline = time.monotonic() + 10
        while server.server.connections:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage if isinstance(o, Connection | Cycle)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []


def test_tcp_scope_has_addresses(tmp_path: Any) -> None:
    seen: dict[str, Any] = {}

    async def scope_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await app(scope, receive, send)
            return
        seen.update(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    srv = Server(scope_app)
    thread = threading.Thread(
        target=lambda: loop.run_until_complete(srv.serve("127.0.0.1", 0, None, stop)), daemon=True
    )
    thread.start()
    while not srv.listening.is_set():
        time.sleep(0.01)
    try:
        response = httpx.get(f"http://127.0.0.1:{srv.port}/a%20b?q=1")
        assert response.status_code == 204
        assert seen["path"] == "/a b" and seen["raw_path"] == b"/a%20b"
        assert seen["query_string"] == b"q=1"
        assert seen["client"][0] == "127.0.0.1" and seen["server"] == ("127.0.0.1", srv.port)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
