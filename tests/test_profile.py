"""Engine-only vNIC fields and lenient booleans: pure logic, no VM."""

from __future__ import annotations

from typing import Any

import pytest

from vnicd import errors, verbs
from vnicd.domxml import PROFILE_PARTS, Interface, profile_changes
from vnicd.profile import device_params, plug_fields
from vnicd.schema import Schema

SCHEMA = Schema.load()
VM = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def test_nothing_asked_is_dropped() -> None:
    params = {
        "deviceType": "interface",
        "alias": "net0",
        "linkActive": False,
        "network": "n",
        "specParams": {"inbound": {}, "outbound": {}},
        "portMirroring": [],
        "filter": "",
        "filterParameters": [],
        "custom": {},
    }
    assert device_params(params, "update") == {
        "deviceType": "interface",
        "alias": "net0",
        "linkActive": False,
        "network": "n",
        "profile": (),  # no filter, no QoS: for the core, as the XML's parts
        "profileParts": frozenset({"filter", "qos"}),
    }


def test_older_engines_nic_is_unwrapped() -> None:
    nic: dict[str, Any] = {"type": "interface", "device": "bridge", "macAddr": "52:54:00:00:00:01"}
    nic |= {"address": {"slot": "0x03"}, "deviceId": "d", "specParams": {}, "network": "n"}
    assert device_params({"vmId": VM, "nic": nic}, "plug") == {
        "vmId": VM,
        "macAddr": "52:54:00:00:00:01",
        "network": "n",
        "profile": (),  # no filter: an older engine's plug writes one only if there is one
        "profileParts": frozenset({"filter", "qos"}),
    }


def test_asking_for_port_mirroring_is_noimpl() -> None:
    with pytest.raises(errors.NotImplementedFeature) as e:
        device_params({"portMirroring": ["x"]}, "update")
    assert e.value.code == 44 and e.value.fields["field"] == "params.portMirroring"
    assert "params.portMirroring" in e.value.message


def test_custom_properties_go_to_the_hooks() -> None:
    """VDSM's custom properties are its hooks' environment: names a hook's environment
    can take, text values; the core refuses them where no hook runs."""
    nic = {"macAddr": "52:54:00:00:00:01", "custom": {"vnic-id": "7", "a": "b"}}
    assert device_params({"nic": nic}, "plug")["custom"] == (("a", "b"), ("vnic-id", "7"))
    assert device_params({"custom": {}}, "update") == {}
    for custom, field in (
        ({"PATH": "/tmp"}, "params.custom.PATH"),
        ({"vnic-id": "1", "vnic_id": "2"}, "params.custom.vnic_id"),
        ({"k": "x\0y"}, "params.custom.k"),
        ({"k": 1}, "params.custom"),
        (["k"], "params.custom"),
    ):
        with pytest.raises(errors.InvalidParameter) as e:
            device_params({"custom": custom}, "update")
        assert e.value.fields["field"] == field, custom


def test_an_older_engines_filter_and_qos_are_profile_parts() -> None:
    """Parts for the core, as the XML's <filterref> and <bandwidth> are."""
    ip = [{"name": "IP", "value": "1.2.3.4"}]
    fields: dict[str, Any] = {"filter": "clean-traffic", "filterParameters": ip}
    fields |= {"specParams": {"inbound": {"average": 1}, "outbound": {}}}
    dev = device_params(fields, "update")
    xml = (
        "<interface><filterref filter='clean-traffic'><parameter name='IP' value='1.2.3.4'/>"
        "</filterref><bandwidth><inbound average='1'/></bandwidth></interface>"
    )
    assert dev["profile"] == Interface.from_xml(xml).profile
    assert dev["profileParts"] == {"filter", "qos"}
    with pytest.raises(errors.InvalidParameter, match="parameters of no network filter"):
        device_params({"filterParameters": ip}, "update")


def test_profile_fields_beside_an_xml_are_refused() -> None:
    """The XML carries the profile: fields that ask for one beside it are no second say."""
    xml = engine_xml(IFACE.format(bridge="b", extra=""))
    with pytest.raises(errors.InvalidParameter, match=r"params\.xml only") as e:
        device_params({"xml": xml, "filter": "f"}, "update")
    assert e.value.fields["field"] == "params.filter"
    with pytest.raises(errors.InvalidParameter, match=r"params\.xml only") as e:
        device_params({"xml": xml, "custom": {"k": "v"}}, "update")
    assert e.value.fields["field"] == "params.custom"
    assert "profile" in device_params({"xml": xml, "filter": "", "specParams": {}}, "update")


def test_unplug_ignores_what_describes_the_leaving_vnic() -> None:
    nic: dict[str, Any] = {"macAddr": "52:54:00:00:00:01", "filter": "vdsm-no-mac-spoofing"}
    assert device_params({"nic": nic}, "unplug") == {"macAddr": "52:54:00:00:00:01"}
    nic["custom"] = {"k": "v"}  # but for its hooks
    assert device_params({"nic": nic}, "unplug")["custom"] == (("k", "v"),)
    nic["custom"] = {"HOME": "/"}  # one they cannot take keeps no vNIC plugged
    assert "custom" not in device_params({"nic": nic}, "unplug")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("False", False), (True, True)])
def test_engine_bool_is_coerced_for_the_handler(text: Any, value: bool) -> None:
    dev: dict[str, Any] = {"deviceType": "interface", "alias": "a", "linkActive": text}
    params: dict[str, Any] = {"vmID": VM, "params": dev}
    SCHEMA.validate_params(SCHEMA.verbs["VM.updateDevice"], params)
    assert dev["linkActive"] is value


def test_engine_nic_bool_and_strictness_elsewhere() -> None:
    nic: dict[str, Any] = {"macAddr": "52:54:00:00:00:01", "linkActive": "false"}
    params: dict[str, Any] = {"vmID": VM, "params": {"nic": nic}}
    SCHEMA.validate_params(SCHEMA.verbs["VM.hotplugNic"], params)
    assert nic["linkActive"] is False
    strict = {"vmID": VM, "vmParams": {"xml": "<domain/>", "persistent": "true"}}
    with pytest.raises(errors.InvalidParameter, match=r"vmParams\.persistent: expected boolean"):
        SCHEMA.validate_params(SCHEMA.verbs["VM.create"], strict)


def test_qos_values_are_typed() -> None:
    params = {
        "vmID": VM,
        "params": {"alias": "a", "deviceType": "interface", "specParams": {"inbound": {"x": 1}}},
    }
    with pytest.raises(errors.InvalidParameter, match=r"specParams\.inbound\.x: unknown field"):
        SCHEMA.validate_params(SCHEMA.verbs["VM.updateDevice"], params)


def engine_xml(interface: str, metadata: str = "<ovirt-vm:custom/>") -> str:
    """Shaped as LibvirtVmXmlBuilder.buildHotplugNic writes it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?><hotplug><devices>'
        f"{interface}</devices>"
        '<metadata xmlns:ovirt-vm="http://ovirt.org/vm/1.0"><ovirt-vm:vm>'
        f'<ovirt-vm:device alias="ua-1" mac_address="52:54:00:00:00:01">{metadata}'
        "</ovirt-vm:device></ovirt-vm:vm></metadata></hotplug>"
    )


IFACE = (
    '<interface type="bridge"><model type="virtio"/><link state="down"/>'
    '<source bridge="{bridge}"/><alias name="ua-1"/><mac address="52:54:00:00:00:01"/>'
    '<mtu size="1500"/>{extra}<bandwidth/></interface>'
)


def test_engine_xml_update_becomes_fields() -> None:
    """The update XML's <model> describes the vNIC (for the engine's dual-mode type it is
    rtl8139 or virtio by whether the guest has its agent now): it asks for no change."""
    xml = engine_xml(IFACE.format(bridge="ovirtmgmt", extra=""))
    assert device_params({"deviceType": "interface", "xml": xml}, "update") == {
        "deviceType": "interface",
        "alias": "ua-1",
        "macAddr": "52:54:00:00:00:01",
        "linkActive": False,
        "network": "ovirtmgmt",
        "profile": (),
    }
    unwired = engine_xml(IFACE.format(bridge=";vdsmdummy;", extra=""))
    assert device_params({"xml": unwired}, "update")["network"] == ""


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (
            "<ovirt-vm:portMirroring><ovirt-vm:network>n</ovirt-vm:network>"
            "</ovirt-vm:portMirroring>",
            "port mirroring",
        ),
    ],
)
def test_engine_xml_features_vnicd_lacks(metadata: str, problem: str) -> None:
    xml = engine_xml(IFACE.format(bridge="b", extra=""), metadata)
    with pytest.raises(errors.NotImplementedFeature, match=problem) as e:
        device_params({"xml": xml}, "update")
    assert e.value.fields["field"] == "params.xml"
    with pytest.raises(errors.NotImplementedFeature, match=problem):
        plug_fields(xml)  # a plug's too: libvirt would not do it either
    by_mac = xml.replace('alias="ua-1" ', "")  # some engines key the metadata by MAC only
    with pytest.raises(errors.NotImplementedFeature, match=problem):
        device_params({"xml": by_mac}, "update")


def test_engine_xml_custom_properties_go_to_the_hooks() -> None:
    custom = "<ovirt-vm:custom><ovirt-vm:k>v</ovirt-vm:k></ovirt-vm:custom>"
    xml = engine_xml(IFACE.format(bridge="b", extra=""), custom)
    assert device_params({"xml": xml}, "update")["custom"] == (("k", "v"),)
    assert plug_fields(xml)["custom"] == (("k", "v"),)
    by_mac = xml.replace('alias="ua-1" ', "")  # some engines key the metadata by MAC only
    assert device_params({"xml": by_mac}, "update")["custom"] == (("k", "v"),)
    reserved = xml.replace("ovirt-vm:k>", "ovirt-vm:LD_PRELOAD>")
    with pytest.raises(errors.InvalidParameter, match="LD_PRELOAD") as e:
        device_params({"xml": reserved}, "update")
    assert e.value.fields["field"] == "params.xml"


def test_engine_xml_profile_parts_are_carried_as_libvirt_compares_them() -> None:
    """The engine sends a vNIC's whole profile with every update (its default profile has
    a network filter): the parts go along, for the core to set where they differ from the
    vNIC's own, compared as libvirt does."""
    extra = '<filterref filter="vdsm-no-mac-spoofing"/><port isolated="yes"/><teaming type="x"/>'
    qos = IFACE.format(bridge="b", extra=extra).replace(
        "<bandwidth/>", '<bandwidth><inbound average="1" burst="1" peak="1"/></bandwidth>'
    )
    parts = device_params({"xml": engine_xml(qos)}, "update")["profile"]
    assert [part for part, _ in parts] == ["filter", "qos", "isolation", "teaming"]
    libvirts = Interface.from_xml(
        "<interface type='bridge'><source bridge='b'/><teaming type='x'/>"
        "<bandwidth><inbound peak='1' burst='1' average='1'/></bandwidth>"
        "<filterref filter='vdsm-no-mac-spoofing'/><port isolated='yes'/></interface>"
    )
    every = list(PROFILE_PARTS)
    assert profile_changes(libvirts.profile, parts, every) == [], "libvirt's order and quotes"
    none = Interface.from_xml("<interface><bandwidth/><port isolated='no'/></interface>")
    assert none.profile == ()
    assert profile_changes(none.profile, parts, ["qos", "teaming"]) == ["qos", "teaming"]
    # libvirt prints numbers plainly and leaves out a zero rate
    zeros = "<interface><bandwidth><outbound average='0100' peak='0' burst='5'/></bandwidth>"
    plain = "<interface><bandwidth><outbound burst='5' average='100'/></bandwidth>"
    zero = Interface.from_xml(zeros + "</interface>").profile
    assert profile_changes(zero, Interface.from_xml(plain + "</interface>").profile, every) == []
    # a filter's parameters are text, as libvirt compares them
    ten, oh_ten = (
        Interface.from_xml(
            f"<interface><filterref filter='f'><parameter name='P' value='{v}'/></filterref>"
            "</interface>"
        ).profile
        for v in ("10", "010")
    )
    assert profile_changes(ten, oh_ten, every) == ["filter"]
    odd = "<interface><bandwidth><inbound average='²'/></bandwidth></interface>"
    assert Interface.from_xml(odd).profile, "a digit that is no number is text"


def test_engine_xml_hostdev() -> None:
    hostdev = IFACE.format(bridge="b", extra="").replace('type="bridge"', 'type="hostdev"')
    with pytest.raises(errors.NotImplementedFeature, match="hostdev"):
        device_params({"xml": engine_xml(hostdev)}, "update")


def test_engine_xml_unplug_and_bad_xml() -> None:
    unplug = '<hotunplug><devices><interface><alias name="ua-9"/></interface></devices></hotunplug>'
    assert device_params({"vmId": VM, "xml": unplug}, "unplug") == {"vmId": VM, "alias": "ua-9"}
    for bad, problem in (
        ("<hotplug>", "malformed"),
        ("<hotplug><devices/></hotplug>", "exactly one"),
        ("<hotplug><devices><interface/></devices></hotplug>", "no <alias> or <mac>"),
        (IFACE.format(bridge="no such bridge!", extra=""), "not a network name"),
    ):
        with pytest.raises(errors.InvalidParameter, match=problem):
            device_params({"xml": bad}, "update")


def test_plug_keeps_xml_as_the_new_vnic() -> None:
    xml = engine_xml(IFACE.format(bridge="b", extra=""))
    assert device_params({"vmId": VM, "xml": xml}, "plug") == {"vmId": VM, "xml": xml}


def test_older_engines_name_virtio_pv() -> None:
    """VmInterfaceType's internal names, as HotPlugOrUnplugNicVDSCommand sends them."""
    assert verbs._model({"nicModel": "pv"}) == "virtio"
    assert verbs._model({"nicModel": "e1000"}) == "e1000" and verbs._model({}) is None
