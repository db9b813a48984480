"""JSON-RPC over a local Unix socket: one JSON message per line, each way.

Requests on one connection are handled concurrently; each response carries its
request's id. The socket is root-only by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from vnicd.caller import Caller

log = logging.getLogger(__name__)

Handler = Callable[[str, Caller], Awaitable[str]]
MAX_MESSAGE = 16 * 1024 * 1024
READ_SIZE = 256 * 1024
TOO_LARGE = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "error": {"code": -32600, "message": f"message over {MAX_MESSAGE} bytes"},
            "id": None,
        }
    ).encode()
    + b"\n"
)


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
    def __init__(self, path: Path, handle: Handler, mode: int = 0o600) -> None:
        self.path = path
        self._handle = handle
        self._mode = mode
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

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
        """Stop listening and close every client connection (whatever the Python version's
        ``wait_closed`` would wait for)."""
        self.stop_listening()
        if self._server is not None:
            for writer in list(self._clients):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        lock = asyncio.Lock()
        caller = Caller("unix", _peer(writer))
        pending: set[asyncio.Task[None]] = set()
        lines = Lines()
        try:
            while data := await reader.read(READ_SIZE):
                for line in lines.feed(data):
                    if line is None:
                        log.warning("refused a message over %d bytes", MAX_MESSAGE)
                        async with lock:
                            writer.write(TOO_LARGE)
                        continue
                    task = asyncio.create_task(self._one(line, caller, writer, lock))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
        except ConnectionError as e:
            log.debug("client went away: %s", e)
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            self._clients.discard(writer)
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
