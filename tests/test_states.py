"""The four vNIC states on the host side: what needs no guest OS to prove.

(Unplugging a vNIC from a running guest needs a guest that acknowledges it: see
test_guest.py. Plugging needs no acknowledgement, and a VM that is not running
takes every change in its definition.)
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import libvirt
import libvirt_qemu
import pytest

from tests.conftest import Nic, Vms, nic_xml
from tests.evidence import interfaces, pci_of, seen
from tests.harness import DaemonThread, SchemaClient
from vnicd.client import RpcError


def nic_info(rpc: SchemaClient, vm_id: str, mac: str) -> dict[str, Any]:
    found = [n for n in rpc.call("VM.getInfo", vmID=vm_id)["nics"] if n["macAddr"] == mac]
    assert len(found) == 1, found
    return dict(found[0])


def call(rpc: SchemaClient, verb: str, vm_id: str, **params: Any) -> Any:
    return rpc.call(verb, vmID=vm_id, params=params)


def update(rpc: SchemaClient, vm_id: str, **params: Any) -> Any:
    return call(rpc, "VM.updateDevice", vm_id, deviceType="interface", **params)


def stopped_vm(vms: Vms, *nics: Nic) -> str:
    """A persistent VM, defined but not running."""
    vm_id = vms.create(*nics, persistent=True)
    vms.vnicd.domain(vm_id).destroy()
    return vm_id


def saved_interfaces(vnicd: DaemonThread, vm_id: str) -> dict[str, Any]:
    return interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))  # VIR_DOMAIN_XML_INACTIVE


def test_unplug_timeout_leaves_vnic_plugged(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    """A VM with no OS never releases a device: error 50, and the vNIC stays as it was."""
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    with pytest.raises(RpcError) as err:
        call(rpc, "VM.hotunplugNic", vm_id, alias="net0")
    assert err.value.code == 50 and err.value.data["cause"] == "timeout"
    assert "stays plugged" in err.value.message
    assert seen(vnicd, vm_id, nic.mac) == before
    assert nic_info(rpc, vm_id, nic.mac)["plugged"] is True
    assert vnicd.removed == []
    update(rpc, vm_id, alias="net0", network="vt-b", linkActive=False)
    after = seen(vnicd, vm_id, nic.mac)
    assert after.kernel_bridge == "vt-b" and not after.link_up and after.pci == before.pci


def test_stopped_vm_takes_changes_and_boots_with_them(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    a, b = Nic("vt-a"), Nic("vt-a")
    vm_id = stopped_vm(vms, a, b)
    slots = {mac: pci_of(el) for mac, el in saved_interfaces(vnicd, vm_id).items()}

    update(rpc, vm_id, macAddr=a.mac, network="vt-b", linkActive=False)
    update(rpc, vm_id, macAddr=b.mac, network="lab")
    call(rpc, "VM.hotunplugNic", vm_id, macAddr=b.mac)
    info = nic_info(rpc, vm_id, b.mac)
    assert info["plugged"] is False and info["network"] == "lab"
    assert b.mac not in saved_interfaces(vnicd, vm_id)

    vnicd.domain(vm_id).create()
    got_a = seen(vnicd, vm_id, a.mac)
    assert (got_a.kernel_bridge, got_a.link_up) == ("vt-b", False)
    assert got_a.pci == slots[a.mac]
    assert b.mac not in interfaces(vnicd.live_xml(vm_id))
    qemu = vnicd.query_pci(vm_id)
    assert [d for d in qemu if d.startswith("net")] == [got_a.alias]
    assert int(slots[b.mac].split(":")[1]) not in {d.slot for d in qemu.values()}

    call(rpc, "VM.hotplugNic", vm_id, macAddr=b.mac)
    got_b = seen(vnicd, vm_id, b.mac)
    assert (got_b.kernel_bridge, got_b.link_up, got_b.pci) == ("vt-c", True, slots[b.mac])
    assert nic_info(rpc, vm_id, b.mac)["plugged"] is True
    assert pci_of(saved_interfaces(vnicd, vm_id)[b.mac]) == slots[b.mac]


def crash(dom: libvirt.virDomain) -> None:
    """What a guest kernel's panic does: write to the pvpanic device's port."""
    hmp = libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
    libvirt_qemu.qemuMonitorCommand(dom, "o /b 0x505 1", hmp)
    deadline = time.monotonic() + 10
    while dom.state()[0] != libvirt.VIR_DOMAIN_CRASHED:
        assert time.monotonic() < deadline, f"no crash: state {dom.state()}"
        time.sleep(0.05)


def test_a_crashed_vm_kept_for_its_dump_takes_changes_live(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    """on_crash=preserve keeps a panicked guest's QEMU (for a memory dump): the VM is not
    stopped, so a change must reach its live vNIC and its definition both."""
    a = Nic("vt-a")
    vm_id, xml = vms.xml(a)
    xml = xml.replace(
        "<on_poweroff>destroy</on_poweroff>",
        "<on_poweroff>destroy</on_poweroff><on_crash>preserve</on_crash>",
    )
    panic = "<panic model='isa'><address type='isa' iobase='0x505'/></panic>"
    xml = xml.replace("</devices>", f"{panic}</devices>")
    rpc.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
    vms.created.append(vm_id)
    before = seen(vnicd, vm_id, a.mac)
    crash(vnicd.domain(vm_id))
    assert rpc.call("VM.getInfo", vmID=vm_id)["status"] == "Paused"

    update(rpc, vm_id, macAddr=a.mac, network="vt-b", linkActive=False)
    after = seen(vnicd, vm_id, a.mac)
    assert (after.kernel_bridge, after.link_up, after.pci) == ("vt-b", False, before.pci)
    saved = saved_interfaces(vnicd, vm_id)[a.mac]
    assert saved.find("source").get("bridge") == "vt-b"
    assert saved.find("link").get("state") == "down"
    assert vnicd.domain(vm_id).state()[0] == libvirt.VIR_DOMAIN_CRASHED


def test_running_persistent_vm_keeps_wiring_across_reboot(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    a, b = Nic("vt-a"), Nic("vt-a", model="e1000")
    vm_id = vms.create(a, b, persistent=True)
    before = {n.mac: seen(vnicd, vm_id, n.mac) for n in (a, b)}
    update(rpc, vm_id, macAddr=a.mac, linkActive=False, network="vt-b")
    update(rpc, vm_id, macAddr=b.mac, network="vt-c")

    dom = vnicd.domain(vm_id)
    dom.destroy()
    dom.create()
    got_a, got_b = seen(vnicd, vm_id, a.mac), seen(vnicd, vm_id, b.mac)
    assert (got_a.kernel_bridge, got_a.link_up) == ("vt-b", False)
    assert (got_b.kernel_bridge, got_b.link_up) == ("vt-c", True)
    for got in (got_a, got_b):
        old = before[got.mac]
        assert (got.pci, got.qemu_slot, got.qemu_device_id) == (
            old.pci,
            old.qemu_slot,
            old.qemu_device_id,
        )


def test_unplugged_vnic_survives_restart(vnicd: DaemonThread, vms: Vms) -> None:
    a, b = Nic("vt-a"), Nic("vt-b", link_up=False)
    vm_id = stopped_vm(vms, a, b)
    slot = pci_of(saved_interfaces(vnicd, vm_id)[b.mac])
    with vnicd.client() as rpc:
        call(rpc, "VM.hotunplugNic", vm_id, macAddr=b.mac)
        update(rpc, vm_id, macAddr=b.mac, network="lab")
    vnicd.restart()
    vnicd.domain(vm_id).create()
    with vnicd.client() as rpc:
        info = nic_info(rpc, vm_id, b.mac)
        assert (info["plugged"], info["network"], info["linkActive"]) == (False, "lab", False)
        call(rpc, "VM.hotplugNic", vm_id, macAddr=b.mac)
    got = seen(vnicd, vm_id, b.mac)
    assert (got.kernel_bridge, got.link_up, got.pci, got.tap) == ("vt-c", False, slot, b.tap)
    assert got.model == "virtio"


def test_hotplug_new_vnic(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    vm_id = vms.create(Nic("vt-a"))
    new = vms.nic(Nic("vt-b", link_up=False))
    xml = (
        f"<hotplug><devices><interface type='bridge'><mac address='{new.mac}'/>"
        f"<source bridge='vt-b'/><target dev='{new.tap}'/><model type='virtio'/>"
        "<link state='down'/>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x0a' function='0x0'/>"
        "</interface></devices></hotplug>"
    )
    call(rpc, "VM.hotplugNic", vm_id, vmId=vm_id, xml=xml)
    got = seen(vnicd, vm_id, new.mac)
    assert (got.kernel_bridge, got.link_up, got.pci, got.qemu_slot[1]) == (
        "vt-b",
        False,
        "0:10:0",
        10,
    )


BAD_PLUGS = [
    ("unknown vNIC", "VM.hotplugNic", {"alias": "net7"}, 49, "no such unplugged vNIC"),
    ("plug a plugged vNIC", "VM.hotplugNic", {"alias": "net0"}, 49, "already plugged"),
    ("unknown vNIC (unplug)", "VM.hotunplugNic", {"alias": "net7"}, 50, "no such vNIC"),
    ("not an interface", "VM.hotplugNic", {"xml": "<disk type='file'/>"}, -32602, "params.xml"),
    ("malformed XML", "VM.hotplugNic", {"xml": "<interface"}, -32602, "params.xml"),
    (
        "other VM in vmId",
        "VM.hotplugNic",
        {"vmId": str(uuid.uuid4()), "alias": "net0"},
        -32602,
        "params.vmId",
    ),
    ("MAC in use", "VM.hotplugNic", {"xml": "MAC"}, 49, "belongs to another vNIC"),
    (
        "not a bridge vNIC",
        "VM.hotplugNic",
        {"xml": "<interface type='ethernet'/>"},
        -32602,
        "type 'ethernet'",
    ),
    (
        "a script",
        "VM.hotplugNic",
        {"xml": "<interface type='bridge'><script path='/bin/x'/></interface>"},
        -32602,
        "<script>",
    ),
    (
        "bad PCI number",
        "VM.hotplugNic",
        {"xml": "<interface type='bridge'><address type='pci' slot='09'/></interface>"},
        -32602,
        "bad PCI address",
    ),
    ("PCI address in use", "VM.hotplugNic", {"xml": "SLOT"}, 49, "is taken"),
]


@pytest.mark.parametrize(
    ("verb", "params", "code", "text"),
    [pytest.param(v, p, c, t, id=name) for name, v, p, c, t in BAD_PLUGS],
)
def test_bad_plug_changes_nothing(
    vnicd: DaemonThread,
    vms: Vms,
    rpc: SchemaClient,
    verb: str,
    params: dict[str, str],
    code: int,
    text: str,
) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    slot = int(seen(vnicd, vm_id, nic.mac).pci.split(":")[1])
    other = vms.nic(Nic("vt-a"))
    templates = {
        "MAC": f"<interface type='bridge'><mac address='{nic.mac}'/><source bridge='vt-a'/>"
        "</interface>",
        "SLOT": f"<interface type='bridge'><mac address='{other.mac}'/><source bridge='vt-a'/>"
        f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>"
        "</interface>",
    }
    if params.get("xml") in templates:
        params = {"xml": templates[params["xml"]]}
    xml_before, before = vnicd.live_xml(vm_id), seen(vnicd, vm_id, nic.mac)
    with pytest.raises(RpcError) as err:
        call(rpc, verb, vm_id, **params)
    assert err.value.code == code and text in err.value.message, err.value.message
    assert vnicd.live_xml(vm_id) == xml_before
    assert seen(vnicd, vm_id, nic.mac) == before


def test_unplug_an_unplugged_vnic(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    a, b = Nic("vt-a"), Nic("vt-a")
    vm_id = stopped_vm(vms, a, b)
    call(rpc, "VM.hotunplugNic", vm_id, macAddr=b.mac)
    saved = str(vnicd.domain(vm_id).XMLDesc(2))
    with pytest.raises(RpcError) as err:
        call(rpc, "VM.hotunplugNic", vm_id, macAddr=b.mac)
    assert err.value.code == 50 and "already unplugged" in err.value.message
    assert str(vnicd.domain(vm_id).XMLDesc(2)) == saved


def test_live_only_vnic_of_persistent_vm(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    """A vNIC attached to the running VM only (by another tool) is rewired live only."""
    vm_id = vms.create(Nic("vt-a"), persistent=True)
    extra = vms.nic(Nic("vt-a"))
    vnicd.domain(vm_id).attachDeviceFlags(nic_xml(extra), 1)  # VIR_DOMAIN_AFFECT_LIVE
    saved = str(vnicd.domain(vm_id).XMLDesc(2))
    update(rpc, vm_id, macAddr=extra.mac, network="vt-b", linkActive=False)
    got = seen(vnicd, vm_id, extra.mac)
    assert (got.kernel_bridge, got.link_up) == ("vt-b", False)
    assert str(vnicd.domain(vm_id).XMLDesc(2)) == saved


def test_new_vnic_without_mac_or_address(vnicd: DaemonThread, vms: Vms, rpc: SchemaClient) -> None:
    """libvirt picks the slot once, vnicd the MAC: the definition gets what the guest has."""
    vm_id = vms.create(Nic("vt-a"), persistent=True)
    macs = set(interfaces(vnicd.live_xml(vm_id)))
    info = call(
        rpc,
        "VM.hotplugNic",
        vm_id,
        xml="<interface type='bridge'><source bridge='vt-b'/><model type='virtio'/></interface>",
    )
    (new,) = [n for n in info["nics"] if n["macAddr"] not in macs]
    live = interfaces(vnicd.live_xml(vm_id))[new["macAddr"]]
    saved = saved_interfaces(vnicd, vm_id)[new["macAddr"]]
    assert pci_of(saved) == pci_of(live)
    assert seen(vnicd, vm_id, new["macAddr"]).kernel_bridge == "vt-b"


def test_a_new_vnic_leaves_an_unplugged_ones_pci_slot(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    """A new vNIC plugged without an address goes to a free slot, not to the one an
    unplugged vNIC keeps (libvirt would take the lowest free): that one comes back there."""
    a, b = Nic("vt-a"), Nic("vt-a")
    vm_id = stopped_vm(vms, a, b)
    slot = pci_of(saved_interfaces(vnicd, vm_id)[b.mac])
    call(rpc, "VM.hotunplugNic", vm_id, macAddr=b.mac)
    vnicd.domain(vm_id).create()
    c = vms.nic(Nic("vt-b"))
    call(rpc, "VM.hotplugNic", vm_id, xml=nic_xml(c).replace(f"<mac address='{c.mac}'/>", ""))
    (new,) = [n for n in rpc.call("VM.getInfo", vmID=vm_id)["nics"] if n["tap"] == c.tap]
    got_c = seen(vnicd, vm_id, new["macAddr"])
    assert got_c.pci != slot and got_c.kernel_bridge == "vt-b"
    call(rpc, "VM.hotplugNic", vm_id, macAddr=b.mac)
    got_b = seen(vnicd, vm_id, b.mac)
    assert (got_b.pci, got_b.kernel_bridge) == (slot, "vt-a")
    assert {d.slot for d in vnicd.query_pci(vm_id).values()} >= {
        int(got_b.pci.split(":")[1]),
        int(got_c.pci.split(":")[1]),
    }


def test_engine_plugs_back_what_it_unplugged(
    vnicd: DaemonThread, vms: Vms, rpc: SchemaClient
) -> None:
    """ovirt-engine plugs a vNIC back with its whole XML: vnicd plugs the one it keeps, at
    its PCI slot, wired and linked as that XML says."""
    a, b = Nic("vt-a"), Nic("vt-a")
    vm_id = stopped_vm(vms, a, b)
    slot = pci_of(saved_interfaces(vnicd, vm_id)[b.mac])
    call(rpc, "VM.hotunplugNic", vm_id, macAddr=b.mac)
    vnicd.domain(vm_id).create()
    engine_xml = (
        "<hotplug><devices><interface type='bridge'>"
        f"<mac address='{b.mac}'/><model type='virtio'/><source bridge='vt-b'/>"
        "<link state='down'/><alias name='ua-engine-b'/></interface></devices></hotplug>"
    )
    info = call(rpc, "VM.hotplugNic", vm_id, xml=engine_xml)
    (nic,) = [n for n in info["nics"] if n["macAddr"] == b.mac]
    assert (nic["plugged"], nic["bridge"], nic["linkActive"]) == (True, "vt-b", False)
    got = seen(vnicd, vm_id, b.mac)
    assert (got.kernel_bridge, got.link_up, got.pci, got.tap) == ("vt-b", False, slot, b.tap)
