"""From a network name to what a vNIC's ``<source>`` must say, behind a narrow backend boundary.

A backend knows one way a tap reaches a network (a Linux bridge, a libvirt network)
and answers three questions; the wiring core talks only to :class:`NetworkMap`.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        """The kernel bridge behind ``name``, None when it does not exist here."""

    def names(self) -> list[str]:
        """Everything of this kind a vNIC can be wired to on this host."""


class LinuxBridges:
    kind: SourceKind = "bridge"

    def bridge_of(self, name: str) -> str | None:
        return name if hostnet.is_bridge(name) else None

    def names(self) -> list[str]:
        return hostnet.bridges()


class LibvirtNetworks:
    kind: SourceKind = "network"

    def __init__(self, hypervisor: Hypervisor) -> None:
        self._hypervisor = hypervisor

    def bridge_of(self, name: str) -> str | None:
        return self._hypervisor.network_bridge(name)

    def names(self) -> list[str]:
        return self._hypervisor.networks()


class NetworkMap:
    """Network names of this host: configured mappings first, then same-named host bridges."""

    def __init__(
        self,
        mapping: Mapping[str, Target],
        backends: list[NetworkBackend],
        unwired_bridge: str,
    ) -> None:
        self._mapping = dict(mapping)
        self._backends = {b.kind: b for b in backends}
        self.unwired_bridge = unwired_bridge

    def resolve(self, network: str) -> Wiring | None:
        """Where ``network`` leads now, or None when it maps to nothing on this host."""
        if network == UNWIRED:
            return Wiring(UNWIRED, Source("bridge", self.unwired_bridge), self.unwired_bridge)
        target = self._mapping.get(network, Target("bridge", network))
        if target.kind == "bridge" and target.name == self.unwired_bridge:
            return None
        backend = self._backends.get(target.kind)
        bridge = backend.bridge_of(target.name) if backend else None
        if bridge is None:
            return None
        return Wiring(network, Source(target.kind, target.name), bridge)

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

    def available(self) -> list[dict[str, str]]:
        """Every network a vNIC can be wired to now, with its kind and kernel bridge."""
        found: dict[str, dict[str, str]] = {}
        for name, target in self._mapping.items():
            wiring = self.resolve(name)
            if wiring is not None:
                found[name] = {"name": name, "type": target.kind, "bridge": wiring.bridge or ""}
        for kind, backend in self._backends.items():
            for item in backend.names():
                if item == self.unwired_bridge:
                    continue
                name = self.name_of(Source(kind, item))
                if name not in found:
                    found[name] = {
                        "name": name,
                        "type": kind,
                        "bridge": backend.bridge_of(item) or "",
                    }
        return sorted(found.values(), key=lambda n: n["name"])
