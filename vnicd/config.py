"""vnicd's configuration: YAML, validated at start with errors that name the bad key.

The defaults live here and only here; ``conf/vnicd.yml`` documents them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vnicd import names
from vnicd.hypervisor import embed_uri
from vnicd.networks import Target

DEFAULT_PATH = Path("/etc/vnicd/vnicd.yml")

# key -> (type, default); nested sections are dicts of the same.
_SCHEMA: dict[str, Any] = {
    "libvirt": {
        "uri": (str, ""),
        "persistent_updates": (bool, True),
        "keepalive_interval": (int, 5),
        "keepalive_count": (int, 3),
    },
    "rpc": {
        "unix_socket": (str, "/run/vnicd/vnicd.sock"),
        "socket_mode": (str, "0600"),
    },
    "engine": {
        "enabled": (bool, False),
        "address": (str, ""),
        "port": (int, 54321),
        "tls": (bool, True),
        "cert_file": (str, "/etc/pki/vnicd/certs/vnicdcert.pem"),
        "key_file": (str, "/etc/pki/vnicd/keys/vnicdkey.pem"),
        "ca_file": (str, "/etc/pki/vnicd/certs/cacert.pem"),
        "resync_interval": (float, 2.0),
    },
    "state_dir": (str, "/var/lib/vnicd"),
    "log_level": (str, "INFO"),
    "workers": (int, 16),
    "unplug_timeout": (float, 30.0),
    "unwired_bridge": (str, "vnicd-unwired"),
    "link_bounce": {
        "enabled": (bool, False),
        "seconds": (float, 2.0),
    },
    "networks": (dict, {}),
    "hooks": {
        "dir": (str, "/etc/vnicd/hooks"),
        "timeout": (float, 30.0),
    },
}


# Config field -> its YAML key, for messages that name a key (the engine's: engine.<field>).
KEYS = {
    "libvirt_uri": "libvirt.uri",
    "persistent_updates": "libvirt.persistent_updates",
    "keepalive_interval": "libvirt.keepalive_interval",
    "keepalive_count": "libvirt.keepalive_count",
    "unix_socket": "rpc.unix_socket",
    "socket_mode": "rpc.socket_mode",
    "state_dir": "state_dir",
    "log_level": "log_level",
    "workers": "workers",
    "unplug_timeout": "unplug_timeout",
    "unwired_bridge": "unwired_bridge",
    "link_bounce": "link_bounce.enabled",
    "link_bounce_seconds": "link_bounce.seconds",
    "networks": "networks",
    "hooks_dir": "hooks.dir",
    "hooks_timeout": "hooks.timeout",
}
# Keys a running vnicd applies on reload (SIGHUP); a change to any other needs a restart.
LIVE = frozenset({"log_level", "rpc.socket_mode", "hooks.dir", "hooks.timeout"})


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass(frozen=True)
class EngineConfig:
    """The engine's wire: JSON-RPC over STOMP on TCP, mutual TLS unless ``tls`` is false."""

    enabled: bool = False
    address: str = ""  # "": every address
    port: int = 54321
    tls: bool = True
    cert_file: Path = Path("/etc/pki/vnicd/certs/vnicdcert.pem")
    key_file: Path = Path("/etc/pki/vnicd/keys/vnicdkey.pem")
    ca_file: Path = Path("/etc/pki/vnicd/certs/cacert.pem")
    resync_interval: float = 2.0  # seconds between looks at every VM, for events


@dataclass(frozen=True)
class Config:
    libvirt_uri: str = ""
    persistent_updates: bool = True
    keepalive_interval: int = 5
    keepalive_count: int = 3
    unix_socket: Path = Path("/run/vnicd/vnicd.sock")
    socket_mode: int = 0o600
    state_dir: Path = Path("/var/lib/vnicd")
    log_level: str = "INFO"
    workers: int = 16
    unplug_timeout: float = 30.0
    unwired_bridge: str = "vnicd-unwired"
    link_bounce: bool = False
    link_bounce_seconds: float = 2.0
    networks: dict[str, Target] = field(default_factory=dict)
    hooks_dir: Path = Path("/etc/vnicd/hooks")
    hooks_timeout: float = 30.0
    engine: EngineConfig = field(default_factory=lambda: EngineConfig())

    @property
    def uri(self) -> str:
        return self.libvirt_uri or embed_uri(self.embed_root)

    @property
    def embed_root(self) -> Path:
        return self.state_dir / "libvirt"

    @property
    def embedded(self) -> bool:
        return not self.libvirt_uri


def _flatten(schema: dict[str, Any], data: Any, prefix: str) -> dict[str, Any]:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    for key in data:
        if key not in schema:
            raise ConfigError(f"{prefix}{key}: unknown key")
    values: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, dict):
            values.update(_flatten(spec, data.get(key), f"{prefix}{key}."))
            continue
        kind, default = spec
        value = data.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{prefix}{key}: expected {kind.__name__}, got {value!r}")
        values[prefix + key] = value
    return values


def _networks(data: dict[str, Any]) -> dict[str, Target]:
    targets: dict[str, Target] = {}
    for name, spec in data.items():
        key = f"networks.{name}"
        if not isinstance(name, str) or not names.is_ifname(name):
            raise ConfigError(f"{key}: not a valid network name")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"{key}: expected {{bridge: NAME}} or {{libvirt_network: NAME}}")
        ((kind, target),) = spec.items()
        if kind not in ("bridge", "libvirt_network"):
            raise ConfigError(f"{key}.{kind}: unknown key (bridge or libvirt_network)")
        if not isinstance(target, str) or not names.is_ifname(target):
            raise ConfigError(f"{key}.{kind}: {target!r} is not a valid name")
        targets[name] = Target("bridge" if kind == "bridge" else "network", target)
    return targets


def parse(data: Any) -> Config:
    v = _flatten(_SCHEMA, data, "")
    try:
        mode = int(v["rpc.socket_mode"], 8)
    except ValueError:
        raise ConfigError(
            f"rpc.socket_mode: {v['rpc.socket_mode']!r} is not an octal mode"
        ) from None
    if mode & 0o007:
        raise ConfigError(f"rpc.socket_mode: {v['rpc.socket_mode']} gives others access to vnicd")
    if v["log_level"].upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"log_level: unknown level {v['log_level']!r}")
    if v["unplug_timeout"] <= 0:
        raise ConfigError("unplug_timeout: must be positive")
    if not 0 < v["link_bounce.seconds"] <= 60:
        raise ConfigError("link_bounce.seconds: must be more than 0 and at most 60")
    if v["workers"] < 1:
        raise ConfigError("workers: must be at least 1")
    if not names.is_ifname(v["unwired_bridge"]):
        raise ConfigError(f"unwired_bridge: {v['unwired_bridge']!r} is not a valid bridge name")
    for key in ("libvirt.keepalive_interval", "libvirt.keepalive_count"):
        if v[key] < 1:
            raise ConfigError(f"{key}: must be at least 1")
    if v["hooks.timeout"] <= 0:
        raise ConfigError("hooks.timeout: must be positive")
    if not 0 < v["engine.port"] < 65536:
        raise ConfigError(f"engine.port: {v['engine.port']} is not a TCP port")
    if v["engine.resync_interval"] <= 0:
        raise ConfigError("engine.resync_interval: must be positive")
    for key in (
        "rpc.unix_socket",
        "state_dir",
        "hooks.dir",
        *(f"engine.{k}_file" for k in ("cert", "key", "ca")),
    ):
        if not Path(v[key]).is_absolute():
            raise ConfigError(f"{key}: must be an absolute path")
    return Config(
        libvirt_uri=v["libvirt.uri"],
        persistent_updates=v["libvirt.persistent_updates"],
        keepalive_interval=v["libvirt.keepalive_interval"],
        keepalive_count=v["libvirt.keepalive_count"],
        unix_socket=Path(v["rpc.unix_socket"]),
        socket_mode=mode,
        state_dir=Path(v["state_dir"]),
        log_level=v["log_level"].upper(),
        workers=v["workers"],
        unplug_timeout=v["unplug_timeout"],
        unwired_bridge=v["unwired_bridge"],
        link_bounce=v["link_bounce.enabled"],
        link_bounce_seconds=v["link_bounce.seconds"],
        networks=_networks(v["networks"]),
        hooks_dir=Path(v["hooks.dir"]),
        hooks_timeout=v["hooks.timeout"],
        engine=EngineConfig(
            enabled=v["engine.enabled"],
            address=v["engine.address"],
            port=v["engine.port"],
            tls=v["engine.tls"],
            cert_file=Path(v["engine.cert_file"]),
            key_file=Path(v["engine.key_file"]),
            ca_file=Path(v["engine.ca_file"]),
            resync_interval=v["engine.resync_interval"],
        ),
    )


def settings(config: Config) -> dict[str, Any]:
    """Every setting of ``config`` by its YAML key, the engine's included."""
    found = {key: getattr(config, f) for f, key in KEYS.items()}
    engine = config.engine
    found.update({f"engine.{f.name}": getattr(engine, f.name) for f in fields(engine)})
    return found


def changed(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The settings whose values differ, by YAML key: (old value, new value)."""
    before, after = settings(old), settings(new)
    return {k: (v, after[k]) for k, v in before.items() if v != after[k]}


def load(path: Path) -> Config:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    try:
        return parse(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
