"""Each API verb bound to the service, its typed request built once from validated params."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vnicd.errors import InvalidParameter
from vnicd.names import normalize_mac
from vnicd.profile import device_params, with_devices
from vnicd.service import CreateVM, PlugNic, Service, UpdateNic
from vnicd.wiring import NicChange, NicRef

Params = dict[str, Any]
Handler = Callable[[Service, Params], Awaitable[Any]]


def _vm_id(p: Params) -> str:
    return str(p["vmID"]).lower()


def _nic(dev: Params) -> NicRef:
    mac = dev.get("macAddr")
    return NicRef(alias=dev.get("alias"), mac=normalize_mac(mac) if mac else None)


def _update_device(svc: Service, p: Params) -> Awaitable[Any]:
    dev = device_params(p["params"], "update")
    return svc.update_device(
        UpdateNic(
            vm_id=_vm_id(p),
            nic=_nic(dev),
            change=NicChange(
                link_up=dev.get("linkActive"),
                network=dev.get("network"),
                model=dev.get("nicModel"),
            ),
        )
    )


def _hotplug(svc: Service, p: Params) -> Awaitable[Any]:
    dev = device_params(p["params"], "plug")
    _check_vm_id(p)
    if "xml" in dev:
        return with_devices(svc.hotplug(PlugNic(_vm_id(p), xml=dev["xml"])))
    return with_devices(svc.hotplug(PlugNic(_vm_id(p), nic=_nic(dev))))


def _hotunplug(svc: Service, p: Params) -> Awaitable[Any]:
    _check_vm_id(p)
    return svc.hotunplug(_vm_id(p), _nic(device_params(p["params"], "unplug")))


def _check_vm_id(p: Params) -> None:
    """VDSM's engine repeats the VM in ``params.vmId``; it must name the same VM."""
    inner = p["params"].get("vmId")
    if inner is not None and inner.lower() != _vm_id(p):
        raise InvalidParameter("params.vmId", f"{inner} differs from vmID {p['vmID']}")


def _create(svc: Service, p: Params) -> Awaitable[Any]:
    vm = p["vmParams"]
    return svc.create(CreateVM(_vm_id(p), vm["xml"], vm.get("persistent", False)))


HANDLERS: dict[str, Handler] = {
    "Host.ping2": lambda svc, _p: svc.ping(),
    "Host.getCapabilities": lambda svc, _p: svc.capabilities(),
    "Host.getVMList": lambda svc, _p: svc.vm_list(),
    "VM.getInfo": lambda svc, p: svc.get_info(_vm_id(p)),
    "VM.create": _create,
    "VM.destroy": lambda svc, p: svc.destroy(_vm_id(p)),
    "VM.updateDevice": _update_device,
    "VM.hotplugNic": _hotplug,
    "VM.hotunplugNic": _hotunplug,
}
