"""JSON-RPC 2.0 dispatch of the schema's verbs. Knows no transport: a message in, a message out."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from jsonrpcserver import Error, Result, Success, async_dispatch
from jsonrpcserver.main import default_validator

from vnicd import caller as callers
from vnicd import errors, logs
from vnicd.schema import Schema, Verb
from vnicd.verbs import HANDLERS, Params

log = logging.getLogger(__name__)

Service = Any  # what HANDLERS expect; kept opaque here


class Dispatcher:
    def __init__(
        self,
        schema: Schema,
        service: Service,
        handlers: dict[str, Callable[[Service, Params], Awaitable[Any]]] = HANDLERS,
        *,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        """``ready`` says whether vnicd has recovered its view of the host; until then every
        verb answers :class:`errors.Recovering`."""
        if set(handlers) != set(schema.verbs):
            raise RuntimeError(
                f"schema and handlers differ: {sorted(set(handlers) ^ set(schema.verbs))}"
            )
        self._schema = schema
        self._service = service
        self._ready = ready
        self._closing = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._methods = {
            name: self._bind(verb, handlers[name]) for name, verb in schema.verbs.items()
        }

    def _bind(
        self, verb: Verb, handler: Callable[[Service, Params], Awaitable[Any]]
    ) -> Callable[..., Awaitable[Result]]:
        async def call(*args: Any, **params: Any) -> Result:
            extra = _fields(verb.name, params)
            log.info("%s started", verb.name, extra=extra)
            started = time.monotonic()
            outcome = "ok"
            self._in_flight += 1
            self._idle.clear()
            try:
                if self._closing:
                    raise errors.GeneralError("vnicd is stopping: retry when it is back")
                if not self._ready():
                    raise errors.Recovering()
                if args:
                    raise errors.InvalidParameter("params", "pass parameters by name, as an object")
                self._schema.validate_params(verb, params)
                return Success(await handler(self._service, params))
            except errors.VnicdError as e:
                outcome = f"error {e.code}"
                log.warning("%s failed: %s", verb.name, e.message, extra=extra)
                return Error(e.code, e.message, e.data())
            except Exception as e:
                outcome = f"error {errors.GeneralError.code}"
                log.exception("%s failed unexpectedly", verb.name, extra=extra)
                return Error(
                    errors.GeneralError.code,
                    f"{verb.name} failed: {type(e).__name__}: {e}",
                    {"reason": errors.GeneralError.reason},
                )
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()
                ms = (time.monotonic() - started) * 1000
                log.info("%s ended: %s in %.1f ms", verb.name, outcome, ms, extra=extra)

        # jsonrpcserver binds each request to the method's signature; computed once here
        call.__signature__ = inspect.signature(call)  # type: ignore[attr-defined]
        return call

    async def drain(self, timeout: float) -> bool:
        """Answer new calls with an error and wait for those in flight; False on timeout."""
        self._closing = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d calls still running after %.3g s", self._in_flight, timeout)
            return False
        return True

    async def handle(self, message: str, caller: callers.Caller = callers.LOCAL) -> str:
        """The JSON-RPC response to one message; empty for notifications.

        ``caller`` is current while the message is handled, so its flow id reaches every
        log line about it (each transport task runs in its own context copy).
        """
        token = callers.current.set(caller)
        try:
            return await async_dispatch(message, methods=self._methods, validator=_validate)
        finally:
            callers.current.reset(token)


_KEYS = frozenset({"jsonrpc", "method", "params", "id"})


def _validate(request: Any) -> Any:
    """jsonrpcserver's JSON-RPC 2.0 schema check, with the common case decided first.

    A single request with only the four members, each of the type the schema allows,
    is what the schema accepts; checking that directly costs a microsecond, the schema
    validator a tenth of a millisecond. Anything else goes to the schema validator,
    which decides, and words the error.
    """
    if (
        type(request) is dict
        and request.keys() <= _KEYS
        and request.get("jsonrpc") == "2.0"
        and type(request.get("method")) is str
        and type(request.get("params", {})) in (dict, list)
        and type(request.get("id")) in (str, int, float, type(None))
    ):
        return request
    return default_validator(request)


def _fields(verb: str, params: dict[str, Any]) -> dict[str, str]:
    """Journal fields for a call: its verb, VM and vNIC as the request names them."""
    dev = params.get("params")
    dev = dev if isinstance(dev, dict) else {}
    text = {k: v if isinstance(v, str) else None for k, v in dev.items()}
    vm = params.get("vmID")
    return logs.fields(
        verb=verb,
        vm_id=vm if isinstance(vm, str) else None,
        mac=text.get("macAddr"),
        alias=text.get("alias"),
    )
