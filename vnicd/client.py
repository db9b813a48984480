"""A small blocking JSON-RPC client for vnicd's Unix socket (the CLI's and the tests')."""

from __future__ import annotations

import itertools
import json
import socket
from pathlib import Path
from typing import Any, Self


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class Client:
    def __init__(self, path: Path | str, timeout: float = 120.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rwb")
        self._ids = itertools.count(1)

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def send(self, message: str) -> dict[str, Any]:
        """Send one raw message and read one response."""
        self._file.write(message.encode() + b"\n")
        self._file.flush()
        line = self._file.readline()
        if not line:
            raise ConnectionError("vnicd closed the connection")
        response: dict[str, Any] = json.loads(line)
        return response

    def call(self, method: str, **params: Any) -> Any:
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": next(self._ids)}
        response = self.send(json.dumps(request))
        if "error" in response:
            err = response["error"]
            raise RpcError(err["code"], err["message"], err.get("data"))
        return response["result"]
