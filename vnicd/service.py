"""What the verbs do, independent of any transport.

Typed requests in, plain JSON-ready results out. Blocking libvirt and iproute2
work runs in a thread pool; operations on one VM are serialized by a per-VM lock,
different VMs proceed in parallel.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from vnicd import __version__, errors, hostnet, unplugged
from vnicd.domxml import Domain as DomainXML
from vnicd.domxml import Interface, XMLError, hotplug_interface
from vnicd.hypervisor import Domain, Hypervisor, HypervisorError
from vnicd.networks import NetworkMap
from vnicd.plugging import Plugger
from vnicd.wiring import NicChange, NicRef, Rewirer

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class UpdateNic:
    vm_id: str
    nic: NicRef
    change: NicChange


@dataclass(frozen=True)
class PlugNic:
    """Plug a known vNIC back (``nic``), or a new one from its XML (``xml``)."""

    vm_id: str
    nic: NicRef | None = None
    xml: str | None = None


@dataclass(frozen=True)
class CreateVM:
    vm_id: str
    xml: str
    persistent: bool = False


class Service:
    def __init__(
        self,
        hypervisor: Hypervisor,
        networks: NetworkMap,
        rewirer: Rewirer,
        plugger: Plugger,
        *,
        workers: int,
    ) -> None:
        self._hypervisor = hypervisor
        self._networks = networks
        self._rewirer = rewirer
        self._plugger = plugger
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vnicd-worker")
        self._locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, functools.partial(fn, *args))
        except (HypervisorError, hostnet.HostNetError) as e:
            raise errors.GeneralError(str(e), cause=str(e)) from e

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    async def _domain(self, vm_id: str) -> Domain:
        dom = await self._blocking(self._hypervisor.domain, vm_id)
        if dom is None:
            raise errors.NoSuchVM(vm_id)
        return dom

    async def ping(self) -> bool:
        return True

    async def capabilities(self) -> dict[str, Any]:
        networks = await self._blocking(self._networks.available)
        return {
            "version": __version__,
            "libvirtURI": self._hypervisor.uri,
            "unwiredBridge": self._networks.unwired_bridge,
            "networks": networks,
        }

    async def vm_list(self) -> list[dict[str, Any]]:
        return await self._blocking(self._all_info)

    async def get_info(self, vm_id: str) -> dict[str, Any]:
        async with self._lock(vm_id):
            dom = await self._domain(vm_id)
            return await self._blocking(self._info, dom)

    async def update_device(self, req: UpdateNic) -> dict[str, Any]:
        async with self._lock(req.vm_id):
            dom = await self._domain(req.vm_id)
            await self._blocking(self._rewirer.update, dom, req.nic, req.change)
            return await self._blocking(self._info, dom)

    async def hotplug(self, req: PlugNic) -> dict[str, Any]:
        async with self._lock(req.vm_id):
            dom = await self._domain(req.vm_id)
            if req.xml is not None:
                try:
                    iface = hotplug_interface(req.xml)
                except XMLError as e:
                    raise errors.InvalidParameter("params.xml", str(e)) from e
                await self._blocking(self._plugger.plug_new, dom, iface)
            else:
                assert req.nic is not None
                await self._blocking(self._plugger.plug, dom, req.nic)
            return await self._blocking(self._info, dom)

    async def hotunplug(self, vm_id: str, nic: NicRef) -> dict[str, Any]:
        async with self._lock(vm_id):
            dom = await self._domain(vm_id)
            await self._blocking(self._plugger.unplug, dom, nic)
            return await self._blocking(self._info, dom)

    async def create(self, req: CreateVM) -> dict[str, Any]:
        try:
            xml = DomainXML(req.xml)
        except XMLError as e:
            raise errors.InvalidParameter("vmParams.xml", str(e)) from e
        if xml.uuid is not None and xml.uuid.lower() != req.vm_id.lower():
            raise errors.InvalidParameter(
                "vmParams.xml", f"<uuid> {xml.uuid} differs from vmID {req.vm_id}"
            )
        xml.set_uuid(req.vm_id)
        async with self._lock(req.vm_id):
            if await self._blocking(self._hypervisor.domain, req.vm_id) is not None:
                raise errors.VMExists(req.vm_id)
            dom = await self._blocking(self._create, req.vm_id, xml.to_xml(), req.persistent)
            return await self._blocking(self._info, dom)

    def _create(self, vm_id: str, xml: str, persistent: bool) -> Domain:
        try:
            return self._hypervisor.create(xml, persistent=persistent)
        except HypervisorError as e:
            raise errors.CreateError(str(e), vmID=vm_id, cause=e.cause) from e

    async def destroy(self, vm_id: str) -> dict[str, Any]:
        async with self._lock(vm_id):
            dom = await self._domain(vm_id)
            await self._blocking(self._destroy, dom)
        return {}

    @staticmethod
    def _destroy(dom: Domain) -> None:
        persistent = dom.is_persistent()  # a transient VM is gone once destroyed
        if dom.is_active():
            dom.destroy()
        if persistent:
            dom.undefine()

    def _all_info(self) -> list[dict[str, Any]]:
        masters = hostnet.masters()
        found = []
        for dom in self._hypervisor.domains():
            try:
                found.append(self._info(dom, masters))
            except HypervisorError as e:
                log.debug("VM %s vanished while listing: %s", dom.uuid, e)
        return found

    def _info(self, dom: Domain, masters: dict[str, str] | None = None) -> dict[str, Any]:
        """A VM and its vNICs; ``masters`` (tap -> bridge) is read once per listing."""
        active = dom.is_active()
        if active and masters is None:
            masters = hostnet.masters()
        plugged = DomainXML(dom.xml(inactive=not active)).interfaces
        nics = [self._nic(i, i.alias or "", masters if active else None) for i in plugged]
        present = {i.mac for i in plugged}
        nics += [
            self._nic(i, alias, None, plugged=False)
            for alias, i in unplugged.load(dom)
            if i.mac not in present
        ]
        return {
            "vmID": dom.uuid,
            "vmName": dom.name,
            "status": dom.status(),
            "persistent": dom.is_persistent(),
            "nics": nics,
        }

    def _nic(
        self,
        iface: Interface,
        alias: str,
        masters: dict[str, str] | None,
        *,
        plugged: bool = True,
    ) -> dict[str, Any]:
        source = iface.source
        if masters is not None and iface.tap is not None:
            bridge = masters.get(iface.tap, "")
        else:
            bridge = iface.bridge or (source.name if source and source.kind == "bridge" else "")
        address = iface.address
        return {
            "alias": alias,
            "macAddr": iface.mac or "",
            "nicModel": iface.model or "",
            "network": self._networks.name_of(source),
            "sourceType": source.kind if source else "",
            "bridge": bridge,
            "linkActive": iface.link_up,
            "plugged": plugged,
            "pciAddress": str(address) if address else "",
            "tap": iface.tap or "",
        }
