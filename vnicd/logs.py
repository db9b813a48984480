"""Where vnicd's log lines go, with the fields that let an administrator find them.

Under systemd (its journal socket present and JOURNAL_STREAM naming our stderr) records
go to the journal with structured fields: the request's flow id
and caller on every record, and the VM, vNIC and verb where a log call passes them with
``extra=fields(...)``, as ``VNICD_VM_ID``, ``VNICD_MAC``, ``VNICD_ALIAS``, ``VNICD_VERB``,
``VNICD_FLOW_ID``, ``VNICD_CALLER`` (``journalctl VNICD_VM_ID=...``). Elsewhere they go to
stderr, with the flow id in the text.

The audit logger (``vnicd.audit``) writes one line for every change of a vNIC's wiring.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vnicd import caller as callers

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_FIELDS = {
    "vm_id": "VNICD_VM_ID",
    "mac": "VNICD_MAC",
    "alias": "VNICD_ALIAS",
    "verb": "VNICD_VERB",
}
audit_log = logging.getLogger("vnicd.audit")
audit_log.setLevel(logging.INFO)  # the record of every change, whatever log_level says


def fields(
    *,
    vm_id: str | None = None,
    mac: str | None = None,
    alias: str | None = None,
    verb: str | None = None,
) -> dict[str, str]:
    """``extra=`` for a log call about a VM or vNIC: the journal stores these as fields."""
    given = {"vm_id": vm_id, "mac": mac, "alias": alias, "verb": verb}
    return {_FIELDS[k]: str(v) for k, v in given.items() if v}


class RequestFilter(callers.CallerFilter):
    """Also copies the current request's flow id and caller into journal fields."""

    def filter(self, record: logging.LogRecord) -> bool:
        super().filter(record)
        caller = callers.current.get()
        if caller.flow_id:
            record.VNICD_FLOW_ID = caller.flow_id
        record.VNICD_CALLER = str(caller)
        return True


class TextFormatter(logging.Formatter):
    """stderr's format: the flow id, when there is one, closes the line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        flow = getattr(record, "flow_id", "")
        return f"{text} [flow={flow}]" if flow else text


def under_journal(environ: Mapping[str, str] = os.environ) -> bool:
    """True when our stderr goes to systemd's journal, which can take structured records
    instead. Not merely because a service started us (``INVOCATION_ID``): a shell or a CI
    runner that is one passes that on, and its stderr is where it reads our lines."""
    if not JOURNAL_SOCKET.is_socket():
        return False
    stream = environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def handler(journal: bool) -> logging.Handler:
    """The journal's handler (records with fields) or stderr's (text)."""
    out: logging.Handler
    if journal:
        from systemd.journal import JournalHandler

        out = JournalHandler(SYSLOG_IDENTIFIER="vnicd")
        out.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        out = logging.StreamHandler(sys.stderr)
        out.setFormatter(TextFormatter(FORMAT))
    out.addFilter(RequestFilter())
    return out


def setup(level: str, *, journal: bool | None = None) -> None:
    """Send the root logger's records to the journal or stderr, at ``level``."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler(under_journal() if journal is None else journal))
    root.setLevel(level)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)


def audit(vm_id: str, nic: str, before: Any, after: Any, *, mac: str | None = None) -> None:
    """One line for a change of a vNIC's wiring: VM, vNIC, old -> new state, who asked.

    ``nic`` names the vNIC (its alias); ``before``/``after`` are its states, printed as given
    (a dict prints its keys in order). The caller comes from the request being served.
    """
    who, old, new = callers.current.get(), _state(before), _state(after)
    audit_log.info(
        "VM %s vNIC %s: %s -> %s (asked by %s)",
        vm_id,
        nic,
        old,
        new,
        who,
        extra={
            **fields(vm_id=vm_id, alias=nic, mac=mac),
            "VNICD_AUDIT_BEFORE": old,
            "VNICD_AUDIT_AFTER": new,
        },
    )


def _state(state: Any) -> str:
    if isinstance(state, Mapping):
        return "{" + ", ".join(f"{k}={v!r}" for k, v in state.items()) + "}"
    return str(state)
