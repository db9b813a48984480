"""Fuzzing both wires with generated requests: every one answered (or its connection closed),
none hangs, none crashes vnicd, and none changes the host.

Requests are generated from the API schema (every verb, aimed at the test VMs, with at least
one field made bad: a wrong type, a malformed value, an unknown or missing field, an unknown
VM, vNIC or network, a feature vnicd does not do) and without it (any JSON, any bytes, any
STOMP frame). The host's fingerprint (live and saved XML, every link's bridge and state) is
compared after every request that reached a verb, and every 50; a spy counts every call that
could change the host. ``VNICD_ABUSE=long`` runs 10,000 of each instead of the default few.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from xml.sax.saxutils import quoteattr

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests import abuse
from tests.abuse import NASTY_NAMES, STABLE_CODES, RawStomp, Tally, Target, aimed
from tests.harness import SCHEMA
from vnicd import rpc_unix
from vnicd.stomp import COMMANDS, Frame

__all__ = ["aimed"]  # the fixture, used by name

EXAMPLES = 10_000 if abuse.LONG else 400
CHECK_EVERY = 50
READ_ONLY = {"Host.ping2", "Host.getCapabilities", "Host.getVMList", "VM.getInfo"}
# Codes a request gets before any verb runs: it changed nothing by construction.
UNDISPATCHED = {-32700, -32600, -32601, -32602, 11}
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=not abuse.LONG,
    phases=[Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
)

Spec = dict[str, Any]
Params = dict[str, Any]


# Values of any JSON type, small and large.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(NASTY_NAMES)
)
junk = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Placeholders replaced in the encoded request: too big or too deep to build as objects.
HUGE = "\x00huge\x00"
DEEP = "\x00deep\x00"
DEEP_LIST = "\x00deep list\x00"
DEEPER = "\x00deeper\x00"
BIG: dict[str, Callable[[], str]] = {
    HUGE: lambda: json.dumps("x" * 2_000_000),
    DEEP: lambda: '{"a": ' * 200 + "[]" + "}" * 200,
    DEEP_LIST: lambda: "[" * 200 + "]" * 200,
    DEEPER: lambda: "[" * 5000 + "]" * 5000,
}


def encode(message: Any) -> str:
    text = json.dumps(message)
    for marker, make in BIG.items():
        if json.dumps(marker)[1:-1] in text:
            text = text.replace(json.dumps(marker), make())
    return text


def fits(spec: Spec, value: Any) -> bool:
    """Whether ``value`` has the JSON type ``spec`` asks for (a lenient boolean's strings too)."""
    spec = SCHEMA.resolve(spec)
    if "oneOf" in spec:
        return any(fits(s, value) for s in spec["oneOf"])
    kind = spec.get("type", "string")
    if kind == "boolean" and spec.get("lenient") and isinstance(value, str):
        return value.lower() in ("true", "false")
    return {
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[kind]


def engine_xml(alias: str, mac: str, extra: str = "") -> str:
    return (
        f"<hotplug><devices><interface type='bridge'><alias name={quoteattr(alias)}/>"
        f"<mac address={quoteattr(mac)}/>{extra}</interface></devices></hotplug>"
    )


def valid(t: Target, key: str, spec: Spec) -> st.SearchStrategy[Any]:
    """A realistic value for a field, aimed at the test VMs."""
    spec = SCHEMA.resolve(spec)
    if "oneOf" in spec:
        return valid(t, key, spec["oneOf"][0])
    vm_ids, aliases, macs = (sorted({n[i] for n in t.nics}) for i in range(3))
    kind = spec.get("type", "string")
    if "enum" in spec:
        return st.sampled_from(spec["enum"])
    if kind == "boolean":
        lenient = (
            st.sampled_from(["true", "false", "True"]) if spec.get("lenient") else st.nothing()
        )
        return st.booleans() | lenient
    if kind == "integer":
        return st.integers(0, 1000)
    if kind == "array":
        if key in ("portMirroring", "filterParameters"):
            return st.just([])
        return st.lists(valid(t, key, spec.get("items", {})), max_size=2)
    if kind == "object":
        fields = spec.get("properties")
        if fields is None:
            return st.just({})
        required = {k: valid(t, k, s) for k, s in fields.items() if s.get("required")}
        optional = {k: valid(t, k, s) for k, s in fields.items() if not s.get("required")}
        return st.fixed_dictionaries(required, optional=optional)
    fmt = spec.get("format")
    if fmt == "uuid":
        return st.sampled_from(vm_ids)
    if fmt == "mac":
        return st.sampled_from(macs)
    if fmt == "alias":
        return st.sampled_from(aliases)
    if fmt in ("network", "ifname"):
        return st.sampled_from(t.networks)
    if key == "xml":
        return st.builds(
            engine_xml,
            st.sampled_from(aliases),
            st.sampled_from(macs),
            st.sampled_from(["", "<link state='down'/>", "<source bridge='vt-b'/>"]),
        )
    if key == "nicModel":
        return st.just("virtio")
    if key == "filter":
        return st.just("")
    return st.text(max_size=10)


def slots(spec_fields: dict[str, Spec], value: Params, path: tuple[str, ...] = ()) -> list[Any]:
    """Every (path, spec, parent fields) of a request's params, objects within included."""
    found: list[Any] = [(path, None, spec_fields)]
    for key, spec in spec_fields.items():
        if key not in value:
            continue
        found.append(((*path, key), SCHEMA.resolve(spec), spec_fields))
        inner = SCHEMA.resolve(spec)
        if inner.get("type") == "object" and "properties" in inner and isinstance(value[key], dict):
            found += slots(inner["properties"], value[key], (*path, key))
    return found


def at(params: Params, path: tuple[str, ...]) -> Params:
    for key in path:
        params = params[key]
    return params


@st.composite
def break_one(draw: st.DrawFn, params: Params, fields: dict[str, Spec]) -> str:
    """Make one field of ``params`` bad, in place; returns how."""
    path, spec, parent = draw(st.sampled_from(slots(fields, params)))
    if spec is None:  # an object: a field it does not have
        key = draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in parent))
        at(params, path)[key] = draw(junk)
        return "unknown field"
    holder, key = at(params, path[:-1]), path[-1]
    ways = ["wrong type", "huge", "deep"]
    if spec.get("required"):
        ways.append("missing")
    if "format" in spec:
        ways.append("malformed")
    if "enum" in spec:
        ways.append("not in enum")
    how = draw(st.sampled_from(ways))
    if how == "missing":
        del holder[key]
    elif how == "malformed":
        holder[key] = draw(st.sampled_from(NASTY_NAMES))
    elif how == "not in enum":
        holder[key] = draw(st.text(max_size=12).filter(lambda v: v not in spec["enum"]))
    elif how == "huge" and spec.get("type", "string") != "string":
        holder[key] = HUGE
    elif how == "deep":  # of another type than the field's: an object may be any object
        deep = [DEEP_LIST] if spec.get("type") == "object" else [DEEP, DEEP_LIST]
        holder[key] = draw(st.sampled_from([*deep, DEEPER]))
    else:
        holder[key] = draw(junk.filter(lambda v: not fits(spec, v)))
    return how


def refusal(verb: str, params: Params, draw: st.DrawFn, t: Target) -> str | None:
    """Make a well-formed request one vnicd must refuse for what it names; None if it can't."""
    dev: Any = params.get("params")
    ways = []
    if "vmID" in params and verb != "VM.create":
        ways.append("unknown VM")
    if verb == "VM.updateDevice" and isinstance(dev, dict) and "xml" not in dev:
        ways += ["unknown vNIC", "unknown network", "model change", "noimpl"]
    if verb == "VM.hotunplugNic" and isinstance(dev, dict):
        ways.append("unknown vNIC")
    if not ways:
        return None
    how = draw(st.sampled_from(ways))
    if how == "unknown VM":
        params["vmID"] = abuse.new_uuid()
        if isinstance(dev, dict) and "vmId" in dev:
            dev["vmId"] = params["vmID"]
    elif how == "unknown vNIC":
        for key in ("alias", "macAddr", "xml", "nic"):
            dev.pop(key, None)
        dev["alias"] = "net9"
    elif how == "unknown network":
        dev["network"] = "nosuch0"
    elif how == "model change":
        dev["nicModel"] = "e1000"
    else:
        dev["specParams"] = {"inbound": {"average": 10}}
    return how


@st.composite
def broken_request(draw: st.DrawFn, t: Target) -> tuple[str, Params, str]:
    """A request for a schema verb, aimed at the test VMs, made bad in at least one way."""
    verb = draw(st.sampled_from(sorted(SCHEMA.verbs)))
    fields = SCHEMA.verbs[verb].params
    params: Params = draw(valid(t, "", {"type": "object", "properties": fields}))
    if verb == "VM.create" and "vmParams" in params:
        params["vmParams"]["xml"] = draw(creations(t))
    hows = []
    for _ in range(draw(st.integers(1, 3))):
        how = refusal(verb, params, draw, t) if draw(st.booleans()) else None
        hows.append(how or draw(break_one(params, fields)))
    return verb, params, "+".join(sorted(set(hows)))


def creations(t: Target) -> st.SearchStrategy[str]:
    """VM.create's XML, none of it a VM that could start: malformed, not a domain, a copy
    of a running VM (its name and uuid taken), a domain whose vNIC names are nasty."""
    live = list(t.domains)
    nasty = st.sampled_from(NASTY_NAMES).map(
        lambda n: live[0].replace("<source bridge='vt-a'", f"<source bridge={quoteattr(n)}")
    )
    return st.sampled_from(live) | nasty | st.text(max_size=40) | st.just("<domain")


@st.composite
def message(draw: st.DrawFn, t: Target) -> tuple[str, str, Any]:
    """One message for either wire: (its kind, its text, the id of the one answer expected)."""
    kind = draw(
        st.sampled_from(["schema", "schema", "schema", "envelope", "batch", "json", "text"])
    )
    request_id = draw(st.integers(1, 10**9) | st.text(min_size=1, max_size=10))
    if kind == "schema":
        verb, params, how = draw(broken_request(t))
        request = {"jsonrpc": "2.0", "method": verb, "params": params, "id": request_id}
        return f"schema:{how}", encode(request), request_id
    if kind == "envelope":
        method = draw(st.sampled_from(sorted(SCHEMA.verbs)) | st.text(max_size=20) | junk)
        body: dict[str, Any] = {"jsonrpc": draw(st.sampled_from(["2.0", "1.0", 2.0]))}
        body["method"] = method
        for key in draw(st.sets(st.sampled_from(["params", "id"]))):
            body[key] = draw(junk)
        body.update(draw(st.dictionaries(st.text(max_size=8), junk, max_size=2)))
        return "envelope", encode(body), None
    if kind == "batch":
        items = draw(st.lists(broken_request(t), max_size=5))
        batch = [
            {"jsonrpc": "2.0", "method": v, "params": p, "id": i}
            for i, (v, p, _h) in enumerate(items)
        ]
        return "batch", encode(batch), None
    if kind == "json":
        return "json", encode(draw(junk)), None
    return (
        "text",
        draw(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
        None,
    )


class Checker:
    """Checks the host after requests that may have reached a verb, and every few."""

    def __init__(self, t: Target, tally: Tally) -> None:
        self.t = t
        self.tally = tally
        self.before = t.settled()
        self.since = 0

    def after(self, reached: bool, what: str) -> None:
        self.since += 1
        if not reached and self.since < CHECK_EVERY:
            return
        self.since = 0
        self.tally.host_checks += 1
        changed = abuse.differences(self.before, self.t.fingerprint())
        if changed:
            self.tally.host_changes += 1
            self.before = self.t.fingerprint()
        assert not changed, f"{what} changed the host: {changed}"


def judge(tally: Tally, responses: list[Any], expect_id: Any, what: str, sent: str | bytes) -> bool:
    """Check the answers to one message; True if it may have reached a verb. A result (no
    error) may only answer a verb that changes nothing, named in the message ``sent``."""
    reached = False
    for response in responses:
        tally.code(response)
        for r in response if isinstance(response, list) else [response]:
            assert isinstance(r, dict) and r.get("jsonrpc") == "2.0", (what, r)
            if "error" in r:
                code = r["error"]["code"]
                if code == 100:
                    tally.crashes += 1
                assert code in STABLE_CODES, (what, r)
                reached = reached or code not in UNDISPATCHED
            else:
                text = sent if isinstance(sent, str) else sent.decode(errors="replace")
                assert any(verb in text for verb in READ_ONLY), ("a result", what, r)
                reached = True
    if expect_id is not None:  # the last: on the engine wire, late answers may come first
        assert responses, (what, "no answer")
        only = responses[-1]
        unparsed = only["id"] is None and only["error"]["code"] in (-32700, -32600)
        assert "error" in only and (only["id"] == expect_id or unparsed), (what, only)
    return reached


Case = Any
One = Callable[[Case], tuple[bool, str]]  # a case -> (it may have reached a verb, what it was)


def drive(t: Target, tally: Tally, cases: st.SearchStrategy[Case], one: One, count: int) -> None:
    """Send ``count`` generated cases with ``one``; then vnicd must still answer, and have
    crashed, hung and changed nothing. In this process the host is checked as it goes, and
    vnicd's calls that could change it are spied on."""
    checker = Checker(t, tally) if t.vnicd is not None else None
    with abuse.spying() as spy, abuse.problems() as logged:

        @settings(FUZZ_SETTINGS, max_examples=count)
        @given(cases)
        def run(case: Case) -> None:
            tally.sent += 1
            reached, what = one(case)
            if checker is not None:
                checker.after(reached, what)
            assert spy.changing() == 0, (what, spy.args[-3:])

        try:
            run()
        finally:
            tally.crashes += len(logged.records)
    assert not logged.records, [r.getMessage()[:500] for r in logged.records[:5]]
    if checker is not None:
        checker.after(True, "the whole run")
    assert abuse.alive(t), "vnicd stopped answering"
    assert (tally.hangs, tally.crashes, tally.host_changes) == (0, 0, 0)


def unix_sender(t: Target, tally: Tally) -> One:
    """Each message on a connection of its own, half-closed: all its answers, then the end."""

    def one(case: tuple[str, str, Any]) -> tuple[bool, str]:
        kind, text, expect_id = case
        tally.kinds[kind.split(":")[0]] += 1
        what = f"{kind} {text[:300]!r}"
        exchange = abuse.unix_exchange(t.socket, text.encode(errors="surrogatepass") + b"\n")
        if exchange.hung:
            tally.hangs += 1
        assert not exchange.hung, f"no answer in {abuse.TIMEOUT} s to {what}"
        if exchange.responses:
            tally.answered += 1
        else:
            tally.closed += 1
        return judge(tally, exchange.responses, expect_id, what, text), what

    return one


def test_fuzz_unix_socket(aimed: Target, record_property: Callable[[str, object], None]) -> None:
    tally = Tally("fuzz: JSON-RPC on the Unix socket")
    try:
        drive(aimed, tally, message(aimed), unix_sender(aimed, tally), EXAMPLES)
    finally:
        tally.report(record_property)


# STOMP frames: a request in a SEND, or any frame, or any bytes.
header_text = st.text(max_size=30) | st.sampled_from(NASTY_NAMES) | st.just("a" * 9000)


def _utf8(text: str) -> str:
    return text.encode(errors="surrogatepass").decode(errors="replace")


@st.composite
def stomp_frame(draw: st.DrawFn) -> bytes:
    command = draw(st.sampled_from(sorted(COMMANDS)) | st.text(max_size=12))
    headers = draw(st.dictionaries(header_text, header_text, max_size=6))
    if draw(st.booleans()):
        headers.update(
            draw(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "destination": st.sampled_from(["jms.topic.vdsm_requests", "x", ""]),
                        "id": st.sampled_from(["s2", "", "abuse"]),
                        "receipt": st.text(max_size=5),
                        "accept-version": st.sampled_from(["1.2", "1.0", ""]),
                        "heart-beat": st.sampled_from(["0,0", "-1,5", "x", "1,1"]),
                    },
                )
            )
        )
    body = draw(st.binary(max_size=100))
    if draw(st.booleans()):
        headers = {_utf8(k): _utf8(v) for k, v in headers.items()}
        return Frame(_utf8(command), headers, body).encode()
    lines = [command] + [f"{k}:{v}" for k, v in headers.items()]
    return (
        "\n".join(lines).encode(errors="surrogatepass") + b"\n\n" + body.replace(b"\0", b"") + b"\0"
    )


@st.composite
def stomp_case(draw: st.DrawFn, t: Target) -> tuple[str, bytes, str, Any]:
    """(kind, bytes to send, the text of the request in them if any, the id expected back)."""
    kind = draw(st.sampled_from(["request", "request", "frame", "bytes"]))
    if kind == "request":
        what, text, expect_id = draw(message(t))
        return f"send {what}", RawStomp.request(text), text, expect_id
    if kind == "frame":
        frame = draw(stomp_frame())
        if re.match(rb"(UN)?SUBSCRIBE\b", frame) and b"s1" in frame:
            frame = frame.replace(b"s1", b"s9")  # leave the reply subscription alone
        return "frame", frame, "", None
    data = draw(st.binary(min_size=1, max_size=300)).replace(b"\0", b"") + b"\0"
    return "bytes", data, "", None


@contextlib.contextmanager
def engine_sender(t: Target, tally: Tally) -> Iterator[One]:
    """Cases on one STOMP connection (a new one after vnicd closed it). A case that expects
    no answer is followed by a ping on the same connection: it was read once that answers."""
    conn: list[RawStomp] = []
    sentinels = itertools.count()

    def connection() -> RawStomp:
        if conn and conn[0].closed:
            conn.pop().close()
        if not conn:
            conn.append(RawStomp(t.port, t.certs))
        return conn[0]

    def one(case: tuple[str, bytes, str, Any]) -> tuple[bool, str]:
        kind, data, _text, expect_id = case
        tally.kinds[kind.split(":")[0]] += 1
        what = f"{kind} {data[:300]!r}"
        stomp = connection()
        stomp.send(data)
        sentinel = expect_id is None
        if sentinel:
            expect_id = f"sentinel-{next(sentinels)}"
            stomp.send(stomp.request(abuse.PING.replace('"alive"', f'"{expect_id}"')))
        started = time.monotonic()
        frames = stomp.read(abuse.reply_to(expect_id, not sentinel), abuse.TIMEOUT)
        errors = [f for f in frames if f.command == "ERROR"]
        answered = bool(frames) and frames[-1].command in ("MESSAGE", "ERROR")
        if not answered and not stomp.closed:
            tally.hangs += 1
        assert answered or stomp.closed, f"nothing in {time.monotonic() - started:.0f} s: {what}"
        if errors:
            stomp.read(lambda f: False, 5)
            assert stomp.closed, "an ERROR frame must end the connection"
            tally.closed += 1
        else:
            tally.answered += 1
        replies = [json.loads(f.body) for f in frames if f.command == "MESSAGE"]
        if sentinel:
            mine = [r for r in replies if not (isinstance(r, dict) and r.get("id") == expect_id)]
            return judge(tally, mine, None, what, data), what
        return judge(tally, replies, expect_id if not errors else None, what, data), what

    try:
        yield one
    finally:
        for c in conn:
            c.close()


def test_fuzz_engine_wire(aimed: Target, record_property: Callable[[str, object], None]) -> None:
    tally = Tally("fuzz: STOMP frames on the engine wire")
    try:
        with engine_sender(aimed, tally) as one:
            drive(aimed, tally, stomp_case(aimed), one, EXAMPLES)
    finally:
        tally.report(record_property)


def test_one_connection_flooding_requests_is_bounded(aimed: Target) -> None:
    """Thousands of requests written at once, answers unread: vnicd reads no further than
    its per-connection limit, so its tasks stay bounded, and all are answered once read."""
    flood = 5000
    line = (abuse.PING + "\n").encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(aimed.socket))
        sock.setblocking(False)
        sent = 0
        data = line * flood
        deadline = time.monotonic() + 5
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += sock.send(data[sent:])
            except BlockingIOError:
                time.sleep(0.05)
        held = _requests_in_flight(aimed)
        sock.setblocking(True)
        sock.settimeout(abuse.TIMEOUT)
        if sent < len(data):
            sock.sendall(data[sent:])  # vnicd reads on as the answers are read
        sock.shutdown(socket.SHUT_WR)
        answers = b""
        while chunk := sock.recv(1 << 20):
            answers += chunk
    assert held <= rpc_unix.MAX_PENDING, f"{held} requests in flight for one connection"
    assert answers.count(b'"result": true') == flood


def _requests_in_flight(t: Target) -> int:
    """The Unix socket's request tasks in the session vnicd's event loop."""

    async def count() -> int:
        names = [getattr(task.get_coro(), "__qualname__", "") for task in asyncio.all_tasks()]
        return names.count("UnixServer._one")

    assert t.vnicd is not None
    return asyncio.run_coroutine_threadsafe(count(), t.vnicd.loop).result(10)
