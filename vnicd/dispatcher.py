"""JSON-RPC 2.0 dispatch of the schema's verbs. Knows no transport: a message in, a message out."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from jsonrpcserver import Error, Result, Success, async_dispatch

from vnicd import caller as callers
from vnicd import errors
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
    ) -> None:
        if set(handlers) != set(schema.verbs):
            raise RuntimeError(
                f"schema and handlers differ: {sorted(set(handlers) ^ set(schema.verbs))}"
            )
        self._schema = schema
        self._service = service
        self._methods = {
            name: self._bind(verb, handlers[name]) for name, verb in schema.verbs.items()
        }

    def _bind(
        self, verb: Verb, handler: Callable[[Service, Params], Awaitable[Any]]
    ) -> Callable[..., Awaitable[Result]]:
        async def call(*args: Any, **params: Any) -> Result:
            try:
                if args:
                    raise errors.InvalidParameter("params", "pass parameters by name, as an object")
                self._schema.validate_params(verb, params)
                return Success(await handler(self._service, params))
            except errors.VnicdError as e:
                log.warning("%s failed: %s", verb.name, e.message)
                return Error(e.code, e.message, e.data())
            except Exception as e:
                log.exception("%s failed unexpectedly", verb.name)
                return Error(
                    errors.GeneralError.code,
                    f"{verb.name} failed: {type(e).__name__}: {e}",
                    {"reason": errors.GeneralError.reason},
                )

        return call

    async def handle(self, message: str, caller: callers.Caller = callers.LOCAL) -> str:
        """The JSON-RPC response to one message; empty for notifications.

        ``caller`` is current while the message is handled, so its flow id reaches every
        log line about it (each transport task runs in its own context copy).
        """
        token = callers.current.set(caller)
        try:
            return await async_dispatch(message, methods=self._methods)
        finally:
            callers.current.reset(token)
