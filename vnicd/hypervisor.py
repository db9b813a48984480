"""A thin, blocking wrapper around libvirt with named intent.

Keyword flags map to ``VIR_DOMAIN_AFFECT_*`` here and nowhere else; every XML sent
to libvirt is logged; libvirt errors are re-raised with what vnicd was doing. All
methods block: callers run them off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import libvirt

from vnicd import domxml
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
    # kept by on_crash=preserve: its QEMU lives on with the vCPUs stopped and takes live
    # changes as a paused VM does (a crashed VM that stopped is shut off, reason crashed)
    libvirt.VIR_DOMAIN_CRASHED: VmStatus.PAUSED,
}

# lifecycle events after which a kept handle may be of a VM that is gone
_GONE = frozenset({libvirt.VIR_DOMAIN_EVENT_UNDEFINED, libvirt.VIR_DOMAIN_EVENT_STOPPED})

# domainListGetStats() filters that answer for a VM only if it is (True) or is not persistent
_PERSISTENCE = {
    True: libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_PERSISTENT,
    False: libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_TRANSIENT,
}

DomainEventCallback = Callable[["Domain", int, int], None]
DeviceEventCallback = Callable[["Domain", str, bool], None]


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "libvirtd stopped answering keepalives",
}


class HypervisorError(Exception):
    """libvirt refused or failed; says what was attempted and libvirt's cause."""

    def __init__(self, action: str, error: libvirt.libvirtError) -> None:
        self.cause = error.get_error_message() or str(error)
        self.code: int | None = error.get_error_code()
        super().__init__(f"{action}: {self.cause}")

    @property
    def gone(self) -> bool:
        """libvirt has no such VM (any more)."""
        return bool(self.code == libvirt.VIR_ERR_NO_DOMAIN)


class HypervisorDown(HypervisorError):
    """The libvirt connection is down and vnicd is reconnecting: nothing was attempted."""

    def __init__(self, uri: str, reason: str) -> None:
        self.uri = uri
        self.reason = reason
        self.code = None
        self.cause = f"libvirt connection to {uri} is down ({reason}); vnicd is reconnecting"
        Exception.__init__(self, self.cause)


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

    def __init__(self, dom: libvirt.virDomain, *, persistent: bool = False) -> None:
        """``persistent``: as last seen (an engine's VMs are transient)."""
        self._dom = dom
        self.uuid: str = dom.UUIDString()
        self.name: str = dom.name()
        self._persistent = persistent

    @property
    def persistent(self) -> bool:
        """As last seen; :meth:`presence` reads it."""
        return self._persistent

    @property
    def connection(self) -> libvirt.virConnect:
        return self._dom.connect()

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

    def presence(self) -> tuple[VmStatus, bool] | None:
        """Status and persistence, None once the VM is gone: one round trip while the
        persistence is as last seen, two when it changed."""
        conn, stat = self._dom.connect(), libvirt.VIR_DOMAIN_STATS_STATE
        for persistent in (self._persistent, not self._persistent):  # as last seen first
            flags = _PERSISTENCE[persistent]
            found = self._call("reading state", conn.domainListGetStats, [self._dom], stat, flags)
            if found:
                self._persistent = persistent
                return _STATES.get(found[0][1].get("state.state"), VmStatus.STOPPED), persistent
        try:  # neither: gone, or undefined between the two calls
            return self.status(), self.is_persistent()
        except HypervisorError as e:
            if e.gone:
                return None
            raise

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


@dataclass(frozen=True)
class Listed:
    """A VM as a listing found it."""

    domain: Domain
    status: VmStatus
    persistent: bool


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


class Hypervisor:
    """A managed libvirt connection. Open it only after :func:`vnicd.eventloop.start` and
    :meth:`bind`.

    On a remote URI (libvirtd) the connection is watched by libvirt's keepalive and a close
    callback: once it is lost, :attr:`conn` raises :class:`HypervisorDown` at once (no caller
    waits on a dead socket) until :meth:`reopen` succeeds. Event listeners survive reopening.
    """

    def __init__(self, uri: str, *, keepalive: tuple[int, int] = (5, 3)) -> None:
        self.uri = uri
        self.remote = urlsplit(uri).path != "/embed"
        self._keepalive = keepalive
        self._conn: libvirt.virConnect | None = None
        self._down: str | None = "not connected yet"
        self._callbacks: list[int] = []
        self._lifecycle_listeners: list[DomainEventCallback] = []
        self._device_listeners: list[DeviceEventCallback] = []
        self._lost: Callable[[str], None] | None = None
        self._domains: dict[str, Domain] = {}  # handles of the standing connection, by UUID
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def conn(self) -> libvirt.virConnect:
        conn = self._conn
        if conn is None or self._down is not None:
            raise HypervisorDown(self.uri, self._down or "not connected")
        return conn

    @property
    def up(self) -> bool:
        return self._conn is not None and self._down is None

    def alive(self) -> bool:
        """Whether the connection stands: a call that failed may have lost it, before the
        close callback says so."""
        conn = self._conn
        return conn is not None and self._down is None and _alive(conn)

    def holds(self, dom: Domain) -> bool:
        """Whether ``dom`` was looked up on the connection that stands now: calls made on a
        connection lost since may have been carried out, or not."""
        return self.alive() and dom.connection is self._conn

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The asyncio loop event listeners run on."""
        self._loop = loop

    def on_connection_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(reason)`` from libvirt's event thread when it drops the connection."""
        self._lost = callback

    def open(self) -> None:
        """Connect, watch the connection (remote URIs) and register the event callbacks."""
        if self._loop is None:
            raise RuntimeError("bind() the loop events go to before open()")
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as e:
            raise HypervisorError(f"connecting to {self.uri}", e) from e
        try:
            if self.remote:
                conn.setKeepAlive(*self._keepalive)
                conn.registerCloseCallback(self._closed, None)
            self._register(conn)
        except libvirt.libvirtError as e:
            self._drop(conn)
            raise HypervisorError(f"watching the connection to {self.uri}", e) from e
        self._conn = conn
        self._down = None
        if self.remote and not _alive(conn):  # lost before its close callback counted
            self._down = "lost while connecting"
            raise HypervisorDown(self.uri, self._down)
        log.info("connected to %s (libvirt %d)", self.uri, libvirt.getVersion())

    def reopen(self) -> None:
        """Drop a lost connection and connect again; listeners are registered on the new one."""
        self._domains.clear()
        old, self._conn = self._conn, None
        if old is not None:
            self._drop(old)
        self.open()

    def close(self) -> None:
        self._domains.clear()
        conn, self._conn = self._conn, None
        self._down = "closed"
        if conn is not None:
            self._drop(conn)
        self._lifecycle_listeners.clear()
        self._device_listeners.clear()

    def ping(self) -> None:
        """Raise unless the connection is up and libvirt answers a call through it."""
        conn = self.conn
        self._call("checking the connection", conn.getLibVersion)
        if not conn.isAlive():
            raise HypervisorDown(self.uri, "connection is not alive")

    def _closed(self, _conn: Any, reason: int, _opaque: Any) -> None:
        if reason == libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT or self._down is not None:
            return
        self._down = _CLOSE_REASONS.get(reason, f"closed (reason {reason})")
        log.error("libvirt connection to %s lost: %s", self.uri, self._down)
        if self._lost is not None:
            self._lost(self._down)

    def _drop(self, conn: libvirt.virConnect) -> None:
        """Forget a connection, its callbacks first; a dead one refuses them: that is fine."""
        for cb in self._callbacks:
            try:
                conn.domainEventDeregisterAny(cb)
            except libvirt.libvirtError as e:
                log.debug("deregistering event callback %d: %s", cb, e)
        self._callbacks.clear()
        if self.remote:
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
        try:
            conn.close()
        except libvirt.libvirtError as e:
            log.debug("closing the connection to %s: %s", self.uri, e)

    def _deliver(self, listener: Callable[..., None], *args: Any) -> None:
        """An event, from libvirt's event thread, to a listener on the bound loop (none
        once that loop is closed: nothing is left to hear it)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(listener, *args)
        except RuntimeError:
            log.debug("event for %s after the loop closed: dropped", listener)

    def _register(self, conn: libvirt.virConnect) -> None:
        """One libvirt callback per event type, shared by every listener."""

        def lifecycle(_c: Any, dom: libvirt.virDomain, event: int, detail: int, _o: Any) -> None:
            if event in _GONE:
                self._domains.pop(dom.UUIDString(), None)
            for listener in list(self._lifecycle_listeners):
                self._deliver(listener, Domain(dom), event, detail)

        def removal(removed: bool) -> Callable[..., None]:
            def handler(_c: Any, dom: libvirt.virDomain, alias: str, _o: Any) -> None:
                for listener in list(self._device_listeners):
                    self._deliver(listener, Domain(dom), alias, removed)

            return handler

        self._callbacks = [
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, removal(True), None
            ),
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED, removal(False), None
            ),
        ]

    def _call(self, action: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except libvirt.libvirtError as e:
            raise HypervisorError(action, e) from e

    def listing(self) -> list[Listed]:
        """Every VM with its status and persistence, in two calls whatever their number
        (asked VM by VM, each costs a round trip to libvirtd)."""
        conn = self.conn
        persistent_flag = libvirt.VIR_CONNECT_LIST_DOMAINS_PERSISTENT
        persistent = {
            d.UUIDString() for d in self._call("listing VMs", conn.listAllDomains, persistent_flag)
        }
        stats = self._call("listing VMs", conn.getAllDomainStats, libvirt.VIR_DOMAIN_STATS_STATE, 0)
        found = []
        for dom, values in stats:
            listed = Domain(dom, persistent=dom.UUIDString() in persistent)
            status = _STATES.get(values.get("state.state"), VmStatus.STOPPED)
            if status is VmStatus.STOPPED and not listed.persistent:
                continue  # a transient VM going away, or one defined between the two calls
            found.append(Listed(listed, status, listed.persistent))
        self._domains = {vm.domain.uuid: vm.domain for vm in found}  # a gone VM's goes too
        return found

    def domain(self, uuid: str) -> Domain | None:
        """The VM's handle, kept from a lookup or listing on this connection: libvirt finds
        a domain by the UUID in it, so a kept handle of a VM gone since fails like a new
        lookup would (see :meth:`Domain.presence`). ``uuid`` in canonical form."""
        conn = self.conn
        found = self._domains.get(uuid)
        if found is not None and found.connection is conn:
            return found
        return self.lookup(uuid)

    def lookup(self, uuid: str) -> Domain | None:
        """Whether libvirt has the VM now, asked of it (and the handle kept)."""
        try:
            dom = Domain(self.conn.lookupByUUIDString(uuid))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                self._domains.pop(uuid, None)
                return None
            raise HypervisorError(f"looking up VM {uuid}", e) from e
        self._domains[uuid] = dom
        return dom

    def forget(self, uuid: str) -> None:
        """Drop a kept handle: the VM is gone."""
        self._domains.pop(uuid, None)

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
        network, it has no bridge (macvtap, hostdev) or there is no network driver; a
        failing connection raises."""
        try:
            net = self.conn.networkLookupByName(name)
            return domxml.network_bridge(str(net.XMLDesc(0))) if net.isActive() else None
        except libvirt.libvirtError as e:
            if e.get_error_code() in (libvirt.VIR_ERR_NO_NETWORK, libvirt.VIR_ERR_NO_SUPPORT):
                return None
            raise HypervisorError(f"looking up network {name}", e) from e

    def on_lifecycle(self, callback: DomainEventCallback) -> None:
        self._lifecycle_listeners.append(callback)

    def on_device_removal(self, callback: DeviceEventCallback) -> None:
        """Call ``callback(domain, alias, removed)`` when a guest released a device or refused."""
        self._device_listeners.append(callback)
