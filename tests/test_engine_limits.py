"""The STOMP transport's limits and timers, on a server of its own with a test handler.

Short limits and a slow handler keep these tests fast: the transport is the same code the
daemon runs, only its numbers differ.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import pki
from tests.engine import EngineClient, read_until_closed, tls_socket
from vnicd import rpc_stomp, stomp
from vnicd.caller import Caller
from vnicd.rpc_stomp import Limits, StompServer, TLSSetupError, tls_context
from vnicd.stomp import Frame


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> pki.Pki:
    return pki.make(tmp_path_factory.mktemp("pki"))


async def slow_echo(message: str, caller: Caller) -> str:
    """Answers each request after its ``params.sleep`` seconds, with the caller's flow id."""
    request = json.loads(message)
    await asyncio.sleep(request.get("params", {}).get("sleep", 0))
    return json.dumps({"jsonrpc": "2.0", "result": caller.flow_id, "id": request["id"]})


@dataclass
class Wire:
    """A StompServer on its own event loop thread."""

    server: StompServer
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.server.port

    def publish(self, notification: str) -> None:
        self.loop.call_soon_threadsafe(self.server.publish, notification)


@contextmanager
def serving(certs: pki.Pki | None, limits: Limits) -> Iterator[Wire]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    tls = tls_context(certs.server.cert, certs.server.key, certs.ca) if certs else None
    server = StompServer("127.0.0.1", 0, slow_echo, tls, limits)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield Wire(server, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _cancel_the_rest() -> None:
    """Calls a test left running end with its loop."""
    rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def request(request_id: str, sleep: float = 0) -> str:
    return json.dumps(
        {"jsonrpc": "2.0", "method": "x", "params": {"sleep": sleep}, "id": request_id}
    )


def test_slow_verb_reaches_a_client_with_a_silence_limit(certs: pki.Pki) -> None:
    """The client drops a connection silent for 1.5x its 500 ms; a 2 s verb still arrives."""
    with serving(certs, Limits(min_heartbeat_ms=100)) as server:
        client = EngineClient(server.port, certs.ca, certs.engine, heartbeats=(0, 500))
        timeouts: list[bool] = []
        client.on_heartbeat_timeout = lambda: timeouts.append(True)
        with client:
            started = time.monotonic()
            reply = client.request(request("slow", sleep=2.0), flow_id="f1")
            assert time.monotonic() - started >= 2.0
            assert reply == {"jsonrpc": "2.0", "result": "f1", "id": "slow"}
            assert timeouts == [] and client.conn.is_connected()


def test_control_without_heartbeats_the_reply_is_lost(
    certs: pki.Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same call with vnicd's heart-beats switched off: the client gives up."""

    async def silent(_conn: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(rpc_stomp._Connection, "_send_heartbeats", silent)
    with serving(certs, Limits(min_heartbeat_ms=100)) as server:
        client = EngineClient(server.port, certs.ca, certs.engine, heartbeats=(0, 500), timeout=4)
        timeouts: list[bool] = []
        client.on_heartbeat_timeout = lambda: timeouts.append(True)
        with client, pytest.raises(queue.Empty):
            client.request(request("slow", sleep=2.0))
        assert timeouts == [True]


def test_slow_trickling_client_is_closed_others_served(certs: pki.Pki) -> None:
    with serving(certs, Limits(frame_timeout=1.0)) as server:
        slow = tls_socket(server.port, certs.ca, certs.engine)
        frame = Frame("CONNECT", {"accept-version": "1.2"}).encode()
        started = time.monotonic()
        with slow, EngineClient(server.port, certs.ca, certs.engine) as other:
            for byte in frame[:-1]:
                try:
                    slow.sendall(bytes([byte]))
                except OSError:
                    break
                time.sleep(0.1)
            answer = read_until_closed(slow)
            assert other.request(request("other"))["id"] == "other"
        assert b"ERROR" in answer and b"timed out" in answer
        assert time.monotonic() - started < 5


def test_silent_client_is_closed_before_connect(certs: pki.Pki) -> None:
    with serving(certs, Limits(connect_timeout=0.5)) as server:
        with tls_socket(server.port, certs.ca, certs.engine) as sock:
            assert b"timed out" in read_until_closed(sock, timeout=5)
        plain = socket.create_connection(("127.0.0.1", server.port))
        with plain:  # no TLS ClientHello at all: the handshake times out
            assert read_until_closed(plain, timeout=5) == b""


def test_pending_limit_answers_errors_and_keeps_the_connection(certs: pki.Pki) -> None:
    with (
        serving(certs, Limits(pending=2)) as server,
        EngineClient(server.port, certs.ca, certs.engine) as client,
    ):
        for i in range(3):
            client.send(request(f"r{i}", sleep=1.0))
        first = json.loads(client.response().body)
        assert first["id"] == "r2" and first["error"]["code"] == -32000
        later = {json.loads(client.response().body)["id"] for _ in range(2)}
        assert later == {"r0", "r1"}
        assert client.request(request("again"))["id"] == "again"


def test_connection_limit(certs: pki.Pki) -> None:
    with (
        serving(certs, Limits(connections=1)) as server,
        EngineClient(server.port, certs.ca, certs.engine) as first,
    ):
        with tls_socket(server.port, certs.ca, certs.engine) as second:
            assert b"too many connections" in read_until_closed(second)
        assert first.request(request("still"))["id"] == "still"


def test_oversized_body_closes_only_that_client(certs: pki.Pki) -> None:
    limits = Limits(frame=stomp.Limits(max_frame=4096))
    with (
        serving(certs, limits) as server,
        EngineClient(server.port, certs.ca, certs.engine) as other,
    ):
        with tls_socket(server.port, certs.ca, certs.engine) as sock:
            sock.sendall(Frame("CONNECT", {"accept-version": "1.2"}).encode())
            body = b"[" + b" " * 8192 + b"]"
            sock.sendall(Frame("SEND", {"destination": "jms.topic.vdsm_requests"}, body).encode())
            answer = read_until_closed(sock)
        assert b"ERROR" in answer and b"frame over 4096" in answer
        assert other.request(request("fine"))["id"] == "fine"


def test_plain_tcp_only_when_asked_and_with_a_warning(
    certs: pki.Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, "vnicd.rpc_stomp"),
        serving(None, Limits()) as server,
        EngineClient(server.port, None, None) as client,
    ):
        assert client.request(request("plain"))["id"] == "plain"
    assert "PLAIN TCP" in caplog.text


def test_events_reach_subscribers_only(certs: pki.Pki) -> None:
    with (
        serving(certs, Limits()) as server,
        EngineClient(server.port, certs.ca, certs.engine) as listening,
        EngineClient(server.port, certs.ca, certs.engine) as deaf,
    ):
        listening.subscribe_events()
        listening.request(request("sync"))  # SUBSCRIBE is handled before this answer
        note = {"jsonrpc": "2.0", "method": "|virt|VM_status|x", "params": {"x": {}}}
        server.publish(json.dumps(note))
        assert listening.events(timeout=1) == [note]
        assert deaf.events(timeout=0.3) == []


def test_tls_setup_errors_name_the_key(certs: pki.Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSSetupError, match=r"engine\.cert_file: .*nope\.pem: No such file"):
        tls_context(missing, certs.server.key, certs.ca)
    with pytest.raises(TLSSetupError, match=r"engine\.key_file: .*No such file"):
        tls_context(certs.server.cert, missing, certs.ca)
    with pytest.raises(TLSSetupError, match="not a matching PEM certificate and key"):
        tls_context(certs.server.cert, certs.engine.key, certs.ca)
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(TLSSetupError, match=r"engine\.ca_file"):
        tls_context(certs.server.cert, certs.server.key, garbage)
    with pytest.raises(TLSSetupError, match=r"engine\.key_file: .*Is a directory"):
        tls_context(certs.server.cert, tmp_path, certs.ca)


def test_vnicd_refuses_to_start_with_a_bad_certificate(certs: pki.Pki, tmp_path: Path) -> None:
    """The real process: exit 1 with the key named, before it opens libvirt."""
    vnicd = Path(sys.executable).with_name("vnicd")
    for cert, key, problem in (
        (tmp_path / "missing.pem", certs.server.key, "engine.cert_file: "),
        (certs.server.cert, certs.engine.key, "not a matching PEM certificate and key"),
    ):
        config = tmp_path / "vnicd.yml"
        engine = {"enabled": True, "cert_file": str(cert), "key_file": str(key)}
        engine["ca_file"] = str(certs.ca)
        state = {"state_dir": str(tmp_path / "state"), "engine": engine}
        state["rpc"] = {"unix_socket": str(tmp_path / "s.sock")}
        config.write_text(json.dumps(state))
        proc = subprocess.run(
            [str(vnicd), "--config", str(config)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == 1 and problem in proc.stderr, proc.stderr
        assert not (tmp_path / "state" / "libvirt").exists()


def test_stop_drops_connections_without_waiting_for_calls(certs: pki.Pki) -> None:
    """The daemon stops its wire after its calls had their time: a call still running then
    is not waited for, and dropping the connection is no error of the loop's."""
    loop_errors: list[dict[str, object]] = []
    with (
        serving(certs, Limits()) as server,
        EngineClient(server.port, certs.ca, certs.engine) as client,
    ):
        server.loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
        client.send(request("hung", sleep=10))
        deadline = time.monotonic() + 5
        while not any(c._pending for c in list(server.server._connections)):
            assert time.monotonic() < deadline, "the call never started"
            time.sleep(0.01)
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(server.server.stop(), server.loop).result(10)
        assert time.monotonic() - started < 5, "the 10 s call is not waited for"
        time.sleep(0.2)  # the dropped connection's task ends
    assert loop_errors == []


@pytest.mark.parametrize("beat", ["0," + "9" * 400, f"{2**31},0"])
def test_a_heartbeat_too_long_is_refused(certs: pki.Pki, beat: str) -> None:
    with serving(certs, Limits()) as server:
        with tls_socket(server.port, certs.ca, certs.engine) as sock:
            sock.sendall(Frame("CONNECT", {"accept-version": "1.2", "heart-beat": beat}).encode())
            answer = read_until_closed(sock)
        assert answer.startswith(b"ERROR\n") and b"heart-beat" in answer, answer
        with EngineClient(server.port, certs.ca, certs.engine) as other:
            assert other.request(request("fine"))["id"] == "fine"
