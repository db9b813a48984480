"""The ways to change a vNIC that the bench compares, and the all-vNICs round trips.

``Raw`` is what an admin's libvirt-python script does: read the live XML, find the
``<interface>`` by MAC with lxml, set ``<link state>`` or ``<source bridge>``, and
``updateDeviceFlags(..., AFFECT_LIVE)``; for a persistent VM the same again on the
inactive XML with ``AFFECT_CONFIG`` (vnicd keeps the definition in step too). It
confirms nothing. ``RawChecked`` is that script plus the two reads that vnicd's
guarantees need and the script skips: the VM's status and persistence first (which
decide what to update, and which the answer reports), and the tap's bridge in the kernel
after, checked against the XML's. With a round trip to vnicd added, it is the floor its
request path starts from. ``Vnicd`` sends ``VM.updateDevice`` over the Unix socket, ``Engine``
the same over the engine's wire (JSON-RPC over STOMP 1.2, mutual TLS), as the engine and
vdsm-client do. ``Virsh`` runs ``virsh domif-setlink`` (a link change only).
"""

from __future__ import annotations

import itertools
import json
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
from lxml import etree

from bench.host import Nic, Vm
from vnicd import hostnet
from vnicd.client import Client, RpcError, StompClient, tls_client_context


@dataclass(frozen=True)
class Change:
    """A link state or a bridge; exactly one is set."""

    link_up: bool | None = None
    bridge: str | None = None


class Raw:
    name = "raw libvirt"

    def __init__(self, conn: libvirt.virConnect, persistent: bool) -> None:
        self._conn = conn
        self._persistent = persistent
        self._doms: dict[str, libvirt.virDomain] = {}

    def _dom(self, vm: Vm) -> libvirt.virDomain:
        dom = self._doms.get(vm.uuid)
        if dom is None:
            dom = self._doms[vm.uuid] = self._conn.lookupByUUIDString(vm.uuid)
        return dom

    def warm(self, vms: Sequence[Vm]) -> None:
        """Every VM's handle looked up before the timing, as vnicd keeps its handles."""
        for vm in vms:
            self._dom(vm)

    def change(self, vm: Vm, nic: Nic, change: Change) -> str | None:
        """The change; the bridge the live XML sent names."""
        dom = self._dom(vm)
        bridge = _update(dom, 0, libvirt.VIR_DOMAIN_AFFECT_LIVE, nic, change)
        if self._persistent:
            _update(
                dom, libvirt.VIR_DOMAIN_XML_INACTIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG, nic, change
            )
        return bridge


class RawChecked(Raw):
    """The raw script with the reads that vnicd's guarantees add (see the module's text)."""

    name = "raw libvirt, checked"

    def __init__(self, conn: libvirt.virConnect, persistent: bool) -> None:
        super().__init__(conn, persistent)
        self._kind = "persistent" if persistent else "transient"
        self._filter = (
            libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_PERSISTENT
            if persistent
            else libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_TRANSIENT
        )

    def change(self, vm: Vm, nic: Nic, change: Change) -> None:
        dom = self._dom(vm)
        # status and persistence in one call, as vnicd reads them
        found = self._conn.domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_STATE, self._filter)
        if not found or found[0][1]["state.state"] != libvirt.VIR_DOMAIN_PAUSED:
            raise RuntimeError(f"VM {vm.name} is not a paused {self._kind} VM")
        bridge = super().change(vm, nic, change)
        master = hostnet.master(nic.tap)  # as vnicd confirms a tap
        if master != bridge:
            raise RuntimeError(f"tap {nic.tap} is on {master}, not on {bridge}")


def _update(
    dom: libvirt.virDomain, xml_flags: int, affect: int, nic: Nic, change: Change
) -> str | None:
    root = etree.fromstring(dom.XMLDesc(xml_flags))
    found = root.xpath("devices/interface[mac/@address=$mac]", mac=nic.mac)
    assert isinstance(found, list) and found, f"no vNIC {nic.mac}"
    iface = found[0]
    assert isinstance(iface, etree._Element)
    if change.link_up is not None:
        link = iface.find("link")
        if link is None:
            link = etree.SubElement(iface, "link")
        link.set("state", "up" if change.link_up else "down")
    source = iface.find("source")
    assert source is not None
    if change.bridge is not None:
        source.set("bridge", change.bridge)
    if not affect & libvirt.VIR_DOMAIN_AFFECT_LIVE:
        for live_only in ("target", "alias"):
            for el in iface.findall(live_only):
                iface.remove(el)
    dom.updateDeviceFlags(etree.tostring(iface).decode(), affect)
    return source.get("bridge")


def _params(vm: Vm, nic: Nic, change: Change) -> dict[str, Any]:
    params: dict[str, Any] = {"deviceType": "interface", "macAddr": nic.mac}
    if change.link_up is not None:
        params["linkActive"] = change.link_up
    if change.bridge is not None:
        params["network"] = change.bridge
    return {"vmID": vm.uuid, "params": params}


class Vnicd:
    name = "vnicd"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._client = Client(path)

    def close(self) -> None:
        self._client.close()

    def change(self, vm: Vm, nic: Nic, change: Change) -> None:
        self._client.call("VM.updateDevice", **_params(vm, nic, change))

    def ping(self) -> None:
        """A round trip that reaches vnicd and does nothing there."""
        self._client.call("Host.ping2")

    def call(self, method: str, **params: Any) -> Any:
        return self._client.call(method, **params)


class Engine:
    name = "vnicd, engine wire"

    def __init__(self, port: int, cert: Path, key: Path, ca: Path) -> None:
        tls = tls_client_context(cert, key, ca)
        self._client = StompClient("127.0.0.1", port, tls=tls)

    def close(self) -> None:
        self._client.close()

    def change(self, vm: Vm, nic: Nic, change: Change) -> None:
        self._client.call("VM.updateDevice", **_params(vm, nic, change))

    def ping(self) -> None:
        self._client.call("Host.ping2")


class Virsh:
    name = "virsh"

    def __init__(self, uri: str) -> None:
        self._uri = uri

    def change(self, vm: Vm, nic: Nic, change: Change) -> None:
        assert change.link_up is not None, "virsh domif-setlink changes links only"
        state = "up" if change.link_up else "down"
        subprocess.run(
            ["virsh", "-q", "-c", self._uri, "domif-setlink", vm.name, nic.mac, state],
            check=True,
            capture_output=True,
        )


Method = Raw | Vnicd | Engine | Virsh


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_all(raw: Raw, vms: Sequence[Vm], link_up: bool, threads: int = 8) -> None:
    """Every vNIC, 8 threads: the VMs in parallel, each VM's vNICs in turn."""

    def one_vm(vm: Vm) -> None:
        for nic in vm.nics:
            raw.change(vm, nic, Change(link_up=link_up))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one_vm, vms))


def vnicd_pipelined(path: Path, vms: Sequence[Vm], link_up: bool) -> None:
    """Every vNIC's request written at once on one connection, then every answer read."""
    ids = itertools.count(1)
    lines = [
        json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "VM.updateDevice",
                "params": _params(vm, nic, Change(link_up=link_up)),
                "id": next(ids),
            }
        )
        for vm in vms
        for nic in vm.nics
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        stream = sock.makefile("rwb")
        stream.write("".join(line + "\n" for line in lines).encode())
        stream.flush()
        for _ in lines:
            response = json.loads(stream.readline())
            if "error" in response:
                raise RpcError(response["error"]["code"], response["error"]["message"])
        stream.close()


def vnicd_bulk(vnicd: Vnicd, vms: Sequence[Vm], link_up: bool) -> None:
    """One ``Host.bulkUpdateNics`` call for every vNIC of the bench's VMs."""
    result = vnicd.call(
        "Host.bulkUpdateNics",
        match={"vmIDs": [vm.uuid for vm in vms]},
        change={"linkActive": link_up},
    )
    items = result if isinstance(result, list) else []
    if isinstance(result, dict):
        items = next((v for v in result.values() if isinstance(v, list)), [])
    failed = [r for r in items if isinstance(r, dict) and (r.get("error") or r.get("ok") is False)]
    if failed:
        raise RuntimeError(f"bulk update failed for {len(failed)} vNICs: {failed[:3]}")


def virsh_all(virsh: Virsh, vms: Sequence[Vm], link_up: bool) -> None:
    for vm in vms:
        for nic in vm.nics:
            virsh.change(vm, nic, Change(link_up=link_up))
