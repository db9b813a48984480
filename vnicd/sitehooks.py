"""Site hooks and the audit on the transaction's seams.

:class:`PlanHooks` runs VDSM-named hooks around a planned change (:mod:`vnicd.hooks` runs
the scripts), as a request found them when it started (:class:`RequestHooks`): a
``before_`` hook sees the device XML the change will send, may rewrite it (not the vNIC's
identity: MAC, model, PCI address) or veto it; ``after_`` and ``after_*_fail`` hear how it
ended. :func:`audit` writes one audit line per committed change.
"""

from __future__ import annotations

from pathlib import Path

from vnicd import errors, logs
from vnicd.domxml import Interface, XMLError
from vnicd.hooks import Hooks
from vnicd.model import NicState, VmState
from vnicd.planning import Action, Plan

_NAMES = {
    Action.UPDATE: "update_device",
    Action.PLUG: "nic_hotplug",
    Action.UNPLUG: "nic_hotunplug",
}


class PlanHooks:
    def __init__(self, hooks: Hooks) -> None:
        self._hooks = hooks

    def look(self, plan: Plan, custom: tuple[tuple[str, str], ...] = ()) -> RequestHooks:
        """The hooks of ``plan``'s kind of change as they are now, for one request
        (blocking: reads their directories), with its custom properties (VDSM's: they are
        the hooks' environment). A change's ``before_`` and ``after_`` hooks are those of
        one moment."""
        name = _NAMES.get(plan.action)
        if name is None:
            return RequestHooks(self._hooks, {}, custom)
        hooks = [_hook(when, name) for when in ("before", "after", "after_fail")]
        return RequestHooks(self._hooks, self._hooks.present(hooks), custom)

    def installed(self) -> frozenset[Action]:
        """The kinds of change some hook has scripts for now (blocking: reads their
        directories)."""
        hooks = {
            _hook(w, n): a for a, n in _NAMES.items() for w in ("before", "after", "after_fail")
        }
        return frozenset(hooks[name] for name in self._hooks.present(hooks))


class RequestHooks:
    """The site's hooks as one request found them, and the environment it gives them."""

    def __init__(
        self, hooks: Hooks, present: dict[str, list[Path]], custom: tuple[tuple[str, str], ...]
    ) -> None:
        self._hooks = hooks
        self._present = present
        self._custom = dict(custom)

    def _scripts(self, plan: Plan, when: str) -> tuple[str, list[Path]]:
        """The hook that runs ``when`` ("before", "after", "after_fail") ``plan``, and its
        scripts (none for a change no hook is named for)."""
        name = _NAMES.get(plan.action)
        if name is None:
            return "", []
        hook = _hook(when, name)
        return hook, self._present.get(hook, [])

    def rewrites(self, plan: Plan) -> bool:
        """Whether a ``before_`` hook sees (and may rewrite or veto) ``plan``."""
        return bool(self._scripts(plan, "before")[1])

    def touch(self, plan: Plan) -> bool:
        """Whether a script runs around ``plan`` done: it may have changed the VM."""
        return any(self._scripts(plan, when)[1] for when in ("before", "after"))

    async def before(self, plan: Plan) -> Plan:
        hook, scripts = self._scripts(plan, "before")
        # the device XML is only built for a hook that has scripts
        xml = plan.device_xml if scripts else None
        if xml is None:
            return plan
        new = await self._hooks.run(hook, xml, self._env(plan), scripts)
        if new == xml:
            return plan
        try:
            iface = Interface.from_xml(new)
        except XMLError as e:
            raise errors.HookError(hook, "*", f"left XML vnicd cannot use: {e}") from e
        planned = Interface.from_xml(xml)
        old = planned.identity()
        if iface.source != planned.source:
            raise errors.HookError(
                hook, "*", f"changed the vNIC's network {planned.source} -> {iface.source}"
            )
        if iface.identity() != old:
            raise errors.HookError(
                hook,
                "*",
                f"changed the vNIC's identity (MAC, model, PCI address) {old} -> "
                f"{iface.identity()}, which vnicd keeps",
            )
        return plan.rewritten(iface)

    async def after(self, plan: Plan, error: Exception | None) -> None:
        hook, scripts = self._scripts(plan, "after_fail" if error else "after")
        xml = plan.device_xml if scripts else None
        if xml is not None:
            await self._hooks.run(hook, xml, self._env(plan), scripts)

    def _env(self, plan: Plan) -> dict[str, str]:
        return {**self._custom, "vmId": plan.vm}


def _hook(when: str, name: str) -> str:
    """VDSM's name of the hook that runs ``when`` ("before", "after", "after_fail") a
    change named ``name``."""
    return f"after_{name}_fail" if when == "after_fail" else f"{when}_{name}"


def _text(nic: NicState | None) -> str:
    if nic is None:
        return "absent"
    network = "(none)" if nic.network is None else nic.network or "(unwired)"
    return (
        f"{'plugged' if nic.plugged else 'unplugged'} "
        f"{'linked' if nic.link_up else 'unlinked'} network={network}"
        + (f" filter={nic.filter_text}" if nic.filter else "")
        + (" isolated" if nic.isolated else "")
    )


def audit(plan: Plan, state: VmState) -> None:
    """One audit line per committed change of a vNIC, its new state as confirmed."""
    if plan.action is Action.RECONCILE:
        return
    after = state.nic(plan.mac) or plan.after
    logs.audit(plan.vm, plan.nic, _text(plan.before), _text(after), mac=plan.mac)
