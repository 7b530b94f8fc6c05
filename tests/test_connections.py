"""Slow and idle clients: stalled requests are closed at their deadline, connections are bounded, and normal
requests are answered meanwhile (skingpt4.connections, on the API server)."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from skingpt4.connections import install
from skingpt4.engine.chat import ChatEngine
from skingpt4.serve.api import ServeConfig, create_app

DEADLINE = 2.0  # seconds; the test's own waits are generous multiples of it, to catch a hang, not to time anything


def start(loaded, max_connections: int) -> tuple[uvicorn.Server, int]:
    app = create_app(ChatEngine(loaded), ServeConfig(warmup=False))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", http=install(DEADLINE, max_connections))
    server = uvicorn.Server(config)
    sock = socket.create_server(("127.0.0.1", 0))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    return server, sock.getsockname()[1]


def stalled(port: int) -> socket.socket:
    """A client that sends headers and a Content-Length, then nothing."""
    conn = socket.create_connection(("127.0.0.1", port))
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    conn.sendall(f"{head}Content-Length: 1000\r\n\r\n{{".encode())
    return conn


def reply_of(conn: socket.socket, wait: float) -> bytes:
    """Everything the server sends until it closes the connection (or `wait` seconds pass)."""
    conn.settimeout(wait)
    data = b""
    try:
        while chunk := conn.recv(4096):
            data += chunk
    except TimeoutError:
        pytest.fail(f"still open after {wait} s: {data[:80]!r}")
    finally:
        conn.close()
    return data


@pytest.fixture
def engine_server(loaded):
    server, port = start(loaded, max_connections=300)
    yield port
    server.should_exit = True


def test_two_hundred_stalled_clients_are_closed_and_others_answered(engine_server):
    port = engine_server
    clients = [stalled(port) for _ in range(200)]
    partial = socket.create_connection(("127.0.0.1", port))
    partial.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")  # headers that never end
    models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)  # a normal request meanwhile
    assert models.status_code == 200 and models.json()["object"] == "list"
    replies = [reply_of(conn, wait=30 * DEADLINE) for conn in [*clients, partial]]
    assert all(r.startswith(b"HTTP/1.1 408 Request Timeout") for r in replies)
    assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code == 200


def test_past_the_connection_bound_a_new_client_gets_503_at_once(loaded):
    server, port = start(loaded, max_connections=20)
    try:
        held = [stalled(port) for _ in range(20)]
        deadline = time.monotonic() + 30  # the bound counts accepted connections: wait until the server holds all 20
        while len(server.server_state.connections) < 20:
            assert time.monotonic() < deadline, "the server did not accept the 20 clients"
            time.sleep(0.05)
        refused = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        for conn in held:
            conn.close()
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, "the bound did not free up after the clients left"
            time.sleep(0.1)
    finally:
        server.should_exit = True
