"""A libvirtd of the test's own, so it can be killed and restarted without touching anyone's.

The machine is shared: a libvirtd that another session uses must never be killed by a test.
This one runs in the test's network namespace (its taps land on the test's bridges) and in a
private mount namespace where private directories are bound over /etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt. Clients reach it through
``qemu:///system?socket=<state>/run/libvirt-sock``: the system QEMU driver through libvirtd's
remote protocol, as on a production host. Killed with SIGKILL, its QEMUs keep running; a new
libvirtd on the same directories reconnects to them, as after a restart of libvirtd.

Its QEMUs' command lines name only the bound paths; what is left of one (after a failure, or
a run killed outright) is found by its mount table instead: every process of that private
mount namespace has the state directory bound over /var/lib/libvirt, even once the directory
itself is deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

QEMU_CONF = """\
# QEMU as root: /dev/kvm is root-only here. No virtlogd runs: QEMU logs to files.
user = "root"
group = "root"
stdio_handler = "file"
# Leave cgroups alone: other libvirt instances on this host use the same names.
cgroup_controllers = [ ]
"""
_BINDS = {
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
_UNSHARE = ["unshare", "--mount", "--propagation", "private", "--"]
_START = (
    "".join(f'mount --bind "$1/{src}" {dst} && ' for src, dst in _BINDS.items())
    + 'exec libvirtd --pid-file "$1/libvirtd.pid"'
)


class PrivateLibvirtd:
    def __init__(self, state: Path) -> None:
        self.state = state
        for sub in _BINDS:
            (state / sub).mkdir(parents=True, exist_ok=True)
        (state / "etc" / "qemu.conf").write_text(QEMU_CONF)
        self.socket = state / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        # The same connection with its transport named: what a process that has also opened
        # the embedded driver must use, for that driver then takes qemu:///system for itself
        # (and refuses it without root=).
        self.unix_uri = f"qemu+unix:///system?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        assert self.proc is None or self.proc.poll() is not None, "libvirtd already runs"
        self.socket.unlink(missing_ok=True)
        with (self.state / "libvirtd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [*_UNSHARE, "sh", "-c", _START, "sh", str(self.state)],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while not self.answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log_text = (self.state / "libvirtd.log").read_text(errors="replace")
                raise AssertionError(f"private libvirtd did not start: {log_text[-2000:]}")
            time.sleep(0.1)

    def answers(self) -> bool:
        return self.virsh("version").returncode == 0

    def virsh(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["virsh", "-c", self.uri, *args], capture_output=True, text=True, timeout=30
        )

    def kill(self) -> None:
        """SIGKILL, as a crash would: no clean goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def pause(self, paused: bool) -> None:
        """SIGSTOP (a hung libvirtd: its socket accepts, nothing answers) or SIGCONT."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def remove_vms(self) -> None:
        """Destroy and undefine every VM this libvirtd knows (only the test's own)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for name in self.virsh("list", "--all", "--name").stdout.split():
            self.virsh("destroy", name)
            self.virsh("undefine", name)

    def close(self) -> None:
        """VMs, libvirtd and state gone, even when libvirtd no longer answers."""
        with contextlib.suppress(Exception):
            self.remove_vms()
        self.stop()
        kill_leftovers(lambda state: str(self.state).endswith(state))
        shutil.rmtree(self.state, ignore_errors=True)


def bound() -> Iterator[tuple[int, str]]:
    """Every process of a private libvirtd's mount namespace (libvirtd, its QEMUs), with the
    state directory bound there: as its file system names it, so the end of its path (all
    of it where /tmp is on the root file system)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            lines = (proc / "mountinfo").read_text().splitlines()
        except OSError:
            continue  # gone, or a zombie
        for line in lines:
            fields = line.split()  # id parent dev root mountpoint ...
            root = fields[3].removesuffix("//deleted")
            if fields[4] == _BINDS["lib"] and root.endswith("/lib") and root != "/lib":
                yield int(proc.name), root.removesuffix("/lib")
                break


def kill_leftovers(whose: Callable[[str], bool], timeout: float = 10) -> None:
    """SIGKILL every process of each private libvirtd whose state directory (as
    :func:`bound` names it) ``whose`` accepts, and wait until they are gone."""
    killed = set()
    for pid, state in bound():
        if whose(state):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
    deadline = time.monotonic() + timeout
    while killed & {pid for pid, _ in bound()} and time.monotonic() < deadline:
        time.sleep(0.05)
