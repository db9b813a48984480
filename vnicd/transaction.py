"""Carrying out a plan: apply each step, confirm it where it happens, undo for real.

Blocking libvirt and kernel calls run through ``run`` (the service's worker pool); the
wait for a guest to release a vNIC is an asyncio future resolved from libvirt's event on
the loop, so no worker is held while a guest thinks. A failure undoes the completed steps
in reverse, each by sending back what it replaced (and moving the tap back in the kernel:
after a partial failure libvirt's XML may name the old bridge while the tap already sits
on the new one), then confirms the original state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from vnicd import hostnet
from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import Interface
from vnicd.hypervisor import Domain, HypervisorError
from vnicd.model import Snapshot
from vnicd.networks import PortBackend
from vnicd.planning import (
    DefinitionAttach,
    DefinitionDetach,
    DefinitionUpdate,
    LiveAttach,
    LiveDetach,
    LiveUpdate,
    Pause,
    Plan,
    Step,
    StoreWrite,
)
from vnicd.unplugged import KEY, NAMESPACE, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
Runner = Callable[..., Awaitable[Any]]
FAULTS = (HypervisorError, hostnet.HostNetError)
_WAITING = (Pause, LiveDetach)  # steps that wait on the loop, not in a worker


class ConfirmError(Exception):
    """The host does not show the state that was asked for."""


class Refused(Exception):
    """The guest refused to release a vNIC."""


class Pending(Exception):
    """The guest did not answer in time; its release, if it comes, finishes the change."""


class Failed(Exception):
    """A step failed; the completed steps were undone (``problems``: what could not be;
    ``undo``: the steps done and the failed one, what a lost connection to libvirt leaves
    unknown: undone again once it is back when all are :func:`repeatable`, else the change
    is settled from what libvirt then has)."""

    def __init__(self, cause: Exception, problems: list[str], undo: tuple[Step, ...] = ()) -> None:
        super().__init__(str(cause))
        self.cause = cause
        self.problems = problems
        self.undo = undo


# Steps whose undo sends back what they replaced: undoing one again, or one that did not
# happen, changes nothing; a failed undo of these can be retried later.
_REPEATABLE = (LiveUpdate, DefinitionUpdate, StoreWrite, Pause)


def _isolation(step: LiveUpdate) -> bool:
    """Whether a live update is of an isolated port on a host bridge (before or after):
    only then is the port's flag the vNIC's XML's to confirm and put back (a libvirt
    network may isolate its ports where the XML says nothing)."""
    ifaces = (step.before, step.after)
    return any(i.isolated for i in ifaces) and all(i.kind == "bridge" for i in ifaces)


def repeatable(steps: tuple[Step, ...]) -> bool:
    return all(isinstance(s, _REPEATABLE) for s in steps)


class Waiting:
    """What changes wait for on the event loop, a guest's answer to a device removal and
    a link bounce's pause, and the end of those waits when vnicd stops."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, str], asyncio.Future[bool]] = {}
        self._closed: str | None = None  # why nothing is waited for any more
        self._stopping = asyncio.Event()

    def expect(self, vm: str, alias: str) -> asyncio.Future[bool]:
        """The guest's answer to come; ConnectionError once vnicd stops."""
        if self._closed is not None:
            raise ConnectionError(self._closed)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting[(vm, alias)] = future
        return future

    @property
    def closed(self) -> str | None:
        """Why nothing is waited for any more (vnicd stops), or None."""
        return self._closed

    def forget(self, vm: str, alias: str) -> None:
        self._waiting.pop((vm, alias), None)

    def answered(self, vm: str, alias: str, removed: bool) -> bool:
        """Deliver libvirt's answer; False when nobody waits for it (a late answer)."""
        future = self._waiting.pop((vm, alias), None)
        if future is None or future.done():
            return False
        future.get_loop().call_soon_threadsafe(_settle, future, removed)
        return True

    def cancel_all(self, reason: str) -> None:
        """End the waits for guests' answers with ``reason``."""
        for future in self._waiting.values():
            if not future.done():
                future.get_loop().call_soon_threadsafe(_fail, future, reason)
        self._waiting.clear()

    async def pause(self, seconds: float) -> None:
        """``seconds``, or less once vnicd stops: the change then goes on to its end."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def close(self, reason: str) -> None:
        """vnicd stops: end every wait, and those asked for from now on, at once (a guest
        not answered yet answers late; a pause ends)."""
        self._closed = reason
        self._stopping.set()
        self.cancel_all(reason)


def _unawaited(cause: ConnectionError) -> Pending:
    """A release asked of the guest, whose answer no one waits for: the request stays with
    QEMU, and a late release must still finish the unplug."""
    return Pending(f"its release could not be awaited ({cause}); it stays plugged")


def _settle(future: asyncio.Future[bool], removed: bool) -> None:
    if not future.done():
        future.set_result(removed)


def _fail(future: asyncio.Future[bool], reason: str) -> None:
    if not future.done():
        future.set_exception(ConnectionError(reason))


Finish = Callable[[DomainXML | None, Mapping[str, str]], T]


def _first_wait(steps: Sequence[Step]) -> int:
    """The index of the first of ``steps`` that waits (a pause, the guest's release)
    rather than calls; ``len(steps)`` when none does."""
    return next((i for i, s in enumerate(steps) if isinstance(s, _WAITING)), len(steps))


def waits(steps: tuple[Step, ...]) -> bool:
    """Whether any of ``steps`` waits rather than calls."""
    return _first_wait(steps) < len(steps)


@dataclass
class Started:
    """What a worker did of a plan before the loop takes it on (see
    :meth:`Transaction.start`): the steps tried, those done, the one that failed, the
    answer when they were the whole plan, or what was raised."""

    count: int
    done: list[Step]
    failed: tuple[Step, Exception] | None = None
    answer: Any = None
    raised: Exception | None = None


class Transaction:
    """One plan on one domain. ``live`` is the live XML as last read, with the live
    updates libvirt accepted since; ``seen`` each tap's bridge as the kernel last
    reported it ("" for none)."""

    def __init__(
        self,
        dom: Domain,
        snap: Snapshot,
        ports: PortBackend,
        run: Runner,
        waiting: Waiting,
        unplug_timeout: float,
    ) -> None:
        self._dom = dom
        self._snap = snap
        self._ports = ports
        self._run = run
        self._waiting = waiting
        self._timeout = unplug_timeout
        self.live: DomainXML | None = snap.live
        self.seen: dict[str, str] = {}

    def start(self, plan: Plan, finish: Finish[T]) -> Started:
        """In a worker that has just read and planned: apply the plan's steps up to the
        first that waits, and ``finish`` when they are all of it; never raises. The loop
        carries on with :meth:`execute`, one hop to a worker fewer."""
        steps = plan.steps
        n = _first_wait(steps)
        done: list[Step] = []
        try:
            failed, answer = self._apply_all(
                plan.vm, list(steps[:n]), done, finish if n == len(steps) else None
            )
        except Exception as e:
            return Started(n, done, raised=e)
        return Started(n, done, failed, answer)

    async def execute(self, plan: Plan, finish: Finish[T], started: Started | None = None) -> T:
        """Apply every step, or undo the completed ones and raise :class:`Failed`; then
        ``finish(live, seen)`` builds the answer from what the confirmation read.
        :class:`Pending` leaves what was done: the guest's late answer finishes it.
        ``started``: what :meth:`start` did already.

        Consecutive blocking steps, and ``finish`` after the last of them, run in one
        worker call: each hop to a worker and back costs more than a libvirt call.
        """
        done: list[Step] = [] if started is None else started.done
        steps = list(plan.steps[0 if started is None else started.count :])
        if started is not None:
            if started.raised is not None:
                raise started.raised
            if started.failed is not None:
                step, error = started.failed
                raise await self._failed(error, step, done) from error
            if not steps:
                return cast(T, started.answer)
        while steps:
            if isinstance(steps[0], _WAITING):
                step = steps.pop(0)
                try:
                    await self._wait(step)
                except Pending:
                    raise
                except (*FAULTS, ConfirmError, Refused) as e:
                    raise await self._failed(e, step, done) from e
                done.append(step)
                continue
            n = _first_wait(steps)
            batch, steps = steps[:n], steps[n:]
            failed, answer = await self._run(
                self._apply_all, plan.vm, batch, done, None if steps else finish
            )
            if failed is not None:
                step, error = failed
                raise await self._failed(error, step, done) from error
            if not steps:
                return cast(T, answer)
        return cast(T, await self._run(finish, self.live, self.seen))

    async def _failed(self, error: Exception, step: Step, done: list[Step]) -> Failed:
        """``step`` failed: undo the steps done and say how the change ended."""
        # a live step may have half-happened (libvirt's own change has no rollback)
        half: list[Step] = [step] if isinstance(step, LiveUpdate | LiveAttach) else []
        problems = await self.undo((*done, *half))
        # and any call cut by a lost connection may have been carried out: one that cannot
        # be undone blindly (an attach, a detach) leaves the change to be settled instead
        return Failed(error, problems, (*done, step))

    def _apply_all(
        self,
        vm: str,
        steps: list[Step],
        done: list[Step],
        finish: Finish[T] | None,
    ) -> tuple[tuple[Step, Exception] | None, T | None]:
        """In a worker: apply ``steps`` in order, then ``finish``; the failed step, if any."""
        for step in steps:
            try:
                self._apply(step)
            except (*FAULTS, ConfirmError) as e:
                if isinstance(step, StoreWrite) and step.best_effort:
                    log.warning("VM %s: %s (the change itself is done)", vm, e)
                    continue
                return (step, e), None
            done.append(step)
        return None, None if finish is None else finish(self.live, self.seen)

    def _apply(self, step: Step) -> None:
        dom = self._dom
        match step:
            case LiveUpdate(before=before, after=after, bridge=bridge):
                dom.update_interface(after.to_xml(), live=True, persistent=False)
                isolated = after.isolated if _isolation(step) else None
                if (after.tap, after.alias) == (before.tap, before.alias):
                    self._took(after, bridge, isolated)
                else:  # a hook left out what libvirt fills in from the device: read it
                    self._confirm(after, bridge, isolated)
            case DefinitionUpdate(after=after):
                dom.update_interface(after.to_xml(), live=False, persistent=True)
            case LiveAttach(iface=iface):
                dom.attach_interface(iface.to_xml(), live=True, persistent=False)
                self._confirm_attached(iface)
            case DefinitionAttach(iface=iface, from_live=from_live):
                xml = (self._live_definition(iface.mac) if from_live else iface).to_xml()
                dom.attach_interface(xml, live=False, persistent=True)
            case DefinitionDetach(iface=iface):
                dom.detach_interface(iface.to_xml(), live=False, persistent=True)
            case StoreWrite(before=before, after=after):
                self._write_store(after, before)

    async def _wait(self, step: Step) -> None:
        match step:
            case Pause(seconds=seconds):
                await self._waiting.pause(seconds)
            case LiveDetach(iface=iface):
                await self._release(iface)

    async def undo(self, done: tuple[Step, ...]) -> list[str]:
        """Undo ``done`` in reverse, each step for real; returns what could not be undone.
        Of a plan's live updates (a bounce has two) only the first is undone: it restores
        the state from before them all, which a later one's intermediate state (say, on a
        bridge deleted meanwhile) must not stand in the way of."""
        problems: list[str] = []
        dom = self._dom
        lives = [s for s in done if isinstance(s, LiveUpdate)]
        first_live = lives[0] if lives else None
        isolation = any(_isolation(s) for s in lives)  # a bounce's second half's too
        for step in reversed(done):
            if isinstance(step, LiveUpdate) and step is not first_live:
                continue
            try:
                match step:
                    case LiveUpdate(before=before, bridge_before=bridge):
                        await self._run(self._restore_live, before, bridge, isolation)
                    case DefinitionUpdate(before=before):
                        xml = before.to_xml()
                        await self._run(dom.update_interface, xml, live=False, persistent=True)
                    case LiveAttach(iface=iface):
                        live = (await self._run(self._read_live)).interface(mac=iface.mac)
                        if live is not None:
                            await self._release(live, undoing=True)
                    case LiveDetach(iface=iface):
                        xml = iface.definition().to_xml()
                        await self._run(dom.attach_interface, xml, live=True, persistent=False)
                        await self._run(self._confirm_attached, iface)
                    case DefinitionAttach(iface=iface):
                        saved = DomainXML(await self._run(dom.xml, inactive=True))
                        found = saved.interface(mac=iface.mac)
                        if found is not None:
                            xml = found.to_xml()
                            await self._run(dom.detach_interface, xml, live=False, persistent=True)
                    case DefinitionDetach(iface=iface):
                        xml = iface.to_xml()
                        await self._run(dom.attach_interface, xml, live=False, persistent=True)
                    case StoreWrite(before=before, after=after):
                        await self._run(self._write_store, before, after)
            except (*FAULTS, ConfirmError, Refused, Pending) as e:
                problems.append(str(e))
        if problems:
            log.error("VM %s: undo incomplete: %s", self._snap.uuid, "; ".join(problems))
        return problems

    async def _release(self, iface: Interface, *, undoing: bool = False) -> None:
        """Ask the guest to release a vNIC and wait for its answer on the loop. Once vnicd
        stops, an unplug asks nothing (it is undone), but the undo of a plug still asks:
        the guest's answer then comes with no one waiting for it."""
        alias, vm = iface.alias or "", self._snap.uuid
        try:
            answer = self._waiting.expect(vm, alias)
        except ConnectionError as e:
            if not undoing:
                raise Refused(f"{e}: the guest is not asked to release it") from e
            await self._run(self._dom.detach_alias, alias)
            raise _unawaited(e) from e
        try:
            await self._run(self._dom.detach_alias, alias)
            removed = await asyncio.wait_for(answer, self._timeout)
        except ConnectionError as e:
            raise _unawaited(e) from e
        except TimeoutError:
            try:
                gone = not await self._run(self._present, iface.mac)
            except FAULTS as e:
                raise Pending(f"the guest did not answer, and libvirt neither: {e}") from e
            if gone:
                return  # the event was missed
            raise Pending(
                f"the guest did not release it within {self._timeout:g} s; it stays plugged"
            ) from None
        finally:
            self._waiting.forget(vm, alias)
        if not removed:
            raise Refused("the guest refused to release it")
        if await self._run(self._present, iface.mac):
            raise ConfirmError(f"vNIC {iface.mac} is still in the live XML after its release")

    # Blocking helpers, run in a worker.

    def _read_live(self) -> DomainXML:
        self.live = DomainXML(self._dom.xml())
        return self.live

    def _present(self, mac: str | None) -> bool:
        return self._read_live().interface(mac=mac) is not None

    def _took(self, after: Interface, bridge: str | None, isolated: bool | None) -> None:
        """libvirt accepted ``after`` as a live update. It answers only once the device's
        live definition is replaced (nothing is left half done without an error), so its
        live XML is not read back: ``live`` becomes the one read before, with ``after``.
        The kernel is read: the tap must be on ``bridge``, its port ``isolated`` or not
        (None: not checked)."""
        assert self.live is not None, "a live update is of a running VM"
        self.live = self.live.with_interface(after)
        self._on_bridge(after.tap, bridge, isolated)

    def _confirm(
        self, expected: Interface, bridge: str | None, isolated: bool | None = None
    ) -> None:
        now = self._read_live().interface(mac=expected.mac)
        if now is None:
            raise ConfirmError(f"vNIC {expected.mac} is gone from the live XML")
        if now.source != expected.source or now.link_up != expected.link_up:
            raise ConfirmError(
                f"libvirt reports {now.source} link {'up' if now.link_up else 'down'}, "
                f"expected {expected.source} link {'up' if expected.link_up else 'down'}"
            )
        self._on_bridge(now.tap, bridge, isolated)

    def _on_bridge(self, tap: str | None, bridge: str | None, isolated: bool | None) -> None:
        """The kernel's word that ``tap`` is on ``bridge`` (nothing to check without both),
        its port ``isolated`` or not (None: not checked; a libvirt network may isolate
        its ports where the vNIC's XML does not say so)."""
        if bridge is not None and tap is not None:
            actual, actually_isolated = self._port(tap)
            if actual != bridge:
                raise ConfirmError(f"tap {tap} is on {actual}, expected {bridge}")
            if isolated is not None and actually_isolated != isolated:
                state = "isolated" if actually_isolated else "not isolated"
                raise ConfirmError(f"tap {tap}'s port on {bridge} is {state}")

    def _confirm_attached(self, iface: Interface) -> None:
        live = self._read_live().interface(mac=iface.mac)
        if live is None:
            raise ConfirmError("libvirt does not show it plugged")
        if iface.address is not None and live.address != iface.address:
            raise ConfirmError(f"it came back at {live.address}, not {iface.address}")
        if live.bridge and live.tap:
            try:
                self._on_bridge(live.tap, live.bridge, True if live.isolated else None)
            except ConfirmError as e:
                raise ConfirmError(f"its {e}") from e

    def _port(self, tap: str) -> tuple[str | None, bool]:
        bridge, isolated = self._ports.port(tap)
        self.seen[tap] = bridge or ""
        return bridge, isolated

    def _restore_live(self, before: Interface, bridge: str | None, isolation: bool) -> None:
        """``before`` live again, its tap on ``bridge`` in the kernel and, when the change
        was of its ``isolation``, its port as isolated as it was."""
        problems = []
        try:
            self._dom.update_interface(before.to_xml(), live=True, persistent=False)
        except HypervisorError as e:
            problems.append(str(e))
        tap = before.tap
        try:  # libvirt leaves a tap it moved, and a port flag it set, when it fails after
            if bridge is not None and tap is not None:
                where, isolated = self._ports.port(tap)
                if where != bridge:
                    self._ports.move(tap, bridge, before.isolated)
                elif isolation and isolated != before.isolated:
                    self._ports.isolate(tap, before.isolated)
            self._confirm(before, bridge, before.isolated if isolation else None)
        except (*FAULTS, ConfirmError) as e:
            problems.append(str(e))
        if problems:
            raise ConfirmError("; ".join(problems))

    def _live_definition(self, mac: str | None) -> Interface:
        live = self.live.interface(mac=mac) if self.live is not None else None
        if live is None:
            raise ConfirmError(f"vNIC {mac} is not in the live XML")
        return live.definition()

    def _write_store(self, store: Store, replacing: Store) -> None:
        """Live and in the definition, which keeps no bounce mark (one is of the running
        guest: a VM that boots with one was not in a bounce): one write for both, but for a
        marked store two, the second left out when only marks change. When a write to the
        definition fails, the live store is written back: libvirt writes live first, also
        in one call for both, so a failed write leaves the store as it was."""
        active, persistent, kept = self._snap.active, self._snap.persistent, store.unmarked()
        marked = kept is not store
        try:
            if active:
                both = persistent and not marked
                self._dom.set_metadata(store.format(), KEY, NAMESPACE, live=True, persistent=both)
            if not persistent:
                return
            if active and (not marked or kept == replacing.unmarked()):
                return  # written with the live one, or unchanged
            self._dom.set_metadata(kept.format(), KEY, NAMESPACE, live=False, persistent=True)
        except HypervisorError:
            if active and persistent:
                xml = replacing.format()
                with contextlib.suppress(HypervisorError):
                    self._dom.set_metadata(xml, KEY, NAMESPACE, live=True, persistent=False)
            raise
