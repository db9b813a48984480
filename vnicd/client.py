"""Small blocking JSON-RPC clients: vnicd's Unix socket, and the engine wire (STOMP over TLS).

Both offer ``call(method, **params)``; the CLI uses whichever its options name.
"""

from __future__ import annotations

import itertools
import json
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any, Protocol, Self

from vnicd import stomp

REQUESTS = "jms.topic.vdsm_requests"


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"error {code}: {message}")
        self.code = code
        self.message = message
        self.data = data


class Client:
    def __init__(self, path: Path | str, timeout: float | None = 120.0) -> None:
        """``timeout``: seconds to wait for an answer (None: as long as vnicd takes)."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
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


class RpcClient(Protocol):
    def call(self, method: str, **params: Any) -> Any: ...

    def __enter__(self) -> Self: ...

    def __exit__(self, *_exc: object) -> None: ...


def tls_client_context(cert_file: Path, key_file: Path, ca_file: Path) -> ssl.SSLContext:
    """As vdsm-client: the server must be signed by the CA; its host name is not checked."""
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def _result(response: Any) -> Any:
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    if not isinstance(response, dict) or response.get("jsonrpc") != "2.0":
        raise ConnectionError(f"not a JSON-RPC response: {str(response)[:200]}")
    if "error" in response:
        err = response["error"]
        raise RpcError(err["code"], err["message"], err.get("data"))
    return response["result"]


class StompClient:
    """JSON-RPC over STOMP 1.2, one request at a time, as vdsm-client speaks it to VDSM."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        timeout: float = 60.0,
        flow_id: str | None = None,
    ) -> None:
        self._timeout = timeout
        self._flow_id = flow_id
        self._parser = stomp.Parser()
        self._frames: list[stomp.Frame] = []
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            self._sock = tls.wrap_socket(sock) if tls is not None else sock
        except BaseException:
            sock.close()
            raise
        self._reply_to = str(uuid.uuid4())
        self._sub_id = str(uuid.uuid4())
        try:
            # Ask for heart-beats: a slow verb then never leaves the connection silent.
            self._write(stomp.Frame("CONNECT", {"accept-version": "1.2", "heart-beat": "0,10000"}))
            connected = self._read(time.monotonic() + timeout)
            if connected.command != "CONNECTED":
                raise ConnectionError(f"vnicd refused the connection: {_message(connected)}")
            self._write(
                stomp.Frame("SUBSCRIBE", {"destination": self._reply_to, "id": self._sub_id})
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> Any:
        request_id = str(uuid.uuid4())
        request = {"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}
        headers = {"destination": REQUESTS, "reply-to": self._reply_to}
        headers["content-type"] = "application/json"
        if self._flow_id:
            headers["ovirtCorrelationId"] = self._flow_id
        self._write(stomp.Frame("SEND", headers, json.dumps(request).encode()))
        deadline = time.monotonic() + self._timeout
        while True:
            frame = self._read(deadline)
            if frame.command == "ERROR":
                raise ConnectionError(f"vnicd closed the connection: {_message(frame)}")
            if frame.command != "MESSAGE" or frame.headers.get("subscription") != self._sub_id:
                continue
            response = json.loads(frame.body)
            if isinstance(response, dict) and "id" not in response:
                continue  # a notification
            return _result(response)

    def _write(self, frame: stomp.Frame) -> None:
        self._sock.sendall(frame.encode())

    def _read(self, deadline: float) -> stomp.Frame:
        while not self._frames:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no response from vnicd in time")
            self._sock.settimeout(left)
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("vnicd closed the connection")
            self._frames += self._parser.feed(data)
        return self._frames.pop(0)


def _message(frame: stomp.Frame) -> str:
    return frame.headers.get("message") or frame.body.decode(errors="replace") or frame.command
