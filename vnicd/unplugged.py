"""The unplugged vNICs of one VM, as kept in the domain's own ``<metadata>``.

An unplugged vNIC keeps its whole definition (MAC, model, source, link, PCI address), so
it survives vnicd restarts and comes back exactly as it was. An entry marked ``pending``
was written before its removal from the guest was asked for: while the guest still has
the vNIC it counts as plugged, and a late release finishes the unplug (see
:mod:`vnicd.reconcile`). The XML codec is :mod:`vnicd.domxml`'s; this is the set.
"""

from __future__ import annotations

from collections.abc import Iterator

from vnicd.domxml import Interface, StoredNic, format_stored, parse_stored

NAMESPACE = "urn:x-vnicd:unplugged:1"
KEY = "vnicd"


def mentions_store(domain_xml: str) -> bool:
    """Whether a domain's XML may hold stored vNICs: a cheap test before parsing it."""
    return NAMESPACE in domain_xml


class Store:
    """Stored vNIC definitions by MAC. Immutable: edits return a new store."""

    def __init__(self, entries: list[StoredNic] | None = None) -> None:
        self._entries = {e.iface.mac: e for e in entries or [] if e.iface.mac}

    @classmethod
    def parse(cls, xml: str | None) -> Store:
        return cls(parse_stored(xml))

    def format(self) -> str | None:
        """The metadata element, or None when there is nothing to keep."""
        return format_stored(list(self._entries.values())) if self._entries else None

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[StoredNic]:
        return iter(self._entries.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Store) and self.format() == other.format()

    def __hash__(self) -> int:
        return hash(self.format())

    def find(self, *, alias: str | None = None, mac: str | None = None) -> StoredNic | None:
        return next(
            (
                e
                for e in self._entries.values()
                if (alias is None or alias == e.alias) and e.iface.matches(mac=mac)
            ),
            None,
        )

    def put(self, alias: str, iface: Interface, *, pending: bool = False) -> Store:
        assert iface.mac is not None
        entries = dict(self._entries)
        entries[iface.mac] = StoredNic(alias, iface.definition(), pending)
        return Store(list(entries.values()))

    def remove(self, mac: str) -> Store:
        return Store([e for m, e in self._entries.items() if m != mac.lower()])
