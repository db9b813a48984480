"""Unplugged vNICs, kept in the domain's own ``<metadata>`` in vnicd's namespace.

An unplugged vNIC keeps its whole definition (MAC, model, source, link, PCI address),
so it survives vnicd restarts and comes back exactly as it was. An entry whose MAC is
still in the guest is a pending unplug (the guest has not released it yet): the vNIC
counts as plugged, and the entry only ensures a late release loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from lxml import etree

from vnicd.domxml import Interface, XMLError, parse, to_string
from vnicd.hypervisor import Domain

NAMESPACE = "urn:x-vnicd:unplugged:1"
KEY = "vnicd"


def definition(iface: Interface) -> Interface:
    """What to keep of a plugged vNIC: all but what libvirt sets on a running one (its
    own alias, a network source's port and bridge)."""
    kept = iface.copy()
    alias = kept.element.find("alias")
    if alias is not None and not str(alias.get("name", "")).startswith("ua-"):
        kept.element.remove(alias)
    source = kept.source
    if source is not None:
        kept.source = source
    return kept


class Unplugged:
    """The set of stored vNIC definitions of one domain, with the alias each one had."""

    def __init__(self, entries: dict[str, tuple[str, Interface]] | None = None) -> None:
        self._entries = dict(entries or {})  # MAC -> (alias, definition)

    @classmethod
    def parse(cls, xml: str | None) -> Unplugged:
        if not xml:
            return cls()
        root = parse(xml, "vnics")
        entries = {}
        for el in root.iterfind("unplugged"):
            iface_el = el.find("interface")
            if iface_el is None:
                raise XMLError("an <unplugged> entry without <interface>")
            iface = Interface(iface_el)
            if iface.mac is None:
                raise XMLError("an unplugged <interface> without <mac>")
            entries[iface.mac] = (el.get("alias", ""), iface)
        return cls(entries)

    def format(self) -> str:
        root = etree.Element("vnics")
        for alias, iface in self._entries.values():
            el = etree.SubElement(root, "unplugged", alias=alias)
            el.append(Interface.from_xml(iface.to_xml()).element)
        return to_string(root)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[tuple[str, Interface]]:
        return iter(self._entries.values())

    def find(
        self, *, alias: str | None = None, mac: str | None = None
    ) -> tuple[str, Interface] | None:
        for entry_alias, iface in self._entries.values():
            if (alias is None or alias == entry_alias) and iface.matches(mac=mac):
                return entry_alias, iface
        return None

    def put(self, alias: str, iface: Interface) -> None:
        assert iface.mac is not None
        self._entries[iface.mac] = (alias, definition(iface))

    def remove(self, mac: str) -> None:
        self._entries.pop(mac.lower(), None)

    def copy(self) -> Unplugged:
        return Unplugged(self._entries)


def load(dom: Domain) -> Unplugged:
    return Unplugged.parse(dom.metadata(NAMESPACE))


def save(dom: Domain, store: Unplugged) -> None:
    """Write the store where the VM keeps state: live if running, saved if persistent."""
    dom.set_metadata(
        store.format() if store else None,
        KEY,
        NAMESPACE,
        live=dom.is_active(),
        persistent=dom.is_persistent(),
    )
