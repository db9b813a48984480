"""Who asked, under which flow id: set by a transport, read by every log line about the request.

A transport builds a :class:`Caller` for each request and hands it to the dispatcher, which
makes it current for the request's task; :class:`CallerFilter` copies it onto log records
(``flow_id``, ``caller``), so the engine's flow id follows a request through every module
without being passed around.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    transport: str  # "unix" or "engine"
    identity: str  # "uid=0" on the local socket, the certificate subject on the engine wire
    flow_id: str | None = None

    def __str__(self) -> str:
        flow = f" flow={self.flow_id}" if self.flow_id else ""
        return f"{self.transport}:{self.identity}{flow}"


LOCAL = Caller("local", "vnicd")
current: ContextVar[Caller] = ContextVar("vnicd_caller", default=LOCAL)


class CallerFilter(logging.Filter):
    """Adds ``flow_id`` and ``caller`` of the current request to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        caller = current.get()
        record.flow_id = caller.flow_id or ""
        record.caller = str(caller)
        return True
