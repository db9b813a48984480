"""JSON-RPC over a local Unix socket: one JSON message per line, each way.

Requests on one connection are handled concurrently; each response carries its
request's id. The socket is root-only by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger(__name__)

Handler = Callable[[str], Awaitable[str]]
MAX_MESSAGE = 16 * 1024 * 1024


class UnixServer:
    def __init__(self, path: Path, handle: Handler, mode: int = 0o600) -> None:
        self.path = path
        self._handle = handle
        self._mode = mode
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_socket():
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=str(self.path), limit=MAX_MESSAGE
            )
        finally:
            os.umask(old_umask)
        os.chmod(self.path, self._mode)
        log.info("JSON-RPC listening on %s", self.path)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        lock = asyncio.Lock()
        pending: set[asyncio.Task[None]] = set()
        try:
            while line := await reader.readline():
                task = asyncio.create_task(self._one(line, writer, lock))
                pending.add(task)
                task.add_done_callback(pending.discard)
        except (asyncio.LimitOverrunError, ValueError) as e:
            log.warning("dropping client: message over %d bytes: %s", MAX_MESSAGE, e)
        except ConnectionError as e:
            log.debug("client went away: %s", e)
        finally:
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
            writer.close()

    async def _one(self, line: bytes, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
        response = await self._handle(line.decode(errors="replace"))
        if not response:
            return
        async with lock:
            if writer.is_closing():
                log.warning("client closed before its response was sent: %.200s", response)
                return
            writer.write(response.encode() + b"\n")
            await writer.drain()
