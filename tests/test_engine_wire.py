"""The engine's wire against the session's vnicd: STOMP 1.2, mutual TLS, a real STOMP client."""

from __future__ import annotations

import json
import logging
import queue
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import libvirt
import pytest

from tests import pki
from tests.conftest import Nic, Vms, nic_xml
from tests.engine import EngineClient, read_until_closed, tls_socket
from tests.evidence import interfaces, seen
from tests.harness import DaemonThread
from vnicd.caller import CallerFilter
from vnicd.client import RpcError
from vnicd.stomp import Frame, Parser


@pytest.fixture(scope="module")
def certs(vnicd: DaemonThread) -> pki.Pki:
    return pki.at(vnicd.config.engine.ca_file.parent)


@pytest.fixture
def engine(vnicd: DaemonThread, certs: pki.Pki) -> Iterator[EngineClient]:
    with EngineClient(vnicd.config.engine.port, certs.ca, certs.engine) as client:
        yield client


def test_every_verb(vnicd: DaemonThread, vms: Vms, engine: EngineClient) -> None:
    assert engine.call("Host.ping2") is True
    caps = engine.call("Host.getCapabilities")
    assert caps["libvirtURI"] == vnicd.config.uri

    vm_id, xml = vms.xml(Nic("vt-a"))
    vms.created.append(vm_id)
    mac = interfaces_macs(xml)[0]
    assert engine.call("VM.create", vmID=vm_id, vmParams={"xml": xml})["status"] == "Up"
    assert vm_id in [vm["vmID"] for vm in engine.call("Host.getVMList")]
    assert engine.call("VM.getInfo", vmID=vm_id)["nics"][0]["macAddr"] == mac

    before = seen(vnicd, vm_id, mac)
    info = engine.call(
        "VM.updateDevice",
        vmID=vm_id,
        params={"deviceType": "interface", "alias": "net0", "network": "vt-b"},
    )
    assert info["nics"][0]["network"] == "vt-b"
    after = seen(vnicd, vm_id, mac)
    assert (after.kernel_bridge, after.source, after.pci) == ("vt-b", "vt-b", before.pci)
    # where the engine reads a VM's devices once their hash (in VM_status) changed
    xmls = engine.call("Host.dumpxmls", vmList=[vm_id, str(uuid.uuid4())])
    assert list(xmls) == [vm_id], "a VM that is not there is left out"
    assert xmls[vm_id] == vnicd.live_xml(vm_id)

    new = vms.nic(Nic("vt-a"))
    info = engine.call("VM.hotplugNic", vmID=vm_id, params={"vmId": vm_id, "xml": nic_xml(new)})
    assert {n["macAddr"] for n in info["nics"]} == {mac, new.mac}
    assert seen(vnicd, vm_id, new.mac).kernel_bridge == "vt-a"

    with pytest.raises(RpcError) as e:
        engine.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": "52:54:00:ff:ff:ff"})
    assert e.value.code == 50

    assert engine.call("VM.destroy", vmID=vm_id) == {}
    with pytest.raises(RpcError) as e:
        engine.call("VM.getInfo", vmID=vm_id)
    assert e.value.code == 1


def test_the_engines_destroy_stops_a_defined_vm_and_keeps_it(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """ovirt-engine sends VM.destroy {vmID} for every VM it hears is Down, its way of
    saying "stop it": a defined VM keeps its definition, with its vNICs' changes."""
    vm_id = vms.create(Nic("vt-a"), persistent=True)
    mac = engine.call("VM.getInfo", vmID=vm_id)["nics"][0]["macAddr"]
    params = {"deviceType": "interface", "macAddr": mac, "network": "vt-b"}
    engine.call("VM.updateDevice", vmID=vm_id, params=params)
    for _ in range(2):  # the second finds it stopped: nothing to do
        assert engine.call("VM.destroy", vmID=vm_id) == {}
        dom = vnicd.domain(vm_id)
        assert not dom.isActive() and dom.isPersistent()
        saved = interfaces(str(dom.XMLDesc(2)))[mac]  # VIR_DOMAIN_XML_INACTIVE
        assert saved.find("source").get("bridge") == "vt-b"  # type: ignore[union-attr]
        assert engine.call("VM.getInfo", vmID=vm_id)["status"] == "Down"
        assert engine.call("Host.dumpxmls", vmList=[vm_id]) == {vm_id: dom.XMLDesc(2)}
    assert engine.call("VM.destroy", vmID=vm_id, undefine=True) == {}
    with pytest.raises(libvirt.libvirtError):
        vnicd.domain(vm_id)


def interfaces_macs(domain_xml: str) -> list[str]:
    return [
        line.split("'")[1]
        for line in domain_xml.replace("><", ">\n<").splitlines()
        if line.startswith("<mac address=")
    ]


def test_batch_and_notification(engine: EngineClient) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "Host.ping2", "params": {}, "id": "a"},
        {"jsonrpc": "2.0", "method": "Host.ping2", "params": {}},
        {"jsonrpc": "2.0", "method": "VM.getInfo", "params": {"vmID": str(uuid.uuid4())}, "id": 7},
    ]
    replies = {r["id"]: r for r in engine.request(json.dumps(batch))}
    assert set(replies) == {"a", 7}
    assert replies["a"]["result"] is True
    assert replies[7]["error"]["code"] == 1


def test_flow_id_reaches_the_log(engine: EngineClient) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(CallerFilter())
    logger = logging.getLogger("vnicd")
    logger.addHandler(handler)
    try:
        with pytest.raises(RpcError):
            engine.call("VM.getInfo", flow_id="flow-4711", vmID=str(uuid.uuid4()))
    finally:
        logger.removeHandler(handler)
    mine = [r for r in records if "VM.getInfo failed" in r.getMessage()]
    assert mine and all(getattr(r, "flow_id", None) == "flow-4711" for r in mine)
    caller = str(getattr(mine[0], "caller", ""))
    assert caller.startswith("engine:O=vnicd-tests,CN=engine"), caller


def test_verb_failures_are_jsonrpc_errors(engine: EngineClient) -> None:
    def reply(body: str) -> dict[str, Any]:
        response: dict[str, Any] = engine.request(body)
        return response

    assert reply("this is not json")["error"]["code"] == -32700
    assert reply('{"jsonrpc": "2.0", "method": 5, "id": 1}')["error"]["code"] == -32600
    wrong = {"jsonrpc": "2.0", "method": "VM.getInfo", "params": {"vmID": 5}, "id": "w"}
    answer = reply(json.dumps(wrong))
    assert answer["id"] == "w" and answer["error"]["code"] == -32602
    assert "vmID" in answer["error"]["message"]
    unknown = {"jsonrpc": "2.0", "method": "VM.migrate", "params": {}, "id": "m"}
    assert reply(json.dumps(unknown))["error"]["code"] == -32601
    assert engine.errors.empty()
    assert engine.call("Host.ping2") is True


# Below the client library: raw frames over TLS.


def raw(vnicd: DaemonThread, certs: pki.Pki, heartbeat: str = "0,0") -> socket.socket:
    sock = tls_socket(vnicd.config.engine.port, certs.ca, certs.engine)
    sock.sendall(Frame("CONNECT", {"accept-version": "1.2", "heart-beat": heartbeat}).encode())
    sock.sendall(Frame("SUBSCRIBE", {"id": "s1", "destination": "me"}).encode())
    frames = read_frames(sock, 1)
    assert frames[0].command == "CONNECTED" and frames[0].headers["version"] == "1.2"
    return sock


def read_frames(sock: socket.socket, count: int, timeout: float = 10) -> list[Frame]:
    parser = Parser()
    frames: list[Frame] = []
    sock.settimeout(timeout)
    while len(frames) < count:
        data = sock.recv(65536)
        if not data:
            break
        frames += parser.feed(data)
    return frames


def ping_frame(request_id: str = "p") -> bytes:
    body = json.dumps({"jsonrpc": "2.0", "method": "Host.ping2", "params": {}, "id": request_id})
    return Frame(
        "SEND", {"destination": "jms.topic.vdsm_requests", "reply-to": "me"}, body.encode()
    ).encode()


def test_reply_headers_as_vdsm_client_needs(vnicd: DaemonThread, certs: pki.Pki) -> None:
    with raw(vnicd, certs) as sock:
        sock.sendall(ping_frame("x1"))
        [message] = read_frames(sock, 1)
    assert message.command == "MESSAGE"
    assert message.headers["subscription"] == "s1"
    assert message.headers["destination"] == "me"
    assert message.headers["content-type"] == "application/json"
    assert int(message.headers["content-length"]) == len(message.body)
    assert message.headers["message-id"]
    assert json.loads(message.body) == {"jsonrpc": "2.0", "result": True, "id": "x1"}


def test_frames_split_and_joined(vnicd: DaemonThread, certs: pki.Pki) -> None:
    with raw(vnicd, certs) as sock:
        data = b"\n" + ping_frame("j1") + b"\n" + ping_frame("j2")
        sock.sendall(data[:7])
        sock.sendall(data[7:50])
        sock.sendall(data[50:])
        ids = {json.loads(f.body)["id"] for f in read_frames(sock, 2)}
    assert ids == {"j1", "j2"}


def test_disconnect_with_receipt(vnicd: DaemonThread, certs: pki.Pki) -> None:
    with raw(vnicd, certs) as sock:
        sock.sendall(Frame("DISCONNECT", {"receipt": "r-77"}).encode())
        frames = read_frames(sock, 2, timeout=5)
    assert [(f.command, f.headers) for f in frames] == [("RECEIPT", {"receipt-id": "r-77"})]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"HELLO\n\n\x00", b"unknown command"),
        (b"SEND\ndestination:jms.topic.vdsm_requests\ncontent-length:99999999\n\n", b"over"),
        (b"SEND\n" + b"x" * 10000, b"header line over"),
        (b"SEND\n" + b"h:v\n" * 100, b"more than"),
        (b"SEND\nbad:\\t\n\n\x00", b"escape"),
        (b"SUBSCRIBE\nid:s1\ndestination:again\n\n\x00", b"already in use"),
        (b"SEND\ndestination:jms.topic.elsewhere\n\n{}\x00", b"not a destination"),
        (b"SEND\n\n{}\x00", b"destination"),
        (b"BEGIN\ntransaction:t\n\n\x00", b"not supported"),
    ],
)
def test_broken_stomp_gets_error_and_close(
    vnicd: DaemonThread, certs: pki.Pki, engine: EngineClient, data: bytes, problem: bytes
) -> None:
    with raw(vnicd, certs) as sock:
        sock.sendall(data)
        answer = read_until_closed(sock)
    assert answer.startswith(b"ERROR\n") and problem in answer
    assert engine.call("Host.ping2") is True  # another client, unaffected


def test_frame_before_connect_is_refused(vnicd: DaemonThread, certs: pki.Pki) -> None:
    with tls_socket(vnicd.config.engine.port, certs.ca, certs.engine) as sock:
        sock.sendall(ping_frame())
        answer = read_until_closed(sock)
    assert answer.startswith(b"ERROR\n") and b"before CONNECT" in answer


def test_stomp_1_0_is_refused(vnicd: DaemonThread, certs: pki.Pki) -> None:
    with tls_socket(vnicd.config.engine.port, certs.ca, certs.engine) as sock:
        sock.sendall(Frame("CONNECT", {"accept-version": "1.0,1.1"}).encode())
        answer = read_until_closed(sock)
    assert answer.startswith(b"ERROR\n") and b"1.2" in answer


def test_server_heartbeats_as_negotiated(vnicd: DaemonThread, certs: pki.Pki) -> None:
    """The client asks to hear from vnicd every second (VDSM's floor): bare EOLs arrive."""
    sock = tls_socket(vnicd.config.engine.port, certs.ca, certs.engine)
    with sock:
        sock.sendall(Frame("CONNECT", {"accept-version": "1.2", "heart-beat": "0,1000"}).encode())
        sock.settimeout(5)
        data = b""
        while data.partition(b"\x00")[2].count(b"\n") < 2:
            data += sock.recv(4096)
    connected, _, beats = data.partition(b"\x00")
    assert b"heart-beat:1000,0" in connected
    assert beats.strip(b"\n") == b"" and len(beats) >= 2


@pytest.mark.parametrize("who", ["no certificate", "another CA", "plain TCP"])
def test_refused_at_the_handshake(
    vnicd: DaemonThread, certs: pki.Pki, engine: EngineClient, who: str
) -> None:
    port = vnicd.config.engine.port
    connect = Frame("CONNECT", {"accept-version": "1.2"}).encode()
    if who == "plain TCP":
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        with sock:
            sock.sendall(connect)
            answer = read_until_closed(sock)
    else:
        cert = None if who == "no certificate" else certs.intruder
        answer = b""
        try:
            with tls_socket(port, certs.ca, cert) as tls:
                tls.sendall(connect)
                answer = read_until_closed(tls)
        except (ssl.SSLError, ConnectionError) as e:
            answer = str(e).encode()
    assert b"CONNECTED" not in answer
    assert engine.call("Host.ping2") is True


def test_events_for_changes_by_vnicd_and_by_libvirt(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    engine.subscribe_events()
    engine.call("Host.ping2")  # the subscription is in place once this is answered
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    assert status_events(engine, vm_id)[-1]["status"] == "Up"

    engine.call(
        "VM.updateDevice",
        vmID=vm_id,
        params={"deviceType": "interface", "macAddr": nic.mac, "linkActive": False},
    )
    events = engine.events(timeout=3)
    [change] = nic_events(events, vm_id)
    assert change["nics"] == [
        {
            "macAddr": nic.mac,
            "alias": "net0",
            "network": "vt-a",
            "linkActive": False,
            "plugged": True,
            "state": "plugged-unlinked",
        }
    ]
    [status] = [e["params"][vm_id] for e in events if e["method"] == f"|virt|VM_status|{vm_id}"]
    assert status["status"] == "Up" and status["hash"]

    dom = vnicd.domain(vm_id)
    xml = nic_xml(nic).replace("<target dev", "<link state='up'/><target dev")
    dom.updateDeviceFlags(xml, 1)  # VIR_DOMAIN_AFFECT_LIVE, behind vnicd's back
    [change] = nic_events(engine.events(timeout=3), vm_id)
    assert change["nics"][0]["state"] == "plugged-linked"
    assert change["nics"][0]["linkActive"] is True

    vnicd.domain(vm_id).destroy()
    assert status_events(engine, vm_id)[-1] == {"status": "Down"}


def test_a_vm_paused_while_a_change_waits_is_told_at_once(
    vnicd: DaemonThread, vms: Vms, engine: EngineClient
) -> None:
    """An unplug waits for a guest that never answers, and the VM is paused meanwhile: the
    engine hears "Paused" at once, not once the change is over; its vNICs as before the
    change (still plugged), as every read answers while a change is in flight."""
    engine.subscribe_events()
    engine.call("Host.ping2")
    nic = Nic("vt-a")
    vm_id = vms.create(nic)
    up = status_events(engine, vm_id)[-1]
    assert up["status"] == "Up"
    unplug: list[RpcError] = []

    def run() -> None:
        try:
            with vnicd.client() as c:
                c.call("VM.hotunplugNic", vmID=vm_id, params={"macAddr": nic.mac})
        except RpcError as e:
            unplug.append(e)

    unplugging = threading.Thread(target=run)
    unplugging.start()
    try:
        deadline = time.monotonic() + 30
        while not vnicd.service.waiting._waiting:
            assert time.monotonic() < deadline, "the unplug never reached the guest"
            time.sleep(0.01)
        deadline = time.monotonic() + vnicd.config.unplug_timeout
        vnicd.domain(vm_id).suspend()
        method, told = f"|virt|VM_status|{vm_id}", None
        while told is None or told["method"] != method:  # others' events pass by
            left = max(0.0, deadline - time.monotonic())
            try:
                told = json.loads(engine.inbox["events"].get(timeout=left).body)
            except queue.Empty:
                pytest.fail("no status event while the unplug waited")
        assert unplugging.is_alive(), "told only once the change was over"
        paused = told["params"][vm_id]
        assert (paused["status"], paused["hash"]) == ("Paused", up["hash"]), "vNICs as before"
    finally:
        unplugging.join(30)
    assert [e.code for e in unplug] == [50], "the guest never released it"
    with vnicd.client() as c:
        (got,) = c.call("VM.getInfo", vmID=vm_id)["nics"]
    assert got["plugged"] is True
    # what was told is where it happens: libvirt has the VM paused, the vNIC in its guest
    assert vnicd.domain(vm_id).state()[0] == libvirt.VIR_DOMAIN_PAUSED
    assert f"<mac address='{nic.mac}'/>" in vnicd.live_xml(vm_id)


def status_events(engine: EngineClient, vm_id: str) -> list[dict[str, Any]]:
    return [
        e["params"][vm_id]
        for e in engine.events(timeout=3)
        if e["method"] == f"|virt|VM_status|{vm_id}"
    ]


def nic_events(events: list[dict[str, Any]], vm_id: str) -> list[dict[str, Any]]:
    found = [e for e in events if e["method"] == f"|vnicd|nic_changed|{vm_id}"]
    for e in found:
        assert (
            e["jsonrpc"] == "2.0" and "id" not in e and isinstance(e["params"]["notify_time"], int)
        )
    return [e["params"][vm_id] for e in found]
