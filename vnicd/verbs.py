"""The API layer: each verb's wire params to a typed request, and core results to the wire.

The only place that knows VDSM's field names and status strings; the core speaks its own
words (:mod:`vnicd.model`), and errors' field names are renamed here to the wire's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vnicd import bulk, errors
from vnicd.domxml import PROFILE_PARTS
from vnicd.model import NicChange, NicRef, NicState, VmState, VmStatus
from vnicd.names import normalize_mac
from vnicd.planning import (
    DefinitionAttach,
    DefinitionDetach,
    DefinitionUpdate,
    LiveAttach,
    LiveDetach,
    LiveUpdate,
    Pause,
    Step,
    StoreWrite,
)
from vnicd.profile import device_params, plug_fields, with_devices
from vnicd.service import (
    Capabilities,
    CreateVM,
    DryRun,
    PlugNic,
    Service,
    UnplugNic,
    UpdateNic,
)
from vnicd.unplugged import Store

Params = dict[str, Any]
Handler = Callable[[Service, Params], Awaitable[Any]]

STATUS = {
    VmStatus.RUNNING: "Up",
    VmStatus.PAUSED: "Paused",
    VmStatus.SHUTTING_DOWN: "Powering down",
    VmStatus.STOPPED: "Down",
}
# VDSM's vNIC model names (ovirt-engine's VmInterfaceType) that libvirt names otherwise.
ENGINE_MODELS = {"pv": "virtio"}
# The core's names for request fields -> where the caller put them.
WIRE_FIELDS = {
    "alias": "params.alias",
    "mac": "params.macAddr",
    "network": "params.network",
    "link": "params.linkActive",
    "model": "params.nicModel",
    "xml": "params.xml",
    "vm.xml": "vmParams.xml",
    "profile.filter": "params.filter",
    "profile.qos": "params.specParams",
    "custom": "params.custom",
}
# The same in an older engine's ``params.nic``.
NIC_FIELDS = {
    **WIRE_FIELDS,
    "alias": "params.nic.alias",
    "mac": "params.nic.macAddr",
    "network": "params.nic.network",
    "link": "params.nic.linkActive",
    "profile.filter": "params.nic.filter",
    "profile.qos": "params.nic.specParams",
    "custom": "params.nic.custom",
}
# The same where ``params.xml`` (an ``<interface>`` or VDSM's ``<hotplug>``) names the vNIC.
XML_FIELDS = {
    **WIRE_FIELDS,
    **dict.fromkeys(("alias", "mac", "network", "link", "model", "custom"), "params.xml"),
    **{f"profile.{part}": "params.xml" for part in PROFILE_PARTS},
}
# A bulk change's: its ``change``, its ``match``, and each result's own vNIC.
BULK_FIELDS = {
    "network": "change.network",
    "link": "change.linkActive",
    "only_on": "match.network",
    "mac": "macAddr",
    "alias": "alias",
}


def _model(dev: Params) -> str | None:
    """``nicModel`` as libvirt names it: older engines send VDSM's names ("pv")."""
    model = dev.get("nicModel")
    return None if model is None else ENGINE_MODELS.get(model, model)


def _fields_of(p: Params) -> dict[str, str]:
    """Where a vNIC verb's request put the vNIC's fields, for errors that name one."""
    params = p.get("params")
    if isinstance(params, dict) and "nic" in params:
        return NIC_FIELDS
    if isinstance(params, dict) and "xml" in params:
        return XML_FIELDS
    return WIRE_FIELDS


def nic_wire(nic: NicState) -> dict[str, Any]:
    return {
        "alias": nic.alias,
        "macAddr": nic.mac,
        "nicModel": nic.model,
        "network": nic.network,
        "sourceType": nic.kind,
        "bridge": nic.bridge,
        "linkActive": nic.link_up,
        "plugged": nic.plugged,
        "pciAddress": nic.pci,
        "tap": nic.tap,
        "filter": nic.filter,
        "filterParameters": [{"name": k, "value": v} for k, v in nic.filter_parameters],
        "portIsolated": nic.isolated,
    }


def vm_wire(vm: VmState) -> dict[str, Any]:
    return {
        "vmID": vm.uuid,
        "vmName": vm.name,
        "status": STATUS[vm.status],
        "persistent": vm.persistent,
        "nics": [nic_wire(n) for n in vm.nics],
    }


def step_text(step: Step) -> str:
    match step:
        case LiveUpdate():
            return "update the vNIC live" + (f", tap to {step.bridge}" if step.bridge else "")
        case Pause():
            return f"wait {step.seconds:g} s"
        case DefinitionUpdate():
            return "update the vNIC in the definition"
        case LiveAttach():
            return "attach the vNIC to the guest"
        case LiveDetach():
            return "ask the guest to release the vNIC, and wait"
        case DefinitionAttach():
            return "add the vNIC to the definition"
        case DefinitionDetach():
            return "remove the vNIC from the definition"
        case StoreWrite(before=before, after=after):
            marks, were = _marks(after), _marks(before)
            what = []
            if any(were.get(mac) != xml for mac, xml in marks.items()):
                what.append("mark the link bounce")
            elif were.keys() - marks.keys():
                what.append("unmark the link bounce")
            if not what or after.unmarked() != before.unmarked():
                what.append("write vnicd's stored vNICs")
            return ", ".join(what) + " (domain metadata)"


def _marks(store: Store) -> dict[str | None, str]:
    """Each bounce mark by MAC, as written (a mark may replace an older one)."""
    return {iface.mac: iface.to_xml() for iface in store.bounces}


def outcome_wire(outcome: VmState | DryRun) -> dict[str, Any]:
    if isinstance(outcome, VmState):
        return vm_wire(outcome)
    plan = outcome.plan
    return {
        "dryRun": True,
        "vmID": plan.vm,
        "action": plan.action.value,
        "nic": plan.nic,
        "before": nic_wire(plan.before) if plan.before else None,
        "after": nic_wire(plan.after) if plan.after else None,
        "beforeXML": plan.before_xml,
        "liveXML": plan.live_xml,
        "definitionXML": plan.definition_xml,
        "steps": [step_text(s) for s in plan.steps],
    }


def capabilities_wire(caps: Capabilities) -> dict[str, Any]:
    return {
        "version": caps.version,
        "libvirtURI": caps.uri,
        "unwiredBridge": caps.unwired_bridge,
        "networks": [
            {"name": name, "type": kind, "bridge": bridge} for name, kind, bridge in caps.networks
        ],
    }


def _vm_id(p: Params) -> str:
    return str(p["vmID"]).lower()


def _nic(dev: Params) -> NicRef:
    mac = dev.get("macAddr")
    return NicRef(alias=dev.get("alias"), mac=normalize_mac(mac) if mac else None)


def _check_vm_id(p: Params) -> None:
    """VDSM's engine repeats the VM in ``params.vmId``; it must name the same VM."""
    inner = p["params"].get("vmId")
    if inner is not None and inner.lower() != _vm_id(p):
        raise errors.InvalidParameter("params.vmId", f"{inner} differs from vmID {p['vmID']}")


async def _update_device(svc: Service, p: Params) -> Any:
    dev = device_params(p["params"], "update")
    req = UpdateNic(
        vm_id=_vm_id(p),
        nic=_nic(dev),
        change=NicChange(
            link_up=dev.get("linkActive"),
            network=dev.get("network"),
            model=_model(dev),
            profile=dev.get("profile"),
            profile_parts=dev.get("profileParts"),
        ),
        bounce=dev.get("linkBounce"),
        dry_run=dev.get("dryRun", False),
        custom=dev.get("custom", ()),
    )
    return outcome_wire(await svc.update_device(req))


async def _hotplug(svc: Service, p: Params) -> Any:
    dev = device_params(p["params"], "plug")
    _check_vm_id(p)
    dry_run = dev.get("dryRun", False)
    wired = plug_fields(dev["xml"]) if "xml" in dev else dev
    link, network, profile = wired.get("linkActive"), wired.get("network"), wired.get("profile")
    change = (
        None
        if link is None and network is None and profile is None
        else NicChange(
            link_up=link, network=network, profile=profile, profile_parts=wired.get("profileParts")
        )
    )
    custom = wired.get("custom", ())
    if "xml" in dev:
        req = PlugNic(_vm_id(p), xml=dev["xml"], dry_run=dry_run, change=change, custom=custom)
    else:
        nic, model = _nic(dev), _model(dev)
        req = PlugNic(
            _vm_id(p), nic=nic, dry_run=dry_run, change=change, model=model, custom=custom
        )
    try:
        outcome = await svc.hotplug(req)
    except errors.UpdateDeviceError as e:  # the network or link the plug asks for
        e.rename_field(_fields_of(p))
        raise errors.HotplugNicError(e.message, **{**e.fields, "cause": e.reason}) from e
    return outcome_wire(outcome) if isinstance(outcome, DryRun) else with_devices(vm_wire(outcome))


async def _hotunplug(svc: Service, p: Params) -> Any:
    _check_vm_id(p)
    dev = device_params(p["params"], "unplug")
    req = UnplugNic(
        _vm_id(p), _nic(dev), dry_run=dev.get("dryRun", False), custom=dev.get("custom", ())
    )
    return outcome_wire(await svc.hotunplug(req))


async def _create(svc: Service, p: Params) -> Any:
    vm = p["vmParams"]
    return vm_wire(await svc.create(CreateVM(_vm_id(p), vm["xml"], vm.get("persistent", False))))


async def _destroy(svc: Service, p: Params) -> Any:
    await svc.destroy(_vm_id(p), undefine=bool(p.get("undefine", False)))
    return {}


async def _get_info(svc: Service, p: Params) -> Any:
    return vm_wire(await svc.get_info(_vm_id(p)))


async def _vm_list(svc: Service, p: Params) -> Any:
    wanted = {v.lower() for v in p.get("vmList", [])}
    vms = [vm for vm in await svc.vm_list() if not wanted or vm.uuid in wanted]
    if p.get("onlyUUID", False):
        return [vm.uuid for vm in vms]
    return [vm_wire(vm) for vm in vms]


async def _dump_xmls(svc: Service, p: Params) -> Any:
    return await svc.domain_xmls([v.lower() for v in p.get("vmList", [])])


async def _capabilities(svc: Service, _p: Params) -> Any:
    return capabilities_wire(await svc.capabilities())


async def _bulk(svc: Service, p: Params) -> Any:
    match, change = p["match"], p["change"]
    try:
        outcomes = await bulk.update_all(
            svc,
            bulk.Match(
                match.get("network"),
                tuple(v.lower() for v in match["vmIDs"]) if "vmIDs" in match else None,
            ),
            NicChange(link_up=change.get("linkActive"), network=change.get("network")),
            bounce=change.get("linkBounce"),
            dry_run=p.get("dryRun", False),
        )
    except errors.VnicdError as e:
        e.rename_field(BULK_FIELDS)
        raise
    return {"results": [_outcome_wire(o) for o in outcomes]}


def _outcome_wire(o: bulk.Outcome) -> dict[str, Any]:
    found: dict[str, Any] = {
        "vmID": o.vm_id,
        "macAddr": o.nic.mac if o.nic else "",
        "alias": o.nic.alias if o.nic else "",
        "ok": o.error is None,
    }
    if o.error is not None:
        o.error.rename_field(BULK_FIELDS)
        found["error"] = {"code": o.error.code, "message": o.error.message, "data": o.error.data()}
    elif isinstance(o.result, DryRun):
        found["plan"] = outcome_wire(o.result)
    elif o.after is not None:
        found["nic"] = nic_wire(o.after)
    return found


async def _ping(_svc: Service, _p: Params) -> Any:
    return True  # as VDSM answers it


def _wire_fields(handler: Handler) -> Handler:
    """Errors name the field where the caller put it."""

    async def call(svc: Service, p: Params) -> Any:
        try:
            return await handler(svc, p)
        except errors.VnicdError as e:
            e.rename_field(_fields_of(p))
            raise

    return call


HANDLERS: dict[str, Handler] = {
    name: _wire_fields(handler)
    for name, handler in {
        "Host.ping2": _ping,
        "Host.getCapabilities": _capabilities,
        "Host.getVMList": _vm_list,
        "Host.dumpxmls": _dump_xmls,
        "Host.bulkUpdateNics": _bulk,
        "VM.getInfo": _get_info,
        "VM.create": _create,
        "VM.destroy": _destroy,
        "VM.updateDevice": _update_device,
        "VM.hotplugNic": _hotplug,
        "VM.hotunplugNic": _hotunplug,
    }.items()
}
