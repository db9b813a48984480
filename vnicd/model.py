"""The core's vocabulary: how a request names a vNIC, what it asks, and what the host shows.

Frozen values, built once at the API boundary (requests) or from one read of a domain
(:class:`Snapshot`). No wire names here: the API layer maps these to and from JSON.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import Interface, XMLError
from vnicd.unplugged import NAMESPACE, Store


class VmStatus(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting down"
    STOPPED = "stopped"


@dataclass(frozen=True)
class NicRef:
    """How a request names a vNIC: by libvirt alias, by MAC, or both (both must match)."""

    alias: str | None = None
    mac: str | None = None

    def __str__(self) -> str:
        return self.alias or self.mac or "?"


@dataclass(frozen=True)
class NicChange:
    """What to change; None keeps the current value. ``bounce``: seconds the link stays
    down around a move of a linked vNIC (None: no bounce). ``only_on``: change it only if
    it is still on this network when its turn comes (a bulk change matched it by network).
    ``profile``: the vNIC profile parts asked for, as (part, element XML): a network
    filter and port isolation are set, the other parts must be the vNIC's own (see
    ``domxml.LIVE_PROFILE_PARTS``);
    ``profile_parts``: the parts the request speaks of (None: all, as an XML does).
    ``resend``: the vNIC is sent even when nothing in it changes (hooks must see the
    request: its custom properties may be all that changed)."""

    link_up: bool | None = None
    network: str | None = None
    model: str | None = None
    bounce: float | None = None
    only_on: str | None = None
    profile: tuple[tuple[str, str], ...] | None = None
    profile_parts: frozenset[str] | None = None
    resend: bool = False


@dataclass(frozen=True)
class NicState:
    """One vNIC as the host shows it. ``network`` is "" when unwired and None when the vNIC
    is not on any network vnicd manages (e.g. ``direct`` or ``ethernet``)."""

    mac: str
    alias: str
    model: str
    kind: str
    network: str | None
    bridge: str
    link_up: bool
    plugged: bool
    pci: str
    tap: str
    filter: str = ""  # the libvirt network filter on its tap, "" for none
    filter_parameters: tuple[tuple[str, str], ...] = ()  # (name, value)
    isolated: bool = False  # its bridge port reaches only ports that are not

    @property
    def filter_text(self) -> str:
        """The filter for a log line: its name, its parameters in parentheses."""
        parameters = ",".join(f"{k}={v}" for k, v in self.filter_parameters)
        return f"{self.filter}({parameters})" if parameters else self.filter


@dataclass(frozen=True)
class VmState:
    uuid: str
    name: str
    status: VmStatus
    persistent: bool
    nics: tuple[NicState, ...] = field(default=())

    def nic(self, mac: str) -> NicState | None:
        return next((n for n in self.nics if n.mac == mac), None)


@dataclass(frozen=True)
class Snapshot:
    """One read of a domain: its live and saved XML and vnicd's store, parsed once.

    ``store_error`` says why the store could not be read; reads still report the VM,
    changes are refused before anything is touched.
    """

    uuid: str
    name: str
    status: VmStatus
    persistent: bool
    live: DomainXML | None
    saved: DomainXML | None
    store: Store
    store_error: str | None = None

    @classmethod
    def parse(
        cls,
        uuid: str,
        status: VmStatus,
        persistent: bool,
        live_xml: str | None,
        saved_xml: str | None,
    ) -> Snapshot:
        live = DomainXML(live_xml) if live_xml is not None else None
        saved = DomainXML(saved_xml) if saved_xml is not None else None
        current = live or saved
        assert current is not None, "a domain is live, saved or both"
        try:
            store, problem = Store.parse(current.metadata(NAMESPACE)), None
        except XMLError as e:
            store, problem = Store(), f"vnicd's metadata of VM {uuid} is malformed: {e}"
        return cls(uuid, current.name or "", status, persistent, live, saved, store, problem)

    @property
    def active(self) -> bool:
        return self.live is not None

    @property
    def current(self) -> DomainXML:
        """What the guest has now: live when running, the definition otherwise."""
        found = self.live or self.saved
        assert found is not None
        return found

    def find(self, ref: NicRef) -> Interface | None:
        return self.current.interface(alias=ref.alias, mac=ref.mac)

    def saved_nic(self, mac: str) -> Interface | None:
        return self.saved.interface(mac=mac) if self.saved is not None else None
