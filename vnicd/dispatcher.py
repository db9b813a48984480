"""JSON-RPC 2.0 dispatch of the schema's verbs. Knows no transport: a message in, a message out.

The envelope (JSON-RPC 2.0: a request object or a batch of them, notifications, the
standard error codes) is handled here, in a few lines; the parameters are checked
against vnicd's own schema. (A general JSON-RPC library checked every envelope against
a JSON schema, a tenth of a millisecond a call, and its imports took 6 MiB.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vnicd import caller as callers
from vnicd import errors, logs
from vnicd.schema import Schema, Verb
from vnicd.verbs import HANDLERS, Params

log = logging.getLogger(__name__)

Service = Any  # what HANDLERS expect; kept opaque here
Response = dict[str, Any]

# JSON-RPC 2.0's own errors (https://www.jsonrpc.org/specification#error_object)
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603
MAX_BATCH = 1000  # requests in one batch
_MEMBERS = frozenset({"jsonrpc", "method", "params", "id"})
_ID_TYPES = (str, int, float, type(None))


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
    ) -> Callable[[Any], Awaitable[Response]]:
        """The verb as a call: its parameters in, a response's result or error member out."""

        async def call(params: Any) -> Response:
            extra = _fields(verb.name, params if isinstance(params, dict) else {})
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
                if not isinstance(params, dict):
                    raise errors.InvalidParameter("params", "pass parameters by name, as an object")
                self._schema.validate_params(verb, params)
                return {"result": await handler(self._service, params)}
            except errors.VnicdError as e:
                outcome = f"error {e.code}"
                log.warning("%s failed: %s", verb.name, e.message, extra=extra)
                return _error(e.code, e.message, e.data())
            except Exception as e:
                outcome = f"error {errors.GeneralError.code}"
                log.exception("%s failed unexpectedly", verb.name, extra=extra)
                return _error(
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
        """The JSON-RPC response to one message; empty when it held only notifications.

        ``caller`` is current while the message is handled, so its flow id reaches every
        log line about it (each transport task runs in its own context copy).
        """
        token = callers.current.set(caller)
        try:
            try:
                request = json.loads(message, parse_constant=_not_json)
            except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
                return _encode(_response(None, _error(PARSE_ERROR, f"Parse error: {e}")))
            if isinstance(request, list):
                # a batch: one request after the other, so a connection's requests in
                # flight stay as many as its messages
                if not request or len(request) > MAX_BATCH:
                    return _encode(_invalid(f"a batch holds 1 to {MAX_BATCH} requests"))
                answers = [a for a in [await self._one(r) for r in request] if a is not None]
                return f"[{', '.join(_encode(a) for a in answers)}]" if answers else ""
            response = await self._one(request)
            return "" if response is None else _encode(response)
        finally:
            callers.current.reset(token)

    async def _one(self, request: Any) -> Response | None:
        """One request's response; None for a notification (run, but not answered)."""
        problem = _envelope_problem(request)
        if problem is not None:
            return _invalid(problem)
        call = self._methods.get(request["method"])
        if call is None:
            outcome = _error(METHOD_NOT_FOUND, f"Method not found: {request['method']}")
        else:
            outcome = await call(request.get("params", {}))
        return _response(request["id"], outcome) if "id" in request else None


def _envelope_problem(request: Any) -> str | None:
    """What makes ``request`` no JSON-RPC 2.0 request object, or None."""
    if not isinstance(request, dict):
        return "a request must be an object"
    extra = request.keys() - _MEMBERS
    if extra:
        return f"unknown member {sorted(extra)[0]!r}"
    if request.get("jsonrpc") != "2.0":
        return 'jsonrpc must be "2.0"'
    if not isinstance(request.get("method"), str):
        return "method must be a string"
    if not isinstance(request.get("params", {}), dict | list):
        return "params must be an object or an array"
    request_id = request.get("id")
    if type(request_id) not in _ID_TYPES or request_id in (math.inf, -math.inf):
        return "id must be a string, a number or null"
    return None


def _not_json(constant: str) -> Any:
    """NaN and Infinity: Python's json reads them, JSON has no such numbers."""
    raise ValueError(f"{constant} is not a JSON number")


def _error(code: int, message: str, data: Any = None) -> Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"error": error}


def _response(request_id: Any, outcome: Response) -> Response:
    return {"jsonrpc": "2.0", **outcome, "id": request_id}


def _invalid(problem: str) -> Response:
    return _response(None, _error(INVALID_REQUEST, f"Invalid request: {problem}"))


def _encode(response: Response) -> str:
    try:
        return json.dumps(response, allow_nan=False)
    except (TypeError, ValueError) as e:  # a handler returned what JSON cannot carry
        log.error("cannot encode a response: %s", e)
        error = _error(INTERNAL_ERROR, f"Internal error: {e}")
        return json.dumps(_response(response.get("id"), error))


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
