"""libvirt's event loop on vnicd's asyncio loop, safe for libvirt's own threads.

libvirtaio starts and stops its timers with ``asyncio.ensure_future`` and ``cancel``.
libvirt calls those hooks from its worker threads too (the QEMU driver queues an event
from the thread that handled QEMU's message), and from there they neither wake the loop
nor are thread-safe: a guest's DEVICE_REMOVED then waits until something else wakes the
loop. Here every hook called off the loop's thread is handed to the loop with
``call_soon_threadsafe``, in order; ids are still returned at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

import libvirt
import libvirtaio

log = logging.getLogger(__name__)

_current: EventLoop | None = None


class EventLoop(libvirtaio.virEventAsyncIOImpl):  # type: ignore[misc]
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self._thread = threading.get_ident()
        loop.call_soon_threadsafe(self._bind)

    def _bind(self) -> None:
        self._thread = threading.get_ident()

    def _elsewhere(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Hand ``fn(*args)`` to the loop when called off its thread; True if handed."""
        if threading.get_ident() == self._thread:
            return False
        self.loop.call_soon_threadsafe(_quietly, fn, *args)
        return True

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        if threading.get_ident() == self._thread:
            return int(super()._add_handle(fd, event, cb, opaque))
        watch = int(super()._add_handle(fd, 0, cb, opaque))
        self.loop.call_soon_threadsafe(_quietly, super()._update_handle, watch, event)
        return watch

    def _update_handle(self, watch: int, event: int) -> None:
        if not self._elsewhere(super()._update_handle, watch, event):
            super()._update_handle(watch, event)

    def _remove_handle(self, watch: int) -> int:
        if self._elsewhere(super()._remove_handle, watch):
            return 0
        return int(super()._remove_handle(watch))

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        if threading.get_ident() == self._thread:
            return int(super()._add_timeout(timeout, cb, opaque))
        timer = int(super()._add_timeout(-1, cb, opaque))
        self.loop.call_soon_threadsafe(_quietly, super()._update_timeout, timer, timeout)
        return timer

    def _update_timeout(self, timer: int, timeout: int) -> None:
        if not self._elsewhere(super()._update_timeout, timer, timeout):
            super()._update_timeout(timer, timeout)

    def _remove_timeout(self, timer: int) -> int:
        if self._elsewhere(super()._remove_timeout, timer):
            return 0
        return int(super()._remove_timeout(timer))


def _quietly(fn: Callable[..., Any], *args: Any) -> None:
    """A handed-over call for a handle or timer the loop removed meanwhile is moot."""
    try:
        fn(*args)
    except KeyError:
        log.debug("libvirt event hook %s%r: already removed", fn.__name__, args)


def register(loop: asyncio.AbstractEventLoop) -> EventLoop:
    """Register once per process; libvirt's loop stays bound to that asyncio loop."""
    global _current
    if _current is None:
        _current = EventLoop(loop)
        libvirt.virEventRegisterImpl(
            _current._add_handle,
            _current._update_handle,
            _current._remove_handle,
            _current._add_timeout,
            _current._update_timeout,
            _current._remove_timeout,
        )
    elif _current.loop is not loop:
        raise RuntimeError("libvirt's event loop is bound to another asyncio loop")
    return _current
