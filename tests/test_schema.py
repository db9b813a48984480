"""The schema is the single source: handlers, error codes and validation all follow it."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from vnicd import errors
from vnicd.schema import Schema
from vnicd.verbs import HANDLERS

SCHEMA = Schema.load()


def test_schema_verbs_are_the_handlers() -> None:
    assert set(SCHEMA.verbs) == set(HANDLERS)


def test_every_error_class_is_declared() -> None:
    declared = {(e["code"], name) for name, e in SCHEMA.errors.items()}
    codes = {code for code, _ in declared}
    classes = [
        c
        for c in vars(errors).values()
        if inspect.isclass(c)
        and issubclass(c, errors.VnicdError)
        and c not in (errors.VnicdError, errors.RequestError, errors.HostError)
    ]
    for cls in classes:
        assert cls.code in codes, f"{cls.__name__} code {cls.code} is not in the schema"


def test_declared_errors_exist() -> None:
    for verb in SCHEMA.verbs.values():
        assert set(verb.errors) <= set(SCHEMA.errors), verb.name


def test_unknown_type_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown type 'Nicc'"):
        SCHEMA.resolve({"type": "Nicc"})
    broken = {
        "errors": {},
        "types": {"A": {"type": "object", "properties": {"b": {"type": "Missing"}}}},
        "verbs": {"X.y": {"params": {"a": {"type": "A"}}, "result": {"type": "object"}}},
    }
    with pytest.raises(ValueError, match="unknown type 'Missing'"):
        Schema(broken).check_schema()
    Schema.load().check_schema()  # the shipped schema resolves everywhere


def test_new_vnic_xml_excludes_naming_a_known_one() -> None:
    verb = SCHEMA.verbs["VM.hotplugNic"]
    with pytest.raises(errors.InvalidParameter) as err:
        SCHEMA.validate_params(verb, {"vmID": VM, "params": {"xml": "<x/>", "alias": "net0"}})
    assert err.value.fields["field"] == "params.xml"
    assert "params.alias" in err.value.message
    SCHEMA.validate_params(verb, {"vmID": VM, "params": {"xml": "<x/>"}})


UPDATE = SCHEMA.verbs["VM.updateDevice"]
VM = "0b7e3f34-3d68-4cb8-a7ea-c9d04be1a0e1"


@pytest.mark.parametrize(
    ("params", "error", "field"),
    [
        ({}, errors.MissingParameter, "vmID"),
        ({"vmID": VM}, errors.MissingParameter, "params"),
        (
            {"vmID": VM, "params": {"deviceType": "interface"}},
            errors.MissingParameter,
            "params.alias or params.macAddr or params.xml",
        ),
        ({"vmID": VM[:-1], "params": {}}, errors.InvalidParameter, "vmID"),
        (
            {"vmID": VM, "params": {"deviceType": "interface", "alias": "n", "linkActive": 1}},
            errors.InvalidParameter,
            "params.linkActive",
        ),
        (
            {"vmID": VM, "params": {"deviceType": "interface", "alias": "n", "network": "a/b"}},
            errors.InvalidParameter,
            "params.network",
        ),
        ({"vmID": VM, "extra": 1, "params": {}}, errors.InvalidParameter, "extra"),
    ],
)
def test_request_validation(
    params: dict[str, Any], error: type[errors.VnicdError], field: str
) -> None:
    with pytest.raises(error) as err:
        SCHEMA.validate_params(UPDATE, params)
    assert err.value.fields["field"] == field


def test_valid_requests() -> None:
    for dev in (
        {"deviceType": "interface", "alias": "ua-nic1", "network": ""},
        {"deviceType": "interface", "macAddr": "52:54:00:AA:BB:CC", "linkActive": True},
        {
            "deviceType": "interface",
            "alias": "net0",
            "macAddr": "52:54:00:aa:bb:cc",
            "network": "ovirtmgmt",
            "nicModel": "virtio",
        },
    ):
        SCHEMA.validate_params(UPDATE, {"vmID": VM, "params": dev})


def test_result_validation() -> None:
    verb = SCHEMA.verbs["VM.getInfo"]
    good = {"vmID": VM, "vmName": "x", "status": "Up", "persistent": False, "nics": []}
    SCHEMA.validate_result(verb, good)
    with pytest.raises(ValueError, match=r"result\.status"):
        SCHEMA.validate_result(verb, {**good, "status": "Running"})
    with pytest.raises(ValueError, match=r"result\.nics"):
        SCHEMA.validate_result(verb, {k: v for k, v in good.items() if k != "nics"})


def test_dry_run_result_validates_as_a_plan() -> None:
    verb = SCHEMA.verbs["VM.updateDevice"]
    plan = {
        "dryRun": True,
        "vmID": VM,
        "action": "update",
        "nic": "net0",
        "before": None,
        "after": None,
        "beforeXML": None,
        "liveXML": "<interface/>",
        "definitionXML": None,
        "steps": ["update the vNIC live"],
    }
    SCHEMA.validate_result(verb, plan)
    with pytest.raises(ValueError, match="matches none of"):
        SCHEMA.validate_result(verb, {**plan, "steps": "all"})
