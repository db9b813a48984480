"""Bad input gets a stable code and a message naming the field, and changes nothing."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.conftest import Nic, Vms
from tests.evidence import seen
from tests.harness import DaemonThread, SchemaClient
from vnicd.client import RpcError

BAD_UPDATES: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown vNIC alias", {"alias": "net9"}, 56, "has no vNIC net9"),
    ("unknown vNIC MAC", {"macAddr": "52:54:00:ff:ff:ff"}, 56, "has no vNIC 52:54:00:ff:ff:ff"),
    ("unknown network", {"alias": "net0", "network": "nosuchbr"}, 56, "network 'nosuchbr'"),
    ("malformed MAC", {"macAddr": "52:54:00:zz:00:01"}, -32602, "params.macAddr"),
    ("malformed network", {"alias": "net0", "network": "a'/><x"}, -32602, "params.network"),
    ("network name too long", {"alias": "net0", "network": "x" * 16}, -32602, "params.network"),
    ("malformed alias", {"alias": "net0 x"}, -32602, "params.alias"),
    ("linkActive not boolean", {"alias": "net0", "linkActive": "yes"}, -32602, "params.linkActive"),
    ("unknown field", {"alias": "net0", "speed": 10}, -32602, "params.speed"),
    ("no vNIC named", {"linkActive": False}, 11, "params.alias or params.macAddr"),
    ("model change", {"alias": "net0", "nicModel": "e1000"}, 56, "params.nicModel"),
]


@pytest.mark.parametrize(
    ("params", "code", "text"),
    [pytest.param(p, c, t, id=name) for name, p, c, t in BAD_UPDATES],
)
def test_bad_update_changes_nothing(
    vnicd: DaemonThread,
    vms: Vms,
    rpc: SchemaClient,
    params: dict[str, Any],
    code: int,
    text: str,
) -> None:
    nic = Nic("vt-a", link_up=False)
    vm_id = vms.create(nic)
    xml_before, before = vnicd.live_xml(vm_id), seen(vnicd, vm_id, nic.mac)
    with pytest.raises(RpcError) as err:
        rpc.call("VM.updateDevice", vmID=vm_id, params={"deviceType": "interface", **params})
    assert err.value.code == code
    assert text in err.value.message
    assert vnicd.live_xml(vm_id) == xml_before
    assert seen(vnicd, vm_id, nic.mac) == before


@pytest.mark.parametrize(
    ("params", "code", "text"),
    [
        ({"params": {"deviceType": "interface", "alias": "net0"}}, 11, "vmID"),
        ({"vmID": "not-a-uuid", "params": {"deviceType": "interface"}}, -32602, "vmID"),
        ({"vmID": 42, "params": {}}, -32602, "vmID"),
        ({"vmID": str(uuid.uuid4())}, 11, "params"),
        ({"vmID": str(uuid.uuid4()), "params": {"alias": "net0"}}, 11, "params.deviceType"),
        (
            {"vmID": str(uuid.uuid4()), "params": {"deviceType": "disk"}},
            -32602,
            "params.deviceType",
        ),
        ({"vmID": str(uuid.uuid4()), "params": []}, -32602, "params"),
    ],
)
def test_malformed_request(rpc: SchemaClient, params: dict[str, Any], code: int, text: str) -> None:
    with pytest.raises(RpcError) as err:
        rpc.call("VM.updateDevice", **params)
    assert err.value.code == code and text in err.value.message
    assert err.value.data["field"].startswith(text.split(".")[0])


def test_unknown_vm(rpc: SchemaClient) -> None:
    vm_id = str(uuid.uuid4())
    for verb, extra in (
        ("VM.updateDevice", {"params": {"deviceType": "interface", "alias": "net0"}}),
        ("VM.getInfo", {}),
        ("VM.destroy", {}),
    ):
        with pytest.raises(RpcError) as err:
            rpc.call(verb, vmID=vm_id, **extra)
        assert err.value.code == 1 and vm_id in err.value.message, verb


def test_protocol_errors(rpc: SchemaClient) -> None:
    assert rpc.send("{not json")["error"]["code"] == -32700
    assert rpc.send(json.dumps({"jsonrpc": "2.0", "id": 1}))["error"]["code"] == -32600
    reply = rpc.send(json.dumps({"jsonrpc": "2.0", "method": "VM.frob", "id": 2}))
    assert reply["error"]["code"] == -32601
    reply = rpc.send(json.dumps({"jsonrpc": "2.0", "method": "Host.ping2", "params": [1], "id": 3}))
    assert reply["error"]["code"] == -32602


def test_create_rejects_bad_xml(rpc: SchemaClient, vms: Vms) -> None:
    vm_id = str(uuid.uuid4())
    for xml, text in (
        ("<domain", "malformed XML"),
        ("<interface type='bridge'/>", "expected <domain>"),
        (vms.xml(Nic("vt-a"))[1], "differs from the VM id"),
    ):
        with pytest.raises(RpcError) as err:
            rpc.call("VM.create", vmID=vm_id, vmParams={"xml": xml})
        assert err.value.code == -32602 and "vmParams.xml" in err.value.message, text
        assert text in err.value.message
    assert vm_id not in {v["vmID"] for v in rpc.call("Host.getVMList")}


def test_create_existing_vm(rpc: SchemaClient, vms: Vms) -> None:
    vm_id = vms.create(Nic("vt-a"))
    xml = vms.vnicd.live_xml(vm_id)
    qemu_id = vms.vnicd.domain(vm_id).ID()
    with pytest.raises(RpcError) as err:
        rpc.call("VM.create", vmID=vm_id, vmParams={"xml": xml})
    assert err.value.code == 4
    assert vms.vnicd.domain(vm_id).ID() == qemu_id, "the running VM was restarted"
    assert vms.vnicd.live_xml(vm_id) == xml


def test_create_libvirt_refusal(rpc: SchemaClient, vms: Vms) -> None:
    vm_id, xml = vms.xml(Nic("no-such-br"))
    with pytest.raises(RpcError) as err:
        rpc.call("VM.create", vmID=vm_id, vmParams={"xml": xml})
    assert err.value.code == 9 and "no-such-br" in err.value.message
    assert vm_id not in {v["vmID"] for v in rpc.call("Host.getVMList")}


def test_oversized_message_is_answered(rpc: SchemaClient) -> None:
    reply = rpc.send("[" + " " * (17 * 1024 * 1024) + "]")
    assert reply["error"]["code"] == -32600 and "over" in reply["error"]["message"]
    assert rpc.call("Host.ping2") is True, "the connection must go on serving"


def test_vm_list_as_the_engine_asks(rpc: SchemaClient, vms: Vms) -> None:
    vm_id = vms.create(Nic("vt-a"))
    assert rpc.call("Host.getVMList", vmList=[], onlyUUID="false")
    assert rpc.call("Host.getVMList", vmList=[vm_id], onlyUUID="true") == [vm_id]
    (only,) = rpc.call("Host.getVMList", vmList=[vm_id.upper()], onlyUUID=False)
    assert only["vmID"] == vm_id and only["nics"][0]["bridge"] == "vt-a"
