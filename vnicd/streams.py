"""Closing a server's stream connections when vnicd stops, whatever the peers do."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

CLOSE_GRACE = 1.0  # seconds a stopping vnicd leaves its peers to read what they were sent


async def close_all(writers: Iterable[asyncio.StreamWriter]) -> None:
    """Close each connection, sending what it holds; one whose peer has not read it all
    within ``CLOSE_GRACE`` is dropped (a peer that never reads would hold it open, and from
    Python 3.12 the server's ``wait_closed`` waits for it)."""
    closing = list(writers)
    for writer in closing:
        writer.close()
    if not closing:
        return
    ended = asyncio.gather(*(w.wait_closed() for w in closing), return_exceptions=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(ended, CLOSE_GRACE)
    for writer in closing:
        writer.transport.abort()


async def server_closed(server: asyncio.AbstractServer) -> None:
    """``server.wait_closed()``, bounded: a connection nobody tracks (refused, evicted)
    whose peer does not read must not hold the stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), CLOSE_GRACE)
