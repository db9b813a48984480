"""vnic-client, run as a person runs it, against the session's vnicd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CHECKOUT, Nic, Vms
from tests.evidence import interfaces, seen
from tests.harness import DaemonThread
from vnicd.cli import main as cli_main

CLIENT = Path(sys.executable).with_name("vnic-client")


def cli(
    vnicd: DaemonThread, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLIENT), "--socket", str(vnicd.config.unix_socket), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_programs_run_this_checkout() -> None:
    """vnic-client and vnicd, started by the tests, run this checkout's code."""
    for script in (CLIENT, CLIENT.with_name("vnicd")):
        interpreter = script.read_text().splitlines()[0].removeprefix("#!")
        out = subprocess.run(
            [interpreter, "-c", "import vnicd; print(vnicd.__file__)"],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
        )
        assert Path(out.stdout.strip()) == CHECKOUT / "vnicd" / "__init__.py"


def test_short_forms(vnicd: DaemonThread, vms: Vms) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    name = json.loads(cli(vnicd, "--json", "nics", vm_id).stdout)["vmName"]

    out = cli(vnicd, "list")
    assert out.returncode == 0 and vm_id in out.stdout and name in out.stdout

    out = cli(vnicd, "link", name, "net0", "down")
    assert out.returncode == 0, out.stderr
    assert "down" in out.stdout.splitlines()[2]
    assert not seen(vnicd, vm_id, nic.mac).link_up

    out = cli(vnicd, "wire", name, nic.mac, "vt-b")
    assert out.returncode == 0, out.stderr
    after = seen(vnicd, vm_id, nic.mac)
    assert after.kernel_bridge == "vt-b" and not after.link_up

    out = cli(vnicd, "wire", vm_id, "net0", "")
    assert out.returncode == 0 and "(unwired)" in out.stdout
    assert seen(vnicd, vm_id, nic.mac).kernel_bridge == vnicd.config.unwired_bridge

    out = cli(vnicd, "--json", "nics", name)
    assert json.loads(out.stdout)["nics"][0]["network"] == ""

    out = cli(vnicd, "caps")
    assert out.returncode == 0 and "vt-b" in out.stdout


def test_generic_form(vnicd: DaemonThread, vms: Vms) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    params = json.dumps({"deviceType": "interface", "alias": "net0", "network": "vt-c"})
    out = cli(vnicd, "VM", "updateDevice", f"vmID={vm_id}", f"params={params}")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["nics"][0]["bridge"] == "vt-c"
    assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-c"

    request = {
        "vmID": vm_id,
        "params": {"deviceType": "interface", "macAddr": nic.mac, "linkActive": False},
    }
    out = cli(vnicd, "VM", "updateDevice", "-f", "-", stdin=json.dumps(request))
    assert out.returncode == 0, out.stderr
    assert not seen(vnicd, vm_id, nic.mac).link_up

    out = cli(vnicd, "Host", "ping2")
    assert out.returncode == 0 and json.loads(out.stdout) is True


def test_errors_exit_1_with_code(vnicd: DaemonThread, vms: Vms) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    out = cli(vnicd, "wire", vm_id, "net0", "nosuchbr")
    assert out.returncode == 1 and out.stderr.startswith("vnic-client: error 56:")
    assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-a", "the tap did not move"
    out = cli(vnicd, "VM", "getInfo")
    assert out.returncode == 1 and "error 11" in out.stderr and "vmID" in out.stderr
    out = cli(vnicd, "nics", "no-such-vm")
    assert out.returncode == 1 and "no VM named" in out.stderr
    out = cli(vnicd, "VM", "updateDevice", "vmID=x", "params={")
    assert out.returncode == 1 and "params: not valid JSON" in out.stderr


def test_help_comes_from_schema(vnicd: DaemonThread) -> None:
    out = cli(vnicd, "VM", "--help")
    assert out.returncode == 0
    for verb in ("updateDevice", "create", "destroy", "getInfo"):
        assert verb in out.stdout


def test_plug_and_unplug(vnicd: DaemonThread, vms: Vms) -> None:
    """On a VM that is not running, so no guest has to acknowledge the unplug."""
    keep, nic = Nic("vt-a"), Nic("vt-b")
    vm_id = vms.create(keep, nic, persistent=True)
    vnicd.domain(vm_id).destroy()
    out = cli(vnicd, "unplug", vm_id, nic.mac)
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if nic.mac in line)
    assert " no " in row and "vt-b" in row
    assert nic.mac not in interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))

    out = cli(vnicd, "plug", vm_id, nic.mac)
    assert out.returncode == 0, out.stderr
    assert nic.mac in interfaces(str(vnicd.domain(vm_id).XMLDesc(2)))
    out = cli(vnicd, "plug", vm_id, nic.mac)
    assert out.returncode == 1 and "error 49" in out.stderr and "already plugged" in out.stderr


def test_dry_run_shows_a_diff_and_changes_nothing(vnicd: DaemonThread, vms: Vms) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    out = cli(vnicd, "wire", vm_id, "net0", "vt-b", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "nothing was changed" in text and "1. update the vNIC live, tap to vt-b" in text
    assert '-network: "vt-a"' in text and '+network: "vt-b"' in text
    assert "+++ live <interface> after" in text and "vt-b" in text
    out = cli(vnicd, "unplug", vm_id, "net0", "--dry-run")
    assert out.returncode == 0 and "ask the guest to release the vNIC" in out.stdout
    assert "-plugged: true" in out.stdout and "+plugged: false" in out.stdout
    assert seen(vnicd, vm_id, nic.mac) == before


def test_bulk(vnicd: DaemonThread, vms: Vms) -> None:
    nics = [Nic("vt-b") for _ in range(2)]
    vm_ids = [vms.create(nic) for nic in nics]
    out = cli(vnicd, "bulk", "--network", "vt-b", "--link", "down", "--dry-run")
    assert out.returncode == 0 and out.stdout.count("would: update the vNIC live") >= 2
    vm_args = [arg for v in vm_ids for arg in ("--vm", v)]
    out = cli(vnicd, "bulk", "--network", "vt-b", *vm_args, "--to", "vt-a")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("vt-a link up") == 2
    for vm_id, nic in zip(vm_ids, nics, strict=True):
        assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-a"


def test_bulk_on_a_terminal_tells_each_vnic_once_and_fails_if_one_did(
    vnicd: DaemonThread,
    vms: Vms,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a terminal the bulk runs in chunks after a dry run: a VM with a vNIC that can
    change and one that is refused is told once per vNIC, and the exit status says a vNIC
    was not changed (as it does without a terminal)."""
    fine, unwired = Nic("vt-b", link_up=False), Nic(vnicd.config.unwired_bridge, link_up=False)
    vm_id = vms.create(fine, unwired)
    args = ["--socket", str(vnicd.config.unix_socket), "--json", "bulk", "--vm", vm_id]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli_main([*args, "--link", "up"]) == 1
    out = capsys.readouterr()
    results = json.loads(out.out)["results"]
    assert sorted((r["macAddr"], r["ok"]) for r in results) == sorted(
        [(fine.mac, True), (unwired.mac, False)]
    ), results
    assert "1 vNICs not changed" in out.err and "2/2 vNICs" in out.err
    assert seen(vnicd, vm_id, fine.mac).link_up
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert cli_main([*args, "--link", "up"]) == 1, "the same without a terminal"
