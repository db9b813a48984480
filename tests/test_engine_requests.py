"""Requests built field by field as ovirt-engine's vdsbroker builds them, over the engine wire.

VM.updateDevice: ``UpdateVmInterfaceVDSCommand.initDeviceStructure`` puts ``deviceType``,
``alias`` and ``linkActive`` as ``String.valueOf(nic.isLinked())``, then
``VmInfoBuildUtils.addProfileDataToNic`` adds ``network`` (the vdsm name), ``specParams``
with empty ``inbound``/``outbound`` for a profile without QoS, ``portMirroring`` only when
the profile mirrors and ``custom`` only when there are custom properties.
VM.hotplugNic / hotunplugNic (cluster level < 4.2): ``HotPlugOrUnplugNicVDSCommand``
sends ``{vmId, nic: {type, device, macAddr, linkActive, address?, specParams, nicModel,
deviceId, network, ...}}`` plus ``filter``/``filterParameters`` from
``addNetworkFiltersToNic``. Effects are proven in the live XML, the kernel and QEMU.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from lxml import etree

from tests import pki
from tests.conftest import Nic, Vms
from tests.engine import EngineClient
from tests.evidence import interfaces, pci_of, seen
from tests.harness import DaemonThread
from tests.hostenv import ip
from tests.test_states import stopped_vm
from vnicd.client import RpcError


@pytest.fixture
def engine(vnicd: DaemonThread) -> Iterator[EngineClient]:
    certs = pki.at(vnicd.config.engine.ca_file.parent)
    with EngineClient(vnicd.config.engine.port, certs.ca, certs.engine) as client:
        yield client


def update_device(alias: str, linked: bool, network: str, **profile: Any) -> dict[str, Any]:
    """As UpdateVmInterfaceVDSCommand + addProfileDataToNic build it (a profile without QoS)."""
    struct: dict[str, Any] = {"deviceType": "interface", "alias": alias}
    struct["linkActive"] = str(linked).lower()  # String.valueOf(boolean)
    struct["specParams"] = {"inbound": {}, "outbound": {}}
    struct["network"] = network
    struct.update(profile)
    return struct


def engine_nic(nic: Nic, network: str, **profile: Any) -> dict[str, Any]:
    """As HotPlugOrUnplugNicVDSCommand.initNicStructure builds it."""
    struct: dict[str, Any] = {
        "type": "interface",
        "device": "bridge",
        "macAddr": nic.mac,
        "linkActive": "true",
        "specParams": {},
        "nicModel": "pv",
        "deviceId": str(uuid.uuid4()),
        "network": network,
    }
    struct.update(profile)
    return struct


def test_update_device_as_the_engine_sends_it(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)

    info = engine.call(
        "VM.updateDevice", vmID=vm_id, params=update_device("net0", False, "vt-b", custom={})
    )
    assert info["nics"][0]["linkActive"] is False
    after = seen(vnicd, vm_id, nic.mac)
    assert (after.kernel_bridge, after.source, after.link_up) == ("vt-b", "vt-b", False)
    assert (after.pci, after.qemu_slot, after.tap, after.mac) == (
        before.pci,
        before.qemu_slot,
        before.tap,
        before.mac,
    )

    engine.call(
        "VM.updateDevice",
        vmID=vm_id,
        params=update_device("net0", True, "vt-a", portMirroring=[], filterParameters=[]),
    )
    assert seen(vnicd, vm_id, nic.mac) == before


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        (
            {"specParams": {"inbound": {"average": 1000, "peak": 2000, "burst": 1024}}},
            "params.specParams: adding the network QoS",
        ),
        ({"specParams": {"outbound": {"average": 10, "peak": 10, "burst": 10}}}, "network QoS"),
        ({"portMirroring": ["vt-b"]}, "params.portMirroring"),
        ({"custom": {"security_groups": "web"}}, "params.custom"),
    ],
)
def test_profile_features_vnicd_lacks_change_nothing(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient, profile: dict[str, Any], field: str
) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    params = {**update_device("net0", False, "vt-b"), **profile}
    with pytest.raises(RpcError) as e:
        engine.call("VM.updateDevice", vmID=vm_id, params=params)
    assert e.value.code == 44 and field in e.value.message
    assert e.value.data["reason"] == "noimpl"
    assert seen(vnicd, vm_id, nic.mac) == before


@pytest.mark.parametrize(
    ("value", "problem"),
    [("yes", "not a boolean"), (1, "expected boolean"), ("", "not a boolean")],
)
def test_engine_booleans_are_true_or_false_only(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient, value: Any, problem: str
) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    params = {**update_device("net0", True, "vt-b"), "linkActive": value}
    with pytest.raises(RpcError) as e:
        engine.call("VM.updateDevice", vmID=vm_id, params=params)
    assert e.value.code == -32602 and "params.linkActive" in e.value.message
    assert problem in e.value.message
    assert seen(vnicd, vm_id, nic.mac) == before, "refused, and nothing moved"


def test_hot_unplug_and_plug_as_older_engines_send_them(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """Unplugged while the VM is down (no guest to acknowledge), plugged back live."""
    a, b = Nic("vt-a"), Nic("vt-a")
    vm_id = stopped_vm(vms, a, b)
    unplug = {"vmId": vm_id, "nic": engine_nic(b, "vt-a", filter="vdsm-no-mac-spoofing")}
    info = engine.call("VM.hotunplugNic", vmID=vm_id, params=unplug)
    assert [n["plugged"] for n in info["nics"] if n["macAddr"] == b.mac] == [False]

    vnicd.domain(vm_id).create()
    plug = {"vmId": vm_id, "nic": engine_nic(b, "vt-a", filter="vdsm-no-mac-spoofing")}
    with pytest.raises(RpcError) as e:  # a filter libvirt cannot instantiate here
        engine.call("VM.hotplugNic", vmID=vm_id, params=plug)
    assert e.value.code == 49 and "the previous state was restored" in e.value.message
    assert b.mac not in interfaces(vnicd.live_xml(vm_id))
    assert b.mac not in interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))  # VIR_DOMAIN_XML_INACTIVE

    nowhere = {**plug, "nic": engine_nic(b, "no-such-net")}  # a filterless profile: no filter
    with pytest.raises(RpcError) as e:
        engine.call("VM.hotplugNic", vmID=vm_id, params=nowhere)
    assert e.value.code == 49 and e.value.data["field"] == "params.nic.network"
    assert e.value.data["cause"] == "noNetwork"
    # plugged back on the network and link the engine names, not as it was unplugged, and
    # as the model it names (edited while unplugged; "pv" is VDSM's name for virtio)
    plug["nic"] = engine_nic(b, "vt-b", linkActive="false", nicModel="e1000")
    info = engine.call("VM.hotplugNic", vmID=vm_id, params=plug)
    assert [n["plugged"] for n in info["nics"] if n["macAddr"] == b.mac] == [True]
    got = seen(vnicd, vm_id, b.mac)
    assert (got.kernel_bridge, got.link_up, got.tap) == ("vt-b", False, b.tap)
    assert got.model == "e1000" and vnicd.query_pci(vm_id)[got.alias].device == 0x100E
    assert got.alias in vnicd.query_pci(vm_id)
    # ActivateDeactivateVmNicCommand reads the new vNIC's alias from result.devices
    [device] = [d for d in info["devices"] if d["macAddr"] == b.mac]
    assert device["alias"] == got.alias


def engine_update_xml(alias: str, mac: str, bridge: str, linked: bool, extra: str = "") -> str:
    """As LibvirtVmXmlBuilder.buildHotplugNic writes it for UpdateVmInterfaceVDSCommand."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><hotplug><devices><interface type="bridge">'
        f'<model type="virtio"/><link state="{"up" if linked else "down"}"/>'
        f'<source bridge="{bridge}"/><alias name="{alias}"/><mac address="{mac}"/>'
        f'<mtu size="1500"/>{extra}<bandwidth/></interface></devices>'
        '<metadata xmlns:ovirt-vm="http://ovirt.org/vm/1.0"><ovirt-vm:vm>'
        f'<ovirt-vm:device alias="{alias}" mac_address="{mac}"><ovirt-vm:custom/>'
        "</ovirt-vm:device></ovirt-vm:vm></metadata></hotplug>"
    )


def test_update_device_as_todays_engine_sends_it(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """Cluster level 4.2+: {deviceType, xml}; the engine names its vNICs ua-<device id>."""
    alias = f"ua-{uuid.uuid4()}"
    nic = Nic("vt-a", extra=f"<alias name='{alias}'/>")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    assert before.alias == alias

    params = {"deviceType": "interface", "xml": engine_update_xml(alias, nic.mac, "vt-b", False)}
    engine.call("VM.updateDevice", vmID=vm_id, params=params)
    after = seen(vnicd, vm_id, nic.mac)
    assert (after.kernel_bridge, after.link_up) == ("vt-b", False)
    assert (after.pci, after.tap, after.qemu_slot) == (before.pci, before.tap, before.qemu_slot)

    filtered = engine_update_xml(
        alias, nic.mac, "vt-a", True, extra='<filterref filter="vdsm-no-mac-spoofing"/>'
    )
    with pytest.raises(RpcError) as e:
        engine.call(
            "VM.updateDevice", vmID=vm_id, params={"deviceType": "interface", "xml": filtered}
        )
    # no filter of that name here (and no nwfilter driver in the embedded one): libvirt
    # moved the tap before the filter failed; the whole change is undone
    assert e.value.code == 56 and e.value.data["rolledBack"] is True, e.value.message
    assert seen(vnicd, vm_id, nic.mac) == after

    unwire = engine_update_xml(alias, nic.mac, ";vdsmdummy;", False)
    info = engine.call(
        "VM.updateDevice", vmID=vm_id, params={"deviceType": "interface", "xml": unwire}
    )
    assert info["nics"][0]["network"] == ""
    assert seen(vnicd, vm_id, nic.mac).kernel_bridge == vnicd.config.unwired_bridge


def test_a_dual_mode_vnic_takes_the_engines_update_whichever_model_it_writes(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """The engine's dual-mode type (rtl8139_pv) is plugged as rtl8139 or virtio by whether
    the guest had its agent then, and its update XML says virtio once the agent runs: the
    update moves the vNIC, which stays the device it is in QEMU."""
    alias = f"ua-{uuid.uuid4()}"
    nic = Nic("vt-a", model="rtl8139", extra=f"<alias name='{alias}'/>")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    xml = engine_update_xml(alias, nic.mac, "vt-b", True)  # <model type="virtio"/>
    engine.call("VM.updateDevice", vmID=vm_id, params={"deviceType": "interface", "xml": xml})
    after = seen(vnicd, vm_id, nic.mac)
    assert (after.kernel_bridge, after.model) == ("vt-b", "rtl8139")
    assert (after.qemu_slot, after.qemu_device_id) == (before.qemu_slot, 0x8139)


FILTER = """<filter name='vnicd-test-no-mac-spoofing' chain='mac'>
  <rule action='return' direction='out' priority='-650'><mac srcmacaddr='$MAC'/></rule>
  <rule action='drop' direction='out' priority='-600'><mac/></rule>
</filter>"""


def test_the_engine_moves_a_vnic_between_profiles_with_and_without_a_network_filter(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """The engine's update XML carries the vNIC's whole profile (on its default profile,
    a network filter against MAC spoofing): the same filter is no change and stays in
    force on the tap; a profile without it takes the filter off the tap, live and in the
    definition, and one with it puts it back. A filter libvirt cannot instantiate, on a
    move, is undone whole: libvirt moved the tap before it failed. An older engine's plug
    in fields is the vNIC's whole profile: a filter it does not write is none."""
    if vnicd.libvirtd is None:
        pytest.skip("libvirt's embedded QEMU driver has no network filter (nwfilter) driver")
    nwfilter = vnicd.conn.nwfilterDefineXML(FILTER)
    alias = f"ua-{uuid.uuid4()}"
    filterref = '<filterref filter="vnicd-test-no-mac-spoofing"/>'
    nic = Nic("vt-a", extra=f"<alias name='{alias}'/>{filterref}")
    try:
        vm_id = vms.create(nic, persistent=True)
        tap = seen(vnicd, vm_id, nic.mac).tap
        assert filtered(tap)

        def update(bridge: str, extra: str, linked: bool = False) -> Any:
            xml = engine_update_xml(alias, nic.mac, bridge, linked, extra=extra)
            params = {"deviceType": "interface", "xml": xml}
            return engine.call("VM.updateDevice", vmID=vm_id, params=params)

        def filters() -> tuple[str | None, str | None]:
            """The filter of the vNIC in the live XML and in the definition."""
            found = []
            for xml in (vnicd.live_xml(vm_id), str(vnicd.domain(vm_id).XMLDesc(2))):
                ref = interfaces(xml)[nic.mac].find("filterref")
                found.append(None if ref is None else ref.get("filter"))
            return found[0], found[1]

        update("vt-b", filterref)
        after = seen(vnicd, vm_id, nic.mac)
        assert (after.kernel_bridge, after.link_up) == ("vt-b", False)
        assert filtered(tap), "the filter still holds on the tap, on its new bridge"

        info = update("vt-a", "", linked=True)  # to a profile with no network filter
        now = next(n for n in info["nics"] if n["macAddr"] == nic.mac)
        assert (now["filter"], now["bridge"], now["linkActive"]) == ("", "vt-a", True)
        assert now["filterParameters"] == []
        assert not filtered(tap), "the tap's filter rules are gone"
        assert filters() == (None, None)
        assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-a"

        info = update("vt-a", filterref, linked=True)  # and back
        assert next(n["filter"] for n in info["nics"] if n["macAddr"] == nic.mac) == (
            "vnicd-test-no-mac-spoofing"
        )
        assert filtered(tap) and filters() == ("vnicd-test-no-mac-spoofing",) * 2
        before = seen(vnicd, vm_id, nic.mac)

        with pytest.raises(RpcError) as e:  # libvirt moves the tap, then fails the filter
            update("vt-b", '<filterref filter="vnicd-test-no-such-filter"/>', linked=True)
        assert e.value.data["rolledBack"] is True, e.value.message
        assert seen(vnicd, vm_id, nic.mac) == before, "on its bridge in the kernel again"
        assert filtered(tap) and filters() == ("vnicd-test-no-mac-spoofing",) * 2

        # an older engine: unplugged while the VM is down, plugged back as fields
        vnicd.domain(vm_id).destroy()
        plug = {"vmId": vm_id, "nic": engine_nic(nic, "vt-a")}  # no filter: none
        engine.call("VM.hotunplugNic", vmID=vm_id, params=plug)
        vnicd.domain(vm_id).create()
        engine.call("VM.hotplugNic", vmID=vm_id, params=plug)
        back = seen(vnicd, vm_id, nic.mac)
        assert (back.kernel_bridge, back.link_up) == ("vt-a", True) and not filtered(back.tap)
        assert filters() == (None, None)
    finally:
        vms.cleanup()
        nwfilter.undefine()


def test_the_engine_isolates_a_vnics_port_and_frees_it(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """A profile with port isolation: the engine's update carries <port isolated='yes'/>;
    vnicd sets it live and in the definition, confirms it on the tap's bridge port in the
    kernel, keeps it through a move, and undoes it there too when a change fails after
    libvirt moved the tap and set the flag (it puts back neither)."""
    alias = f"ua-{uuid.uuid4()}"
    nic = Nic("vt-a", extra=f"<alias name='{alias}'/>")
    vm_id = vms.create(nic, persistent=True)
    tap = seen(vnicd, vm_id, nic.mac).tap
    isolation = "<port isolated='yes'/>"

    def update(bridge: str, extra: str) -> Any:
        xml = engine_update_xml(alias, nic.mac, bridge, True, extra=extra)
        params = {"deviceType": "interface", "xml": xml}
        return engine.call("VM.updateDevice", vmID=vm_id, params=params)

    def ports() -> tuple[bool, bool]:
        """The vNIC's isolation in the live XML and in the definition."""
        found = []
        for xml in (vnicd.live_xml(vm_id), str(vnicd.domain(vm_id).XMLDesc(2))):
            port = interfaces(xml)[nic.mac].find("port")
            found.append(port is not None and port.get("isolated") == "yes")
        return found[0], found[1]

    assert port_of(tap) == ("vt-a", False)
    update("vt-a", isolation)
    assert port_of(tap) == ("vt-a", True) and ports() == (True, True)
    update("vt-b", isolation)
    assert port_of(tap) == ("vt-b", True), "isolated on its new bridge too"
    before = seen(vnicd, vm_id, nic.mac)

    # libvirt moves the tap (a new port, not isolated), then fails on the filter
    with pytest.raises(RpcError) as e:
        update("vt-a", '<filterref filter="vnicd-test-no-such-filter"/>')
    assert e.value.code == 56 and e.value.data["rolledBack"] is True, e.value.message
    assert port_of(tap) == ("vt-b", True), "back on its bridge, isolated, in the kernel"
    assert seen(vnicd, vm_id, nic.mac) == before and ports() == (True, True)

    update("vt-b", "")  # a profile without isolation
    assert port_of(tap) == ("vt-b", False) and ports() == (False, False)


def port_of(tap: str) -> tuple[str | None, bool]:
    """The kernel's word, as ``ip -d link`` shows it: the tap's bridge, its port isolated."""
    data = json.loads(ip("-j", "-d", "link", "show", "dev", tap))[0]
    slave = data.get("linkinfo", {}).get("info_slave_data", {})
    return data.get("master"), bool(slave.get("isolated"))


def filtered(tap: str) -> bool:
    """The kernel's word: ebtables holds a chain for the tap's outgoing frames."""
    out = subprocess.run(["ebtables", "-t", "nat", "-L"], capture_output=True, text=True)
    return f"-i {tap}" in out.stdout


def test_hot_unplug_as_todays_engine_sends_it(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """HotUnplugNicVDSCommand: {vmId, xml} with an alias-only <interface>."""
    alias = f"ua-{uuid.uuid4()}"
    a, b = Nic("vt-a"), Nic("vt-a", extra=f"<alias name='{alias}'/>")
    vm_id = stopped_vm(vms, a, b)
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?><hotunplug><devices><interface>'
        f'<alias name="{alias}"/></interface></devices></hotunplug>'
    )
    info = engine.call("VM.hotunplugNic", vmID=vm_id, params={"vmId": vm_id, "xml": xml})
    assert {n["macAddr"]: n["plugged"] for n in info["nics"]} == {a.mac: True, b.mac: False}
    saved = interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))  # VIR_DOMAIN_XML_INACTIVE
    assert a.mac in saved and b.mac not in saved, "the definition no longer has it"


def test_hot_plug_as_todays_engine_sends_it(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """HotPlugNicVDSCommand: {vmId, xml}. The engine names a network in <source bridge>,
    ;vdsmdummy; for none; a vNIC whose model or MAC it edited while unplugged comes back
    under its alias (ua-<device id>) as edited, at its PCI address."""
    alias_b, alias_c = f"ua-{uuid.uuid4()}", f"ua-{uuid.uuid4()}"
    a = Nic("vt-a")
    b = Nic("vt-a", model="e1000", extra=f"<alias name='{alias_b}'/>")
    c = Nic("vt-a", extra=f"<alias name='{alias_c}'/>")
    vm_id = stopped_vm(vms, a, b, c)
    saved = interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))  # VIR_DOMAIN_XML_INACTIVE
    slot_b, slot_c = pci_of(saved[b.mac]), pci_of(saved[c.mac])
    address_c = etree.tostring(saved[c.mac].find("address")).decode()  # type: ignore[arg-type]
    for alias in (alias_b, alias_c):
        xml = f"<hotunplug><devices><interface><alias name='{alias}'/></interface></devices>"
        xml += "</hotunplug>"
        engine.call("VM.hotunplugNic", vmID=vm_id, params={"vmId": vm_id, "xml": xml})

    linked = engine_update_xml(alias_b, b.mac, ";vdsmdummy;", True)
    with pytest.raises(RpcError) as e:
        engine.call("VM.hotplugNic", vmID=vm_id, params={"vmId": vm_id, "xml": linked})
    assert "cannot be linked" in e.value.message and e.value.data.get("field") == "params.xml"
    assert b.mac not in interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))

    unwired = engine_update_xml(alias_b, b.mac, ";vdsmdummy;", False)  # and now a virtio
    engine.call("VM.hotplugNic", vmID=vm_id, params={"vmId": vm_id, "xml": unwired})
    new_mac = vms.nic(Nic("vt-a")).mac
    moved = engine_update_xml(alias_c, new_mac, "lab", True, extra=address_c)
    info = engine.call("VM.hotplugNic", vmID=vm_id, params={"vmId": vm_id, "xml": moved})
    assert {n["macAddr"]: n["plugged"] for n in info["nics"]} == {
        a.mac: True,
        b.mac: True,
        new_mac: True,
    }, "the vNIC edited to a new MAC replaced the one it was"

    vnicd.domain(vm_id).create()
    got_b, got_c = seen(vnicd, vm_id, b.mac), seen(vnicd, vm_id, new_mac)
    assert (got_b.kernel_bridge, got_b.link_up) == (vnicd.config.unwired_bridge, False)
    assert (got_b.model, got_b.pci) == ("virtio", slot_b)
    assert (got_c.kernel_bridge, got_c.link_up, got_c.pci) == ("vt-c", True, slot_c)
    qemu = vnicd.query_pci(vm_id)
    assert qemu[got_b.alias].device == 0x1000, "QEMU's virtio-net, no longer an e1000"
