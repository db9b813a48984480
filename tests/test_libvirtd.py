"""vnicd on qemu:///system while libvirtd dies and comes back, and while it is not there yet.

vnicd runs as a real process under a NOTIFY_SOCKET the test listens on; the libvirtd is the
test's own (tests/libvirtd.py), so killing it disturbs nobody else on this host.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from tests.conftest import TMP, Nic, vm_xml
from tests.hostenv import PREFIX, kill_qemus, master
from tests.libvirtd import PrivateLibvirtd
from tests.test_service import NotifySocket, launch, stop, wait_for
from vnicd.client import Client, RpcError
from vnicd.errors import GeneralError, Recovering

MARKER = f"vnicd-lv{os.getpid()}"  # in every VM name: QEMUs left behind are found by it


@contextlib.contextmanager
def private_libvirtd() -> Iterator[PrivateLibvirtd]:
    """A libvirtd of this test's own, closed with every VM it ran."""
    daemon = PrivateLibvirtd(Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-lv-", dir=TMP)))
    try:
        daemon.start()
        yield daemon
    finally:
        try:
            daemon.close()
        finally:
            kill_qemus(MARKER)


@pytest.fixture
def libvirtd() -> Iterator[PrivateLibvirtd]:
    with private_libvirtd() as daemon:
        yield daemon


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-lvd-", dir=TMP))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def config(workdir: Path, uri: str, libvirt: str = "") -> Path:
    path = workdir / "vnicd.yml"
    path.write_text(
        f"libvirt: {{uri: '{uri}'{libvirt}}}\nstate_dir: {workdir}\n"
        f"rpc: {{unix_socket: {workdir / 'vnicd.sock'}}}\nunwired_bridge: vt-unwired4\n"
    )
    return path


def call(sock: Path, method: str, **params: object) -> object:
    with Client(sock, timeout=20) as c:
        return c.call(method, **params)


def until(what: str, check: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if callable(check) and check():
                return
        except (RpcError, OSError):
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.1)


def test_libvirtd_killed_and_restarted_while_vnicd_serves(
    libvirtd: PrivateLibvirtd, workdir: Path
) -> None:
    sock = workdir / "vnicd.sock"
    log_path = workdir / "vnicd.log"
    notify = NotifySocket(workdir / "notify.sock")
    log = log_path.open("w")
    proc = launch(
        config(workdir, libvirtd.uri),
        log,
        NOTIFY_SOCKET=str(notify.path),
        WATCHDOG_USEC="600000",
    )
    vm_id = f"5e1f0000-0000-4000-8002-{os.getpid():012x}"
    name = f"{MARKER}-a"
    nic = Nic("vt-a", mac="52:54:00:7f:02:01", tap=f"vl{os.getpid() % 100000}")
    try:
        notify.wait("READY=1")
        call(
            sock,
            "VM.create",
            vmID=vm_id,
            vmParams={"xml": vm_xml(name, vm_id, [nic])},
        )
        before = call(sock, "VM.getInfo", vmID=vm_id)
        assert master(nic.tap) == "vt-a"

        libvirtd.kill()
        wait_for(log_path, "libvirt connection to")
        started = time.monotonic()
        with pytest.raises(RpcError) as e:
            call(sock, "VM.getInfo", vmID=vm_id)
        assert time.monotonic() - started < 5, "an answer, not a hang"
        assert e.value.code == GeneralError.code and "is down" in e.value.message, e.value
        # systemd hears it from the loop's own turn, as a datagram the test reads in a thread
        until(
            "STATUS says reconnecting",
            lambda: any("reconnecting" in line for _, line in notify.lines("STATUS=")),
            5,
        )
        assert master(nic.tap) == "vt-a", "the VM runs on without libvirtd"

        time.sleep(0.5)  # a probe started before the kill may still land
        quiet_from = time.monotonic()
        time.sleep(1.5)
        quiet_to = time.monotonic()
        pings = [t for t, _ in notify.lines("WATCHDOG=1")]
        assert not [t for t in pings if quiet_from < t < quiet_to], "no pings without libvirt"

        libvirtd.start()
        until("vnicd serves again", lambda: call(sock, "VM.getInfo", vmID=vm_id) == before)
        wait_for(log_path, f"reconnected to {libvirtd.uri}")
        assert master(nic.tap) == "vt-a"
        until("watchdog pings resume", lambda: notify.lines("WATCHDOG=1")[-1][0] > quiet_to)

        call(
            sock,
            "VM.updateDevice",
            vmID=vm_id,
            params={"deviceType": "interface", "alias": "net0", "network": "vt-b"},
        )
        assert master(nic.tap) == "vt-b"
        call(sock, "VM.destroy", vmID=vm_id, undefine=True)
        wait_for(log_path, f"VM {vm_id} ({name}): stopped")  # events resumed

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)
        log.close()
        notify.close()


def test_recovering_until_libvirtd_answers(libvirtd: PrivateLibvirtd, workdir: Path) -> None:
    """Started before libvirtd, vnicd answers "recovering" (99), then READY once it connects."""
    sock = workdir / "vnicd.sock"
    notify = NotifySocket(workdir / "notify.sock")
    log = (workdir / "vnicd.log").open("w")
    libvirtd.stop()
    proc = launch(config(workdir, libvirtd.uri), log, NOTIFY_SOCKET=str(notify.path))
    try:
        until("the socket", sock.is_socket, 30)
        for _ in range(3):
            with pytest.raises(RpcError) as e:
                call(sock, "Host.getVMList")
            assert e.value.code == Recovering.code == 99
            time.sleep(0.3)
        assert not notify.lines("READY=1")
        assert any("waiting for libvirt" in line for _, line in notify.lines("STATUS="))

        libvirtd.start()
        notify.wait("READY=1", 60)
        assert call(sock, "Host.getVMList") == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        stop(proc)
        log.close()
        notify.close()


def test_hung_libvirtd_is_noticed_by_keepalive(libvirtd: PrivateLibvirtd, workdir: Path) -> None:
    """libvirtd stopped (SIGSTOP): its socket still accepts, nothing answers. Keepalive drops
    the connection; verbs get the error at once instead of waiting; SIGCONT and vnicd serves
    again, the VM untouched."""
    sock = workdir / "vnicd.sock"
    log_path = workdir / "vnicd.log"
    log = log_path.open("w")
    cfg = config(workdir, libvirtd.uri, ", keepalive_interval: 1, keepalive_count: 2")
    proc = launch(cfg, log)
    vm_id = f"5e1f0000-0000-4000-8004-{os.getpid():012x}"
    name = f"{MARKER}-b"
    nic = Nic("vt-a", mac="52:54:00:7f:04:01", tap=f"vh{os.getpid() % 100000}")
    try:
        until("vnicd ready", lambda: call(sock, "Host.ping2") is True)
        call(
            sock,
            "VM.create",
            vmID=vm_id,
            vmParams={"xml": vm_xml(name, vm_id, [nic])},
        )
        before = call(sock, "VM.getInfo", vmID=vm_id)

        libvirtd.pause(True)
        wait_for(log_path, "lost: libvirtd stopped answering keepalives", timeout=30)
        started = time.monotonic()
        with pytest.raises(RpcError) as e:
            call(sock, "VM.getInfo", vmID=vm_id)
        assert time.monotonic() - started < 5, "an answer, not a hang"
        assert e.value.code == GeneralError.code and "is down" in e.value.message, e.value
        assert master(nic.tap) == "vt-a"

        libvirtd.pause(False)
        until("vnicd serves again", lambda: call(sock, "VM.getInfo", vmID=vm_id) == before)
        assert master(nic.tap) == "vt-a"
        call(sock, "VM.destroy", vmID=vm_id, undefine=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        libvirtd.pause(False)
        stop(proc)
        log.close()


def test_libvirt_network_moved_to_a_bridge_and_back(
    libvirtd: PrivateLibvirtd, workdir: Path
) -> None:
    """A vNIC on a libvirt network (<interface type='network'>), moved live to a host bridge
    and back: same MAC and PCI slot, the tap where the kernel says, the XML's type follows.
    The network is an isolated one with a bridge of its own, which libvirt creates (in the
    test's namespace, as its libvirtd runs there)."""
    net, bridge = f"vnl{os.getpid() % 10000}", f"vtn{os.getpid() % 10000}"
    net_xml = workdir / "net.xml"
    net_xml.write_text(f"<network><name>{net}</name><bridge name='{bridge}' stp='off'/></network>")
    created = libvirtd.virsh("net-create", str(net_xml))
    assert created.returncode == 0, created.stderr
    sock, notify = workdir / "vnicd.sock", NotifySocket(workdir / "notify.sock")
    path = config(workdir, libvirtd.uri)
    path.write_text(path.read_text() + f"networks: {{lab: {{libvirt_network: {net}}}}}\n")
    log = (workdir / "vnicd.log").open("w")
    proc = launch(path, log, NOTIFY_SOCKET=str(notify.path))
    vm_id = f"5e1f0000-0000-4000-8003-{os.getpid():012x}"
    tap, mac = f"vn{os.getpid() % 100000}", "52:54:00:7f:03:01"
    tap2, mac2 = f"vm{os.getpid() % 100000}", "52:54:00:7f:03:02"
    nics = "".join(
        f"<interface type='network'><mac address='{m}'/><source network='{net}'/>"
        f"<target dev='{t}'/><model type='virtio'/></interface>"
        for t, m in ((tap, mac), (tap2, mac2))
    )
    try:
        notify.wait("READY=1")
        vm = vm_xml(f"{MARKER}-net", vm_id, [], nics)
        info: Any = call(sock, "VM.create", vmID=vm_id, vmParams={"xml": vm})
        first, _second = info["nics"]
        assert (first["network"], first["sourceType"], first["bridge"]) == (
            "lab",
            "network",
            bridge,
        )
        assert master(tap) == bridge
        caps: Any = call(sock, "Host.getCapabilities")
        assert {"name": "lab", "type": "network", "bridge": bridge} in caps["networks"]
        # a network with no bridge (macvtap) is no network a vNIC can be wired to here
        macvtap = workdir / "macvtap.xml"
        macvtap.write_text(
            f"<network><name>{net}m</name><forward mode='bridge'>"
            "<interface dev='vt-a'/></forward></network>"
        )
        created = libvirtd.virsh("net-create", str(macvtap))
        assert created.returncode == 0, created.stderr
        names = {n["name"] for n in cast(Any, call(sock, "Host.getCapabilities"))["networks"]}
        assert "lab" in names and f"{net}m" not in names, names
        with pytest.raises(RpcError) as refused:
            params = {"deviceType": "interface", "macAddr": mac, "network": f"{net}m"}
            call(sock, "VM.updateDevice", vmID=vm_id, params=params)
        assert refused.value.data.get("reason") == "noNetwork", refused.value
        assert master(tap) == bridge, "the refused move changed nothing"
        assert f"<source network='{net}'" in libvirtd.virsh("dumpxml", vm_id).stdout

        for network, kind, where in (("vt-b", "bridge", "vt-b"), ("lab", "network", bridge)):
            params = {"deviceType": "interface", "macAddr": mac, "network": network}
            now, _ = cast(Any, call(sock, "VM.updateDevice", vmID=vm_id, params=params))["nics"]
            assert (now["network"], now["sourceType"], now["bridge"]) == (network, kind, where)
            assert master(tap) == where, "the kernel agrees"
            assert (now["macAddr"], now["pciAddress"], now["tap"]) == (
                mac,
                first["pciAddress"],
                tap,
            )
            live = libvirtd.virsh("dumpxml", vm_id).stdout
            assert f"<interface type='{kind}'>" in live
            assert master(tap2) == bridge, "the other vNIC stays"

        # a relink on the libvirt network sends back the port libvirt allocated for it
        for linked in (False, True):
            body: dict[str, Any] = {"deviceType": "interface", "macAddr": mac, "linkActive": linked}
            now, _ = cast(Any, call(sock, "VM.updateDevice", vmID=vm_id, params=body))["nics"]
            assert (now["linkActive"], now["network"], now["bridge"]) == (linked, "lab", bridge)
            assert master(tap) == bridge
            live = libvirtd.virsh("dumpxml", vm_id).stdout
            assert f"<link state='{'up' if linked else 'down'}'/>" in live
        # a bounced move onto it: link down, moved, link up again
        for network, where in (("vt-b", "vt-b"), ("lab", bridge)):
            body = {"deviceType": "interface", "macAddr": mac, "network": network}
            body["linkBounce"] = True
            now, _ = cast(Any, call(sock, "VM.updateDevice", vmID=vm_id, params=body))["nics"]
            assert (now["linkActive"], now["bridge"]) == (True, where) and master(tap) == where

        # both, one after the other in one hold: the second is planned on what libvirt
        # made of the first (a network's port and bridge), and answered as the kernel has it
        for network, kind, where in (("vt-b", "bridge", "vt-b"), ("lab", "network", bridge)):
            done: Any = call(
                sock,
                "Host.bulkUpdateNics",
                match={"vmIDs": [vm_id]},
                change={"network": network},
            )
            assert [r["ok"] for r in done["results"]] == [True, True], done
            for r, t in zip(done["results"], (tap, tap2), strict=True):
                assert (r["nic"]["sourceType"], r["nic"]["bridge"]) == (kind, where), r
                assert master(t) == where
        # a new vNIC's XML naming the libvirt network that vnicd maps under another name
        tap3, mac3 = f"vo{os.getpid() % 100000}", "52:54:00:7f:03:03"
        xml = (
            f"<interface type='network'><mac address='{mac3}'/><source network='{net}'/>"
            f"<target dev='{tap3}'/><model type='virtio'/></interface>"
        )
        plugged: Any = call(sock, "VM.hotplugNic", vmID=vm_id, params={"xml": xml})
        [new] = [n for n in plugged["nics"] if n["macAddr"] == mac3]
        assert (new["network"], new["bridge"]) == ("lab", bridge) and master(tap3) == bridge
        call(sock, "VM.destroy", vmID=vm_id, undefine=True)
    finally:
        stop(proc)
        log.close()
        libvirtd.virsh("destroy", vm_id)
        libvirtd.virsh("net-destroy", net)
