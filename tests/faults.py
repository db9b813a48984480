"""Helpers for fault tests: where each vNIC's state lives, read apart from vnicd, checked
for agreement; a vnicd process running this checkout; bursts of verbs with every answer kept.

A vNIC's state lives in five places: libvirt's live XML, the persistent definition, vnicd's
stored copy of unplugged vNICs (the domain's metadata, live and persistent), the kernel
(the tap's master bridge), and what vnicd reports (``VM.getInfo``). :func:`check` reads
the first four itself (lxml and pyroute2, not vnicd's code) and says where they disagree
with each other or with the fifth, and whether a link bounce's mark outlived its change.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import libvirt
from lxml import etree
from pyroute2 import IPRoute

from vnicd.client import Client, RpcError

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "urn:x-vnicd:unplugged:1"
# VNICD_ABUSE=long: more kill points, longer bursts, more rounds of each race.
LONG = os.environ.get("VNICD_ABUSE") == "long"


def launch(config: Path, log: IO[str]) -> subprocess.Popen[str]:
    """vnicd as its own process, running this checkout's code whatever the venv points at."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "vnicd", "--config", str(config)], stderr=log, text=True, env=env
    )


def remove_vms(uri: str) -> None:
    """Destroy and undefine every VM of ``uri`` (a test's own libvirtd), all at once: a
    paused VM takes libvirt seconds to destroy."""

    def remove(dom: libvirt.virDomain) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()

    with contextlib.suppress(libvirt.libvirtError):
        conn = libvirt.open(uri)
        try:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(remove, conn.listAllDomains(0)))
        finally:
            conn.close()


def wait_serving(
    sock: Path, proc: subprocess.Popen[str] | None = None, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc is None or proc.poll() is None, "vnicd exited"
        try:
            with Client(sock, timeout=10) as c:
                c.call("Host.getVMList", onlyUUID=True)
            return
        except (RpcError, OSError):
            pass
        assert time.monotonic() < deadline, f"vnicd did not serve within {timeout} s"
        time.sleep(0.05)


@dataclass(frozen=True)
class Wire:
    """How one place wires a vNIC: the bridge its source names ("" for none) and its link."""

    bridge: str
    link_up: bool


@dataclass(frozen=True)
class Stored:
    alias: str
    pending: bool
    wire: Wire


@dataclass
class VmView:
    """One VM as libvirt shows it (parsed here, independently of vnicd)."""

    uuid: str
    active: bool
    persistent: bool
    live: dict[str, tuple[Wire, str]] = field(default_factory=dict)  # mac -> wiring, tap
    saved: dict[str, Wire] = field(default_factory=dict)
    store_live: dict[str, Stored] | None = None
    store_saved: dict[str, Stored] | None = None
    bounce_marks: int = 0  # link bounce marks in vnicd's metadata, live and saved


def _wire(el: etree._Element) -> Wire:
    source = el.find("source")
    bridge = "" if source is None else str(source.get("bridge") or "")
    link = el.find("link")
    return Wire(bridge, link is None or link.get("state") != "down")


def _mac(el: etree._Element) -> str:
    mac = el.find("mac")
    assert mac is not None, "an interface without <mac>"
    return str(mac.get("address")).lower()


def _store(root: etree._Element) -> dict[str, Stored]:
    found = {}
    for el in root.iterfind(f"metadata/{{{NAMESPACE}}}vnics/{{{NAMESPACE}}}unplugged"):
        iface = el.find(f"{{{NAMESPACE}}}interface")
        assert iface is not None
        plain = copy.deepcopy(iface)  # in vnicd's namespace, as libvirt keeps metadata
        for e in plain.iter():
            if isinstance(e.tag, str) and e.tag.startswith("{"):
                e.tag = etree.QName(e).localname
        found[_mac(plain)] = Stored(
            str(el.get("alias", "")), el.get("pending") == "yes", _wire(plain)
        )
    return found


def _marks(root: etree._Element) -> int:
    return len(root.findall(f"metadata/{{{NAMESPACE}}}vnics/{{{NAMESPACE}}}bounce"))


def view(dom: libvirt.virDomain) -> VmView:
    active, persistent = bool(dom.isActive()), bool(dom.isPersistent())
    return view_xml(
        dom.UUIDString(),
        dom.XMLDesc(0) if active else None,
        dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if persistent else None,
    )


def view_xml(uuid: str, live: str | None, saved: str | None) -> VmView:
    """A VM from its live XML (None: not running) and definition (None: transient)."""
    vm = VmView(uuid, live is not None, saved is not None)
    if live is not None:
        root = etree.fromstring(live.encode())
        for el in root.iterfind("devices/interface"):
            target = el.find("target")
            vm.live[_mac(el)] = (_wire(el), "" if target is None else str(target.get("dev")))
        vm.store_live = _store(root)
        vm.bounce_marks += _marks(root)
    if saved is not None:
        root = etree.fromstring(saved.encode())
        vm.saved = {_mac(el): _wire(el) for el in root.iterfind("devices/interface")}
        vm.store_saved = _store(root)
        vm.bounce_marks += _marks(root)
    return vm


def masters() -> dict[str, str]:
    """Every device's master bridge ("" for none), as the kernel reports it."""
    with IPRoute() as ipr:
        links = list(ipr.get_links())
    names = {link["index"]: str(link.get_attr("IFLA_IFNAME")) for link in links}
    return {
        str(link.get_attr("IFLA_IFNAME")): names.get(link.get_attr("IFLA_MASTER") or 0, "")
        for link in links
    }


@dataclass(frozen=True)
class NicTruth:
    """A vNIC's agreed state: what every place says, once they agree."""

    plugged: bool
    bridge: str
    link_up: bool


def check(
    vm: VmView, info: dict[str, Any], kernel: dict[str, str], unwired: str
) -> tuple[dict[str, NicTruth], list[str]]:
    """Compare every place a VM's vNICs live; returns the agreed states and the problems."""
    problems: list[str] = []
    truth: dict[str, NicTruth] = {}
    say = problems.append
    store = vm.store_live if vm.active else vm.store_saved
    store = store or {}
    if vm.active and vm.persistent and vm.store_live != vm.store_saved:
        say(f"stored vNICs differ: live {vm.store_live}, definition {vm.store_saved}")
    if vm.bounce_marks:
        say(f"{vm.bounce_marks} link bounce mark(s) left in vnicd's metadata")
    plugged = {m: w for m, (w, _tap) in vm.live.items()} if vm.active else dict(vm.saved)
    for mac, wire in plugged.items():
        if vm.active:
            tap = vm.live[mac][1]
            if kernel.get(tap) != wire.bridge:
                say(f"{mac}: tap {tap} on {kernel.get(tap)!r}, live XML says {wire.bridge!r}")
            if vm.persistent and vm.saved.get(mac) != wire:
                say(f"{mac}: live {wire}, definition {vm.saved.get(mac)}")
        entry = store.get(mac)
        if entry is not None and not (entry.pending and vm.active):
            say(f"{mac}: plugged, and stored as unplugged ({entry})")
        truth[mac] = NicTruth(True, wire.bridge, wire.link_up)
    if vm.active and vm.persistent:
        for mac in set(vm.saved) - set(vm.live):
            say(f"{mac}: in the definition, not in the live XML")
    for mac, entry in store.items():
        if mac in plugged:
            continue
        if entry.pending:
            say(f"{mac}: a pending unplug of a vNIC the guest no longer has")
        truth[mac] = NicTruth(False, entry.wire.bridge, entry.wire.link_up)
    reported = {n["macAddr"]: n for n in info["nics"]}
    if set(reported) != set(truth):
        say(f"vnicd reports vNICs {sorted(reported)}, libvirt has {sorted(truth)}")
    for mac, nic in reported.items():
        t = truth.get(mac)
        if t is None:
            continue
        network = "" if t.bridge == unwired else t.bridge
        got = (nic["plugged"], nic["network"], nic["linkActive"])
        if got != (t.plugged, network, t.link_up):
            say(f"{mac}: vnicd reports {got}, the host has {(t.plugged, network, t.link_up)}")
        if vm.active and t.plugged and nic["bridge"] != kernel.get(vm.live[mac][1]):
            say(f"{mac}: vnicd reports bridge {nic['bridge']!r}, the kernel another")
    return truth, [f"VM {vm.uuid}: {p}" for p in problems]


def check_all(
    uri: str, sock: Path, unwired: str
) -> tuple[dict[str, dict[str, NicTruth]], list[str]]:
    """Every VM of ``uri`` checked against what vnicd reports through ``sock``."""
    kernel = masters()
    truths: dict[str, dict[str, NicTruth]] = {}
    problems: list[str] = []
    conn = libvirt.open(uri)
    try:
        with Client(sock, timeout=30) as c:
            for dom in conn.listAllDomains(0):
                vm = view(dom)
                info = c.call("VM.getInfo", vmID=vm.uuid)
                truths[vm.uuid], found = check(vm, info, kernel, unwired)
                problems += found
    finally:
        conn.close()
    return truths, problems


def promised(nic: dict[str, Any], unwired: str) -> NicTruth:
    """The state an answer of vnicd states for one vNIC, in the checker's terms."""
    network = nic["network"]
    return NicTruth(nic["plugged"], unwired if network == "" else network, nic["linkActive"])


@dataclass
class Answer:
    """One request of a burst and how it ended."""

    vm: str
    method: str
    params: dict[str, Any]
    sent: float
    received: float = 0.0
    result: Any = None
    error: RpcError | None = None
    lost: str | None = None  # the connection failed: no answer came


@dataclass
class Burst:
    """Clients sending requests, each on its own connection; every request is recorded."""

    sock: Path
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(
        self,
        plans: list[Iterator[tuple[str, str, dict[str, Any]]]],
        pause_after_error: float = 0.05,
    ) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._client, args=(p, pause_after_error), daemon=True)
            for p in plans
        ]
        for t in threads:
            t.start()
        return threads

    def _client(self, plan: Iterator[tuple[str, str, dict[str, Any]]], pause: float) -> None:
        client: Client | None = None
        try:
            for vm, method, params in plan:
                if self.stop.is_set():
                    return
                answer = Answer(vm, method, params, time.monotonic())
                with self._lock:
                    self.answers.append(answer)
                try:
                    if client is None:
                        client = Client(self.sock, timeout=60)
                    answer.result = client.call(method, vmID=vm, **params)
                except RpcError as e:
                    answer.error = e
                except (OSError, ValueError) as e:  # no answer, or a cut one
                    answer.lost = str(e)
                    _close(client)
                    client = None
                answer.received = time.monotonic()
                if answer.error is not None or answer.lost is not None:
                    time.sleep(pause)
        finally:
            _close(client)

    def done(self) -> int:
        with self._lock:
            return sum(1 for a in self.answers if a.received)


def _close(client: Client | None) -> None:
    """Close a connection whose peer may be gone (a killed vnicd)."""
    if client is not None:
        with contextlib.suppress(OSError):
            client.close()


def until(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def seeded(name: str) -> random.Random:
    """A random source whose seed is printed, so a failing run can be replayed
    (``VNICD_ABUSE_SEED``)."""
    seed = int(os.environ.get("VNICD_ABUSE_SEED", "0")) or random.randrange(1, 1 << 30)
    print(f"{name}: seed {seed} (VNICD_ABUSE_SEED={seed} replays it)")
    return random.Random(seed)
