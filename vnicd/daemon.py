"""The daemon's life cycle: connect, serve, tell systemd, stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import signal
import ssl
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO

import libvirtaio

from vnicd import __version__, hostnet, sdnotify
from vnicd.caller import CallerFilter
from vnicd.config import DEFAULT_PATH, Config, ConfigError, load
from vnicd.dispatcher import Dispatcher
from vnicd.errors import NoSuchVM
from vnicd.events import Events
from vnicd.hypervisor import Domain, Hypervisor, prepare_embed_root
from vnicd.networks import LibvirtNetworks, LinuxBridges, NetworkMap
from vnicd.plugging import Plugger
from vnicd.rpc_stomp import StompServer, tls_context
from vnicd.rpc_unix import UnixServer
from vnicd.schema import Schema
from vnicd.service import Service
from vnicd.wiring import Rewirer

log = logging.getLogger(__name__)

_EVENTS = ["defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown"]


class Daemon:
    """Everything vnicd runs, started and stopped as one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hypervisor = Hypervisor(config.uri)
        self._service: Service | None = None
        self._server: UnixServer | None = None
        self._lock: TextIO | None = None
        self._engine: StompServer | None = None
        self.events = Events(self._publish)
        self._event_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        cfg = self.config
        tls = self._engine_tls()  # a bad certificate stops vnicd before it changes anything
        loop = asyncio.get_running_loop()
        impl = libvirtaio.getCurrentImpl()
        if impl is None:
            libvirtaio.virEventRegisterAsyncIOImpl(loop=loop)
        elif impl.loop is not loop:
            raise RuntimeError("libvirt's event loop is bound to another asyncio loop")
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        if cfg.embedded:
            prepare_embed_root(cfg.embed_root)
        await asyncio.to_thread(self.hypervisor.open)
        await asyncio.to_thread(hostnet.ensure_isolated_bridge, cfg.unwired_bridge)
        self.hypervisor.on_lifecycle(self._lifecycle)
        networks = NetworkMap(
            cfg.networks, [LinuxBridges(), LibvirtNetworks(self.hypervisor)], cfg.unwired_bridge
        )
        rewirer = Rewirer(networks, persist_running=cfg.persistent_updates)
        plugger = Plugger(unplug_timeout=cfg.unplug_timeout)
        self.hypervisor.on_device_removal(
            lambda dom, alias, removed: plugger.removal(dom.uuid, alias, removed)
        )
        self._service = Service(self.hypervisor, networks, rewirer, plugger, workers=cfg.workers)
        running = await asyncio.to_thread(self.hypervisor.domains)
        log.info("found %d VMs: %s", len(running), ", ".join(d.name for d in running) or "none")
        dispatcher = Dispatcher(Schema.load(), self._service)
        self._server = UnixServer(cfg.unix_socket, dispatcher.handle, cfg.socket_mode)
        await self._server.start()
        await self._start_engine(dispatcher, tls)
        sdnotify.notify(f"READY=1\nSTATUS=serving on {cfg.unix_socket}")
        log.info("vnicd %s ready (%s)", __version__, cfg.uri)

    def _hold_state_dir(self) -> None:
        """One vnicd per state directory: two must never open the same embedded root."""
        path = self.config.state_dir / "vnicd.lock"
        self._lock = path.open("a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            raise RuntimeError(f"another vnicd is running on {self.config.state_dir}") from None

    async def stop(self) -> None:
        sdnotify.notify("STOPPING=1")
        if self._server is not None:
            await self._server.stop()
        await self._stop_engine()
        if self._service is not None:
            await asyncio.to_thread(self._service.close)
        await asyncio.to_thread(self.hypervisor.close)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        log.info("vnicd stopped")

    def _lifecycle(self, dom: Domain, event: int, detail: int) -> None:
        name = _EVENTS[event] if 0 <= event < len(_EVENTS) else str(event)
        log.info("VM %s (%s): %s (detail %d)", dom.uuid, dom.name, name, detail)
        self._event_task(self._observe_vm(dom.uuid))

    def _engine_tls(self) -> ssl.SSLContext | None:
        engine = self.config.engine
        if not (engine.enabled and engine.tls):
            return None
        return tls_context(engine.cert_file, engine.key_file, engine.ca_file)

    async def _start_engine(self, dispatcher: Dispatcher, tls: ssl.SSLContext | None) -> None:
        """The engine's wire (STOMP), and the resync that turns outside changes into events."""
        engine = self.config.engine
        if not engine.enabled:
            return
        self._engine = StompServer(engine.address, engine.port, dispatcher.handle, tls)
        await self._engine.start()
        self._event_task(self._resync())

    async def _stop_engine(self) -> None:
        for task in list(self._event_tasks):
            task.cancel()
        if self._event_tasks:
            await asyncio.wait(list(self._event_tasks))
        if self._engine is not None:
            await self._engine.stop()
            self._engine = None

    def _publish(self, notification: str) -> None:
        if self._engine is not None:
            self._engine.publish(notification)

    def _event_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    async def _resync(self) -> None:
        """Look at every VM now and then: libvirt emits no event for a device update."""
        while self._service is not None:
            try:
                self.events.sync(await self._service.vm_list())
            except Exception as e:
                log.warning("resync for events failed: %s", e)
            await asyncio.sleep(self.config.engine.resync_interval)

    async def _observe_vm(self, vm_id: str) -> None:
        if self._service is None or self._engine is None:
            return
        try:
            self.events.observe(await self._service.get_info(vm_id))
        except NoSuchVM:
            self.events.vm_gone(vm_id)
        except Exception as e:
            log.warning("VM %s: no event after a lifecycle change: %s", vm_id, e)


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(config)
    try:
        await daemon.start()
        await stop.wait()
    finally:
        await daemon.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vnicd", description="Live vNIC rewiring agent.")
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_PATH, help=f"YAML config (default {DEFAULT_PATH})"
    )
    parser.add_argument("--version", action="version", version=f"vnicd {__version__}")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as e:
        print(f"vnicd: invalid configuration: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s [%(caller)s]: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(CallerFilter())
    try:
        asyncio.run(serve(config))
    except Exception as e:
        log.critical("vnicd failed: %s", e, exc_info=config.log_level == "DEBUG")
        return 1
    return 0
