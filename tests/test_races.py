"""Races on real VMs: a VM destroyed or a bridge deleted while a change of it is in flight,
two clients changing one vNIC at once, an unplug and a plug of one vNIC at once.

Each ends with every answer clear, nothing half done (live XML, definition, stored copy,
kernel and vnicd's report agree: :func:`tests.faults.check`) and vnicd still serving.
"""

from __future__ import annotations

import collections
import logging
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests import faults
from tests.conftest import Nic, Vms
from tests.evidence import seen
from tests.faults import LONG, NicTruth
from tests.harness import DaemonThread
from tests.hostenv import ip, master
from vnicd.client import Client, RpcError
from vnicd.hypervisor import Domain
from vnicd.service import Service

Outcome = tuple[str, Any]  # ("ok", result) or ("error", RpcError)


def agreed(vnicd: DaemonThread, vm_id: str) -> dict[str, NicTruth]:
    """Every place agrees about the VM's vNICs; their state."""
    with vnicd.client() as c:
        info = c.call("VM.getInfo", vmID=vm_id)
    view = faults.view(vnicd.domain(vm_id))
    truth, problems = faults.check(view, info, faults.masters(), vnicd.config.unwired_bridge)
    assert not problems, problems
    return truth


def together(*calls: Callable[[], Any]) -> list[Outcome]:
    """Run the calls at once (each on its own connection), every outcome kept."""
    outcomes: list[Outcome | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = ("ok", calls[i]())
        except RpcError as e:
            outcomes[i] = ("error", e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in outcomes), "a call got no answer"
    return [o for o in outcomes if o is not None]


def call(vnicd: DaemonThread, method: str, **params: Any) -> Callable[[], Any]:
    def run() -> Any:
        with Client(vnicd.config.unix_socket, timeout=60) as c:
            return c.call(method, **params)

    return run


def update(vnicd: DaemonThread, vm_id: str, mac: str, **change: Any) -> Callable[[], Any]:
    params = {"deviceType": "interface", "macAddr": mac, **change}
    return call(vnicd, "VM.updateDevice", vmID=vm_id, params=params)


def in_background(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Outcome]]:
    found: list[Outcome] = []

    def run() -> None:
        try:
            found.append(("ok", fn()))
        except RpcError as e:
            found.append(("error", e))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, found


def serves(vnicd: DaemonThread) -> None:
    with vnicd.client() as c:
        assert c.call("Host.ping2") is True
        c.call("Host.getVMList")


@pytest.mark.parametrize("persistent", [False, True], ids=["transient", "persistent"])
def test_vm_destroyed_mid_update(vnicd: DaemonThread, vms: Vms, persistent: bool) -> None:
    """The VM is destroyed (through libvirt, not vnicd) while a bounced move of its vNIC is
    in its pause: the move is answered with a clear error, and what is left agrees."""
    nic = Nic("vt-a")
    vm_id = vms.create(nic, persistent=persistent)
    mover, found = in_background(update(vnicd, vm_id, nic.mac, network="vt-b", linkBounce=True))
    faults.until("the move in flight", lambda: master(nic.tap) == "vt-b", 10)
    vnicd.domain(vm_id).destroy()
    mover.join(30)
    ((kind, error),) = found
    assert kind == "error" and error.code == 56, error
    assert vm_id in error.message and nic.mac in error.message
    serves(vnicd)
    if persistent:  # stopped, defined as before the move
        assert agreed(vnicd, vm_id)[nic.mac] == NicTruth(True, "vt-a", True)
        with vnicd.client() as c:
            c.call(
                "VM.updateDevice",
                vmID=vm_id,
                params={"deviceType": "interface", "macAddr": nic.mac, "linkActive": False},
            )
        assert agreed(vnicd, vm_id)[nic.mac] == NicTruth(True, "vt-a", False)
    else:
        with pytest.raises(RpcError) as e, vnicd.client() as c:
            c.call("VM.getInfo", vmID=vm_id)
        assert e.value.code == 1


def test_bridge_deleted_mid_update(vnicd: DaemonThread, vms: Vms) -> None:
    """The target bridge is deleted while a bounced move to it is in its pause: the move
    fails with a clear error and is undone; the tap is back on its bridge, reported so."""
    bridge = f"vt-gone{threading.get_native_id() % 1000}"
    ip("link", "add", "name", bridge, "type", "bridge")
    try:
        ip("link", "set", "dev", bridge, "up")
        nic, other = Nic("vt-a"), Nic("vt-b")
        vm_id = vms.create(nic, other)
        mover, found = in_background(update(vnicd, vm_id, nic.mac, network=bridge, linkBounce=True))
        faults.until("the move in flight", lambda: master(nic.tap) == bridge, 10)
        ip("link", "del", "dev", bridge)
        mover.join(30)
        ((kind, error),) = found
        assert kind == "error" and error.code == 56, error
        assert error.data["rolledBack"] is True, error.message
        truth = agreed(vnicd, vm_id)
        assert truth[nic.mac] == NicTruth(True, "vt-a", True)
        assert truth[other.mac] == NicTruth(True, "vt-b", True)
        serves(vnicd)
    finally:
        subprocess.run(["ip", "link", "del", "dev", bridge], capture_output=True, check=False)


def test_two_clients_change_one_vnic(vnicd: DaemonThread, vms: Vms) -> None:
    """One client: network vt-a, link up; the other: vt-b, link down, at once, many times.
    The vNIC ends as one of the two asked, never a mix; each answer was true when given
    (the later answer is the final state)."""
    nic = Nic("vt-b")  # linked: a mix of the two asks is where it starts
    vm_id = vms.create(nic, persistent=True)
    asks = {("vt-a", True), ("vt-b", False)}
    finals: collections.Counter[tuple[str, bool]] = collections.Counter()
    for _ in range(60 if LONG else 15):
        outcomes = together(
            *(update(vnicd, vm_id, nic.mac, network=n, linkActive=up) for n, up in sorted(asks))
        )
        states = []
        for kind, result in outcomes:
            assert kind == "ok", result
            (got,) = [n for n in result["nics"] if n["macAddr"] == nic.mac]
            states.append((got["bridge"], got["linkActive"]))
            assert (got["bridge"], got["linkActive"]) in asks, got
        truth = agreed(vnicd, vm_id)[nic.mac]
        final = (truth.bridge, truth.link_up)
        assert final in asks and final in states, (final, states)
        finals[final] += 1
    print(f"two clients on one vNIC: final states {dict(finals)}")


def test_unplug_and_plug_at_once(vnicd: DaemonThread, vms: Vms) -> None:
    """An unplug and a plug of one vNIC at once, many times, on a stopped VM (its
    definition) and a running one (whose guest, with no OS, never releases a vNIC): each
    answered; the vNIC plugged or unplugged, and every place agrees."""
    nic, keep, spare = Nic("vt-a"), Nic("vt-b"), Nic("vt-a")
    running = vms.create(nic, keep, persistent=True)
    stopped = vms.create(spare, persistent=True)
    vnicd.domain(stopped).destroy()
    seen: collections.Counter[str] = collections.Counter()
    for vm_id, mac, rounds in ((stopped, spare.mac, 20), (running, nic.mac, 2)):
        for _ in range(rounds * (3 if LONG else 1)):
            outcomes = together(
                call(vnicd, "VM.hotunplugNic", vmID=vm_id, params={"macAddr": mac}),
                call(vnicd, "VM.hotplugNic", vmID=vm_id, params={"macAddr": mac}),
            )
            for (kind, result), verb in zip(outcomes, ("unplug", "plug"), strict=True):
                if kind == "error":
                    assert result.code in (49, 50) and result.data.get("cause"), result
                    seen[f"{verb} {result.data['cause']}"] += 1
                else:
                    seen[f"{verb} ok"] += 1
            truth = agreed(vnicd, vm_id)
            seen["plugged" if truth[mac].plugged else "unplugged"] += 1
    assert agreed(vnicd, running)[keep.mac] == NicTruth(True, "vt-b", True)
    print(f"unplug and plug at once: {dict(seen)}")


def refusing(vm_id: str, read: Callable[..., str]) -> Callable[..., str]:
    """``Domain.xml`` with libvirt refusing to read ``vm_id``'s XML (flags it does not
    know), the VM still there."""

    def xml(self: Domain, *, inactive: bool = False) -> str:
        if self.uuid == vm_id:
            return str(self._call("reading XML", self._dom.XMLDesc, 1 << 30))
        return read(self, inactive=inactive)

    return xml


def test_listing_leaves_out_only_a_vm_gone_while_read(
    vnicd: DaemonThread, vms: Vms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VM destroyed between the listing and the read of its XML is left out, the others
    are listed; a read that libvirt refuses otherwise fails the listing, naming the VM,
    rather than answering without it."""
    kept, gone = vms.create(Nic("vt-a")), vms.create(Nic("vt-a"))
    fetch, first = Service._fetch, threading.Lock()
    destroyed: list[str] = []

    def destroyed_first(self: Service, *args: Any) -> None:
        with first:  # every fetcher of the listing starts once the VM is gone
            if not destroyed:
                vnicd.domain(gone).destroy()
                destroyed.append(gone)
        fetch(self, *args)

    monkeypatch.setattr(Service, "_fetch", destroyed_first)
    with vnicd.client() as c:
        assert [vm["vmID"] for vm in c.call("Host.getVMList")] == [kept]
    assert destroyed == [gone], "destroyed after it was listed, before its XML was read"

    monkeypatch.setattr(Domain, "xml", refusing(kept, Domain.xml))
    with pytest.raises(RpcError) as e, vnicd.client() as c:
        c.call("Host.getVMList")
    assert e.value.code == 100 and kept in e.value.message, e.value
    monkeypatch.undo()
    with vnicd.client() as c:
        assert [vm["vmID"] for vm in c.call("Host.getVMList")] == [kept]


def test_listing_answers_what_changed_beside_the_xml(vnicd: DaemonThread, vms: Vms) -> None:
    """Listings in a row, the VM's XML the same: what libvirt's status and the kernel say
    now is answered (a VM paused, its tap moved to another bridge outside vnicd), and a
    change of the XML is seen at once."""
    nic = Nic("vt-a")
    vm_id = vms.create(nic)

    def listed() -> dict[str, Any]:
        with vnicd.client() as c:
            found: list[dict[str, Any]] = c.call("Host.getVMList")
        (vm,) = [vm for vm in found if vm["vmID"] == vm_id]
        return vm

    first = listed()
    assert (first["status"], first["nics"][0]["bridge"]) == ("Up", "vt-a")
    kept = vnicd.service._listed[vm_id][1]  # what its XML alone says, kept for the next
    xml = vnicd.live_xml(vm_id)
    vnicd.domain(vm_id).suspend()
    ip("link", "set", "dev", nic.tap, "master", "vt-b")
    try:
        assert vnicd.live_xml(vm_id) == xml, "libvirt's XML did not change"
        second = listed()
        assert (second["status"], second["nics"][0]["bridge"]) == ("Paused", "vt-b")
        assert vnicd.service._listed[vm_id][1] is kept, "the same XML is not parsed again"
    finally:
        ip("link", "set", "dev", nic.tap, "master", "vt-a")
        vnicd.domain(vm_id).resume()
    link = {"deviceType": "interface", "macAddr": nic.mac, "linkActive": False}
    with vnicd.client() as c:
        c.call("VM.updateDevice", vmID=vm_id, params=link)
    assert not seen(vnicd, vm_id, nic.mac).link_up
    third = listed()
    assert vnicd.service._listed[vm_id][1] is not kept, "a new XML is parsed"
    assert (third["status"], third["nics"][0]["bridge"]) == ("Up", "vt-a")
    assert third["nics"][0]["linkActive"] is False


def test_recovery_reads_again_a_vm_it_could_not_read(
    vnicd: DaemonThread, vms: Vms, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A VM whose XML libvirt refuses while every VM is looked over (at start, after a
    reconnect) is not taken as gone: it is read again under its lock, and the failure is
    told."""
    vm_id = vms.create(Nic("vt-a"))
    monkeypatch.setattr(Domain, "xml", refusing(vm_id, Domain.xml))
    with caplog.at_level(logging.ERROR, logger="vnicd.service"):
        vnicd._run(vnicd.service.reconcile_all())
    told = [r.getMessage() for r in caplog.records if r.name == "vnicd.service"]
    assert any(vm_id in m and "settling stored vNICs failed" in m for m in told), told
