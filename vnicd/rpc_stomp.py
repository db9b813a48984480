"""JSON-RPC over STOMP 1.2 on TCP, with mutual TLS: the wire oVirt's engine and vdsm-client speak.

A client CONNECTs, SUBSCRIBEs to a reply destination and SENDs requests to
``jms.topic.vdsm_requests`` with ``reply-to``; each response goes back as a MESSAGE to the
subscription this connection holds on that destination. Events go to every subscriber of
``jms.queue.events``. Requests on one connection run concurrently. A verb's failure is a
JSON-RPC error; a STOMP ERROR frame means the client broke the protocol or a limit, and
the connection is closed after it. Framing lives in :mod:`vnicd.stomp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vnicd import __version__, stomp
from vnicd.caller import Caller
from vnicd.streams import close_all, server_closed

log = logging.getLogger(__name__)

Handler = Callable[[str, Caller], Awaitable[str]]
REQUESTS = "jms.topic.vdsm_requests"
RESPONSES = "jms.topic.vdsm_responses"  # where a reply goes without reply-to (as VDSM)
EVENTS = "jms.queue.events"
FLOW_ID = "ovirtCorrelationId"
_READ_SIZE = 65536
_RDN = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


class TLSSetupError(ValueError):
    """The engine's certificate, key or CA cannot be used; the message names the key."""


@dataclass(frozen=True)
class Limits:
    """What one client may cost the daemon; past a limit it gets an error or is closed."""

    frame: stomp.Limits = field(default_factory=stomp.Limits)
    pending: int = 64  # requests in flight per connection; more get a JSON-RPC error
    subscriptions: int = 64
    connections: int = 128
    handshakes: int = 64  # TLS handshakes under way; past it the oldest is dropped
    connect_timeout: float = 10.0  # TLS handshake, then CONNECT
    frame_timeout: float = 60.0  # from a frame's first byte to its last
    min_heartbeat_ms: int = 1000  # the fastest heart-beat either side may ask for
    write_buffer: int = 64 * 1024 * 1024  # unread output before a client is dropped


def tls_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``ca_file``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    for key, path in (
        ("engine.cert_file", cert_file),
        ("engine.key_file", key_file),
        ("engine.ca_file", ca_file),
    ):
        try:
            with path.open("rb"):
                pass
        except OSError as e:
            raise TLSSetupError(f"{key}: {path}: {e.strerror}") from e
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as e:
        raise TLSSetupError(
            f"engine.cert_file/engine.key_file: {cert_file} and {key_file} are not a "
            f"matching PEM certificate and key: {e.reason or e}"
        ) from e
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except ssl.SSLError as e:
        raise TLSSetupError(f"engine.ca_file: {ca_file}: not a PEM CA certificate: {e}") from e
    return ctx


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "anonymous"
    parts = [f"{_RDN.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ",".join(parts) or "anonymous"


_LONGEST_BEAT_MS = 2**31 - 1  # 24 days; a huge one would not even make a float of seconds


def _heartbeat(value: str | None) -> tuple[int, int]:
    try:
        cx, cy = (int(v) for v in (value or "0,0").split(","))
    except ValueError:
        raise stomp.FrameError(f"heart-beat {value!r} is not 'cx,cy'") from None
    if cx < 0 or cy < 0:
        raise stomp.FrameError(f"heart-beat {value!r} is negative")
    if max(cx, cy) > _LONGEST_BEAT_MS:
        raise stomp.FrameError(f"heart-beat {str(value)[:40]!r} is over {_LONGEST_BEAT_MS} ms")
    return cx, cy


class _Close(Exception):
    """Stop serving this connection (after an ERROR frame, or DISCONNECT)."""


class _Unread(asyncio.StreamReaderProtocol):
    """Reads nothing until the connection is served: the TLS handshake, which starts on the
    serving task, must see the client's first bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
        super().connection_made(transport)


class StompServer:
    """One listening socket; the daemon starts and stops it.

    TLS is started on each accepted connection, so connections still in their handshake
    are counted too: past ``limits.handshakes`` the oldest of them is dropped, so idle
    sockets that never complete one cannot take every file descriptor nor lock clients out.
    """

    def __init__(
        self,
        address: str,
        port: int,
        handle: Handler,
        tls: ssl.SSLContext | None,
        limits: Limits = Limits(),
    ) -> None:
        self.address = address
        self.port = port
        self._handle = handle
        self._tls = tls
        self.limits = limits
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handshakes: dict[asyncio.StreamWriter, None] = {}  # oldest first

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Unread(asyncio.StreamReader(), self._client),
            host=self.address or None,
            port=self.port,
            reuse_address=True,
        )
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]
        if self._tls is None:
            log.warning(
                "engine wire on %s:%d is PLAIN TCP (engine.tls: false): no encryption, "
                "no client authentication",
                self.address or "*",
                self.port,
            )
        else:
            log.info("engine wire (STOMP over TLS) on %s:%d", self.address or "*", self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._handshakes):
            writer.transport.abort()
        connections = list(self._connections)
        serving = [t for c in connections if (t := c.stop_serving()) is not None]
        if serving:  # each ends at once: calls past their time are not waited for
            await asyncio.wait(serving)
        await close_all(c.writer for c in connections)
        await server_closed(self._server)
        self._server = None

    def publish(self, notification: str) -> None:
        """Send a JSON-RPC notification to every subscriber of the events destination."""
        body = notification.encode()
        for conn in list(self._connections):
            conn.deliver(EVENTS, body)

    async def _handshake(self, writer: asyncio.StreamWriter) -> bool:
        """Start TLS (or just reading, on plain TCP); False when the client did not make it."""
        if self._tls is None:
            writer.transport.resume_reading()  # type: ignore[attr-defined]
            return True
        if len(self._handshakes) >= self.limits.handshakes:
            oldest = next(iter(self._handshakes))
            log.warning(
                "%d TLS handshakes under way: dropping the oldest, from %s",
                len(self._handshakes),
                _peer(oldest),
            )
            del self._handshakes[oldest]
            oldest.transport.abort()
        self._handshakes[writer] = None
        plain = writer.transport
        try:
            await writer.start_tls(self._tls, ssl_handshake_timeout=self.limits.connect_timeout)
            return True
        except (OSError, TimeoutError) as e:
            log.debug("engine client %s: no TLS session: %s", _peer(writer), e)
        except AttributeError:  # Python 3.11, a client that left as its handshake ended
            writer._transport = plain  # type: ignore[attr-defined]  # the writer had none left
            log.debug("engine client %s left after its TLS handshake", _peer(writer))
        finally:
            self._handshakes.pop(writer, None)
        plain.abort()
        return False

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not await self._handshake(writer):
            return
        conn = _Connection(self, reader, writer)
        if len(self._connections) >= self.limits.connections:
            log.warning("refused %s: %d connections open", conn.peer, len(self._connections))
            await conn.refuse("too many connections")
            return
        self._connections.add(conn)
        try:
            await conn.serve()
        except asyncio.CancelledError:
            pass  # see stop_serving(): the connection's end, not this task's failure
        finally:
            self._connections.discard(conn)


class _Connection:
    def __init__(
        self, server: StompServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._server = server
        self._limits = server.limits
        self._reader = reader
        self._writer = writer
        self.peer = _peer(writer)
        self.identity = _subject(writer.get_extra_info("peercert"))
        self._parser = stomp.Parser(self._limits.frame)
        self._connected = False
        self._subscriptions: dict[str, str] = {}  # id -> destination
        self._pending: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._send_every = 0.0  # seconds; 0: no heart-beats to send
        self._expect_every = 0.0  # seconds; 0: the client sends none
        self._last_write = time.monotonic()
        self._heartbeats: asyncio.Task[None] | None = None
        self._serving: asyncio.Task[Any] | None = None
        self._dropped = False

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    async def refuse(self, reason: str) -> None:
        with contextlib.suppress(ConnectionError):
            self._writer.write(stomp.Frame("ERROR", {"message": reason}).encode())
            await asyncio.wait_for(self._writer.drain(), 1)
        self._writer.close()

    def stop_serving(self) -> asyncio.Task[Any] | None:
        """Serve the connection no more (vnicd stops after its calls had their time, or
        its peer does not read); returns the task serving it, which ends, closing it,
        without waiting for calls still running: they go on, unanswered."""
        self._dropped = True
        if self._serving is not None and self._serving is not asyncio.current_task():
            self._serving.cancel()
        return self._serving

    def abort(self) -> None:
        """Drop the connection now, with what it has not sent: its peer does not read."""
        self.stop_serving()
        self._writer.transport.abort()

    async def serve(self) -> None:
        self._serving = asyncio.current_task()
        log.info("engine client %s connected (%s)", self.peer, self.identity)
        started = time.monotonic()
        frame_started = 0.0
        try:
            while True:
                timeout = self._read_timeout(started, frame_started)
                try:
                    data = await asyncio.wait_for(self._reader.read(_READ_SIZE), timeout)
                except TimeoutError:
                    log.warning("engine client %s: too slow, closing", self.peer)
                    await self._error("timed out waiting for the client")
                if not data:
                    return
                was_partial = self._parser.partial
                try:
                    frames = self._parser.feed(data)
                except stomp.FrameError as e:
                    log.warning("engine client %s: %s", self.peer, e)
                    await self._error(str(e))
                if self._parser.partial and not (was_partial and not frames):
                    frame_started = time.monotonic()
                for frame in frames:
                    try:
                        await self._frame(frame)
                    except stomp.FrameError as e:
                        log.warning("engine client %s: %s", self.peer, e)
                        await self._error(str(e))
        except _Close:
            return
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as e:
            log.debug("engine client %s went away: %s", self.peer, e)
        finally:
            await self._finish()

    def _read_timeout(self, started: float, frame_started: float) -> float | None:
        now = time.monotonic()
        deadlines = []
        if not self._connected:
            deadlines.append(started + self._limits.connect_timeout)
        if self._parser.partial:
            deadlines.append(frame_started + self._limits.frame_timeout)
        if self._expect_every:
            deadlines.append(now + 2 * self._expect_every)
        return max(0.0, min(deadlines) - now) if deadlines else None

    async def _finish(self) -> None:
        """Close, and let requests in flight finish: a verb is never cut half-way (nor
        waited for, once the connection was dropped)."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        self._writer.close()
        if self._pending and not self._dropped:
            await asyncio.wait(list(self._pending))
        log.info("engine client %s closed", self.peer)

    async def _frame(self, frame: stomp.Frame) -> None:
        if frame.command in ("CONNECT", "STOMP"):
            await self._connect(frame)
        elif not self._connected:
            await self._error(f"{frame.command} before CONNECT")
        elif frame.command == "SEND":
            await self._send(frame)
        elif frame.command == "SUBSCRIBE":
            await self._subscribe(frame)
        elif frame.command == "UNSUBSCRIBE":
            self._subscriptions.pop(self._required(frame, "id"), None)
        elif frame.command == "DISCONNECT":
            receipt = frame.headers.get("receipt")
            if receipt is not None:
                await self._write(stomp.Frame("RECEIPT", {"receipt-id": receipt}))
            raise _Close
        else:
            await self._error(f"{frame.command} is not supported (no transactions or acks)")

    async def _connect(self, frame: stomp.Frame) -> None:
        if self._connected:
            await self._error("already connected")
        versions = frame.headers.get("accept-version", "1.0").split(",")
        if "1.2" not in versions:
            await self._error("only STOMP 1.2 is supported", {"version": "1.2"})
        cx, cy = _heartbeat(frame.headers.get("heart-beat"))
        floor = self._limits.min_heartbeat_ms
        send_ms = max(cy, floor) if cy else 0  # the client wants to hear from us
        expect_ms = max(cx, floor) if cx else 0  # the client will send us beats
        self._send_every = send_ms / 1000
        self._expect_every = expect_ms / 1000
        self._connected = True
        await self._write(
            stomp.Frame(
                "CONNECTED",
                {
                    "version": "1.2",
                    "heart-beat": f"{send_ms},{expect_ms}",
                    "server": f"vnicd/{__version__}",
                    "session": str(uuid.uuid4()),
                },
            )
        )
        if self._send_every:
            self._heartbeats = asyncio.create_task(self._send_heartbeats())

    async def _subscribe(self, frame: stomp.Frame) -> None:
        sub_id = self._required(frame, "id")
        destination = self._required(frame, "destination")
        if sub_id in self._subscriptions:
            await self._error(f"subscription id {sub_id!r} is already in use")
        if len(self._subscriptions) >= self._limits.subscriptions:
            await self._error(f"more than {self._limits.subscriptions} subscriptions")
        self._subscriptions[sub_id] = destination

    def _required(self, frame: stomp.Frame, header: str) -> str:
        value = frame.headers.get(header)
        if not value:
            raise _MissingHeader(frame.command, header)
        return value

    async def _send(self, frame: stomp.Frame) -> None:
        destination = self._required(frame, "destination")
        if destination != REQUESTS and not destination.startswith(REQUESTS + "."):
            await self._error(f"{destination!r} is not a destination vnicd serves ({REQUESTS})")
        reply_to = frame.headers.get("reply-to") or RESPONSES
        body = frame.body.decode(errors="replace")
        if len(self._pending) >= self._limits.pending:
            log.warning("engine client %s: over %d pending requests", self.peer, len(self._pending))
            busy = _busy(body, self._limits.pending)
            if busy:
                await self._reply(reply_to, busy)
            return
        caller = Caller("engine", self.identity, frame.headers.get(FLOW_ID) or None)
        task = asyncio.create_task(self._request(body, caller, reply_to))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _request(self, body: str, caller: Caller, reply_to: str) -> None:
        response = await self._server._handle(body, caller)
        if response:
            await self._reply(reply_to, response)

    async def _reply(self, destination: str, response: str) -> None:
        if not self.deliver(destination, response.encode()):
            log.warning(
                "engine client %s holds no subscription on %r; response dropped: %.200s",
                self.peer,
                destination,
                response,
            )

    def deliver(self, destination: str, body: bytes) -> bool:
        """A MESSAGE to each of this connection's subscriptions on ``destination``."""
        delivered = False
        for sub_id, dest in list(self._subscriptions.items()):
            if dest != destination:
                continue
            message = stomp.Frame(
                "MESSAGE",
                {
                    "destination": destination,
                    "subscription": sub_id,
                    "message-id": str(uuid.uuid4()),
                    "content-type": "application/json",
                },
                body,
            )
            self._write_now(message.encode())
            delivered = True
        return delivered

    def _write_now(self, data: bytes) -> None:
        if self._writer.is_closing():
            return
        transport = self._writer.transport
        if transport.get_write_buffer_size() > self._limits.write_buffer:
            log.warning("engine client %s does not read its messages; closing", self.peer)
            self.abort()
            return
        self._writer.write(data)
        self._last_write = time.monotonic()

    async def _write(self, frame: stomp.Frame) -> None:
        self._write_now(frame.encode())
        async with self._lock:
            await self._writer.drain()

    async def _send_heartbeats(self) -> None:
        """A bare EOL whenever nothing else was sent for the negotiated interval."""
        with contextlib.suppress(ConnectionError):
            while not self._writer.is_closing():
                idle = time.monotonic() - self._last_write
                if idle >= self._send_every:
                    self._write_now(stomp.HEARTBEAT)
                    idle = 0.0
                await asyncio.sleep(self._send_every - idle)

    async def _error(self, message: str, headers: dict[str, str] | None = None) -> NoReturn:
        """Tell the client what it broke, then close (STOMP: ERROR ends the connection)."""
        frame = stomp.Frame("ERROR", {"message": message, **(headers or {})}, message.encode())
        with contextlib.suppress(ConnectionError, TimeoutError):
            self._write_now(frame.encode())
            await asyncio.wait_for(self._writer.drain(), 1)
        raise _Close


class _MissingHeader(stomp.FrameError):
    def __init__(self, command: str, header: str) -> None:
        super().__init__(f"{command} without its {header!r} header")


def _busy(body: str, limit: int) -> str:
    """JSON-RPC errors for requests refused because too many are pending."""
    error = {"code": -32000, "message": f"too many requests in flight on this connection ({limit})"}
    try:
        message = json.loads(body)
    except (ValueError, RecursionError):
        message = {"id": None}
    requests = message if isinstance(message, list) else [message]
    replies = [
        {"jsonrpc": "2.0", "error": error, "id": r.get("id")}
        for r in requests
        if isinstance(r, dict) and "id" in r
    ]
    if not replies:
        return ""
    return json.dumps(replies if isinstance(message, list) else replies[0])
