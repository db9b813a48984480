"""The daemon's life cycle: connect, serve, tell systemd, stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import signal
import sys
from pathlib import Path
from typing import TextIO

from vnicd import __version__, eventloop, sdnotify
from vnicd.config import DEFAULT_PATH, Config, ConfigError, load
from vnicd.dispatcher import Dispatcher
from vnicd.hypervisor import Domain, Hypervisor, prepare_embed_root
from vnicd.networks import LibvirtNetworks, LinuxBridges, NetworkMap
from vnicd.rpc_unix import UnixServer
from vnicd.schema import Schema
from vnicd.service import Service

log = logging.getLogger(__name__)

_EVENTS = ["defined", "undefined", "started", "suspended", "resumed", "stopped", "shutdown"]
# After these, a VM's stored vNICs are settled with its domain (a definition may have
# been replaced, a guest may have released a vNIC while vnicd was away).
_SETTLE = {"defined", "started", "stopped"}


class Daemon:
    """Everything vnicd runs, started and stopped as one."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.hypervisor = Hypervisor(config.uri)
        self.service: Service | None = None
        self._server: UnixServer | None = None
        self._lock: TextIO | None = None

    async def start(self) -> None:
        cfg = self.config
        eventloop.register(asyncio.get_running_loop())
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        if cfg.embedded:
            prepare_embed_root(cfg.embed_root)
        await asyncio.to_thread(self.hypervisor.open)
        bridges = LinuxBridges()
        await asyncio.to_thread(bridges.ensure_isolated, cfg.unwired_bridge)
        networks = NetworkMap(
            cfg.networks,
            [bridges, LibvirtNetworks(self.hypervisor)],
            cfg.unwired_bridge,
            ports=bridges,
        )
        service = self.service = Service(
            self.hypervisor,
            networks,
            workers=cfg.workers,
            unplug_timeout=cfg.unplug_timeout,
            persist_running=cfg.persistent_updates,
            bounce_seconds=cfg.link_bounce_seconds,
            bounce_default=cfg.link_bounce,
        )
        self.hypervisor.on_lifecycle(self._lifecycle)
        self.hypervisor.on_device_removal(
            lambda dom, alias, removed: service.device_removed(dom.uuid, alias, removed)
        )
        found = await service.reconcile_all()
        log.info("found %d VMs: %s", len(found), ", ".join(found) or "none")
        dispatcher = Dispatcher(Schema.load(), self.service)
        self._server = UnixServer(cfg.unix_socket, dispatcher.handle, cfg.socket_mode)
        await self._server.start()
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
        if self.service is not None:
            await self.service.close()
            self.service = None
        await asyncio.to_thread(self.hypervisor.close)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        log.info("vnicd stopped")

    def _lifecycle(self, dom: Domain, event: int, detail: int) -> None:
        name = _EVENTS[event] if 0 <= event < len(_EVENTS) else str(event)
        log.info("VM %s (%s): %s (detail %d)", dom.uuid, dom.name, name, detail)
        if name in _SETTLE and self.service is not None:
            self.service.spawn(self.service.reconcile(dom.uuid))


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
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(config))
    except Exception as e:
        log.critical("vnicd failed: %s", e, exc_info=config.log_level == "DEBUG")
        return 1
    return 0
