"""The STOMP 1.2 codec, byte by byte: no sockets involved."""

from __future__ import annotations

import pytest

from vnicd import stomp
from vnicd.stomp import Frame, FrameError, FrameTooLarge, Limits, Parser, consume

SEND = (
    b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:r1\n"
    b"content-type:application/json\ncontent-length:12\n\n"
    b'{"a": "\x00b"}x\x00'
)


def test_one_frame_with_content_length_may_hold_nul() -> None:
    frame, used = consume(SEND)
    assert used == len(SEND)
    assert frame == Frame(
        "SEND",
        {
            "destination": "jms.topic.vdsm_requests",
            "reply-to": "r1",
            "content-type": "application/json",
            "content-length": "12",
        },
        b'{"a": "\x00b"}x',
    )


def test_nul_terminated_body_and_crlf_lines() -> None:
    data = b"SUBSCRIBE\r\nid:1\r\ndestination:d\r\n\r\nbody\x00rest"
    frame, used = consume(data)
    assert frame == Frame("SUBSCRIBE", {"id": "1", "destination": "d"}, b"body")
    assert data[used:] == b"rest"


def test_split_at_every_byte() -> None:
    for cut in range(1, len(SEND)):
        parser = Parser()
        assert parser.feed(SEND[:cut]) == []
        assert parser.partial
        [frame] = parser.feed(SEND[cut:])
        assert frame.body == b'{"a": "\x00b"}x'
        assert not parser.partial


def test_one_byte_at_a_time_with_heartbeats_between() -> None:
    data = b"\n\r\n" + SEND + b"\n\n" + Frame("DISCONNECT", {"receipt": "7"}).encode() + b"\n"
    parser = Parser()
    frames = [f for i in range(len(data)) for f in parser.feed(data[i : i + 1])]
    assert [f.command for f in frames] == ["SEND", "DISCONNECT"]
    assert frames[1].headers == {"receipt": "7"}
    assert not parser.partial


def test_several_frames_in_one_read() -> None:
    data = Frame("SUBSCRIBE", {"id": "a", "destination": "x"}).encode() + SEND + SEND
    assert [f.command for f in Parser().feed(data)] == ["SUBSCRIBE", "SEND", "SEND"]


def test_heartbeats_alone() -> None:
    assert consume(b"\n\n\r\n") == (None, 4)
    assert consume(b"\r") == (None, 0)
    assert consume(b"") == (None, 0)


def test_header_escaping_round_trip() -> None:
    value = "a:b\\c\nd\re"
    wire = Frame("MESSAGE", {"subscription": "s", "k:1": value}, b"x").encode()
    assert b"k\\c1:a\\cb\\\\c\\nd\\re" in wire
    frame, _ = consume(wire)
    assert frame is not None and frame.headers["k:1"] == value


def test_connect_headers_are_not_escaped() -> None:
    frame, _ = consume(b"CONNECT\naccept-version:1.2\nlogin:a\\b\n\n\x00")
    assert frame is not None and frame.headers["login"] == "a\\b"
    assert b"host:a\\b" in Frame("CONNECTED", {"host": "a\\b"}).encode()


def test_first_repeated_header_wins() -> None:
    frame, _ = consume(b"SEND\ndestination:a\ndestination:b\n\n\x00")
    assert frame is not None and frame.headers["destination"] == "a"


def test_encode_sets_content_length() -> None:
    assert Frame("MESSAGE", {"a": "b"}, b"hey").encode() == (
        b"MESSAGE\na:b\ncontent-length:3\n\nhey\x00"
    )


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"HELLO\n\n\x00", "unknown command"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown command"),
        (b"SEND\nno-colon\n\n\x00", "name:value"),
        (b"SEND\n:empty-name\n\n\x00", "name:value"),
        (b"SEND\nbad:a\\tb\n\n\x00", "escape"),
        (b"SEND\nbad:a\\\n\n\x00", "escape"),
        (b"SEND\ncontent-length:-1\n\n\x00", "byte count"),
        ("SEND\ncontent-length:\u00b2\n\n\x00".encode(), "byte count"),
        (b"SEND\ncontent-length:" + b"9" * 5000 + b"\n\n\x00", "byte count"),
        (b"SEND\ncontent-length:2\n\nabc\x00", "NUL"),
        (b"\rX", "CR"),
        (b"SEND\nk:\xff\n\n\x00", "UTF-8"),
    ],
)
def test_malformed(data: bytes, problem: str) -> None:
    with pytest.raises(FrameError, match=problem):
        Parser().feed(data)


LIMITS = Limits(max_frame=100, max_headers=3, max_header_line=20)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"SEND\ncontent-length:200\n\n", "frame over 100"),
        (b"SEND\n\n" + b"x" * 101, "frame over 100"),
        (b"SEND\n" + b"k" * 30, "header line over 20"),
        (b"SEND\n" + b"k:" + b"v" * 25 + b"\n", "header line over 20"),
        (b"SEND\na:1\nb:2\nc:3\nd:4\n", "more than 3 headers"),
        (b"SEND\n" + b"k:v\n" * 2 + b"x" * 19 + b"\n" * 0, None),
    ],
)
def test_limits_raise_as_soon_as_crossed(data: bytes, problem: str | None) -> None:
    parser = Parser(LIMITS)
    if problem is None:
        assert parser.feed(data) == []
        return
    with pytest.raises(FrameTooLarge, match=problem):
        parser.feed(data)


def test_limits_hold_byte_by_byte() -> None:
    parser = Parser(LIMITS)
    with pytest.raises(FrameTooLarge):
        for byte in b"SEND\n\n" + b"x" * 200:
            parser.feed(bytes([byte]))
    assert len(parser._buffer) <= LIMITS.max_frame + 1


def test_frame_at_the_size_limit_passes() -> None:
    body = b"x" * (LIMITS.max_frame - len(b"SEND\n\n") - 1)
    [frame] = Parser(LIMITS).feed(b"SEND\n\n" + body + b"\x00")
    assert frame.body == body


def test_a_body_in_many_reads_is_parsed_once_it_can_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read of a long body without its NUL yet is only kept: parsing it again from the
    start at every read would cost the body's length squared."""
    parses: list[int] = []
    real = stomp.consume

    def counted(data: stomp.Buffer, limits: Limits) -> tuple[Frame | None, int]:
        parses.append(1)
        return real(data, limits)

    monkeypatch.setattr(stomp, "consume", counted)
    parser = Parser()
    body = b"x" * (1 << 20)
    frames = parser.feed(b"SEND\ndestination:q\n\n")
    for i in range(0, len(body), 1460):
        frames += parser.feed(body[i : i + 1460])
    frames += parser.feed(b"\x00")
    assert [f.body for f in frames] == [body]
    assert len(parses) <= 4, len(parses)
    with_length = Frame("SEND", {"destination": "q"}, b"a\x00b" * 1000).encode()
    frames = [f for i in range(len(with_length)) for f in parser.feed(with_length[i : i + 1])]
    assert [f.body for f in frames] == [b"a\x00b" * 1000], "a NUL inside a counted body"


def test_a_counted_body_not_ended_by_nul_is_refused_at_once() -> None:
    """A body with a content-length is checked at its length at every read, NUL or not."""
    parser = Parser()
    assert parser.feed(b"SEND\ndestination:q\ncontent-length:2\n\n") == []
    with pytest.raises(FrameError, match="NUL"):
        parser.feed(b"abX")
