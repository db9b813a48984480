"""vNIC-profile fields as ovirt-engine sends them, and the decision about the ones vnicd lacks.

The engine's vdsbroker (``VmInfoBuildUtils.addProfileDataToNic``, ``addQosForDevice``,
``addNetworkFiltersToNic``) puts QoS in ``specParams.inbound``/``outbound``, port
mirroring, a network filter and custom properties next to the fields vnicd acts on. vnicd
does none of these yet: an empty value asks for nothing and is accepted; a value that asks
for something is refused with ``noimpl`` (44) before anything changes. Engines with
cluster level < 4.2 sent a hot(un)plugged vNIC as ``params.nic``; it is unwrapped here.
Pure: takes validated params, returns them or raises.
"""

from __future__ import annotations

from typing import Any

from vnicd.errors import NotImplementedFeature

Params = dict[str, Any]
# Fields that describe the device rather than ask for a change.
_DESCRIPTIVE = ("type", "device", "address", "deviceId", "specParams")
_PROFILE = ("specParams", "portMirroring", "filter", "filterParameters", "custom")


def device_params(params: Params, *, plugging: bool = True) -> Params:
    """The device fields of a vNIC request, engine-only fields checked and dropped.

    ``plugging`` is false for an unplug: there the profile fields only describe the
    vNIC that goes away, and ask for nothing.
    """
    dev = dict(params)
    prefix = "params."
    if "nic" in dev:
        nic = dev.pop("nic")
        prefix = "params.nic."
        dev = {**nic, **dev}
    if plugging:
        refuse_unsupported(dev, prefix)
    return {k: v for k, v in dev.items() if k not in _PROFILE and k not in _DESCRIPTIVE}


def refuse_unsupported(dev: Params, prefix: str = "params.") -> None:
    """Raise NotImplementedFeature for the first profile feature that asks for something."""
    spec = dev.get("specParams") or {}
    for direction in ("inbound", "outbound"):
        if spec.get(direction):
            raise NotImplementedFeature(f"{prefix}specParams.{direction}", "network QoS")
    if dev.get("portMirroring"):
        raise NotImplementedFeature(f"{prefix}portMirroring", "port mirroring")
    if dev.get("filter"):
        raise NotImplementedFeature(f"{prefix}filter", f"network filter {dev['filter']!r}")
    if dev.get("filterParameters"):
        raise NotImplementedFeature(f"{prefix}filterParameters", "network filter parameters")
    if dev.get("custom"):
        raise NotImplementedFeature(f"{prefix}custom", f"custom properties {sorted(dev['custom'])}")
