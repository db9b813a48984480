"""vnicd killed with SIGKILL while a VM runs with one vNIC unplugged and a change in flight:
restarted, it tells the truth about every vNIC (the kernel's bridge, the live XML, the
definition, its stored unplugged vNIC), and none is half changed.

On each of the session's drivers: a vnicd process on an embedded root of its own (libvirt
dies with it), or on the session's libvirtd (which lives on), where the session's
in-process vnicd steps aside meanwhile (one vnicd per libvirtd, as on a host). One more
kills a libvirtd of its own under the restarted vnicd's first call.
"""

from __future__ import annotations

import logging
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
from tests.hostenv import ip, master
from tests.libvirtd import PrivateLibvirtd
from tests.test_daemon import state
from tests.test_libvirtd import MARKER, libvirtd
from tests.test_service import stop, write_config
from vnicd.client import Client, RpcError
from vnicd.config import Config
from vnicd.hypervisor import Domain

__all__ = ["libvirtd", "state"]  # the fixtures, used by name
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


class Crashing:
    """A crash test's vnicd as a process of its own (link bounces of 5 s) on the session's
    driver: started, killed, started again; once the test ends, stopped, with the test's
    VM gone from a shared libvirtd (an embedded root goes with the test's state)."""

    def __init__(self, state: Path, alone: PrivateLibvirtd | None, vm_id: str) -> None:
        self.sock, self.log_path, self.vm_id = state / "vnicd.sock", state / "vnicd.log", vm_id
        self.uri = f"qemu:///embed?root={state / 'libvirt'}" if alone is None else alone.uri
        extra = "" if alone is None else f"libvirt: {{uri: '{alone.uri}'}}\n"
        self._config = write_config(state, f"link_bounce: {{seconds: 5}}\n{extra}")
        self._shared = alone is not None
        self._log = self.log_path.open("w")
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Crashing:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        self._log.close()
        if self._shared:
            virsh(self.uri, "destroy", self.vm_id, check=False)
            virsh(self.uri, "undefine", self.vm_id, check=False)

    def start(self) -> None:
        self._proc = faults.launch(self._config, self._log)
        faults.wait_serving(self.sock, self._proc)

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc)

    def kill_in_bounce(self, nic: Nic, network: str) -> list[object]:
        """Move ``nic`` to ``network`` with a link bounce, and SIGKILL vnicd in its pause
        (the link down on ``network``, the definition not updated yet); what the client
        got instead of an answer."""
        assert self._proc is not None
        cut: list[object] = []
        params = {"deviceType": "interface", "macAddr": nic.mac, "network": network}

        def move() -> None:
            try:
                with Client(self.sock) as client:
                    client.call(
                        "VM.updateDevice", vmID=self.vm_id, params={**params, "linkBounce": True}
                    )
            except (OSError, ValueError, RpcError) as e:
                cut.append(e)

        mover = threading.Thread(target=move)
        mover.start()
        try:
            faults.until("the move in flight", lambda: master(nic.tap) == network, 10)
            time.sleep(0.2)
        finally:
            self._proc.kill()
            self._proc.wait()
            mover.join(10)
        return cut

    def view(self) -> faults.VmView:
        """The VM as libvirt shows it (on an embedded root only while vnicd is stopped)."""
        uri, vm_id = self.uri, self.vm_id
        live, saved = virsh(uri, "dumpxml", vm_id), virsh(uri, "dumpxml", "--inactive", vm_id)
        return faults.view_xml(vm_id, live, saved)


def test_sigkill_with_an_unplugged_vnic_and_a_change_in_flight(
    state: Path, alone: PrivateLibvirtd | None
) -> None:
    vm_id = f"5e1f0000-0000-4000-8003-{os.getpid():012x}"
    tap = f"vk{os.getpid() % 100000}"
    a = Nic("vt-a", mac="52:54:00:7f:03:01", tap=f"{tap}a")
    b = Nic("vt-a", mac="52:54:00:7f:03:02", tap=f"{tap}b")
    c = Nic("vt-a", mac="52:54:00:7f:03:03", tap=f"{tap}c")
    with Crashing(state, alone, vm_id) as run:
        sock, uri = run.sock, run.uri
        run.start()
        with Client(sock) as client:
            xml = vm_xml("crash-vm", vm_id, [a, b, c])
            client.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
        run.stop()
        # virsh's embedded driver may report "not running" while it reconnects, and stop it.
        virsh(uri, "destroy", vm_id, check=False)
        assert virsh(uri, "domstate", vm_id) == "shut off"  # stopped, still defined
        run.start()
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
        run.stop()
        virsh(uri, "start", vm_id)  # running: a on vt-b with its link down, b unplugged

        run.start()
        before = nics(sock, vm_id)
        assert before[a.mac]["bridge"] == "vt-b" == master(a.tap)
        assert before[a.mac]["linkActive"] is False and before[a.mac]["plugged"] is True
        assert before[b.mac]["plugged"] is False and before[b.mac]["network"] == "vt-a"
        assert before[c.mac]["bridge"] == "vt-a" and before[c.mac]["linkActive"] is True

        # c moves to vt-b with a link bounce: its link goes down with the move, and comes
        # back up 5 s later; vnicd dies in between, before the definition is updated, and
        # leaves the bounce's mark in the domain's metadata
        cut = run.kill_in_bounce(c, "vt-b")
        assert len(cut) == 1 and not isinstance(cut[0], RpcError), "no answer came"
        assert sock.exists(), "a killed vnicd leaves its socket: the next one must cope"

        run.start()
        after = nics(sock, vm_id)
        assert {m: n for m, n in after.items() if m != c.mac} == {
            m: n for m, n in before.items() if m != c.mac
        }
        assert master(a.tap) == "vt-b"
        # the move cut in its pause ends as asked: on vt-b, linked up again by the
        # restarted vnicd, and so is the definition, so a reboot brings it back the same
        assert (after[c.mac]["bridge"], after[c.mac]["linkActive"]) == ("vt-b", True)
        ended = "ending link bounces left by a stopped vnicd (LiveUpdate)"
        assert ended in run.log_path.read_text()
        reported = info(sock, vm_id)
        run.stop()
        truth, problems = faults.check(run.view(), reported, faults.masters(), UNWIRED)
        assert not problems, problems  # a bounce mark left over would be one
        assert truth[c.mac] == faults.NicTruth(True, "vt-b", True)
        assert truth[b.mac] == faults.NicTruth(False, "vt-a", True)

        run.start()
        with Client(sock) as client:  # the stored vNIC survived the crash: it plugs back
            client.call("VM.hotplugNic", vmID=vm_id, params={"macAddr": b.mac})
        plugged = nics(sock, vm_id)[b.mac]
        assert plugged["plugged"] is True and master(plugged["tap"]) == "vt-a"
        with Client(sock) as client:
            client.call("VM.destroy", vmID=vm_id, undefine=True)


def test_a_bounce_that_cannot_end_does_not_hold_back_recovery(
    state: Path, alone: PrivateLibvirtd | None
) -> None:
    """vnicd killed in a link bounce's pause, and the bridge the move went to deleted while
    it was down: the restarted vnicd cannot link the vNIC up there, says so, and settles
    the VM all the same (the mark goes, the definition gets what the guest has)."""
    bridge = f"vt-kb{os.getpid() % 1000}"
    vm_id = f"5e1f0000-0000-4000-8004-{os.getpid():012x}"
    tap = f"vj{os.getpid() % 100000}"
    a = Nic("vt-a", mac="52:54:00:7f:04:01", tap=f"{tap}a")
    c = Nic("vt-a", mac="52:54:00:7f:04:03", tap=f"{tap}c")
    ip("link", "add", "name", bridge, "type", "bridge")
    try:
        with Crashing(state, alone, vm_id) as run:
            ip("link", "set", "dev", bridge, "up")
            run.start()
            with Client(run.sock) as client:
                xml = vm_xml("crash-vm2", vm_id, [a, c])
                client.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
            run.kill_in_bounce(c, bridge)
            ip("link", "del", "dev", bridge)

            run.start()
            assert "a link bounce left by a stopped vnicd stays" in run.log_path.read_text()
            got = nics(run.sock, vm_id)
            assert (got[c.mac]["linkActive"], got[a.mac]["bridge"]) == (False, "vt-a")
            run.stop()
            vm = run.view()
            assert vm.bounce_marks == 0, "the mark went"
            down = faults.Wire(bridge, False)
            assert vm.live[c.mac][0] == vm.saved[c.mac] == down, "the definition follows"
            run.start()
            with Client(run.sock) as client:
                client.call("VM.destroy", vmID=vm_id, undefine=True)
    finally:
        subprocess.run(["ip", "link", "del", "dev", bridge], capture_output=True, check=False)


def test_a_bounce_end_cut_by_a_lost_libvirtd_is_redone_once_it_is_back(
    state: Path, libvirtd: PrivateLibvirtd, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """vnicd killed in a link bounce's pause; the next one's link-up at start is cut by
    libvirtd dying under it. That vnicd still starts once libvirtd is back, and then undoes
    the cut call, links the vNIC up on the bounce's network, removes the mark and gives the
    definition the same. Only qemu:///system has a connection to lose: a libvirtd of the
    test's own, killed at the one call (vnicd runs in this process for the second start)."""
    vm_id = f"5e1f0000-0000-4000-8005-{os.getpid():012x}"
    tap = f"vh{os.getpid() % 100000}"
    a = Nic("vt-a", mac="52:54:00:7f:05:01", tap=f"{tap}a")
    c = Nic("vt-a", mac="52:54:00:7f:05:03", tap=f"{tap}c")
    with Crashing(state, libvirtd, vm_id) as run:
        run.start()
        with Client(run.sock) as client:
            xml = vm_xml(f"{MARKER}-bounce", vm_id, [a, c])
            client.call("VM.create", vmID=vm_id, vmParams={"xml": xml, "persistent": True})
        run.kill_in_bounce(c, "vt-b")
        assert run.view().bounce_marks == 1

        again = DaemonThread(
            Config(
                libvirt_uri=libvirtd.unix_uri,
                state_dir=state,
                unix_socket=run.sock,
                unwired_bridge=UNWIRED,
                link_bounce_seconds=5.0,
            )
        )
        cut: list[str] = []
        real = Domain.update_interface

        def dying(dom: Domain, xml: str, *, live: bool, persistent: bool) -> None:
            """The start's link-up: libvirtd killed under it, started again, and the call's
            failure returned once vnicd has reconnected (so its start goes on)."""
            if dom.uuid != vm_id or cut:
                return real(dom, xml, live=live, persistent=persistent)
            cut.append(xml)
            libvirtd.kill()
            try:
                return real(dom, xml, live=live, persistent=persistent)
            finally:
                libvirtd.start()
                assert again.daemon is not None
                hv = again.daemon.hypervisor
                faults.until(
                    "vnicd reconnects", lambda: hv.alive() and hv.conn is not dom.connection
                )

        monkeypatch.setattr(Domain, "update_interface", dying)
        caplog.set_level(logging.INFO, logger="vnicd")
        try:
            again.start()
            assert len(cut) == 1 and "vt-b" in cut[0] and 'state="down"' not in cut[0], cut

            def ended() -> bool:
                now = nics(run.sock, vm_id)[c.mac]
                return (now["bridge"], now["linkActive"]) == ("vt-b", True)

            faults.until("the bounce ends once libvirtd is back", ended, 30)
            reported = info(run.sock, vm_id)
        finally:
            again.stop()
        said = caplog.text
        assert said.count("ending link bounces left by a stopped vnicd (LiveUpdate)") == 2, said
        assert "stays: updating the vNICs of VM" in said  # the cut link-up, told
        assert "the change that failed earlier is undone" in said
        truth, problems = faults.check(run.view(), reported, faults.masters(), UNWIRED)
        assert not problems, problems  # the mark left over, or the definition behind, is one
        assert truth[c.mac] == faults.NicTruth(True, "vt-b", True)
        assert truth[a.mac] == faults.NicTruth(True, "vt-a", True)
        assert master(c.tap) == "vt-b"
