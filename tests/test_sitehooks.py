"""Site hooks on real VMs: a before_ hook rewrites or vetoes the change, never the vNIC's
identity; a hook that hangs is killed; a failing after_ hook changes nothing done."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Nic, Vms
from tests.evidence import seen
from tests.harness import DaemonThread, SchemaClient
from vnicd.client import RpcError


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root

    def hook(self, name: str, script: str, file: str = "50_test") -> Path:
        folder = self.root / name
        folder.mkdir(exist_ok=True)
        path = folder / file
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)
        return path


@pytest.fixture
def site(vnicd: DaemonThread) -> Iterator[Site]:
    daemon = vnicd.daemon
    assert daemon is not None
    old = (daemon.hooks.directory, daemon.hooks.timeout)
    with tempfile.TemporaryDirectory(prefix="vnicd-hooks-") as root:
        daemon.hooks.configure(Path(root), 2.0)
        try:
            yield Site(Path(root))
        finally:
            daemon.hooks.configure(*old)


def update(rpc: SchemaClient, vm_id: str, **params: Any) -> Any:
    return rpc.call("VM.updateDevice", vmID=vm_id, params={"deviceType": "interface", **params})


def test_before_hook_rewrites_the_change(site: Site, vms: Vms, vnicd: DaemonThread) -> None:
    site.hook("before_update_device", 'sed -i \'s/state="up"/state="down"/\' "$_hook_domxml"\n')
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    with vnicd.client() as rpc:
        (got,) = update(rpc, vm_id, macAddr=nic.mac, network="vt-b")["nics"]
    assert (got["network"], got["linkActive"]) == ("vt-b", False)
    now = seen(vnicd, vm_id, nic.mac)
    assert (now.kernel_bridge, now.link_up) == ("vt-b", False)


@pytest.mark.parametrize(
    ("script", "problem"),
    [
        ("echo 'no moves today' >&2; exit 2\n", "no moves today"),
        ("sleep 30\n", "timed out"),
        ("sed -i 's/52:54:00/52:54:01/' \"$_hook_domxml\"\n", "identity"),
    ],
    ids=["veto", "hangs", "changes-mac"],
)
def test_before_hook_refusal_changes_nothing(
    site: Site, vms: Vms, vnicd: DaemonThread, script: str, problem: str
) -> None:
    site.hook("before_update_device", script)
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    with vnicd.client() as rpc, pytest.raises(RpcError) as err:
        update(rpc, vm_id, macAddr=nic.mac, network="vt-b", linkActive=False)
    assert err.value.code == 1500 and problem in err.value.message, err.value.message
    assert seen(vnicd, vm_id, nic.mac) == before


def test_custom_properties_are_the_hooks_environment(
    site: Site, vms: Vms, vnicd: DaemonThread
) -> None:
    """ovirt-engine sends a vNIC profile's custom properties with every update and plug,
    for VDSM's hooks: they are the hooks' environment, in fields and in the engine's XML
    metadata alike. A host with no vNIC hook refuses them and changes nothing; one whose
    hooks run at a plug only (as VDSM's own) takes them on an update too."""
    nic = Nic("vt-a", extra="<alias name='ua-7'/>")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    custom = {"vnic_id": "7", "zone": "dmz"}
    with vnicd.client() as rpc:
        with pytest.raises(RpcError) as err:
            update(rpc, vm_id, macAddr=nic.mac, network="vt-b", custom=custom)
        assert err.value.code == 44 and err.value.data["field"] == "params.custom"
        assert "no hook" in err.value.message
        assert seen(vnicd, vm_id, nic.mac) == before

        site.hook("before_nic_hotplug", "exit 0\n")
        update(rpc, vm_id, macAddr=nic.mac, network="vt-b", custom=custom)
        assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-b"
        got = site.root / "env"
        site.hook("after_update_device", f'echo "$vmId $vnic_id $zone" >> {got}\n')
        update(rpc, vm_id, macAddr=nic.mac, network="vt-a", custom=custom)
        update(rpc, vm_id, macAddr=nic.mac, network="vt-b", custom=custom)
        # only the custom properties change (a profile that differs in them only): the
        # update's hooks still see it, as VDSM's do
        update(rpc, vm_id, macAddr=nic.mac, network="vt-b", custom={**custom, "zone": "lan"})
        xml = (
            '<hotplug><devices><interface type="bridge"><model type="virtio"/>'
            f'<link state="up"/><source bridge="vt-a"/><alias name="ua-7"/>'
            f'<mac address="{nic.mac}"/></interface></devices>'
            '<metadata xmlns:ovirt-vm="http://ovirt.org/vm/1.0"><ovirt-vm:vm>'
            '<ovirt-vm:device alias="ua-7"><ovirt-vm:custom><ovirt-vm:vnic_id>8'
            "</ovirt-vm:vnic_id></ovirt-vm:custom></ovirt-vm:device></ovirt-vm:vm>"
            "</metadata></hotplug>"
        )
        update(rpc, vm_id, xml=xml)
    assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-a"
    assert got.read_text().splitlines() == [
        f"{vm_id} 7 dmz",
        f"{vm_id} 7 dmz",
        f"{vm_id} 7 lan",
        f"{vm_id} 8 ",
    ]


def test_failing_after_hook_keeps_the_change(
    site: Site, vms: Vms, vnicd: DaemonThread, caplog: pytest.LogCaptureFixture
) -> None:
    marker = site.root / "after-ran"
    site.hook("after_nic_hotunplug_fail", f'cp "$_hook_domxml" {marker}\n')
    site.hook("after_update_device", "exit 1\n")
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    with caplog.at_level(logging.INFO), vnicd.client() as rpc:
        update(rpc, vm_id, macAddr=nic.mac, network="vt-b")
        assert seen(vnicd, vm_id, nic.mac).kernel_bridge == "vt-b"
        with pytest.raises(RpcError) as err:
            rpc.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": nic.mac})
        assert err.value.data["cause"] == "timeout"
    assert nic.mac in marker.read_text(), "after_nic_hotunplug_fail saw the device"
    audits = [r.getMessage() for r in caplog.records if r.name == "vnicd.audit"]
    assert any(
        vm_id in line and "network=vt-a" in line and "network=vt-b" in line for line in audits
    ), audits


def test_a_change_runs_the_hooks_found_when_it_started(
    site: Site, vms: Vms, vnicd: DaemonThread
) -> None:
    """A change looks its hooks up once, when it starts: an after_ hook that its own
    before_ hook puts in place runs from the next change on, not for this one."""
    ran = site.root / "ran"
    later = site.root / "later"
    later.write_text(f"#!/bin/sh\necho after >> {ran}\n")
    later.chmod(0o755)
    after = site.root / "after_update_device"
    site.hook("before_update_device", f"mkdir -p {after} && cp -p {later} {after}/50_test\n")
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    with vnicd.client() as rpc:
        update(rpc, vm_id, macAddr=nic.mac, linkActive=False)
        assert not seen(vnicd, vm_id, nic.mac).link_up
        assert not ran.exists(), "the after_ hook came after the change started"
        update(rpc, vm_id, macAddr=nic.mac, linkActive=True)
    assert seen(vnicd, vm_id, nic.mac).link_up
    assert ran.read_text() == "after\n"


def test_bulk_pairs_each_vnics_hooks(site: Site, vms: Vms, vnicd: DaemonThread) -> None:
    """A bulk change of a VM's vNICs runs each vNIC's hooks as a change of its own: its
    before_ hook, its change, its after_ hook, then the next vNIC's."""
    order = site.root / "order"
    for name in ("before_update_device", "after_update_device"):
        mac = "$(grep -o -m1 '52:54:[0-9a-f:]*' \"$_hook_domxml\")"
        site.hook(name, f'echo "{name.split("_")[0]} {mac}" >> {order}\n')
    a, b = Nic("vt-a"), Nic("vt-a")
    vm_id = vms.create(a, b)
    with vnicd.client() as rpc:
        results = rpc.call(
            "Host.bulkUpdateNics", match={"vmIDs": [vm_id]}, change={"linkActive": False}
        )["results"]
    assert [r["ok"] for r in results] == [True, True], results
    assert not seen(vnicd, vm_id, a.mac).link_up and not seen(vnicd, vm_id, b.mac).link_up
    assert order.read_text().splitlines() == [
        f"{when} {mac}" for mac in (a.mac, b.mac) for when in ("before", "after")
    ]


def test_hook_leaving_out_what_libvirt_fills_in(site: Site, vms: Vms, vnicd: DaemonThread) -> None:
    """A before_ hook that drops the tap name and alias: libvirt keeps the device's own, and
    the answer says so (it is read back), as the kernel does."""
    site.hook(
        "before_update_device", "sed -i 's#<target[^>]*/>##; s#<alias[^>]*/>##' \"$_hook_domxml\"\n"
    )
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    before = seen(vnicd, vm_id, nic.mac)
    with vnicd.client() as rpc:
        (got,) = update(rpc, vm_id, macAddr=nic.mac, network="vt-b")["nics"]
    now = seen(vnicd, vm_id, nic.mac)
    assert (now.tap, now.alias, now.kernel_bridge) == (before.tap, before.alias, "vt-b")
    assert (got["tap"], got["alias"], got["bridge"]) == (before.tap, before.alias, "vt-b")
