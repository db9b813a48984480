"""A thin, blocking wrapper around libvirt with named intent.

Keyword flags map to ``VIR_DOMAIN_AFFECT_*`` here and nowhere else; every XML sent
to libvirt is logged; libvirt errors are re-raised with what vnicd was doing. All
methods block: callers run them off the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from vnicd.model import VmStatus

log = logging.getLogger(__name__)

# libvirt prints every error to stderr unless a handler is set; errors reach us as exceptions.
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

EMBED_QEMU_CONF = """\
# Written by vnicd for libvirt's embedded QEMU driver; rewritten at every start.
user = "root"
group = "root"
security_driver = "none"
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
"""

_STATES = {
    libvirt.VIR_DOMAIN_RUNNING: VmStatus.RUNNING,
    libvirt.VIR_DOMAIN_BLOCKED: VmStatus.RUNNING,
    libvirt.VIR_DOMAIN_PAUSED: VmStatus.PAUSED,
    libvirt.VIR_DOMAIN_PMSUSPENDED: VmStatus.PAUSED,
    libvirt.VIR_DOMAIN_SHUTDOWN: VmStatus.SHUTTING_DOWN,
}

DomainEventCallback = Callable[["Domain", int, int], None]
DeviceEventCallback = Callable[["Domain", str, bool], None]


class HypervisorError(Exception):
    """libvirt refused or failed; says what was attempted and libvirt's cause."""

    def __init__(self, action: str, error: libvirt.libvirtError) -> None:
        self.cause = error.get_error_message() or str(error)
        super().__init__(f"{action}: {self.cause}")


def _affect(live: bool, persistent: bool) -> int:
    return (libvirt.VIR_DOMAIN_AFFECT_LIVE if live else 0) | (
        libvirt.VIR_DOMAIN_AFFECT_CONFIG if persistent else 0
    )


def embed_uri(root: Path) -> str:
    return f"qemu:///embed?root={root}"


def prepare_embed_root(root: Path) -> None:
    """Write the qemu.conf the embedded driver needs (root user, no daemons, no cgroups)."""
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "qemu.conf").write_text(EMBED_QEMU_CONF)


class Domain:
    """One libvirt domain."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self._dom = dom
        self.uuid: str = dom.UUIDString()
        self.name: str = dom.name()

    def _call(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"{action} of VM {self.uuid}", e) from e

    def is_active(self) -> bool:
        return bool(self._call("reading state", self._dom.isActive))

    def is_persistent(self) -> bool:
        return bool(self._call("reading persistence", self._dom.isPersistent))

    def status(self) -> VmStatus:
        state, _reason = self._call("reading state", self._dom.state)
        return _STATES.get(state, VmStatus.STOPPED)

    def xml(self, *, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(self._call("reading XML", self._dom.XMLDesc, flags))

    def update_interface(self, xml: str, *, live: bool, persistent: bool) -> None:
        flags = _affect(live, persistent)
        log.debug("VM %s: updateDeviceFlags(flags=%d) %s", self.uuid, flags, xml)
        self._call("updating interface", self._dom.updateDeviceFlags, xml, flags)

    def attach_interface(self, xml: str, *, live: bool, persistent: bool) -> None:
        log.debug("VM %s: attachDeviceFlags %s", self.uuid, xml)
        self._call(
            "plugging interface", self._dom.attachDeviceFlags, xml, _affect(live, persistent)
        )

    def detach_interface(self, xml: str, *, live: bool, persistent: bool) -> None:
        """Ask for the device's removal; libvirt may return before the guest released it."""
        log.debug("VM %s: detachDeviceFlags %s", self.uuid, xml)
        self._call(
            "unplugging interface", self._dom.detachDeviceFlags, xml, _affect(live, persistent)
        )

    def detach_alias(self, alias: str) -> None:
        """Ask the guest to release a device; returns at once (DEVICE_REMOVED tells when)."""
        log.debug("VM %s: detachDeviceAlias %s", self.uuid, alias)
        self._call(
            "unplugging interface",
            self._dom.detachDeviceAlias,
            alias,
            libvirt.VIR_DOMAIN_AFFECT_LIVE,
        )

    def metadata(self, uri: str) -> str | None:
        """The metadata element in namespace ``uri``: live for a running VM, else saved."""
        try:
            return str(self._dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, uri, 0))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN_METADATA:
                return None
            raise HypervisorError(f"reading metadata of VM {self.uuid}", e) from e

    def set_metadata(
        self, xml: str | None, key: str, uri: str, *, live: bool, persistent: bool
    ) -> None:
        """Replace (or, with None, remove) vnicd's metadata element."""
        log.debug("VM %s: setMetadata %s", self.uuid, xml)
        self._call(
            "writing metadata",
            self._dom.setMetadata,
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            xml,
            key if xml else None,
            uri,
            _affect(live, persistent),
        )

    def start(self) -> None:
        self._call("starting", self._dom.create)

    def destroy(self) -> None:
        log.info("VM %s: destroy", self.uuid)
        self._call("destroying", self._dom.destroy)

    def undefine(self) -> None:
        log.info("VM %s: undefine", self.uuid)
        self._call("undefining", self._dom.undefine)


class Hypervisor:
    """A libvirt connection. Open it only after an event loop implementation is registered."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[int] = []
        self._device_listeners: list[DeviceEventCallback] = []

    @property
    def conn(self) -> libvirt.virConnect:
        if self._conn is None:
            raise RuntimeError("hypervisor connection is not open")
        return self._conn

    def open(self) -> None:
        try:
            self._conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"connecting to {self.uri}", e) from e
        log.info("connected to %s (libvirt %d)", self.uri, libvirt.getVersion())

    def close(self) -> None:
        if self._conn is None:
            return
        for cb in self._callbacks:
            try:
                self._conn.domainEventDeregisterAny(cb)
            except libvirt.libvirtError as e:
                log.warning("deregistering event callback %d: %s", cb, e)
        self._callbacks.clear()
        self._device_listeners.clear()
        self._conn.close()
        self._conn = None

    def _call(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise HypervisorError(action, e) from e

    def domains(self) -> list[Domain]:
        return [Domain(d) for d in self._call("listing VMs", self.conn.listAllDomains, 0)]

    def domain(self, uuid: str) -> Domain | None:
        try:
            return Domain(self.conn.lookupByUUIDString(uuid))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise HypervisorError(f"looking up VM {uuid}", e) from e

    def create(self, xml: str, *, persistent: bool) -> Domain:
        log.info("creating VM (persistent=%s): %s", persistent, xml)
        if not persistent:
            return Domain(self._call("creating VM", self.conn.createXML, xml, 0))
        dom = Domain(self._call("defining VM", self.conn.defineXML, xml))
        try:
            dom.start()
        except HypervisorError as e:
            try:
                dom.undefine()
            except HypervisorError as cleanup:
                log.error("VM %s: undefining after a failed start: %s", dom.uuid, cleanup)
                e.args = (f"{e}; and undefining it failed too: {cleanup}",)
            raise
        return dom

    def networks(self) -> list[str]:
        """libvirt networks, or none where this connection has no network driver."""
        try:
            return sorted(n.name() for n in self.conn.listAllNetworks(0))
        except libvirt.libvirtError as e:
            if e.get_error_code() != libvirt.VIR_ERR_NO_SUPPORT:
                raise HypervisorError("listing libvirt networks", e) from e
            log.debug("no libvirt networks on %s: %s", self.uri, e)
            return []

    def network_bridge(self, name: str) -> str | None:
        """The host bridge behind an active libvirt network, None if there is no such
        network (or no network driver); a failing connection raises."""
        try:
            net = self.conn.networkLookupByName(name)
            return str(net.bridgeName()) if net.isActive() else None
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_SUPPORT):
                return None
            raise HypervisorError(f"looking up network {name}", e) from e

    def on_lifecycle(self, callback: DomainEventCallback) -> None:
        def cb(_conn: Any, dom: libvirt.virDomain, event: int, detail: int, _opaque: Any) -> None:
            callback(Domain(dom), event, detail)

        self._callbacks.append(
            self.conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, cb, None)
        )

    def on_device_removal(self, callback: DeviceEventCallback) -> None:
        """Call ``callback(domain, alias, removed)`` when a guest released a device or refused.

        libvirt takes one callback per event type and connection, so listeners share it.
        """
        if not self._device_listeners:

            def cb(removed: bool) -> Callable[..., None]:
                def handler(_conn: Any, dom: libvirt.virDomain, alias: str, _opaque: Any) -> None:
                    for listener in list(self._device_listeners):
                        listener(Domain(dom), alias, removed)

                return handler

            for event, removed in (
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, True),
                (libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, False),
            ):
                self._callbacks.append(
                    self.conn.domainEventRegisterAny(None, event, cb(removed), None)
                )
        self._device_listeners.append(callback)
