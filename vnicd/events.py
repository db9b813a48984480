"""Engine events: what changed in a VM, sent as JSON-RPC notifications the way VDSM sends them.

:class:`Events` is fed VM info (the shape ``VM.getInfo`` returns) after every change vnicd
makes, on libvirt lifecycle events, and by a periodic resync that finds changes made
outside vnicd. It keeps the last state it saw of each VM and publishes only what changed:

- ``|virt|VM_status|<vmId>``: ``{"<vmId>": {"status": ..., "hash": ...}, "notify_time": ms}``
  when the VM appears, changes status or its devices change (``hash``, as VDSM's devices
  hash, is an opaque string that changes whenever a vNIC does); ``{"status": "Down"}``
  when the VM is gone.
- ``|vnicd|nic_changed|<vmId>``: ``{"<vmId>": {"nics": [...]}, "notify_time": ms}`` with
  each vNIC that appeared, changed or disappeared: ``macAddr``, ``alias``, ``network``,
  ``linkActive``, ``plugged`` and ``state`` (``plugged-linked``, ``plugged-unlinked``,
  ``unplugged-linked``, ``unplugged-unlinked``, or ``removed``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Publish = Callable[[str], None]
VM_STATUS = "|virt|VM_status|"
NIC_CHANGED = "|vnicd|nic_changed|"
_NIC_FIELDS = ("macAddr", "alias", "network", "linkActive", "plugged")


def devices_hash(nics: list[dict[str, Any]]) -> str:
    """A stable digest of the vNICs, as a decimal string like VDSM's ``hash``."""
    text = json.dumps(sorted(nics, key=lambda n: str(n.get("macAddr"))), sort_keys=True)
    digest = hashlib.sha256(text.encode()).digest()
    return str(int.from_bytes(digest[:8], "big", signed=True))


def nic_view(nic: dict[str, Any]) -> dict[str, Any]:
    """The four-state view of one vNIC: plugged or not, linked or not, and where."""
    view = {k: nic.get(k) for k in _NIC_FIELDS}
    view["state"] = (
        f"{'plugged' if nic.get('plugged') else 'unplugged'}-"
        f"{'linked' if nic.get('linkActive') else 'unlinked'}"
    )
    return view


@dataclass(frozen=True)
class _Seen:
    status: str
    hash: str
    nics: dict[str, dict[str, Any]]  # MAC -> view


class Events:
    def __init__(self, publish: Publish, clock: Callable[[], float] = time.monotonic) -> None:
        self._publish = publish
        self._clock = clock
        self._seen: dict[str, _Seen] = {}

    def observe(self, vm: dict[str, Any]) -> None:
        """Publish what changed in ``vm`` since it was last seen."""
        vm_id = str(vm["vmID"])
        nics = {str(n["macAddr"]): nic_view(n) for n in vm["nics"]}
        now = _Seen(str(vm["status"]), devices_hash(vm["nics"]), nics)
        before = self._seen.get(vm_id)
        self._seen[vm_id] = now
        if before is None or (before.status, before.hash) != (now.status, now.hash):
            self._notify(VM_STATUS, vm_id, {"status": now.status, "hash": now.hash})
        old = before.nics if before is not None else {}
        changed = [view for mac, view in nics.items() if old.get(mac) != view]
        changed += [{**view, "state": "removed"} for mac, view in old.items() if mac not in nics]
        if changed:
            self._notify(NIC_CHANGED, vm_id, {"nics": changed})

    def vm_gone(self, vm_id: str) -> None:
        """The VM no longer exists: it is Down, once."""
        if self._seen.pop(vm_id, None) is not None:
            self._notify(VM_STATUS, vm_id, {"status": "Down"})

    def sync(self, vms: list[dict[str, Any]]) -> None:
        """Observe every VM there is; those no longer listed are gone."""
        for vm in vms:
            self.observe(vm)
        listed = {str(vm["vmID"]) for vm in vms}
        for vm_id in [v for v in self._seen if v not in listed]:
            self.vm_gone(vm_id)

    def _notify(self, kind: str, vm_id: str, body: dict[str, Any]) -> None:
        params = {vm_id: body, "notify_time": int(self._clock() * 1000)}
        message = json.dumps({"jsonrpc": "2.0", "method": kind + vm_id, "params": params})
        log.debug("event %s", message)
        self._publish(message)
