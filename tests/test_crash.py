"""vnicd killed with SIGKILL while a VM runs with one vNIC unplugged and a change in flight:
restarted, it tells the truth about every vNIC (the kernel's bridge, the live XML, the
definition, its stored unplugged vNIC), and none is half changed.

On each of the session's drivers: a vnicd process on an embedded root of its own (libvirt
dies with it), or on the session's libvirtd (which lives on), where the session's
in-process vnicd steps aside meanwhile (one vnicd per libvirtd, as on a host).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import faults
from tests.conftest import Nic, vm_xml
from tests.harness import DaemonThread
from tests.hostenv import master
from tests.libvirtd import PrivateLibvirtd
from tests.test_daemon import state
from tests.test_service import stop, write_config
from vnicd.client import Client, RpcError

__all__ = ["state"]  # the fixture, used by name
UNWIRED = "vt-unwired3"


def virsh(uri: str, *args: str, check: bool = True) -> str:
    """libvirt's own CLI (on an embedded root only while no vnicd runs on it)."""
    proc = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 or not check, proc.stderr
    return proc.stdout.strip()


def info(sock: Path, vm_id: str) -> dict[str, Any]:
    with Client(sock) as c:
        found: dict[str, Any] = c.call("VM.getInfo", vmID=vm_id)
    assert found["status"] == "Up"
    return found


def nics(sock: Path, vm_id: str) -> dict[str, dict[str, Any]]:
    return {n["macAddr"]: n for n in info(sock, vm_id)["nics"]}


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


def test_sigkill_with_an_unplugged_vnic_and_a_change_in_flight(
    state: Path, alone: PrivateLibvirtd | None
) -> None:
    sock = state / "vnicd.sock"
    bounce = "link_bounce: {seconds: 5}\n"
    if alone is None:
        uri = f"qemu:///embed?root={state / 'libvirt'}"
        config = write_config(state, bounce)
    else:
        uri = alone.uri
        config = write_config(state, f"{bounce}libvirt: {{uri: '{uri}'}}\n")
    vm_id = f"5e1f0000-0000-4000-8003-{os.getpid():012x}"
    tap = f"vk{os.getpid() % 100000}"
    a = Nic("vt-a", mac="52:54:00:7f:03:01", tap=f"{tap}a")
    b = Nic("vt-a", mac="52:54:00:7f:03:02", tap=f"{tap}b")
    c = Nic("vt-a", mac="52:54:00:7f:03:03", tap=f"{tap}c")
    log = (state / "vnicd.log").open("w")

    def start() -> subprocess.Popen[str]:
        proc = faults.launch(config, log)
        faults.wait_serving(sock, proc)
        return proc

    proc = start()
    try:
        with Client(sock) as client:
            xml = vm_xml("crash-vm", vm_id, [a, b, c])
            client.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
        stop(proc)
        # virsh's embedded driver may report "not running" while it reconnects, and stop it.
        virsh(uri, "destroy", vm_id, check=False)
        assert virsh(uri, "domstate", vm_id) == "shut off"  # stopped, still defined
        proc = start()
        with Client(sock) as client:  # a stopped VM takes both changes in its definition
            client.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": b.mac})
            client.call(
                "VM.updateDevice",
                vmID=vm_id,
                params={"deviceType": "interface", "macAddr": a.mac, "network": "vt-b"},
            )
            client.call(
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
        assert before[c.mac]["bridge"] == "vt-a" and before[c.mac]["linkActive"] is True

        # c moves to vt-b with a link bounce: its link goes down with the move, and comes
        # back up 5 s later; vnicd dies in between, before the definition is updated, and
        # leaves the bounce's mark in the domain's metadata
        answers: list[object] = []

        def move() -> None:
            params = {"deviceType": "interface", "macAddr": c.mac, "network": "vt-b"}
            try:
                with Client(sock) as client:
                    client.call(
                        "VM.updateDevice", vmID=vm_id, params={**params, "linkBounce": True}
                    )
            except (OSError, ValueError, RpcError) as e:
                answers.append(e)

        mover = threading.Thread(target=move)
        mover.start()
        faults.until("the move in flight", lambda: master(c.tap) == "vt-b", 10)
        time.sleep(0.2)
        proc.kill()
        proc.wait()
        mover.join(10)
        assert len(answers) == 1 and not isinstance(answers[0], RpcError), "no answer came"
        assert sock.exists(), "a killed vnicd leaves its socket: the next one must cope"

        proc = start()
        after = nics(sock, vm_id)
        assert {m: n for m, n in after.items() if m != c.mac} == {
            m: n for m, n in before.items() if m != c.mac
        }
        assert master(a.tap) == "vt-b"
        # the move cut in its pause ends as asked: on vt-b, linked up again by the
        # restarted vnicd, and so is the definition, so a reboot brings it back the same
        assert (after[c.mac]["bridge"], after[c.mac]["linkActive"]) == ("vt-b", True)
        reported = info(sock, vm_id)
        stop(proc)
        vm = faults.view_xml(
            vm_id, virsh(uri, "dumpxml", vm_id), virsh(uri, "dumpxml", "--inactive", vm_id)
        )
        truth, problems = faults.check(vm, reported, faults.masters(), UNWIRED)
        assert not problems, problems  # a bounce mark left over would be one
        assert truth[c.mac] == faults.NicTruth(True, "vt-b", True)
        assert truth[b.mac] == faults.NicTruth(False, "vt-a", True)

        proc = start()
        with Client(sock) as client:  # the stored vNIC survived the crash: it plugs back
            client.call("VM.hotplugNic", vmID=vm_id, params={"macAddr": b.mac})
        plugged = nics(sock, vm_id)[b.mac]
        assert plugged["plugged"] is True and master(plugged["tap"]) == "vt-a"
        with Client(sock) as client:
            client.call("VM.destroy", vmID=vm_id)
    finally:
        if proc.poll() is None:
            stop(proc)
        log.close()
        if alone is not None:
            virsh(uri, "destroy", vm_id, check=False)
            virsh(uri, "undefine", vm_id, check=False)
