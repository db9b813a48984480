"""Configuration: defaults documented in conf/vnicd.yml, errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vnicd.config import Config, ConfigError, load, parse
from vnicd.networks import Target

CONF = Path(__file__).resolve().parent.parent / "conf" / "vnicd.yml"


def test_documented_defaults_are_the_defaults() -> None:
    assert load(CONF) == Config() == parse({}) == parse(None)


def test_embedded_uri() -> None:
    cfg = parse({"state_dir": "/srv/v"})
    assert cfg.embedded and cfg.uri == "qemu:///embed?root=/srv/v/libvirt"
    cfg = parse({"libvirt": {"uri": "qemu:///system"}})
    assert not cfg.embedded and cfg.uri == "qemu:///system"


def test_networks() -> None:
    cfg = parse({"networks": {"mgmt": {"bridge": "br0"}, "lab": {"libvirt_network": "default"}}})
    assert cfg.networks == {"mgmt": Target("bridge", "br0"), "lab": Target("network", "default")}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("libvirt: {url: x}", "libvirt.url: unknown key"),
        ("rpc: []", "rpc: expected a mapping"),
        ("rpc: {socket_mode: '999'}", "rpc.socket_mode"),
        ("log_level: LOUD", "log_level: unknown level"),
        ("workers: 0", "workers: must be at least 1"),
        ("workers: true", "workers: expected int"),
        ("unwired_bridge: 'a b'", "unwired_bridge"),
        ("networks: {'bad name': {bridge: x}}", "networks.bad name"),
        ("networks: {lab: {ovs: x}}", "networks.lab.ovs: unknown key"),
        ("networks: {lab: {bridge: x, libvirt_network: y}}", "networks.lab: expected"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        parse(yaml.safe_load(text))


def test_unreadable_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("rpc: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)
