"""python -m bench.profile: what one vnicd change costs, counted (embedded driver).

Counts, per ``VM.updateDevice`` over the Unix socket, the libvirt calls vnicd makes
(by name), the XML documents it parses and serializes with lxml, and its netlink
round trips, for a link toggle and a bridge move on a transient and on a persistent
VM. Run it under ``py-spy record`` for where the time goes.
"""

from __future__ import annotations

import argparse
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

from bench.host import BenchHost, log, sweep_stale
from bench.methods import Change, Vnicd
from bench.run import _interrupt
from tests.harness import DaemonThread
from vnicd import hostnet
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--changes", type=int, default=200, help="changes per case (default 200)")
    p.add_argument("--vms", type=int, default=2, help="VMs on the host, at least 2 (default 2)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.profile: run as root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    sweep_stale()
    host = BenchHost(system=False)
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
