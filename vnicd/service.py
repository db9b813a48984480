"""What the verbs do, independent of any wire: one transaction path for every vNIC change.

Every change goes: read the domain once -> plan (pure) -> hooks -> apply, confirm, commit
or undo (:mod:`vnicd.transaction`) -> listeners -> the new state. Blocking libvirt and
kernel work runs in a thread pool: the read, the plan and the steps up to the first that
waits take one worker call when no ``before_`` hook must see the plan first (each hop to
a worker and back costs about what a libvirt call does). Changes of one VM are serialized
by a per-VM lock, different VMs proceed in parallel. Reads take no lock: while a change
of a VM is in flight they answer its vNICs from before it, never a half-done one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from vnicd import __version__, errors, hostnet, planning
from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import XMLError, hotplug_interface
from vnicd.hypervisor import Domain, Hypervisor, HypervisorError, Listed
from vnicd.model import NicChange, NicRef, NicState, Snapshot, VmState, VmStatus
from vnicd.networks import NetworkMap, Wiring
from vnicd.planning import (
    Action,
    DefinitionAttach,
    DefinitionDetach,
    DefinitionUpdate,
    LiveUpdate,
    Plan,
    Step,
)
from vnicd.report import listed_state, vm_state
from vnicd.transaction import (
    ConfirmError,
    Failed,
    Finish,
    Pending,
    Refused,
    Started,
    Transaction,
    Waiting,
    repeatable,
    waits,
)
from vnicd.unplugged import mentions_store

log = logging.getLogger(__name__)
T = TypeVar("T")
Custom = tuple[tuple[str, str], ...]  # a request's custom properties, for its hooks
# Workers reading VMs at once, through libvirtd (True) or in-process (False), where the
# embedded driver's reads are this process's own work and one will do. For a listing,
# that many fetch the XML while one more parses it: two overlap libvirtd's round trips,
# more only add thread hand-offs in libvirt's client. For recovery, each reads and
# parses its part.
_LIST_FETCHERS = {True: 2, False: 1}
_RECOVERY_READERS = {True: 4, False: 1}
# A VM's live and saved XML (as read, None when not); with its place in a listing, or why
# they could not be read.
_Xmls = tuple[str | None, str | None]
_Fetched = tuple[int, _Xmls | Exception]


@dataclass(frozen=True)
class UpdateNic:
    vm_id: str
    nic: NicRef
    change: NicChange
    bounce: bool | None = None  # None: as configured
    dry_run: bool = False
    custom: Custom = ()


@dataclass(frozen=True)
class PlugNic:
    """Plug a known vNIC back (``nic``), or a new one from its XML (``xml``)."""

    vm_id: str
    nic: NicRef | None = None
    xml: str | None = None
    dry_run: bool = False
    change: NicChange | None = None  # the network and link to plug it on
    model: str | None = None  # with ``nic``: the model to plug it as
    custom: Custom = ()


@dataclass(frozen=True)
class UnplugNic:
    vm_id: str
    nic: NicRef
    dry_run: bool = False
    custom: Custom = ()  # they describe the leaving vNIC: its hooks get them, none needed


@dataclass(frozen=True)
class CreateVM:
    vm_id: str
    xml: str
    persistent: bool = False


@dataclass(frozen=True)
class DryRun:
    """A plan that was not carried out."""

    plan: Plan


@dataclass(frozen=True)
class Capabilities:
    version: str
    uri: str
    unwired_bridge: str
    networks: list[tuple[str, str, str]]  # name, kind, kernel bridge


class Hooks(Protocol):
    """The seam for site hooks: those of a kind of change (``plan``'s) looked up once per
    request, blocking, with the request's custom properties for them (see
    :class:`HooksNow`)."""

    def look(self, plan: Plan, custom: Custom = ()) -> HooksNow: ...

    def installed(self) -> frozenset[Action]:
        """The kinds of change some hook has scripts for on this host (blocking)."""


class HooksNow(Protocol):
    """The site hooks a request found: they may rewrite or veto a plan, and hear how it
    ended."""

    def rewrites(self, plan: Plan) -> bool: ...

    def touch(self, plan: Plan) -> bool: ...

    async def before(self, plan: Plan) -> Plan: ...

    async def after(self, plan: Plan, error: Exception | None) -> None: ...


class NoHooks:
    def look(self, plan: Plan, custom: Custom = ()) -> NoHooks:
        return self

    def installed(self) -> frozenset[Action]:
        return frozenset()

    def rewrites(self, plan: Plan) -> bool:
        return False

    def touch(self, plan: Plan) -> bool:
        return False

    async def before(self, plan: Plan) -> Plan:
        return plan

    async def after(self, plan: Plan, error: Exception | None) -> None:
        return None


Listener = Callable[[Plan, VmState], None]


@dataclass
class _Prepared:
    """One worker hop's work on a change (see :meth:`Service._prepare`)."""

    dom: Domain
    snap: Snapshot
    plan: Plan | None  # None: failed, or nothing to change (a bulk change that picked no vNIC)
    failed: Exception | None = None  # planning (a refusal), the hooks' lookup or the answer
    hooks: HooksNow | None = None  # looked up for a plan with steps
    answered: list[DomainXML | None] = field(default_factory=list)  # see _finish
    state: VmState | None = None  # the answer of a plan with nothing to do
    started: tuple[Transaction, Started] | None = None


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class VmLocks:
    """One lock per VM, kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._slots: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return len(self._slots)

    @contextlib.asynccontextmanager
    async def hold(self, vm: str) -> AsyncIterator[None]:
        slot = self._slots.setdefault(vm, _Slot())
        slot.users += 1
        try:
            async with slot.lock:
                yield
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[vm]


class Service:
    def __init__(
        self,
        hypervisor: Hypervisor,
        networks: NetworkMap,
        *,
        workers: int,
        unplug_timeout: float,
        persist_running: bool = True,
        bounce_seconds: float = 2.0,
        bounce_default: bool = False,
    ) -> None:
        self._hypervisor = hypervisor
        self._networks = networks
        self._persist_running = persist_running
        self._unplug_timeout = unplug_timeout
        self._bounce_seconds = bounce_seconds
        self._bounce_default = bounce_default
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vnicd-worker")
        self.locks = VmLocks()
        self._before: dict[str, Snapshot] = {}
        # Bumped when a change of a VM starts and when it ends, never reset while the VM
        # exists: a read that sees the same value before and after saw no change happen.
        self._epochs: dict[str, int] = {}
        self._counter = itertools.count(1)
        # Changes cut short whose undo failed too (libvirt unreachable): the steps to undo,
        # done again before the VM's next change and at every recovery. Until then reads
        # answer the vNICs from before the change, which is the state being restored.
        self._unsettled: dict[str, tuple[Step, ...]] = {}
        # VMs whose start-time settling (link bounces a stopped vnicd left, the definition
        # following the guest) was cut by a lost libvirt connection: their next does it.
        self._ending: set[str] = set()
        # The last listing's VMs: the XML libvirt gave and the state it alone says (before
        # the listing's status and the kernel's view): an XML the same as last time is not
        # parsed again. Only the VMs of the last listing are kept: about the size of their
        # XML, compared whole (cheaper than hashing it, and no digest to trust).
        self._listed: dict[str, tuple[_Xmls, VmState]] = {}
        self.waiting = Waiting()
        self.hooks: Hooks = NoHooks()
        self.listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.waiting.close("vnicd is stopping")
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _raw(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run off the loop; a host failure becomes the caller's 'general' error."""
        try:
            return await self._raw(fn, *args, **kwargs)
        except (HypervisorError, hostnet.HostNetError) as e:
            raise _general(e) from e

    # Reading.

    def _domain(self, vm_id: str) -> Domain:
        dom = self._hypervisor.domain(vm_id)
        if dom is None:
            raise errors.NoSuchVM(vm_id)
        return dom

    @staticmethod
    def _xmls(dom: Domain, *, saved: bool, status: VmStatus, persistent: bool) -> _Xmls:
        """The live XML when running, the saved one when asked or not running."""
        active = status is not VmStatus.STOPPED
        live = dom.xml() if active else None
        inactive = dom.xml(inactive=True) if persistent and (saved or not active) else None
        return live, inactive

    @classmethod
    def _snapshot(cls, dom: Domain, *, saved: bool, status: VmStatus, persistent: bool) -> Snapshot:
        """One read (see :meth:`_xmls`)."""
        xmls = cls._xmls(dom, saved=saved, status=status, persistent=persistent)
        return Snapshot.parse(dom.uuid, status, persistent, *xmls)

    def _present(self, vm_id: str) -> tuple[Domain, VmStatus, bool]:
        dom = self._domain(vm_id)
        found = dom.presence()
        if found is None:
            self._hypervisor.forget(vm_id)
            raise errors.NoSuchVM(vm_id)
        return dom, *found

    def _read(self, vm_id: str, *, saved: bool) -> tuple[Domain, Snapshot]:
        dom, status, persistent = self._present(vm_id)
        return dom, self._snapshot(dom, saved=saved, status=status, persistent=persistent)

    def _state(self, snap: Snapshot, bridges: dict[str, str] | None = None) -> VmState:
        return vm_state(snap, self._networks.name_of, bridges=bridges)

    def _read_state(self, vm_id: str) -> VmState:
        _dom, snap = self._read(vm_id, saved=False)
        return self._state(snap, self._bridges(snap.current) if snap.active else None)

    def _bridges(self, domain: DomainXML, seen: Mapping[str, str] | None = None) -> dict[str, str]:
        """The kernel's view of each tap of a running VM, one device read each (none for
        a tap in ``seen``: read just now)."""
        where, seen = self._networks.ports.where, seen or {}
        taps = [i.tap for i in domain.interfaces if i.tap]
        return {tap: seen[tap] if tap in seen else where(tap) or "" for tap in taps}

    def _consistent(self, vm_id: str, epoch: int | None, state: VmState) -> VmState | None:
        """``state`` if no change of the VM started or ended while it was read; during a
        change in flight, its vNICs from before the change (of its definition, if it
        stopped meanwhile), with the VM's status and persistence as read (no vNIC change
        moves those); None to read again."""
        before = self._before.get(vm_id)
        if before is not None:
            if before.active and state.status is VmStatus.STOPPED and before.saved is not None:
                before = replace(before, live=None)  # stopped meanwhile: its definition
            return listed_state(self._state(before), state.status, state.persistent, None)
        return state if self._epochs.get(vm_id) == epoch else None

    async def get_info(self, vm_id: str) -> VmState:
        """The VM's state; during a change in flight, the state from before it, at once:
        libvirt is not asked (the change may be waiting for it)."""
        before = self._before.get(vm_id)
        if before is not None:
            return self._state(before)
        return await self.read_info(vm_id)

    async def read_info(self, vm_id: str) -> VmState:
        """The VM's state read from libvirt, also during a change in flight (see
        :meth:`_consistent`): what an engine event tells, so a VM paused, stopped or
        defined while a change waits is told so."""
        while True:
            epoch = self._epochs.get(vm_id)
            state = await self._blocking(self._read_state, vm_id)
            found = self._consistent(vm_id, epoch, state)
            if found is not None:
                return found

    async def domain_xmls(self, vm_ids: Sequence[str]) -> dict[str, str]:
        """Each VM's libvirt domain XML, live when it runs, else its definition: where
        ovirt-engine reads a VM's devices once their hash changed. One gone is left out."""
        return await self._blocking(self._domain_xmls, list(dict.fromkeys(vm_ids)))

    def _domain_xmls(self, vm_ids: list[str]) -> dict[str, str]:
        found = {}
        for vm_id in vm_ids:
            try:
                dom, status, _persistent = self._present(vm_id)
                found[vm_id] = dom.xml(inactive=status is VmStatus.STOPPED)
            except errors.NoSuchVM:
                continue
            except HypervisorError as e:
                if not e.gone:
                    raise
        return found

    async def vm_list(self) -> list[VmState]:
        """Every VM: its XML fetched by a few workers (one by one, a host's worth of round
        trips to libvirtd adds up) while one more parses what they fetched."""
        epochs = dict(self._epochs)
        listed = await self._blocking(self._hypervisor.listing)
        if not listed:
            return []
        loop, fetched = asyncio.get_running_loop(), queue.SimpleQueue[_Fetched]()
        ended = threading.Event()  # the parse is over: nothing more to fetch
        for part in self._parts(list(enumerate(listed)), _LIST_FETCHERS):
            loop.run_in_executor(self._executor, self._fetch, part, fetched, ended)
        # Submitted after its fetchers: the pool starts jobs in order, so the parse, which
        # waits for them, never holds a worker that one of them is queued for.
        read = await self._blocking(self._parse_fetched, listed, fetched, ended)
        found = []
        for state in read:
            consistent = self._consistent(state.uuid, epochs.get(state.uuid), state)
            found.append(consistent or await self._reread(state))
        return found

    def _parts(self, items: list[T], workers: Mapping[bool, int]) -> list[list[T]]:
        """VMs cut into one part per worker reading them (``workers`` by driver)."""
        size = -(-len(items) // workers[self._hypervisor.remote])  # ceil
        return [items[i : i + size] for i in range(0, len(items), size)] if items else []

    def _fetch(
        self,
        part: list[tuple[int, Listed]],
        fetched: queue.SimpleQueue[_Fetched],
        ended: threading.Event,
    ) -> None:
        """Each VM's XML, or why not, to ``fetched``: one item a VM, whatever happens, until
        the parse has ``ended`` (it failed)."""
        for i, vm in part:
            if ended.is_set():
                return
            got: _Xmls | Exception
            try:
                got = self._xmls(vm.domain, saved=False, status=vm.status, persistent=vm.persistent)
            except Exception as e:  # the parse raises it
                got = e
            fetched.put((i, got))

    def _parse_fetched(
        self, listed: list[Listed], fetched: queue.SimpleQueue[_Fetched], ended: threading.Event
    ) -> list[VmState]:
        """The VMs' states as their XML arrives, in the listing's order; a VM gone since
        the listing is left out."""
        try:
            masters = self._networks.ports.masters()
            found: list[VmState | None] = [None] * len(listed)
            before, kept = self._listed, dict[str, tuple[_Xmls, VmState]]()
            for _ in listed:
                i, got = fetched.get()
                vm = listed[i]
                if isinstance(got, HypervisorError) and got.gone:
                    log.debug("VM %s vanished while listing: %s", vm.domain.uuid, got)
                    continue
                if isinstance(got, Exception):
                    raise got
                uuid, last = vm.domain.uuid, before.get(vm.domain.uuid)
                if last is not None and last[0] == got:
                    state = last[1]
                else:
                    state = self._state(Snapshot.parse(uuid, vm.status, vm.persistent, *got))
                kept[uuid] = (got, state)
                kernel = masters if vm.status is not VmStatus.STOPPED else None
                found[i] = listed_state(state, vm.status, vm.persistent, kernel)
            self._listed = kept
            return [state for state in found if state is not None]
        finally:
            ended.set()

    async def vm_ids(self) -> list[str]:
        """Every VM's id, in two calls whatever their number."""
        listed = await self._blocking(self._hypervisor.listing)
        return [vm.domain.uuid for vm in listed]

    def _begin(self, vm_id: str, snap: Snapshot) -> None:
        """A change of ``vm_id`` starts (on the loop, or in the worker that then applies
        its first step: readers see the marker before any step is done; a dict item and a
        counter step are atomic under the GIL)."""
        self._before[vm_id] = snap
        self._epochs[vm_id] = next(self._counter)

    def _end(self, vm_id: str) -> None:
        if vm_id in self._unsettled:
            return  # the change is over only once it is undone
        self._before.pop(vm_id, None)
        self._epochs[vm_id] = next(self._counter)

    def _forget(self, vm_id: str) -> None:
        """The VM is gone: drop what was kept about its changes."""
        self._epochs.pop(vm_id, None)
        self._ending.discard(vm_id)
        if self._unsettled.pop(vm_id, None) is not None:
            self._before.pop(vm_id, None)

    async def _settle(self, vm_id: str) -> None:
        """Undo a change whose undo failed before (under the VM's lock)."""
        steps = self._unsettled.get(vm_id)
        if steps is None:
            return
        try:
            dom, snap = await self._blocking(self._read, vm_id, saved=True)
        except errors.NoSuchVM:
            self._forget(vm_id)
            raise
        if not snap.active:  # stopped meanwhile: its live state went with it
            steps = tuple(s for s in steps if not isinstance(s, LiveUpdate))
        if not snap.persistent:  # undefined meanwhile: its definition went with it
            steps = tuple(s for s in steps if not isinstance(s, _DEFINITION))
        problems = await self._transaction(dom, snap).undo(steps)
        if problems and not await self._raw(self._hypervisor.alive):
            raise errors.GeneralError(
                f"VM {vm_id}: a change that failed earlier is not undone yet: "
                + "; ".join(problems),
                vmID=vm_id,
            )
        self._unsettled.pop(vm_id, None)
        self._end(vm_id)
        if problems:  # libvirt or the kernel answered, and refused: retrying will not help
            log.error(
                "VM %s: the change that failed earlier cannot be undone (%s); its vNICs are "
                "taken as they are now",
                vm_id,
                "; ".join(problems),
            )
        else:
            log.info("VM %s: the change that failed earlier is undone", vm_id)

    async def _reread(self, state: VmState) -> VmState:
        try:
            return await self.read_info(state.uuid)
        except errors.NoSuchVM:
            return state

    async def capabilities(self) -> Capabilities:
        networks = await self._blocking(self._networks.available)
        return Capabilities(
            __version__, self._hypervisor.uri, self._networks.unwired_bridge, list(networks)
        )

    # Changing.

    async def _hooked(self, vm_id: str, nic: str, custom: Custom) -> frozenset[Action]:
        """The kinds of change with hooks, for a request with custom properties. They are
        for the hooks (VDSM's contract): each hook that runs gets them, and one that runs
        at a plug may be all there is (VDSM's own are). A host with no vNIC hook at all has
        nothing that reads them: refused, not dropped unread."""
        if not custom:
            return frozenset()
        hooked = await self._blocking(self.hooks.installed)
        if not hooked:
            names = sorted(name for name, _value in custom)
            problem = f"custom properties {names} of vNIC {nic} of VM {vm_id}, with no hook here"
            raise errors.NotImplementedFeature("custom", problem)
        return hooked

    async def update_device(self, req: UpdateNic) -> VmState | DryRun:
        hooked = await self._hooked(req.vm_id, str(req.nic), req.custom)
        wiring = None
        if req.change.network is not None:
            wiring = await self.resolve(req.change.network, req.vm_id, str(req.nic))
        change = self._bounced(req.change, req.bounce)
        if Action.UPDATE in hooked:  # its hooks see the request, as VDSM's do
            change = replace(change, resend=True)
        namer = self._networks.name_of
        persist = self._persist_running

        def plan(snap: Snapshot) -> Plan:
            return planning.plan_update(
                snap, req.nic, change, wiring, namer, persist_running=persist
            )

        return await self._change(req.vm_id, plan, req.dry_run, req.custom)

    def _bounced(self, change: NicChange, bounce: bool | None) -> NicChange:
        """``change`` with the link bounce asked for (None: the configured default)."""
        bounce = self._bounce_default if bounce is None else bounce
        return replace(change, bounce=self._bounce_seconds if bounce else None)

    async def resolve(self, network: str, vm: str = "", nic: str = "") -> Wiring:
        wiring = await self._blocking(self._networks.resolve, network)
        if wiring is None:
            raise errors.UnknownNetwork(vm, nic, network)
        return wiring

    async def _wiring(self, req: PlugNic, nic: str) -> Wiring | None:
        network = req.change.network if req.change is not None else None
        return None if network is None else await self.resolve(network, req.vm_id, nic)

    async def hotplug(self, req: PlugNic) -> VmState | DryRun:
        await self._hooked(req.vm_id, str(req.nic or "(new)"), req.custom)
        namer = self._networks.name_of
        if req.xml is not None:
            try:
                iface = hotplug_interface(req.xml)
            except XMLError as e:
                raise errors.InvalidParameter("xml", str(e)) from e
            planning.check_names(iface, "xml", source=False)  # before they reach an error
            named = iface.mac or "(new)"
            if iface.kind == "network" and iface.source is not None and req.change is not None:
                # a libvirt network, as vnicd names it (mapped under another name, maybe)
                req = replace(req, change=replace(req.change, network=namer(iface.source)))
            wiring = await self._wiring(req, named)
            change = req.change
            return await self._change(
                req.vm_id,
                lambda s: planning.plan_plug_new(s, iface, namer, change, wiring),
                req.dry_run,
                req.custom,
            )
        nic, change, model = req.nic, req.change, req.model
        assert nic is not None
        wiring = await self._wiring(req, str(nic))
        return await self._change(
            req.vm_id,
            lambda s: planning.plan_plug(s, nic, namer, change, wiring, model),
            req.dry_run,
            req.custom,
        )

    async def hotunplug(self, req: UnplugNic) -> VmState | DryRun:
        namer = self._networks.name_of
        return await self._change(
            req.vm_id, lambda s: planning.plan_unplug(s, req.nic, namer), req.dry_run, req.custom
        )

    async def _change(
        self,
        vm_id: str,
        make_plan: Callable[[Snapshot], Plan],
        dry_run: bool,
        custom: Custom = (),
    ) -> VmState | DryRun:
        async with self.locks.hold(vm_id):
            if not dry_run:  # a dry run changes nothing, not even that
                await self._settle(vm_id)
            prep = await self._prepare(self._reader(vm_id), make_plan, None, dry_run, custom)
            if prep.failed is not None:
                raise prep.failed
            assert prep.plan is not None
            if dry_run:
                return DryRun(prep.plan)
            plan, state, _live = await self._carry_out(prep)
        await self._done(plan, state, prep.hooks)
        return state

    def _reader(self, vm_id: str) -> Callable[[], tuple[Domain, Snapshot]]:
        return functools.partial(self._read, vm_id, saved=True)

    async def _prepare(
        self,
        read: Callable[[], tuple[Domain, Snapshot]],
        make_plan: Callable[[Snapshot], Plan | None],
        hooks: HooksNow | None,
        dry_run: bool,
        custom: Custom = (),
    ) -> _Prepared:
        """In a worker, one hop for what needs no waiting: the VM read, the change
        planned and, unless a ``before_`` hook must see the plan first, begun (see
        :meth:`Transaction.start`); a plan with nothing to do is answered. Only the read
        raises: what fails after it is the change's own outcome (``failed``). ``custom``:
        the request's custom properties, for the hooks it finds.

        If the caller's task is cancelled meanwhile, it still lets the worker finish and
        carries a change the worker began to its end (see :meth:`_finish_cut`) before it
        stops, however often it is cancelled again."""

        def work() -> _Prepared:
            try:
                dom, snap = read()
            except (HypervisorError, hostnet.HostNetError) as e:
                raise _general(e) from e
            prep = _Prepared(dom, snap, None, hooks=hooks)
            try:
                prep.plan = plan = make_plan(snap)
                if plan is None or dry_run:
                    return prep
                if not plan.steps:
                    prep.state = self._finish(prep, plan)(snap.live, {})
                    return prep
                prep.hooks = found = hooks or self.hooks.look(plan, custom)
            except Exception as e:
                prep.plan, prep.failed = None, _general(e)
                return prep
            if not found.rewrites(plan):
                self._begin(plan.vm, snap)
                tx = self._transaction(dom, snap)
                prep.started = tx, tx.start(plan, self._finish(prep, plan))
            return prep

        job = asyncio.get_running_loop().run_in_executor(self._executor, work)
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            ending = asyncio.ensure_future(self._finish_cut(job))
            while not ending.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(ending)
            raise

    async def _finish_cut(self, job: asyncio.Future[_Prepared]) -> None:
        """What a cancelled change's worker began, carried to its end, with its listeners
        and hooks: committed, undone, or left to the guest's late answer like any change
        (nothing half done, nothing marked in flight)."""
        try:
            prep = await job
        except Exception:
            return  # nothing was begun
        if prep.started is None or prep.plan is None:
            return
        try:
            plan, state, _live = await self._carry_out(prep)
            await self._done(plan, state, prep.hooks)
        except Exception:
            log.exception("VM %s: a change whose request was cancelled failed", prep.plan.vm)

    def _transaction(self, dom: Domain, snap: Snapshot) -> Transaction:
        return Transaction(
            dom, snap, self._networks.ports, self._raw, self.waiting, self._unplug_timeout
        )

    def _finish(self, prep: _Prepared, plan: Plan) -> Finish[VmState]:
        """The answer of ``plan``, noting the live XML it was built from in
        ``prep.answered``."""

        def answer(live: DomainXML | None, seen: Mapping[str, str]) -> VmState:
            prep.answered.append(live)
            return self._answer(prep.dom, prep.snap, live, plan, seen)

        return answer

    async def update_each(
        self,
        vm_id: str,
        picks: Callable[[NicState], bool],
        change: NicChange,
        wiring: Wiring | None,
        bounce: bool | None,
        dry_run: bool,
    ) -> list[tuple[NicState, VmState | DryRun | errors.VnicdError]]:
        """Change each vNIC of one VM that ``picks`` chooses, one after the other in one hold
        of the VM, the read for the next one in the hop that begins it (see :meth:`_next`).
        Each vNIC is all-or-nothing, with its hooks and its notification as a change of its
        own; after a failed one the VM is settled and read afresh."""
        change = self._bounced(change, bounce)
        namer, persist = self._networks.name_of, self._persist_running
        picked: list[NicState] = []

        def plan_for(nic: NicState) -> Callable[[Snapshot], Plan]:
            ref = NicRef(mac=nic.mac)
            return lambda snap: planning.plan_update(
                snap, ref, change, wiring, namer, persist_running=persist
            )

        def first(snap: Snapshot) -> Plan | None:
            picked.extend(n for n in self._state(snap).nics if picks(n))
            return plan_for(picked[0])(snap) if picked else None

        outcomes: list[tuple[NicState, VmState | DryRun | errors.VnicdError]] = []
        async with self.locks.hold(vm_id):
            if not dry_run:
                self._not_stopping(vm_id)
                await self._settle(vm_id)
            prep = await self._prepare(self._reader(vm_id), first, None, dry_run)
            if prep.failed is not None and not picked:
                raise prep.failed  # the VM's vNICs could not be told apart
            for i, nic in enumerate(picked):
                rest = picked[i + 1 :]
                if dry_run:  # every vNIC planned on the one read: nothing changes between
                    try:
                        outcomes.append((nic, DryRun(self._dry(prep, i, plan_for(nic)))))
                    except Exception as e:
                        outcomes.append((nic, _failure(vm_id, nic.mac, e)))
                    continue
                read: Callable[[], tuple[Domain, Snapshot]] | None = None  # None: afresh
                try:
                    if prep.failed is not None:
                        raise prep.failed
                    plan, state, live = await self._carry_out(prep)
                except Exception as e:  # one vNIC's failure must not end the others' changes
                    outcomes.append((nic, _failure(vm_id, nic.mac, e)))
                else:
                    outcomes.append((nic, state))
                    await self._done(plan, state, prep.hooks)
                    if waits(plan.steps) or (prep.hooks is not None and prep.hooks.touch(plan)):
                        live = None  # the VM did not wait for a pause or a hook script
                    read = functools.partial(self._next, vm_id, prep.dom, prep.snap, plan, live)
                if not rest:
                    break
                try:
                    if read is None:
                        await self._settle(vm_id)  # a cut change is undone before the next
                        read = self._reader(vm_id)
                    self._not_stopping(vm_id)
                    prep = await self._prepare(read, plan_for(rest[0]), prep.hooks, False)
                except Exception as e:  # VM unreadable, or vnicd stops: none of the rest is tried
                    outcomes += [(n, _failure(vm_id, n.mac, e)) for n in rest]
                    break
        return outcomes

    def _not_stopping(self, vm_id: str) -> None:
        """A bulk change begins no more vNICs once vnicd stops (each is answered so)."""
        if self.waiting.closed is not None:
            reason = f"{self.waiting.closed}: not changed; retry when it is back"
            raise errors.GeneralError(reason, vmID=vm_id)

    @staticmethod
    def _dry(prep: _Prepared, i: int, make_plan: Callable[[Snapshot], Plan]) -> Plan:
        """The plan of a bulk dry run's ``i``-th vNIC: the first planned by ``prep``."""
        if i > 0:
            return make_plan(prep.snap)
        if prep.failed is not None:
            raise prep.failed
        assert prep.plan is not None
        return prep.plan

    def _next(
        self, vm_id: str, dom: Domain, snap: Snapshot, plan: Plan, live: DomainXML | None
    ) -> tuple[Domain, Snapshot]:
        """The VM after one change of several in one hold: its status and persistence read
        again (all of it read again if they moved, or if the connection was renewed); the
        live XML as the change left it (``live``), read again when that is unknown or
        libvirt adds to what was sent (a libvirt network's port and bridge); the saved XML
        read again if the change touched it; vnicd's store as the change left it."""
        found = dom.presence() if self._hypervisor.holds(dom) else None
        if found != (snap.status, snap.persistent):
            return self._read(vm_id, saved=True)
        if snap.active and (live is None or _joins_a_network(plan)):
            live = DomainXML(dom.xml())
        saved = snap.saved
        if snap.persistent and any(isinstance(s, _DEFINITION) for s in plan.steps):
            saved = DomainXML(dom.xml(inactive=True))
        return dom, replace(snap, live=live, saved=saved, store=plan.store, store_error=None)

    async def _carry_out(self, prep: _Prepared) -> tuple[Plan, VmState, DomainXML | None]:
        """Under the VM's lock: the prepared plan (as the hooks left it) carried out, its
        answer, and the live XML the answer was built from (None when it had to be read
        afresh)."""
        dom, snap, plan = prep.dom, prep.snap, prep.plan
        assert plan is not None
        if prep.state is not None:
            return plan, prep.state, snap.live
        assert prep.hooks is not None
        if prep.started is None:
            plan = await prep.hooks.before(plan)
            self._begin(plan.vm, snap)
        try:
            state = await self._execute(dom, snap, plan, self._finish(prep, plan), prep.started)
        except _Unanswered as e:
            state = await self._answer_again(plan, e.cause, prep.hooks)
            prep.answered.clear()
        except errors.VnicdError as e:
            await self._after(plan, e, prep.hooks)
            raise
        finally:
            self._end(plan.vm)
        return plan, state, prep.answered[0] if prep.answered else None

    async def _done(self, plan: Plan, state: VmState, hooks: HooksNow | None) -> None:
        """Listeners, then the success hooks (none for a change that had nothing to do)."""
        if not plan.steps:
            return
        self._notify(plan, state)
        await self._after(plan, None, hooks)

    async def _answer_again(self, plan: Plan, cause: Exception, hooks: HooksNow) -> VmState:
        """The state after a done change whose answer could not be read: read once more,
        else an error that says the change is done (its success hooks run either way)."""
        try:
            return await self._blocking(self._read_state, plan.vm)
        except errors.VnicdError as e:
            log.error(
                "VM %s vNIC %s: %s done, but its state cannot be read: %s; then: %s",
                plan.vm,
                plan.nic,
                plan.action.value,
                cause,
                e,
            )
            await self._after(plan, None, hooks)
            raise errors.GeneralError(
                f"the {plan.action.value} of vNIC {plan.nic} of VM {plan.vm} is done, but "
                f"reading its state to answer failed: {cause}",
                vmID=plan.vm,
                nic=plan.nic,
                done=True,
            ) from e

    async def _after(self, plan: Plan, error: Exception | None, hooks: HooksNow | None) -> None:
        """The after_ hooks: how the change ended is decided already, whatever they do."""
        if hooks is None:
            return
        try:
            await hooks.after(plan, error)
        except Exception:
            log.exception("VM %s: after-change hooks failed", plan.vm)

    async def _execute(
        self,
        dom: Domain,
        snap: Snapshot,
        plan: Plan,
        answer: Finish[T],
        started: tuple[Transaction, Started] | None = None,
    ) -> T:
        """Carry out ``plan`` (``started``: begun by :meth:`_prepare`); ``answer`` (run in
        a worker) builds the result from what the confirmation read."""
        tx, begun = started or (self._transaction(dom, snap), None)
        try:
            result = await tx.execute(plan, answer, begun)
        except Pending as e:
            raise _error(plan, "timeout", str(e), rolled_back=False) from e
        except Failed as e:
            cause = _cause(e.cause)
            outcome = (
                f"rollback incomplete: {'; '.join(e.problems)}"
                if e.problems
                else "the previous state was restored"
            )
            # the connection to libvirt was lost: the failed step may have happened
            lost = bool(e.undo) and not await self._raw(self._hypervisor.holds, dom)
            if lost:
                then = "restores the previous state" if repeatable(e.undo) else "settles the vNIC"
                if repeatable(e.undo):
                    self._unsettled[plan.vm] = e.undo
                if self._hypervisor.up:  # back already: recovery may have passed this VM
                    self.spawn(self.reconcile(plan.vm))
                outcome = (
                    f"{outcome if e.problems else 'libvirt may have carried it out'}; "
                    f"vnicd {then} once libvirt answers again"
                )
            rolled_back = not e.problems and not lost
            raise _error(plan, cause, f"{e}; {outcome}", rolled_back=rolled_back) from e
        except (HypervisorError, hostnet.HostNetError) as e:
            raise _Unanswered(e) from e
        # a change the caller asked for gets its audit line (see sitehooks.audit): this one
        # is for a settling, or for debugging (its summary made only then: a hot path)
        level = logging.INFO if plan.action is Action.RECONCILE else logging.DEBUG
        if log.isEnabledFor(level):
            summary = _summary(plan)
            log.log(
                level, "VM %s vNIC %s: %s done (%s)", plan.vm, plan.nic, plan.action.value, summary
            )
        return result

    def _answer(
        self,
        dom: Domain,
        snap: Snapshot,
        live: DomainXML | None,
        plan: Plan,
        seen: Mapping[str, str],
    ) -> VmState:
        """The state after a change, from what the transaction knows (the live XML as read,
        with the updates libvirt accepted; the bridge of each tap it checked); the VM's
        other taps are read here."""
        if snap.active:
            domain = live or DomainXML(dom.xml())
            return vm_state(
                snap,
                self._networks.name_of,
                domain=domain,
                store=plan.store,
                bridges=self._bridges(domain, seen),
            )
        saved = DomainXML(dom.xml(inactive=True))
        return vm_state(snap, self._networks.name_of, domain=saved, store=plan.store)

    def _notify(self, plan: Plan, state: VmState) -> None:
        for listener in self.listeners:
            try:
                listener(plan, state)
            except Exception:
                log.exception("a change listener failed")

    # Keeping the store in step with the domain.

    def device_removed(self, vm_id: str, alias: str, removed: bool) -> None:
        """libvirt's answer to a device removal; one nobody waits for settles the store."""
        log.info("VM %s device %s: %s", vm_id, alias, "removed" if removed else "refused")
        if not self.waiting.answered(vm_id, alias, removed):
            self.spawn(self.reconcile(vm_id, refused=None if removed else alias))

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reconcile(
        self, vm_id: str, refused: str | None = None, *, starting: bool = False
    ) -> None:
        """Settle a VM's stored vNICs with its domain (see :func:`planning.plan_reconcile`);
        ``starting``: first end the link bounces a stopped vnicd left in their pause, and
        also settle a running VM's definition with its live vNICs."""
        try:
            async with self.locks.hold(vm_id):
                await self._settle(vm_id)
                dom, snap = await self._raw(self._read, vm_id, saved=True)
                if snap.store_error is not None:
                    log.error("VM %s: %s", vm_id, snap.store_error)
                    return
                ending = starting or vm_id in self._ending  # see _end_bounces
                if ending and snap.store.bounces:
                    dom, snap = await self._end_bounces(dom, snap)
                self._ending.discard(vm_id)
                follow = ending and self._persist_running
                plan = planning.plan_reconcile(snap, refused, follow_live=follow)
                if plan is None:
                    return
                log.info("VM %s: settling stored vNICs (%s)", vm_id, _summary(plan))
                await self._settling(dom, snap, plan)
        except errors.NoSuchVM:
            self._forget(vm_id)
        except (errors.VnicdError, HypervisorError, hostnet.HostNetError, _Unanswered) as e:
            log.error("VM %s: settling stored vNICs failed: %s", vm_id, e)

    async def _end_bounces(self, dom: Domain, snap: Snapshot) -> tuple[Domain, Snapshot]:
        """The link bounces a stopped vnicd left in their pause, ended, then their marks
        removed, each apart from the settling, which neither may hold back (a vNIC whose
        bridge went stays unlinked, and the log says so); the VM read again for it. Cut by
        a lost libvirt connection, they are ended (and the definition settled as at start)
        by the settling once libvirt is back."""
        vm_id = snap.uuid
        for make in (planning.plan_bounce_ends, planning.plan_unmarking):
            plan = make(snap)
            if plan is None:
                continue
            log.info(
                "VM %s: ending link bounces left by a stopped vnicd (%s)", vm_id, _summary(plan)
            )
            try:
                await self._settling(dom, snap, plan)
            except _Unanswered as e:
                log.warning("VM %s: done; reading the VM after it failed: %s", vm_id, e)
            except errors.VnicdError as e:
                log.error("VM %s: a link bounce left by a stopped vnicd stays: %s", vm_id, e)
                if vm_id in self._unsettled:  # libvirt went away: settled once it is back
                    self._ending.add(vm_id)
                    raise
            dom, snap = await self._raw(self._read, vm_id, saved=True)
        return dom, snap

    async def _settling(self, dom: Domain, snap: Snapshot, plan: Plan) -> None:
        """Carry out a settling ``plan`` (reads answer ``snap`` meanwhile); the listeners
        hear of the VM read afresh after it (a release may have stopped it)."""
        vm_id = snap.uuid
        self._begin(vm_id, snap)
        try:
            state = await self._execute(dom, snap, plan, lambda _l, _s: self._read_state(vm_id))
        finally:
            self._end(vm_id)
        self._notify(plan, state)

    async def reconcile_all(self, *, starting: bool = False) -> list[str]:
        """Settle every VM that needs it (at start, and after reconnecting); returns the
        names of all.

        The VMs are listed and their XML read by a few workers at once; only those with
        something to settle (stored vNICs, a change to undo, at start a definition behind
        its live vNICs) or that could not be read are read again, under their lock, and
        settled.
        """
        listed = await self._raw(self._hypervisor.listing)
        for vm_id in set(self._unsettled) - {vm.domain.uuid for vm in listed}:
            self._forget(vm_id)  # gone while libvirt was away: nothing left to undo
        follow = starting and self._persist_running
        parts = self._parts(listed, _RECOVERY_READERS)
        found = await asyncio.gather(*(self._raw(self._unsettling, p, follow) for p in parts))
        due = set(itertools.chain.from_iterable(found)) | set(self._unsettled)
        await asyncio.gather(*(self.reconcile(vm_id, starting=starting) for vm_id in due))
        return [vm.domain.name for vm in listed]

    @classmethod
    def _unsettling(cls, listed: list[Listed], follow_live: bool) -> list[str]:
        """The VMs that keep stored vNICs in their current XML (live, or saved when not
        running); with ``follow_live``, also running persistent VMs whose definition has a
        vNIC wired otherwise than live (their saved XML is read too)."""
        found = []
        for vm in listed:
            dom, status, persistent = vm.domain, vm.status, vm.persistent
            try:
                live, saved = cls._xmls(
                    dom, saved=follow_live, status=status, persistent=persistent
                )
                if live is not None and saved is not None:  # following a running definition
                    snap = Snapshot.parse(dom.uuid, status, persistent, live, saved)
                    plan = planning.plan_reconcile(snap, follow_live=True)
                    marked = bool(snap.store.bounces)  # a link bounce to end
                    due = snap.store_error is not None or plan is not None or marked
                else:
                    due = mentions_store(live or saved or "")
            except HypervisorError as e:
                if e.gone:
                    log.debug("VM %s vanished while recovering: %s", dom.uuid, e)
                    continue
                due = True  # read again under its lock, where a failure is told
            if due:
                found.append(dom.uuid)
        return found

    # VMs.

    async def create(self, req: CreateVM) -> VmState:
        try:
            xml = DomainXML(req.xml)
        except XMLError as e:
            raise errors.InvalidParameter("vm.xml", str(e)) from e
        if xml.uuid is not None and xml.uuid.lower() != req.vm_id.lower():
            raise errors.InvalidParameter(
                "vm.xml", f"<uuid> {xml.uuid} differs from the VM id {req.vm_id}"
            )
        for iface in xml.interfaces:
            planning.check_names(iface, "vm.xml")
        xml.set_uuid(req.vm_id)
        async with self.locks.hold(req.vm_id):
            if await self._blocking(self._hypervisor.lookup, req.vm_id) is not None:
                raise errors.VMExists(req.vm_id)
            await self._blocking(self._create, req.vm_id, xml.to_xml(), req.persistent)
        return await self.get_info(req.vm_id)

    def _create(self, vm_id: str, xml: str, persistent: bool) -> None:
        try:
            self._hypervisor.create(xml, persistent=persistent)
        except HypervisorError as e:
            raise errors.CreateError(str(e), vmID=vm_id, cause=e.cause) from e

    async def destroy(self, vm_id: str, *, undefine: bool = False) -> None:
        """Stop the VM; with ``undefine``, also remove its definition. A definition is
        never removed otherwise: ovirt-engine destroys each VM it hears is Down, meaning
        "stop it" (VDSM's VMs are all transient)."""
        async with self.locks.hold(vm_id):
            gone = await self._blocking(self._destroy, vm_id, undefine)
        if gone:
            self._forget(vm_id)

    def _destroy(self, vm_id: str, undefine: bool) -> bool:
        """Whether the VM is gone now."""
        dom, _status, persistent = self._present(vm_id)
        if dom.is_active():  # a crashed VM kept for a dump is still active
            dom.destroy()  # a transient VM is gone then
        if persistent and undefine:
            dom.undefine()
        return undefine or not persistent


_DEFINITION = (DefinitionUpdate, DefinitionAttach, DefinitionDetach)


def _joins_a_network(plan: Plan) -> bool:
    """Whether a live update of ``plan`` sends a libvirt network source without its port
    and bridge (a vNIC wired to it, again or anew): libvirt's live XML names the ones it
    allocated, which vnicd did not send."""
    updates = (s for s in plan.steps if isinstance(s, LiveUpdate))
    return any(s.after.kind == "network" and s.after.bridge is None for s in updates)


def _general(e: Exception) -> Exception:
    """A host failure as the caller's 'general' error (caused by it); anything else as it
    is."""
    if not isinstance(e, HypervisorError | hostnet.HostNetError):
        return e
    general = errors.GeneralError(str(e), cause=str(e))
    general.__cause__ = e
    return general


def _failure(vm_id: str, mac: str, error: Exception) -> errors.VnicdError:
    if isinstance(error, errors.VnicdError):
        return error
    log.error("VM %s vNIC %s: change failed", vm_id, mac, exc_info=error)
    return errors.GeneralError(str(error), vmID=vm_id, nic=mac)


class _Unanswered(Exception):
    """The change is done; reading the state that answers it failed (``cause``)."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _cause(e: Exception) -> str:
    if isinstance(e, Refused):
        return "refused"
    return "confirm" if isinstance(e, ConfirmError) else "libvirt"


def _error(plan: Plan, cause: str, problem: str, *, rolled_back: bool) -> errors.VnicdError:
    # a settling names no vNIC: it may change several
    what = f"vNIC {plan.nic} of VM {plan.vm}" if plan.nic else f"the vNICs of VM {plan.vm}"
    if plan.action is Action.PLUG:
        return errors.HotplugNicError(
            f"cannot plug {what}: {problem}", vmID=plan.vm, nic=plan.nic, cause=cause
        )
    if plan.action is Action.UNPLUG:
        return errors.HotunplugNicError(
            f"cannot unplug {what}: {problem}", vmID=plan.vm, nic=plan.nic, cause=cause
        )
    return errors.UpdateDeviceFailed(
        f"updating {what} failed: {problem}",
        vmID=plan.vm,
        nic=plan.nic,
        cause=cause,
        rolledBack=rolled_back,
    )


def _summary(plan: Plan) -> str:
    before, after = plan.before, plan.after
    if before is None or after is None:
        return ", ".join(type(s).__name__ for s in plan.steps)
    parts = [
        f"network {before.network!r} -> {after.network!r}",
        f"link {'up' if before.link_up else 'down'} -> {'up' if after.link_up else 'down'}",
        f"plugged {before.plugged} -> {after.plugged}",
    ]
    if before.filter_text != after.filter_text:
        parts.append(f"filter {before.filter_text!r} -> {after.filter_text!r}")
    if before.isolated != after.isolated:
        parts.append(f"isolated {before.isolated} -> {after.isolated}")
    return ", ".join(parts)
