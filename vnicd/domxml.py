"""Typed views of the libvirt domain XML that vnicd reads and edits.

Each element vnicd owns (``<source>``, ``<link>``) has a small frozen class with a
read/format pair; :class:`Interface` wraps one ``<interface>`` element and edits
only those children, so everything it does not model (``<address>``, ``<alias>``,
``<target>``, ``<driver>``, ``<rom>``, ``<boot>`` ...) survives untouched. No policy
lives here: what "unwiring" means is decided elsewhere.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from lxml import etree

SourceKind = Literal["bridge", "network"]
T = TypeVar("T")
_UNREAD = object()  # a kept value not read yet (None can be one read)
# Tap names libvirt makes up for a vNIC that names none (it drops them from definitions too)
_GENERATED_TAPS = ("vnet", "macvtap", "macvlan")

# Untrusted XML (VM.create) must not expand entities or reach the network.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


class XMLError(ValueError):
    """The text is not the XML element expected."""


def parse(xml: str, *tags: str) -> etree._Element:
    """Parse untrusted XML whose root must be one of ``tags``."""
    try:
        root = etree.fromstring(xml.encode(), _PARSER)
    except etree.XMLSyntaxError as e:
        raise XMLError(f"malformed XML: {e}") from e
    except UnicodeEncodeError as e:  # a lone surrogate, as JSON's \ud800 can carry
        raise XMLError(f"not text XML can hold: {e.reason} at {e.start}") from e
    if root.tag not in tags:
        raise XMLError(f"expected <{'> or <'.join(tags)}>, found <{root.tag}>")
    return root


def to_string(element: etree._Element) -> str:
    return etree.tostring(element, encoding="unicode")


@dataclass(frozen=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    @classmethod
    def parse(cls, device: etree._Element) -> PciAddress | None:
        return cls.read(device.find("address"))

    @classmethod
    def read(cls, el: etree._Element | None) -> PciAddress | None:
        """From an ``<address>`` element (None: the device has none)."""
        if el is None or el.get("type") != "pci":
            return None
        try:
            return cls(*(_number(el.get(k, "0")) for k in ("domain", "bus", "slot", "function")))
        except ValueError as e:
            raise XMLError(f"bad PCI address: {e}") from e

    def format(self) -> etree._Element:
        return etree.Element(
            "address",
            type="pci",
            domain=f"{self.domain:#06x}",
            bus=f"{self.bus:#04x}",
            slot=f"{self.slot:#04x}",
            function=f"{self.function:#x}",
        )

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


def _number(text: str) -> int:
    """A number as libvirt reads it (C's strtoul, base 0): 0x.. hex, 0.. octal, decimal."""
    if text.lower().startswith("0x"):
        return int(text, 16)
    return int(text, 8) if text.startswith("0") and len(text) > 1 else int(text, 10)


@dataclass(frozen=True)
class Source:
    """Where the tap is attached: a host bridge or a libvirt network."""

    kind: SourceKind
    name: str

    @classmethod
    def read(cls, kind: str | None, el: etree._Element | None) -> Source | None:
        """From an interface's type and its ``<source>`` element, if any."""
        if el is None or kind not in ("bridge", "network"):
            return None
        name = el.get(kind)
        return cls(kind, name) if name else None  # type: ignore[arg-type]

    def format(self, iface: etree._Element) -> None:
        """Replace the type and ``<source>``; the old source's live-only attributes go,
        its ``portgroup`` stays while the network does (a relink, a definition)."""
        old = iface.find("source")
        new = etree.Element("source")
        new.set(self.kind, self.name)
        if old is not None and Source.read(iface.get("type"), old) == self:
            portgroup = old.get("portgroup")
            if portgroup is not None:
                new.set("portgroup", portgroup)
        iface.set("type", self.kind)
        if old is not None:
            old.addnext(new)
            iface.remove(old)
        else:
            mac = iface.find("mac")
            if mac is not None:
                mac.addnext(new)
            else:
                iface.insert(0, new)
        new.tail = old.tail if old is not None else None


@dataclass(frozen=True)
class Link:
    """The virtual cable. libvirt treats a missing ``<link>`` as up, so this does too."""

    up: bool

    @classmethod
    def read(cls, el: etree._Element | None) -> Link:
        """From a ``<link>`` element (None: the interface has none)."""
        return cls(el is None or el.get("state", "up") == "up")

    def format(self, iface: etree._Element) -> None:
        el = iface.find("link")
        if el is None:
            el = etree.SubElement(iface, "link")
        el.set("state", "up" if self.up else "down")


# The vNIC-profile parts of an <interface>: part -> (element, what).
PROFILE_PARTS = {
    "filter": ("filterref", "network filter"),
    "qos": ("bandwidth", "network QoS"),
    "isolation": ("port", "port isolation"),
    "teaming": ("teaming", "failover teaming"),
}
# The parts vnicd changes, live too: libvirt swaps a tap's filter rules in place and puts
# the old ones back when the new fail; a port's isolation vnicd confirms in the kernel and
# puts back there. QoS libvirt leaves half set in the kernel when an update fails (a qdisc
# without its class), where resending the old XML does not reach it; a failover team
# pairs two devices at a plug.
LIVE_PROFILE_PARTS = frozenset({"filter", "isolation"})
Profile = tuple[tuple[str, str], ...]  # (part, its element's XML), for parts that ask


def profile_of(iface: etree._Element) -> Profile:
    """The profile parts an interface asks for, each as its element's XML; an empty
    ``<bandwidth/>`` or ``<port isolated='no'/>`` asks for nothing."""
    found = []
    for part, (tag, _what) in PROFILE_PARTS.items():
        el = iface.find(tag)
        if el is None or (tag == "bandwidth" and len(el) == 0):
            continue
        if tag == "port" and el.get("isolated") != "yes":
            continue
        el = copy.deepcopy(el)  # without its document's namespaces
        el.tail = None
        etree.cleanup_namespaces(el)
        found.append((part, to_string(el)))
    return tuple(found)


def profile_changes(has: Profile, wanted: Profile, parts: Iterable[str]) -> list[str]:
    """The parts among ``parts`` that ``wanted`` asks for otherwise than ``has`` (as
    libvirt compares them: attribute and child order aside, numbers as it prints them)."""
    have, want = dict(has), dict(wanted)
    return [p for p in PROFILE_PARTS if p in parts and _form(want.get(p)) != _form(have.get(p))]


def _form(xml: str | None) -> tuple[Any, ...] | None:
    return None if xml is None else _canonical(parse(xml, *(t for t, _ in PROFILE_PARTS.values())))


def fields_profile(
    filter_name: str | None, parameters: list[dict[str, Any]], qos: dict[str, dict[str, Any]]
) -> Profile:
    """The profile parts an older engine names in fields (a network filter with its
    parameters, QoS by direction), as :func:`profile_of` gives them from XML."""
    iface = etree.Element("interface")
    if filter_name:
        ref = etree.SubElement(iface, "filterref", filter=filter_name)
        for p in parameters:
            etree.SubElement(ref, "parameter", name=str(p["name"]), value=str(p["value"]))
    if qos:
        bandwidth = etree.SubElement(iface, "bandwidth")
        for direction, limits in qos.items():
            etree.SubElement(bandwidth, direction, {k: str(v) for k, v in limits.items()})
    return profile_of(iface)


def _canonical(el: etree._Element, numbers: bool = False) -> tuple[Any, ...]:
    """Order aside; in QoS (``numbers``) numbers as libvirt prints them: a rate of 0 is
    none (libvirt leaves out a zero ``peak``, ``burst`` or ``floor``), ``0100`` is
    ``100``. Elsewhere (a filter's parameters) text is text, as libvirt compares it."""
    numbers = numbers or el.tag == "bandwidth"
    attrs = []
    for key, value in el.attrib.items():
        if numbers and value.isascii() and value.isdigit():
            value = str(int(value))
            if value == "0" and el.tag in ("inbound", "outbound"):
                continue
        attrs.append((str(key), value))
    children = sorted(repr(_canonical(c, numbers)) for c in el if isinstance(c.tag, str))
    return (el.tag, tuple(sorted(attrs)), tuple(children))


# PCI controllers a vNIC can be hot-plugged on, by model: the first slot a device may
# take (a PCIe port has that one slot only; on i440fx's root bus slots 0 and 1 are the
# chipset's and 2 the video's by libvirt's rule).
_HOTPLUG_SLOTS = {
    "pcie-root-port": 0,
    "pcie-switch-downstream-port": 0,
    "pci-root": 3,
    "pci-bridge": 1,
}


class Interface:
    """One ``<interface>`` element: read accessors plus edits of the parts vnicd owns.

    What the accessors read is kept (a listing reads each vNIC's parts many times), and
    the children are indexed by tag in one pass instead of searched for one by one; every
    edit goes through a method here, which forgets both. Edits are made on copies only:
    an interface a snapshot holds, which other threads read, is never edited."""

    def __init__(self, element: etree._Element) -> None:
        if element.tag != "interface":
            raise XMLError(f"expected <interface>, found <{element.tag}>")
        self.element = element
        self._memo: dict[str, Any] = {}
        self._children: dict[Any, etree._Element] | None = None

    @classmethod
    def from_xml(cls, xml: str) -> Interface:
        return cls(parse(xml, "interface"))

    def to_xml(self) -> str:
        return to_string(self.element)

    def copy(self) -> Interface:
        """A detached deep copy: edit it, keep the original for a real rollback."""
        return Interface(copy.deepcopy(self.element))

    def _child(self, tag: str) -> etree._Element | None:
        """The first child ``tag``, as ``find`` would give it."""
        children = self._children
        if children is None:
            children = {}
            for el in self.element:
                children.setdefault(el.tag, el)
            self._children = children  # whole before another thread can see it
        return children.get(tag)

    def _attr(self, child: str, attr: str) -> str | None:
        el = self._child(child)
        return None if el is None else el.get(attr)

    def _kept(self, key: str, read: Callable[[], T]) -> T:
        found = self._memo.get(key, _UNREAD)
        if found is _UNREAD:
            found = self._memo[key] = read()
        return found  # type: ignore[no-any-return]

    def _forget(self) -> None:
        """An edit follows: what was read may change."""
        self._memo.clear()
        self._children = None

    @property
    def kind(self) -> str:
        """libvirt's interface type: bridge, network, direct, ethernet, ..."""
        return self.element.get("type", "")

    @property
    def mac(self) -> str | None:
        mac = self._attr("mac", "address")
        return mac.lower() if mac else None

    @property
    def model(self) -> str | None:
        return self._attr("model", "type")

    @property
    def alias(self) -> str | None:
        return self._attr("alias", "name")

    @property
    def tap(self) -> str | None:
        return self._attr("target", "dev")

    @property
    def address(self) -> PciAddress | None:
        return self._kept("address", lambda: PciAddress.read(self._child("address")))

    @property
    def isolated(self) -> bool:
        """Its bridge port reaches only the bridge's ports that are not isolated."""
        return self._attr("port", "isolated") == "yes"

    @property
    def network_filter(self) -> str | None:
        return self._attr("filterref", "filter")

    @property
    def filter_parameters(self) -> tuple[tuple[str, str], ...]:
        """The network filter's parameters, (name, value) in the XML's order."""
        ref = self._child("filterref")
        if ref is None:
            return ()
        return tuple((p.get("name", ""), p.get("value", "")) for p in ref.iterfind("parameter"))

    @property
    def bridge(self) -> str | None:
        """The host bridge named in the XML (a live libvirt network source names it too)."""
        return self._attr("source", "bridge")

    @property
    def source(self) -> Source | None:
        return self._kept("source", lambda: Source.read(self.kind, self._child("source")))

    @source.setter
    def source(self, value: Source) -> None:
        self._forget()
        value.format(self.element)

    @property
    def link_up(self) -> bool:
        return self._kept("link", lambda: Link.read(self._child("link"))).up

    @link_up.setter
    def link_up(self, up: bool) -> None:
        self._forget()
        Link(up).format(self.element)

    def set_mac(self, mac: str) -> None:
        self._forget()
        el = self.element.find("mac")
        if el is None:
            el = etree.Element("mac")
            self.element.insert(0, el)
        el.set("address", mac.lower())

    def set_address(self, address: PciAddress) -> None:
        self._forget()
        old = self.element.find("address")
        if old is not None:
            self.element.remove(old)
        self.element.append(address.format())

    def set_model(self, model: str) -> None:
        self._forget()
        el = self.element.find("model")
        if el is None:
            el = etree.SubElement(self.element, "model")
        el.set("type", model)

    def set_profile(self, wanted: Profile, parts: Iterable[str]) -> None:
        """The profile ``parts`` as ``wanted`` asks for them; one it lacks goes."""
        self._forget()
        asked = dict(wanted)
        for part in parts:
            tag = PROFILE_PARTS[part][0]
            for old in self.element.findall(tag):
                self.element.remove(old)
            if part in asked:
                self.element.append(parse(asked[part], tag))

    def matches(self, *, alias: str | None = None, mac: str | None = None) -> bool:
        return (alias is None or self.alias == alias) and (mac is None or self.mac == mac.lower())

    def identity(self) -> tuple[str | None, str | None, PciAddress | None]:
        """What must never change while a vNIC lives: MAC, model and guest PCI address."""
        return self.mac, self.model, self.address

    def definition(self) -> Interface:
        """A copy fit for a definition: without what libvirt sets on a running vNIC (its
        own alias, a tap name it made up, a network source's port and bridge), so that
        plugged again it gets them afresh (another vNIC may have that tap name by then).
        A user alias (``ua-``) and a tap name given in the XML stay."""
        kept = self.copy()
        alias = kept.element.find("alias")
        if alias is not None and not str(alias.get("name", "")).startswith("ua-"):
            kept._forget()
            kept.element.remove(alias)
        target = kept.element.find("target")
        if target is not None and str(target.get("dev", "")).startswith(_GENERATED_TAPS):
            kept._forget()
            kept.element.remove(target)
        source = kept.source
        if source is not None:
            kept.source = source
        return kept

    @property
    def profile(self) -> Profile:
        return self._kept("profile", lambda: profile_of(self.element))

    def has_any(self, *tags: str) -> str | None:
        """The first of ``tags`` this interface has as a child, if any."""
        return next((tag for tag in tags if self.element.find(tag) is not None), None)


def network_bridge(xml: str) -> str | None:
    """The host bridge a libvirt network's XML names; None for one without (macvtap,
    hostdev), where libvirt has no bridge to tell."""
    bridge = parse(xml, "network").find("bridge")
    return None if bridge is None else bridge.get("name")


class Domain:
    """A parsed domain definition: identity and interfaces."""

    def __init__(self, xml: str) -> None:
        self.element = parse(xml, "domain")
        self._replaced: dict[str, Interface] = {}  # by MAC: see with_interface
        self._tree_interfaces: list[Interface] | None = None  # the tree's, as first asked for

    @property
    def uuid(self) -> str | None:
        return self.element.findtext("uuid")

    @property
    def name(self) -> str | None:
        return self.element.findtext("name")

    @property
    def interfaces(self) -> list[Interface]:
        found = self._in_tree()
        if not self._replaced:
            return list(found)
        return [self._replaced.get(i.mac or "", i) for i in found]

    def _in_tree(self) -> list[Interface]:
        if self._tree_interfaces is None:
            self._tree_interfaces = [
                Interface(el) for el in self.element.iterfind("devices/interface")
            ]
        return self._tree_interfaces

    def interface(self, *, alias: str | None = None, mac: str | None = None) -> Interface | None:
        return next((i for i in self.interfaces if i.matches(alias=alias, mac=mac)), None)

    def metadata(self, namespace: str) -> str | None:
        """The ``<metadata>`` child in ``namespace``, namespaces stripped (as libvirt's
        metadata API returns it), or None."""
        found = self.element.find(f"metadata/{{{namespace}}}*")
        if found is None:
            return None
        copied = copy.deepcopy(found)
        for el in copied.iter():
            if isinstance(el.tag, str):
                el.tag = etree.QName(el).localname
        etree.cleanup_namespaces(copied)
        return to_string(copied)

    @property
    def pci_addresses(self) -> set[PciAddress]:
        """Every guest PCI address a device of this domain holds."""
        found = (PciAddress.parse(dev) for dev in self.element.iterfind("devices/*"))
        return {a for a in found if a is not None}

    def free_pci_address(self, taken: set[PciAddress]) -> PciAddress | None:
        """A guest PCI address where a vNIC can be plugged that no device of this domain
        and none of ``taken`` holds: the one slot of a free PCIe root or downstream port
        (q35), or a free slot of a conventional PCI bus (i440fx); None if there is none."""
        used = {(a.bus, a.slot) for a in taken | self.pci_addresses if a.domain == 0}
        for el in self.element.iterfind("devices/controller[@type='pci']"):
            first = _HOTPLUG_SLOTS.get(str(el.get("model")))
            if first is None or el.find("target[@hotplug='off']") is not None:
                continue
            bus = _number(el.get("index", "0"))
            last = 0 if first == 0 else 31
            for slot in range(first, last + 1):
                if (bus, slot) not in used:
                    return PciAddress(0, bus, slot, 0)
        return None

    def set_uuid(self, uuid: str) -> None:
        assert not self._replaced, "a view of another domain is not edited"
        el = self.element.find("uuid")
        if el is None:
            el = etree.Element("uuid")
            name = self.element.find("name")
            if name is not None:
                name.addnext(el)
            else:
                self.element.insert(0, el)
        el.text = uuid

    def to_xml(self) -> str:
        assert not self._replaced, "a view of another domain is not serialized"
        return to_string(self.element)

    def with_interface(self, iface: Interface) -> Domain:
        """This domain with ``iface`` in place of the ``<interface>`` of its MAC. A view:
        it shares the tree with this one, which neither changes; only its interfaces see
        ``iface`` (neither is edited or serialized)."""
        view = Domain.__new__(Domain)
        view.element = self.element
        view._replaced = {**self._replaced, iface.mac or "": iface}
        view._tree_interfaces = self._in_tree()
        return view


def hotplug_interface(xml: str) -> Interface:
    """The ``<interface>`` of a hotplug request: bare, or in VDSM's ``<hotplug>`` wrapper."""
    root = parse(xml, "interface", "hotplug")
    found = [root] if root.tag == "interface" else root.findall("devices/interface")
    if len(found) != 1:
        raise XMLError("expected exactly one <interface> in <hotplug><devices>")
    iface = Interface(found[0])
    PciAddress.parse(iface.element)  # a malformed address is the request's fault
    return iface


@dataclass(frozen=True)
class StoredNic:
    """An unplugged vNIC's definition in vnicd's metadata, with the alias it had and whether
    its removal from the guest is still awaited (``pending``)."""

    alias: str
    iface: Interface
    pending: bool = False


def parse_stored(xml: str | None) -> tuple[list[StoredNic], list[Interface]]:
    """vnicd's ``<vnics>`` metadata element: the unplugged vNICs, and the vNICs whose link
    bounce was under way (each as the bounce ends it); raises XMLError when it is
    malformed."""
    if not xml:
        return [], []
    root = parse(xml, "vnics")
    found = []
    for el in root.iterfind("unplugged"):
        iface = _stored_interface(el, "an <unplugged> entry")
        PciAddress.parse(iface.element)
        found.append(StoredNic(el.get("alias", ""), iface, el.get("pending") == "yes"))
    return found, [_stored_interface(el, "a <bounce> entry") for el in root.iterfind("bounce")]


def _stored_interface(entry: etree._Element, what: str) -> Interface:
    iface_el = entry.find("interface")
    if iface_el is None:
        raise XMLError(f"{what} without <interface>")
    iface = Interface(copy.deepcopy(iface_el))
    if iface.mac is None:
        raise XMLError(f"{what} without <mac>")
    return iface


def format_stored(entries: list[StoredNic], bounces: list[Interface]) -> str:
    root = etree.Element("vnics")
    for entry in entries:
        el = etree.SubElement(root, "unplugged", alias=entry.alias)
        if entry.pending:
            el.set("pending", "yes")
        el.append(copy.deepcopy(entry.iface.element))
    for iface in bounces:
        etree.SubElement(root, "bounce").append(copy.deepcopy(iface.element))
    return to_string(root)


OVIRT_VM = "http://ovirt.org/vm/1.0"


@dataclass(frozen=True)
class EngineDevice:
    """What ovirt-engine's ``<hotplug>``/``<hotunplug>`` XML says about one vNIC.

    The engine builds it in LibvirtVmXmlBuilder.writeInterface; the profile features it
    may carry are reported as they are, for the caller to judge.
    """

    kind: str | None
    mac: str | None
    alias: str | None
    model: str | None
    link_up: bool | None
    bridge: str | None
    network: str | None  # a libvirt network's name (type network)
    profile: Profile
    port_mirroring: list[str]
    custom: dict[str, str]


def engine_device(xml: str) -> EngineDevice:
    root = parse(xml, "hotplug", "hotunplug", "interface")
    found = [root] if root.tag == "interface" else root.findall("devices/interface")
    if len(found) != 1:
        raise XMLError(f"expected exactly one <interface> in <{root.tag}><devices>")
    iface = found[0]
    alias = iface.find("alias")
    link = iface.find("link")
    source = iface.find("source")
    name = alias.get("name") if alias is not None else None
    mac = _attr(iface, "mac", "address")
    meta = next(
        (
            d
            for d in root.iterfind(f"metadata/{{{OVIRT_VM}}}vm/{{{OVIRT_VM}}}device")
            if (name is not None and d.get("alias") == name)
            or (mac is not None and str(d.get("mac_address", "")).lower() == mac.lower())
        ),
        None,
    )
    mirrored = [] if meta is None else meta.findall(f"{{{OVIRT_VM}}}portMirroring/*")
    custom = [] if meta is None else list(meta.iterfind(f"{{{OVIRT_VM}}}custom/*"))
    return EngineDevice(
        kind=iface.get("type"),
        mac=mac,
        alias=name,
        model=_attr(iface, "model", "type"),
        link_up=None if link is None else link.get("state") != "down",
        bridge=None if source is None else source.get("bridge"),
        network=None if source is None else source.get("network"),
        profile=profile_of(iface),
        port_mirroring=[str(n.text or "") for n in mirrored],
        custom={etree.QName(c).localname: str(c.text or "") for c in custom},
    )


def _attr(iface: etree._Element, child: str, attr: str) -> str | None:
    el = iface.find(child)
    return None if el is None else el.get(attr)
