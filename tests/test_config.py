"""Configuration: defaults documented in conf/vnicd.yml, errors that name the key."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from vnicd.config import KEYS, LIVE, Config, ConfigError, changed, load, parse, settings
from vnicd.daemon import Daemon
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
    bad.write_bytes(b"log_level: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(bad)


def test_a_reload_sees_every_setting() -> None:
    """Each setting a config file can hold is compared on reload (a key left out would be
    taken silently and not applied), and only the live ones may change."""
    keyed = set(KEYS) | {"engine"}
    assert keyed == {f.name for f in fields(Config)}, "a Config field without its YAML key"
    base = parse({})
    new = parse(
        {
            "engine": {"enabled": True},
            "link_bounce": {"enabled": True, "seconds": 5},
            "log_level": "DEBUG",
        }
    )
    assert changed(base, new) == {
        "link_bounce.enabled": (False, True),
        "link_bounce.seconds": (2.0, 5.0),
        "log_level": ("INFO", "DEBUG"),
        "engine.enabled": (False, True),
    }
    assert not LIVE - set(settings(base)), "a live key no config file holds"


def test_a_reload_that_cannot_set_the_socket_mode_applies_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The socket gone (a reload while vnicd stops): the new mode cannot be set, so neither
    the log level nor the hooks of the same file are taken."""
    path = tmp_path / "vnicd.yml"
    path.write_text(f"state_dir: {tmp_path}\nrpc: {{unix_socket: {tmp_path / 'gone.sock'}}}\n")
    daemon = Daemon(load(path), path)
    daemon._server = cast(Any, object())  # serving, as far as a reload looks
    path.write_text(
        path.read_text() + "log_level: DEBUG\nhooks: {timeout: 5}\n"
        "rpc: {unix_socket: " + str(tmp_path / "gone.sock") + ", socket_mode: '0660'}\n"
    )
    level = logging.getLogger().level
    with caplog.at_level(logging.INFO, logger="vnicd.daemon"):
        daemon.reload()
    assert "reload refused: rpc.socket_mode cannot be set" in caplog.text
    assert daemon.config.log_level == "INFO" and daemon.hooks.timeout == 30.0
    assert logging.getLogger().level == level and "reload: log_level" not in caplog.text
