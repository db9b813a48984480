"""Plugging and unplugging vNICs while keeping their identity.

Unplug stores the vNIC's whole definition in the domain's metadata *before* asking
libvirt to detach it, then waits for the guest to release it (DEVICE_REMOVED); plug
attaches the stored definition again, so the vNIC comes back with the same MAC, model,
PCI address, network and link state. A VM that is not running gets both in its
persistent definition. Blocking: the service runs it off the event loop, one call per
VM at a time; libvirt's events reach the waiting thread through :meth:`Plugger.removal`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import TypeVar

from vnicd import errors, hostnet, unplugged
from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import Interface
from vnicd.hypervisor import Domain, HypervisorError
from vnicd.wiring import NicRef, find

log = logging.getLogger(__name__)
E = TypeVar("E", errors.HotplugNicError, errors.HotunplugNicError)


class _Removal:
    """One pending unplug: set when libvirt reports the guest's answer."""

    def __init__(self) -> None:
        self.answered = threading.Event()
        self.removed = False


def random_mac(taken: set[str | None]) -> str:
    """A locally administered QEMU-style MAC that no vNIC of the VM has."""
    while True:
        mac = "52:54:00:" + ":".join(f"{secrets.randbelow(256):02x}" for _ in range(3))
        if mac not in taken:
            return mac


class Plugger:
    def __init__(self, *, unplug_timeout: float) -> None:
        self._timeout = unplug_timeout
        self._pending: dict[tuple[str, str], _Removal] = {}
        self._lock = threading.Lock()

    def removal(self, vm: str, alias: str, removed: bool) -> None:
        """libvirt says the guest released (or refused to release) a device."""
        with self._lock:
            pending = self._pending.get((vm, alias))
        log.info("VM %s device %s: %s", vm, alias, "removed" if removed else "removal refused")
        if pending is not None:
            pending.removed = removed
            pending.answered.set()

    def unplug(self, dom: Domain, ref: NicRef) -> None:
        store = unplugged.load(dom)
        active = dom.is_active()
        current = find(dom.xml(inactive=not active), ref)
        if current is None:
            if store.find(alias=ref.alias, mac=ref.mac) is not None:
                raise self._error(
                    errors.HotunplugNicError, dom, str(ref), "notPlugged", "it is already unplugged"
                )
            raise self._error(
                errors.HotunplugNicError,
                dom,
                str(ref),
                "noNic",
                "there is no such vNIC",
                field=ref.field,
            )
        assert current.mac is not None
        before = store.copy()
        store.put(current.alias or "", current)
        try:
            unplugged.save(dom, store)
            if active:
                self._detach_live(dom, ref, current)
            if dom.is_persistent():
                saved = find(dom.xml(inactive=True), NicRef(mac=current.mac))
                if saved is not None:
                    dom.detach_interface(saved.to_xml(), live=False, persistent=True)
        except HypervisorError as e:
            still = find(dom.xml(inactive=not active), NicRef(mac=current.mac)) is not None
            problem = str(e) if still else f"it left the guest, but its definition kept it: {e}"
            if still:
                self._restore_store(dom, before)
            raise self._error(errors.HotunplugNicError, dom, str(ref), "libvirt", problem) from e
        log.info("VM %s vNIC %s unplugged (%s)", dom.uuid, ref, current.address)

    @staticmethod
    def _restore_store(dom: Domain, store: unplugged.Unplugged) -> None:
        try:
            unplugged.save(dom, store)
        except HypervisorError as e:
            log.error("VM %s: could not restore the unplugged vNIC records: %s", dom.uuid, e)

    def _detach_live(self, dom: Domain, ref: NicRef, current: Interface) -> None:
        """Detach and wait for the guest; on timeout the vNIC stays, plugged and usable."""
        released = self._release(dom, current)
        if released is False:
            raise self._error(
                errors.HotunplugNicError,
                dom,
                str(ref),
                "refused",
                "the guest refused to release it",
            )
        if released is None:
            raise self._error(
                errors.HotunplugNicError,
                dom,
                str(ref),
                "timeout",
                f"the guest did not release it within {self._timeout:g} s; it stays plugged",
            )

    def _release(self, dom: Domain, live: Interface) -> bool | None:
        """Ask the guest to release a vNIC: True when gone, False when refused, None on timeout."""
        key = (dom.uuid, live.alias or "")
        removal = _Removal()
        with self._lock:
            self._pending[key] = removal
        deadline = time.monotonic() + self._timeout
        try:
            dom.detach_interface(live.to_xml(), live=True, persistent=False)
            removal.answered.wait(max(0.0, deadline - time.monotonic()))
        finally:
            with self._lock:
                self._pending.pop(key, None)
        if removal.answered.is_set() and not removal.removed:
            return False
        return True if find(dom.xml(), NicRef(mac=live.mac)) is None else None

    def plug(self, dom: Domain, ref: NicRef) -> None:
        store = unplugged.load(dom)
        entry = store.find(alias=ref.alias, mac=ref.mac)
        active = dom.is_active()
        present = find(dom.xml(inactive=not active), ref)
        if present is not None:
            raise self._error(
                errors.HotplugNicError, dom, str(ref), "alreadyPlugged", "it is already plugged"
            )
        if entry is None:
            raise self._error(
                errors.HotplugNicError,
                dom,
                str(ref),
                "noNic",
                "there is no such unplugged vNIC",
                field=ref.field,
            )
        _alias, iface = entry
        assert iface.mac is not None
        if active and dom.is_persistent():
            stale = find(dom.xml(inactive=True), NicRef(mac=iface.mac))
            if stale is not None:  # the guest released it after an unplug had timed out
                try:
                    dom.detach_interface(stale.to_xml(), live=False, persistent=True)
                except HypervisorError as e:
                    raise self._error(
                        errors.HotplugNicError, dom, str(ref), "libvirt", str(e)
                    ) from e
        self._attach(dom, str(ref), iface)
        store.remove(iface.mac)
        unplugged.save(dom, store)
        log.info("VM %s vNIC %s plugged (%s)", dom.uuid, ref, iface.address)

    def plug_new(self, dom: Domain, iface: Interface) -> None:
        """Plug a vNIC the VM never had; its MAC and PCI address must be free.

        Only vNICs that reach a bridge or a libvirt network are taken: no scripts, no
        other backends. Without a MAC one is chosen here, so live and saved agree.
        """
        kind = iface.element.get("type")
        if kind not in ("bridge", "network"):
            raise errors.InvalidParameter(
                "params.xml", f"a vNIC of type {kind!r} (bridge or network)"
            )
        for tag in ("script", "backend", "ip", "route"):
            if iface.element.find(tag) is not None:
                raise errors.InvalidParameter("params.xml", f"<{tag}> is not accepted in a vNIC")
        domain = DomainXML(dom.xml(inactive=not dom.is_active()))
        store = unplugged.load(dom)
        macs = {i.mac for i in domain.interfaces} | {i.mac for _a, i in store}
        if iface.mac is None:
            iface.set_mac(random_mac(macs))
        name = str(iface.mac)
        if iface.mac in macs:
            raise self._error(
                errors.HotplugNicError,
                dom,
                name,
                "macInUse",
                f"MAC {iface.mac} belongs to another vNIC",
                "params.xml",
            )
        taken = domain.pci_addresses | {i.address for _a, i in store if i.address}
        if iface.address is not None and iface.address in taken:
            raise self._error(
                errors.HotplugNicError,
                dom,
                name,
                "addressInUse",
                f"PCI address {iface.address} is taken",
                "params.xml",
            )
        self._attach(dom, name, iface)

    def _attach(self, dom: Domain, name: str, iface: Interface) -> None:
        """Attach live, confirm, then add to the definition of a persistent VM; or not at all.

        The definition gets the live result (MAC and PCI address as libvirt settled them),
        so the VM boots with the vNIC where the guest has it now.
        """
        active, persistent = dom.is_active(), dom.is_persistent()
        if not active:
            try:
                dom.attach_interface(iface.to_xml(), live=False, persistent=True)
            except HypervisorError as e:
                raise self._error(errors.HotplugNicError, dom, name, "libvirt", str(e)) from e
            return
        try:
            dom.attach_interface(iface.to_xml(), live=True, persistent=False)
        except HypervisorError as e:
            raise self._error(errors.HotplugNicError, dom, name, "libvirt", str(e)) from e
        live = find(dom.xml(), NicRef(mac=iface.mac))
        if live is None:
            raise self._error(
                errors.HotplugNicError, dom, name, "confirm", "libvirt does not show it plugged"
            )
        cause, problem = "confirm", self._misplaced(iface, live)
        if problem is None and persistent:
            try:
                saved = unplugged.definition(live)
                dom.attach_interface(saved.to_xml(), live=False, persistent=True)
            except HypervisorError as e:
                cause, problem = "libvirt", str(e)
        if problem is not None:
            released = self._release(dom, live)
            if released is not True:
                problem += "; and the guest did not release it again: it stays plugged"
            raise self._error(errors.HotplugNicError, dom, name, cause, problem)

    @staticmethod
    def _misplaced(iface: Interface, live: Interface) -> str | None:
        if iface.address is not None and live.address != iface.address:
            return f"it came back at {live.address}, not {iface.address}"
        bridge = live.bridge
        if bridge and live.tap and hostnet.master(live.tap) != bridge:
            return f"its tap {live.tap} is not on {bridge}"
        return None

    @staticmethod
    def _error(
        kind: type[E], dom: Domain, nic: str, cause: str, problem: str, field: str | None = None
    ) -> E:
        verb = "plug" if kind is errors.HotplugNicError else "unplug"
        return kind(
            f"cannot {verb} vNIC {nic} of VM {dom.uuid}: {problem}",
            vmID=dom.uuid,
            nic=nic,
            cause=cause,
            field=field,
        )
