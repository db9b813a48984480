"""Rewiring one vNIC: plan on a copy, apply, confirm where it happens, undo for real.

The new ``<interface>`` is always built from libvirt's current XML of that interface,
changing only ``<source>`` and ``<link>``; the original is kept so a failure can be
undone by sending it back *and* by putting the tap back on its bridge in the kernel
(after a partial failure libvirt's XML may name the old bridge while the tap already
sits on the new one, and re-sending the old XML does not move it). Blocking: the
service runs it off the event loop, one call per VM at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vnicd import errors, hostnet, unplugged
from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import Interface
from vnicd.hypervisor import Domain, HypervisorError
from vnicd.networks import UNWIRED, NetworkMap, Wiring

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NicRef:
    """How a request names a vNIC: by libvirt alias or by MAC."""

    alias: str | None = None
    mac: str | None = None

    @property
    def field(self) -> str:
        return "params.alias" if self.alias is not None else "params.macAddr"

    def __str__(self) -> str:
        return self.alias or self.mac or "?"


@dataclass(frozen=True)
class NicChange:
    """What to change; None keeps the current value."""

    link_up: bool | None = None
    network: str | None = None
    model: str | None = None


class ConfirmError(Exception):
    """The host does not show the state that was asked for."""


def find(domain_xml: str, ref: NicRef) -> Interface | None:
    for iface in DomainXML(domain_xml).interfaces:
        if iface.matches(alias=ref.alias, mac=ref.mac):
            return iface
    return None


def plan(current: Interface, change: NicChange, wiring: Wiring | None) -> Interface:
    """The interface as it must be after the change. ``<link>`` is always explicit,
    because libvirt reads a missing one as up and would reconnect an unlinked vNIC."""
    new = current.copy()
    if wiring is not None:
        new.source = wiring.source
    if wiring is not None and wiring.network == UNWIRED:
        new.link_up = False
    elif change.link_up is not None:
        new.link_up = change.link_up
    else:
        new.link_up = current.link_up
    return new


class Rewirer:
    """Applies vNIC changes to one domain at a time."""

    def __init__(self, networks: NetworkMap, *, persist_running: bool = True) -> None:
        self._networks = networks
        self._persist_running = persist_running

    def update(self, dom: Domain, ref: NicRef, change: NicChange) -> None:
        """Change a vNIC live (and in the persistent definition), or not at all."""
        wiring = self._resolve(dom, ref, change)
        active = dom.is_active()
        current = find(dom.xml(inactive=not active), ref)
        if current is None:
            self._update_unplugged(dom, ref, change, wiring)
        elif active:
            self._update_live(dom, ref, change, wiring, current)
        else:
            self._update_definition(dom, ref, change, wiring, current)

    def _update_live(
        self, dom: Domain, ref: NicRef, change: NicChange, wiring: Wiring | None, current: Interface
    ) -> None:
        self._check(dom, ref, current, change)
        new = plan(current, change, wiring)
        config: tuple[Interface, Interface] | None = None
        if self._persist_running and dom.is_persistent():
            # A vNIC attached live only has no saved definition to keep in step.
            saved = find(dom.xml(inactive=True), NicRef(mac=current.mac))
            if saved is not None:
                config = (saved, plan(saved, change, wiring))
        if new.to_xml() == current.to_xml() and (
            config is None or config[0].to_xml() == config[1].to_xml()
        ):
            return
        old_bridge = current.bridge
        new_bridge = wiring.bridge if wiring else old_bridge
        try:
            dom.update_interface(new.to_xml(), live=True, persistent=False)
            self._confirm(dom, new, new_bridge)
            if config is not None:
                dom.update_interface(config[1].to_xml(), live=False, persistent=True)
        except (HypervisorError, ConfirmError, hostnet.HostNetError) as e:
            problems = self._rollback(dom, current, old_bridge)
            raise self._failure(dom, ref, e, problems) from e
        self._sync_pending_unplug(dom, new)
        log.info(
            "VM %s vNIC %s: network %r -> %r, link %s -> %s",
            dom.uuid,
            ref,
            self._networks.name_of(current.source),
            self._networks.name_of(new.source),
            "up" if current.link_up else "down",
            "up" if new.link_up else "down",
        )

    def _update_definition(
        self, dom: Domain, ref: NicRef, change: NicChange, wiring: Wiring | None, current: Interface
    ) -> None:
        """A VM that is not running: store the change in its definition, address kept."""
        self._check(dom, ref, current, change)
        new = plan(current, change, wiring)
        if new.to_xml() == current.to_xml():
            return
        try:
            dom.update_interface(new.to_xml(), live=False, persistent=True)
        except HypervisorError as e:
            raise self._failure(dom, ref, e, []) from e
        log.info("VM %s vNIC %s: definition updated", dom.uuid, ref)

    def _update_unplugged(
        self, dom: Domain, ref: NicRef, change: NicChange, wiring: Wiring | None
    ) -> None:
        """An unplugged vNIC: change its stored definition; it takes effect when plugged."""
        store = unplugged.load(dom)
        entry = store.find(alias=ref.alias, mac=ref.mac)
        if entry is None:
            raise errors.NoSuchNic(dom.uuid, str(ref), ref.field)
        alias, current = entry
        self._check(dom, ref, current, change)
        store.put(alias, plan(current, change, wiring))
        try:
            unplugged.save(dom, store)
        except HypervisorError as e:
            raise self._failure(dom, ref, e, []) from e
        log.info("VM %s unplugged vNIC %s: stored definition updated", dom.uuid, ref)

    @staticmethod
    def _sync_pending_unplug(dom: Domain, new: Interface) -> None:
        """A vNIC whose unplug the guest has not acknowledged keeps a stored copy: refresh it."""
        try:
            store = unplugged.load(dom)
            entry = store.find(mac=new.mac)
            if entry is not None:
                store.put(entry[0], new)
                unplugged.save(dom, store)
        except HypervisorError as e:  # the update itself is done; keep it
            log.warning("VM %s: stored copy of vNIC %s not refreshed: %s", dom.uuid, new.mac, e)

    def _resolve(self, dom: Domain, ref: NicRef, change: NicChange) -> Wiring | None:
        if change.network is None:
            return None
        wiring = self._networks.resolve(change.network)
        if wiring is None:
            raise errors.UnknownNetwork(dom.uuid, str(ref), change.network)
        return wiring

    def _check(self, dom: Domain, ref: NicRef, current: Interface, change: NicChange) -> None:
        if change.model is not None and change.model != current.model:
            raise errors.UnsupportedChange(
                dom.uuid,
                str(ref),
                "params.nicModel",
                f"the model is {current.model}; a live update cannot make it {change.model}",
            )
        network = change.network
        if network is None:
            network = self._networks.name_of(current.source)
        if change.link_up and network == UNWIRED:
            raise errors.UnsupportedChange(
                dom.uuid, str(ref), "params.linkActive", "an unwired vNIC cannot be linked"
            )

    def _confirm(self, dom: Domain, expected: Interface, bridge: str | None) -> None:
        now = find(dom.xml(), NicRef(mac=expected.mac))
        if now is None:
            raise ConfirmError(f"vNIC {expected.mac} is gone from the live XML")
        if now.source != expected.source or now.link_up != expected.link_up:
            raise ConfirmError(
                f"libvirt reports {now.source} link {'up' if now.link_up else 'down'}, "
                f"expected {expected.source} link {'up' if expected.link_up else 'down'}"
            )
        if bridge is not None and now.tap is not None:
            actual = hostnet.master(now.tap)
            if actual != bridge:
                raise ConfirmError(f"tap {now.tap} is on {actual}, expected {bridge}")

    def _rollback(self, dom: Domain, original: Interface, bridge: str | None) -> list[str]:
        """Restore the original state; return what could not be restored."""
        problems: list[str] = []
        try:
            dom.update_interface(original.to_xml(), live=True, persistent=False)
        except HypervisorError as e:
            problems.append(str(e))
        try:
            tap = original.tap
            if bridge is not None and tap is not None and hostnet.master(tap) != bridge:
                hostnet.set_master(tap, bridge)
            self._confirm(dom, original, bridge)
        except (HypervisorError, ConfirmError, hostnet.HostNetError) as e:
            problems.append(str(e))
        if problems:
            log.error("VM %s: rollback of vNIC %s incomplete: %s", dom.uuid, original.mac, problems)
        return problems

    def _failure(
        self, dom: Domain, ref: NicRef, cause: Exception, problems: list[str]
    ) -> errors.UpdateDeviceFailed:
        outcome = (
            f"rollback incomplete: {'; '.join(problems)}"
            if problems
            else "the previous state was restored"
        )
        return errors.UpdateDeviceFailed(
            f"updating vNIC {ref} of VM {dom.uuid} failed: {cause}; {outcome}",
            vmID=dom.uuid,
            nic=str(ref),
            cause=str(cause),
            rolledBack=not problems,
        )
