"""Network names to sources: pure logic, with backends that answer from a table."""

from __future__ import annotations

import pytest

from vnicd.domxml import Source, SourceKind
from vnicd.networks import UNWIRED, NetworkMap, Target, Wiring


class Table:
    def __init__(self, kind: SourceKind, bridges: dict[str, str]) -> None:
        self.kind = kind
        self._bridges = bridges

    def bridge_of(self, name: str) -> str | None:
        return self._bridges.get(name)

    def names(self) -> list[str]:
        return sorted(self._bridges)


class Ports:
    def __init__(self) -> None:
        self.taps: dict[str, str] = {}

    def where(self, tap: str) -> str | None:
        return self.taps.get(tap)

    def port(self, tap: str) -> tuple[str | None, bool]:
        return self.taps.get(tap), False

    def move(self, tap: str, bridge: str, isolated: bool) -> None:
        self.taps[tap] = bridge

    def isolate(self, tap: str, isolated: bool) -> None:
        raise AssertionError("no port is isolated here")

    def masters(self) -> dict[str, str]:
        return dict(self.taps)


class Broken(Table):
    def bridge_of(self, name: str) -> str | None:
        raise OSError("the host does not answer")


NETWORKS = NetworkMap(
    {"mgmt": Target("bridge", "br-mgmt"), "lab": Target("network", "labnet")},
    [
        Table("bridge", {"br-mgmt": "br-mgmt", "br-x": "br-x", "void": "void"}),
        Table("network", {"labnet": "virbr7", "default": "virbr0", "br-x": "virbr9"}),
    ],
    unwired_bridge="void",
    ports=Ports(),
)


def test_resolve() -> None:
    assert NETWORKS.resolve("mgmt") == Wiring("mgmt", Source("bridge", "br-mgmt"), "br-mgmt")
    assert NETWORKS.resolve("lab") == Wiring("lab", Source("network", "labnet"), "virbr7")
    assert NETWORKS.resolve("br-x") == Wiring("br-x", Source("bridge", "br-x"), "br-x")
    assert NETWORKS.resolve(UNWIRED) == Wiring(UNWIRED, Source("bridge", "void"), "void")


def test_unmapped_libvirt_network_resolves_by_its_name() -> None:
    assert NETWORKS.resolve("default") == Wiring("default", Source("network", "default"), "virbr0")


def test_unknown_names_resolve_to_nothing() -> None:
    assert NETWORKS.resolve("nosuch") is None
    assert NETWORKS.resolve("labnet") is None, "a mapped libvirt network is reached by its name"
    assert NETWORKS.resolve("void") is None, "the unwired bridge is not a network"


def test_names_reported() -> None:
    assert NETWORKS.name_of(Source("bridge", "br-mgmt")) == "mgmt"
    assert NETWORKS.name_of(Source("network", "labnet")) == "lab"
    assert NETWORKS.name_of(Source("bridge", "br-x")) == "br-x"
    assert NETWORKS.name_of(Source("bridge", "void")) == UNWIRED
    assert NETWORKS.name_of(None) == UNWIRED


def test_available_is_exactly_what_resolves() -> None:
    listed = NETWORKS.available()
    assert listed == [
        ("br-x", "bridge", "br-x"),
        ("default", "network", "virbr0"),
        ("lab", "network", "virbr7"),
        ("mgmt", "bridge", "br-mgmt"),
    ]
    for name, kind, bridge in listed:
        wiring = NETWORKS.resolve(name)
        assert wiring is not None and (wiring.source.kind, wiring.bridge) == (kind, bridge)


def test_host_fault_is_not_an_unknown_network() -> None:
    broken = NetworkMap({}, [Broken("bridge", {})], "void", ports=Ports())
    with pytest.raises(OSError, match="does not answer"):
        broken.resolve("br-x")
