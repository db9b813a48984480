"""The kernel's own view of taps and bridges, through iproute2.

libvirt's XML says where it believes a tap is; after a partial failure the kernel
can disagree, so wiring is confirmed here. Blocking: run off the event loop.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any


class HostNetError(Exception):
    """An iproute2 command failed."""


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HostNetError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def link(name: str) -> dict[str, Any] | None:
    """``ip -j -d link show dev NAME``, or None when there is no such device."""
    try:
        out = _ip("-j", "-d", "link", "show", "dev", name)
    except HostNetError:
        return None
    links = json.loads(out or "[]")
    return links[0] if links else None


def master(dev: str) -> str | None:
    """The bridge a device is enslaved to, as the kernel reports it."""
    info = link(dev)
    return None if info is None else info.get("master")


def bridges() -> list[str]:
    return sorted(str(d["ifname"]) for d in json.loads(_ip("-j", "link", "show", "type", "bridge")))


def is_bridge(name: str) -> bool:
    info = link(name)
    return bool(info and info.get("linkinfo", {}).get("info_kind") == "bridge")


def set_master(dev: str, bridge: str) -> None:
    _ip("link", "set", "dev", dev, "master", bridge)


def ensure_isolated_bridge(name: str) -> None:
    """A bridge with no uplink that is kept down: a tap on it reaches nothing."""
    if link(name) is None:
        _ip("link", "add", "name", name, "type", "bridge")
    elif not is_bridge(name):
        raise HostNetError(f"{name} exists and is not a bridge")
    _ip("link", "set", "dev", name, "down")


def masters() -> dict[str, str]:
    """Every enslaved device and its master, in one call."""
    return {
        str(d["ifname"]): str(d["master"])
        for d in json.loads(_ip("-j", "link", "show"))
        if "master" in d
    }
