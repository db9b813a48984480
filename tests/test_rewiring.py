"""Live rewiring of real VMs on real bridges, proven in libvirt's live XML, the kernel and QEMU."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest

from tests.conftest import Nic, Vms
from tests.evidence import Seen, interfaces, seen
from tests.harness import DaemonThread, SchemaClient, injected
from tests.hostenv import ip, link, master
from vnicd.client import RpcError
from vnicd.domxml import Interface
from vnicd.hypervisor import Domain, HypervisorError


def update(rpc: SchemaClient, vm: str, **params: Any) -> Any:
    return rpc.call("VM.updateDevice", vmID=vm, params={"deviceType": "interface", **params})


def changed(before: Seen, **fields: Any) -> Seen:
    return dataclasses.replace(before, **fields)


@pytest.fixture
def vm(vms: Vms) -> tuple[str, str]:
    nic = Nic("vt-a", extra="<rom enabled='no'/>")
    return vms.create(nic), nic.mac


def test_link_down_and_up(vnicd: DaemonThread, rpc: SchemaClient, vm: tuple[str, str]) -> None:
    vm_id, mac = vm
    before = seen(vnicd, vm_id, mac)
    assert before.link_up and before.kernel_bridge == "vt-a"

    result = update(rpc, vm_id, alias="net0", linkActive=False)
    assert result["nics"][0]["linkActive"] is False
    assert seen(vnicd, vm_id, mac) == changed(before, link_up=False)

    update(rpc, vm_id, alias="net0", linkActive=True)
    assert seen(vnicd, vm_id, mac) == before
    assert vnicd.removed == []


def test_network_change_on_linked_vnic(
    vnicd: DaemonThread, rpc: SchemaClient, vm: tuple[str, str]
) -> None:
    vm_id, mac = vm
    before = seen(vnicd, vm_id, mac)
    result = update(rpc, vm_id, alias="net0", network="vt-b")
    assert result["nics"][0]["network"] == "vt-b" and result["nics"][0]["bridge"] == "vt-b"
    assert seen(vnicd, vm_id, mac) == changed(before, source="vt-b", kernel_bridge="vt-b")
    assert vnicd.removed == []


def test_network_change_keeps_unlinked_vnic_down(
    vnicd: DaemonThread, rpc: SchemaClient, vm: tuple[str, str]
) -> None:
    """libvirt reads a missing <link> as up; a network-only change must not reconnect."""
    vm_id, mac = vm
    update(rpc, vm_id, alias="net0", linkActive=False)
    before = seen(vnicd, vm_id, mac)
    update(rpc, vm_id, alias="net0", network="vt-b")
    after = seen(vnicd, vm_id, mac)
    assert after == changed(before, source="vt-b", kernel_bridge="vt-b")
    assert not after.link_up


def test_link_and_network_at_once_by_mac(
    vnicd: DaemonThread, rpc: SchemaClient, vm: tuple[str, str]
) -> None:
    vm_id, mac = vm
    before = seen(vnicd, vm_id, mac)
    update(rpc, vm_id, macAddr=mac.upper(), network="vt-b", linkActive=False)
    assert seen(vnicd, vm_id, mac) == changed(
        before, source="vt-b", kernel_bridge="vt-b", link_up=False
    )
    update(rpc, vm_id, macAddr=mac, network="vt-a", linkActive=True)
    assert seen(vnicd, vm_id, mac) == before


def test_configured_network_name(
    vnicd: DaemonThread, rpc: SchemaClient, vm: tuple[str, str]
) -> None:
    """`lab` is mapped to bridge vt-c in the test config."""
    vm_id, mac = vm
    result = update(rpc, vm_id, alias="net0", network="lab")
    assert result["nics"][0]["network"] == "lab"
    assert seen(vnicd, vm_id, mac).kernel_bridge == "vt-c"
    caps = rpc.call("Host.getCapabilities")
    assert {"name": "lab", "type": "bridge", "bridge": "vt-c"} in caps["networks"]


def test_unwire(vnicd: DaemonThread, rpc: SchemaClient, vm: tuple[str, str]) -> None:
    vm_id, mac = vm
    before = seen(vnicd, vm_id, mac)
    result = update(rpc, vm_id, alias="net0", network="")
    assert result["nics"][0]["network"] == ""
    unwired = vnicd.config.unwired_bridge
    assert seen(vnicd, vm_id, mac) == changed(
        before, source=unwired, kernel_bridge=unwired, link_up=False
    )
    bridge = link(unwired)
    assert bridge is not None
    flags = bridge["flags"]
    assert isinstance(flags, list) and "UP" not in flags, "the unwired bridge is up"

    with pytest.raises(RpcError, match="cannot be linked") as err:
        update(rpc, vm_id, alias="net0", linkActive=True)
    assert err.value.code == 56
    update(rpc, vm_id, alias="net0", network="vt-a", linkActive=True)
    assert seen(vnicd, vm_id, mac) == before


def test_parallel_vms_and_serialized_vm(
    vnicd: DaemonThread, vms: Vms, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Updates to different VMs overlap; updates to one VM never do."""
    slow, fast = vms.create(Nic("vt-a")), vms.create(Nic("vt-a"))
    real = Domain.update_interface
    spans: dict[str, list[tuple[float, float]]] = {slow: [], fast: []}

    def timed(self: Domain, xml: str, *, live: bool, persistent: bool) -> None:
        start = time.monotonic()
        if self.uuid == slow:
            time.sleep(0.5)
        real(self, xml, live=live, persistent=persistent)
        spans[self.uuid].append((start, time.monotonic()))

    monkeypatch.setattr(Domain, "update_interface", timed)
    errors: list[BaseException] = []

    def worker(vm_id: str, network: str) -> None:
        try:
            with vnicd.client() as c:
                update(c, vm_id, alias="net0", network=network)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=worker, args=(slow, "vt-b")),
        threading.Thread(target=worker, args=(slow, "vt-c")),
        threading.Thread(target=worker, args=(fast, "vt-b")),
    ]
    for t in threads:
        t.start()
        time.sleep(0.05)
    for t in threads:
        t.join(30)
    assert errors == []
    (_, a_end), (b_start, _) = sorted(spans[slow])
    assert b_start >= a_end, "two updates of one VM overlapped"
    ((_, f_end),) = spans[fast]
    assert f_end < a_end, "an update of another VM waited for the slow VM"
    assert master(vnicd_tap(vnicd, slow)) == "vt-c"
    assert master(vnicd_tap(vnicd, fast)) == "vt-b"


def vnicd_tap(vnicd: DaemonThread, vm_id: str) -> str:
    el = next(iter(interfaces(vnicd.live_xml(vm_id)).values()))
    return str(el.find("target").get("dev"))  # type: ignore[union-attr]


def _fail_after(monkeypatch: pytest.MonkeyPatch, before_libvirt: bool = False) -> list[str]:
    """Make the next live update fail right after it took effect (or fake a half-done one)."""
    real = Domain.update_interface
    calls: list[str] = []

    def failing(self: Domain, xml: str, *, live: bool, persistent: bool) -> None:
        calls.append(xml)
        if len(calls) == 1:
            if before_libvirt:
                # libvirt moved the tap, then failed before recording it in its XML.
                new = Interface.from_xml(xml)
                assert new.tap and new.source
                ip("link", "set", "dev", new.tap, "master", new.source.name)
            else:
                real(self, xml, live=live, persistent=persistent)
            raise HypervisorError("updating interface", injected("injected failure"))
        real(self, xml, live=live, persistent=persistent)

    monkeypatch.setattr(Domain, "update_interface", failing)
    return calls


@pytest.mark.parametrize("half_done", [False, True], ids=["after-libvirt", "kernel-only"])
def test_failure_restores_previous_state(
    vnicd: DaemonThread,
    rpc: SchemaClient,
    vm: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
    half_done: bool,
) -> None:
    vm_id, mac = vm
    update(rpc, vm_id, alias="net0", linkActive=False)
    before = seen(vnicd, vm_id, mac)
    calls = _fail_after(monkeypatch, before_libvirt=half_done)
    with pytest.raises(RpcError) as err:
        update(rpc, vm_id, alias="net0", network="vt-b", linkActive=True)
    e = err.value
    assert e.code == 56 and e.data["rolledBack"] is True, e
    assert "previous state was restored" in e.message and "injected failure" in e.message
    assert len(calls) >= 2, "no rollback was sent"
    assert seen(vnicd, vm_id, mac) == before
