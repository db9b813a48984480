"""vnicd run inside the test process, so tests see what it does where it happens.

The daemon runs on an asyncio loop in a thread, one loop for the whole process, shared by
every daemon the session runs (on the embedded driver, then on a libvirtd). Tests talk to
the daemon over its real Unix socket, and read QEMU's own view and libvirt's events
through the daemon's libvirt connection (the embedded driver allows one opener per root).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from tests.libvirtd import PrivateLibvirtd
from vnicd.client import Client
from vnicd.config import Config
from vnicd.daemon import Daemon
from vnicd.hypervisor import Domain
from vnicd.schema import Schema
from vnicd.service import Service

T = TypeVar("T")
SCHEMA = Schema.load()


class SchemaClient(Client):
    """A client that checks every result against the API schema."""

    def call(self, method: str, **params: Any) -> Any:
        result = super().call(method, **params)
        SCHEMA.validate_result(SCHEMA.verbs[method], result)
        return result


def injected(message: str) -> libvirt.libvirtError:
    """A libvirt error for a test to raise. libvirtError takes the calling thread's last
    libvirt error, when there is one, as its message: on a worker thread that is a stale
    one (say, a lookup of a VM an earlier test removed), so it is cleared first."""
    libvirt.virResetLastError()
    return libvirt.libvirtError(message)


@dataclass(frozen=True)
class PciDevice:
    qdev_id: str
    bus: int
    slot: int
    function: int
    vendor: int
    device: int


_loop: asyncio.AbstractEventLoop | None = None


def process_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for vnicd, running in a background thread from first use
    until the process exits."""
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="vnicd-loop", daemon=True).start()
    return _loop


class DaemonThread:
    """A vnicd Daemon on the process's event loop, in a background thread."""

    def __init__(self, config: Config, libvirtd: PrivateLibvirtd | None = None) -> None:
        self.config = config
        self.libvirtd = libvirtd  # the libvirtd of config's qemu:///system, if that is the URI
        self.loop = process_loop()
        self.daemon: Daemon | None = None
        self.removed: list[tuple[str, str]] = []

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.daemon = Daemon(self.config)
        self._run(self.daemon.start())
        self.daemon.hypervisor.on_device_removal(self._on_removal)

    def stop(self) -> None:
        """Stop vnicd; the loop runs on, for the next daemon of this process."""
        if self.daemon is None:
            return
        self._run(self.daemon.stop())
        self.daemon = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _on_removal(self, dom: Domain, alias: str, removed: bool) -> None:
        if removed:
            self.removed.append((dom.uuid, alias))

    @property
    def service(self) -> Service:
        assert self.daemon is not None and self.daemon.service is not None, "vnicd is not running"
        return self.daemon.service

    @property
    def conn(self) -> libvirt.virConnect:
        assert self.daemon is not None, "vnicd is not running"
        return self.daemon.hypervisor.conn

    def client(self) -> SchemaClient:
        return SchemaClient(self.config.unix_socket)

    def domain(self, vm_id: str) -> libvirt.virDomain:
        return self.conn.lookupByUUIDString(vm_id)

    def live_xml(self, vm_id: str) -> str:
        return str(self.domain(vm_id).XMLDesc(0))

    def query_pci(self, vm_id: str) -> dict[str, PciDevice]:
        """QEMU's own view of the guest's PCI bus, by QEMU device id (libvirt's alias)."""
        reply = libvirt_qemu.qemuMonitorCommand(
            self.domain(vm_id), json.dumps({"execute": "query-pci"}), 0
        )
        devices = {}
        for bus in json.loads(reply)["return"]:
            for d in bus["devices"]:
                if d.get("qdev_id"):
                    devices[d["qdev_id"]] = PciDevice(
                        d["qdev_id"],
                        d["bus"],
                        d["slot"],
                        d["function"],
                        d["id"]["vendor"],
                        d["id"]["device"],
                    )
        return devices
