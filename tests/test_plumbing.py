"""Pure plumbing: message framing on the local socket, the JSON-RPC envelope check, the
per-VM lock table, and the transaction's undo, with a recording stand-in for a domain
(logic only, no wiring)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vnicd import bulk, errors
from vnicd.dispatcher import Dispatcher
from vnicd.domxml import Interface, Source
from vnicd.hypervisor import HypervisorError
from vnicd.model import NicRef, Snapshot, VmStatus
from vnicd.planning import (
    Action,
    DefinitionDetach,
    DefinitionUpdate,
    LiveAttach,
    LiveDetach,
    LiveUpdate,
    Pause,
    Plan,
    StoreWrite,
    plan_unplug,
)
from vnicd.rpc_unix import Lines
from vnicd.schema import Schema
from vnicd.service import VmLocks
from vnicd.transaction import Failed, Pending, Refused, Transaction, Waiting, repeatable
from vnicd.unplugged import Store
from vnicd.verbs import HANDLERS, _outcome_wire

VM = "0b7e3f34-3d68-4cb8-a7ea-c9d04be1a0e1"
MAC = "52:54:00:00:00:0b"
NIC = (
    f"<interface type='bridge'><mac address='{MAC}'/><source bridge='br-a'/>"
    "<model type='virtio'/><alias name='net1'/></interface>"
)


def test_oversized_message_does_not_swallow_the_next() -> None:
    lines = Lines(limit=10)
    assert lines.feed(b'{"a":1}\n' + b"x" * 20 + b'\n{"b":2}\n') == [b'{"a":1}', None, b'{"b":2}']
    # oversized across reads: reported once, then the next message survives
    assert lines.feed(b"y" * 11) == [None]
    assert lines.feed(b"y" * 50) == []
    assert lines.feed(b'yy\n{"c":3}') == []
    assert lines.feed(b"\n") == [b'{"c":3}']


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)
_member = st.sampled_from(["jsonrpc", "method", "params", "id", "x"])
_value: st.SearchStrategy[Any] = (
    st.sampled_from(["2.0", "VM.getInfo", "Host.ping2", "VM.frob", 2.0, 1, True, None, [], {}])
    | _json
)
_requests = st.dictionaries(_member, _value) | _json
_SCHEMA = Schema.load()


class _NoVMs:
    """A service that knows no VM: every verb that asks it gets ``NoSuchVM``."""

    def __getattr__(self, name: str) -> Any:
        async def unknown(*_args: Any, **_kwargs: Any) -> Any:
            raise errors.NoSuchVM(VM)

        return unknown


def _handle(message: str) -> str:
    return asyncio.run(Dispatcher(_SCHEMA, _NoVMs(), HANDLERS).handle(message))


def _well_formed(response: Any, request_id: Any) -> bool:
    return (
        isinstance(response, dict)
        and response.get("jsonrpc") == "2.0"
        and ("result" in response) != ("error" in response)
        and response.get("id", "absent") == request_id
    )


@settings(max_examples=1000, database=None, deadline=None)
@given(_requests)
def test_every_request_gets_one_well_formed_answer(request: Any) -> None:
    """A valid request is answered with its id (a notification not at all); anything
    else with one "invalid request" error: never an exception, never silence."""
    reply = _handle(json.dumps(request))
    valid = (
        isinstance(request, dict)
        and request.keys() <= {"jsonrpc", "method", "params", "id"}
        and request.get("jsonrpc") == "2.0"
        and type(request.get("method")) is str
        and type(request.get("params", {})) in (dict, list)
        and type(request.get("id")) in (str, int, float, type(None))
    )
    if isinstance(request, list):
        assert reply == "" or isinstance(json.loads(reply), list | dict)
    elif valid and "id" not in request:
        assert reply == ""
    elif valid:
        assert _well_formed(json.loads(reply), request["id"])
    else:
        response = json.loads(reply)
        assert _well_formed(response, None) and response["error"]["code"] == -32600


def test_protocol_edges() -> None:
    def code(message: str) -> Any:
        return json.loads(_handle(message))["error"]["code"]

    assert code("{not json") == code("[" * 100_000) == -32700
    # NaN and Infinity are not JSON: neither read nor ever written back
    assert code('{"jsonrpc": "2.0", "method": "Host.ping2", "id": NaN}') == -32700
    assert code('{"jsonrpc": "2.0", "method": "Host.ping2", "id": 1e400}') == -32600
    assert code("[]") == code(json.dumps([{}] * 1001)) == -32600
    assert code('{"jsonrpc": "2.0", "method": "VM.frob", "id": 1}') == -32601
    assert code('{"jsonrpc": "2.0", "method": "Host.ping2", "params": [1], "id": 1}') == -32602
    batch = [
        {"jsonrpc": "2.0", "method": "Host.ping2", "id": 1},
        {"jsonrpc": "2.0", "method": "Host.ping2"},  # a notification: no answer
        5,
        {"jsonrpc": "2.0", "method": "VM.getInfo", "params": {"vmID": VM}, "id": "b"},
    ]
    answers = json.loads(_handle(json.dumps(batch)))
    assert [a["id"] for a in answers] == [1, None, "b"]
    assert answers[0]["result"] is True and answers[1]["error"]["code"] == -32600
    assert answers[2]["error"]["code"] == errors.NoSuchVM.code
    assert _handle(json.dumps([{"jsonrpc": "2.0", "method": "Host.ping2"}])) == ""


def test_split_and_joined_messages() -> None:
    lines = Lines(limit=100)
    assert lines.feed(b'{"a"') == []
    assert lines.feed(b':1}\n{"b":2}\n\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert lines.feed(b":3}\n") == [b'{"c":3}']


def test_lock_table_keeps_only_what_is_in_use() -> None:
    async def run() -> None:
        locks = VmLocks()
        for i in range(200):
            async with locks.hold(f"vm-{i}"):
                assert len(locks) == 1
        assert len(locks) == 0
        order: list[str] = []

        async def user(name: str, delay: float) -> None:
            async with locks.hold("one"):
                order.append(f"{name}+")
                await asyncio.sleep(delay)
                order.append(f"{name}-")

        await asyncio.gather(user("a", 0.02), user("b", 0))
        assert order == ["a+", "a-", "b+", "b-"], "one VM's changes are serialized"
        assert len(locks) == 0

    asyncio.run(run())


class RecordingDomain:
    """Records what a transaction sends; the guest answers a removal as told."""

    uuid = VM

    def __init__(self, waiting: Waiting, answer: bool | None, fail: set[str]) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._waiting = waiting
        self._answer = answer
        self._fail = fail
        self.loop = asyncio.get_running_loop()
        self.plugged = True

    def _record(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        count = sum(1 for n, _ in self.calls if n == name)
        if f"{name}#{count}" in self._fail:
            raise HypervisorError(name, libvirt.libvirtError("injected"))

    def set_metadata(self, xml: str | None, *_a: Any, **_k: Any) -> None:
        self._record("set_metadata", xml)

    def detach_alias(self, alias: str) -> None:
        self._record("detach_alias", alias)
        if self._answer is not None:
            self.plugged = not self._answer
            self.loop.call_soon_threadsafe(self._waiting.answered, VM, alias, self._answer)

    def attach_interface(self, xml: str, **_k: Any) -> None:
        self._record("attach_interface", xml)
        self.plugged = True

    def xml(self, **_k: Any) -> str:
        return f"<domain><name>vm</name><devices>{NIC if self.plugged else ''}</devices></domain>"


async def inline(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A transaction's blocking work, run in the test's own thread."""
    return fn(*args, **kwargs)


def carry_out(plan: Plan, snap: Snapshot, dom: Any, ports: Any = None) -> Failed | None:
    """``plan`` carried out on ``dom``, its blocking work inline; how it failed, if it did."""

    async def go() -> Failed | None:
        tx = Transaction(dom, snap, ports, inline, Waiting(), unplug_timeout=1)
        try:
            await tx.execute(plan, lambda live, _seen: live)
        except Failed as e:
            return e
        return None

    return asyncio.run(go())


def unplug_plan() -> tuple[Plan, Snapshot, Store, Store]:
    iface = Interface.from_xml(NIC)
    snap = Snapshot.parse(
        VM,
        VmStatus.RUNNING,
        False,
        f"<domain><name>vm</name><devices>{NIC}</devices></domain>",
        None,
    )
    pending = Store().put("net1", iface, pending=True)
    done = Store().put("net1", iface)
    steps = (StoreWrite(Store(), pending), LiveDetach(iface), StoreWrite(pending, done))
    return Plan(Action.UNPLUG, VM, "net1", MAC, steps, None, None, done), snap, pending, done


async def execute(
    answer: bool | None, *fail: str, start: bool = False, stopping: bool = False
) -> tuple[RecordingDomain, Exception | None]:
    """The unplug plan carried out; ``start``: begun as the worker that planned it begins
    it (:meth:`Transaction.start`), then carried on; ``stopping``: once vnicd stops."""
    waiting = Waiting()
    if stopping:
        waiting.close("vnicd is stopping")
    dom = RecordingDomain(waiting, answer, set(fail))
    plan, snap, _pending, _done = unplug_plan()
    tx = Transaction(dom, snap, ports=None, run=inline, waiting=waiting, unplug_timeout=0.05)  # type: ignore[arg-type]
    finish = lambda live, _seen: live  # noqa: E731
    try:
        await tx.execute(plan, finish, tx.start(plan, finish) if start else None)
    except (Failed, Pending) as e:
        return dom, e
    return dom, None


def test_a_begun_plan_goes_on_from_its_first_wait() -> None:
    """Begun in a worker, a plan stops before its first waiting step (the guest's release),
    and the loop carries on from there: each step once."""
    waiting = Waiting()

    async def run() -> list[str]:
        dom = RecordingDomain(waiting, True, set())
        plan, snap, _pending, _done = unplug_plan()
        tx = Transaction(dom, snap, None, None, waiting, 0.05)  # type: ignore[arg-type]
        started = tx.start(plan, lambda live, _seen: live)
        assert (started.count, [n for n, _ in dom.calls]) == (1, ["set_metadata"])
        assert started.failed is None and started.raised is None
        return [n for n, _ in dom.calls]

    assert asyncio.run(run()) == ["set_metadata"]
    dom, error = asyncio.run(execute(True, start=True))
    assert error is None
    assert [n for n, _ in dom.calls] == ["set_metadata", "detach_alias", "set_metadata"]


@pytest.mark.parametrize("start", [False, True], ids=["on the loop", "begun in a worker"])
def test_refused_unplug_restores_the_store(start: bool) -> None:
    dom, error = asyncio.run(execute(False, start=start))
    assert isinstance(error, Failed) and isinstance(error.cause, Refused) and not error.problems
    writes = [arg for name, arg in dom.calls if name == "set_metadata"]
    assert len(writes) == 2 and writes[0] is not None and 'pending="yes"' in writes[0]
    assert writes[1] is None, "the stored entry was removed again"


def test_unplug_once_vnicd_stops_is_undone_without_asking_the_guest() -> None:
    """A release that could not be awaited is not asked for: the unplug is undone, and no
    late answer is left to finish it."""
    dom, error = asyncio.run(execute(True, stopping=True))
    assert isinstance(error, Failed) and isinstance(error.cause, Refused) and not error.problems
    assert "vnicd is stopping" in str(error.cause)
    assert "detach_alias" not in [n for n, _ in dom.calls]
    writes = [arg for name, arg in dom.calls if name == "set_metadata"]
    assert len(writes) == 2 and writes[1] is None, "the stored entry was removed again"


def test_undoing_a_plug_once_vnicd_stops_still_asks_the_guest() -> None:
    """The undo of a plug asks the guest to release the vNIC even once vnicd stops: its
    answer then comes with nobody waiting, and the undo says so."""

    async def run() -> tuple[RecordingDomain, list[str]]:
        waiting = Waiting()
        waiting.close("vnicd is stopping")
        dom = RecordingDomain(waiting, None, set())
        _plan, snap, _pending, _done = unplug_plan()
        tx = Transaction(dom, snap, None, inline, waiting, 0.05)  # type: ignore[arg-type]
        return dom, await tx.undo((LiveAttach(Interface.from_xml(NIC)),))

    dom, problems = asyncio.run(run())
    assert [n for n, _ in dom.calls] == ["detach_alias"]
    assert len(problems) == 1 and "vnicd is stopping" in problems[0], problems


def test_waits_end_when_vnicd_stops() -> None:
    """A bounce's pause and a wait for a guest end at once when vnicd stops."""

    async def run() -> tuple[float, BaseException | None]:
        waiting = Waiting()
        answer = waiting.expect(VM, "net1")
        pause = asyncio.ensure_future(waiting.pause(30))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        waiting.close("vnicd is stopping")
        await pause
        await asyncio.wait([answer])
        return time.monotonic() - started, answer.exception()

    took, error = asyncio.run(run())
    assert took < 1, "the pause ended at once"
    assert isinstance(error, ConnectionError) and "vnicd is stopping" in str(error)


def test_unanswered_unplug_stays_pending() -> None:
    dom, error = asyncio.run(execute(answer=None))
    assert isinstance(error, Pending)
    writes = [arg for name, arg in dom.calls if name == "set_metadata"]
    assert len(writes) == 1 and 'pending="yes"' in writes[0], "a late release must finish it"


@pytest.mark.parametrize("start", [False, True], ids=["on the loop", "begun in a worker"])
def test_failure_after_release_plugs_back(start: bool) -> None:
    dom, error = asyncio.run(execute(True, "set_metadata#2", start=start))
    assert isinstance(error, Failed) and not error.problems
    names = [n for n, _ in dom.calls]
    assert names == [
        "set_metadata",
        "detach_alias",
        "set_metadata",
        "attach_interface",
        "set_metadata",
    ], "released, then plugged back and the store restored"
    attached = dom.calls[3][1]
    assert MAC in attached and "<alias" not in attached
    assert dom.calls[4][1] is None


@pytest.mark.parametrize("start", [False, True], ids=["on the loop", "begun in a worker"])
def test_first_write_failing_touches_nothing_else(start: bool) -> None:
    dom, error = asyncio.run(execute(True, "set_metadata#1", start=start))
    assert isinstance(error, Failed) and [n for n, _ in dom.calls] == ["set_metadata"]


def test_hook_rewrite_goes_live() -> None:
    """A running persistent VM's update ends with its definition step: a site hook still
    sees, and rewrites, what is sent live."""
    from tests.test_planning import BR_B, A, domain, namer, nic, snap
    from vnicd.model import NicChange, NicRef
    from vnicd.planning import plan_update

    s = snap(domain(nic(A)), domain(nic(A, live=False)))
    plan = plan_update(
        s, NicRef(mac=A), NicChange(network="br-b"), BR_B, namer, persist_running=True
    )
    assert plan.device_xml is not None and "<target" in plan.device_xml, "the live XML"
    rewritten = Interface.from_xml(plan.device_xml.replace("<model", "<bandwidth/><model"))
    new = plan.rewritten(rewritten)
    live, definition = new.steps
    assert isinstance(live, LiveUpdate) and "<bandwidth/>" in live.after.to_xml()
    assert isinstance(definition, DefinitionUpdate) and definition == plan.steps[1]


class BridgeGoneDomain:
    """A running VM with one vNIC whose move's target bridge vanishes after the move."""

    uuid = VM

    def __init__(self, iface: str) -> None:
        self.iface = iface
        self.sent: list[str] = []
        self.ports: dict[str, str | None] = {"tap1": "br-a"}

    def update_interface(self, xml: str, **_k: Any) -> None:
        self.sent.append(xml)
        self.iface = xml
        self.ports["tap1"] = Interface.from_xml(xml).bridge
        if len(self.sent) == 2:  # the bounce's second half: the bridge is gone
            self.ports["tap1"] = None

    def xml(self, **_k: Any) -> str:
        return f"<domain><name>vm</name><devices>{self.iface}</devices></domain>"

    def port(self, tap: str) -> tuple[str | None, bool]:
        return self.ports[tap], False

    def move(self, tap: str, bridge: str, isolated: bool) -> None:
        raise AssertionError(f"no move to {bridge} was needed")


def test_bounce_undo_skips_its_intermediate_state() -> None:
    """A bounced move fails on its second half (the new bridge deleted meanwhile): the undo
    sends back the state from before the move, never the intermediate one on that bridge."""
    from vnicd.model import NicChange
    from vnicd.networks import Wiring
    from vnicd.planning import edit

    nic = NIC.replace("<alias", "<target dev='tap1'/><alias")
    before = Interface.from_xml(nic)
    gone = Wiring("br-gone", Source("bridge", "br-gone"), "br-gone")
    down = edit(before, NicChange(link_up=False), gone)
    after = edit(down, NicChange(link_up=True), None)
    steps = (
        LiveUpdate(before, down, "br-gone", "br-a"),
        Pause(0),
        LiveUpdate(down, after, "br-gone", "br-gone"),
    )
    plan = Plan(Action.UPDATE, VM, "net1", MAC, steps, None, None, Store())
    snap = Snapshot.parse(
        VM, VmStatus.RUNNING, False, f"<domain><devices>{nic}</devices></domain>", None
    )
    dom = BridgeGoneDomain(nic)
    error = carry_out(plan, snap, dom, ports=dom)
    assert isinstance(error, Failed) and not error.problems, error
    assert dom.sent == [down.to_xml(), after.to_xml(), before.to_xml()]
    assert dom.ports["tap1"] == "br-a"


class IsolatingHost:
    """A running VM with one vNIC, tap1, and the kernel's view of its bridge port: an
    update sets the bridge and the flag its XML asks for (a libvirt network that isolates
    its ports isolates it anyway); the update numbered ``fail`` (from 1) fails after that,
    its XML not taken."""

    uuid = VM

    def __init__(self, iface: str, *, network_isolates: bool = False, fail: int = 0) -> None:
        self.iface, self.fail, self.network_isolates = iface, fail, network_isolates
        self.sent: list[str] = []
        first = Interface.from_xml(iface)
        self.kernel = (first.bridge, first.isolated or network_isolates)
        self.isolated_by_vnicd: list[bool] = []

    def update_interface(self, xml: str, **_k: Any) -> None:
        """As libvirt: only what differs from its own copy of the vNIC is applied."""
        self.sent.append(xml)
        new, old = Interface.from_xml(xml), Interface.from_xml(self.iface)
        if (new.bridge, new.isolated) != (old.bridge, old.isolated):
            self.kernel = (new.bridge, new.isolated or self.network_isolates)
        if len(self.sent) == self.fail:  # libvirt set the flag, then failed on the filter
            raise HypervisorError("updating interface", libvirt.libvirtError("injected"))
        self.iface = xml

    def xml(self, **_k: Any) -> str:
        return f"<domain><name>vm</name><devices>{self.iface}</devices></domain>"

    def port(self, _tap: str) -> tuple[str | None, bool]:
        return self.kernel

    def move(self, _tap: str, bridge: str, isolated: bool) -> None:
        self.kernel = (bridge, isolated)

    def isolate(self, _tap: str, isolated: bool) -> None:
        self.isolated_by_vnicd.append(isolated)
        self.kernel = (self.kernel[0], isolated)


def _live_update_plan(*steps: LiveUpdate | Pause, nic: str) -> tuple[Plan, Snapshot]:
    plan = Plan(Action.UPDATE, VM, "net1", MAC, steps, None, None, Store())
    live = f"<domain><devices>{nic}</devices></domain>"
    return plan, Snapshot.parse(VM, VmStatus.RUNNING, False, live, None)


def test_a_port_a_libvirt_network_isolates_is_not_the_vnics_to_confirm() -> None:
    """A libvirt network may isolate its ports where the vNIC's XML says nothing: the
    kernel's flag is not held against the XML then (a good change is not undone)."""
    from vnicd.model import NicChange
    from vnicd.planning import edit

    nic = (
        f"<interface type='network'><mac address='{MAC}'/><source network='iso' "
        "bridge='virbr9'/><target dev='tap1'/><alias name='net1'/></interface>"
    )
    before = Interface.from_xml(nic)
    down = edit(before, NicChange(link_up=False), None)
    plan, snap = _live_update_plan(LiveUpdate(before, down, "virbr9", "virbr9"), nic=nic)
    host = IsolatingHost(nic, network_isolates=True)
    assert carry_out(plan, snap, host, ports=host) is None
    assert host.kernel == ("virbr9", True)


def test_a_bounce_that_fails_isolating_the_port_frees_it_again() -> None:
    """The second half of a bounce isolates the port and fails after libvirt set the
    flag: resending the old XML does not reach it (libvirt's copy never changed), so
    vnicd clears it in the kernel."""
    from vnicd.model import NicChange
    from vnicd.planning import edit

    nic = _LIVE_NIC
    before = Interface.from_xml(nic)
    down = edit(before, NicChange(link_up=False), None)
    isolated = Interface.from_xml(nic.replace("<alias", "<port isolated='yes'/><alias"))
    steps = (
        LiveUpdate(before, down, "br-a", "br-a"),
        Pause(0),
        LiveUpdate(down, isolated, "br-a", "br-a"),
    )
    plan, snap = _live_update_plan(*steps, nic=nic)
    host = IsolatingHost(nic, fail=2)
    error = carry_out(plan, snap, host, ports=host)
    assert isinstance(error, Failed) and not error.problems, error
    assert host.kernel == ("br-a", False) and host.isolated_by_vnicd == [False]


class _MetadataDomain:
    """Records each metadata write: the XML, and where (live, definition); the writes in
    ``fail`` (by number, from 1) raise."""

    uuid = VM

    def __init__(self, fail: frozenset[int] = frozenset()) -> None:
        self.writes: list[tuple[str | None, bool, bool]] = []
        self._fail = fail

    def set_metadata(self, xml: str | None, *_a: Any, live: bool, persistent: bool) -> None:
        self.writes.append((xml, live, persistent))
        if len(self.writes) in self._fail:
            raise HypervisorError("writing metadata", libvirt.libvirtError("injected"))


_NIC_C = Interface.from_xml(NIC.replace(MAC, "52:54:00:00:00:0c"))
_LIVE_NIC = NIC.replace("<alias", "<target dev='tap1'/><alias")
_KEPT = Store().put("net9", _NIC_C)
_MARKED = _KEPT.bouncing(Interface.from_xml(_LIVE_NIC))


def _write(
    steps: tuple[StoreWrite, ...], *, running: bool, persistent: bool, fail: frozenset[int]
) -> tuple[_MetadataDomain, Exception | None]:
    live = f"<domain><devices>{_LIVE_NIC}</devices></domain>" if running else None
    saved = f"<domain><devices>{NIC}</devices></domain>" if persistent else None
    status = VmStatus.RUNNING if running else VmStatus.STOPPED
    snap = Snapshot.parse(VM, status, persistent, live, saved)
    plan = Plan(Action.UPDATE, VM, "net1", MAC, steps, None, None, steps[-1].after)
    dom = _MetadataDomain(fail)
    return dom, carry_out(plan, snap, dom)


def test_a_bounce_mark_is_written_live_only() -> None:
    """The definition never keeps a bounce mark (a VM that boots with one was in no
    bounce), and gets no write of its own when only marks change."""
    mark, unmark = StoreWrite(_KEPT, _MARKED), StoreWrite(_MARKED, _KEPT)
    dom, error = _write((mark, unmark), running=True, persistent=True, fail=frozenset())
    assert error is None and dom.writes == [
        (_MARKED.format(), True, False),  # live: the stored vNIC and the mark
        (_KEPT.format(), True, True),  # unmarked: one write for both
    ]
    dom, error = _write((mark, unmark), running=True, persistent=False, fail=frozenset())
    assert error is None
    assert dom.writes == [(_MARKED.format(), True, False), (_KEPT.format(), True, False)]
    dom, error = _write((unmark,), running=False, persistent=True, fail=frozenset())
    assert error is None and dom.writes == [(_KEPT.format(), False, True)]


def test_a_marked_store_write_that_fails_half_way_leaves_it_as_it_was() -> None:
    """Marked, and its stored vNICs changed: two writes (live, then the definition
    without the mark); the second fails: the live one is undone with it."""
    moved = StoreWrite(_KEPT, _MARKED.put("net9", _NIC_C, pending=True))
    dom, error = _write((moved,), running=True, persistent=True, fail=frozenset({2}))
    assert isinstance(error, Failed) and not error.problems
    after = moved.after
    assert dom.writes == [
        (after.format(), True, False),
        (after.unmarked().format(), False, True),  # refused
        (_KEPT.format(), True, False),  # the live write undone: nothing else to undo
    ]


def test_a_store_write_for_both_that_fails_is_written_back_live() -> None:
    """One write for live and definition: libvirt writes live first, so its failure may
    have changed the live store; it is written back."""
    moved = StoreWrite(_KEPT, Store().put("net9", _NIC_C, pending=True))
    dom, error = _write((moved,), running=True, persistent=True, fail=frozenset({1}))
    assert isinstance(error, Failed) and not error.problems
    assert dom.writes == [(moved.after.format(), True, True), (_KEPT.format(), True, False)]
    dom, error = _write((moved,), running=True, persistent=False, fail=frozenset({1}))
    assert isinstance(error, Failed) and dom.writes == [(moved.after.format(), True, False)]


class _CutDomain:
    """A running VM whose last change (br-old -> br-new) libvirt carried out after the
    connection was lost; br-old is gone since, so libvirt refuses to go back."""

    uuid, name = VM, "vm"

    def __init__(self) -> None:
        self.bridge, self.link = "br-new", "up"

    def presence(self) -> tuple[VmStatus, bool]:
        return VmStatus.RUNNING, False

    def xml(self, inactive: bool = False) -> str:
        nic = _cut_nic(self.bridge, self.link)
        return f"<domain><name>vm</name><devices>{nic}</devices></domain>"

    def update_interface(self, xml: str, **_k: Any) -> None:
        if "br-old" in xml:
            raise HypervisorError("updating", libvirt.libvirtError("br-old: No such device"))
        self.link = "up" if Interface.from_xml(xml).link_up else "down"


def _cut_nic(bridge: str, link: str = "up") -> str:
    return (
        f"<interface type='bridge'><mac address='{MAC}'/><source bridge='{bridge}'/>"
        f"<target dev='tap1'/><model type='virtio'/><alias name='net1'/><link state='{link}'/>"
        "</interface>"
    )


class _OneVmHost:
    """A host of one VM for a Service: its domain, and the kernel's view of its tap."""

    uri, unwired_bridge = "test", "void"

    def __init__(self, dom: Any, bridge: str) -> None:
        self.dom, self.bridge, self.ports = dom, bridge, self

    def domain(self, _uuid: str) -> Any:
        return self.dom

    def alive(self) -> bool:
        return True

    def holds(self, _dom: object) -> bool:
        return True

    def where(self, _tap: str) -> str:
        return self.bridge

    def port(self, _tap: str) -> tuple[str, bool]:
        return self.bridge, False

    def move(self, _tap: str, bridge: str, _isolated: bool) -> None:
        from vnicd import hostnet

        raise hostnet.HostNetError(f"no device {bridge}")

    def name_of(self, source: Source | None) -> str:
        return source.name if source else ""

    def service(self) -> Any:
        from vnicd.service import Service

        return Service(self, self, workers=2, unplug_timeout=1)  # type: ignore[arg-type]


def test_reads_during_a_change_tell_its_vnics_from_before_and_the_status_now() -> None:
    """While a change is in flight, a read (a listing, an event) answers the vNICs from
    before it with the VM's status and persistence as just read; a VM stopped meanwhile
    with its definition's vNICs (no tap), not its live ones."""
    from vnicd.model import VmState

    async def scenario() -> list[VmState | None]:
        svc = _OneVmHost(None, "br-old").service()
        svc._before[VM] = Snapshot.parse(
            VM,
            VmStatus.RUNNING,
            True,
            f"<domain><devices>{_cut_nic('br-old')}</devices></domain>",
            f"<domain><devices>{NIC}</devices></domain>",
        )
        read = [VmState(VM, "vm", status, False, ()) for status in VmStatus]
        return [svc._consistent(VM, None, state) for state in read]

    found = [state for state in asyncio.run(scenario()) if state is not None]
    assert [(s.status, s.persistent) for s in found] == [(v, False) for v in VmStatus]
    for state in found:
        (nic,) = state.nics
        stopped = state.status is VmStatus.STOPPED
        assert (nic.tap, nic.network) == (("", "br-a") if stopped else ("tap1", "br-old"))


def test_an_undo_libvirt_refuses_does_not_lock_the_vm_out() -> None:
    """A change cut by a lost connection is undone before the VM's next change; if libvirt,
    back, refuses the undo, vnicd takes the vNIC as it is rather than refuse every change."""
    from vnicd.model import NicChange, NicRef
    from vnicd.service import UpdateNic

    host = _OneVmHost(_CutDomain(), "br-new")

    async def scenario() -> tuple[Any, Any]:
        svc = host.service()
        old, new = Interface.from_xml(_cut_nic("br-old")), Interface.from_xml(_cut_nic("br-new"))
        svc._unsettled[VM] = (LiveUpdate(old, new, "br-new", "br-old"),)
        svc._before[VM] = Snapshot.parse(
            VM,
            VmStatus.RUNNING,
            False,
            f"<domain><devices>{_cut_nic('br-old')}</devices></domain>",
            None,
        )
        change = UpdateNic(VM, NicRef(mac=MAC), NicChange(link_up=False))
        return await svc.update_device(change), await svc.get_info(VM)

    answer, info = asyncio.run(scenario())
    assert [(n.network, n.link_up) for n in answer.nics] == [("br-new", False)]
    assert [(n.network, n.link_up) for n in info.nics] == [("br-new", False)]


class _UndefinedDomain:
    """A running VM whose last change (link down, live and in its definition) was cut by
    a lost connection, and which was undefined since: it runs on, transient."""

    uuid, name = VM, "vm"

    def __init__(self) -> None:
        self.link, self.sent = "down", list[tuple[str, bool]]()

    def presence(self) -> tuple[VmStatus, bool]:
        return VmStatus.RUNNING, False

    def xml(self, inactive: bool = False) -> str:
        assert not inactive, "a transient VM has no definition to read"
        return f"<domain><name>vm</name><devices>{_cut_nic('br-a', self.link)}</devices></domain>"

    def update_interface(self, xml: str, *, live: bool, persistent: bool) -> None:
        self.sent.append((xml, persistent))
        if persistent:
            error = libvirt.libvirtError("cannot change persistent config of a transient domain")
            raise HypervisorError("updating", error)
        self.link = "up" if Interface.from_xml(xml).link_up else "down"


def test_an_undo_left_for_a_vm_undefined_since_skips_its_definition() -> None:
    """The undo of a cut change, once the VM has been undefined: its live part is undone,
    its definition's part is not tried (the definition went with the VM's persistence)."""
    dom = _UndefinedDomain()

    async def scenario() -> Any:
        svc = _OneVmHost(dom, "br-a").service()
        up, down = (
            Interface.from_xml(_cut_nic("br-a")),
            Interface.from_xml(_cut_nic("br-a", "down")),
        )
        svc._unsettled[VM] = (LiveUpdate(up, down, "br-a", "br-a"), DefinitionUpdate(up, down))
        await svc.reconcile(VM)
        return svc

    svc = asyncio.run(scenario())
    assert dom.link == "up", "the live part is undone"
    assert [persistent for _xml, persistent in dom.sent] == [False], dom.sent
    assert VM not in svc._unsettled


class _DetachCut:
    """A stopped VM's definition whose device removal fails as a lost connection would:
    whether libvirt carried it out is unknown."""

    uuid = VM

    def __init__(self) -> None:
        self.calls: list[str] = []

    def set_metadata(self, *_a: Any, **_k: Any) -> None:
        self.calls.append("set_metadata")

    def detach_interface(self, *_a: Any, **_k: Any) -> None:
        self.calls.append("detach_interface")
        raise HypervisorError("unplugging", libvirt.libvirtError("client socket is closed"))


def test_a_cut_step_that_cannot_be_repeated_is_left_to_settle() -> None:
    """The failed step is among what a lost connection leaves to undo, so such a change is
    settled from what libvirt then has, not undone as if the step never happened (which
    would drop the stored copy of a vNIC the definition no longer has)."""
    saved = f"<domain><name>vm</name><uuid>{VM}</uuid><devices>{NIC}</devices></domain>"
    snap = Snapshot.parse(VM, VmStatus.STOPPED, True, None, saved)
    plan = plan_unplug(snap, NicRef(mac=MAC), lambda _s: "br-a")
    assert [type(s) for s in plan.steps] == [StoreWrite, DefinitionDetach, StoreWrite]
    dom = _DetachCut()
    error = carry_out(plan, snap, dom)
    assert isinstance(error, Failed) and dom.calls[:2] == ["set_metadata", "detach_interface"]
    assert any(isinstance(s, DefinitionDetach) for s in error.undo)
    assert not repeatable(error.undo), "settled once libvirt answers, not undone blindly"


class _Refusing:
    """A service that refuses every vNIC change, naming the core's field (``field``)."""

    def __init__(self, field: str) -> None:
        self.field = field

    def _refused(self, req: Any) -> errors.VnicdError:
        if self.field == "mac":
            return errors.NoSuchNic(VM, str(req.nic), "mac")
        return errors.UnsupportedChange(VM, str(req.nic), self.field, "refused")

    async def update_device(self, req: Any) -> Any:
        raise self._refused(req)

    async def hotunplug(self, req: Any) -> Any:
        raise self._refused(req)


@pytest.mark.parametrize(
    ("verb", "params", "core", "field"),
    [
        ("VM.updateDevice", {"deviceType": "interface", "macAddr": MAC}, "mac", "params.macAddr"),
        ("VM.hotunplugNic", {"nic": {"macAddr": MAC}}, "mac", "params.nic.macAddr"),
        ("VM.updateDevice", {"deviceType": "interface", "xml": NIC}, "mac", "params.xml"),
        ("VM.updateDevice", {"deviceType": "interface", "xml": NIC}, "model", "params.xml"),
        (
            "VM.updateDevice",
            {"deviceType": "interface", "macAddr": MAC, "nicModel": "e1000"},
            "model",
            "params.nicModel",
        ),
    ],
)
def test_an_error_names_the_field_where_the_request_put_it(
    verb: str, params: dict[str, Any], core: str, field: str
) -> None:
    """The plain shape, an older engine's ``params.nic``, and a vNIC named by its XML."""
    request = {"jsonrpc": "2.0", "method": verb, "params": {"vmID": VM, "params": params}, "id": 1}
    service = _Refusing(core)
    reply = json.loads(
        asyncio.run(Dispatcher(_SCHEMA, service, HANDLERS).handle(json.dumps(request)))
    )
    assert reply["error"]["data"]["field"] == field, reply


@pytest.mark.parametrize(
    ("error", "field"),
    [
        (errors.UnsupportedChange(VM, MAC, "link", "unwired"), "change.linkActive"),
        (errors.UnsupportedChange(VM, MAC, "only_on", "moved off"), "match.network"),
        (errors.NoSuchNic(VM, MAC, "mac"), "macAddr"),
    ],
)
def test_a_bulk_result_names_the_field_in_its_own_terms(
    error: errors.VnicdError, field: str
) -> None:
    """A bulk call names no vNIC: its results name its change, its match, or their vNIC."""
    wire = _outcome_wire(bulk.Outcome(VM, None, error=error))
    assert wire["error"]["data"]["field"] == field, wire
