"""The daemon's life cycle: connect, serve, tell systemd, stop cleanly."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import fcntl
import logging
import os
import signal
import ssl
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TextIO

from vnicd import __version__, eventloop, logs, sdnotify
from vnicd.config import DEFAULT_PATH, LIVE, Config, ConfigError, changed, load
from vnicd.dispatcher import Dispatcher
from vnicd.errors import NoSuchVM
from vnicd.events import Events
from vnicd.hooks import Hooks
from vnicd.hypervisor import Domain, Hypervisor, HypervisorError, prepare_embed_root
from vnicd.networks import LibvirtNetworks, LinuxBridges, NetworkMap
from vnicd.rpc_stomp import StompServer, tls_context
from vnicd.rpc_unix import UnixServer
from vnicd.schema import Schema
from vnicd.service import Service
from vnicd.sitehooks import PlanHooks, audit
from vnicd.verbs import vm_wire
from vnicd.watchdog import Watchdog

log = logging.getLogger(__name__)

_EVENTS = [
    "defined",
    "undefined",
    "started",
    "suspended",
    "resumed",
    "stopped",
    "shutdown",
    "pmsuspended",
    "crashed",
]
# After these, a VM's stored vNICs are settled with its domain (a definition may have
# been replaced, a guest may have released a vNIC while vnicd was away), and a change to
# undo is undone; what is kept of a VM gone since is dropped.
_SETTLE = {"defined", "undefined", "started", "stopped"}
_M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


class Daemon:
    """Everything vnicd runs, started and stopped as one.

    Start order: the socket first (answering "recovering", code 99), then libvirt
    (retried with backoff on a remote URI), then recovery (every VM listed and its XML read);
    only then :attr:`ready`, ``READY=1`` and the watchdog. A lost libvirt connection is
    reopened with backoff and followed by the same recovery.
    """

    # First and longest wait between connection attempts, seconds: an attempt on a local
    # socket costs a failed connect, and vnicd must serve within 2 s of libvirtd's return.
    BACKOFF = (0.25, 1.0)
    STOP_TIMEOUT = 60.0  # how long a stop waits for calls in flight
    HURRY_TIMEOUT = 10.0  # then, with their waits ended (TimeoutStopSec=90 covers both)

    def __init__(self, config: Config, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.hypervisor = Hypervisor(
            config.uri, keepalive=(config.keepalive_interval, config.keepalive_count)
        )
        self.hooks = Hooks(config.hooks_dir, config.hooks_timeout)
        self.ready = False
        self.service: Service | None = None
        self._dispatcher: Dispatcher | None = None
        self._server: UnixServer | None = None
        self._lock: TextIO | None = None
        self._watchdog: Watchdog | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: StompServer | None = None
        self.events = Events(self._publish)
        self._event_tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        cfg = self.config
        tls = self._engine_tls()  # a bad certificate stops vnicd before it changes anything
        self._loop = asyncio.get_running_loop()
        eventloop.start()
        self.hypervisor.bind(self._loop)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self._hold_state_dir()
        if cfg.embedded:
            prepare_embed_root(cfg.embed_root)
        sdnotify.status("starting: opening the socket")
        self._build()
        assert self._dispatcher is not None
        self._server = UnixServer(cfg.unix_socket, self._dispatcher.handle, cfg.socket_mode)
        await self._server.start()
        await self._start_engine(self._dispatcher, tls)
        self.hypervisor.on_lifecycle(self._lifecycle)
        self.hypervisor.on_connection_lost(self._connection_lost)
        await self._connect()
        await asyncio.to_thread(LinuxBridges.ensure_isolated, cfg.unwired_bridge)
        await self._recover(starting=True)
        self.ready = True
        self._start_watchdog()
        sdnotify.notify(f"READY=1\nSTATUS=serving on {cfg.unix_socket}")
        log.info("vnicd %s ready (%s)", __version__, cfg.uri)

    def _build(self) -> None:
        """The service and its dispatcher; they need no libvirt connection yet."""
        cfg = self.config
        bridges = LinuxBridges()
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
        service.hooks = PlanHooks(self.hooks)
        service.listeners.append(audit)
        service.listeners.append(lambda _plan, state: self.events.observe(vm_wire(state)))
        self.hypervisor.on_device_removal(
            lambda dom, alias, removed: service.device_removed(dom.uuid, alias, removed)
        )
        self._dispatcher = Dispatcher(Schema.load(), service, ready=lambda: self.ready)

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

    async def _connect(self) -> None:
        """Open libvirt; on a remote URI retry with exponential backoff until it answers."""
        delay, longest = self.BACKOFF
        attempt = 1
        while True:
            try:
                await asyncio.to_thread(self.hypervisor.reopen)
                return
            except HypervisorError as e:
                if not self.hypervisor.remote:
                    raise
                # attempts 1, 2, 4, 8, ... are logged: an outage does not flood the log
                log.log(
                    logging.WARNING if attempt & (attempt - 1) == 0 else logging.DEBUG,
                    "cannot connect to %s (attempt %d, next in %.2f s): %s",
                    self.hypervisor.uri,
                    attempt,
                    delay,
                    e.cause,
                )
                sdnotify.status(f"waiting for libvirt ({self.hypervisor.uri}): {e.cause}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)
            attempt += 1

    async def _recover(self, *, starting: bool = False) -> None:
        """Rebuild vnicd's view from libvirt: every VM read and its stored vNICs settled
        with its domain (a guest may have released one while vnicd was away); at start,
        running VMs' definitions too (vnicd may have stopped in the middle of a change)."""
        assert self.service is not None
        sdnotify.status("recovering: reading every VM from libvirt")
        found = await self.service.reconcile_all(starting=starting)
        await asyncio.to_thread(self.hypervisor.ping)  # a connection lost half-way is no recovery
        log.info("found %d VMs: %s", len(found), ", ".join(found) or "none")

    def _connection_lost(self, reason: str) -> None:
        """libvirt's close callback, from whichever thread held the connection: handed to
        the loop, which reconnects and resyncs in the background."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._reconnect_soon, reason)

    def _reconnect_soon(self, reason: str) -> None:
        sdnotify.status(f"libvirt connection lost ({reason}): reconnecting")
        if self.service is not None:
            self.service.waiting.cancel_all(f"the libvirt connection was lost: {reason}")
        if self._reconnecting is None or self._reconnecting.done():
            assert self._loop is not None
            self._reconnecting = self._loop.create_task(self._reconnect(), name="vnicd-reconnect")

    async def _reconnect(self) -> None:
        while True:
            await self._connect()
            try:
                await self._recover()
            except HypervisorError as e:
                log.warning("recovery after reconnecting failed: %s", e)
            if self.hypervisor.up:
                break
        sdnotify.status(f"serving on {self.config.unix_socket}")
        log.info("reconnected to %s; serving again", self.hypervisor.uri)

    def _start_watchdog(self) -> None:
        period = sdnotify.watchdog_period()
        if period is not None:
            self._watchdog = Watchdog(period, self.hypervisor.ping)
            self._watchdog.start()

    def reload(self) -> None:
        """SIGHUP: apply what can change live from the config file; refuse the rest, keep all."""
        if self.config_path is None:
            log.warning("reload: vnicd was started without a configuration file")
            return
        try:
            new = load(self.config_path)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        diff = changed(self.config, new)
        fixed = [key for key in diff if key not in LIVE]
        for key in fixed:
            log.error(
                "reload refused: %s cannot change while vnicd runs (restart vnicd to apply it); "
                "keeping the running configuration",
                key,
            )
        if fixed:
            return
        if self._server is not None and new.socket_mode != self.config.socket_mode:
            try:  # first: the one part that can fail, so that nothing is applied half
                os.chmod(new.unix_socket, new.socket_mode)
            except OSError as e:
                log.error(
                    "reload refused: rpc.socket_mode cannot be set on %s (%s); keeping the "
                    "running configuration",
                    new.unix_socket,
                    e.strerror or e,
                )
                return
        for key, (was, now) in diff.items():
            log.info("reload: %s %r -> %r", key, was, now)
        logs.set_level(new.log_level)
        self.hooks.configure(new.hooks_dir, new.hooks_timeout)
        self.config = new
        log.info("configuration reloaded from %s", self.config_path)

    async def stop(self) -> None:
        """Stop listening, answer or finish every call in flight, then let go of libvirt."""
        sdnotify.notify("STOPPING=1\nSTATUS=stopping")
        if self._watchdog is not None:
            await self._watchdog.stop()
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            await asyncio.gather(self._reconnecting, return_exceptions=True)
        if self._server is not None:
            self._server.stop_listening()
        if self._dispatcher is not None and not await self._dispatcher.drain(self.STOP_TIMEOUT):
            await self._hurry(self._dispatcher)
        if self._server is not None:
            await self._server.stop()
        await self._stop_engine()
        if self.service is not None:
            await self.service.close()
        await asyncio.to_thread(self.hypervisor.close)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        log.info("vnicd stopped")

    async def _hurry(self, dispatcher: Dispatcher) -> None:
        """Calls still running wait for a guest's answer or a bounce's pause: end those
        waits, so that each change ends whole (a guest's answer to come finishes its
        unplug later) and is answered before the connections close."""
        if self.service is not None:
            self.service.waiting.close("vnicd is stopping")
        if not await dispatcher.drain(self.HURRY_TIMEOUT):
            log.error("calls still running when vnicd stops: they are cut where they are")

    def _lifecycle(self, dom: Domain, event: int, detail: int) -> None:
        name = _EVENTS[event] if 0 <= event < len(_EVENTS) else str(event)
        log.info(
            "VM %s (%s): %s (detail %d)",
            dom.uuid,
            dom.name,
            name,
            detail,
            extra=logs.fields(vm_id=dom.uuid),
        )
        if self.service is None:
            return
        if name in _SETTLE:
            self.service.spawn(self.service.reconcile(dom.uuid))
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
        """Look at every VM now and then: libvirt emits no event for a device update. A
        failure is logged once until a look works again or fails otherwise (libvirtd away
        for minutes must not fill the log)."""
        failing = ""  # the failure last logged
        while self.service is not None:
            try:
                await self.resync_once()
            except Exception as e:
                said = f"resync for events failed: {e}"
                log.log(logging.DEBUG if said == failing else logging.WARNING, "%s", said)
                failing = said
            else:
                if failing:
                    log.info("resync for events works again")
                failing = ""
            await asyncio.sleep(self.config.engine.resync_interval)

    async def resync_once(self) -> None:
        """One look at every VM; events for what changed since the last."""
        assert self.service is not None
        self.events.sync([vm_wire(vm) for vm in await self.service.vm_list()])

    async def _observe_vm(self, vm_id: str) -> None:
        if self.service is None or self._engine is None:
            return
        try:
            self.events.observe(vm_wire(await self.service.read_info(vm_id)))
        except NoSuchVM:
            self.events.vm_gone(vm_id)
        except Exception as e:
            log.warning("VM %s: no event after a lifecycle change: %s", vm_id, e)


async def serve(config: Config, config_path: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT; SIGHUP re-reads the configuration."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(config, config_path)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    starting = asyncio.create_task(daemon.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        # A stop may come while vnicd still waits for libvirtd: it must not wait for that.
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopping
        else:
            log.info("stopping before vnicd was ready")
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
    finally:
        stopping.cancel()
        await daemon.stop()


def _few_malloc_arenas() -> None:
    """Two malloc arenas for the process, before its threads start, unless the operator
    chose (``MALLOC_ARENA_MAX``). glibc gives each thread that allocates an arena of its
    own, up to eight per core, and memory freed in one is kept by it: with sixteen workers
    and libvirt's threads the footprint creeps up as each touches its own (measured:
    bench/README.md, no slower)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        done = ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)
    except AttributeError:  # not glibc: its own allocator's policy stands
        return
    if not done:
        log.debug("glibc kept its malloc arenas as they are")


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
    logs.setup(config.log_level)
    _few_malloc_arenas()
    try:
        asyncio.run(serve(config, args.config))
    except Exception as e:
        log.critical("vnicd failed: %s", e, exc_info=config.log_level == "DEBUG")
        return 1
    return 0
