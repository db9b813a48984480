"""An engine-side client for the tests: the real ``stomp.py`` library over mutual TLS.

It does what oVirt's engine and vdsm-client do: CONNECT, SUBSCRIBE to a private reply
destination, SEND JSON-RPC to ``jms.topic.vdsm_requests`` with ``reply-to``, and route
MESSAGEs by their ``subscription`` header; optionally it subscribes to the events.
"""

from __future__ import annotations

import itertools
import json
import queue
import socket
import ssl
import uuid
from pathlib import Path
from typing import Any, Self

import stomp
from stomp.utils import Frame

from tests.harness import SCHEMA
from tests.pki import Pair
from vnicd.client import RpcError

EVENTS = "jms.queue.events"


class EngineClient(stomp.ConnectionListener):  # type: ignore[misc]
    def __init__(
        self,
        port: int,
        ca: Path | None,
        cert: Pair | None,
        *,
        heartbeats: tuple[int, int] = (0, 0),
        timeout: float = 30,
    ) -> None:
        host = ("127.0.0.1", port)
        self.conn = stomp.Connection12(
            [host], heartbeats=heartbeats, reconnect_attempts_max=1, timeout=5
        )
        if ca is not None:
            self.conn.set_ssl(
                for_hosts=[host],
                ca_certs=str(ca),
                cert_file=str(cert.cert) if cert else None,
                key_file=str(cert.key) if cert else None,
            )
        self.conn.set_listener("engine", self)
        self.timeout = timeout
        self.reply_to = str(uuid.uuid4())
        self.sub_id = str(uuid.uuid4())
        self.inbox: dict[str, queue.Queue[Frame]] = {
            self.sub_id: queue.Queue(),
            "events": queue.Queue(),
        }
        self.errors: queue.Queue[Frame] = queue.Queue()
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        self.conn.connect(wait=True)
        self.conn.subscribe(destination=self.reply_to, id=self.sub_id, ack="auto")
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.conn.is_connected():
            self.conn.disconnect()

    def on_message(self, frame: Frame) -> None:
        self.inbox[frame.headers["subscription"]].put(frame)

    def on_error(self, frame: Frame) -> None:
        self.errors.put(frame)

    def subscribe_events(self) -> None:
        self.conn.subscribe(destination=EVENTS, id="events", ack="auto")

    def send(self, body: str, flow_id: str | None = None) -> None:
        headers = {"reply-to": self.reply_to}
        if flow_id:
            headers["ovirtCorrelationId"] = flow_id
        self.conn.send(
            destination="jms.topic.vdsm_requests",
            body=body,
            content_type="application/json",
            headers=headers,
        )

    def response(self, timeout: float | None = None) -> Frame:
        return self.inbox[self.sub_id].get(timeout=timeout or self.timeout)

    def request(self, body: str, flow_id: str | None = None) -> Any:
        self.send(body, flow_id)
        return json.loads(self.response().body)

    def call(self, method: str, flow_id: str | None = None, **params: Any) -> Any:
        """One request, as vdsm-client sends it (a batch of one); the result, schema-checked."""
        request_id = str(uuid.uuid4())
        batch = [{"jsonrpc": "2.0", "method": method, "params": params, "id": request_id}]
        reply = self.request(json.dumps(batch), flow_id)
        [response] = reply if isinstance(reply, list) else [reply]
        assert response["id"] == request_id and response["jsonrpc"] == "2.0"
        if "error" in response:
            err = response["error"]
            raise RpcError(err["code"], err["message"], err.get("data"))
        SCHEMA.validate_result(SCHEMA.verbs[method], response["result"])
        return response["result"]

    def events(self, timeout: float) -> list[dict[str, Any]]:
        """Every event that arrives within ``timeout`` seconds."""
        found = []
        try:
            while True:
                found.append(json.loads(self.inbox["events"].get(timeout=timeout).body))
        except queue.Empty:
            return found


def tls_socket(port: int, ca: Path, cert: Pair | None) -> ssl.SSLSocket:
    """A raw TLS connection, handshake done, for tests below the STOMP client library."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(sock)


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """All the server sends until it closes the connection (or fails the TLS session)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    return data
