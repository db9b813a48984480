"""The engine wire against clients it must refuse or bound, and the Unix socket against idle
clients: every unauthenticated attempt refused, slow and idle clients held within limits,
other clients served meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import abuse
from tests.abuse import Target, aimed
from tests.engine import EngineClient, read_until_closed, tls_socket
from vnicd import rpc_unix
from vnicd.caller import Caller
from vnicd.client import Client
from vnicd.rpc_stomp import Limits
from vnicd.rpc_unix import UnixServer
from vnicd.stomp import Frame

__all__ = ["aimed"]  # the fixture, used by name

ATTEMPTS = 250 if abuse.LONG else 25
IDLE = 1000
LIMITS = Limits()
CONNECT = Frame("CONNECT", {"accept-version": "1.2"}).encode()


@pytest.fixture(scope="module", autouse=True)
def enough_files() -> Iterator[None]:
    """Thousands of sockets at once: this process holds both ends of each."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def attempt(t: Target, who: str) -> bytes:
    """One connection as ``who``: all vnicd sent before it closed (or the TLS error)."""
    if who == "plain TCP":
        with socket.create_connection(("127.0.0.1", t.port), timeout=10) as sock:
            sock.sendall(CONNECT)
            return read_until_closed(sock)
    cert = {"no certificate": None, "another CA": t.certs.intruder, "expired": t.certs.expired}
    try:
        with tls_socket(t.port, t.certs.ca, cert[who]) as tls:
            tls.sendall(CONNECT)
            return read_until_closed(tls)
    except (ssl.SSLError, OSError) as e:
        return f"refused: {e}".encode()


@pytest.mark.parametrize("who", ["no certificate", "another CA", "expired", "plain TCP"])
def test_unauthenticated_refused_every_time(
    aimed: Target, who: str, record_property: Callable[[str, object], None]
) -> None:
    tally = abuse.Tally(f"TLS: {who}")
    slowest = 0.0
    for _ in range(ATTEMPTS):
        started = time.monotonic()
        answer = attempt(aimed, who)
        slowest = max(slowest, time.monotonic() - started)
        tally.sent += 1
        if b"CONNECTED" in answer:
            tally.successes += 1
        else:
            tally.closed += 1
    tally.notes["slowest refusal ms"] = round(slowest * 1000)
    tally.report(record_property)
    assert tally.closed == ATTEMPTS, f"{tally.successes} of {ATTEMPTS} got CONNECTED"
    assert slowest < 5
    assert abuse.alive(aimed)


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of these sockets the server has closed (reset or end of stream)."""
    found = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(65536)
            found += data == b"" or data.startswith(b"ERROR") or b"too many" in data
        except (BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            found += 1
    return found


def until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextlib.contextmanager
def opened(make: Callable[[], socket.socket], count: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(make())
        yield socks
    finally:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()


def served(t: Target) -> float:
    """Seconds a real engine client (stomp.py) and a Unix client take to get Host.ping2."""
    started = time.monotonic()
    with EngineClient(t.port, t.certs.ca, t.certs.engine, timeout=10) as engine:
        assert engine.call("Host.ping2") is True
    with Client(t.socket, timeout=10) as unix:
        assert unix.call("Host.ping2") is True
    return time.monotonic() - started


def test_idle_tcp_connections_bounded_others_served(
    aimed: Target, record_property: Callable[[str, object], None]
) -> None:
    """1,000 sockets that never start TLS: vnicd holds at most its handshake limit (the
    oldest dropped for the newest), an engine and a Unix client are served meanwhile, and
    the rest go after the handshake timeout."""
    tally = abuse.Tally("idle: 1,000 TCP connections that never start TLS")
    with opened(lambda: socket.create_connection(("127.0.0.1", aimed.port)), IDLE) as socks:
        tally.sent = len(socks)
        assert until(lambda: closed_by_server(socks) >= IDLE - LIMITS.handshakes, 10)
        took = served(aimed)
        held = IDLE - closed_by_server(socks)
        if abuse.LONG:
            assert until(lambda: closed_by_server(socks) == IDLE, LIMITS.connect_timeout + 5)
    tally.closed = tally.sent
    tally.notes |= {"held at most": held, "others served in ms": round(took * 1000)}
    tally.report(record_property)
    assert held <= LIMITS.handshakes and took < 5


def test_idle_tls_connections_bounded(
    aimed: Target, record_property: Callable[[str, object], None]
) -> None:
    """Authenticated clients that never CONNECT: past the connection limit each is told so
    and closed; the Unix socket is served meanwhile, and the engine wire again once vnicd
    closed the idle ones (after its CONNECT timeout)."""
    count = IDLE if abuse.LONG else 300
    tally = abuse.Tally(f"idle: {count} TLS connections that never CONNECT")
    certs = aimed.certs
    started = time.monotonic()
    with opened(lambda: tls_socket(aimed.port, certs.ca, certs.engine), count) as socks:
        tally.sent = len(socks)
        assert until(lambda: closed_by_server(socks) >= count - LIMITS.connections, 10)
        held = count - closed_by_server(socks)
        with Client(aimed.socket, timeout=10) as unix:
            assert unix.call("Host.ping2") is True
        if abuse.LONG:
            assert until(lambda: closed_by_server(socks) == count, LIMITS.connect_timeout + 5)
            tally.notes["all closed s after the first opened"] = round(
                time.monotonic() - started, 1
            )
            tally.notes["engine served again in ms"] = round(served(aimed) * 1000)
    tally.closed = tally.sent
    tally.notes["held at most"] = held
    tally.report(record_property)
    assert held <= LIMITS.connections


def test_idle_unix_connections_bounded_others_served(
    aimed: Target, record_property: Callable[[str, object], None]
) -> None:
    """1,000 idle Unix clients: vnicd keeps at most its limit, closing the idle longest for a
    new one, so a client that asks is served."""
    tally = abuse.Tally("idle: 1,000 Unix socket connections")

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(aimed.socket))
        return sock

    with opened(connect, IDLE) as socks:
        tally.sent = len(socks)
        assert until(lambda: closed_by_server(socks) >= IDLE - rpc_unix.MAX_CONNECTIONS, 10)
        took = served(aimed)
        held = IDLE - closed_by_server(socks)
    tally.closed = IDLE - held
    tally.notes |= {"held at most": held, "others served in ms": round(took * 1000)}
    tally.report(record_property)
    assert held <= rpc_unix.MAX_CONNECTIONS and took < 5


def test_busy_unix_connections_refuse_a_new_one(tmp_path: Path) -> None:
    """Every connection with a request in flight: a new one is told why and closed; an idle
    one makes room instead."""

    async def slow(message: str, _caller: Caller) -> str:
        request = json.loads(message)
        await asyncio.sleep(request["params"]["sleep"])
        return json.dumps({"jsonrpc": "2.0", "result": True, "id": request["id"]})

    def call(client: Client, sleep: float) -> Any:
        return client.call("x", sleep=sleep)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = UnixServer(tmp_path / "s.sock", slow, max_connections=1)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
            busy.settimeout(10)
            busy.connect(str(server.path))
            busy.sendall(b'{"jsonrpc": "2.0", "method": "x", "params": {"sleep": 1}, "id": 1}\n')
            time.sleep(0.3)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as refused:
                refused.settimeout(10)
                refused.connect(str(server.path))
                error = json.loads(refused.recv(4096))["error"]
                assert refused.recv(4096) == b"", "then closed"
            assert error["code"] == -32000 and "too many connections" in error["message"]
            assert b'"result": true' in busy.recv(4096)
            with Client(server.path, timeout=10) as newcomer:  # the idle one makes room
                assert call(newcomer, 0) is True
            assert busy.recv(4096) == b"", "the idle connection was closed"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def trickle(
    t: Target, data: bytes, every: float, stop: threading.Event, closed: list[float]
) -> None:
    started = time.monotonic()
    with tls_socket(t.port, t.certs.ca, t.certs.engine) as sock:
        for byte in data:
            if stop.is_set():
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(every)
        closed.append(time.monotonic() - started)


def test_trickling_clients_closed_others_served(
    aimed: Target, record_property: Callable[[str, object], None]
) -> None:
    """Twenty clients trickle a CONNECT a byte at a time: meanwhile a real engine client and a
    Unix client are served without delay; each trickler is closed at the CONNECT timeout
    (waited for in the long mode)."""
    tally = abuse.Tally("slow: 20 clients trickling a byte every 0.2 s")
    stop = threading.Event()
    closed: list[float] = []
    frame = Frame("CONNECT", {"accept-version": "1.2", "host": "x" * 200}).encode()
    threads = [
        threading.Thread(target=trickle, args=(aimed, frame, 0.2, stop, closed)) for _ in range(20)
    ]
    for thread in threads:
        thread.start()
    slowest = 0.0
    try:
        deadline = time.monotonic() + (LIMITS.connect_timeout + 5 if abuse.LONG else 3)
        while len(closed) < len(threads) and time.monotonic() < deadline:
            slowest = max(slowest, served(aimed))
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    tally.sent = len(threads)
    tally.closed = len(closed)
    tally.notes |= {
        "closed after s (max)": round(max(closed, default=0), 1),
        "others served in ms (max)": round(slowest * 1000),
    }
    tally.report(record_property)
    assert slowest < 2
    if abuse.LONG:
        assert len(closed) == len(threads) and max(closed) < LIMITS.connect_timeout + 2
