"""The kernel's own view of taps and bridges, over rtnetlink.

libvirt's XML says where it believes a tap is; after a partial failure the kernel
can disagree, so wiring is confirmed here. Blocking: run off the event loop.

pyroute2 encodes and decodes the messages. Its synchronous ``IPRoute`` binds a
socket and an event loop to each thread that uses it and cannot release them from
another, so requests go through its plain ``IPRSocket``: each call borrows a socket
from a pool (opened on demand, so any number of worker threads run in parallel and
idle sockets are reused). Sockets belong to the network namespace the process was in
when they were opened.
"""

from __future__ import annotations

import errno
import itertools
import os
import queue
from typing import Any

from pyroute2 import IPRSocket
from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
)
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETLINK, RTM_NEWLINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_UP, ifinfmsg

Message = Any  # a decoded pyroute2 ifinfmsg


class HostNetError(Exception):
    """A netlink request failed; ``code`` is the kernel's errno, when it gave one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


_idle: queue.SimpleQueue[IPRSocket] = queue.SimpleQueue()
_seq = itertools.count(1)
_SKIP_STATS = 1 << 3  # RTEXT_FILTER_SKIP_STATS: counters are a third of each reply, unused here


def _request(what: str, msg: ifinfmsg, msg_type: int, flags: int = 0) -> list[Message]:
    """One request and its replies, on a socket no other thread uses meanwhile."""
    try:
        sock = _idle.get_nowait()
    except queue.Empty:
        sock = IPRSocket(groups=0)
    try:
        replies = _converse(sock, what, msg, msg_type, flags)
    except HostNetError:
        _idle.put(sock)  # the kernel answered in full: the socket is clean
        raise
    except BaseException as e:
        sock.close()  # left mid-conversation: never reused
        if isinstance(e, OSError):
            raise HostNetError(f"{what}: {e}", e.errno) from e
        raise
    _idle.put(sock)
    return replies


def _converse(
    sock: IPRSocket, what: str, msg: ifinfmsg, msg_type: int, flags: int
) -> list[Message]:
    """Send, and collect replies up to the kernel's ack, error or end of dump.

    A GET of one device is answered by that device alone: no ack is asked for.
    """
    single_get = msg_type == RTM_GETLINK and not flags & NLM_F_DUMP
    seq = next(_seq)
    flags |= NLM_F_REQUEST if single_get else NLM_F_REQUEST | NLM_F_ACK
    sock.put(msg, msg_type=msg_type, msg_flags=flags, msg_seq=seq)
    replies: list[Message] = []
    while True:
        for reply in sock.get():
            header = reply["header"]
            if header["sequence_number"] != seq:
                continue
            error = header.get("error")
            if isinstance(error, NetlinkError):
                raise HostNetError(f"{what}: {os.strerror(error.code)}", error.code)
            if header["type"] in (NLMSG_ERROR, NLMSG_DONE):
                return replies
            replies.append(reply)
            if single_get:
                return replies


def _ifinfmsg(attrs: list[tuple[str, Any]], index: int = 0) -> ifinfmsg:
    msg = ifinfmsg()
    msg["index"] = index
    msg["attrs"] = attrs
    return msg


def _get(name: str | None = None, index: int = 0) -> Message | None:
    """One device, by name or index; None when there is none."""
    attrs: list[tuple[str, Any]] = [("IFLA_EXT_MASK", _SKIP_STATS)]
    if name is not None:
        attrs.append(("IFLA_IFNAME", name))
    try:
        found = _request(f"get {name or index}", _ifinfmsg(attrs, index), RTM_GETLINK)
    except HostNetError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return found[0] if found else None


def _dump() -> list[Message]:
    return _request(
        "list links", _ifinfmsg([("IFLA_EXT_MASK", _SKIP_STATS)]), RTM_GETLINK, NLM_F_DUMP
    )


def _kind(msg: Message) -> str | None:
    kind = msg.get(("linkinfo", "kind"))
    return None if kind is None else str(kind)


def _master_name(msg: Message) -> str | None:
    index = msg.get("master")
    if not index:
        return None
    found = _get(index=int(index))
    return None if found is None else str(found.get("ifname"))


def link(name: str) -> dict[str, Any] | None:
    """One device as ``ip -j -d link`` names it (ifname, ifindex, master, linkinfo), or None."""
    msg = _get(name)
    if msg is None:
        return None
    info: dict[str, Any] = {"ifname": str(msg.get("ifname")), "ifindex": int(msg["index"])}
    master_name = _master_name(msg)
    if master_name is not None:
        info["master"] = master_name
    kind = _kind(msg)
    if kind is not None:
        info["linkinfo"] = {"info_kind": kind}
    return info


def master(dev: str) -> str | None:
    """The bridge a device is enslaved to, as the kernel reports it."""
    msg = _get(dev)
    return None if msg is None else _master_name(msg)


def bridges() -> list[str]:
    return sorted(str(m.get("ifname")) for m in _dump() if _kind(m) == "bridge")


def is_bridge(name: str) -> bool:
    msg = _get(name)
    return msg is not None and _kind(msg) == "bridge"


def set_master(dev: str, bridge: str) -> None:
    """Enslave ``dev`` to ``bridge``; refused before anything moves unless it is a bridge.

    (Asked to enslave to a device that cannot be a master, the kernel first releases
    ``dev`` from its current bridge and then fails.)
    """
    found = _get(bridge)
    if found is None:
        raise HostNetError(f"set {dev} master {bridge}: no device {bridge}", errno.ENODEV)
    if _kind(found) != "bridge":
        raise HostNetError(f"set {dev} master {bridge}: {bridge} is not a bridge")
    msg = _ifinfmsg([("IFLA_IFNAME", dev), ("IFLA_MASTER", int(found["index"]))])
    _request(f"set {dev} master {bridge}", msg, RTM_NEWLINK)


def ensure_isolated_bridge(name: str) -> None:
    """A bridge with no uplink that is kept down: a tap on it reaches nothing."""
    found = _get(name)
    if found is None:
        add = _ifinfmsg(
            [("IFLA_IFNAME", name), ("IFLA_LINKINFO", {"attrs": [("IFLA_INFO_KIND", "bridge")]})]
        )
        try:
            _request(f"add bridge {name}", add, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
        except HostNetError as e:
            if e.code != errno.EEXIST:  # another process may have just added it
                raise
        found = _get(name)
    if found is None or _kind(found) != "bridge":
        raise HostNetError(f"{name} exists and is not a bridge" if found else f"no bridge {name}")
    down = _ifinfmsg([], int(found["index"]))
    down["change"] = IFF_UP  # clear IFF_UP, touch no other flag
    _request(f"set {name} down", down, RTM_NEWLINK)


def masters() -> dict[str, str]:
    """Every enslaved device and its master, in one call."""
    links = _dump()
    names = {int(m["index"]): str(m.get("ifname")) for m in links}
    enslaved = ((str(m.get("ifname")), int(m.get("master") or 0)) for m in links)
    return {dev: names[index] for dev, index in enslaved if index in names}
