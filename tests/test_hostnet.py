"""hostnet over netlink, checked against iproute2's view of this session's namespace."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.hostenv import ip, link
from tests.hostenv import master as ip_master
from vnicd import hostnet

TAG = f"hn{os.getpid() % 10000}"


@pytest.fixture
def devices() -> Iterator[list[str]]:
    """Names of devices a test creates; each is deleted afterwards."""
    made: list[str] = []
    try:
        yield made
    finally:
        for name in made:
            subprocess.run(["ip", "link", "del", "dev", name], check=False, capture_output=True)


def tap(devices: list[str], name: str) -> str:
    ip("tuntap", "add", "dev", name, "mode", "tap")
    devices.append(name)
    return name


def up(name: str) -> bool:
    info = link(name)
    assert info is not None
    flags = info["flags"]
    assert isinstance(flags, list)
    return "UP" in flags


def test_isolated_bridge_is_created_down_and_kept_down(devices: list[str]) -> None:
    name = f"{TAG}-iso"
    devices.append(name)
    hostnet.ensure_isolated_bridge(name)
    assert hostnet.is_bridge(name)
    assert not up(name)
    ip("link", "set", "dev", name, "up")
    hostnet.ensure_isolated_bridge(name)
    assert not up(name), "a bridge found up is put down"
    assert name in hostnet.bridges()


def test_reads_match_iproute2(devices: list[str]) -> None:
    t = tap(devices, f"{TAG}-t1")
    assert hostnet.master(t) is None
    hostnet.set_master(t, "vt-a")
    assert ip_master(t) == "vt-a"
    assert hostnet.master(t) == "vt-a"
    assert hostnet.link(t) == {
        "ifname": t,
        "ifindex": link(t)["ifindex"],  # type: ignore[index]
        "master": "vt-a",
        "linkinfo": {"info_kind": "tun"},
    }
    assert hostnet.is_bridge("vt-b") and not hostnet.is_bridge(t)
    kernel = json.loads(ip("-j", "link", "show"))
    bridges = json.loads(ip("-j", "link", "show", "type", "bridge"))
    names = {d["ifname"] for d in bridges}
    assert t in hostnet.masters()
    assert hostnet.masters() == {
        d["ifname"]: d["master"] for d in kernel if d.get("master") in names
    }
    assert hostnet.bridges() == sorted(names)


def test_port_isolation_matches_iproute2(devices: list[str]) -> None:
    """A port's isolation, read and set over netlink, as ``ip -d link`` shows it; a tap
    moved to another bridge gets a new port, isolated only when asked."""
    t = tap(devices, f"{TAG}-t4")

    def isolated() -> bool:
        data = json.loads(ip("-j", "-d", "link", "show", "dev", t))[0]
        return bool(data["linkinfo"]["info_slave_data"]["isolated"])

    assert hostnet.bridge_port(t) == (None, False)
    hostnet.set_master(t, "vt-a", isolated=True)
    assert hostnet.bridge_port(t) == ("vt-a", True) and isolated()
    hostnet.set_isolated(t, False)
    assert hostnet.bridge_port(t) == ("vt-a", False) and not isolated()
    hostnet.set_isolated(t, True)
    hostnet.set_master(t, "vt-b")
    assert hostnet.bridge_port(t) == ("vt-b", False) and not isolated()
    hostnet.set_master(t, "vt-a", isolated=True)
    assert hostnet.bridge_port(t) == ("vt-a", True) and isolated()
    assert hostnet.master(t) == "vt-a"


def test_missing_devices() -> None:
    assert hostnet.link("nosuch0") is None
    assert hostnet.bridge_port("nosuch0") == (None, False)
    assert hostnet.master("nosuch0") is None
    assert not hostnet.is_bridge("nosuch0")
    with pytest.raises(hostnet.HostNetError) as e:
        hostnet.set_master("nosuch0", "vt-a")
    assert e.value.code == errno.ENODEV


def test_refusals_change_nothing(devices: list[str]) -> None:
    t = tap(devices, f"{TAG}-t2")
    hostnet.set_master(t, "vt-a")
    with pytest.raises(hostnet.HostNetError, match="no device nosuch0"):
        hostnet.set_master(t, "nosuch0")
    other = tap(devices, f"{TAG}-t3")
    with pytest.raises(hostnet.HostNetError, match="is not a bridge"):
        hostnet.set_master(t, other)  # the kernel would release t first, then fail
    assert ip_master(t) == "vt-a"
    with pytest.raises(hostnet.HostNetError, match="is not a bridge"):
        hostnet.ensure_isolated_bridge(other)
    assert link(other) is not None


def test_parallel_threads(devices: list[str]) -> None:
    """Worker threads moving and reading taps at once each see their own answers."""
    taps = [tap(devices, f"{TAG}-p{i}") for i in range(8)]

    def shuttle(dev: str) -> list[str | None]:
        seen = []
        for i in range(20):
            bridge = ("vt-a", "vt-b")[i % 2]
            hostnet.set_master(dev, bridge)
            seen.append(hostnet.master(dev))
            assert hostnet.is_bridge(bridge)
        return seen

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(shuttle, taps))
    for dev, seen in zip(taps, results, strict=True):
        assert seen == ["vt-a", "vt-b"] * 10
        assert ip_master(dev) == "vt-b"


def test_listing_spans_many_datagrams(devices: list[str]) -> None:
    """A host with many taps: the kernel splits the listing; every device is read."""
    for i in range(80):
        hostnet.set_master(tap(devices, f"{TAG}-m{i}"), "vt-c")
    kernel = json.loads(ip("-j", "link", "show"))
    bridges = {d["ifname"] for d in json.loads(ip("-j", "link", "show", "type", "bridge"))}
    expected = {d["ifname"]: d["master"] for d in kernel if d.get("master") in bridges}
    assert len(expected) >= 80
    assert hostnet.masters() == expected
