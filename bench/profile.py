"""python -m bench.profile: what one vnicd change costs, counted and timed.

Counts, per ``VM.updateDevice`` over the Unix socket, the libvirt calls vnicd makes
(by name), the XML documents it parses and serializes with lxml, and its netlink
round trips, for a link toggle and a bridge move on a transient and on a persistent
VM; then times a link toggle stage by stage (the median time between one stage's
start or end and the next's). vnicd runs in this process, on the embedded driver or,
with ``--uri system``, through libvirtd. Run it under ``py-spy record`` for more.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import libvirt
from lxml import etree

from bench.host import BenchHost, Vm, log, sweep_stale
from bench.methods import Change, Vnicd
from bench.run import _interrupt
from tests.harness import DaemonThread
from vnicd import hostnet, hypervisor, planning, service, sitehooks, transaction
from vnicd.config import Config

counts: collections.Counter[str] = collections.Counter()


def _counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        counts[name] += 1
        return fn(*args, **kwargs)

    return wrapper


def _instrument() -> None:
    for cls, prefix in ((libvirt.virDomain, "virDomain."), (libvirt.virConnect, "virConnect.")):
        for attr, value in list(vars(cls).items()):
            if callable(value) and not attr.startswith("_"):
                setattr(cls, attr, _counted(prefix + attr, value))
    etree.fromstring = _counted("lxml parse", etree.fromstring)
    etree.tostring = _counted("lxml serialize", etree.tostring)
    hostnet._request = _counted("netlink round trip", hostnet._request)
    for name in ("master", "set_master", "masters", "is_bridge", "bridges", "link"):
        setattr(hostnet, name, _counted(f"hostnet.{name}", getattr(hostnet, name)))


marks: list[tuple[int, str]] = []

# (owner, attribute, stage): the stages of a change, in the order they happen
_STAGES: list[tuple[Any, str, str]] = [
    (service.Service, "_change", "change"),
    (service.Service, "_read", "read"),
    (hypervisor.Domain, "presence", "presence"),
    (hypervisor.Domain, "xml", "XMLDesc"),
    (planning, "plan_update", "plan"),
    (sitehooks.RequestHooks, "before", "before-hooks"),
    (transaction.Transaction, "_apply_all", "apply"),
    (hypervisor.Domain, "update_interface", "updateDeviceFlags"),
    (hostnet, "master", "kernel read"),
    (service.Service, "_answer", "answer"),
    (service.Service, "_notify", "listeners"),
    (sitehooks.RequestHooks, "after", "after-hooks"),
]


def _marked(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def mark(edge: str) -> None:
        marks.append((time.perf_counter_ns(), f"{stage} {edge}"))

    if asyncio.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def waited(*args: Any, **kwargs: Any) -> Any:
            mark("starts")
            try:
                return await fn(*args, **kwargs)
            finally:
                mark("ends")

        return waited

    @functools.wraps(fn)
    def called(*args: Any, **kwargs: Any) -> Any:
        mark("starts")
        try:
            return fn(*args, **kwargs)
        finally:
            mark("ends")

    return called


def _timeline(vnicd: Vnicd, vm: Vm, changes: int) -> None:
    """A link toggle, stage by stage: the median gap between consecutive marks."""
    real = [(owner, attr, getattr(owner, attr)) for owner, attr, _stage in _STAGES]
    for owner, attr, stage in _STAGES:
        setattr(owner, attr, _marked(stage, getattr(owner, attr)))
    runs: list[list[tuple[int, str]]] = []
    try:
        for i in range(changes):
            marks.clear()
            marks.append((time.perf_counter_ns(), "client sends"))
            vnicd.change(vm, vm.nics[0], Change(link_up=i % 2 == 1))
            marks.append((time.perf_counter_ns(), "client has the answer"))
            runs.append(list(marks))
    finally:
        for owner, attr, fn in real:
            setattr(owner, attr, fn)
    shape = collections.Counter(tuple(label for _t, label in run) for run in runs)
    labels, _n = shape.most_common(1)[0]  # runs that took another path are left out
    same = [run for run in runs if tuple(label for _t, label in run) == labels]
    print(f"link toggle, transient VM, stage by stage (median of {len(same)} changes, us):")
    for k in range(1, len(labels)):
        gap = statistics.median((run[k][0] - run[k - 1][0]) / 1000 for run in same)
        print(f"  {gap:8.1f}  {labels[k - 1]} -> {labels[k]}")
    total = statistics.median((run[-1][0] - run[0][0]) / 1000 for run in same)
    print(f"  {total:8.1f}  in all")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--changes", type=int, default=200, help="changes per case (default 200)")
    p.add_argument("--vms", type=int, default=2, help="VMs on the host, at least 2 (default 2)")
    p.add_argument("--uri", choices=["embedded", "system"], default="embedded")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.profile: run as root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    sweep_stale()
    host = BenchHost(system=args.uri == "system")
    daemon: DaemonThread | None = None
    vnicd: Vnicd | None = None

    def stop() -> None:
        if vnicd is not None:
            vnicd.close()
        if daemon is not None:
            if daemon.daemon is not None:
                host.remove_vms(daemon.conn)
            daemon.stop()

    try:
        host.enter()
        config = Config(
            libvirt_uri="qemu:///system" if host.system else "",
            state_dir=host.state / "vnicd",
            unix_socket=host.state / "vnicd.sock",
            log_level="INFO",
            unwired_bridge=host.unwired,
        )
        daemon = DaemonThread(config)
        daemon.start()
        transient, persistent, *others = host.plan(max(args.vms, 2), 2)
        host.boot(daemon.conn, [transient, *others], persistent=False)
        host.boot(daemon.conn, [persistent], persistent=True)
        vnicd = Vnicd(config.unix_socket)
        _timeline(vnicd, transient, args.changes)
        print()
        _instrument()
        a, b = host.bridges
        cases = {
            "link toggle": (Change(link_up=False), Change(link_up=True)),
            "bridge move": (Change(bridge=b), Change(bridge=a)),
        }
        print(
            f"per VM.updateDevice, mean of {args.changes} changes, {max(args.vms, 2)} VMs x 2 vNICs"
        )
        for vm, kind in ((transient, "transient"), (persistent, "persistent")):
            for case, changes in cases.items():
                counts.clear()
                took = []
                for i in range(args.changes):
                    start = time.perf_counter()
                    vnicd.change(vm, vm.nics[0], changes[i % 2])
                    took.append(time.perf_counter() - start)
                print(f"{case}, {kind} VM: median {statistics.median(took) * 1000:.2f} ms")
                for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
                    print(f"  {n / args.changes:5.2f}  {name}")
                print()
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        host.cleanup(stop)


if __name__ == "__main__":
    raise SystemExit(main())
