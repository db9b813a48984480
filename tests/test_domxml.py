"""Round trips of the XML mapping: what vnicd does not model survives untouched."""

from __future__ import annotations

import pytest
from lxml import etree

from vnicd.domxml import Domain, Interface, PciAddress, Source, XMLError
from vnicd.model import NicChange
from vnicd.networks import UNWIRED, Wiring
from vnicd.planning import edit

LIVE = """<interface type='bridge'>
  <mac address='52:54:00:AA:bb:01'/>
  <source bridge='br-a'/>
  <target dev='vnet7'/>
  <model type='virtio'/>
  <driver name='vhost' queues='2'/>
  <rom enabled='no'/>
  <boot order='2'/>
  <mtu size='1400'/>
  <alias name='net0'/>
  <address type='pci' domain='0x0000' bus='0x00' slot='0x09' function='0x0'/>
</interface>"""


def canonical(xml: str) -> list[str]:
    """Children as sorted strings: order-insensitive comparison of one element."""
    root = etree.fromstring(xml.encode())
    children = sorted(etree.tostring(el, method="c14n").decode().strip() for el in root)
    return [*children, str(sorted(root.attrib.items()))]


def test_round_trip_is_lossless() -> None:
    iface = Interface.from_xml(LIVE)
    assert canonical(Interface.from_xml(iface.to_xml()).to_xml()) == canonical(LIVE)


def test_accessors() -> None:
    iface = Interface.from_xml(LIVE)
    assert iface.mac == "52:54:00:aa:bb:01"
    assert (iface.model, iface.alias, iface.tap, iface.bridge) == (
        "virtio",
        "net0",
        "vnet7",
        "br-a",
    )
    assert iface.address == PciAddress(0, 0, 9, 0) and str(iface.address) == "0000:00:09.0"
    assert iface.source == Source("bridge", "br-a")
    assert iface.link_up, "a missing <link> means up"
    assert iface.matches(alias="net0") and iface.matches(mac="52:54:00:AA:BB:01")
    assert not iface.matches(alias="net0", mac="52:54:00:aa:bb:02")


def without(xml: str, *tags: str) -> list[str]:
    root = etree.fromstring(xml.encode())
    for tag in tags:
        for el in root.findall(tag):
            root.remove(el)
    del root.attrib["type"]
    return canonical(etree.tostring(root).decode())


@pytest.mark.parametrize(
    ("change", "wiring", "kind", "source", "link"),
    [
        (NicChange(link_up=False), None, "bridge", {"bridge": "br-a"}, "down"),
        (
            NicChange(network="br-b"),
            Wiring("br-b", Source("bridge", "br-b"), "br-b"),
            "bridge",
            {"bridge": "br-b"},
            "up",
        ),
        (
            NicChange(network="lab"),
            Wiring("lab", Source("network", "lab"), "virbr1"),
            "network",
            {"network": "lab"},
            "up",
        ),
        (
            NicChange(network=UNWIRED, link_up=True),
            Wiring(UNWIRED, Source("bridge", "void"), "void"),
            "bridge",
            {"bridge": "void"},
            "down",
        ),
    ],
)
def test_plan_changes_only_source_and_link(
    change: NicChange, wiring: Wiring | None, kind: str, source: dict[str, str], link: str
) -> None:
    current = Interface.from_xml(LIVE)
    new = edit(current, change, wiring)
    root = etree.fromstring(new.to_xml().encode())
    assert root.get("type") == kind
    assert root.find("source").attrib == source  # type: ignore[union-attr]
    assert root.find("link").attrib == {"state": link}  # type: ignore[union-attr]
    assert without(new.to_xml(), "source", "link") == without(LIVE, "source", "link")
    assert current.to_xml() == Interface.from_xml(LIVE).to_xml(), "the original was edited"


def test_plan_writes_link_explicitly() -> None:
    """A network-only change of a down vNIC must say down: a missing <link> means up."""
    down = Interface.from_xml(LIVE.replace("<rom", "<link state='down'/><rom"))
    new = edit(down, NicChange(network="br-b"), Wiring("br-b", Source("bridge", "br-b"), "br-b"))
    assert '<link state="down"/>' in new.to_xml()
    up = edit(
        Interface.from_xml(LIVE),
        NicChange(network="br-b"),
        Wiring("br-b", Source("bridge", "br-b"), "br-b"),
    )
    assert '<link state="up"/>' in up.to_xml()


def test_network_source_drops_live_only_attributes() -> None:
    live = LIVE.replace("type='bridge'", "type='network'", 1).replace(
        "<source bridge='br-a'/>", "<source network='default' portid='x' bridge='virbr0'/>"
    )
    iface = Interface.from_xml(live)
    assert iface.source == Source("network", "default") and iface.bridge == "virbr0"
    iface.source = Source("bridge", "br-b")
    assert etree.fromstring(iface.to_xml()).find("source").attrib == {"bridge": "br-b"}  # type: ignore[union-attr]


def test_domain_uuid_and_rejections() -> None:
    dom = Domain("<domain type='kvm'><name>x</name><devices>" + LIVE + "</devices></domain>")
    assert dom.uuid is None and dom.name == "x" and len(dom.interfaces) == 1
    dom.set_uuid("0b7e3f34-3d68-4cb8-a7ea-c9d04be1a0e1")
    assert Domain(dom.to_xml()).uuid == "0b7e3f34-3d68-4cb8-a7ea-c9d04be1a0e1"
    with pytest.raises(XMLError, match="malformed"):
        Domain("<domain>")
    with pytest.raises(XMLError, match="expected <domain>"):
        Domain(LIVE)
    with pytest.raises(XMLError, match="surrogates"):  # JSON's "\ud800" can carry one
        Domain("<domain><name>x\ud800</name></domain>")
    hostile = '<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]><domain>&e;</domain>'
    assert "root:" not in Domain(hostile).to_xml(), "an external entity was expanded"


def test_a_domain_with_an_accepted_interface_is_a_view() -> None:
    """What a live update libvirt accepted leaves: the domain as read with that interface,
    the read one untouched (a reader may still be answered from it)."""
    other = LIVE.replace("AA:bb:01", "aa:bb:02").replace("vnet7", "vnet8")
    read = Domain(f"<domain><name>vm</name><devices>{LIVE}{other}</devices></domain>")
    after = edit(read.interfaces[0], NicChange(link_up=False), None)
    view = read.with_interface(after)
    assert [i.link_up for i in view.interfaces] == [False, True]
    assert [i.link_up for i in read.interfaces] == [True, True]
    assert view.interface(mac="52:54:00:aa:bb:01") is after
    assert "state" not in read.to_xml()


def test_accessors_follow_edits() -> None:
    """What an interface's accessors read is kept, and forgotten when it is edited."""
    iface = Interface.from_xml(LIVE)
    assert (iface.bridge, iface.source, iface.link_up, iface.mac, iface.alias) == (
        "br-a",
        Source("bridge", "br-a"),
        True,
        "52:54:00:aa:bb:01",
        "net0",
    )
    iface.source = Source("network", "lab")
    iface.link_up = False
    iface.set_mac("52:54:00:AA:BB:02")
    assert (iface.bridge, iface.source, iface.link_up, iface.mac) == (
        None,
        Source("network", "lab"),
        False,
        "52:54:00:aa:bb:02",
    )
    assert iface.definition().alias is None and iface.alias == "net0"


def test_a_relink_keeps_the_portgroup_a_move_drops_it() -> None:
    live = LIVE.replace("type='bridge'", "type='network'", 1).replace(
        "<source bridge='br-a'/>", "<source network='ovn' portgroup='vlan10' portid='x'/>"
    )
    same = Wiring("ovn", Source("network", "ovn"), None)
    relinked = edit(Interface.from_xml(live), NicChange(network="ovn", link_up=False), same)
    source = etree.fromstring(relinked.to_xml()).find("source")
    assert source is not None and source.items() == [("network", "ovn"), ("portgroup", "vlan10")]
    assert (
        "portgroup='vlan10'" in live
        and 'portgroup="vlan10"' in Interface.from_xml(live).definition().to_xml()
    )
    other = Wiring("lab", Source("network", "lab"), None)
    moved = edit(Interface.from_xml(live), NicChange(network="lab"), other)
    source = etree.fromstring(moved.to_xml()).find("source")
    assert source is not None and source.items() == [("network", "lab")]


@pytest.mark.parametrize(("tap", "kept"), [("vnet7", False), ("macvtap3", False), ("vt9a", True)])
def test_a_definition_drops_a_tap_name_libvirt_made_up(tap: str, kept: bool) -> None:
    iface = Interface.from_xml(LIVE.replace("vnet7", tap))
    assert (iface.definition().tap == tap) is kept
    assert iface.tap == tap, "the live copy is left as it is"


def _addr(bus: int, slot: int) -> str:
    return (
        f"<address type='pci' domain='0x0000' bus='{bus:#04x}' slot='{slot:#04x}' function='0x0'/>"
    )


def test_a_free_pci_address_for_a_new_vnic() -> None:
    """Where a new vNIC may go without taking an unplugged one's address: a free slot of
    i440fx's root bus (from 3), or a free PCIe root port's one slot (q35)."""
    devices = f"<interface type='bridge'>{_addr(0, 3)}</interface><video>{_addr(0, 2)}</video>"
    root = "<controller type='pci' index='0' model='pci-root'>{}</controller>"
    pc = Domain(f"<domain><devices>{root.format('')}{devices}</devices></domain>")
    assert pc.free_pci_address({PciAddress(0, 0, 4, 0)}) == PciAddress(0, 0, 5, 0)
    off = root.format("<target hotplug='off'/>")
    assert (
        Domain(f"<domain><devices>{off}{devices}</devices></domain>").free_pci_address(set())
        is None
    ), "hot-plug off, as libvirt writes it"
    ports = "".join(
        f"<controller type='pci' index='{i}' model='pcie-root-port'>{target}{_addr(0, i)}"
        "</controller>"
        for i, target in ((1, ""), (2, ""), (3, "<target hotplug='off'/>"), (4, ""), (5, ""))
    )
    q35 = Domain(
        f"<domain><devices><controller type='pci' index='0' model='pcie-root'/>{ports}"
        f"<interface type='bridge'>{_addr(1, 0)}</interface></devices></domain>"
    )
    assert q35.free_pci_address({PciAddress(0, 2, 0, 0)}) == PciAddress(0, 4, 0, 0)
    full = {PciAddress(0, bus, 0, 0) for bus in (2, 4, 5)}
    assert q35.free_pci_address(full) is None


def test_pci_address_numbers_read_as_libvirt_reads_them() -> None:
    el = etree.fromstring("<address type='pci' domain='0' bus='010' slot='0x1f' function='7'/>")
    assert PciAddress.read(el) == PciAddress(0, 8, 31, 7)  # a leading 0 is octal, as in C
    assert PciAddress.read(PciAddress(0, 8, 31, 7).format()) == PciAddress(0, 8, 31, 7)
