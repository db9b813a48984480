"""The bench's own host: a network namespace, its bridges, libvirtd if asked, paused VMs.

Everything made here carries the bench's pid in its name, is removed by ``cleanup``
(even after an interrupt), and what a killed run left behind is swept at the next start.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import libvirt

from tests.hostenv import TestHost, alive, dead_runs, kill_qemus
from tests.hostenv import _setns as setns

PREFIX = "vnicd-bench-"
TMP = Path(tempfile.gettempdir())
REPO = Path(__file__).resolve().parent.parent
LIBVIRTD_CTL = REPO / "contrib" / "libvirtd-ctl"
DOMAIN_TYPE = "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "qemu"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Nic:
    mac: str
    tap: str


@dataclass(frozen=True)
class Vm:
    uuid: str
    name: str
    nics: tuple[Nic, ...]


def vm_xml(vm: Vm, bridge: str) -> str:
    """A VM with no OS (64 MiB, no disk): real PCI NICs, taps and QMP, hotplug-capable."""
    nics = "".join(
        f"<interface type='bridge'><mac address='{n.mac}'/><source bridge='{bridge}'/>"
        f"<target dev='{n.tap}'/><model type='virtio'/></interface>"
        for n in vm.nics
    )
    return f"""<domain type='{DOMAIN_TYPE}'>
  <name>{vm.name}</name><uuid>{vm.uuid}</uuid>
  <memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>{nics}</devices>
</domain>"""


def _netns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def _remove(dom: libvirt.virDomain) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        dom.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        dom.undefine()


class BenchHost:
    """Where the bench runs: entered before any thread starts, cleaned up by ``cleanup``."""

    def __init__(self, system: bool) -> None:
        self.system = system
        self.pid = os.getpid()
        self.tag = f"b{self.pid % 100000}"
        self.bridges = (f"{self.tag}a", f"{self.tag}b")
        self.unwired = f"{self.tag}u"
        self.state = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.pid}-", dir=TMP))
        self._ns = TestHost()
        self._ns.name = f"{PREFIX}{self.pid}"
        self._started_libvirtd = False
        self.vms: list[Vm] = []
        self.note = ""

    def enter(self) -> None:
        """Own network namespace; on qemu:///system the one libvirtd makes its taps in."""
        self._ns.enter()
        if self.system:
            self._libvirtd()
        for name in self.bridges:
            self._ns.bridge(name)
        self._ns.bridges.append(self.unwired)  # vnicd creates it; removed with the others

    def _libvirtd(self) -> None:
        answering = subprocess.run([LIBVIRTD_CTL, "status"], capture_output=True).returncode == 0
        subprocess.run([LIBVIRTD_CTL, "start"], check=True)
        self._started_libvirtd = not answering
        pid = Path("/run/libvirtd.pid").read_text().strip()
        if _netns(pid) != _netns("self"):
            # A libvirtd we did not start makes taps in its own namespace: work there,
            # with bridges whose names carry our pid.
            self.note = "libvirtd runs in another network namespace: bench bridges made there"
            log(self.note)
            setns(f"/proc/{pid}/ns/net")

    def plan(self, count: int, nics: int) -> list[Vm]:
        p = self.pid
        return [
            Vm(
                uuid=f"{p % 0xFFFFFFFF:08x}-0000-4000-8000-{i:012x}",
                name=f"{PREFIX}{p}-{i}",
                nics=tuple(
                    Nic(
                        mac=f"52:54:{(p >> 8) & 0xFF:02x}:{p & 0xFF:02x}:{i:02x}:{j:02x}",
                        tap=f"{self.tag}t{i}n{j}",
                    )
                    for j in range(nics)
                ),
            )
            for i in range(count)
        ]

    def boot(
        self, conn: libvirt.virConnect, vms: list[Vm], persistent: bool, parallel: int = 4
    ) -> None:
        """Start each VM and pause it at once: a paused VM takes live updates, costs no CPU."""

        def one(vm: Vm) -> None:
            xml = vm_xml(vm, self.bridges[0])
            if persistent:
                dom = conn.defineXML(xml)
                dom.create()
            else:
                dom = conn.createXML(xml, 0)
            dom.suspend()

        with ThreadPoolExecutor(parallel) as pool:
            for vm, future in [(vm, pool.submit(one, vm)) for vm in vms]:
                future.result()
                self.vms.append(vm)

    def remove_vms(self, conn: libvirt.virConnect) -> None:
        """Destroy and undefine the bench's VMs, several at once (each waits for its QEMU)."""
        mine = re.compile(re.escape(f"{PREFIX}{self.pid}-") + r"\d+")
        doms = [d for d in conn.listAllDomains(0) if mine.fullmatch(d.name())]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(_remove, doms))

    def cleanup(self, stop_vnicd: Callable[[], None]) -> None:
        """Remove VMs, vnicd, bridges, namespace, state; libvirtd only if the bench started it."""
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stop vnicd, remove VMs", stop_vnicd),
            # what libvirt could not destroy (a libvirtd gone meanwhile leaves its QEMUs)
            ("kill QEMUs", lambda: kill_qemus(str(self.state))),
            ("kill QEMUs", lambda: kill_qemus(f"guest={PREFIX}{self.pid}-")),
            ("remove bridges and namespace", self._ns.leave),
            ("remove state", lambda: shutil.rmtree(self.state, ignore_errors=True)),
        ]
        if self._started_libvirtd:
            steps.append(("stop libvirtd", self._stop_libvirtd))
        for what, step in steps:
            try:
                step()
            except Exception as e:  # keep cleaning: one failure must not leave the rest
                log(f"cleanup: {what} failed: {e}")

    @staticmethod
    def _stop_libvirtd() -> None:
        subprocess.run([LIBVIRTD_CTL, "stop"], check=True)


def _cmdlines() -> str:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                found.append((proc / "cmdline").read_bytes().decode(errors="replace"))
    return "\n".join(found)


def sweep_stale() -> None:
    """Remove what a killed bench left: namespaces, state dirs, QEMUs, system VMs."""
    pattern = re.compile(re.escape(PREFIX) + r"(\d+)")
    for _pid, state in dead_runs(TMP, PREFIX):
        kill_qemus(str(state))
        shutil.rmtree(state, ignore_errors=True)
    for pid in {int(p) for p in re.findall(r"guest=" + re.escape(PREFIX) + r"(\d+)-", _cmdlines())}:
        if not alive(pid):
            kill_qemus(f"guest={PREFIX}{pid}-")
    if subprocess.run([LIBVIRTD_CTL, "status"], capture_output=True).returncode != 0:
        return
    conn = libvirt.open("qemu:///system")
    try:
        for dom in conn.listAllDomains(0):
            m = pattern.match(dom.name())
            if m and not alive(int(m.group(1))):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefine()
    finally:
        conn.close()


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.01)
