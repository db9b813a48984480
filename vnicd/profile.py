"""vNIC requests as ovirt-engine sends them, and the decision about what vnicd lacks.

The engine's vdsbroker sends a vNIC in one of three shapes: since cluster level 4.2 as
libvirt XML (``params.xml``: ``<hotplug>``/``<hotunplug>`` built by
LibvirtVmXmlBuilder.writeInterface); before that as fields (``UpdateVmInterfaceVDSCommand``,
``VmInfoBuildUtils.addProfileDataToNic``/``addQosForDevice``/``addNetworkFiltersToNic``)
with QoS in ``specParams.inbound``/``outbound``, port mirroring, a network filter and
custom properties next to the fields vnicd acts on, hot(un)plugged vNICs wrapped in
``params.nic``. The parts an ``<interface>`` carries (filter, QoS, port isolation,
teaming), and the filter and QoS fields, go to the core as ``profile``: the engine sends
them with every request, and the core sets a network filter or port isolation that
differs and holds the other parts against the vNIC's own. Custom properties go along
for the hooks (VDSM's use of them); port mirroring that asks for something is refused
with ``noimpl`` (44) before anything changes. Pure: validated params in, the fields
vnicd acts on out (and, for a plug, the result with the ``devices`` the engine reads).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from vnicd import names
from vnicd.domxml import EngineDevice, XMLError, engine_device, fields_profile
from vnicd.errors import InvalidParameter, NotImplementedFeature
from vnicd.hooks import environment

log = logging.getLogger(__name__)
Params = dict[str, Any]
Action = Literal["update", "plug", "unplug"]
UNWIRED_BRIDGE = ";vdsmdummy;"  # the engine's bridge for a vNIC without a network
# Fields that describe the device rather than ask for a change.
_DESCRIPTIVE = ("type", "device", "address", "deviceId")
_PROFILE = ("specParams", "portMirroring", "filter", "filterParameters")
_PROFILE_FIELDS = ("filter", "filterParameters", "specParams")  # what an XML carries itself


def device_params(params: Params, action: Action) -> Params:
    """The device fields of a vNIC request, engine-only fields checked and dropped.

    On an unplug the profile fields only describe the vNIC that goes away: they ask for
    nothing (its custom properties go to its hooks). A plug keeps ``params.xml`` as it
    is: it is the new vNIC's definition.
    """
    dev = dict(params)
    prefix = "params."
    if "nic" in dev:
        nic = dev.pop("nic")
        prefix = "params.nic."
        dev = {**nic, **dev}
    custom = dev.pop("custom", None)  # the fields' own: an XML carries its own
    if action != "plug" and "xml" in dev:
        fields = _from_xml(dev.pop("xml"), action)
        dev.update(fields)
    if action == "unplug" and custom:  # they describe the leaving vNIC, for its hooks
        try:
            dev["custom"] = _custom(custom, f"{prefix}custom")
        except InvalidParameter as e:  # never a reason to keep a vNIC plugged
            log.warning("unplug: custom properties not passed to the hooks: %s", e)
    if action != "unplug":
        _refuse_field_features(dev, prefix)
        if "profile" in dev or "xml" in dev:  # the profile is the XML's
            stray = next((k for k in _PROFILE_FIELDS if dev.get(k)), None)
            stray = stray or ("custom" if custom else None)
            if stray is not None:
                raise InvalidParameter(f"{prefix}{stray}", "give the profile in params.xml only")
        else:
            dev.update(field_profile(dev, prefix, every=action == "plug" and "nic" in params))
            if custom:
                dev["custom"] = _custom(custom, f"{prefix}custom")
    return {k: v for k, v in dev.items() if k not in _PROFILE and k not in _DESCRIPTIVE}


def plug_fields(xml: str) -> Params:
    """The network and link a plug's XML names, as the same plug in fields would carry
    them (the engine names a network in ``<source bridge>``: VDSM's bridges are named
    after their networks; ``;vdsmdummy;`` for none), and its profile parts."""
    dev = _engine_device(xml)
    _refuse_metadata_features(dev)
    return _wired(dev)


def _refuse_field_features(dev: Params, prefix: str) -> None:
    if dev.get("portMirroring"):
        raise NotImplementedFeature(f"{prefix}portMirroring", "port mirroring")


def _custom(custom: Any, field: str) -> tuple[tuple[str, str], ...]:
    """Custom properties, for the hooks' environment (as VDSM passes them): text values,
    names a hook's environment can take."""
    if not isinstance(custom, dict) or not all(isinstance(v, str) for v in custom.values()):
        raise InvalidParameter(field, "custom properties are names with text values")
    try:
        environment(custom)
    except InvalidParameter as e:
        name = str(e.fields["field"]).removeprefix("custom.")
        e.rename_field({f"custom.{name}": field if field == "params.xml" else f"{field}.{name}"})
        raise
    return tuple(sorted(custom.items()))


def field_profile(dev: Params, prefix: str, *, every: bool) -> Params:
    """An older engine's network filter and QoS fields as the profile parts they speak
    of, for the core as the XML's parts are (a filter of "" and an empty QoS are none).
    ``every``: the fields are a vNIC's whole profile, a missing one is none (an older
    engine's plug: it writes a filter only when the profile has one)."""
    if dev.get("filterParameters") and not dev.get("filter"):
        raise InvalidParameter(f"{prefix}filterParameters", "parameters of no network filter")
    spoken = {"filter": ("filter", "filterParameters"), "qos": ("specParams",)}
    parts = frozenset(part for part, keys in spoken.items() if every or any(k in dev for k in keys))
    if not parts:
        return {}
    spec = dev.get("specParams") or {}
    qos = {d: spec[d] for d in ("inbound", "outbound") if spec.get(d)}
    profile = fields_profile(dev.get("filter") or None, dev.get("filterParameters") or [], qos)
    return {"profile": profile, "profileParts": parts}


def with_devices(vm: Params) -> Params:
    """The VM info plus ``devices``, where ovirt-engine reads a plugged vNIC's alias."""
    devices = [
        {
            "type": "interface",
            "device": nic["sourceType"] or "bridge",
            "macAddr": nic["macAddr"],
            "alias": nic["alias"],
            "network": nic["network"],
            "nicModel": nic["nicModel"],
            "linkActive": nic["linkActive"],
        }
        for nic in vm["nics"]
        if nic["plugged"]
    ]
    return {**vm, "devices": devices}


def _from_xml(xml: str, action: Action) -> Params:
    """The fields of the engine's device XML, as the same request in fields would carry."""
    dev = _engine_device(xml)
    if dev.alias is not None and not names.is_alias(dev.alias):
        raise InvalidParameter("params.xml", f"alias {dev.alias!r} is not a device alias")
    if dev.mac is not None and not names.is_mac(dev.mac):
        raise InvalidParameter("params.xml", f"{dev.mac!r} is not a MAC address")
    if dev.alias is None and dev.mac is None:
        raise InvalidParameter("params.xml", "no <alias> or <mac> to find the vNIC by")
    fields: Params = {k: v for k, v in (("alias", dev.alias), ("macAddr", dev.mac)) if v}
    if action == "unplug":
        return fields
    _refuse_xml_features(dev)
    # No model: the engine asks for no live model change (it refuses one and has the
    # vNIC unplugged, edited and plugged), and writes rtl8139 or virtio for its dual-mode
    # type by whether the guest has its agent now, not as the vNIC was plugged.
    return fields | _wired(dev)


def _engine_device(xml: str) -> EngineDevice:
    try:
        return engine_device(xml)
    except XMLError as e:
        raise InvalidParameter("params.xml", str(e)) from e


def _wired(dev: EngineDevice) -> Params:
    """The profile parts, link, network and custom properties the engine's XML gives its
    vNIC."""
    fields: Params = {"profile": dev.profile}
    if dev.custom:
        fields["custom"] = _custom(dev.custom, "params.xml")
    if dev.link_up is not None:
        fields["linkActive"] = dev.link_up
    source = {"bridge": dev.bridge, "network": dev.network}.get(str(dev.kind))
    if source is not None:
        fields["network"] = _network(source)
    return fields


def _network(bridge: str) -> str:
    if bridge == UNWIRED_BRIDGE:
        return ""
    if not names.is_ifname(bridge):
        raise InvalidParameter("params.xml", f"<source> {bridge!r} is not a network name")
    return bridge


def _refuse_xml_features(dev: EngineDevice) -> None:
    if dev.kind != "bridge":
        raise NotImplementedFeature(
            "params.xml", f"a vNIC of type {dev.kind!r} (vnicd wires bridges)"
        )
    _refuse_metadata_features(dev)


def _refuse_metadata_features(dev: EngineDevice) -> None:
    """What the engine asks for in its ``ovirt-vm`` metadata that vnicd does not do
    (custom properties go to the hooks)."""
    field = "params.xml"
    if dev.port_mirroring:
        raise NotImplementedFeature(field, "port mirroring")
