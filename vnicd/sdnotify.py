"""systemd notification, degrading to nothing where systemd is absent."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def notify(state: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    from systemd.daemon import notify as sd_notify

    if not sd_notify(state):
        log.warning("systemd notification failed: %s", state.splitlines()[0])
