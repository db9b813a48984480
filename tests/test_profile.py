"""Engine-only vNIC fields and lenient booleans: pure logic, no VM."""

from __future__ import annotations

from typing import Any

import pytest

from vnicd import errors
from vnicd.profile import device_params
from vnicd.schema import Schema

SCHEMA = Schema.load()
VM = "6ba7b810-9dad-11d1-80b4-00c04fd430c8"


def test_nothing_asked_is_dropped() -> None:
    params = {
        "deviceType": "interface",
        "alias": "net0",
        "linkActive": False,
        "network": "n",
        "specParams": {"inbound": {}, "outbound": {}},
        "portMirroring": [],
        "filter": "",
        "filterParameters": [],
        "custom": {},
    }
    assert device_params(params) == {
        "deviceType": "interface",
        "alias": "net0",
        "linkActive": False,
        "network": "n",
    }


def test_older_engines_nic_is_unwrapped() -> None:
    nic: dict[str, Any] = {"type": "interface", "device": "bridge", "macAddr": "52:54:00:00:00:01"}
    nic |= {"address": {"slot": "0x03"}, "deviceId": "d", "specParams": {}, "network": "n"}
    assert device_params({"vmId": VM, "nic": nic}) == {
        "vmId": VM,
        "macAddr": "52:54:00:00:00:01",
        "network": "n",
    }


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"specParams": {"inbound": {"average": 1}}}, "params.specParams.inbound"),
        ({"specParams": {"outbound": {"peak": 1}}}, "params.specParams.outbound"),
        ({"portMirroring": ["x"]}, "params.portMirroring"),
        ({"filter": "clean-traffic"}, "params.filter"),
        ({"filterParameters": [{"name": "IP", "value": "1.2.3.4"}]}, "params.filterParameters"),
        ({"custom": {"k": "v"}}, "params.custom"),
        ({"nic": {"macAddr": "52:54:00:00:00:01", "custom": {"k": "v"}}}, "params.nic.custom"),
    ],
)
def test_asking_for_a_missing_feature_is_noimpl(params: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.NotImplementedFeature) as e:
        device_params(params)
    assert e.value.code == 44 and e.value.fields["field"] == field
    assert field in e.value.message


def test_unplug_ignores_what_describes_the_leaving_vnic() -> None:
    nic = {"macAddr": "52:54:00:00:00:01", "filter": "vdsm-no-mac-spoofing"}
    assert device_params({"nic": nic}, plugging=False) == {"macAddr": "52:54:00:00:00:01"}


@pytest.mark.parametrize(("text", "value"), [("true", True), ("False", False), (True, True)])
def test_engine_bool_is_coerced_for_the_handler(text: Any, value: bool) -> None:
    dev: dict[str, Any] = {"deviceType": "interface", "alias": "a", "linkActive": text}
    params: dict[str, Any] = {"vmID": VM, "params": dev}
    SCHEMA.validate_params(SCHEMA.verbs["VM.updateDevice"], params)
    assert dev["linkActive"] is value


def test_engine_nic_bool_and_strictness_elsewhere() -> None:
    nic: dict[str, Any] = {"macAddr": "52:54:00:00:00:01", "linkActive": "false"}
    params: dict[str, Any] = {"vmID": VM, "params": {"nic": nic}}
    SCHEMA.validate_params(SCHEMA.verbs["VM.hotplugNic"], params)
    assert nic["linkActive"] is False
    strict = {"vmID": VM, "vmParams": {"xml": "<domain/>", "persistent": "true"}}
    with pytest.raises(errors.InvalidParameter, match=r"vmParams\.persistent: expected boolean"):
        SCHEMA.validate_params(SCHEMA.verbs["VM.create"], strict)


def test_qos_values_are_typed() -> None:
    params = {
        "vmID": VM,
        "params": {"alias": "a", "deviceType": "interface", "specParams": {"inbound": {"x": 1}}},
    }
    with pytest.raises(errors.InvalidParameter, match=r"specParams\.inbound\.x: unknown field"):
        SCHEMA.validate_params(SCHEMA.verbs["VM.updateDevice"], params)
