"""Site hooks and the audit on the transaction's seams.

:class:`PlanHooks` runs VDSM-named hooks around a planned change (:mod:`vnicd.hooks` runs
the scripts): a ``before_`` hook sees the device XML the change will send, may rewrite it
(not the vNIC's identity: MAC, model, PCI address) or veto it; ``after_`` and
``after_*_fail`` hear how it ended. :func:`audit` writes one audit line per committed change.
"""

from __future__ import annotations

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

    async def before(self, plan: Plan) -> Plan:
        name = _NAMES.get(plan.action)
        hook = f"before_{name}"
        # the device XML is only built for a hook that has scripts
        xml = plan.device_xml if name is not None and self._hooks.scripts(hook) else None
        if xml is None:
            return plan
        new = await self._hooks.run(hook, xml, {"vmId": plan.vm})
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
        name = _NAMES.get(plan.action)
        hook = f"after_{name}{'_fail' if error else ''}"
        xml = plan.device_xml if name is not None and self._hooks.scripts(hook) else None
        if xml is not None:
            await self._hooks.run(hook, xml, {"vmId": plan.vm})


def _text(nic: NicState | None) -> str:
    if nic is None:
        return "absent"
    network = "(none)" if nic.network is None else nic.network or "(unwired)"
    return (
        f"{'plugged' if nic.plugged else 'unplugged'} "
        f"{'linked' if nic.link_up else 'unlinked'} network={network}"
    )


def audit(plan: Plan, state: VmState) -> None:
    """One audit line per committed change of a vNIC, its new state as confirmed."""
    if plan.action is Action.RECONCILE:
        return
    after = state.nic(plan.mac) or plan.after
    logs.audit(plan.vm, plan.nic, _text(plan.before), _text(after), mac=plan.mac)
