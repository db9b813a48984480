"""Planning and reporting: pure logic on parsed XML, no libvirt, no root."""

from __future__ import annotations

from dataclasses import replace

import pytest
from lxml import etree

from vnicd import errors
from vnicd.domxml import Interface, Source, StoredNic, XMLError
from vnicd.model import NicChange, NicRef, Snapshot, VmStatus
from vnicd.networks import UNWIRED, Wiring
from vnicd.planning import (
    DefinitionAttach,
    DefinitionDetach,
    DefinitionUpdate,
    LiveAttach,
    LiveDetach,
    LiveUpdate,
    Pause,
    Plan,
    StoreWrite,
    plan_bounce_ends,
    plan_plug,
    plan_plug_new,
    plan_reconcile,
    plan_unmarking,
    plan_unplug,
    plan_update,
)
from vnicd.report import vm_state
from vnicd.unplugged import NAMESPACE, Store

VM = "0b7e3f34-3d68-4cb8-a7ea-c9d04be1a0e1"
A = "52:54:00:00:00:0a"
B = "52:54:00:00:00:0b"


def nic(mac: str, bridge: str = "br-a", slot: int = 3, link: str = "", live: bool = True) -> str:
    extra = f"<target dev='tap{slot}'/><alias name='net{slot}'/>" if live else ""
    return (
        f"<interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/>"
        f"<model type='virtio'/>{link}{extra}"
        f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot:#04x}' function='0x0'/>"
        "</interface>"
    )


def domain(
    *nics: str,
    stored: list[StoredNic] | None = None,
    bounces: list[str] | None = None,
    meta: str | None = None,
) -> str:
    kept = Store(stored, [Interface.from_xml(b) for b in bounces or []]).format()
    if meta is None and kept is not None:
        meta = kept.replace("<vnics", f"<vnics xmlns='{NAMESPACE}'", 1)
    metadata = f"<metadata>{meta}</metadata>" if meta else ""
    devices = "".join(nics)
    head = f"<domain><name>vm</name><uuid>{VM}</uuid>{metadata}"
    return f"{head}<devices>{devices}</devices></domain>"


def snap(
    live: str | None, saved: str | None, *, persistent: bool = True, paused: bool = False
) -> Snapshot:
    status = VmStatus.STOPPED if live is None else VmStatus.RUNNING
    if paused:
        status = VmStatus.PAUSED
    return Snapshot.parse(VM, status, persistent, live, saved)


def namer(source: Source | None) -> str:
    return UNWIRED if source is None or source.name == "void" else source.name


BR_B = Wiring("br-b", Source("bridge", "br-b"), "br-b")


def stored(mac: str, slot: int, *, pending: bool = False) -> StoredNic:
    return StoredNic(f"net{slot}", Interface.from_xml(nic(mac, slot=slot, live=False)), pending)


def test_running_persistent_update_changes_live_then_definition() -> None:
    s = snap(domain(nic(A)), domain(nic(A, live=False)))
    plan = plan_update(
        s, NicRef(alias="net3"), NicChange(network="br-b"), BR_B, namer, persist_running=True
    )
    kinds = [type(step) for step in plan.steps]
    assert kinds == [LiveUpdate, DefinitionUpdate]
    live = plan.steps[0]
    assert isinstance(live, LiveUpdate) and live.bridge == "br-b" and live.bridge_before == "br-a"
    assert plan.before is not None and plan.after is not None
    assert (plan.before.network, plan.after.network) == ("br-a", "br-b")
    assert plan.after.pci == plan.before.pci == "0000:00:03.0"
    assert plan.live_xml is not None and '<target dev="tap3"/>' in plan.live_xml
    definition = plan.definition_xml
    assert definition is not None and "target" not in definition, "live-only parts stay live"


def test_persistent_updates_off_leaves_the_definition() -> None:
    s = snap(domain(nic(A)), domain(nic(A, live=False)))
    plan = plan_update(
        s, NicRef(mac=A), NicChange(link_up=False), None, namer, persist_running=False
    )
    assert [type(step) for step in plan.steps] == [LiveUpdate]


def test_nothing_to_do_plans_no_step() -> None:
    s = snap(domain(nic(A, link="<link state='up'/>")), None, persistent=False)
    plan = plan_update(s, NicRef(mac=A), NicChange(link_up=True), None, namer, persist_running=True)
    assert plan.steps == ()


def test_bounce_only_for_a_linked_vnic_that_moves() -> None:
    s = snap(domain(nic(A)), None, persistent=False)
    change = NicChange(network="br-b", bounce=1.5)
    plan = plan_update(s, NicRef(mac=A), change, BR_B, namer, persist_running=True)
    kinds = [type(step) for step in plan.steps]
    assert kinds == [StoreWrite, LiveUpdate, Pause, LiveUpdate, StoreWrite]
    mark, down, pause, up, unmark = plan.steps
    assert isinstance(down, LiveUpdate) and isinstance(up, LiveUpdate)
    assert not down.after.link_up and down.after.source == Source("bridge", "br-b")
    assert up.after.link_up and isinstance(pause, Pause) and pause.seconds == 1.5
    # marked before the link goes down, unmarked once it is up: see the reconcile test
    assert isinstance(mark, StoreWrite) and isinstance(unmark, StoreWrite)
    assert [i.source for i in mark.after.bounces] == [Source("bridge", "br-b")]
    assert unmark.before == mark.after and unmark.after == s.store == plan.store
    assert [n.mac for n in vm_state(s, namer, store=mark.after).nics] == [A], "no vNIC more"
    # a vNIC whose unplug is still awaited: its stored copy moves too, in the unmarking
    awaited = snap(domain(nic(A), stored=[stored(A, 3, pending=True)]), None, persistent=False)
    plan = plan_update(awaited, NicRef(mac=A), change, BR_B, namer, persist_running=True)
    last = plan.steps[-1]
    assert isinstance(last, StoreWrite) and not last.after.bounces and last.after == plan.store
    entry = plan.store.find(mac=A)
    assert entry is not None and entry.pending and entry.iface.source == Source("bridge", "br-b")
    unlinked = snap(domain(nic(A, link="<link state='down'/>")), None, persistent=False)
    plan = plan_update(unlinked, NicRef(mac=A), change, BR_B, namer, persist_running=True)
    assert [type(step) for step in plan.steps] == [LiveUpdate]
    stay = plan_update(
        s, NicRef(mac=A), NicChange(link_up=False, bounce=1.5), None, namer, persist_running=True
    )
    assert [type(step) for step in stay.steps] == [LiveUpdate]


def test_stopped_vm_changes_only_its_definition() -> None:
    s = snap(None, domain(nic(A, live=False)))
    plan = plan_update(
        s,
        NicRef(mac=A),
        NicChange(network=UNWIRED),
        Wiring(UNWIRED, Source("bridge", "void"), "void"),
        namer,
        persist_running=True,
    )
    assert [type(step) for step in plan.steps] == [DefinitionUpdate]
    assert plan.after is not None and plan.after.network == "" and not plan.after.link_up


def test_refusals_happen_before_any_step() -> None:
    s = snap(domain(nic(A)), None, persistent=False)
    with pytest.raises(errors.UnsupportedChange) as err:
        plan_update(s, NicRef(mac=A), NicChange(model="e1000"), None, namer, persist_running=True)
    assert err.value.fields["field"] == "model"
    with pytest.raises(errors.NoSuchNic) as missing:
        plan_update(
            s, NicRef(alias="net9"), NicChange(link_up=False), None, namer, persist_running=True
        )
    assert missing.value.fields["field"] == "alias"
    unwired = snap(domain(nic(A, bridge="void")), None, persistent=False)
    with pytest.raises(errors.UnsupportedChange, match="unwired vNIC cannot be linked"):
        plan_update(
            unwired, NicRef(mac=A), NicChange(link_up=True), None, namer, persist_running=True
        )


def test_vnic_on_no_managed_network() -> None:
    """A direct (or ethernet) vNIC is reported as what it is, linked, never moved."""
    direct = (
        f"<interface type='direct'><mac address='{A}'/><source dev='eth0' mode='bridge'/>"
        "<model type='virtio'/><alias name='net0'/></interface>"
    )
    s = snap(domain(direct), None, persistent=False)
    state = vm_state(s, namer).nics[0]
    assert (state.kind, state.network, state.bridge) == ("direct", None, "")
    with pytest.raises(errors.UnsupportedChange) as err:
        plan_update(s, NicRef(mac=A), NicChange(network="br-b"), BR_B, namer, persist_running=True)
    assert err.value.fields["field"] == "network"
    plan = plan_update(
        s, NicRef(mac=A), NicChange(link_up=False), None, namer, persist_running=True
    )
    assert [type(step) for step in plan.steps] == [LiveUpdate]


def test_unplugged_vnic_changes_its_stored_copy_only() -> None:
    s = snap(domain(nic(A), stored=[stored(B, 4)]), domain(nic(A, live=False)))
    plan = plan_update(
        s, NicRef(mac=B), NicChange(link_up=False), None, namer, persist_running=True
    )
    (write,) = plan.steps
    assert isinstance(write, StoreWrite)
    entry = write.after.find(mac=B)
    assert entry is not None and not entry.iface.link_up and entry.alias == "net4"
    assert plan.after is not None and not plan.after.plugged


def test_malformed_metadata_is_reported_and_blocks_changes() -> None:
    s = snap(
        domain(nic(A), meta=f"<vnics xmlns='{NAMESPACE}'><unplugged/></vnics>"),
        None,
        persistent=False,
    )
    assert s.store_error is not None and "malformed" in s.store_error
    assert [n.mac for n in vm_state(s, namer).nics] == [A], "reads still report the VM"
    with pytest.raises(errors.GeneralError, match="malformed"):
        plan_update(s, NicRef(mac=A), NicChange(link_up=False), None, namer, persist_running=True)
    with pytest.raises(errors.GeneralError):
        plan_unplug(s, NicRef(mac=A), namer)


def test_unplug_stores_first_and_marks_done_last() -> None:
    s = snap(domain(nic(A)), domain(nic(A, live=False)))
    plan = plan_unplug(s, NicRef(alias="net3"), namer)
    kinds = [type(step) for step in plan.steps]
    assert kinds == [StoreWrite, LiveDetach, DefinitionDetach, StoreWrite]
    first, last = plan.steps[0], plan.steps[-1]
    assert isinstance(first, StoreWrite) and isinstance(last, StoreWrite)
    pending, done = first.after.find(mac=A), last.after.find(mac=A)
    assert pending is not None and pending.pending and pending.alias == "net3"
    assert done is not None and not done.pending
    assert "<alias" not in done.iface.to_xml(), "libvirt's own alias is live-only"
    stopped = plan_unplug(snap(None, domain(nic(A, live=False))), NicRef(mac=A), namer)
    assert [type(step) for step in stopped.steps] == [StoreWrite, DefinitionDetach, StoreWrite]


def test_plug_comes_back_as_stored() -> None:
    s = snap(domain(nic(A), stored=[stored(B, 4)]), domain(nic(A, live=False)))
    plan = plan_plug(s, NicRef(mac=B), namer)
    kinds = [type(step) for step in plan.steps]
    assert kinds == [LiveAttach, DefinitionAttach, StoreWrite]
    attach, definition, write = plan.steps
    assert isinstance(attach, LiveAttach) and str(attach.iface.address) == "0000:00:04.0"
    assert isinstance(definition, DefinitionAttach) and definition.from_live
    assert isinstance(write, StoreWrite) and write.best_effort and not write.after
    with pytest.raises(errors.HotplugNicError) as err:
        plan_plug(s, NicRef(mac=A), namer)
    assert err.value.fields["cause"] == "alreadyPlugged"


def test_unplugged_vnics_keep_their_pci_addresses() -> None:
    """A new vNIC without an address is given a free one, not an unplugged vNIC's (which
    libvirt would pick first); a plug-back whose address another device took since is
    refused before any step."""
    s = snap(domain(nic(A), stored=[stored(B, 4)]), None, persistent=False)
    s.current.element.find("devices").append(  # type: ignore[union-attr]
        etree.fromstring("<controller type='pci' index='0' model='pci-root'/>")
    )
    new = Interface.from_xml("<interface type='bridge'><source bridge='br-a'/></interface>")
    attach = plan_plug_new(s, new, namer).steps[0]
    assert isinstance(attach, LiveAttach) and str(attach.iface.address) == "0000:00:05.0"
    taken = snap(domain(nic(A, slot=4), stored=[stored(B, 4)]), None, persistent=False)
    with pytest.raises(errors.HotplugNicError) as err:
        plan_plug(taken, NicRef(mac=B), namer)
    assert err.value.fields["cause"] == "addressInUse"


def test_a_plug_by_an_alias_libvirt_gave_again_is_of_the_unplugged_vnic() -> None:
    """libvirt names a new vNIC net4 after the one unplugged as net4: a plug by that alias
    is of the unplugged one; two unplugged as net4 must be named by MAC."""
    once = [StoredNic("net4", stored(B, 5).iface)]
    s = snap(domain(nic(A, slot=4), stored=once), None, persistent=False)
    plan = plan_plug(s, NicRef(alias="net4"), namer)
    assert plan.mac == B
    with pytest.raises(errors.HotplugNicError) as err:
        plan_plug(s, NicRef(mac=A), namer)
    assert err.value.fields["cause"] == "alreadyPlugged"
    c = "52:54:00:00:00:0c"
    twice = [StoredNic("net4", stored(m, slot).iface) for m, slot in ((B, 5), (c, 6))]
    s = snap(domain(nic(A, slot=3), stored=twice), None, persistent=False)
    with pytest.raises(errors.HotplugNicError, match="name it by MAC"):
        plan_plug(s, NicRef(alias="net4"), namer)
    assert plan_plug(s, NicRef(mac=c), namer).mac == c
    # one of them still plugged, its unplug awaited: the other is the one
    awaited = [StoredNic("net4", stored(B, 4).iface, pending=True), twice[1]]
    s = snap(domain(nic(B, slot=4), stored=awaited), None, persistent=False)
    assert plan_plug(s, NicRef(alias="net4"), namer).mac == c


def test_a_copy_stored_with_a_made_up_tap_name_plugs_back_without_it() -> None:
    """One stored before stored copies dropped libvirt's tap names: libvirt picks anew."""
    old = StoredNic("net4", Interface.from_xml(nic(B, slot=4).replace("tap4", "vnet3")), False)
    s = snap(domain(nic(A), stored=[old]), domain(nic(A, live=False)))
    attach = plan_plug(s, NicRef(mac=B), namer).steps[0]
    assert isinstance(attach, LiveAttach) and attach.iface.tap is None
    assert str(attach.iface.address) == "0000:00:04.0", "the rest as stored"


def test_plug_on_the_network_and_link_asked() -> None:
    s = snap(domain(nic(A), stored=[stored(B, 4)]), domain(nic(A, live=False)))
    change = NicChange(link_up=False, network="br-b")
    plan = plan_plug(s, NicRef(mac=B), namer, change=change, wiring=BR_B)
    attach = plan.steps[0]
    assert isinstance(attach, LiveAttach) and attach.iface.bridge == "br-b"
    assert not attach.iface.link_up and str(attach.iface.address) == "0000:00:04.0"
    assert plan.after is not None and (plan.after.network, plan.after.link_up) == ("br-b", False)
    unwired = Wiring(UNWIRED, Source("bridge", "void"), "void")
    with pytest.raises(errors.UnsupportedChange):  # linked on no network: refused, as an update
        up = NicChange(link_up=True, network=UNWIRED)
        plan_plug(s, NicRef(mac=B), namer, change=up, wiring=unwired)
    attach = plan_plug(s, NicRef(mac=B), namer, model="e1000").steps[0]
    assert isinstance(attach, LiveAttach) and attach.iface.model == "e1000", "edited unplugged"


def test_a_request_sets_the_filter_and_isolation_and_keeps_the_other_profile_parts() -> None:
    """The engine sends a vNIC's whole profile with every update and plug: the same parts
    are no change; a network filter or port isolation that differs is set (live, in the
    definition, in the stored copy); another QoS or failover team is refused before any
    step, naming the part."""
    filtered = nic(A).replace("<model", "<filterref filter='f'/><model")
    kept = StoredNic("net4", Interface.from_xml(nic(B, slot=4, live=False)))
    s = snap(domain(filtered, stored=[kept]), domain(filtered), persistent=True)
    same = Interface.from_xml(filtered).profile
    link = NicChange(link_up=False, profile=same)
    plan = plan_update(s, NicRef(mac=A), link, None, namer, persist_running=True)
    assert [type(step) for step in plan.steps] == [LiveUpdate, DefinitionUpdate]
    assert [step.after.profile for step in plan.steps] == [same, same]  # type: ignore[union-attr]
    other = Interface.from_xml(
        "<interface><filterref filter='g'><parameter name='IP' value='10.0.0.1'/></filterref>"
        "<port isolated='yes'/></interface>"
    ).profile
    for profile in (other, ()):
        plan = plan_update(
            s, NicRef(mac=A), NicChange(profile=profile), None, namer, persist_running=True
        )
        assert [type(step) for step in plan.steps] == [LiveUpdate, DefinitionUpdate]
        for step in plan.steps:
            assert isinstance(step, LiveUpdate | DefinitionUpdate)
            assert step.after.profile == profile and step.before.profile == same
            assert step.after.link_up and step.after.bridge == "br-a"
    plan = plan_update(
        s, NicRef(mac=B), NicChange(profile=other), None, namer, persist_running=True
    )
    assert plan.store.find(mac=B).iface.profile == other  # type: ignore[union-attr]
    attach = plan_plug(s, NicRef(mac=B), namer, change=NicChange(profile=same)).steps[0]
    assert isinstance(attach, LiveAttach) and attach.iface.profile == same
    for part, element in (
        ("qos", "<bandwidth><inbound average='100'/></bandwidth>"),
        ("teaming", "<teaming type='persistent'/>"),
    ):
        part_xml = Interface.from_xml(f"<interface>{element}</interface>").profile
        for ref in (NicRef(mac=A), NicRef(mac=B)):
            with pytest.raises(
                errors.NotImplementedFeature, match=f"adding the .*<{element[1:5]}"
            ) as e:
                plan_update(
                    s, ref, NicChange(profile=same + part_xml), None, namer, persist_running=True
                )
            assert e.value.fields["field"] == f"profile.{part}"
    # an older engine's fields speak of the parts they name only: no QoS, filter unsaid
    said = NicChange(link_up=False, profile=(), profile_parts=frozenset({"qos"}))
    plan = plan_update(s, NicRef(mac=A), said, None, namer, persist_running=True)
    assert plan.steps and all(step.after.profile == same for step in plan.steps)  # type: ignore[union-attr]


def test_an_edited_vnic_replaces_the_unplugged_one_once_its_unplug_is_done() -> None:
    """ovirt-engine plugs a vNIC it edited while unplugged under its alias, another MAC:
    it replaces the stored one, unless that one's unplug still waits for the guest."""
    edited = nic("52:54:00:00:00:0c", slot=4, live=False).replace(
        "</interface>", "<alias name='ua-b'/></interface>"
    )
    for pending, replaced in ((False, True), (True, False)):
        kept = StoredNic("ua-b", stored(B, 4).iface, pending)
        saved = [nic(A, live=False)] + ([nic(B, slot=4, live=False)] if pending else [])
        s = snap(domain(nic(A), stored=[kept]), domain(*saved))
        if replaced:
            plan = plan_plug_new(s, Interface.from_xml(edited), namer)
            assert plan.store.find(mac=B) is None and plan.mac == "52:54:00:00:00:0c"
            continue
        with pytest.raises(errors.HotplugNicError) as err:
            plan_plug_new(s, Interface.from_xml(edited), namer)
        assert err.value.fields["cause"] == "addressInUse"


def test_new_vnic_refusals_before_libvirt_sees_it() -> None:
    """What libvirt would refuse only after the store was written, or get wrong."""
    kept = [stored(B, 4)]
    hidden = nic("52:54:00:00:00:0f", slot=5, live=False)  # attached to the definition only
    root = "<controller type='pci' index='0' model='pci-root'/>"
    s = snap(domain(nic(A).replace("net3", "ua-a"), root, stored=kept), domain(nic(A), hidden))
    new = "<interface type='{}'>{}</interface>"

    def plug(xml: str, wiring: Wiring | None = None) -> Plan:
        return plan_plug_new(s, Interface.from_xml(xml), namer, NicChange(), wiring)

    with pytest.raises(errors.HotplugNicError) as err:
        plug(new.format("bridge", "<source bridge='br-a'/><alias name='ua-a'/>"))
    assert err.value.fields["cause"] == "aliasInUse"
    with pytest.raises(errors.InvalidParameter, match="needs a <source>"):
        plug(new.format("bridge", ""))
    with pytest.raises(errors.HotplugNicError) as err:
        plug(new.format("bridge", "<mac address='52:54:00:00:00:0f'/><source bridge='br-a'/>"))
    assert err.value.fields["cause"] == "macInUse"
    attach = plug(new.format("bridge", "<source bridge='br-a'/>")).steps[1]
    assert isinstance(attach, LiveAttach) and str(attach.iface.address) == "0000:00:06.0"
    # a libvirt network that vnicd's name for it (its own) does not lead to: a bridge
    with pytest.raises(errors.UnknownNetwork):
        plug(new.format("network", "<source network='br-b'/>"), BR_B)


def test_new_vnic_checks() -> None:
    s = snap(domain(nic(A), stored=[stored(B, 4)]), None, persistent=False)

    def new(xml: str) -> None:
        plan_plug_new(s, Interface.from_xml(xml), namer)

    with pytest.raises(errors.InvalidParameter, match="type 'ethernet'"):
        new("<interface type='ethernet'/>")
    with pytest.raises(errors.InvalidParameter, match="<script> is not accepted"):
        new("<interface type='bridge'><source bridge='br-a'/><script path='/x'/></interface>")
    for xml, cause in (
        (nic(A, slot=9, live=False), "macInUse"),
        (nic("52:54:00:00:00:0c", slot=4, live=False), "addressInUse"),
    ):
        with pytest.raises(errors.HotplugNicError) as err:
            new(xml)
        assert err.value.fields["cause"] == cause and err.value.fields["field"] == "xml"
    plan = plan_plug_new(
        s, Interface.from_xml("<interface type='bridge'><source bridge='br-a'/></interface>"), namer
    )
    assert plan.mac.startswith("52:54:00:") and plan.mac not in (A, B)


@pytest.mark.parametrize(
    ("live", "saved", "entry", "expect_steps", "expect_entry"),
    [
        # a pending unplug the guest has not answered yet: left alone
        (True, True, "pending-present", [], "pending"),
        # the guest released it while nobody waited: finish (definition, store)
        (True, True, "pending-gone", [DefinitionDetach, StoreWrite], "done"),
        # a plug whose store write failed: the entry goes
        (True, True, "done-present", [StoreWrite], None),
        # a plug that stopped before the definition got it: the definition gets it
        (True, False, "done-present", [DefinitionAttach, StoreWrite], None),
        # an unplug that died with QEMU before the release: plugged per definition
        (False, True, "pending-present", [StoreWrite], None),
        # stopped, removed from the definition, store not yet marked done
        (False, False, "pending-gone", [StoreWrite], "done"),
        # settled already
        (True, True, "done-gone", [DefinitionDetach], "done"),
    ],
)
def test_reconcile(
    live: bool, saved: bool, entry: str, expect_steps: list[type], expect_entry: str | None
) -> None:
    state, where = entry.split("-")
    plugged_b = where == "present"
    entries = [stored(B, 4, pending=state == "pending")]
    live_xml = domain(nic(A), *([nic(B, slot=4)] if plugged_b else []), stored=entries)
    saved_b = saved and (plugged_b or entry == "pending-gone" or entry == "done-gone")
    saved_xml = domain(
        nic(A, live=False), *([nic(B, slot=4, live=False)] if saved_b else []), stored=entries
    )
    if not live:
        saved_xml = domain(
            nic(A, live=False), *([nic(B, slot=4, live=False)] if plugged_b else []), stored=entries
        )
    s = snap(live_xml if live else None, saved_xml)
    plan = plan_reconcile(s)
    steps = [] if plan is None else [type(step) for step in plan.steps]
    assert steps == expect_steps
    final = s.store if plan is None else plan.store
    found = final.find(mac=B)
    if expect_entry is None:
        assert found is None
    else:
        assert found is not None and found.pending == (expect_entry == "pending")


def test_reconcile_drops_a_refused_unplug() -> None:
    entries = [stored(B, 4, pending=True)]
    s = snap(domain(nic(A), nic(B, slot=4), stored=entries), domain(nic(A, live=False)))
    assert plan_reconcile(s) is None
    plan = plan_reconcile(s, refused="net4")
    assert plan is not None and plan.store == Store()


def test_new_vnic_is_kept_until_the_definition_has_it() -> None:
    s = snap(domain(nic(A)), domain(nic(A, live=False)))
    new = Interface.from_xml("<interface type='bridge'><source bridge='br-b'/></interface>")
    plan = plan_plug_new(s, new, namer)
    kinds = [type(step) for step in plan.steps]
    assert kinds == [StoreWrite, LiveAttach, DefinitionAttach, StoreWrite]
    first, last = plan.steps[0], plan.steps[-1]
    assert isinstance(first, StoreWrite) and first.after.find(mac=plan.mac) is not None
    assert isinstance(last, StoreWrite) and last.best_effort and last.after == s.store


def test_a_bulk_match_is_checked_again_under_the_lock() -> None:
    s = snap(domain(nic(A, bridge="br-c")), None, persistent=False)
    with pytest.raises(errors.UnsupportedChange, match="no longer on network 'br-a'"):
        plan_update(
            s,
            NicRef(mac=A),
            NicChange(link_up=False, only_on="br-a"),
            None,
            namer,
            persist_running=True,
        )
    plan = plan_update(
        s,
        NicRef(mac=A),
        NicChange(link_up=False, only_on="br-c"),
        None,
        namer,
        persist_running=True,
    )
    assert [type(step) for step in plan.steps] == [LiveUpdate]


def test_reconcile_at_start_gives_the_definition_the_live_wiring() -> None:
    """vnicd stopped between a change's live and definition updates: at start the
    definition follows what the guest has (source and link), nothing else of it."""
    down = "<link state='down'/>"
    live = domain(nic(A, bridge="br-b", link=down), nic(B, slot=4))
    saved = domain(nic(A, live=False), nic(B, slot=4, live=False))
    assert plan_reconcile(snap(live, saved)) is None
    plan = plan_reconcile(snap(live, saved), follow_live=True)
    assert plan is not None
    (step,) = plan.steps
    assert isinstance(step, DefinitionUpdate)
    assert step.before.to_xml() == Interface.from_xml(nic(A, live=False)).to_xml()
    assert step.after.source == Source("bridge", "br-b") and not step.after.link_up
    assert step.after.address == step.before.address and step.after.alias is None
    assert plan_reconcile(snap(live, saved, persistent=False), follow_live=True) is None
    assert plan_reconcile(snap(None, saved), follow_live=True) is None


def test_a_filter_changed_live_reaches_the_definition_at_start_and_ends_a_bounce() -> None:
    """A network filter is part of what the guest has: vnicd stopped between a change's
    live and definition updates gives the definition the live filter at start, and a link
    bounce cut in its pause ends with the filter it was to set."""
    filtered = nic(A).replace("<model", "<filterref filter='g'/><model")
    live = domain(filtered, nic(B, slot=4))
    saved = domain(nic(A, live=False).replace("<model", "<filterref filter='f'/><model"))
    plan = plan_reconcile(snap(live, saved), follow_live=True)
    assert plan is not None
    (step,) = plan.steps
    assert isinstance(step, DefinitionUpdate) and step.after.network_filter == "g"
    end = nic(A, bridge="br-b", link="<link state='up'/>")
    end = end.replace("<model", "<filterref filter='g'/><model")
    cut = nic(A, bridge="br-b", link=DOWN).replace("<model", "<filterref filter='f'/><model")
    ends = plan_bounce_ends(snap(domain(cut, bounces=[end]), None, persistent=False))
    assert ends is not None
    (up,) = ends.steps
    assert isinstance(up, LiveUpdate) and up.after.link_up and up.after.network_filter == "g"


def test_a_change_its_hooks_must_see_is_sent_even_when_it_changes_nothing() -> None:
    """Custom properties may be all an update changes: with hooks for it, the vNIC is sent
    as it is (live, or in a stopped VM's definition), so they run, as VDSM's do."""
    same = NicChange(link_up=True, resend=True)
    up = "<link state='up'/>"
    running = snap(domain(nic(A, link=up)), None, persistent=False)
    assert not plan_update(
        running, NicRef(mac=A), replace(same, resend=False), None, namer, persist_running=True
    ).steps
    (live,) = plan_update(running, NicRef(mac=A), same, None, namer, persist_running=True).steps
    assert isinstance(live, LiveUpdate) and live.after.bridge == "br-a" and live.after.link_up
    stopped = snap(None, domain(nic(A, live=False, link=up)))
    (saved,) = plan_update(stopped, NicRef(mac=A), same, None, namer, persist_running=True).steps
    assert isinstance(saved, DefinitionUpdate)


def test_a_libvirt_networks_port_isolation_is_not_the_vnics() -> None:
    """libvirt shows a libvirt network's port isolation in the live XML of its vNICs: an
    update without <port> does not take it away, and the start does not copy it into the
    definition (it is the network's, not the vNIC's)."""
    on_network = (
        f"<interface type='network'><mac address='{A}'/><source network='iso' "
        "bridge='virbr9'/><port isolated='yes'/><link state='up'/><target dev='tap3'/>"
        "<alias name='net3'/></interface>"
    )
    defined = on_network.replace("<port isolated='yes'/>", "").replace(
        "<target dev='tap3'/><alias name='net3'/>", ""
    )
    s = snap(domain(on_network), domain(defined))
    change = NicChange(link_up=True, profile=())
    assert not plan_update(s, NicRef(mac=A), change, None, namer, persist_running=True).steps
    assert plan_reconcile(s, follow_live=True) is None


def test_a_filter_change_leaves_the_definitions_other_profile_parts() -> None:
    """Only the filter is set, in the definition too: a QoS only the definition has (set
    there for the next boot) stays, as does one the request leaves out."""
    filtered = nic(A).replace("<model", "<filterref filter='f'/><model")
    qos = "<bandwidth><inbound average='100'/></bandwidth>"
    saved = domain(nic(A, live=False).replace("<model", f"<filterref filter='f'/>{qos}<model"))
    s = snap(domain(filtered), saved)
    change = NicChange(profile=(("filter", "<filterref filter='g'/>"),))
    plan = plan_update(s, NicRef(mac=A), change, None, namer, persist_running=True)
    live, definition = plan.steps
    assert isinstance(live, LiveUpdate) and isinstance(definition, DefinitionUpdate)
    assert live.after.network_filter == definition.after.network_filter == "g"
    assert "bandwidth" not in live.after.to_xml()
    assert qos.replace("'", '"') in definition.after.to_xml()


DOWN = "<link state='down'/>"


@pytest.mark.parametrize(
    ("live_a", "running", "linked_up"),
    [
        (nic(A, bridge="br-b", link=DOWN), True, True),  # cut in the pause: linked up
        (nic(A), True, False),  # cut before the move began
        (nic(A, bridge="br-b"), True, False),  # cut once linked up again
        (nic(A, bridge="br-c", link=DOWN), True, False),  # not where the bounce left it
        (nic(A, bridge="br-b", link=DOWN), False, False),  # stopped since
    ],
)
def test_a_bounce_cut_in_its_pause_ends_at_start(
    live_a: str, running: bool, linked_up: bool
) -> None:
    """A vnicd stopped in a link bounce's pause left its mark: at start the vNIC is linked
    up if the guest has it as the pause left it, and then every mark goes, apart; the
    settling keeps them, and at start gives the definition what the guest then has."""
    end = nic(A, bridge="br-b", link="<link state='up'/>")
    live = domain(live_a, nic(B, slot=4), bounces=[end])
    saved = domain(nic(A, live=False), nic(B, slot=4, live=False))
    if not running:  # a definition marked by some other writer: a mark is not acted on
        moved = nic(A, bridge="br-b", link=DOWN, live=False)
        saved = domain(moved, nic(B, slot=4, live=False), bounces=[end])
    s = snap(live if running else None, saved)
    ends = plan_bounce_ends(s)
    if linked_up:
        assert ends is not None
        (up,) = ends.steps
        assert isinstance(up, LiveUpdate) and up.bridge == up.bridge_before == "br-b"
        assert up.after.link_up and up.after.source == Source("bridge", "br-b")
        assert up.after.alias == "net3" and up.after.tap == "tap3", "the live vNIC, linked"
        assert ends.store == s.store, "marks go apart: a failed link-up must not keep them"
    else:
        assert ends is None
    unmarking = plan_unmarking(s)
    assert unmarking is not None and not unmarking.store
    assert unmarking.steps == (StoreWrite(s.store, unmarking.store),)
    assert plan_reconcile(s) is None, "settling leaves marks be"
    relinked = snap(domain(end, nic(B, slot=4)), saved)
    plan = plan_reconcile(relinked, follow_live=True)
    assert plan is not None and [type(step) for step in plan.steps] == [DefinitionUpdate]


def test_any_change_of_a_vnic_removes_its_older_bounce_mark() -> None:
    """A mark an undo put back must not link up, at a later start, a vNIC that was
    unlinked on purpose meanwhile: every change of the vNIC removes it."""
    stale = [nic(A, bridge="br-b")]
    s = snap(domain(nic(A, bridge="br-b", link=DOWN), bounces=stale), None, persistent=False)
    assert plan_bounce_ends(s) is not None, "as a bounce cut in its pause would leave it"
    unlink = plan_update(
        s, NicRef(mac=A), NicChange(link_up=False), None, namer, persist_running=True
    )
    assert [type(step) for step in unlink.steps] == [StoreWrite], "nothing else to do"
    assert s.store.bounces and not unlink.store
    stale = [nic(A, bridge="br-c")]
    linked = snap(domain(nic(A), bounces=stale), None, persistent=False)
    change = NicChange(network="br-b", bounce=1.5)
    bounce = plan_update(linked, NicRef(mac=A), change, BR_B, namer, persist_running=True)
    mark = bounce.steps[0]
    assert isinstance(mark, StoreWrite)
    assert [i.source for i in mark.after.bounces] == [Source("bridge", "br-b")], "replaced"
    assert not bounce.store
    unplug = plan_unplug(s, NicRef(mac=A), namer)
    assert all(not step.after.bounces for step in unplug.steps if isinstance(step, StoreWrite))
    kept = s.store.put("net3", Interface.from_xml(nic(A, live=False)))
    unplugged = snap(domain(nic(B, slot=4), meta=_meta(kept)), None, persistent=False)
    plug = plan_plug(unplugged, NicRef(mac=A), namer)
    assert unplugged.store.bounces and not plug.store
    kinds = [type(step) for step in plug.steps]
    assert kinds == [StoreWrite, LiveAttach, StoreWrite], "the mark goes first"
    gone = snap(domain(nic(B, slot=4), bounces=stale), None, persistent=False)
    new = plan_plug_new(gone, Interface.from_xml(nic(A, bridge="br-b", link=DOWN)), namer)
    assert [type(step) for step in new.steps] == [StoreWrite, LiveAttach] and not new.store


def _meta(store: Store) -> str:
    kept = store.format()
    assert kept is not None
    return kept.replace("<vnics", f"<vnics xmlns='{NAMESPACE}'", 1)


def test_stored_vnics_and_bounce_marks_kept_apart() -> None:
    """A bounce mark is not a stored vNIC: the set's edits keep it, reports leave it out,
    and it is written and read back as it was."""
    end = Interface.from_xml(nic(A, bridge="br-b"))
    store = Store([stored(B, 4)], [end])
    assert [e.iface.mac for e in store] == [B] and [i.mac for i in store.bounces] == [A]
    assert [i.mac for i in store.put("net5", Interface.from_xml(nic(A, slot=5))).bounces] == [A]
    assert [i.mac for i in store.remove(B).bounces] == [A] and store.remove(B)
    assert not store.remove(B).bounced(A) and store.bounced(A) == Store([stored(B, 4)])
    assert Store.parse(store.format()) == store
    s = snap(domain(nic(A, bridge="br-b"), stored=[stored(B, 4)], bounces=[nic(A)]), None)
    assert [(n.mac, n.plugged) for n in vm_state(s, namer).nics] == [(A, True), (B, False)]
    with pytest.raises(XMLError, match="a <bounce> entry without <interface>"):
        Store.parse("<vnics><bounce/></vnics>")
