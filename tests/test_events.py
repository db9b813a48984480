"""Events from VM info: only what changed, in VDSM's notification shape; the resync that
feeds them. Pure logic."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any, cast

import pytest

from vnicd.config import Config, EngineConfig
from vnicd.daemon import Daemon
from vnicd.events import Events, devices_hash

VM = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def nic(mac: str = "52:54:00:00:00:01", **fields: Any) -> dict[str, Any]:
    base = {
        "alias": "net0",
        "macAddr": mac,
        "nicModel": "virtio",
        "network": "a",
        "sourceType": "bridge",
        "bridge": "a",
        "linkActive": True,
        "plugged": True,
        "pciAddress": "0000:00:03.0",
        "tap": "t0",
    }
    return {**base, **fields}


def vm(*nics: dict[str, Any], status: str = "Up") -> dict[str, Any]:
    return {"vmID": VM, "vmName": "v", "status": status, "persistent": False, "nics": list(nics)}


class Recorder:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def __call__(self, text: str) -> None:
        self.sent.append(json.loads(text))

    def take(self) -> list[dict[str, Any]]:
        sent, self.sent = self.sent, []
        return sent


def test_first_sight_then_only_changes() -> None:
    out = Recorder()
    events = Events(out, clock=lambda: 12.5)
    events.observe(vm(nic()))
    status, nics = out.take()
    assert status == {
        "jsonrpc": "2.0",
        "method": f"|virt|VM_status|{VM}",
        "params": {VM: {"status": "Up", "hash": devices_hash([nic()])}, "notify_time": 12500},
    }
    assert nics["method"] == f"|vnicd|nic_changed|{VM}"
    assert nics["params"][VM]["nics"][0]["state"] == "plugged-linked"

    events.observe(vm(nic()))
    assert out.take() == []


def test_a_vnic_change_sends_its_view_and_a_new_hash() -> None:
    out = Recorder()
    events = Events(out)
    other = nic("52:54:00:00:00:02", alias="net1")
    events.observe(vm(nic(), other))
    out.take()
    events.observe(vm(nic(linkActive=False, network="b"), other))
    status, nics = out.take()
    assert status["params"][VM]["hash"] != devices_hash([nic(), other])
    assert nics["params"][VM]["nics"] == [
        {
            "macAddr": "52:54:00:00:00:01",
            "alias": "net0",
            "network": "b",
            "linkActive": False,
            "plugged": True,
            "state": "plugged-unlinked",
        }
    ]


def test_unplugged_and_removed() -> None:
    out = Recorder()
    events = Events(out)
    events.observe(vm(nic(), nic("52:54:00:00:00:02")))
    out.take()
    events.observe(vm(nic(plugged=False, linkActive=False, alias="", tap="")))
    _, nics = out.take()
    states = {n["macAddr"]: n["state"] for n in nics["params"][VM]["nics"]}
    assert states == {"52:54:00:00:00:01": "unplugged-unlinked", "52:54:00:00:00:02": "removed"}


def test_status_change_alone() -> None:
    out = Recorder()
    events = Events(out)
    events.observe(vm(nic()))
    out.take()
    events.observe(vm(nic(), status="Paused"))
    [status] = out.take()
    assert status["params"][VM]["status"] == "Paused"


def test_gone_once_and_sync() -> None:
    out = Recorder()
    events = Events(out)
    events.sync([vm(nic())])
    out.take()
    events.sync([])
    [down] = out.take()
    assert down["params"][VM] == {"status": "Down"}
    events.vm_gone(VM)
    assert out.take() == []


def test_hash_ignores_order_and_changes_with_any_field() -> None:
    a, b = nic(), nic("52:54:00:00:00:02", alias="net1")
    assert devices_hash([a, b]) == devices_hash([b, a])
    assert devices_hash([a]) != devices_hash([nic(pciAddress="0000:00:04.0")])
    assert int(devices_hash([a])) != 0


def test_a_resync_failing_for_long_is_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """libvirtd away for minutes: one warning, not one every resync_interval; another for a
    failure of another kind, and a line once the looks work again."""
    daemon = Daemon(Config(state_dir=tmp_path, engine=EngineConfig(resync_interval=0.01)))
    daemon.service = cast(Any, object())  # only looked at for being there
    looks = iter(["down"] * 5 + [""] + ["down", "bug", "bug"])

    async def resync_once() -> None:
        failure = next(looks, "")
        if failure == "down":
            raise ConnectionError("libvirtd is down")
        if failure:
            raise KeyError("vmName")

    monkeypatch.setattr(daemon, "resync_once", resync_once)

    async def scenario() -> None:
        task = asyncio.create_task(daemon._resync())
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.INFO, logger="vnicd.daemon"):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if r.name == "vnicd.daemon"]
    down, again = "resync for events failed: libvirtd is down", "resync for events works again"
    bug = "resync for events failed: 'vmName'"
    assert said == [down, again, down, bug, again], "each new failure told once"
