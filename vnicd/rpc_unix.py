"""JSON-RPC over a local Unix socket: one JSON message per line, each way.

Requests on one connection are handled concurrently; each response carries its
request's id. The socket is root-only by default. What a client may hold is bounded: a
connection with ``MAX_PENDING`` requests in flight is not read until one is answered, and
past ``MAX_CONNECTIONS`` the connection idle the longest is closed to make room (a new one
is refused when every connection has a request in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from vnicd.caller import Caller
from vnicd.streams import close_all, server_closed

log = logging.getLogger(__name__)

Handler = Callable[[str, Caller], Awaitable[str]]
MAX_MESSAGE = 16 * 1024 * 1024
READ_SIZE = 256 * 1024
MAX_PENDING = 64  # requests in flight per connection before it is read no further
MAX_CONNECTIONS = 128


def _error_line(code: int, message: str) -> bytes:
    error = {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": None}
    return json.dumps(error).encode() + b"\n"


TOO_LARGE = _error_line(-32600, f"message over {MAX_MESSAGE} bytes")


@dataclass
class _Client:
    """What the server knows of one connection: its requests in flight, when it last sent."""

    writer: asyncio.StreamWriter
    pending: set[asyncio.Task[None]] = field(default_factory=set)
    last: float = field(default_factory=time.monotonic)


class Lines:
    """Splits a byte stream into messages at newlines; I/O-free.

    A message over ``limit`` bytes is reported once as ``None`` and its bytes are
    dropped up to its own newline, so the messages after it in the same read survive.
    """

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes | None]:
        found: list[bytes | None] = []
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self._limit and not self._skipping:
                    found.append(None)
                    self._skipping = True
                if self._skipping:
                    self._buffer.clear()
                return found
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:
                self._skipping = False
            elif len(line) > self._limit:
                found.append(None)
            elif line.strip():
                found.append(line)


class UnixServer:
    def __init__(
        self, path: Path, handle: Handler, mode: int = 0o600, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.path = path
        self._handle = handle
        self._mode = mode
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._clients: dict[asyncio.StreamWriter, _Client] = {}

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self._mode)
        log.info("JSON-RPC listening on %s", self.path)

    def stop_listening(self) -> None:
        """Take no new connections; those open still get their answers."""
        if self._server is not None:
            self._server.close()
        self.path.unlink(missing_ok=True)

    async def stop(self) -> None:
        """Stop listening and close every client connection (see :func:`close_all`)."""
        self.stop_listening()
        if self._server is not None:
            await close_all(self._clients)
            await server_closed(self._server)
            self._server = None

    def _make_room(self, peer: str) -> bool:
        """Below the connection limit, or made so by closing the connection idle longest."""
        if len(self._clients) < self._max_connections:
            return True
        idle = [c for c in self._clients.values() if not c.pending]
        if not idle:
            log.warning("refused a client (%s): %d connections, all busy", peer, len(self._clients))
            return False
        oldest = min(idle, key=lambda c: c.last)
        log.warning(
            "%d connections open: closing the one idle for %.0f s to serve a new client (%s)",
            len(self._clients),
            time.monotonic() - oldest.last,
            peer,
        )
        del self._clients[oldest.writer]
        oldest.writer.close()
        return True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        caller = Caller("unix", _peer(writer))
        if not self._make_room(caller.identity):
            with contextlib.suppress(ConnectionError):
                writer.write(
                    _error_line(-32000, f"too many connections ({len(self._clients)}), all busy")
                )
                await writer.drain()
            writer.close()
            return
        client = self._clients[writer] = _Client(writer)
        lock = asyncio.Lock()
        pending = client.pending
        lines = Lines()
        try:
            while data := await reader.read(READ_SIZE):
                client.last = time.monotonic()
                for line in lines.feed(data):
                    if line is None:
                        log.warning("refused a message over %d bytes", MAX_MESSAGE)
                        async with lock:
                            writer.write(TOO_LARGE)
                        continue
                    while len(pending) >= MAX_PENDING:
                        await asyncio.wait(list(pending), return_when=asyncio.FIRST_COMPLETED)
                    task = asyncio.create_task(self._one(line, caller, writer, lock))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
        except ConnectionError as e:
            log.debug("client went away: %s", e)
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            if self._clients.get(writer) is client:
                del self._clients[writer]
            writer.close()

    async def _one(
        self, line: bytes, caller: Caller, writer: asyncio.StreamWriter, lock: asyncio.Lock
    ) -> None:
        response = await self._handle(line.decode(errors="replace"), caller)
        if not response:
            return
        async with lock:
            if writer.is_closing():
                log.warning("client closed before its response was sent: %.200s", response)
                return
            writer.write(response.encode() + b"\n")
            with contextlib.suppress(ConnectionError):
                await writer.drain()


def _peer(writer: asyncio.StreamWriter) -> str:
    """The connecting process's uid, as the kernel vouches for it (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return "uid=?"
    _pid, uid, _gid = struct.unpack("3i", creds)
    return f"uid={uid}"
