"""bench/run: vnicd against raw libvirt-python and virsh, interleaved on the same paused VMs.

Phases: boot the VMs in batches (pausing each) with a small link-change sample and a
``Host.getVMList`` at each batch; single changes (link toggle, bridge move), rounds
interleaving the methods; the same with 1..8 concurrent clients; every vNIC down then
up; then vnicd as its own process: time to serving and RSS. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from functools import partial
from pathlib import Path
from types import FrameType

import libvirt
import yaml

from bench.host import REPO, BenchHost, Vm, log, sweep_stale, wait_until
from bench.methods import (
    Change,
    Engine,
    Method,
    Raw,
    RawChecked,
    Virsh,
    Vnicd,
    raw_all,
    timed,
    virsh_all,
    vnicd_bulk,
    vnicd_pipelined,
)
from bench.report import Results, machine, plot, table
from tests import pki
from tests.harness import DaemonThread
from vnicd import hostnet
from vnicd.client import Client, RpcError
from vnicd.config import Config, EngineConfig
from vnicd.errors import Recovering
from vnicd.schema import Schema

TOGGLE = (Change(link_up=False), Change(link_up=True))
PINGS = 4  # per client and round, as many as its changes
ENGINE_PORT = 54329  # in the bench's own network namespace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--uri", choices=["embedded", "system"], default="embedded")
    p.add_argument("--vms", type=int, default=20, help="paused VMs (default 20)")
    p.add_argument("--nics", type=int, default=2, help="vNICs per VM (default 2)")
    p.add_argument("--rounds", type=int, default=50, help="single-change rounds (default 50)")
    p.add_argument("--bulk-runs", type=int, default=3, help="all-vNICs runs per method")
    p.add_argument("--virsh-every", type=int, default=5, help="virsh in one round of N")
    p.add_argument(
        "--rss-changes", type=int, default=10_000, help="changes before the last RSS (>= 500)"
    )
    p.add_argument("--persistent", action="store_true", help="defined VMs (raw updates both)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = p.parse_args(argv)
    if not 1 <= args.vms <= 255 or not 1 <= args.nics <= 8:
        p.error("--vms 1..255, --nics 1..8")
    return args


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (it makes a network namespace and boots VMs)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    sweep_stale()
    host = BenchHost(system=args.uri == "system")
    bench = Bench(args, host)
    try:
        host.enter()  # before any thread: every tap and bridge of the run lives there
        bench.run()
        return 0
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        host.cleanup(bench.stop)
        log("cleaned up")


class Bench:
    def __init__(self, args: argparse.Namespace, host: BenchHost) -> None:
        self.args = args
        self.host = host
        self.results = Results()
        self.daemon: DaemonThread | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.certs = pki.make(host.state / "pki")
        self.config = Config(
            libvirt_uri="qemu:///system" if host.system else "",
            state_dir=host.state / "vnicd",
            unix_socket=host.state / "vnicd.sock",
            log_level="INFO",
            unwired_bridge=host.unwired,
            engine=EngineConfig(
                enabled=True,
                address="127.0.0.1",
                port=ENGINE_PORT,
                cert_file=self.certs.server.cert,
                key_file=self.certs.server.key,
                ca_file=self.certs.ca,
            ),
        )
        self.methods: list[Method] = []
        self.vnicd: Vnicd | None = None
        self.engine: Engine | None = None
        self.vms: list[Vm] = []
        self._conn: libvirt.virConnect | None = None

    # --- life cycle -------------------------------------------------------------------

    def stop(self) -> None:
        """vnicd and the bench's VMs gone; libvirt connections closed before their event loop."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)
        if self.vnicd is not None:
            self.vnicd.close()
        if self.engine is not None:
            self.engine.close()
        running = self.daemon is not None and self.daemon.daemon is not None
        conn = self._conn or (self.daemon.conn if self.daemon is not None and running else None)
        if conn is not None:
            self.host.remove_vms(conn)
        if self._conn is not None:
            self._conn.close()
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def run(self) -> None:
        a = self.args
        logging.basicConfig(
            filename=self.host.state / "vnicd.log",
            level=logging.INFO,
            format="%(asctime)s %(threadName)s %(levelname)s %(name)s: %(message)s",
        )
        if self.host.system:  # vnicd as deployed: its own process
            conn = self._conn = libvirt.open("qemu:///system")
            self._spawn()
        else:  # the embedded driver serves one process: vnicd runs in this one
            self.daemon = DaemonThread(self.config)
            self.daemon.start()
            conn = self.daemon.conn
        raw = Raw(conn, a.persistent)
        self.vnicd = Vnicd(self.config.unix_socket)
        c = self.certs
        self.engine = Engine(ENGINE_PORT, c.engine.cert, c.engine.key, c.ca)
        checked = RawChecked(conn, a.persistent)
        self.methods = [raw, checked, self.vnicd, self.engine]
        virsh = Virsh("qemu:///system") if self.host.system else None
        self._context(conn)

        plan = self.host.plan(a.vms, a.nics)
        checkpoints = sorted({n for n in (5, 10, 20, 50, 100, 200) if n < a.vms} | {a.vms})
        started = time.monotonic()
        for n in checkpoints:
            self.host.boot(conn, plan[len(self.vms) : n], a.persistent)
            self.vms = plan[:n]
            log(f"{n} VMs running, paused ({time.monotonic() - started:.0f}s)")
            self._curve_point(n)
        for method in (raw, checked):
            method.warm(self.vms)
        self._single(virsh)
        self._clients(conn)
        self._bulk(raw, checked, virsh)
        for _ in range(10):
            self.results.add(
                "getVMList", "vnicd", timed(lambda: self._vnicd.call("Host.getVMList"))
            )
        self._verify(conn)
        if self.host.system:
            self._footprint()
        else:
            self._resync_cost()
            self._restart()
            self.results.figures["RSS of the bench process (vnicd in it)"] = _rss(os.getpid())
        self._report()

    @property
    def _vnicd(self) -> Vnicd:
        assert self.vnicd is not None
        return self.vnicd

    def _context(self, conn: libvirt.virConnect) -> None:
        def version(v: int) -> str:
            return f"{v // 1000000}.{v // 1000 % 1000}.{v % 1000}"

        commit = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.results.context = {
            **machine(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit or "unknown",
            "libvirt": version(conn.getLibVersion()),
            "qemu": version(conn.getVersion()),
            "uri": self.config.uri,
            "uri_kind": "qemu:///system" if self.host.system else "embedded driver",
            "vms": self.args.vms,
            "nics": self.args.nics,
            "rounds": self.args.rounds,
            "persistent": self.args.persistent,
            "note": self.host.note,
            "vnicd_runs": "as its own process"
            if self.host.system
            else "in the bench's process (the embedded driver serves one process)",
        }

    # --- phases -----------------------------------------------------------------------

    def _curve_point(self, n: int) -> None:
        """A few link changes per method and a listing, with ``n`` VMs on the host."""
        samples: dict[str, list[float]] = {m.name: [] for m in self.methods}
        time.sleep(1)  # let the QEMUs just started settle
        for i in range(10):
            vm = self.vms[(i * 7) % n]
            for method in self._rotated(i):
                for change in TOGGLE:
                    samples[method.name].append(
                        timed(partial(method.change, vm, vm.nics[0], change))
                    )
        for name, found in samples.items():
            self.results.by_vms.setdefault(name, []).append((n, statistics.median(found)))
        listing = [timed(lambda: self._vnicd.call("Host.getVMList")) for _ in range(3)]
        self.results.list_by_vms.append((n, statistics.median(listing)))

    def _rotated(self, i: int) -> list[Method]:
        k = i % len(self.methods)
        return self.methods[k:] + self.methods[:k]

    def _single(self, virsh: Virsh | None) -> None:
        a, bridges = self.args, self.host.bridges
        moves = (Change(bridge=bridges[1]), Change(bridge=bridges[0]))
        log(f"single changes: {a.rounds} rounds")
        for r in range(a.rounds):
            vm = self.vms[r % len(self.vms)]
            nic = vm.nics[r % len(vm.nics)]
            methods: list[Method] = self._rotated(r)
            if virsh is not None and r % a.virsh_every == 0:
                methods.append(virsh)
            for method in methods:
                for change in TOGGLE:
                    sample = timed(partial(method.change, vm, nic, change))
                    self.results.add("link toggle", method.name, sample)
                if isinstance(method, Virsh):
                    continue
                for change in moves:
                    sample = timed(partial(method.change, vm, nic, change))
                    self.results.add("bridge move", method.name, sample)
            # a round trip that does nothing in vnicd, on each client, in the round's order
            for client in (m for m in methods if isinstance(m, Vnicd | Engine)):
                for _ in range(PINGS):
                    self.results.add("ping", client.name, timed(client.ping))

    def _clients(self, conn: libvirt.virConnect) -> None:
        """Per-change latency with 1..8 clients at once, each on its own VMs."""
        levels = [c for c in (1, 2, 4, 8) if c <= len(self.vms)]
        log(f"concurrent clients: {levels}")
        for count in levels:
            for name in ("raw libvirt", "vnicd"):
                with ThreadPoolExecutor(count) as pool:
                    found = pool.map(partial(self._client, conn, name, count), range(count))
                    per_change = [s for samples in found for s in samples]
                self.results.by_clients.setdefault(name, []).append(
                    (count, statistics.median(per_change))
                )

    def _client(self, conn: libvirt.virConnect, name: str, count: int, k: int) -> list[float]:
        """One client's link changes (its own connection), on every count-th VM from k."""
        method: Method
        if name == "raw libvirt":
            method = Raw(conn, self.args.persistent)
        else:
            method = Vnicd(self.config.unix_socket)
        mine = self.vms[k::count]
        found = []
        for i in range(10):
            vm = mine[i % len(mine)]
            for change in TOGGLE:
                found.append(timed(partial(method.change, vm, vm.nics[0], change)))
        if isinstance(method, Vnicd):
            method.close()
        return found

    def _bulk(self, raw: Raw, checked: RawChecked, virsh: Virsh | None) -> None:
        vms, path = self.vms, self.config.unix_socket
        runs: list[tuple[str, Callable[[bool], None]]] = [
            ("raw libvirt, 8 threads", lambda up: raw_all(raw, vms, up)),
            ("raw libvirt checked, 8 threads", lambda up: raw_all(checked, vms, up)),
            ("vnicd, pipelined", lambda up: vnicd_pipelined(path, vms, up)),
        ]
        if "Host.bulkUpdateNics" in Schema.load().verbs:
            runs.append(("vnicd, bulk verb", lambda up: vnicd_bulk(self._vnicd, vms, up)))
        log(f"all vNICs down then up: {[name for name, _ in runs]}")
        for i in range(self.args.bulk_runs):
            k = i % len(runs)
            for name, fn in runs[k:] + runs[:k]:
                self.results.add("all down+up", name, timed(partial(_down_up, fn)))
        if virsh is not None:
            log("all vNICs down then up: virsh loop")
            self.results.add(
                "all down+up",
                "virsh loop",
                timed(partial(_down_up, partial(virsh_all, virsh, vms))),
            )

    def _verify(self, conn: libvirt.virConnect) -> None:
        """Every vNIC ends up, on the first bridge, in libvirt's XML and in the kernel."""
        masters = hostnet.masters()
        for vm in self.vms:
            xml = conn.lookupByUUIDString(vm.uuid).XMLDesc(0)
            for nic in vm.nics:
                assert masters.get(nic.tap) == self.host.bridges[0], f"{nic.tap} moved"
            assert "state='down'" not in xml, f"{vm.name} has a vNIC down"

    def _spawn(self) -> float:
        """Start the vnicd process; seconds until it answers."""
        cfg = self.host.state / "vnicd.yml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "libvirt": {"uri": self.config.libvirt_uri},
                    "rpc": {"unix_socket": str(self.config.unix_socket)},
                    "state_dir": str(self.config.state_dir),
                    "unwired_bridge": self.config.unwired_bridge,
                    "log_level": "INFO",
                    "engine": {
                        "enabled": True,
                        "address": "127.0.0.1",
                        "port": ENGINE_PORT,
                        "cert_file": str(self.certs.server.cert),
                        "key_file": str(self.certs.server.key),
                        "ca_file": str(self.certs.ca),
                    },
                }
            )
        )
        start = time.perf_counter()
        with open(self.host.state / "vnicd-process.log", "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vnicd", "--config", str(cfg)],
                stdout=out,
                stderr=out,
                cwd=REPO,
            )
        try:
            wait_until(self._answers, 60, "vnicd process")
        except TimeoutError:
            log_tail = (self.host.state / "vnicd-process.log").read_text()[-2000:]
            raise RuntimeError(f"vnicd did not start serving:\n{log_tail}") from None
        return time.perf_counter() - start

    def _footprint(self) -> None:
        """The vnicd process started again with every VM there: time to serving, RSS."""
        assert self.process is not None
        self._close_clients()
        self.process.terminate()
        self.process.wait(30)
        ready = self._spawn()
        pid = self.process.pid
        figures = self.results.figures
        figures[f"process start to first answer, {len(self.vms)} VMs"] = f"{ready:.2f} s"
        figures["RSS when serving"] = _rss(pid)
        warm, total, vms = 500, max(self.args.rss_changes, 500), self.vms
        with Client(self.config.unix_socket) as c:
            c.call("Host.getVMList")
            for i in range(total):  # each VM's first vNIC down, then up, VM after VM
                vm = vms[i % len(vms)]
                params = {"deviceType": "interface", "macAddr": vm.nics[0].mac}
                up = (i // len(vms)) % 2 == 1
                c.call("VM.updateDevice", vmID=vm.uuid, params={**params, "linkActive": up})
                if i + 1 == warm:
                    warmed = _rss(pid)
                    figures[f"RSS after a listing and {warm} changes"] = warmed
        last = _rss(pid)
        figures[f"RSS after {total} changes"] = last
        figures[f"RSS growth from {warm} to {total} changes"] = _growth(warmed, last)

    def _resync_cost(self) -> None:
        """CPU time of vnicd's event loop thread for one resync of every VM (the engine's
        events), median of 5: what the resync takes from serving verbs."""
        assert self.daemon is not None and self.daemon.daemon is not None
        daemon = self.daemon.daemon

        async def one() -> float:
            start = time.thread_time()
            await daemon.resync_once()
            return time.thread_time() - start

        loop = self.daemon.loop
        took = [asyncio.run_coroutine_threadsafe(one(), loop).result(60) for _ in range(5)]
        self.results.figures[f"resync of {len(self.vms)} VMs, event loop CPU time, median"] = (
            f"{statistics.median(took) * 1000:.1f} ms"
        )

    def _restart(self) -> None:
        """vnicd stopped and started again in this process, every VM there."""
        assert self.daemon is not None
        self._close_clients()
        self.daemon.stop()
        start = time.perf_counter()
        self.daemon.start()
        self.results.figures[f"Daemon.start() to serving, in-process, {len(self.vms)} VMs"] = (
            f"{(time.perf_counter() - start) * 1000:.0f} ms"
        )

    def _close_clients(self) -> None:
        for client in (self.vnicd, self.engine):
            if client is not None:
                client.close()
        self.vnicd = self.engine = None
        self.methods.clear()

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise TimeoutError(f"vnicd exited with status {self.process.returncode}")
        try:
            with Client(self.config.unix_socket, timeout=5) as c:
                c.call("Host.ping2")
            return True
        except RpcError as e:
            if e.code == Recovering.code:  # the socket is up, the view of the host not yet
                return False
            raise
        except OSError:
            return False

    def _report(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        kind = "system" if self.host.system else "embedded"
        text = table(self.results)
        print(text)
        (out / f"table-{kind}.md").write_text(text + "\n")
        (out / f"results-{kind}.json").write_text(json.dumps(asdict(self.results), indent=1))
        plot(self.results, out / f"latency-{kind}.png")
        log(f"wrote {out}/table-{kind}.md, results-{kind}.json, latency-{kind}.png")


def _down_up(fn: Callable[[bool], None]) -> None:
    fn(False)
    fn(True)


def _growth(before: str, after: str) -> str:
    if "n/a" in (before, after):
        return "n/a"
    return f"{float(after.split()[0]) - float(before.split()[0]):+.1f} MiB"


def _rss(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return f"{int(line.split()[1]) / 1024:.1f} MiB"
    return "n/a"
