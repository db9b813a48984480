"""vnicd killed with SIGKILL while a VM runs with one vNIC unplugged: restarted, it tells the
truth about every vNIC (the kernel's bridge, the live XML, its stored unplugged vNIC).

On each of the session's drivers: a vnicd process on an embedded root of its own, or on the
session's libvirtd, where the session's in-process vnicd steps aside meanwhile (one vnicd per
libvirtd, as on a host).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Nic, vm_xml
from tests.harness import DaemonThread
from tests.hostenv import master
from tests.libvirtd import PrivateLibvirtd
from tests.test_daemon import state, wait_ready
from tests.test_service import launch, stop, write_config
from vnicd.client import Client

__all__ = ["state"]  # the fixture, used by name


def virsh(uri: str, *args: str, check: bool = True) -> str:
    """libvirt's own CLI (on an embedded root only while no vnicd runs on it)."""
    proc = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout.strip()


def nics(sock: Path, vm_id: str) -> dict[str, dict[str, Any]]:
    with Client(sock) as c:
        info = c.call("VM.getInfo", vmID=vm_id)
    assert info["status"] == "Up"
    return {n["macAddr"]: n for n in info["nics"]}


@pytest.fixture
def alone(vnicd: DaemonThread) -> Iterator[PrivateLibvirtd | None]:
    """The session's libvirtd with the session's vnicd stopped meanwhile (None on the
    embedded driver, where the test's vnicd has a root of its own)."""
    if vnicd.libvirtd is None:
        yield None
        return
    vnicd.stop()
    try:
        yield vnicd.libvirtd
    finally:
        vnicd.start()


def test_sigkill_with_an_unplugged_vnic(state: Path, alone: PrivateLibvirtd | None) -> None:
    sock = state / "vnicd.sock"
    if alone is None:
        uri = f"qemu:///embed?root={state / 'libvirt'}"
        config = write_config(state)
    else:
        uri = alone.uri
        config = write_config(state, f"libvirt: {{uri: '{uri}'}}\n")
    vm_id = f"5e1f0000-0000-4000-8003-{os.getpid():012x}"
    tap = f"vk{os.getpid() % 100000}"
    a = Nic("vt-a", mac="52:54:00:7f:03:01", tap=f"{tap}a")
    b = Nic("vt-a", mac="52:54:00:7f:03:02", tap=f"{tap}b")
    log = (state / "vnicd.log").open("w")

    def start() -> subprocess.Popen[str]:
        proc = launch(config, log)
        wait_ready(proc, sock)
        return proc

    proc = start()
    try:
        with Client(sock) as c:
            xml = vm_xml("crash-vm", vm_id, [a, b])
            c.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
        stop(proc)
        # virsh's embedded driver may report "not running" while it reconnects, and stop it.
        virsh(uri, "destroy", vm_id, check=False)
        assert virsh(uri, "domstate", vm_id) == "shut off"  # stopped, still defined
        proc = start()
        with Client(sock) as c:  # a stopped VM takes both changes in its definition
            c.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": b.mac})
            c.call(
                "VM.updateDevice",
                vmID=vm_id,
                params={"deviceType": "interface", "macAddr": a.mac, "network": "vt-b"},
            )
            c.call(
                "VM.updateDevice",
                vmID=vm_id,
                params={"deviceType": "interface", "macAddr": a.mac, "linkActive": False},
            )
        stop(proc)
        virsh(uri, "start", vm_id)  # running: a on vt-b with its link down, b unplugged

        proc = start()
        before = nics(sock, vm_id)
        assert before[a.mac]["bridge"] == "vt-b" == master(a.tap)
        assert before[a.mac]["linkActive"] is False and before[a.mac]["plugged"] is True
        assert before[b.mac]["plugged"] is False and before[b.mac]["network"] == "vt-a"

        proc.kill()
        proc.wait()
        assert sock.exists(), "a killed vnicd leaves its socket: the next one must cope"

        proc = start()
        after = nics(sock, vm_id)
        assert after == before
        assert master(a.tap) == "vt-b"
        with Client(sock) as c:  # the stored vNIC survived the crash: it plugs back
            c.call("VM.hotplugNic", vmID=vm_id, params={"macAddr": b.mac})
        plugged = nics(sock, vm_id)[b.mac]
        assert plugged["plugged"] is True and master(plugged["tap"]) == "vt-a"
        with Client(sock) as c:
            c.call("VM.destroy", vmID=vm_id)
    finally:
        stop(proc)
        log.close()
        if alone is not None:
            virsh(uri, "destroy", vm_id, check=False)
            virsh(uri, "undefine", vm_id, check=False)
