"""systemd notification, degrading to nothing where systemd is absent."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(state: str) -> None:
    if not enabled():
        return
    from systemd.daemon import notify as sd_notify

    if not sd_notify(state):
        log.warning("systemd notification failed: %s", state.splitlines()[0])


def status(text: str) -> None:
    """What vnicd is doing, as ``systemctl status`` shows it."""
    notify(f"STATUS={text}")


def watchdog_period() -> float | None:
    """systemd's watchdog period in seconds (WatchdogSec=), None when no watchdog is asked for.

    systemd sets WATCHDOG_USEC, and WATCHDOG_PID when the pings must come from one process.
    """
    if not enabled():
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1e6 if usec > 0 else None
