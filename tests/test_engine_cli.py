"""vnic-client over the engine wire, with vdsm-client's options in vdsm-client's order."""

from __future__ import annotations

import json
import logging
import subprocess

from tests import pki
from tests.conftest import Nic, Vms
from tests.evidence import seen
from tests.harness import DaemonThread
from tests.test_cli import CLIENT
from vnicd.caller import CallerFilter


def wire_cli(
    vnicd: DaemonThread, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    certs = pki.at(vnicd.config.engine.ca_file.parent)
    options = [
        "-a",
        "127.0.0.1",
        "-p",
        str(vnicd.config.engine.port),
        "--cert-file",
        str(certs.engine.cert),
        "--key-file",
        str(certs.engine.key),
        "--ca-file",
        str(certs.ca),
        "--timeout",
        "30",
    ]
    return subprocess.run(
        [str(CLIENT), *options, *args], input=stdin, capture_output=True, text=True, timeout=60
    )


def test_file_before_the_namespace_over_the_wire(vnicd: DaemonThread, vms: Vms) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    params = {
        "vmID": vm_id,
        "params": {"deviceType": "interface", "alias": "net0", "linkActive": "false"},
    }
    out = wire_cli(vnicd, "-f", "-", "VM", "updateDevice", stdin=json.dumps(params))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["nics"][0]["linkActive"] is False
    assert not seen(vnicd, vm_id, nic.mac).link_up

    out = wire_cli(vnicd, "Host", "ping2")
    assert out.returncode == 0 and json.loads(out.stdout) is True


def test_short_forms_over_the_wire(vnicd: DaemonThread, vms: Vms) -> None:
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    out = wire_cli(vnicd, "link", vm_id, nic.mac, "down")
    assert out.returncode == 0, out.stderr
    assert not seen(vnicd, vm_id, nic.mac).link_up
    out = wire_cli(vnicd, "wire", vm_id, "net0", "vt-b")
    assert out.returncode == 0, out.stderr
    assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-b"
    out = wire_cli(vnicd, "list")
    assert out.returncode == 0 and vm_id in out.stdout


def test_flow_id_and_errors_over_the_wire(vnicd: DaemonThread, vms: Vms) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(CallerFilter())
    logging.getLogger("vnicd").addHandler(handler)
    try:
        missing = "vmID=00000000-0000-4000-8000-000000000000"
        out = wire_cli(vnicd, "--flow-id", "cli-flow-9", "VM", "getInfo", missing)
    finally:
        logging.getLogger("vnicd").removeHandler(handler)
    assert out.returncode == 1 and "error 1:" in out.stderr
    assert any(getattr(r, "flow_id", "") == "cli-flow-9" for r in records)


def test_refused_without_the_right_certificate(vnicd: DaemonThread) -> None:
    certs = pki.at(vnicd.config.engine.ca_file.parent)
    intruder = ["--cert-file", str(certs.intruder.cert), "--key-file", str(certs.intruder.key)]
    out = wire_cli(vnicd, *intruder, "Host", "ping2")
    assert out.returncode == 1 and "vnic-client:" in out.stderr and out.stdout == ""
    out = wire_cli(vnicd, "--insecure", "Host", "ping2")
    assert out.returncode == 1 and out.stdout == ""


def test_file_after_the_method_still_works_and_flow_id_needs_the_wire(
    vnicd: DaemonThread, vms: Vms
) -> None:
    vm_id = vms.create(Nic("vt-a"))
    sock = ["--socket", str(vnicd.config.unix_socket)]
    run = [str(CLIENT), *sock, "VM", "getInfo", "-f", "-"]
    out = subprocess.run(run, input=json.dumps({"vmID": vm_id}), capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["vmID"] == vm_id
    run = [str(CLIENT), *sock, "--flow-id", "x", "Host", "ping2"]
    out = subprocess.run(run, capture_output=True, text=True)
    assert out.returncode == 1 and "--flow-id needs -a" in out.stderr
