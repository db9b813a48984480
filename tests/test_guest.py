"""What vnicd promises, proven from inside two real Linux guests whose vNICs it manages.

Guests A and B (tests/guest.py, TCG) sit on vt-a and ping each other; their serial consoles
report the NIC's carrier, PCI slot and ping results five times a second. Every change goes
through vnicd's JSON-RPC API (VM.create, VM.updateDevice, VM.destroy), only ever on B, and
every test checks that the NIC B's guest sees keeps its MAC and PCI slot all along.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import libvirt
import pytest

from tests.evidence import interfaces
from tests.guest import (
    Console,
    GuestImage,
    GuestReport,
    cmdline,
    find_image,
    guest_domain_xml,
)
from tests.harness import DaemonThread, SchemaClient
from tests.hostenv import master
from vnicd.client import RpcError

pytestmark = pytest.mark.guest

BOOT_TIMEOUT = 60.0
CHANGE_TIMEOUT = 20.0
POLL = 0.05
NO_VM = 1  # vnicd's error code for a VM that does not exist

# The guest's report on the NIC (None: the guest has no such NIC) and a guest time
# certainly later than the change (inf until the guest has one).
Check = Callable[[GuestReport | None, float], bool]
Record = Callable[[str, object], None]


@dataclass(frozen=True)
class Guest:
    """One running test guest as vnicd reports it, with its console."""

    label: str
    vm_id: str
    mac: str
    slot: str  # guest PCI address, DDDD:BB:SS.F, as vnicd reports it at creation
    console: Console

    def console_tail(self, chars: int = 6000) -> str:
        try:
            text = self.console.path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return text[-chars:]


@dataclass(frozen=True)
class Event:
    """Something a guest must report in a round printed after a mark."""

    guest: Guest
    what: str
    check: Check


def carrier(value: int) -> Check:
    return lambda r, _since: r is not None and r.carrier == value


def ping_ok(r: GuestReport | None, since: float) -> bool:
    return r is not None and r.ping_ok_after(since)


def ping_fails(r: GuestReport | None, since: float) -> bool:
    return r is not None and r.ping_failed_after(since)


def anything(r: GuestReport | None, _since: float) -> bool:
    return r is not None


def gone(r: GuestReport | None, _since: float) -> bool:
    return r is None


def guest_time_after(guest: Guest, mark: int) -> float:
    """A guest uptime certainly later than the moment ``mark`` was taken (inf if none yet).

    ``mark`` is the last round in the file at that moment; round mark+1 was printed after
    it, and the guest reads the uptime of round mark+2 one report interval (0.2 s) after
    printing round mark+1, far longer than the serial port needs to reach the file.
    """
    return next((r.uptime for r in guest.console.rounds() if r.seq >= mark + 2), float("inf"))


def wait_events(
    events: Sequence[Event], marks: Mapping[str, int], timeout: float
) -> dict[Event, float]:
    """Wait until each event is reported after its guest's mark; return when it was first seen.

    Polls all consoles together so each time (host monotonic) is that event's own. Fails
    the test with every involved guest's console tail if one does not show within timeout.
    """
    seen: dict[Event, float] = {}
    deadline = time.monotonic() + timeout
    while True:
        for event in events:
            if event in seen:
                continue
            guest, mark = event.guest, marks[event.guest.label]
            since = guest_time_after(guest, mark)
            for rnd in guest.console.rounds():
                if rnd.seq > mark and event.check(rnd.reports.get(guest.mac), since):
                    seen[event] = time.monotonic()
                    break
        if len(seen) == len(events):
            return seen
        if time.monotonic() >= deadline:
            missing = [e for e in events if e not in seen]
            consoles = "\n".join(
                f"--- console of {g.label} ({g.console.path}) ---\n{g.console_tail()}"
                for g in {e.guest.label: e.guest for e in missing}.values()
            )
            what = ", ".join(f"{e.guest.label} {e.what}" for e in missing)
            pytest.fail(f"not seen within {timeout:g} s: {what}\n{consoles}", pytrace=False)
        time.sleep(POLL)


def latest_seq(guest: Guest) -> int:
    last = guest.console.latest_round()
    return last.seq if last else 0


def pci_of(vnicd: DaemonThread, guest: Guest) -> str:
    dev = vnicd.query_pci(guest.vm_id)[nic_alias(vnicd, guest)]
    return f"0000:{dev.bus:02x}:{dev.slot:02x}.{dev.function:x}"


def nic_alias(vnicd: DaemonThread, guest: Guest) -> str:
    """The guest's vNIC's alias now: libvirt may give a re-plugged vNIC another one."""
    alias = interfaces(vnicd.live_xml(guest.vm_id))[guest.mac].find("alias")
    assert alias is not None
    return str(alias.get("name"))


def destroy(vnicd: DaemonThread, vm_id: str) -> None:
    """Destroy a VM through vnicd; one that is already gone (crashed guest) is fine."""
    with vnicd.client() as client:
        try:
            client.call("VM.destroy", vmID=vm_id, undefine=True)
        except RpcError as e:
            if e.code != NO_VM:
                raise


def boot(
    vnicd: DaemonThread,
    stack: contextlib.ExitStack,
    image: GuestImage,
    label: str,
    n: int,
    *,
    peer: int | None = None,
    persistent: bool = False,
) -> Guest:
    """Create guest n through VM.create: 10.77.0.n/24 on vt-a, pinging ``peer`` (by default
    the other of guests 1 and 2)."""
    pid = os.getpid()
    mac = f"52:54:00:{0x80 | n:02x}:{pid >> 8 & 0xFF:02x}:{pid & 0xFF:02x}"
    peer = 3 - n if peer is None else peer
    vm_id = str(uuid.uuid4())
    console = vnicd.config.state_dir / f"guest-{label}.log"
    nic = (
        f"<interface type='bridge'><mac address='{mac}'/><source bridge='vt-a'/>"
        f"<target dev='vg{pid % 100000}{label}'/><model type='virtio'/>"
        f"<rom enabled='no'/></interface>"
    )
    xml = guest_domain_xml(
        name=f"guest-{label}-{vm_id[:8]}",
        uuid=vm_id,
        domain_type="qemu",
        image=image,
        cmdline=cmdline({mac: f"10.77.0.{n}/24"}, nic_peers={mac: f"10.77.0.{peer}"}),
        console_log=console,
        nics_xml=[nic],
    )
    with vnicd.client() as client:
        info = client.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": persistent})
    stack.callback(destroy, vnicd, vm_id)
    (created,) = info["nics"]
    return Guest(label, vm_id, mac, created["pciAddress"], Console(console))


@pytest.fixture(scope="module")
def guests(vnicd: DaemonThread, record_testsuite_property: Record) -> Iterator[tuple[Guest, Guest]]:
    """Guests A and B, booted once (TCG takes seconds) and destroyed even if tests fail."""
    with contextlib.ExitStack() as stack:
        image = find_image()
        start = time.monotonic()
        a, b = boot(vnicd, stack, image, "a", 1), boot(vnicd, stack, image, "b", 2)
        events = [
            Event(g, e, check)
            for g in (a, b)
            for e, check in (("first report", anything), ("ping to its peer ok", ping_ok))
        ]
        seen = wait_events(events, {"a": 0, "b": 0}, BOOT_TIMEOUT)
        for event, when in seen.items():
            name = f"boot {event.guest.label}: {event.what}"
            record_testsuite_property(name, round(when - start, 3))
            print(f"{name} after {when - start:.2f} s (since the first VM.create call)")
        yield a, b


class Lab:
    """The two guests, the API client, and the time each change took to reach the guests."""

    def __init__(
        self, vnicd: DaemonThread, rpc: SchemaClient, guests: tuple[Guest, Guest], record: Record
    ) -> None:
        self.vnicd, self.rpc, self.record = vnicd, rpc, record
        self.a, self.b = guests
        self.returned = 0.0
        self.marks: dict[str, int] = {}
        self.started: dict[str, int] = {}
        vnicd.removed.clear()

    def update(self, guest: Guest, **params: Any) -> dict[str, Any]:
        """VM.updateDevice on the guest's vNIC; vnicd must report the same NIC, MAC and slot."""
        return self.call("VM.updateDevice", guest, deviceType="interface", **params)

    def call(self, verb: str, guest: Guest, **params: Any) -> dict[str, Any]:
        """A vNIC verb on the guest's vNIC, named by MAC (the alias is libvirt's to choose)."""
        info: dict[str, Any] = self.rpc.call(
            verb, vmID=guest.vm_id, params={"macAddr": guest.mac, **params}
        )
        self.returned = time.monotonic()
        self.marks = {g.label: latest_seq(g) for g in (self.a, self.b)}
        nics: list[dict[str, Any]] = info["nics"]
        (nic,) = nics
        assert (nic["macAddr"], nic["pciAddress"]) == (guest.mac, guest.slot), nic
        return nic

    def expect(self, *events: tuple[Guest, str, Check], record: bool = True) -> None:
        """Wait until the guests report each event after the last update; log how long it took."""
        seen = wait_events([Event(*e) for e in events], self.marks, CHANGE_TIMEOUT)
        if record:
            for event, when in seen.items():
                name = f"{event.guest.label} {event.what}"
                self.record(name, round(when - self.returned, 3))
                print(f"{name}: seen {when - self.returned:.2f} s after the API call returned")

    def check_carrier_since(self, guest: Guest, mark: int, value: int) -> None:
        """Every round after ``mark`` shows the carrier at ``value``: no dip the API hid."""
        for rnd in guest.console.rounds():
            if rnd.seq > mark:
                report = rnd.reports.get(guest.mac)
                assert report is not None and report.carrier == value, f"{guest.label}:\n{rnd}"

    def check_nic_kept(self, *, unplugged: bool = False) -> None:
        """Every round since the test started shows one NIC, same MAC, same slot as QEMU's
        (or, with ``unplugged``, that NIC or none). A is never touched: its carrier never
        dropped. Only an unplug may have removed a device."""
        self.check_carrier_since(self.a, self.started["a"], 1)
        for g in (self.a, self.b):
            rounds = [r for r in g.console.rounds() if r.seq > self.started[g.label]]
            assert rounds
            for rnd in rounds:
                if unplugged and rnd.nics == 0:
                    continue
                assert rnd.nics == 1 and list(rnd.reports) == [g.mac], f"{g.label}:\n{rnd}"
                assert rnd.reports[g.mac].slot == g.slot, f"{g.label}:\n{rnd}"
            assert pci_of(self.vnicd, g) == g.slot
            (nic,) = self.rpc.call("VM.getInfo", vmID=g.vm_id)["nics"]
            assert (nic["macAddr"], nic["pciAddress"], nic["plugged"]) == (g.mac, g.slot, True)
        if not unplugged:
            assert self.vnicd.removed == []


@pytest.fixture
def lab(
    vnicd: DaemonThread, rpc: SchemaClient, guests: tuple[Guest, Guest], record_property: Record
) -> Lab:
    """Every test starts with both guests on vt-a, linked and pinging each other."""
    made = Lab(vnicd, rpc, guests, record_property)
    for g in guests:
        made.update(g, network="vt-a", linkActive=True)
    a, b = guests
    made.expect(
        (a, "carrier 1", carrier(1)),
        (b, "carrier 1", carrier(1)),
        (a, "ping to B ok", ping_ok),
        (b, "ping to A ok", ping_ok),
        record=False,
    )
    made.started = {g.label: latest_seq(g) for g in guests}
    return made


def test_unlink_and_relink(lab: Lab) -> None:
    a, b = lab.a, lab.b
    nic = lab.update(b, linkActive=False)
    assert (nic["linkActive"], nic["network"]) == (False, "vt-a")
    lab.expect(
        (b, "carrier 0 after unlink", carrier(0)),
        (b, "ping to A fails after unlink", ping_fails),
        (a, "ping to B fails after unlink", ping_fails),
    )

    nic = lab.update(b, linkActive=True)
    assert nic["linkActive"] is True
    lab.expect(
        (b, "carrier 1 after relink", carrier(1)),
        (b, "ping to A ok after relink", ping_ok),
        (a, "ping to B ok after relink", ping_ok),
    )
    lab.check_nic_kept()


def test_move_to_other_network_and_back(lab: Lab) -> None:
    """A bridge move keeps the cable in: the guest never loses carrier, only its peer."""
    a, b = lab.a, lab.b
    nic = lab.update(b, network="vt-b")
    assert (nic["network"], nic["bridge"], nic["linkActive"]) == ("vt-b", "vt-b", True)
    lab.expect(
        (b, "ping to A fails on vt-b", ping_fails),
        (a, "ping to B fails on vt-b", ping_fails),
    )

    nic = lab.update(b, network="vt-a")
    assert (nic["network"], nic["bridge"], nic["linkActive"]) == ("vt-a", "vt-a", True)
    lab.expect(
        (b, "ping to A ok back on vt-a", ping_ok),
        (a, "ping to B ok back on vt-a", ping_ok),
    )
    lab.check_carrier_since(b, lab.started["b"], 1)
    lab.check_nic_kept()


def test_unwire_and_rewire(lab: Lab) -> None:
    a, b = lab.a, lab.b
    nic = lab.update(b, network="")
    assert (nic["network"], nic["linkActive"]) == ("", False)
    lab.expect(
        (b, "carrier 0 after unwire", carrier(0)),
        (b, "ping to A fails after unwire", ping_fails),
        (a, "ping to B fails after unwire", ping_fails),
    )

    nic = lab.update(b, network="vt-a", linkActive=True)
    assert (nic["network"], nic["bridge"], nic["linkActive"]) == ("vt-a", "vt-a", True)
    lab.expect(
        (b, "carrier 1 after rewire", carrier(1)),
        (b, "ping to A ok after rewire", ping_ok),
        (a, "ping to B ok after rewire", ping_ok),
    )
    lab.check_nic_kept()


def test_four_states(lab: Lab) -> None:
    """Every transition between plugged/unplugged and linked/unlinked, seen by B's guest.

    Unplugged, the NIC is gone from the guest, QEMU and the live XML; plugged back, it is
    at the same PCI slot with the same MAC, on the network and with the link state it was
    given while unplugged.
    """
    a, b = lab.a, lab.b
    vnicd = lab.vnicd
    slot_before = vnicd.query_pci(b.vm_id)[nic_alias(vnicd, b)]

    def unplug(link: bool) -> None:
        nic = lab.call("VM.hotunplugNic", b)
        assert (nic["plugged"], nic["linkActive"]) == (False, link)
        lab.expect((b, f"NIC gone (linked={link})", gone))
        assert b.mac not in interfaces(vnicd.live_xml(b.vm_id))
        assert not [d for d in vnicd.query_pci(b.vm_id) if d.startswith("net")]
        assert vnicd.removed and vnicd.removed[-1][0] == b.vm_id

    def plug(link: bool, network: str) -> None:
        nic = lab.call("VM.hotplugNic", b)
        assert (nic["plugged"], nic["linkActive"], nic["bridge"]) == (True, link, network)
        lab.expect((b, f"NIC back, carrier {int(link)}", carrier(int(link))))
        assert master(str(nic["tap"])) == network
        dev = vnicd.query_pci(b.vm_id)[nic_alias(vnicd, b)]
        assert (dev.slot, dev.function, dev.device) == (
            slot_before.slot,
            slot_before.function,
            slot_before.device,
        )

    unplug(link=True)  # plugged+linked -> unplugged+linked
    nic = lab.update(b, linkActive=False)  # -> unplugged+unlinked
    assert (nic["plugged"], nic["linkActive"]) == (False, False)
    plug(link=False, network="vt-a")  # -> plugged+unlinked
    lab.expect((b, "ping to A fails while unlinked", ping_fails))
    unplug(link=False)  # plugged+unlinked -> unplugged+unlinked
    nic = lab.update(b, linkActive=True, network="vt-b")  # -> unplugged+linked, moved
    assert (nic["plugged"], nic["linkActive"], nic["network"]) == (False, True, "vt-b")
    plug(link=True, network="vt-b")  # unplugged+linked -> plugged+linked
    lab.expect((b, "ping to A fails on vt-b", ping_fails))
    lab.update(b, linkActive=False)  # plugged+linked -> plugged+unlinked
    lab.expect((b, "carrier 0 after unlink", carrier(0)))
    lab.update(b, linkActive=True, network="vt-a")  # plugged+unlinked -> plugged+linked
    lab.expect(
        (b, "carrier 1 after relink", carrier(1)),
        (b, "ping to A ok after relink", ping_ok),
        (a, "ping to B ok after relink", ping_ok),
    )
    lab.check_nic_kept(unplugged=True)


def test_link_bounce_on_move(lab: Lab) -> None:
    """With linkBounce the guest sees its carrier drop and come back around a move, so it
    renews its address; without it the carrier stays up."""
    a, b = lab.a, lab.b
    mark = latest_seq(b)
    nic = lab.update(b, network="vt-b", linkBounce=True)
    assert (nic["network"], nic["bridge"], nic["linkActive"]) == ("vt-b", "vt-b", True)
    lab.expect((b, "carrier 1 after the bounce", carrier(1)), (a, "ping to B fails", ping_fails))
    carriers = [
        r.reports[b.mac].carrier for r in b.console.rounds() if r.seq > mark and b.mac in r.reports
    ]
    dropped = carriers.index(0)
    assert 1 in carriers[dropped:], f"carrier never came back: {carriers}"
    back = latest_seq(b)
    nic = lab.update(b, network="vt-a")
    lab.expect((b, "ping to A ok back on vt-a", ping_ok), (a, "ping to B ok", ping_ok))
    lab.check_carrier_since(b, back, 1)
    lab.check_nic_kept()


def test_late_release_finishes_the_unplug(
    vnicd: DaemonThread, rpc: SchemaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A guest that releases a vNIC after vnicd stopped waiting: the unplug completes,
    definition included, and a restarted VM does not bring the vNIC back."""
    with contextlib.ExitStack() as stack:
        c = boot(vnicd, stack, find_image(), "c", 3, peer=1, persistent=True)
        wait_events([Event(c, "first report", anything)], {"c": 0}, BOOT_TIMEOUT)
        monkeypatch.setattr(vnicd.service, "_unplug_timeout", 0.01)
        mark = latest_seq(c)
        with pytest.raises(RpcError) as err:
            rpc.call("VM.hotunplugNic", vmID=c.vm_id, params={"macAddr": c.mac})
        assert err.value.code == 50 and err.value.data["cause"] == "timeout"
        wait_events([Event(c, "NIC gone", gone)], {"c": mark}, CHANGE_TIMEOUT)
        dom = vnicd.domain(c.vm_id)
        deadline = time.monotonic() + CHANGE_TIMEOUT
        while c.mac in interfaces(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
            assert time.monotonic() < deadline, "the definition still holds the vNIC"
            time.sleep(POLL)
        (nic,) = rpc.call("VM.getInfo", vmID=c.vm_id)["nics"]
        assert (nic["plugged"], nic["network"], nic["pciAddress"]) == (False, "vt-a", c.slot)

        dom.destroy()
        dom.create()
        assert c.mac not in interfaces(vnicd.live_xml(c.vm_id)), "the vNIC came back"
        (nic,) = rpc.call("VM.getInfo", vmID=c.vm_id)["nics"]
        assert (nic["plugged"], nic["linkActive"]) == (False, True)
        monkeypatch.undo()
        (nic,) = rpc.call("VM.hotplugNic", vmID=c.vm_id, params={"macAddr": c.mac})["nics"]
        assert (nic["plugged"], nic["pciAddress"], nic["bridge"]) == (True, c.slot, "vt-a")
