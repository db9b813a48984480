"""The watchdog's rules, as pure logic: what it reads from systemd's environment, and that a
failing or hanging health check stops the pings (without piling up checks)."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
import time

import pytest

from vnicd import sdnotify
from vnicd.watchdog import Watchdog


def test_watchdog_period_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.watchdog_period() is None, "no NOTIFY_SOCKET, no systemd to ping"
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert sdnotify.watchdog_period() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_period() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_period() is None, "pings asked of another process"
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("", "0", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_period() is None


def test_pings_only_while_healthy(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(sdnotify, "notify", sent.append)
    healthy = threading.Event()
    healthy.set()
    release = threading.Event()
    checks: list[int] = []

    def check() -> None:
        checks.append(1)
        if not healthy.is_set():
            release.wait(5)  # hangs, as a libvirt call to a stuck libvirtd would
            raise RuntimeError("libvirt does not answer")

    async def scenario() -> tuple[int, int, int, int]:
        dog = Watchdog(0.2, check)  # a check every 0.05 s
        dog.start()
        await asyncio.sleep(0.55)
        healthy_pings = len(sent)
        healthy.clear()
        await asyncio.sleep(0.1)
        hung_from, checks_from = len(sent), len(checks)
        await asyncio.sleep(0.6)
        hung_pings, hung_checks = len(sent) - hung_from, len(checks) - checks_from
        healthy.set()
        release.set()
        await asyncio.sleep(0.3)
        await dog.stop()
        return healthy_pings, hung_pings, hung_checks, len(sent) - hung_from

    healthy_pings, hung_pings, hung_checks, later = asyncio.run(scenario())
    assert healthy_pings >= 3 and set(sent) == {"WATCHDOG=1"}
    assert hung_pings == 0, "no ping while the check hangs"
    assert hung_checks <= 1, "a hanging check is waited for, not started again"
    assert later > 0, "pings resume once the check passes"


def test_one_failed_check_costs_no_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that fails once (libvirtd restarting) is tried again soon: the pings never
    leave a whole period (systemd's deadline) between them."""
    pings: list[float] = []
    monkeypatch.setattr(sdnotify, "notify", lambda _m: pings.append(time.monotonic()))
    calls: list[int] = []

    def check() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("libvirt: connection lost")

    async def scenario() -> None:
        dog = Watchdog(0.8, check)  # checks every 0.2 s, again 0.05 s after a failure
        dog.start()
        await asyncio.sleep(1.2)
        await dog.stop()

    asyncio.run(scenario())
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(calls) > 4 and gaps, (calls, pings)
    assert max(gaps) < 0.8 * 0.75, gaps  # before: the ping after the failure came 0.8 s late


def test_a_check_that_fails_after_its_wait_leaves_no_loop_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hung check that fails once nobody waits for it any more is dropped quietly, not
    logged by asyncio as an exception never retrieved."""
    monkeypatch.setattr(sdnotify, "notify", lambda _m: None)
    release = threading.Event()

    def check() -> None:
        release.wait(5)
        raise RuntimeError("libvirt: connection lost")

    async def scenario() -> list[dict[str, object]]:
        loop_errors: list[dict[str, object]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, c: loop_errors.append(c))
        dog: Watchdog | None = Watchdog(0.4, check)  # waits 0.05 s for a check
        assert dog is not None
        dog.start()
        await asyncio.sleep(0.2)
        await dog.stop()
        release.set()
        await asyncio.sleep(0.2)  # the check fails; nobody waits for it
        dog = None
        gc.collect()
        return loop_errors

    assert asyncio.run(scenario()) == []
