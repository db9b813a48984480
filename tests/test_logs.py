"""Log lines: journal fields, stderr text, one start and one end line per call, audit lines.

Journal fields are read back with journalctl where journald runs; where it does not, from
the journal handler's own sender, which receives exactly the fields journald would store
(and then keeps only the valid names, as journald does).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from systemd.journal import JournalHandler

from vnicd import caller as callers
from vnicd import errors, logs
from vnicd.dispatcher import Dispatcher
from vnicd.schema import Schema
from vnicd.verbs import HANDLERS

VM = "6a1b3c4d-0000-4000-8000-000000000001"
ENGINE = callers.Caller("engine", "CN=engine.example", "flow-42")


class Journal:
    """A JournalHandler whose records land here instead of in journald."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.handler = JournalHandler(sender_function=self.send, SYSLOG_IDENTIFIER="vnicd")
        self.handler.addFilter(logs.RequestFilter())

    def send(self, message: str, /, **fields: Any) -> None:
        # journald keeps only valid field names (upper case): so does this record
        valid = {k: v for k, v in fields.items() if k.isupper()}
        self.records.append({**valid, "MESSAGE": message})


def journalctl(flow_id: str, timeout: float = 15) -> dict[str, Any]:
    """The one record journald stored for ``flow_id``, as journalctl reads it back."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["journalctl", "--no-pager", "-o", "json", f"VNICD_FLOW_ID={flow_id}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        records = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        if records:
            (record,) = records
            return dict(record)
        assert time.monotonic() < deadline, f"journald stored no record: {out.stderr}"
        time.sleep(0.2)


@pytest.fixture
def journal() -> Iterator[Journal]:
    j = Journal()
    root = logging.getLogger("vnicd")
    root.addHandler(j.handler)
    old = root.level
    root.setLevel(logging.INFO)
    try:
        yield j
    finally:
        root.removeHandler(j.handler)
        root.setLevel(old)


def test_journal_fields(journal: Journal) -> None:
    token = callers.current.set(ENGINE)
    try:
        logging.getLogger("vnicd.test").info(
            "moved", extra=logs.fields(vm_id=VM, mac="52:54:00:00:00:01", alias="net0")
        )
    finally:
        callers.current.reset(token)
    (rec,) = journal.records
    assert rec["MESSAGE"] == "moved"
    assert rec["VNICD_VM_ID"] == VM
    assert rec["VNICD_MAC"] == "52:54:00:00:00:01"
    assert rec["VNICD_ALIAS"] == "net0"
    assert rec["VNICD_FLOW_ID"] == "flow-42"
    assert rec["VNICD_CALLER"] == "engine:CN=engine.example flow=flow-42"
    assert rec["SYSLOG_IDENTIFIER"] == "vnicd"


def test_journal_fields_read_back(record_property: Any) -> None:
    """vnicd's own journal handler, as ``vnicd`` sets it up under systemd: where journald runs
    (its socket exists) the record is read back with journalctl; elsewhere the handler's
    sender is swapped for one that keeps what journald would have been given."""
    journald = logs.JOURNAL_SOCKET.is_socket()
    record_property("journal read back with", "journalctl" if journald else "handler records")
    flow = f"flow-{uuid.uuid4()}"
    handler = logs.handler(journal=True)
    assert isinstance(handler, JournalHandler)
    kept = Journal()
    if not journald:
        handler.send = kept.send
    logger = logging.getLogger("vnicd.test.journal")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    token = callers.current.set(callers.Caller("engine", "CN=engine.example", flow))
    try:
        logger.info(
            "moved",
            extra=logs.fields(vm_id=VM, mac="52:54:00:00:00:02", alias="net1", verb="VM.x"),
        )
    finally:
        callers.current.reset(token)
        logger.removeHandler(handler)
    if journald:
        rec = journalctl(flow)
    else:
        (rec,) = kept.records
    assert rec["MESSAGE"] == "vnicd.test.journal: moved"
    assert (rec["VNICD_VM_ID"], rec["VNICD_MAC"], rec["VNICD_ALIAS"]) == (
        VM,
        "52:54:00:00:00:02",
        "net1",
    )
    assert (rec["VNICD_VERB"], rec["VNICD_FLOW_ID"]) == ("VM.x", flow)
    assert rec["VNICD_CALLER"] == f"engine:CN=engine.example flow={flow}"
    assert (rec["SYSLOG_IDENTIFIER"], rec["LOGGER"], rec["PRIORITY"]) == (
        "vnicd",
        "vnicd.test.journal",
        "6",
    )


def test_stderr_text_carries_the_flow_id() -> None:
    handler = logs.handler(journal=False)
    record = logging.LogRecord("vnicd.x", logging.INFO, __file__, 1, "moved", None, None)
    token = callers.current.set(ENGINE)
    try:
        assert handler.filter(record)
    finally:
        callers.current.reset(token)
    assert handler.format(record).endswith("vnicd.x: moved [flow=flow-42]")
    record = logging.LogRecord("vnicd.x", logging.INFO, __file__, 1, "idle", None, None)
    assert handler.filter(record)
    assert handler.format(record).endswith("vnicd.x: idle")


def test_journal_detection(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock_path = tmp_path / "journal.sock"
    monkeypatch.setattr(logs, "JOURNAL_SOCKET", sock_path)
    st = os.fstat(sys.stderr.fileno())
    ours = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    assert not logs.under_journal(ours), "no journal socket, no journal"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(sock_path))
        assert logs.under_journal(ours)
        assert not logs.under_journal({"INVOCATION_ID": "x"}), "a service's child, stderr elsewhere"
        assert not logs.under_journal({"JOURNAL_STREAM": "1:2"}), "stderr redirected elsewhere"
        assert not logs.under_journal({})


def test_audit_line(journal: Journal) -> None:
    token = callers.current.set(ENGINE)
    try:
        logs.audit(
            VM,
            "net0",
            {"network": "red", "linkActive": True},
            {"network": "blue", "linkActive": True},
            mac="52:54:00:00:00:01",
        )
    finally:
        callers.current.reset(token)
    (rec,) = journal.records
    assert rec["LOGGER"] == "vnicd.audit"
    assert rec["MESSAGE"] == (
        f"VM {VM} vNIC net0: {{network='red', linkActive=True}} -> "
        "{network='blue', linkActive=True} (asked by engine:CN=engine.example flow=flow-42)"
    )
    assert rec["VNICD_VM_ID"] == VM and rec["VNICD_ALIAS"] == "net0"
    assert rec["VNICD_AUDIT_AFTER"] == "{network='blue', linkActive=True}"
    assert rec["VNICD_FLOW_ID"] == "flow-42"


def test_audit_names_the_local_peer(journal: Journal) -> None:
    token = callers.current.set(callers.Caller("unix", "uid=0"))
    try:
        logs.audit(VM, "net1", "unplugged", "plugged")
    finally:
        callers.current.reset(token)
    assert journal.records[0]["MESSAGE"].endswith(
        "vNIC net1: unplugged -> plugged (asked by unix:uid=0)"
    )


def test_audit_lines_kept_whatever_the_log_level(journal: Journal) -> None:
    root = logging.getLogger()
    old = root.level
    logging.getLogger("vnicd").setLevel(logging.NOTSET)  # as vnicd runs: the root's level
    logs.set_level("ERROR")
    try:
        logging.getLogger("vnicd.service").info("not kept at ERROR")
        logs.audit(VM, "net1", "unplugged", "plugged")
    finally:
        root.setLevel(old)
    (rec,) = journal.records
    assert rec["LOGGER"] == "vnicd.audit"


# The dispatcher's own behaviour is pure logic: a stand-in service is enough here.
class SlowService:
    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def ping(self) -> dict[str, Any]:
        return {}

    async def get_info(self, vm_id: str) -> dict[str, Any]:
        await self.release.wait()
        raise errors.NoSuchVM(vm_id)


def _message(method: str, **params: Any) -> str:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})


def _error_code(response: str) -> int | None:
    error = json.loads(response).get("error")
    return None if error is None else int(error["code"])


def test_every_call_logged_at_start_and_end(journal: Journal) -> None:
    service = SlowService()
    dispatcher = Dispatcher(Schema.load(), service, HANDLERS)

    async def calls() -> list[str]:
        service.release.set()
        return [
            await dispatcher.handle(_message("Host.ping2"), ENGINE),
            await dispatcher.handle(_message("VM.getInfo", vmID=VM), ENGINE),
        ]

    ping, info = asyncio.run(calls())
    assert _error_code(ping) is None and _error_code(info) == errors.NoSuchVM.code
    lines = [
        (r["MESSAGE"], r.get("VNICD_VERB"), r.get("VNICD_FLOW_ID"), r.get("VNICD_VM_ID"))
        for r in journal.records
        if r["LOGGER"] == "vnicd.dispatcher"
    ]
    assert lines[0] == ("Host.ping2 started", "Host.ping2", "flow-42", None)
    assert lines[1][0].startswith("Host.ping2 ended: ok in ") and lines[1][0].endswith(" ms")
    assert lines[2] == ("VM.getInfo started", "VM.getInfo", "flow-42", VM)
    assert lines[-1][0].startswith("VM.getInfo ended: error 1 in ")
    assert lines[-1][1:] == ("VM.getInfo", "flow-42", VM)


def test_recovering_until_ready() -> None:
    ready = False
    dispatcher = Dispatcher(Schema.load(), SlowService(), HANDLERS, ready=lambda: ready)
    for method in HANDLERS:
        response = asyncio.run(dispatcher.handle(_message(method)))
        assert _error_code(response) == errors.Recovering.code == 99, method
    ready = True
    assert _error_code(asyncio.run(dispatcher.handle(_message("Host.ping2")))) is None


def test_drain_answers_calls_in_flight_and_refuses_new_ones() -> None:
    service = SlowService()
    dispatcher = Dispatcher(Schema.load(), service, HANDLERS)

    async def scenario() -> tuple[str, str, bool]:
        in_flight = asyncio.create_task(dispatcher.handle(_message("VM.getInfo", vmID=VM)))
        await asyncio.sleep(0.05)
        draining = asyncio.create_task(dispatcher.drain(5))
        await asyncio.sleep(0.05)
        late = await dispatcher.handle(_message("Host.ping2"))
        assert not draining.done(), "drain waits for the call in flight"
        service.release.set()
        return await in_flight, late, await draining

    answered, late, drained = asyncio.run(scenario())
    assert drained
    assert _error_code(answered) == errors.NoSuchVM.code
    assert _error_code(late) == errors.GeneralError.code and "stopping" in late
