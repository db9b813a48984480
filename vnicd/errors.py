"""One error hierarchy for vnicd.

Every error has a stable numeric ``code`` (VDSM's where VDSM has one), a stable
``reason`` string, and named fields (VM, vNIC, field, cause) that build its message.
Caller errors (:class:`RequestError`) and host failures (:class:`HostError`) are
separate branches. Only the dispatcher turns these into JSON-RPC error objects.

The core names a request's fields in its own words (``nic``, ``alias``, ``mac``,
``network``, ``link``, ``model``, ``xml``); the API layer renames them to the wire's
(:meth:`VnicdError.rename_field`), so a message always names what the caller sent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

INVALID_PARAMS = -32602


class VnicdError(Exception):
    """Base of every error vnicd reports to a caller. ``{field}`` in the message stands
    for the ``field`` it names."""

    code: ClassVar[int] = 100
    reason: ClassVar[str] = "general"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self._template = message
        self.fields = {k: v for k, v in fields.items() if v is not None}

    @property
    def message(self) -> str:
        return self._template.replace("{field}", str(self.fields.get("field", "")))

    def __str__(self) -> str:
        return self.message

    def rename_field(self, names: Mapping[str, str]) -> None:
        field = self.fields.get("field")
        if isinstance(field, str) and field in names:
            self.fields["field"] = names[field]

    def data(self) -> dict[str, Any]:
        return {"reason": self.reason, **self.fields}


class RequestError(VnicdError):
    """The request itself is wrong; nothing was changed."""


class HostError(VnicdError):
    """The host failed to do what a valid request asked."""


class InvalidParameter(RequestError):
    code = INVALID_PARAMS
    reason = "invalidParameter"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid parameter {{field}}: {problem}", field=field)


class MissingParameter(RequestError):
    code = 11
    reason = "MissParam"

    def __init__(self, field: str) -> None:
        super().__init__("missing required parameter {field}", field=field)


class NoSuchVM(RequestError):
    code = 1
    reason = "noVM"

    def __init__(self, vm: str) -> None:
        super().__init__(f"virtual machine {vm} does not exist", vmID=vm)


class VMExists(RequestError):
    code = 4
    reason = "exist"

    def __init__(self, vm: str) -> None:
        super().__init__(f"virtual machine {vm} already exists", vmID=vm)


class UpdateDeviceError(RequestError):
    """A VM.updateDevice request that cannot be carried out as asked."""

    code = 56
    reason = "updateDevice"


class NoSuchNic(UpdateDeviceError):
    reason = "noNic"

    def __init__(self, vm: str, nic: str, field: str) -> None:
        super().__init__(f"VM {vm} has no vNIC {nic}", vmID=vm, nic=nic, field=field)


class UnknownNetwork(UpdateDeviceError):
    reason = "noNetwork"

    def __init__(self, vm: str, nic: str, network: str) -> None:
        super().__init__(
            f"cannot wire vNIC {nic} of VM {vm}: network {network!r} "
            "maps to no bridge or libvirt network on this host",
            vmID=vm,
            nic=nic,
            field="network",
            network=network,
        )


class UnsupportedChange(UpdateDeviceError):
    reason = "unsupportedChange"

    def __init__(self, vm: str, nic: str, field: str, problem: str) -> None:
        super().__init__(
            f"cannot change {{field}} of vNIC {nic} of VM {vm}: {problem}",
            vmID=vm,
            nic=nic,
            field=field,
        )


class CreateError(HostError):
    code = 9
    reason = "createErr"


class UpdateDeviceFailed(HostError):
    """The host failed part-way through an update; ``rolledBack`` says what was restored."""

    code = 56
    reason = "updateDeviceFailed"


class GeneralError(HostError):
    code = 100
    reason = "general"


class HotplugNicError(VnicdError):
    """A vNIC could not be plugged; nothing was changed."""

    code = 49
    reason = "hotplugNic"


class HotunplugNicError(VnicdError):
    """A vNIC could not be unplugged; it stays plugged."""

    code = 50
    reason = "hotunplugNic"


class Recovering(HostError):
    """vnicd has not finished rebuilding its view of the host since it started: retry later."""

    code = 99
    reason = "recovery"

    def __init__(self) -> None:
        super().__init__("vnicd is recovering its view of the host (starting up): retry later")


class HookError(HostError):
    """A hook vetoed the change, failed or timed out; nothing was changed."""

    code = 1500
    reason = "hookError"

    def __init__(self, hook: str, script: str, problem: str, stderr: str = "") -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(
            f"hook {hook}/{script} {problem}{detail}", hook=hook, script=script, stderr=stderr
        )


class NotImplementedFeature(RequestError):
    """The request asks for something vnicd does not do (yet); nothing was changed."""

    code = 44
    reason = "noimpl"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{{field}}: {problem} is not implemented by vnicd", field=field)
