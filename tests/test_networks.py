"""Network names to sources: pure logic, with backends that answer from a table."""

from __future__ import annotations

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


NETWORKS = NetworkMap(
    {"mgmt": Target("bridge", "br-mgmt"), "lab": Target("network", "labnet")},
    [
        Table("bridge", {"br-mgmt": "br-mgmt", "br-x": "br-x", "void": "void"}),
        Table("network", {"labnet": "virbr7"}),
    ],
    unwired_bridge="void",
)


def test_resolve() -> None:
    assert NETWORKS.resolve("mgmt") == Wiring("mgmt", Source("bridge", "br-mgmt"), "br-mgmt")
    assert NETWORKS.resolve("lab") == Wiring("lab", Source("network", "labnet"), "virbr7")
    assert NETWORKS.resolve("br-x") == Wiring("br-x", Source("bridge", "br-x"), "br-x")
    assert NETWORKS.resolve(UNWIRED) == Wiring(UNWIRED, Source("bridge", "void"), "void")


def test_unknown_names_resolve_to_nothing() -> None:
    assert NETWORKS.resolve("nosuch") is None
    assert NETWORKS.resolve("labnet") is None, "a libvirt network is reached by its mapped name"
    assert NETWORKS.resolve("void") is None, "the unwired bridge is not a network"


def test_names_reported() -> None:
    assert NETWORKS.name_of(Source("bridge", "br-mgmt")) == "mgmt"
    assert NETWORKS.name_of(Source("network", "labnet")) == "lab"
    assert NETWORKS.name_of(Source("bridge", "br-x")) == "br-x"
    assert NETWORKS.name_of(Source("bridge", "void")) == UNWIRED
    assert NETWORKS.name_of(None) == UNWIRED


def test_available() -> None:
    assert NETWORKS.available() == [
        {"name": "br-x", "type": "bridge", "bridge": "br-x"},
        {"name": "lab", "type": "network", "bridge": "virbr7"},
        {"name": "mgmt", "type": "bridge", "bridge": "br-mgmt"},
    ]
