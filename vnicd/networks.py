"""From a network name to what a vNIC's ``<source>`` must say, and where its tap really is.

The boundary to how a tap reaches a network (os-vif's plugin boundary is the model): a
:class:`NetworkBackend` names what a vNIC can be wired to (a Linux bridge, a libvirt
network) and the kernel bridge behind it; a :class:`PortBackend` tells where a tap sits
now and puts it back after a failure. The core talks only to :class:`NetworkMap`; a new
kind (Open vSwitch) is a new backend module, not an edit of the core.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from vnicd import hostnet
from vnicd.domxml import Source, SourceKind
from vnicd.hypervisor import Hypervisor

UNWIRED = ""


@dataclass(frozen=True)
class Target:
    """A configured mapping of a network name: a host bridge or a libvirt network."""

    kind: SourceKind
    name: str


@dataclass(frozen=True)
class Wiring:
    """A resolved network: the XML source to write and the kernel bridge to confirm."""

    network: str
    source: Source
    bridge: str | None


class NetworkBackend(Protocol):
    kind: SourceKind

    def bridge_of(self, name: str) -> str | None:
        """The kernel bridge behind ``name``; None when there is no such thing here.
        A host fault raises (it is not an unknown network)."""

    def names(self) -> list[str]:
        """Everything of this kind a vNIC can be wired to on this host."""


class PortBackend(Protocol):
    def where(self, tap: str) -> str | None:
        """The bridge the tap is attached to now, as the host reports it."""

    def port(self, tap: str) -> tuple[str | None, bool]:
        """The bridge the tap is attached to now and whether its port is isolated."""

    def move(self, tap: str, bridge: str, isolated: bool) -> None:
        """Attach the tap to ``bridge``, its port isolated or not (to undo a half-done
        move)."""

    def isolate(self, tap: str, isolated: bool) -> None:
        """Isolate the tap's port, or not (to undo a half-done change)."""

    def masters(self) -> dict[str, str]:
        """Every tap on a bridge and its bridge, read at once (for listings)."""


class LinuxBridges:
    """Host bridges by name; taps enslaved to them in the kernel."""

    kind: SourceKind = "bridge"

    def bridge_of(self, name: str) -> str | None:
        return name if hostnet.is_bridge(name) else None

    def names(self) -> list[str]:
        return hostnet.bridges()

    def where(self, tap: str) -> str | None:
        return hostnet.master(tap)

    def port(self, tap: str) -> tuple[str | None, bool]:
        return hostnet.bridge_port(tap)

    def move(self, tap: str, bridge: str, isolated: bool) -> None:
        hostnet.set_master(tap, bridge, isolated)

    def isolate(self, tap: str, isolated: bool) -> None:
        hostnet.set_isolated(tap, isolated)

    def masters(self) -> dict[str, str]:
        return hostnet.masters()

    @staticmethod
    def ensure_isolated(name: str) -> None:
        hostnet.ensure_isolated_bridge(name)


class LibvirtNetworks:
    kind: SourceKind = "network"

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor

    def bridge_of(self, name: str) -> str | None:
        return self._hypervisor.network_bridge(name)

    def names(self) -> list[str]:
        return self._hypervisor.networks()


class NetworkMap:
    """Network names of this host: configured mappings first, then same-named host
    bridges, then same-named libvirt networks. What :meth:`available` lists resolves."""

    def __init__(
        self,
        mapping: Mapping[str, Target],
        backends: Sequence[NetworkBackend],
        unwired_bridge: str,
        ports: PortBackend,
    ) -> None:
        self._mapping = dict(mapping)
        self._backends = {b.kind: b for b in backends}
        self._mapped = {(t.kind, t.name) for t in self._mapping.values()}
        self.unwired_bridge = unwired_bridge
        self.ports = ports

    def resolve(self, network: str) -> Wiring | None:
        """Where ``network`` leads now, or None when it maps to nothing on this host."""
        if network == UNWIRED:
            return Wiring(UNWIRED, Source("bridge", self.unwired_bridge), self.unwired_bridge)
        if network in self._mapping:
            candidates = [self._mapping[network]]
        else:
            candidates = [Target(kind, network) for kind in self._backends]
        for target in candidates:
            if target.kind == "bridge" and target.name == self.unwired_bridge:
                return None
            if (
                network not in self._mapping
                and target.kind == "network"
                and (target.kind, target.name) in self._mapped
            ):
                continue  # a mapped libvirt network is reached by its mapped name only
            backend = self._backends.get(target.kind)
            bridge = backend.bridge_of(target.name) if backend else None
            if bridge is not None:
                return Wiring(network, Source(target.kind, target.name), bridge)
        return None

    def name_of(self, source: Source | None) -> str:
        """The network name to report for a source: the unwired bridge is ``""``."""
        if source is None:
            return UNWIRED
        if source.kind == "bridge" and source.name == self.unwired_bridge:
            return UNWIRED
        for name, target in self._mapping.items():
            if target.kind == source.kind and target.name == source.name:
                return name
        return source.name

    def available(self) -> list[tuple[str, SourceKind, str]]:
        """Every network a vNIC can be wired to now: name, kind, kernel bridge."""
        found: dict[str, tuple[str, SourceKind, str]] = {}
        for name, target in self._mapping.items():
            wiring = self.resolve(name)
            if wiring is not None:
                found[name] = (name, target.kind, wiring.bridge or "")
        for kind, backend in self._backends.items():
            for item in backend.names():
                name = self.name_of(Source(kind, item))
                if name == UNWIRED or name in found:
                    continue
                wiring = self.resolve(name)
                if wiring is not None and wiring.source == Source(kind, item):
                    found[name] = (name, kind, wiring.bridge or "")
        return sorted(found.values())
