"""Nasty names through every field that carries one, on both wires: none accepted, none
looked up in libvirt or sent to it, no host change.

Each value of ``NASTY_NAMES`` (markup, quotes, ``..``, paths, shell, control characters,
too long) goes where a network, a bridge, an alias or a MAC is named: the fields, the
engine's XML (``<source bridge>``, ``<alias>``, ``<mac>``), a new vNIC's XML (its source,
MAC, tap and alias), the old engine's ``nic`` and VM.create's domain XML.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any
from xml.sax.saxutils import quoteattr

import pytest

from tests import abuse
from tests.abuse import NASTY_NAMES, Tally, Target, aimed
from tests.conftest import DOMAIN_TYPE
from tests.engine import EngineClient
from vnicd.client import Client, RpcError

__all__ = ["aimed"]  # the fixture, used by name

Request = tuple[str, dict[str, Any]]
FREE_MAC = "52:54:00:7e:ff:01"


def attr(value: str) -> str:
    return quoteattr(value)


def engine_xml(alias: str, mac: str, bridge: str = "vt-b", root: str = "hotplug") -> str:
    return (
        f"<{root}><devices><interface type='bridge'><alias name={attr(alias)}/>"
        f"<mac address={attr(mac)}/><source bridge={attr(bridge)}/>"
        f"<model type='virtio'/></interface></devices></{root}>"
    )


def new_nic(
    kind: str = "bridge", source: str = "vt-b", mac: str = FREE_MAC, tap: str = "", alias: str = ""
) -> str:
    return (
        f"<interface type='{kind}'><mac address={attr(mac)}/><source {kind}={attr(source)}/>"
        + (f"<target dev={attr(tap)}/>" if tap else "")
        + (f"<alias name={attr(alias)}/>" if alias else "")
        + "<model type='virtio'/></interface>"
    )


def domain(vm_id: str, nic: str) -> str:
    return (
        f"<domain type='{DOMAIN_TYPE}'><name>abuse-{vm_id[:8]}</name><uuid>{vm_id}</uuid>"
        "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
        f"<devices>{nic}</devices></domain>"
    )


def requests(t: Target, v: str) -> Iterator[tuple[str, Request]]:
    """(where the name goes, the request) for one nasty value."""
    vm, alias, mac = t.nics[0]
    dev = {"deviceType": "interface"}
    update = "VM.updateDevice"
    yield "alias", (update, {"vmID": vm, "params": {**dev, "alias": v, "linkActive": False}})
    yield "macAddr", (update, {"vmID": vm, "params": {**dev, "macAddr": v, "linkActive": False}})
    yield "network", (update, {"vmID": vm, "params": {**dev, "alias": alias, "network": v}})
    yield "xml alias", (update, {"vmID": vm, "params": {**dev, "xml": engine_xml(v, mac)}})
    yield "xml mac", (update, {"vmID": vm, "params": {**dev, "xml": engine_xml(alias, v)}})
    yield (
        "xml source bridge",
        (update, {"vmID": vm, "params": {**dev, "xml": engine_xml(alias, mac, v)}}),
    )
    plug, unplug = "VM.hotplugNic", "VM.hotunplugNic"
    for verb in (plug, unplug):
        yield f"{verb} alias", (verb, {"vmID": vm, "params": {"alias": v}})
        yield f"{verb} macAddr", (verb, {"vmID": vm, "params": {"macAddr": v}})
        yield f"{verb} nic.macAddr", (verb, {"vmID": vm, "params": {"nic": {"macAddr": v}}})
        nic = {"macAddr": mac, "alias": v, "network": "vt-b"}
        yield f"{verb} nic.alias", (verb, {"vmID": vm, "params": {"nic": nic}})
        nic = {"macAddr": mac, "network": v}
        yield f"{verb} nic.network", (verb, {"vmID": vm, "params": {"nic": nic}})
    xml = engine_xml(v, mac, root="hotunplug")
    yield "hotunplug xml alias", (unplug, {"vmID": vm, "params": {"xml": xml}})
    for where, xml in (
        ("source bridge", new_nic(source=v)),
        ("source network", new_nic("network", source=v)),
        ("mac", new_nic(mac=v)),
        ("target dev", new_nic(tap=v)),
        ("alias", new_nic(alias=v)),
    ):
        yield f"new vNIC {where}", (plug, {"vmID": vm, "params": {"xml": xml}})
        vm_id = abuse.new_uuid()
        create = ("VM.create", {"vmID": vm_id, "vmParams": {"xml": domain(vm_id, xml)}})
        yield f"VM.create {where}", create
    bulk = "Host.bulkUpdateNics"
    change: dict[str, Any] = {"linkActive": False}
    yield "bulk match.network", (bulk, {"match": {"network": v}, "change": change})
    yield "bulk change.network", (bulk, {"match": {"vmIDs": [vm]}, "change": {"network": v}})


@pytest.fixture(params=["unix", "engine"])
def wire(request: pytest.FixtureRequest, aimed: Target) -> Iterator[Callable[..., Any]]:
    if request.param == "unix":
        with Client(aimed.socket, timeout=abuse.TIMEOUT) as client:
            yield client.call
    else:
        with EngineClient(aimed.port, aimed.certs.ca, aimed.certs.engine) as engine:
            yield engine.call


def test_nasty_names_refused(
    aimed: Target, wire: Callable[..., Any], record_property: Callable[[str, object], None]
) -> None:
    tally = Tally("names: nasty network, bridge, alias and MAC values")
    before = aimed.settled()
    wrong: list[str] = []
    with abuse.spying() as spy, abuse.problems() as logged:
        for value in NASTY_NAMES:
            for where, (verb, params) in requests(aimed, value):
                tally.sent += 1
                tally.kinds[where] += 1
                try:
                    wire(verb, **params)
                except RpcError as e:
                    tally.answered += 1
                    tally.codes[e.code] += 1
                    if e.code != -32602:
                        wrong.append(f"{where} {value!r}: {e.code} {e.message[:200]}")
                else:
                    tally.successes += 1
                    wrong.append(f"{where} {value!r}: accepted")
    tally.host_checks = 1
    changed = abuse.differences(before, aimed.fingerprint())
    tally.host_changes = len(changed)
    tally.crashes = len(logged.records)
    tally.report(record_property)
    assert not wrong, f"{len(wrong)} not refused as invalid:\n" + "\n".join(wrong[:40])
    assert not spy.calls, f"reached libvirt or the kernel: {spy.args[:10]}"
    assert not changed and not logged.records
