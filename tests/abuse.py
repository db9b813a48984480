"""Shared pieces of the abuse suite: the host's fingerprint, a spy on every call that could
change the host, tallies of outcomes, raw clients for both wires, and nasty values.

The fingerprint is what an invalid request must leave as it was: every domain's live and
saved XML (vnicd's stored vNICs included, they live in its metadata) and every link of the
test namespace with its master, admin and operational state, as the kernel reports them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from pyroute2 import IPRoute

from tests import pki
from tests.conftest import Nic, Vms
from tests.engine import tls_socket
from tests.harness import DaemonThread
from vnicd import hooks, hostnet, hypervisor
from vnicd.client import Client
from vnicd.stomp import Frame, Parser

LONG = os.environ.get("VNICD_ABUSE") == "long"
TIMEOUT = 20.0  # seconds a request may take before it counts as a hang
PING = json.dumps({"jsonrpc": "2.0", "method": "Host.ping2", "params": {}, "id": "alive"})
# Codes an invalid request may get: JSON-RPC's own, and vnicd's refusals (README, Errors).
STABLE_CODES = {-32700, -32600, -32601, -32602, 1, 4, 9, 11, 44, 49, 50, 56}
IFF_UP = 1

Fingerprint = dict[str, Any]


def fingerprint(conn: libvirt.virConnect) -> Fingerprint:
    domains = {}
    for dom in conn.listAllDomains(0):
        live = dom.XMLDesc(0) if dom.isActive() else None
        saved = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else None
        domains[dom.UUIDString()] = (live, saved)
    with IPRoute() as ipr:
        found = ipr.get_links()
    names = {m["index"]: m.get_attr("IFLA_IFNAME") for m in found}
    links = {
        names[m["index"]]: (
            names.get(m.get_attr("IFLA_MASTER")),
            bool(m["flags"] & IFF_UP),
            m.get_attr("IFLA_OPERSTATE"),
        )
        for m in found
    }
    return {"domains": domains, "links": links}


def differences(before: Fingerprint, after: Fingerprint) -> list[str]:
    """What changed, in words (empty: nothing)."""
    found = []
    for kind in ("domains", "links"):
        old, new = before[kind], after[kind]
        found += [f"{kind}: {k} appeared" for k in new.keys() - old.keys()]
        found += [f"{kind}: {k} vanished" for k in old.keys() - new.keys()]
        found += [f"{kind}: {k} changed" for k in old.keys() & new.keys() if old[k] != new[k]]
    return found


# What could change the host or run a program: libvirt's changing calls, the kernel's,
# and hooks (vnicd's only command line); plus libvirt lookups by a network's name.
_SPIED: list[tuple[Any, str]] = [
    *(
        (hypervisor.Domain, name)
        for name in (
            "update_interface",
            "attach_interface",
            "detach_interface",
            "detach_alias",
            "set_metadata",
            "start",
            "destroy",
            "undefine",
        )
    ),
    (hypervisor.Hypervisor, "create"),
    (hypervisor.Hypervisor, "network_bridge"),
    (hostnet, "set_master"),
    (hostnet, "set_isolated"),
    (hostnet, "ensure_isolated_bridge"),
    (hooks.Hooks, "run"),
]


@dataclass
class Spy:
    """Counts, by name, the calls vnicd makes that could change the host, with their args."""

    calls: Counter[str] = field(default_factory=Counter)
    args: list[tuple[str, str]] = field(default_factory=list)

    def changing(self) -> int:
        return sum(n for name, n in self.calls.items() if name != "network_bridge")


@contextlib.contextmanager
def spying() -> Iterator[Spy]:
    spy = Spy()
    saved = [(owner, name, getattr(owner, name)) for owner, name in _SPIED]

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def spied(*args: Any, **kwargs: Any) -> Any:
            spy.calls[name] += 1
            spy.args.append((name, repr(args)[:300]))
            return fn(*args, **kwargs)

        return spied

    for owner, name, fn in saved:
        setattr(owner, name, wrap(name, fn))
    try:
        yield spy
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


class Problems(logging.Handler):
    """Records vnicd logs at ERROR or above: an unexpected exception in a verb is one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def problems() -> Iterator[Problems]:
    handler = Problems()
    logger = logging.getLogger("vnicd")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


@dataclass
class Tally:
    """What happened to every request sent: the figures the suite reports."""

    name: str
    sent: int = 0
    answered: int = 0  # got at least one JSON-RPC response (or STOMP frame)
    closed: int = 0  # no response: the connection was closed (e.g. a notification, STOMP ERROR)
    hangs: int = 0
    crashes: int = 0  # unexpected failures: error 100, a log at ERROR, vnicd not answering
    successes: int = 0  # read-only verbs answered with a result
    host_checks: int = 0
    host_changes: int = 0
    codes: Counter[int] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    notes: dict[str, float] = field(default_factory=dict)  # measures: slowest, most held, ...
    started: float = field(default_factory=time.monotonic)

    def code(self, response: Any) -> None:
        """Count one JSON-RPC response (or a batch of them)."""
        for r in response if isinstance(response, list) else [response]:
            if not isinstance(r, dict):
                continue
            if "error" in r:
                self.codes[r["error"]["code"]] += 1
            else:
                self.successes += 1

    def figures(self) -> dict[str, Any]:
        return {
            "suite": self.name,
            "sent": self.sent,
            "answered": self.answered,
            "closed without an answer": self.closed,
            "hangs": self.hangs,
            "crashes": self.crashes,
            "read-only successes": self.successes,
            "host checks": self.host_checks,
            "host changes": self.host_changes,
            "seconds": round(time.monotonic() - self.started, 1),
            "error codes": dict(sorted(self.codes.items())),
            "kinds": dict(sorted(self.kinds.items())),
            **self.notes,
        }

    def report(self, record: Callable[[str, object], None]) -> None:
        figures = self.figures()
        print(f"\nabuse figures: {json.dumps(figures)}")
        record(self.name, json.dumps(figures))


@dataclass(frozen=True)
class Target:
    """A vnicd with the VMs the abuse aims at (valid ids, aliases, MACs, networks)."""

    socket: Path
    port: int
    certs: pki.Pki
    nics: tuple[tuple[str, str, str], ...]  # (vm id, alias, mac)
    domains: tuple[str, ...]  # each VM's XML (its name and uuid are taken)
    networks: tuple[str, ...] = ("vt-a", "vt-b", "lab", "")
    vnicd: DaemonThread | None = None  # None: vnicd runs in another process

    @property
    def vm_ids(self) -> tuple[str, ...]:
        return tuple(sorted({vm for vm, _, _ in self.nics}))

    def fingerprint(self) -> Fingerprint:
        assert self.vnicd is not None, "the host is read through the session's vnicd"
        return fingerprint(self.vnicd.conn)

    def settled(self, timeout: float = 8.0) -> Fingerprint:
        """The host once it stops changing by itself: a bridge's operational state follows
        a new VM's tap up to a second later (the kernel's link watch runs at most once a
        second), so a fingerprint taken right after VMs started can differ from the next
        with nobody changing anything. Two reads 1.25 s apart must agree."""
        last, deadline = self.fingerprint(), time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(1.25)
            now = self.fingerprint()
            if now == last:
                return now
            last = now
        return last


def aim(sock: Path, port: int, certs: pki.Pki, vm_ids: list[str]) -> Target:
    """A target: the vNICs of these VMs, as vnicd reports them."""
    nics = []
    with Client(sock) as c:
        for vm_id in vm_ids:
            nics += [
                (vm_id, n["alias"], n["macAddr"]) for n in c.call("VM.getInfo", vmID=vm_id)["nics"]
            ]
    return Target(sock, port, certs, tuple(nics), ())


@contextlib.contextmanager
def target(vnicd: DaemonThread) -> Iterator[Target]:
    """Two running VMs (one persistent) with two vNICs each, on the test bridges."""
    vms = Vms(vnicd)
    try:
        a = vms.create(Nic("vt-a", link_up=True), Nic("vt-b", link_up=False))
        b = vms.create(Nic("vt-b"), Nic("vt-c"), persistent=True)
        found = aim(
            vnicd.config.unix_socket,
            vnicd.config.engine.port,
            pki.at(vnicd.config.engine.ca_file.parent),
            [a, b],
        )
        yield dataclasses.replace(
            found, domains=(vnicd.live_xml(a), vnicd.live_xml(b)), vnicd=vnicd
        )
    finally:
        vms.cleanup()


@pytest.fixture(scope="module")
def aimed(vnicd: DaemonThread) -> Iterator[Target]:
    with target(vnicd) as found:
        yield found


@dataclass
class Exchange:
    responses: list[Any]
    closed: bool  # the server closed the connection (always, after a half-close)
    hung: bool


def unix_exchange(path: Path, payload: bytes, timeout: float = TIMEOUT) -> Exchange:
    """Send ``payload`` on a new connection, half-close it, read every answer until vnicd
    closes: each of its lines answered, or none that needs an answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = b""
    try:
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                lines = [line for line in data.split(b"\n") if line.strip()]
                return Exchange([json.loads(line) for line in lines], True, False)
            data += chunk
    except TimeoutError:
        pass
    finally:
        sock.close()
    return Exchange([], False, True)


class RawStomp:
    """A STOMP connection below the client library: CONNECT, SUBSCRIBE, then any bytes."""

    REPLY_TO = "abuse-replies"

    def __init__(self, port: int, certs: pki.Pki) -> None:
        self.sock = tls_socket(port, certs.ca, certs.engine)
        self.parser = Parser()
        self.frames: list[Frame] = []
        self.closed = False
        self.send(Frame("CONNECT", {"accept-version": "1.2"}).encode())
        self.send(Frame("SUBSCRIBE", {"id": "s1", "destination": self.REPLY_TO}).encode())
        [connected] = self.read(lambda f: f.command == "CONNECTED", TIMEOUT)
        assert connected.command == "CONNECTED"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError):
            self.closed = True

    @classmethod
    def request(cls, body: str, destination: str = "jms.topic.vdsm_requests") -> bytes:
        """A SEND frame carrying ``body``, its answer to come to this connection."""
        headers = {"destination": destination, "reply-to": cls.REPLY_TO}
        return Frame("SEND", headers, body.encode(errors="surrogatepass")).encode()

    def read(self, until: Callable[[Frame], bool], timeout: float) -> list[Frame]:
        """Frames up to the first that ``until`` accepts, or until closed or timed out."""
        got: list[Frame] = []
        deadline = time.monotonic() + timeout
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                got.append(frame)
                if until(frame):
                    return got
            remaining = deadline - time.monotonic()
            if self.closed or remaining <= 0:
                return got
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return got
            except (OSError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                continue
            self.frames += self.parser.feed(data)


def reply_to(request_id: Any, unread: bool = False) -> Callable[[Frame], bool]:
    """A frame that answers the request with this id (or, with ``unread``, one that answers
    a request that could not be read: id null), or an ERROR."""

    def match(frame: Frame) -> bool:
        if frame.command == "ERROR":
            return True
        if frame.command != "MESSAGE":
            return False
        body = json.loads(frame.body)
        replies = body if isinstance(body, list) else [body]
        ids = {r.get("id") for r in replies if isinstance(r, dict)}
        return request_id in ids or (unread and None in ids)

    return match


def alive(t: Target) -> bool:
    """vnicd answers Host.ping2 on both wires."""
    unix = unix_exchange(t.socket, PING.encode() + b"\n")
    if unix.responses != [{"jsonrpc": "2.0", "result": True, "id": "alive"}]:
        return False
    stomp = RawStomp(t.port, t.certs)
    try:
        stomp.send(stomp.request(PING))
        frames = stomp.read(reply_to("alive"), TIMEOUT)
        return bool(frames) and json.loads(frames[-1].body)["result"] is True
    finally:
        stomp.close()


def new_uuid() -> str:
    return str(uuid.uuid4())


# Values every name field (network, bridge, alias, MAC) must refuse: markup, quotes, paths,
# shell, control characters, too long for any of them.
NASTY_NAMES = [
    "a'/><x",
    "net0'/><source bridge='vt-b",
    '"><script>',
    "<source bridge='vt-b'/>",
    "]]><x/>",
    "<!--",
    "&amp;",
    "&lt;x&gt;",
    "..",
    ".",
    "../vt-b",
    "../../etc/passwd",
    "/dev/net/tun",
    "vt-a/../vt-b",
    "$(reboot)",
    "`id`",
    "a;rm -rf /",
    "a|b",
    "a&&b",
    "a>b",
    "${IFS}",
    "-rf",
    "--help",
    "*",
    "?",
    "~root",
    "%s%n",
    "\\",
    "'",
    '"',
    " ",
    "vt-a ",
    " vt-a",
    "vt\ta",
    "vt-a\n",
    "vt\x00a",
    "vt-\u00e4",
    "\u202evt-a",
    "vt-a\ud800",
    "x" * 65,
    "ua-" + "x" * 70,
    "x" * 4096,
    "52:54:00:7e:00:01'",
    "52:54:00:7e:00:01;",
    "52:54:00:7e:00:0g",
    "52 54 00 7e 00 01",
    "52:54:00:7e:00:01:02",
    "525400:7e:00:01",
]
