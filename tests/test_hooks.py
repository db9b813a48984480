"""Hooks run as real executables: order, rewrite, veto, timeout, failing after_ hooks, env."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from vnicd import errors
from vnicd.hooks import NAMES as HOOK_NAMES
from vnicd.hooks import Hooks, environment

XML = "<interface type='bridge'><mac address='52:54:00:00:00:01'/></interface>"


def script(hooks: Path, name: str, file: str, body: str, mode: int = 0o755) -> Path:
    path = hooks / name / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def run(hooks: Path, name: str, env: dict[str, str] | None = None, timeout: float = 10) -> str:
    return asyncio.run(Hooks(hooks, timeout).run(name, XML, env))


def test_vdsm_names() -> None:
    assert {
        "before_update_device",
        "after_update_device",
        "after_update_device_fail",
        "before_nic_hotplug",
        "after_nic_hotplug",
        "after_nic_hotplug_fail",
        "before_nic_hotunplug",
        "after_nic_hotunplug",
        "after_nic_hotunplug_fail",
    } == HOOK_NAMES


def test_no_hooks_leaves_xml(tmp_path: Path) -> None:
    assert run(tmp_path / "none", "before_update_device") == XML
    script(tmp_path, "before_update_device", "10-not-executable", "exit 2\n", mode=0o644)
    assert run(tmp_path, "before_update_device") == XML


def test_present_names_the_hooks_with_scripts(tmp_path: Path) -> None:
    """One request's look: the hooks asked about that have executables, nothing else."""
    hooks = Hooks(tmp_path, 10)
    assert Hooks(tmp_path / "none", 10).present(HOOK_NAMES) == {}
    first = script(tmp_path, "before_update_device", "10-first", "exit 0\n")
    script(tmp_path, "after_update_device", "10-not-executable", "exit 0\n", mode=0o644)
    other = script(tmp_path, "before_nic_hotplug", "10-other", "exit 0\n")
    asked = ("before_update_device", "after_update_device", "after_update_device_fail")
    assert hooks.present(asked) == {"before_update_device": [first]}
    assert hooks.present(["before_nic_hotplug"]) == {"before_nic_hotplug": [other]}


def test_script_gone_since_it_was_looked_up_vetoes(tmp_path: Path) -> None:
    """A script removed between a request's look and its run fails as a script does: a
    before_ hook vetoes the change, naming it."""
    gone = script(tmp_path, "before_update_device", "10-gone", "exit 0\n")
    scripts = Hooks(tmp_path, 10).present(["before_update_device"])["before_update_device"]
    gone.unlink()
    with pytest.raises(errors.HookError) as e:
        asyncio.run(Hooks(tmp_path, 10).run("before_update_device", XML, None, scripts))
    assert "10-gone" in e.value.message and "could not be started" in e.value.message


def test_rewrite_in_name_order_with_env_and_no_arguments(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    # Written out of order on purpose: the runner sorts by name.
    script(
        tmp_path,
        "before_update_device",
        "20-second",
        f'echo "second $# $vnic_id $(cat "$_hook_domxml")" >> {seen}\n'
        'sed -i "s#</interface>#<second/></interface>#" "$_hook_domxml"\n',
    )
    script(
        tmp_path,
        "before_update_device",
        "10-first",
        f'echo "first $# $_hook_domxml" >> {seen}\n'
        'sed -i "s#</interface>#<first/></interface>#" "$_hook_domxml"\n',
    )
    out = run(tmp_path, "before_update_device", {"vnic-id": "abc", "vmId": "vm-1"})
    assert out == XML.replace("</interface>", "<first/><second/></interface>")
    first, second = seen.read_text().splitlines()
    assert first.startswith("first 0 ")
    assert second.startswith("second 0 abc <interface") and "<first/>" in second
    assert not Path(first.split()[2]).exists(), "the XML file is removed after the run"


def test_veto_stops_the_rest(tmp_path: Path) -> None:
    later = tmp_path / "later-ran"
    script(tmp_path, "before_nic_hotplug", "10-veto", "echo 'not on this bridge' >&2\nexit 2\n")
    script(tmp_path, "before_nic_hotplug", "20-later", f"touch {later}\n")
    with pytest.raises(errors.HookError) as e:
        run(tmp_path, "before_nic_hotplug")
    assert e.value.code == 1500
    assert "before_nic_hotplug/10-veto" in e.value.message
    assert "not on this bridge" in e.value.message
    assert e.value.data()["hook"] == "before_nic_hotplug"
    assert not later.exists()


def test_exit_1_lets_the_rest_run_then_fails(tmp_path: Path) -> None:
    later = tmp_path / "later-ran"
    script(tmp_path, "before_nic_hotunplug", "10-fails", "echo broken >&2\nexit 1\n")
    script(tmp_path, "before_nic_hotunplug", "20-later", f"touch {later}\n")
    with pytest.raises(errors.HookError, match="10-fails failed with exit code 1: broken"):
        run(tmp_path, "before_nic_hotunplug")
    assert later.exists()


def test_failing_after_hook_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    later = tmp_path / "later-ran"
    script(tmp_path, "after_update_device", "10-fails", "echo oops >&2\nexit 2\n")
    script(tmp_path, "after_update_device", "20-later", f"touch {later}\n")
    with caplog.at_level(logging.WARNING, logger="vnicd.hooks"):
        assert run(tmp_path, "after_update_device") == XML
    assert "after_update_device/10-fails failed with exit code 2" in caplog.text
    assert "oops" in caplog.text
    assert not later.exists(), "exit 2 stops the remaining scripts, as in VDSM"


def _sleepers(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if proc.name.isdigit() and marker.encode() in cmd:
            found.append(int(proc.name))
    return found


def test_hung_hook_is_killed_with_its_children(tmp_path: Path) -> None:
    marker = f"{os.getpid()}.4242"  # a sleep no other process runs
    script(tmp_path, "before_update_device", "10-hangs", f"sleep {marker} &\nsleep {marker}\n")
    started = time.monotonic()
    with pytest.raises(errors.HookError, match=r"timed out after 0\.5 s"):
        run(tmp_path, "before_update_device", timeout=0.5)
    assert time.monotonic() - started < 5
    deadline = time.monotonic() + 2
    while _sleepers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _sleepers(marker), "no process of the hook is left"


def test_hung_after_hook_is_killed_not_fatal(tmp_path: Path) -> None:
    script(tmp_path, "after_nic_hotplug_fail", "10-hangs", "sleep 30\n")
    assert run(tmp_path, "after_nic_hotplug_fail", timeout=0.3) == XML


def test_environment_names() -> None:
    assert environment({"vnic-id": "1", "9lives": "x", "ok_NAME": "y"}) == {
        "vnic_id": "1",
        "_9lives": "x",
        "ok_NAME": "y",
    }
    for bad in ("PATH", "LD_PRELOAD", "PYTHONPATH", "_hook_domxml", "BASH_ENV", "IFS"):
        with pytest.raises(errors.InvalidParameter, match=f"custom.{bad}"):
            environment({bad: "x"})
    with pytest.raises(errors.InvalidParameter, match="NUL"):
        environment({"a": "x\0y"})


def test_unknown_hook_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown hook"):
        run(tmp_path, "before_vm_start")
