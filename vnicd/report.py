"""What the host shows, as the core reports it: vNIC and VM states from parsed XML.

Pure: the kernel's view of each tap (``bridges``) is read by the caller and passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import Interface, Source
from vnicd.model import NicState, Snapshot, VmState, VmStatus
from vnicd.unplugged import Store

WIRABLE = ("bridge", "network")
Namer = Callable[[Source | None], str]


def nic_state(
    iface: Interface, namer: Namer, *, plugged: bool, alias: str = "", bridge: str | None = None
) -> NicState:
    """A vNIC as reported. ``bridge``: the kernel's view when known, else the XML's."""
    source = iface.source
    network = namer(source) if iface.kind in WIRABLE else None
    if bridge is None:
        bridge = iface.bridge or (source.name if source and source.kind == "bridge" else "")
    address = iface.address
    return NicState(
        mac=iface.mac or "",
        alias=alias or iface.alias or "",
        model=iface.model or "",
        kind=iface.kind,
        network=network,
        bridge=bridge,
        link_up=iface.link_up,
        plugged=plugged,
        pci=str(address) if address else "",
        tap=iface.tap or "",
        filter=iface.network_filter or "",
        filter_parameters=iface.filter_parameters,
        isolated=iface.isolated,
    )


def vm_state(
    snap: Snapshot,
    namer: Namer,
    *,
    domain: DomainXML | None = None,
    store: Store | None = None,
    bridges: Mapping[str, str] | None = None,
) -> VmState:
    """The VM with its plugged vNICs (``domain``, default the snapshot's current XML) and
    its unplugged ones (``store``); a stored vNIC the guest still has counts as plugged.
    ``bridges`` (tap -> bridge, the kernel's view) is used for a running VM."""
    domain = domain or snap.current
    store = snap.store if store is None else store
    plugged = domain.interfaces
    nics = [nic_state(i, namer, plugged=True) for i in plugged]
    if snap.active and bridges is not None:
        nics = [_on_kernel(n, bridges) for n in nics]
    if store:
        present = {n.mac for n in nics}
        nics += [
            nic_state(e.iface, namer, plugged=False, alias=e.alias)
            for e in store
            if e.iface.mac not in present
        ]
    return VmState(snap.uuid, snap.name, snap.status, snap.persistent, tuple(nics))


def listed_state(
    state: VmState, status: VmStatus, persistent: bool, bridges: Mapping[str, str] | None
) -> VmState:
    """A state read from the XML alone (:func:`vm_state` without ``bridges``) as a listing
    reports it: with the listing's status and persistence and, for a running VM, the
    kernel's view of each tap (``bridges``)."""
    nics = state.nics if bridges is None else tuple(_on_kernel(n, bridges) for n in state.nics)
    return VmState(state.uuid, state.name, status, persistent, nics)


def _on_kernel(nic: NicState, bridges: Mapping[str, str]) -> NicState:
    """A plugged vNIC with the bridge the kernel has its tap on ("": none)."""
    if not (nic.plugged and nic.tap):
        return nic
    bridge = bridges.get(nic.tap, "")
    return nic if bridge == nic.bridge else replace(nic, bridge=bridge)
