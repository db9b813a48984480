"""The test session's own host: a network namespace with its bridges, and a sweep of leftovers.

The whole test process enters the namespace before it starts any thread, so every
tap libvirt creates for the tests' VMs, and every ``ip`` the tests run, lives there
and can never collide with another run or with the host's own network.

It also reaps the QEMUs it orphans. A QEMU started by libvirt is a daemon, whose parent is
init; libvirt's destroy waits until the QEMU is gone, zombie included, so a VM's destroy takes
as long as init takes to reap it (here 1.6 s more than QEMU's own exit, for every VM).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from tests.libvirtd import kill_leftovers

CLONE_NEWNET = 0x40000000
CLONE_NEWNS = 0x00020000
MS_BIND, MS_MOVE, MS_REC, MS_SLAVE = 0x1000, 0x2000, 0x4000, 0x80000
MNT_DETACH = 2
PR_SET_CHILD_SUBREAPER = 36
PREFIX = "vnicd-test-"
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True).stdout


def link(name: str) -> dict[str, object] | None:
    proc = subprocess.run(["ip", "-j", "-d", "link", "show", "dev", name], capture_output=True)
    if proc.returncode != 0:
        return None
    found: list[dict[str, object]] = json.loads(proc.stdout)
    return found[0] if found else None


def master(dev: str) -> str | None:
    info = link(dev)
    assert info is not None, f"no device {dev}"
    value = info.get("master")
    return None if value is None else str(value)


def _libc_call(what: str, result: int) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _own_sysfs() -> None:
    """A mount namespace of this process's own with a sysfs of its network namespace, as
    ``ip netns exec`` makes one: libvirt reaches bridge ports through /sys/class/net (a
    port's isolation, for one), which otherwise shows the host's devices. What the host
    mounts under /sys (cgroups, securityfs, ...) is carried over where libvirt looks for
    it. Mounts the host makes later elsewhere still reach this namespace, its own reach
    nothing outside, and it dies with the process."""
    _libc_call("unshare(CLONE_NEWNS)", _libc.unshare(CLONE_NEWNS))
    _libc_call("mount / rslave", _libc.mount(b"none", b"/", None, MS_REC | MS_SLAVE, None))
    kept: list[tuple[str, str]] = []  # (mount point under /sys, where it waits meanwhile)
    try:
        for point in _mounts_under_sys():
            aside = tempfile.mkdtemp(prefix="vnicd-test-sys-")
            kept.append((point, aside))
            bind = _libc.mount(point.encode(), aside.encode(), None, MS_BIND | MS_REC, None)
            _libc_call(f"bind {point}", bind)
        _libc_call("mount sysfs", _libc.mount(b"sysfs", b"/sys", b"sysfs", 0, None))
        while kept:
            point, aside = kept[-1]
            back = _libc.mount(aside.encode(), point.encode(), None, MS_MOVE, None)
            _libc_call(f"move {point} back", back)
            kept.pop()
            os.rmdir(aside)
    finally:
        for _point, aside in kept:  # a failure: nothing is left mounted aside
            _libc.umount2(aside.encode(), MNT_DETACH)
            with contextlib.suppress(OSError):
                os.rmdir(aside)


def _mounts_under_sys() -> list[str]:
    """The outermost mount points under /sys (each takes the ones inside it along)."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith("/sys/"):
                points.append(point)
    return [p for p in points if not any(p.startswith(o + "/") for o in points if o != p)]


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def qemu_pids(marker: str, program: str = "qemu-system") -> list[int]:
    """QEMU (or ``program``) processes whose command line mentions ``marker`` (a test state
    directory, or a VM name)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if program in cmdline and marker in cmdline:
            pids.append(int(proc.name))
    return pids


def kill_qemus(marker: str, program: str = "qemu-system") -> None:
    for pid in qemu_pids(marker, program):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while qemu_pids(marker, program) and time.monotonic() < deadline:
        time.sleep(0.05)


def dead_runs(tmp: Path, prefix: str) -> Iterator[tuple[int, Path]]:
    """Runs named ``prefix<pid>`` whose process is gone: their namespaces are deleted here,
    their state directories (and pids) yielded for the caller to sweep."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    for ns in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True
    ).stdout.split():
        m = pattern.fullmatch(ns)
        if m and not alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", ns], check=False)
    for state in list(tmp.glob(prefix + "*")):
        m = pattern.match(state.name)
        if m and not alive(int(m.group(1))):
            yield int(m.group(1)), state


def sweep_stale(tmp: Path) -> None:
    """Remove what earlier runs killed mid-way left behind: their VMs, namespaces, state."""
    run = re.compile(re.escape(PREFIX) + r"(\d+)-")
    # Private libvirtds and their VMs (tests/libvirtd.py), found even once their state is gone.
    kill_leftovers(lambda state: any(not alive(int(pid)) for pid in run.findall(state)))
    for _, state in dead_runs(tmp, PREFIX):
        kill_qemus(str(state))
        subprocess.run(["rm", "-rf", str(state)], check=False)


def _stat(pid: int) -> tuple[str, str, int]:
    """A process's name, state (``Z``: exited, not yet reaped) and session; empty once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "", "", 0
    comm, _, rest = text.partition("(")[2].rpartition(")")
    state, _ppid, _pgrp, session = rest.split()[:4]
    return comm, state, int(session)


def _orphaned_qemu(pid: int) -> bool:
    """A daemon QEMU (in a session of its own) that this process adopted: a QEMU that libvirt
    runs as its own child (capability probing) shares the session, and libvirt reaps it."""
    comm, _, session = _stat(pid)
    return comm.startswith("qemu-system") and session != os.getsid(0)


def _zombie_qemus() -> list[int]:
    """This process's children (those of any of its threads) that are exited adopted QEMUs."""
    pids = []
    for children in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for pid in map(int, children.read_text().split()):
                if _orphaned_qemu(pid) and _stat(pid)[1] == "Z":
                    pids.append(pid)
    return pids


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def reap_qemus() -> None:
    """Become the reaper of the daemons this process's descendants start (QEMUs) and reap
    each such QEMU as soon as it exits, on a thread of its own. Other children are left to
    whoever started them."""
    if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"PR_SET_CHILD_SUBREAPER: {os.strerror(err)}")

    def reap() -> None:
        while True:
            try:
                exited = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:  # no child at all
                time.sleep(0.05)
                continue
            if exited is not None and _orphaned_qemu(exited.si_pid):
                _reap(exited.si_pid)
                continue
            # The child that exited is another's to wait for: look past it for QEMUs.
            for pid in _zombie_qemus():
                _reap(pid)
            time.sleep(0.05)

    threading.Thread(target=reap, name="qemu-reaper", daemon=True).start()


class TestHost:
    """A network namespace that this process lives in for the whole session."""

    def __init__(self) -> None:
        self.name = f"{PREFIX}{os.getpid()}"
        self.bridges: list[str] = []
        self.entered = False

    def enter(self) -> None:
        if threading.active_count() != 1:
            raise RuntimeError("enter the test namespace before any thread starts")
        ip("netns", "add", self.name)
        _setns(f"/run/netns/{self.name}")
        self.entered = True
        _own_sysfs()
        ip("link", "set", "dev", "lo", "up")
        reap_qemus()

    def leave(self) -> None:
        """Delete the bridges and the namespace's name; the namespace dies with this process."""
        if not self.entered:
            return
        for name in self.bridges:
            subprocess.run(["ip", "link", "del", "dev", name], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], check=False)

    def bridge(self, name: str) -> str:
        """A bridge that is up and forwards without the host firewall looking at it."""
        ip("link", "add", "name", name, "type", "bridge")
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "set", "dev", name, "type", "bridge", "nf_call_iptables", "0")
        ip("link", "set", "dev", name, "up")
        self.bridges.append(name)
        return name
