"""Planning a vNIC change: from one snapshot of a domain to the exact steps, with no I/O.

Every verb that changes a vNIC (update, plug, unplug, plug of a new vNIC) and the
reconciliation of stored vNICs is planned here as a :class:`Plan`: an ordered list of
steps, each carrying the XML it will send and what it replaces, so the transaction can
apply, confirm and undo them, and a dry run can show them. Checks that refuse a request
happen here, before anything is touched.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from vnicd import errors, names
from vnicd.domxml import LIVE_PROFILE_PARTS, PROFILE_PARTS, Interface, profile_changes
from vnicd.model import NicChange, NicRef, NicState, Snapshot
from vnicd.networks import UNWIRED, Wiring
from vnicd.report import WIRABLE, Namer, nic_state
from vnicd.unplugged import Store

# How a request names a vNIC, for errors: the API layer maps these to its field names.
ALIAS, MAC = "alias", "mac"
HOTPLUG_FORBIDDEN = ("script", "backend", "ip", "route")
# The names an <interface> may carry that reach libvirt and the kernel, and their rules.
_NAMES = (
    ("source", "a network name", names.is_ifname),
    ("mac address", "a MAC address", names.is_mac),
    ("target dev", "an interface name", names.is_ifname),
    ("alias name", "a device alias", names.is_alias),
)


class Action(enum.Enum):
    UPDATE = "update"
    PLUG = "plug"
    UNPLUG = "unplug"
    RECONCILE = "reconcile"


@dataclass(frozen=True)
class LiveUpdate:
    before: Interface
    after: Interface
    bridge: str | None  # the kernel bridge the tap must be on afterwards
    bridge_before: str | None


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class DefinitionUpdate:
    before: Interface
    after: Interface


@dataclass(frozen=True)
class LiveAttach:
    iface: Interface


@dataclass(frozen=True)
class LiveDetach:
    iface: Interface


@dataclass(frozen=True)
class DefinitionAttach:
    """Add ``iface`` to the definition; ``from_live``: as the guest has it now (MAC and PCI
    address as libvirt settled them), ``iface`` being what is expected."""

    iface: Interface
    from_live: bool = False


@dataclass(frozen=True)
class DefinitionDetach:
    iface: Interface


@dataclass(frozen=True)
class StoreWrite:
    before: Store
    after: Store
    best_effort: bool = False  # a failure is logged, not undone (the change itself is done)


Step = (
    LiveUpdate
    | Pause
    | DefinitionUpdate
    | LiveAttach
    | LiveDetach
    | DefinitionAttach
    | DefinitionDetach
    | StoreWrite
)


@dataclass(frozen=True)
class Plan:
    action: Action
    vm: str
    nic: str  # how the request named it, for messages
    mac: str
    steps: tuple[Step, ...]
    before: NicState | None
    after: NicState | None
    store: Store  # the store once the plan is done

    def _last(self, kinds: Any) -> int | None:
        return next(
            (i for i in reversed(range(len(self.steps))) if isinstance(self.steps[i], kinds)),
            None,
        )

    def _xml(self, i: int | None) -> str | None:
        sent = None if i is None else _sent(self.steps[i])
        return None if sent is None else sent.to_xml()

    @property
    def live_xml(self) -> str | None:
        """The ``<interface>`` sent live last (the final one), if any."""
        return self._xml(self._last(LiveUpdate | LiveAttach))

    @property
    def definition_xml(self) -> str | None:
        return self._xml(self._last(DefinitionUpdate | DefinitionAttach))

    def _device_step(self) -> int | None:
        """Where the interface this change is about is sent: the last live step, else the
        last definition step, else the removal."""
        for kinds in (LiveUpdate | LiveAttach, DefinitionUpdate | DefinitionAttach):
            found = self._last(kinds)
            if found is not None:
                return found
        return self._last(LiveDetach | DefinitionDetach)

    @property
    def device_xml(self) -> str | None:
        """The ``<interface>`` this change is about (what a site hook sees): what it sends
        live, else to the definition, else what it removes."""
        return self._xml(self._device_step())

    @property
    def before_xml(self) -> str | None:
        """The ``<interface>`` as it is before this change, where a step replaces one."""
        for step in self.steps:
            if isinstance(step, LiveUpdate | DefinitionUpdate):
                return step.before.to_xml()
            if isinstance(step, LiveDetach | DefinitionDetach):
                return step.iface.to_xml()
        return None

    def rewritten(self, iface: Interface) -> Plan:
        """The plan with ``iface`` sent instead of :attr:`device_xml` (a site hook's
        rewrite): live when the change is live (the definition keeps vnicd's plan, and a
        plugged vNIC's definition is taken from the live result), else in the definition.
        Unplugs send no interface: they stay as they are."""
        i = self._device_step()
        if i is None:
            return self
        steps = list(self.steps)
        step = steps[i]
        if isinstance(step, LiveUpdate | DefinitionUpdate):
            steps[i] = replace(step, after=iface)
        elif isinstance(step, LiveAttach | DefinitionAttach):
            steps[i] = replace(step, iface=iface)
        else:
            return self
        return replace(self, steps=tuple(steps))


def _sent(step: Step) -> Interface | None:
    """The interface a step sends (or, for a removal, names)."""
    if isinstance(step, LiveUpdate | DefinitionUpdate):
        return step.after
    if isinstance(step, LiveAttach | DefinitionAttach | LiveDetach | DefinitionDetach):
        return step.iface
    return None


def edit(current: Interface, change: NicChange, wiring: Wiring | None) -> Interface:
    """The interface as it must be after the change, on a copy. ``<link>`` is always
    explicit: libvirt reads a missing one as up and would reconnect an unlinked vNIC."""
    new = current.copy()
    if wiring is not None:
        new.source = wiring.source
    if wiring is not None and wiring.network == UNWIRED:
        new.link_up = False
    elif change.link_up is not None:
        new.link_up = change.link_up
    else:
        new.link_up = current.link_up
    changed = [p for p in _profile_changes(current, change) if p in LIVE_PROFILE_PARTS]
    if changed:  # the other parts are kept: the live vNIC's are checked to be as asked
        new.set_profile(change.profile or (), changed)
    return new


def _profile_changes(current: Interface, change: NicChange) -> list[str]:
    """The profile parts ``change`` asks for otherwise than ``current`` has them."""
    if change.profile is None:
        return []
    asked = PROFILE_PARTS.keys() if change.profile_parts is None else change.profile_parts
    return profile_changes(current.profile, change.profile, _owned(current, asked))


def _owned(iface: Interface, parts: Iterable[str]) -> list[str]:
    """Of ``parts``, those that are the vNIC's own: a port's isolation on a host bridge
    only (on a libvirt network, the live XML shows the network's)."""
    return [p for p in parts if iface.kind == "bridge" or p != "isolation"]


def _ref_field(ref: NicRef) -> str:
    return ALIAS if ref.alias is not None else MAC


def _usable(snap: Snapshot) -> None:
    if snap.store_error is not None:
        raise errors.GeneralError(snap.store_error, vmID=snap.uuid)


def _check_update(
    snap: Snapshot, ref: NicRef, current: Interface, change: NicChange, namer: Namer
) -> None:
    nic = str(ref)
    if change.only_on is not None and (
        current.kind not in WIRABLE or namer(current.source) != change.only_on
    ):
        raise errors.UnsupportedChange(
            snap.uuid, nic, "only_on", f"it is no longer on network {change.only_on!r}"
        )
    if change.model is not None and change.model != current.model:
        raise errors.UnsupportedChange(
            snap.uuid,
            nic,
            "model",
            f"the model is {current.model}; a live update cannot make it {change.model}",
        )
    has, wanted = dict(current.profile), dict(change.profile or ())
    for part in _profile_changes(current, change):
        if part not in LIVE_PROFILE_PARTS:
            verb = {(True, True): "changing", (False, True): "adding", (True, False): "removing"}[
                (part in has, part in wanted)
            ]
            tag, what = PROFILE_PARTS[part]
            problem = f"{verb} the {what} (<{tag}>) of vNIC {ref} of VM {snap.uuid}"
            raise errors.NotImplementedFeature(f"profile.{part}", problem)
    if change.network is not None and current.kind not in WIRABLE:
        raise errors.UnsupportedChange(
            snap.uuid,
            nic,
            "network",
            f"a vNIC of type {current.kind!r} is not on a network vnicd can move it from",
        )
    network = change.network if change.network is not None else namer(current.source)
    if change.link_up and current.kind in WIRABLE and network == UNWIRED:
        raise errors.UnsupportedChange(snap.uuid, nic, "link", "an unwired vNIC cannot be linked")


def plan_update(
    snap: Snapshot,
    ref: NicRef,
    change: NicChange,
    wiring: Wiring | None,
    namer: Namer,
    *,
    persist_running: bool,
) -> Plan:
    """A link, network, network filter and/or port isolation change: live (and the
    definition), the definition of a VM that is not running, or the stored copy of an
    unplugged vNIC."""
    _usable(snap)
    current = snap.find(ref)
    store = snap.store
    if current is None:
        entry = store.find(alias=ref.alias, mac=ref.mac)
        if entry is None:
            raise errors.NoSuchNic(snap.uuid, str(ref), _ref_field(ref))
        _check_update(snap, ref, entry.iface, change, namer)
        new = edit(entry.iface, change, wiring)
        after_store = store.put(entry.alias, new, pending=entry.pending)
        steps: list[Step] = [StoreWrite(store, after_store)] if after_store != store else []
        return Plan(
            Action.UPDATE,
            snap.uuid,
            str(ref),
            entry.iface.mac or "",
            tuple(steps),
            nic_state(entry.iface, namer, plugged=False, alias=entry.alias),
            nic_state(new, namer, plugged=False, alias=entry.alias),
            after_store,
        )
    _check_update(snap, ref, current, change, namer)
    assert current.mac is not None
    new = edit(current, change, wiring)
    steps = []
    unmarked = store.bounced(current.mac)  # a mark left by an older change goes with this one
    written = store  # the store as the steps leave it so far
    if snap.active:
        old_bridge = current.bridge
        new_bridge = wiring.bridge if wiring is not None else old_bridge
        moved = wiring is not None and wiring.source != current.source
        if change.bounce and moved and current.link_up and new.link_up:
            down = edit(current, NicChange(link_up=False), wiring)
            # marked first: a vnicd killed in the pause leaves it (see plan_bounce_ends)
            written = unmarked.bouncing(new)
            steps += [
                StoreWrite(store, written),
                LiveUpdate(current, down, new_bridge, old_bridge),
                Pause(change.bounce),
                LiveUpdate(down, new, new_bridge, new_bridge),
            ]
        elif change.resend or new.to_xml() != current.to_xml():
            steps.append(LiveUpdate(current, new, new_bridge, old_bridge))
        saved = snap.saved_nic(current.mac) if persist_running else None
        if saved is not None:
            saved_new = edit(saved, change, wiring)
            if saved_new.to_xml() != saved.to_xml():
                steps.append(DefinitionUpdate(saved, saved_new))
    elif change.resend or new.to_xml() != current.to_xml():
        steps.append(DefinitionUpdate(current, new))
    after_store = unmarked
    pending = store.find(mac=current.mac)
    if pending is not None and steps:  # a late release must keep the new state
        after_store = unmarked.put(pending.alias, new, pending=pending.pending)
        steps.append(StoreWrite(written, after_store))
    elif written is not unmarked:  # the bounce is over, or an older mark goes
        steps.append(StoreWrite(written, after_store))
    return Plan(
        Action.UPDATE,
        snap.uuid,
        str(ref),
        current.mac,
        tuple(steps),
        nic_state(current, namer, plugged=True),
        nic_state(new, namer, plugged=True, bridge=_bridge_after(steps, new)),
        after_store,
    )


def _bridge_after(steps: list[Step], new: Interface) -> str | None:
    live = [s for s in steps if isinstance(s, LiveUpdate)]
    return live[-1].bridge if live and live[-1].bridge else None


def plan_unplug(snap: Snapshot, ref: NicRef, namer: Namer) -> Plan:
    """Store the vNIC first (pending), remove it from the guest and the definition, then
    mark it unplugged: a crash at any point leaves a state reconciliation settles."""
    _usable(snap)
    current = snap.find(ref)
    store = snap.store
    if current is None:
        if store.find(alias=ref.alias, mac=ref.mac) is not None:
            raise _unplug_error(snap, ref, "notPlugged", "it is already unplugged")
        raise _unplug_error(snap, ref, "noNic", "there is no such vNIC", _ref_field(ref))
    assert current.mac is not None
    alias = current.alias or ""
    unmarked = store.bounced(current.mac)  # a mark left by an older change goes
    pending = unmarked.put(alias, current, pending=True)
    done = unmarked.put(alias, current)
    steps: list[Step] = [StoreWrite(store, pending)]
    if snap.active:
        steps.append(LiveDetach(current))
        saved = snap.saved_nic(current.mac)
        if saved is not None:
            steps.append(DefinitionDetach(saved))
    else:
        steps.append(DefinitionDetach(current))
    steps.append(StoreWrite(pending, done))
    before = nic_state(current, namer, plugged=True)
    after = nic_state(current.definition(), namer, plugged=False, alias=alias)
    return Plan(Action.UNPLUG, snap.uuid, str(ref), current.mac, tuple(steps), before, after, done)


def plan_plug(
    snap: Snapshot,
    ref: NicRef,
    namer: Namer,
    change: NicChange | None = None,
    wiring: Wiring | None = None,
    model: str | None = None,
) -> Plan:
    """Attach a stored vNIC again (same MAC, model, address, network, link); with
    ``change`` (and ``wiring``, its network resolved) on the network and link it names;
    with ``model`` as that model (a plug attaches a device anew: ovirt-engine changes a
    vNIC's model by unplugging it, editing it and plugging it)."""
    _usable(snap)
    store = snap.store
    # an alias libvirt made up (netN) may be a plugged vNIC's by now, and have been
    # several unplugged ones': the plug is of the one unplugged vNIC it names, if one
    unplugged = [
        e
        for e in store
        if (ref.alias is None or e.alias == ref.alias)
        and e.iface.matches(mac=ref.mac)
        and snap.find(NicRef(mac=e.iface.mac)) is None
    ]
    if len(unplugged) > 1:
        raise _plug_error(
            snap, str(ref), "noNic", "several unplugged vNICs had that alias: name it by MAC", ALIAS
        )
    entry = unplugged[0] if unplugged else None
    if entry is None and snap.find(ref) is not None:
        raise _plug_error(snap, str(ref), "alreadyPlugged", "it is already plugged")
    if entry is None:
        raise _plug_error(
            snap, str(ref), "noNic", "there is no such unplugged vNIC", _ref_field(ref)
        )
    iface = entry.iface.definition()  # one stored before tap names were dropped, too
    if iface.address is not None and iface.address in snap.current.pci_addresses:
        raise _plug_error(
            snap,
            str(ref),
            "addressInUse",
            f"its PCI address {iface.address} is another device's since it was unplugged",
        )
    if change is not None:
        _check_update(snap, ref, iface, change, namer)
        iface = edit(iface, change, wiring)
    if model is not None and model != iface.model:
        iface = iface.copy()
        iface.set_model(model)
    assert iface.mac is not None
    steps: list[Step] = []
    stale = snap.saved_nic(iface.mac) if snap.active else None
    if stale is not None:  # the guest released it, but the definition kept it
        steps.append(DefinitionDetach(stale))
    unmarked = store.bounced(iface.mac)
    if unmarked is not store:  # a mark a failed change put back goes, before the plug
        steps.insert(0, StoreWrite(store, unmarked))
    steps += _attach(snap, iface)
    after_store = unmarked.remove(iface.mac)
    steps.append(StoreWrite(unmarked, after_store, best_effort=True))
    before = nic_state(iface, namer, plugged=False, alias=entry.alias)
    after = nic_state(iface, namer, plugged=True)
    return Plan(
        Action.PLUG, snap.uuid, str(ref), iface.mac, tuple(steps), before, after, after_store
    )


def check_names(iface: Interface, field: str, *, source: bool = True) -> None:
    """A vNIC's XML names what reaches libvirt and the kernel: the same rules as the fields
    that name them, checked before libvirt sees it (``source``: its source's name too,
    unless that is still the name of a network to resolve)."""
    named = iface.source if source else None
    values = (named.name if named else None, iface.mac, iface.tap, iface.alias)
    for (where, what, valid), value in zip(_NAMES, values, strict=True):
        if value is not None and not valid(value):
            raise errors.InvalidParameter(field, f"<{where}> {value[:64]!r} is not {what}")


def plan_plug_new(
    snap: Snapshot,
    iface: Interface,
    namer: Namer,
    change: NicChange | None = None,
    wiring: Wiring | None = None,
) -> Plan:
    """Plug a vNIC the VM never had, from its XML, on the network and link ``change``
    names (``wiring``: that network resolved; the XML's own source is a network's name).
    Only vNICs that reach a bridge or a libvirt network, with a free MAC and PCI address;
    without a MAC one is chosen here.

    The XML of a vNIC vnicd keeps unplugged, by its MAC, plugs that one back, where it
    was (how ovirt-engine plugs back the vNIC it unplugged). By its user alias (``ua-``,
    the engine's device id) with another MAC, it replaces that one: the engine edited
    the vNIC while it was unplugged."""
    _usable(snap)
    if iface.kind not in WIRABLE:
        raise errors.InvalidParameter("xml", f"a vNIC of type {iface.kind!r} (bridge or network)")
    forbidden = iface.has_any(*HOTPLUG_FORBIDDEN)
    if forbidden is not None:
        raise errors.InvalidParameter("xml", f"<{forbidden}> is not accepted in a vNIC")
    mac = iface.mac
    stored = snap.store.find(mac=mac) if mac is not None else None
    if stored is not None and snap.find(NicRef(mac=mac)) is None:
        return plan_plug(snap, NicRef(mac=mac), namer, change, wiring, iface.model)
    if iface.source is None:
        raise errors.InvalidParameter("xml", "a new vNIC needs a <source>: its network")
    if iface.kind == "network" and wiring is not None and wiring.source != iface.source:
        # vnicd's name for that libvirt network leads elsewhere (a bridge of that name)
        raise errors.UnknownNetwork(snap.uuid, mac or "(new)", iface.source.name)
    alias = iface.alias
    if alias is not None and snap.find(NicRef(alias=alias)) is not None:
        raise _plug_error(snap, alias, "aliasInUse", f"alias {alias} is another vNIC's", "xml")
    base = snap.store
    edited = base.find(alias=alias) if alias and alias.startswith("ua-") else None
    if edited is not None and not edited.pending:
        assert edited.iface.mac is not None
        base = base.remove(edited.iface.mac)
    domain = snap.current
    # a running VM's definition may hold a vNIC that is not live (attached there only)
    defined = [snap.saved] if snap.active and snap.saved is not None else []
    macs = {i.mac for d in (domain, *defined) for i in d.interfaces} | {e.iface.mac for e in base}
    iface = iface.copy()
    if iface.mac is None:
        iface.set_mac(random_mac(macs))
    name = str(iface.mac)
    if change is not None:
        _check_update(snap, NicRef(mac=iface.mac), iface, change, namer)
        iface = edit(iface, change, wiring)
    check_names(iface, "xml")
    if iface.mac in macs:
        raise _plug_error(snap, name, "macInUse", f"MAC {iface.mac} belongs to another vNIC", "xml")
    # held for unplugged vNICs and in the definition, where libvirt's pick would not look
    reserved = {e.iface.address for e in base if e.iface.address}
    reserved |= {a for d in defined for a in d.pci_addresses}
    taken = domain.pci_addresses | reserved
    if iface.address is not None and iface.address in taken:
        raise _plug_error(
            snap, name, "addressInUse", f"PCI address {iface.address} is taken", "xml"
        )
    if iface.address is None and reserved:
        free = domain.free_pci_address(reserved)
        if free is not None:
            iface.set_address(free)
    assert iface.mac is not None
    steps = _attach(snap, iface)
    after_store = base.bounced(iface.mac)  # a mark left by a vNIC gone since goes
    if snap.active and snap.persistent:
        # Kept first: a crash between the live attach and the definition leaves a record
        # that settling completes, instead of a live-only vNIC a restart would lose.
        kept = after_store.put("", iface)
        steps = [StoreWrite(snap.store, kept), *steps, StoreWrite(kept, after_store, True)]
    elif after_store is not snap.store:  # first: the new vNIC must not find it
        steps = [StoreWrite(snap.store, after_store), *steps]
    return Plan(
        Action.PLUG,
        snap.uuid,
        name,
        iface.mac,
        tuple(steps),
        None,
        nic_state(iface, namer, plugged=True),
        after_store,
    )


def _attach(snap: Snapshot, iface: Interface) -> list[Step]:
    """Live first, confirmed, then the definition gets the live result (MAC and PCI
    address as libvirt settled them), so the VM boots with the vNIC where the guest has it."""
    if not snap.active:
        return [DefinitionAttach(iface)]
    steps: list[Step] = [LiveAttach(iface)]
    if snap.persistent:
        steps.append(DefinitionAttach(iface.definition(), from_live=True))
    return steps


def plan_reconcile(
    snap: Snapshot, refused: str | None = None, *, follow_live: bool = False
) -> Plan | None:
    """Settle stored vNICs with the domain after a crash, a late guest answer or a restart.

    A stored vNIC that the guest (or, when stopped, the definition) has is plugged: its
    entry goes, unless its removal is still awaited (pending, running) and the guest did
    not refuse it (``refused``: the alias it refused). One that it does not have is
    unplugged: the definition must not bring it back. With ``follow_live`` (at start, when
    a running VM's definition follows its changes) a vNIC whose definition is wired or
    linked otherwise than the guest has it gets the live wiring in its definition: vnicd
    may have stopped between the two updates of a change. Link bounce marks stay (see
    :func:`plan_bounce_ends`).
    """
    if snap.store_error is not None:
        return None
    store = snap.store
    steps: list[Step] = []
    if follow_live and snap.active and snap.persistent:
        steps += _follow_live(snap)
    for entry in snap.store:
        mac = entry.iface.mac
        assert mac is not None
        present = snap.current.interface(mac=mac) is not None
        saved = snap.saved_nic(mac)
        if present and entry.pending and snap.active and entry.alias != refused:
            continue
        if present:
            store = store.remove(mac)
            if snap.active and snap.persistent and saved is None and not entry.pending:
                # a plug stopped before the definition got it: finish it
                steps.append(DefinitionAttach(entry.iface, from_live=True))
            continue
        if entry.pending:
            store = store.put(entry.alias, entry.iface)
        if saved is not None:
            steps.append(DefinitionDetach(saved))
    if store != snap.store:
        steps.append(StoreWrite(snap.store, store))
    if not steps:
        return None
    return Plan(Action.RECONCILE, snap.uuid, "", "", tuple(steps), None, None, store)


def plan_bounce_ends(snap: Snapshot) -> Plan | None:
    """At start: the live updates that link up each vNIC whose link bounce a vnicd stopped
    in its pause left marked, if the guest has it as the pause left it (on the network the
    bounce moved it to, its link down), so the move ends as asked; then
    :func:`plan_unmarking`. Nothing else acts on a mark: a running vnicd's own bounces are
    under way or over, and the next change of a vNIC removes a mark its undo put back."""
    if snap.store_error is not None or snap.live is None:
        return None
    steps: list[Step] = []
    for end in snap.store.bounces:
        now = snap.live.interface(mac=end.mac)
        if now is not None and not now.link_up and now.source == end.source:
            # with the filter and isolation it was to set
            up = edit(now, NicChange(link_up=True, profile=end.profile), None)
            steps.append(LiveUpdate(now, up, now.bridge, now.bridge))
    if not steps:
        return None
    return Plan(Action.RECONCILE, snap.uuid, "", "", tuple(steps), None, None, snap.store)


def plan_unmarking(snap: Snapshot) -> Plan | None:
    """At start, after :func:`plan_bounce_ends` (apart from it: a link-up that fails must
    not keep the marks): every mark goes."""
    if snap.store_error is not None or not snap.store.bounces:
        return None
    store = snap.store.unmarked()
    steps = (StoreWrite(snap.store, store),)
    return Plan(Action.RECONCILE, snap.uuid, "", "", steps, None, None, store)


def _follow_live(snap: Snapshot) -> list[Step]:
    """The definition updates that give each plugged vNIC its live source, link, network
    filter and port isolation."""
    assert snap.live is not None
    steps: list[Step] = []
    for live in snap.live.interfaces:
        saved = snap.saved_nic(live.mac) if live.mac else None
        if saved is None or live.kind not in WIRABLE or saved.kind not in WIRABLE:
            continue
        parts = profile_changes(saved.profile, live.profile, _owned(live, LIVE_PROFILE_PARTS))
        if saved.source == live.source and saved.link_up == live.link_up and not parts:
            continue
        new = saved.copy()
        if live.source is not None:
            new.source = live.source
        new.link_up = live.link_up
        if parts:
            new.set_profile(live.profile, parts)
        steps.append(DefinitionUpdate(saved, new))
    return steps


def random_mac(taken: set[str | None]) -> str:
    """A locally administered QEMU-style MAC that no vNIC of the VM has."""
    while True:
        mac = "52:54:00:" + ":".join(f"{secrets.randbelow(256):02x}" for _ in range(3))
        if mac not in taken:
            return mac


def _plug_error(
    snap: Snapshot, nic: str, cause: str, problem: str, field: str | None = None
) -> errors.HotplugNicError:
    return errors.HotplugNicError(
        f"cannot plug vNIC {nic} of VM {snap.uuid}: {problem}",
        vmID=snap.uuid,
        nic=nic,
        cause=cause,
        field=field,
    )


def _unplug_error(
    snap: Snapshot, ref: NicRef, cause: str, problem: str, field: str | None = None
) -> errors.HotunplugNicError:
    return errors.HotunplugNicError(
        f"cannot unplug vNIC {ref} of VM {snap.uuid}: {problem}",
        vmID=snap.uuid,
        nic=str(ref),
        cause=cause,
        field=field,
    )
