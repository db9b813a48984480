"""systemd's watchdog: pinged from the event loop, and only while vnicd is healthy.

Each ping follows a health check run on a thread of its own (a libvirt call that hangs
must not hang the loop, and must not be started twice): a wedged loop, a hung libvirt
call or a connection that is down all stop the pings, and systemd restarts vnicd. A check
that fails is tried again within a second, so a short outage (libvirtd restarting) costs
no restart: only one that lasts most of the period does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

from vnicd import sdnotify

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self, period: float, check: Callable[[], None]) -> None:
        """Check every quarter ``period`` and ping after each ``check`` (blocking; raises
        when unhealthy) that passes; after one that failed, check again after ``retry``."""
        self.interval = period / 4
        self.retry = min(1.0, period / 16)
        self._check = check
        self._probe: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._healthy = True

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="vnicd-watchdog")
        log.info("pinging systemd's watchdog every %.3g s while healthy", self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            healthy = await self._probe_once()
            if healthy:
                sdnotify.notify("WATCHDOG=1")
            await asyncio.sleep(self.interval if healthy else self.retry)

    async def _probe_once(self) -> bool:
        if self._probe is None or self._probe.done():
            self._probe = self._in_thread()
        try:
            await asyncio.wait_for(asyncio.shield(self._probe), self.interval / 2)
        except TimeoutError:
            return self._report(False, "health check still running after %.3g s", self.interval / 2)
        except Exception as e:
            return self._report(False, "health check failed: %s", e)
        return self._report(True, "healthy again")

    def _report(self, healthy: bool, message: str, *args: object) -> bool:
        if healthy != self._healthy:
            log.log(logging.INFO if healthy else logging.WARNING, "watchdog: " + message, *args)
            self._healthy = healthy
        return healthy

    def _in_thread(self) -> asyncio.Future[None]:
        """Run the check on a daemon thread: one that hangs never blocks vnicd's exit."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        # a check that ends after its waiter timed out fails unseen: no "never retrieved"
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

        def settle(error: BaseException | None) -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        def run() -> None:
            error: BaseException | None = None
            try:
                self._check()
            except Exception as e:
                error = e
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, error)

        threading.Thread(target=run, name="vnicd-watchdog-check", daemon=True).start()
        return future
