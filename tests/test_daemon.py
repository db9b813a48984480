"""The real vnicd process: config errors, readiness, clean stop, and VMs that outlive it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import faults
from tests.conftest import TMP, Nic, Vms, vm_xml
from tests.evidence import seen
from tests.harness import DaemonThread, SchemaClient
from tests.hostenv import PREFIX, kill_qemus, master
from vnicd.client import Client, RpcError
from vnicd.errors import Recovering

VNICD = Path(sys.executable).with_name("vnicd")


@pytest.fixture
def state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-proc-", dir=TMP))
    try:
        yield path
    finally:
        kill_qemus(str(path))
        shutil.rmtree(path, ignore_errors=True)


def start(config: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(VNICD), "--config", str(config)], stderr=subprocess.PIPE, text=True
    )
    return proc


def wait_ready(proc: subprocess.Popen[str], sock: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        if sock.is_socket():
            try:
                with SchemaClient(sock) as c:
                    c.call("Host.ping2")
                return
            except RpcError as e:  # the socket answers "recovering" until vnicd is ready
                assert e.code == Recovering.code, e
            except (ConnectionRefusedError, FileNotFoundError):
                pass  # a socket a killed vnicd left behind, not yet replaced
        time.sleep(0.05)
    raise AssertionError("vnicd did not become ready")


def stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_invalid_config_names_the_key(state: Path) -> None:
    for text, key in (
        ("rpc: {unix_sockets: /x}\n", "rpc.unix_sockets: unknown key"),
        ("workers: many\n", "workers: expected int"),
        ("networks: {lab: {bridge: 'a b'}}\n", "networks.lab.bridge"),
        ("state_dir: relative\n", "state_dir: must be an absolute path"),
        ("rpc: {socket_mode: '0666'}\n", "rpc.socket_mode: 0666 gives others access"),
    ):
        (state / "bad.yml").write_text(text)
        proc = subprocess.run(
            [str(VNICD), "--config", str(state / "bad.yml")], capture_output=True, text=True
        )
        assert proc.returncode == 2 and key in proc.stderr, (text, proc.stderr)


def test_serves_stops_and_picks_up_running_vms(state: Path, vnicd: DaemonThread) -> None:
    """The vnicd process, on the session's driver: its own embedded root, or the session's
    libvirtd by its plain ``qemu:///system`` URI."""
    sock = state / "vnicd.sock"
    config = state / "vnicd.yml"
    libvirtd = vnicd.libvirtd
    config.write_text(
        f"state_dir: {state}\nrpc: {{unix_socket: {sock}}}\nunwired_bridge: vt-unwired2\n"
        + (f"libvirt: {{uri: '{libvirtd.uri}'}}\n" if libvirtd else "")
    )
    vm_id = f"5e1f0000-0000-4000-8000-{os.getpid():012x}"
    nic = Nic("vt-a", mac="52:54:00:7f:00:01", tap=f"vp{os.getpid() % 100000}")
    proc = start(config)
    try:
        wait_ready(proc, sock)
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert (state / "libvirt" / "etc" / "qemu.conf").is_file() == (libvirtd is None)
        with SchemaClient(sock) as c:
            c.call("VM.create", vmID=vm_id, vmParams={"xml": vm_xml("proc-vm", vm_id, [nic])})
        stop(proc)
        assert not sock.exists()
        assert master(nic.tap) == "vt-a", "the VM must outlive vnicd"

        proc = start(config)
        wait_ready(proc, sock)
        with SchemaClient(sock) as c:
            assert [v["vmID"] for v in c.call("Host.getVMList")] == [vm_id]
            c.call(
                "VM.updateDevice",
                vmID=vm_id,
                params={"deviceType": "interface", "alias": "net0", "network": "vt-b"},
            )
            assert master(nic.tap) == "vt-b"
            c.call("VM.destroy", vmID=vm_id, undefine=True)
        assert "found 1 VMs: proc-vm" in stop(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if libvirtd is not None:
            libvirtd.virsh("destroy", vm_id)


def test_inprocess_restart_keeps_vms(vnicd: DaemonThread) -> None:
    """vnicd restarted while a VM runs and a client idles: stopping closes the client's
    connection itself (whatever the interpreter's Server.wait_closed does), and the new
    vnicd finds the VM and can still rewire it."""
    vms = Vms(vnicd)
    try:
        nic = Nic("vt-a")
        vm_id = vms.create(nic)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as idle:
            idle.settimeout(30)
            idle.connect(str(vnicd.config.unix_socket))
            vnicd.restart()
            try:
                left = idle.recv(1)
            except ConnectionResetError:
                left = b""
            assert left == b"", "the idle connection was left open"
        with vnicd.client() as c:
            info = c.call("VM.getInfo", vmID=vm_id)
            assert info["status"] == "Up" and info["nics"][0]["bridge"] == "vt-a"
            c.call(
                "VM.updateDevice",
                vmID=vm_id,
                params={"deviceType": "interface", "alias": "net0", "network": "vt-b"},
            )
        assert master(nic.tap) == "vt-b"
    finally:
        vms.cleanup()


def test_one_vnicd_per_state_dir(vnicd: DaemonThread, state: Path) -> None:
    """A second vnicd on the session's state directory refuses to start and changes nothing."""
    config = state / "second.yml"
    sock = state / "second.sock"
    config.write_text(f"state_dir: {vnicd.config.state_dir}\nrpc: {{unix_socket: {sock}}}\n")
    proc = subprocess.run(
        [str(VNICD), "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "another vnicd is running" in proc.stderr
    assert not sock.exists()
    with vnicd.client() as c:
        c.call("Host.ping2")


@pytest.mark.parametrize("change", ["bounced move", "unplug", "bulk"])
def test_stop_ends_the_waits_of_calls_still_running(
    vnicd: DaemonThread, vms: Vms, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A stop whose wait for the calls in flight runs out ends what they wait for, a
    bounce's pause or a guest's answer (this guest never gives one): each change ends as
    it would once its wait is over, before the workers go, and its caller is answered. A
    bulk change begins no more vNICs."""
    nic, other = Nic("vt-a"), Nic("vt-a")
    vm_id = vms.create(nic, other)
    assert vnicd.daemon is not None and vnicd.service is not None
    monkeypatch.setattr(vnicd.daemon, "STOP_TIMEOUT", 0.3)
    monkeypatch.setattr(vnicd.service, "_bounce_seconds", 30.0)
    monkeypatch.setattr(vnicd.service, "_unplug_timeout", 30.0)
    waiting = vnicd.service.waiting
    move = {"deviceType": "interface", "macAddr": nic.mac, "network": "vt-b", "linkBounce": True}
    calls: dict[str, tuple[str, dict[str, Any]]] = {
        "bounced move": ("VM.updateDevice", {"vmID": vm_id, "params": move}),
        "unplug": ("VM.hotunplugNic", {"vmID": vm_id, "params": {"macAddr": nic.mac}}),
        "bulk": (
            "Host.bulkUpdateNics",
            {"match": {"vmIDs": [vm_id]}, "change": {"network": "vt-b", "linkBounce": True}},
        ),
    }
    method, params = calls[change]
    found: list[tuple[str, Any]] = []

    def call() -> None:
        try:
            with Client(vnicd.config.unix_socket, timeout=60) as c:
                found.append(("ok", c.call(method, **params)))
        except RpcError as e:
            found.append(("error", e))

    caller = threading.Thread(target=call)
    caller.start()
    if change == "unplug":
        faults.until("the guest asked", lambda: bool(waiting._waiting), 10)
    else:
        faults.until("the move in its pause", lambda: master(nic.tap) == "vt-b", 10)
    started = time.monotonic()
    try:
        vnicd.stop()
        took = time.monotonic() - started
        caller.join(10)
    finally:
        vnicd.start()
    assert took < 5, f"the stop took {took:.1f} s"
    ((outcome, answer),) = found
    got = seen(vnicd, vm_id, nic.mac)
    with vnicd.client() as rpc:
        infos = {i["macAddr"]: i for i in rpc.call("VM.getInfo", vmID=vm_id)["nics"]}
    info = infos[nic.mac]
    if change == "unplug":  # asked already: it stays plugged, pending the guest's late answer
        assert outcome == "error" and answer.code == 50, answer
        assert "vnicd is stopping" in answer.message and "stays plugged" in answer.message
        assert (got.link_up, got.kernel_bridge) == (True, "vt-a")
        assert (info["plugged"], info["bridge"]) == (True, "vt-a")
        assert 'pending="yes"' in vnicd.live_xml(vm_id)
        return
    assert outcome == "ok", answer  # the move carried to its end: link up, on the new bridge
    assert (got.link_up, got.kernel_bridge) == (True, "vt-b")
    assert (info["linkActive"], info["bridge"], info["plugged"]) == (True, "vt-b", True)
    if change == "bulk":  # the second vNIC not begun
        first, second = sorted(answer["results"], key=lambda r: r["macAddr"] != nic.mac)
        assert first["ok"] and first["nic"]["bridge"] == "vt-b", first
        assert not second["ok"] and "vnicd is stopping" in second["error"]["message"], second
        assert seen(vnicd, vm_id, other.mac).kernel_bridge == "vt-a"
        assert (infos[other.mac]["linkActive"], infos[other.mac]["bridge"]) == (True, "vt-a")
