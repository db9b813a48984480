"""The unplugged vNICs of one VM, as kept in the domain's own ``<metadata>``, and its
vNICs whose link bounce is under way.

An unplugged vNIC keeps its whole definition (MAC, model, source, link, PCI address), so
it survives vnicd restarts and comes back exactly as it was. An entry marked ``pending``
was written before its removal from the guest was asked for: while the guest still has
the vNIC it counts as plugged, and a late release finishes the unplug (see
:func:`vnicd.planning.plan_reconcile`). A bounce mark is written in the live metadata
before a link bounce takes a vNIC's link down, and removed once the change is done (any
other change of the vNIC removes it too): a vnicd killed in the bounce's pause leaves it,
and the next one links the vNIC up at start (see :func:`vnicd.planning.plan_bounce_ends`).
The XML codec is :mod:`vnicd.domxml`'s; this is the set.
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
    """Stored vNIC definitions and bounce marks, by MAC. Immutable: edits return a new
    store. Iterating gives the stored vNICs."""

    def __init__(
        self, entries: list[StoredNic] | None = None, bounces: list[Interface] | None = None
    ) -> None:
        self._entries = {e.iface.mac: e for e in entries or [] if e.iface.mac}
        self._bounces = {i.mac: i for i in bounces or [] if i.mac}

    @classmethod
    def parse(cls, xml: str | None) -> Store:
        return cls(*parse_stored(xml))

    def format(self) -> str | None:
        """The metadata element, or None when there is nothing to keep."""
        if not self:
            return None
        return format_stored(list(self._entries.values()), list(self._bounces.values()))

    def __bool__(self) -> bool:
        return bool(self._entries or self._bounces)

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
        return Store(list(entries.values()), self.bounces)

    def remove(self, mac: str) -> Store:
        entries = [e for m, e in self._entries.items() if m != mac.lower()]
        return Store(entries, self.bounces)

    @property
    def bounces(self) -> list[Interface]:
        """Each vNIC whose link bounce is under way, as the bounce ends it."""
        return list(self._bounces.values())

    def bouncing(self, iface: Interface) -> Store:
        """With a bounce mark for ``iface`` (as the bounce ends it)."""
        return Store(list(self), [*self.bounces, iface])

    def bounced(self, mac: str) -> Store:
        """Without the bounce mark of ``mac`` (this store when it has none)."""
        if mac.lower() not in self._bounces:
            return self
        return Store(list(self), [i for i in self.bounces if i.mac != mac.lower()])

    def unmarked(self) -> Store:
        """The stored vNICs alone: what a definition keeps (a mark is of the running guest)."""
        return Store(list(self)) if self._bounces else self
