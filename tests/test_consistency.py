"""Answers that are always true, on real VMs: each test reproduces a way vnicd once lied
or drifted from the host, and proves it where it happens (live XML, kernel, definition)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from typing import Any

import libvirt
import pytest

from tests.conftest import Nic, Vms, vm_xml
from tests.evidence import interfaces, pci_of, seen
from tests.harness import DaemonThread, SchemaClient, injected
from vnicd.client import RpcError
from vnicd.hypervisor import Domain, HypervisorError
from vnicd.rpc_unix import MAX_MESSAGE
from vnicd.unplugged import KEY, NAMESPACE

INACTIVE = libvirt.VIR_DOMAIN_XML_INACTIVE


def update(rpc: SchemaClient, vm_id: str, **params: Any) -> Any:
    return rpc.call("VM.updateDevice", vmID=vm_id, params={"deviceType": "interface", **params})


def test_oversized_message_then_valid_request_in_one_write(vnicd: DaemonThread) -> None:
    ping = json.dumps({"jsonrpc": "2.0", "method": "Host.ping2", "params": {}, "id": 7})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(vnicd.config.unix_socket))
        s.sendall(b"x" * (MAX_MESSAGE + 10) + b"\n" + ping.encode() + b"\n")
        replies = []
        with s.makefile("rb") as f:
            for _ in range(2):
                replies.append(json.loads(f.readline()))
    assert replies[0]["error"]["code"] == -32600
    assert replies[1] == {"jsonrpc": "2.0", "result": True, "id": 7}


def test_malformed_metadata_changes_nothing(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    nic, other = Nic("vt-a"), Nic("vt-a")
    vm_id, healthy = vms.create(nic), vms.create(other)
    vnicd.domain(vm_id).setMetadata(
        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
        "<vnics><unplugged alias='x'/></vnics>",
        KEY,
        NAMESPACE,
        libvirt.VIR_DOMAIN_AFFECT_LIVE,
    )
    before = seen(vnicd, vm_id, nic.mac)
    with pytest.raises(RpcError) as err:
        update(rpc, vm_id, macAddr=nic.mac, linkActive=False, network="vt-b")
    assert err.value.code == 100 and "malformed" in err.value.message
    assert seen(vnicd, vm_id, nic.mac) == before
    listed = {vm["vmID"]: vm for vm in rpc.call("Host.getVMList")}
    assert {vm_id, healthy} <= set(listed), "one VM's bad metadata hides no VM"
    assert [n["macAddr"] for n in listed[vm_id]["nics"]] == [nic.mac]
    update(rpc, healthy, macAddr=other.mac, linkActive=False)
    assert not seen(vnicd, healthy, other.mac).link_up


def _unplug_in_background(
    vnicd: DaemonThread, vm_id: str, results: dict[str, Any]
) -> threading.Thread:
    def run() -> None:
        start = time.monotonic()
        try:
            with vnicd.client() as c:
                c.call("VM.hotunplugNic", vmID=vm_id, params={"alias": "net0"})
        except RpcError as e:
            results[vm_id] = (e, time.monotonic() - start)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_pending(vnicd: DaemonThread, count: int) -> None:
    deadline = time.monotonic() + 30
    while len(vnicd.service.waiting._waiting) < count:
        assert time.monotonic() < deadline, "the unplugs never reached the guest"
        time.sleep(0.01)


def test_waiting_guests_hold_no_worker(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    """As many unplugs as there are workers wait for guests that never answer; a change of
    another VM is done while they all still wait, and each ends at the configured timeout."""
    workers = vnicd.config.workers
    waiting = [vms.create(Nic("vt-a")) for _ in range(workers)]
    nic = Nic("vt-a")
    other = vms.create(nic)
    results: dict[str, Any] = {}
    threads = [_unplug_in_background(vnicd, vm_id, results) for vm_id in waiting]
    _wait_pending(vnicd, workers)
    update(rpc, other, macAddr=nic.mac, linkActive=False, network="vt-b")
    assert all(t.is_alive() for t in threads), "the change was not done while they waited"
    got = seen(vnicd, other, nic.mac)
    assert (got.link_up, got.kernel_bridge) == (False, "vt-b")
    for t in threads:
        t.join(60)
    timeout = vnicd.config.unplug_timeout
    for vm_id in waiting:
        error, took = results[vm_id]
        assert error.code == 50 and error.data["cause"] == "timeout", error
        assert took < timeout + 2.5, f"an unplug took {took:.1f} s for a {timeout:g} s timeout"


def test_reads_do_not_wait_for_a_change(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    results: dict[str, Any] = {}
    thread = _unplug_in_background(vnicd, vm_id, results)
    _wait_pending(vnicd, 1)
    (info,) = rpc.call("VM.getInfo", vmID=vm_id)["nics"]
    listed = {vm["vmID"]: vm for vm in rpc.call("Host.getVMList")}[vm_id]["nics"]
    assert thread.is_alive(), "the read waited for the unplug"
    assert info["plugged"] is True and info["macAddr"] == nic.mac
    assert listed[0]["plugged"] is True
    thread.join(60)
    assert results[vm_id][0].data["cause"] == "timeout"


def test_lock_table_does_not_grow(vnicd: DaemonThread, rpc: SchemaClient) -> None:
    for _ in range(200):
        vm_id = str(uuid.uuid4())
        with pytest.raises(RpcError) as err:
            rpc.call("VM.getInfo", vmID=vm_id)
        assert err.value.code == 1
        with pytest.raises(RpcError) as err:
            update(rpc, vm_id, alias="net0", linkActive=False)
        assert err.value.code == 1
    assert len(vnicd.service.locks) == 0


def test_vnic_on_no_network_is_reported_as_such(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    vm_id = str(uuid.uuid4())
    mac, tap = "52:54:00:7f:00:01", f"vte{vm_id[:8]}"
    ethernet = (
        f"<interface type='ethernet'><mac address='{mac}'/><target dev='{tap}'/>"
        "<model type='virtio'/></interface>"
    )
    rpc.call(
        "VM.create", vmID=vm_id, vmParams={"xml": vm_xml(f"eth-{vm_id[:8]}", vm_id, [], ethernet)}
    )
    vms.created.append(vm_id)
    (nic,) = rpc.call("VM.getInfo", vmID=vm_id)["nics"]
    assert (nic["sourceType"], nic["network"], nic["linkActive"]) == ("ethernet", None, True)
    before = interfaces(vnicd.live_xml(vm_id))[mac]
    with pytest.raises(RpcError) as err:
        update(rpc, vm_id, macAddr=mac, network="vt-b")
    assert err.value.code == 56 and err.value.data["reason"] == "unsupportedChange"
    assert err.value.data["field"] == "params.network"
    after = interfaces(vnicd.live_xml(vm_id))[mac]
    assert after.get("type") == "ethernet" and after.find("source") == before.find("source")
    (nic,) = update(rpc, vm_id, macAddr=mac, linkActive=False)["nics"]
    assert nic["linkActive"] is False
    link = interfaces(vnicd.live_xml(vm_id))[mac].find("link")
    assert link is not None and link.get("state") == "down"


def test_plug_that_worked_is_reported_done(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removing the stored copy after a plug fails: the plug happened, and is reported so."""
    a, b = Nic("vt-a"), Nic("vt-b")
    vm_id = vms.create(a, b, persistent=True)
    dom = vnicd.domain(vm_id)
    dom.destroy()
    rpc.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": b.mac})
    slot = pci_of(interfaces(dom.XMLDesc(INACTIVE))[a.mac])
    dom.create()

    def broken(self: Domain, *_a: Any, **_k: Any) -> None:
        raise HypervisorError("writing metadata", injected("injected"))

    monkeypatch.setattr(Domain, "set_metadata", broken)
    info = rpc.call("VM.hotplugNic", vmID=vm_id, params={"macAddr": b.mac})
    (nic,) = [n for n in info["nics"] if n["macAddr"] == b.mac]
    assert nic["plugged"] is True
    got = seen(vnicd, vm_id, b.mac)
    assert got.kernel_bridge == "vt-b" and pci_of(interfaces(dom.XMLDesc(INACTIVE))[a.mac]) == slot
    assert b.mac in interfaces(dom.XMLDesc(INACTIVE)), "the definition has it too"
    monkeypatch.undo()
    (again,) = [n for n in rpc.call("VM.getInfo", vmID=vm_id)["nics"] if n["macAddr"] == b.mac]
    assert again["plugged"] is True


def test_failed_create_keeps_its_cause(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm_id, xml = vms.xml(Nic("vt-nosuch"))
    vms.created.append(vm_id)

    def broken(self: Domain) -> None:
        raise HypervisorError("undefining", injected("injected undefine failure"))

    monkeypatch.setattr(Domain, "undefine", broken)
    with pytest.raises(RpcError) as err:
        rpc.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
    assert err.value.code == 9
    assert "vt-nosuch" in err.value.message, "libvirt's reason for the failed start"
    assert "and undefining it failed too" in err.value.message


def test_dry_run_changes_nothing(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic, persistent=True)
    dom = vnicd.domain(vm_id)
    before, saved = seen(vnicd, vm_id, nic.mac), dom.XMLDesc(INACTIVE)
    plan = update(rpc, vm_id, macAddr=nic.mac, network="vt-b", linkActive=False, dryRun=True)
    assert plan["dryRun"] is True and plan["action"] == "update"
    assert (plan["before"]["network"], plan["after"]["network"]) == ("vt-a", "vt-b")
    assert (
        plan["after"]["linkActive"] is False
        and plan["after"]["pciAddress"] == plan["before"]["pciAddress"]
    )
    assert "vt-b" in plan["liveXML"] and 'state="down"' in plan["liveXML"]
    assert "vt-b" in plan["definitionXML"] and "alias" not in plan["definitionXML"]
    unplug = rpc.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": nic.mac, "dryRun": True})
    assert unplug["after"]["plugged"] is False and len(unplug["steps"]) == 4
    with pytest.raises(RpcError) as err:
        rpc.call("VM.hotplugNic", vmID=vm_id, params={"macAddr": nic.mac, "dryRun": True})
    assert err.value.data["cause"] == "alreadyPlugged", "a dry run refuses what the real one would"
    assert seen(vnicd, vm_id, nic.mac) == before
    assert dom.XMLDesc(INACTIVE) == saved


@pytest.mark.parametrize("bounce", [False, True], ids=["move", "bounced move"])
def test_change_cut_by_cancelling_its_task_ends_whole(
    vnicd: DaemonThread, vms: Vms, bounce: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A change's task cancelled, and cancelled again, once its worker has begun it: the
    change is still carried to its end (a bounced move through its pause, link up again on
    the new bridge), audited, and the VM is no longer answered as it was before it."""
    from vnicd.model import NicChange, NicRef
    from vnicd.service import UpdateNic

    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    service = vnicd.service
    change = NicChange(link_up=None if bounce else False, network="vt-b")
    request = UpdateNic(vm_id, NicRef(mac=nic.mac), change, bounce=bounce)

    async def cut() -> tuple[bool, bool]:
        task = asyncio.ensure_future(service.update_device(request))
        while vm_id not in service._before and not task.done():
            await asyncio.sleep(0)  # the worker marks the change begun before its first step
        begun = not task.done()
        task.cancel()
        await asyncio.sleep(0.2)  # a bounce is in its pause by now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return begun, task.cancelled()

    with caplog.at_level(logging.INFO, logger="vnicd.audit"):
        begun, cancelled = vnicd._run(cut())
    assert begun, "the change ended before it could be cut"
    assert cancelled, "the task ends cancelled"
    assert vm_id not in service._before, "the change is still marked in flight"
    got = seen(vnicd, vm_id, nic.mac)
    assert (got.link_up, got.kernel_bridge) == (bounce, "vt-b"), "carried to its end"
    with vnicd.client() as rpc:
        (info,) = rpc.call("VM.getInfo", vmID=vm_id)["nics"]
    assert (info["linkActive"], info["bridge"]) == (bounce, "vt-b")
    audits = [r.getMessage() for r in caplog.records if r.name == "vnicd.audit"]
    assert any(vm_id in line and "network=vt-b" in line for line in audits), audits
