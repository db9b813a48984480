"""One change for many vNICs: every vNIC that matches a filter, each all-or-nothing.

The matching vNICs are found in one listing; each VM's vNICs are changed one after the
other through the one transaction path (so per-VM serialization holds), different VMs in
parallel. The call as a whole is not all-or-nothing: every vNIC gets its own outcome.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from vnicd import errors
from vnicd.model import NicChange, NicRef, NicState, VmState
from vnicd.service import DryRun, Service, UpdateNic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """Which vNICs: those on ``network`` (None: any), of the VMs ``vms`` (None: all)."""

    network: str | None = None
    vms: tuple[str, ...] | None = None

    def picks(self, nic: NicState) -> bool:
        return self.network is None or nic.network == self.network


@dataclass(frozen=True)
class Outcome:
    vm_id: str
    nic: NicState | None  # as it was matched; None when the VM itself failed
    result: VmState | DryRun | None = None
    error: errors.VnicdError | None = None

    @property
    def after(self) -> NicState | None:
        if isinstance(self.result, VmState) and self.nic is not None:
            return self.result.nic(self.nic.mac)
        return None


async def update_all(
    service: Service, match: Match, change: NicChange, *, bounce: bool | None, dry_run: bool
) -> list[Outcome]:
    wiring = None
    if change.network is not None:
        wiring = await service.resolve(change.network)
    found: list[Outcome] = []
    if match.vms is None:
        vms = await service.vm_list()
    else:
        vms = []
        wanted = list(dict.fromkeys(match.vms))  # a VM named twice is changed once
        read = await asyncio.gather(
            *(service.get_info(vm_id) for vm_id in wanted), return_exceptions=True
        )
        for vm_id, got in zip(wanted, read, strict=True):
            if isinstance(got, errors.VnicdError):
                found.append(Outcome(vm_id, None, error=got))
            elif isinstance(got, BaseException):
                raise got
            else:
                vms.append(got)

    async def one_vm(vm: VmState) -> list[Outcome]:
        done = []
        for nic in vm.nics:
            if not match.picks(nic):
                continue
            guarded = replace(change, only_on=match.network)
            req = UpdateNic(vm.uuid, NicRef(mac=nic.mac), guarded, bounce, dry_run)
            try:
                done.append(Outcome(vm.uuid, nic, await service.update_device(req, wiring)))
            except errors.VnicdError as e:
                done.append(Outcome(vm.uuid, nic, error=e))
            except Exception as e:  # one vNIC's surprise must not end the others' changes
                log.exception("VM %s vNIC %s: bulk change failed", vm.uuid, nic.mac)
                done.append(Outcome(vm.uuid, nic, error=errors.GeneralError(str(e))))
        return done

    for outcomes in await asyncio.gather(*(one_vm(vm) for vm in vms)):
        found += outcomes
    return found
