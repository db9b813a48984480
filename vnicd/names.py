"""Syntax of the names and addresses that reach libvirt XML or the kernel.

Checked before any XML is built, so no name can inject markup or reach a
device it should not.
"""

from __future__ import annotations

import re
import uuid

# Linux interface names: at most 15 bytes; we also keep to a portable alphabet.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,14}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# libvirt device aliases: "net0", or user aliases "ua-<anything safe>".
_ALIAS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}")


def is_ifname(name: str) -> bool:
    return bool(_IFNAME.fullmatch(name)) and name not in (".", "..")


def is_mac(mac: str) -> bool:
    return bool(_MAC.fullmatch(mac))


def normalize_mac(mac: str) -> str:
    return mac.lower()


def is_alias(alias: str) -> bool:
    return bool(_ALIAS.fullmatch(alias))


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False
