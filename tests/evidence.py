"""A vNIC as seen where its state lives: libvirt's live XML, the kernel, and QEMU itself.

Parsed here with lxml directly, independent of vnicd's own XML mapping, so a test
can compare two snapshots and assert that exactly the intended fields changed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from tests.harness import DaemonThread
from tests.hostenv import master


@dataclass(frozen=True)
class Seen:
    mac: str
    alias: str
    model: str
    source_type: str
    source: str
    link_up: bool
    pci: str
    tap: str
    kernel_bridge: str | None
    qemu_slot: tuple[int, int, int]
    qemu_device_id: int


def interfaces(xml: str) -> dict[str, etree._Element]:
    root = etree.fromstring(xml.encode())
    return {
        str(el.find("mac").get("address")).lower(): el  # type: ignore[union-attr]
        for el in root.iterfind("devices/interface")
    }


def pci_of(el: etree._Element) -> str:
    """An interface's guest PCI address from its XML, as bus:slot:function in decimal."""
    addr = el.find("address")
    assert addr is not None, "no <address>"
    return ":".join(str(int(str(addr.get(k)), 16)) for k in ("bus", "slot", "function"))


def seen(vnicd: DaemonThread, vm_id: str, mac: str) -> Seen:
    el = interfaces(vnicd.live_xml(vm_id))[mac]
    kind = str(el.get("type"))
    source = el.find("source")
    link = el.find("link")
    alias = str(el.find("alias").get("name"))  # type: ignore[union-attr]
    tap = str(el.find("target").get("dev"))  # type: ignore[union-attr]
    pci = vnicd.query_pci(vm_id)[alias]
    assert source is not None
    return Seen(
        mac=mac,
        alias=alias,
        model=str(el.find("model").get("type")),  # type: ignore[union-attr]
        source_type=kind,
        source=str(source.get(kind)),
        link_up=link is None or link.get("state") == "up",
        pci=pci_of(el),
        tap=tap,
        kernel_bridge=master(tap),
        qemu_slot=(pci.bus, pci.slot, pci.function),
        qemu_device_id=pci.device,
    )
