"""Host.bulkUpdateNics on real VMs: every matching vNIC changed, each all-or-nothing, the
rest untouched, proven in the kernel and the live XML."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import Nic, Vms
from tests.evidence import interfaces, seen
from tests.harness import DaemonThread, SchemaClient, injected
from vnicd.hypervisor import Domain, HypervisorError


def bulk(rpc: SchemaClient, **params: Any) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = rpc.call("Host.bulkUpdateNics", **params)["results"]
    return results


def test_every_vnic_on_a_network(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    pairs = [(Nic("vt-a"), Nic("vt-b")) for _ in range(3)]
    vm_ids = [vms.create(a, b) for a, b in pairs]
    on_a = {a.mac for a, _b in pairs}
    before_b = {b.mac: seen(vnicd, vm, b.mac) for vm, (_a, b) in zip(vm_ids, pairs, strict=True)}

    plans = bulk(rpc, match={"network": "vt-a"}, change={"linkActive": False}, dryRun=True)
    assert {r["macAddr"] for r in plans} >= on_a and all(r["plan"]["dryRun"] for r in plans)
    assert all(seen(vnicd, vm, a.mac).link_up for vm, (a, _b) in zip(vm_ids, pairs, strict=True))

    done = bulk(rpc, match={"network": "vt-a", "vmIDs": vm_ids}, change={"linkActive": False})
    assert {r["macAddr"] for r in done} == on_a and all(r["ok"] for r in done), done
    moved = bulk(rpc, match={"network": "vt-a", "vmIDs": vm_ids}, change={"network": "vt-c"})
    assert all(r["ok"] and r["nic"]["network"] == "lab" for r in moved), moved
    for vm, (a, b) in zip(vm_ids, pairs, strict=True):
        got = seen(vnicd, vm, a.mac)
        assert (got.kernel_bridge, got.link_up) == ("vt-c", False), "link kept down on the move"
        assert seen(vnicd, vm, b.mac) == before_b[b.mac], "a vNIC on another network changed"


def test_each_vnic_has_its_own_outcome(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    linked, unwired = Nic("vt-a", link_up=False), Nic("vt-a")
    vm_id = vms.create(linked, unwired)
    rpc.call(
        "VM.updateDevice",
        vmID=vm_id,
        params={"deviceType": "interface", "macAddr": unwired.mac, "network": ""},
    )
    missing = str(uuid.uuid4())
    results = bulk(rpc, match={"vmIDs": [vm_id, missing]}, change={"linkActive": True})
    by_mac = {r["macAddr"]: r for r in results if r["vmID"] == vm_id}
    assert by_mac[linked.mac]["ok"] and by_mac[linked.mac]["nic"]["linkActive"] is True
    refused = by_mac[unwired.mac]
    assert not refused["ok"] and refused["error"]["data"]["reason"] == "unsupportedChange"
    assert refused["error"]["data"]["field"] == "change.linkActive", "where the call put it"
    (gone,) = [r for r in results if r["vmID"] == missing]
    assert not gone["ok"] and gone["error"]["code"] == 1
    assert seen(vnicd, vm_id, linked.mac).link_up
    assert not seen(vnicd, vm_id, unwired.mac).link_up


def test_one_hold_per_vm_chains_its_vnics(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    """A VM's vNICs change one after the other on one read: after a refused one the VM is
    read again, else each next one is planned on what the last confirmation read; the
    definition follows every one."""
    unwired, a, b = Nic("vt-a"), Nic("vt-a", link_up=False), Nic("vt-a", link_up=False)
    vm_id = vms.create(unwired, a, b, persistent=True)
    rpc.call(
        "VM.updateDevice",
        vmID=vm_id,
        params={"deviceType": "interface", "macAddr": unwired.mac, "network": ""},
    )
    linked = bulk(rpc, match={"vmIDs": [vm_id]}, change={"linkActive": True})
    assert [r["macAddr"] for r in linked] == [unwired.mac, a.mac, b.mac], "in the VM's order"
    assert [r["ok"] for r in linked] == [False, True, True], linked
    moved = bulk(rpc, match={"vmIDs": [vm_id]}, change={"network": "vt-c"})
    assert all(r["ok"] for r in moved), moved
    saved = interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))  # VIR_DOMAIN_XML_INACTIVE
    for nic in (unwired, a, b):
        got = seen(vnicd, vm_id, nic.mac)
        assert (got.kernel_bridge, got.source) == ("vt-c", "vt-c"), got
        assert got.link_up is (nic is not unwired)
        saved_nic = saved[nic.mac]
        assert saved_nic.find("source").get("bridge") == "vt-c"  # type: ignore[union-attr]
        link = saved_nic.find("link")
        assert (link is not None and link.get("state") == "down") is (nic is unwired)


def test_a_vnic_rolled_back_mid_chain(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libvirt carries out the middle vNIC's move, then reports a failure: that vNIC is
    put back for real, the ones before and after it are moved."""
    nics = Nic("vt-a"), Nic("vt-a"), Nic("vt-a")
    vm_id = vms.create(*nics)
    real, failed = Domain.update_interface, list[str]()

    def failing(self: Domain, xml: str, *, live: bool, persistent: bool) -> None:
        real(self, xml, live=live, persistent=persistent)
        if nics[1].mac in xml and not failed:
            failed.append(xml)
            raise HypervisorError("updating interface", injected("injected failure"))

    monkeypatch.setattr(Domain, "update_interface", failing)
    results = bulk(rpc, match={"vmIDs": [vm_id]}, change={"network": "vt-c"})
    assert [r["ok"] for r in results] == [True, False, True], results
    assert results[1]["error"]["data"]["rolledBack"] is True
    assert [seen(vnicd, vm_id, n.mac).kernel_bridge for n in nics] == ["vt-c", "vt-a", "vt-c"]
    assert [seen(vnicd, vm_id, n.mac).source for n in nics] == ["vt-c", "vt-a", "vt-c"]
