"""Each API verb bound to the service, its typed request built once from validated params."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from vnicd.names import normalize_mac
from vnicd.service import CreateVM, Service, UpdateNic
from vnicd.wiring import NicChange, NicRef

Params = dict[str, Any]
Handler = Callable[[Service, Params], Awaitable[Any]]


def _vm_id(p: Params) -> str:
    return str(p["vmID"]).lower()


def _update_device(svc: Service, p: Params) -> Awaitable[Any]:
    dev = p["params"]
    mac = dev.get("macAddr")
    return svc.update_device(
        UpdateNic(
            vm_id=_vm_id(p),
            nic=NicRef(alias=dev.get("alias"), mac=normalize_mac(mac) if mac else None),
            change=NicChange(
                link_up=dev.get("linkActive"),
                network=dev.get("network"),
                model=dev.get("nicModel"),
            ),
        )
    )


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
}
