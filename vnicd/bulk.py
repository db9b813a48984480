"""One change for many vNICs: every vNIC that matches a filter, each all-or-nothing.

Each VM is read once under its lock (afresh after a failed vNIC), its matching vNICs found
in that read and changed one after the other through the one transaction path (so per-VM
serialization holds), different VMs in parallel. The call as a whole is not all-or-nothing:
every vNIC gets its own outcome.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

from vnicd import errors
from vnicd.model import NicChange, NicState, VmState
from vnicd.service import DryRun, Service

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
    if match.vms is None:
        vms = await service.vm_ids()
    else:
        vms = list(dict.fromkeys(match.vms))  # a VM named twice is changed once
    guarded = replace(change, only_on=match.network)

    async def one_vm(vm_id: str) -> list[Outcome]:
        try:
            done = await service.update_each(vm_id, match.picks, guarded, wiring, bounce, dry_run)
        except errors.VnicdError as e:
            if match.vms is None and isinstance(e, errors.NoSuchVM):
                return []  # gone since it was listed
            return [Outcome(vm_id, None, error=e)]
        except Exception as e:  # one VM's surprise must not end the others' changes
            log.exception("VM %s: bulk change failed", vm_id)
            return [Outcome(vm_id, None, error=errors.GeneralError(str(e), vmID=vm_id))]
        return [
            Outcome(vm_id, nic, error=got)
            if isinstance(got, errors.VnicdError)
            else Outcome(vm_id, nic, got)
            for nic, got in done
        ]

    found: list[Outcome] = []
    for outcomes in await asyncio.gather(*(one_vm(vm) for vm in vms)):
        found += outcomes
    return found
