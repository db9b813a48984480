"""STOMP 1.2 frames: encoding and an incremental, I/O-free parser.

The parser is fed bytes as they arrive and returns the complete frames they finish; it
knows nothing of sockets, so it is tested byte by byte. Every limit (frame size, header
count, header line) is checked as soon as the bytes that break it are seen, so a peer
cannot make it buffer more than the limits allow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

CLIENT_COMMANDS = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
COMMANDS = CLIENT_COMMANDS | SERVER_COMMANDS
# Header values of these frames are sent as they are (STOMP 1.2, "Value Encoding").
_RAW_HEADERS = frozenset({"CONNECT", "CONNECTED"})

_ESCAPES = {b"\\\\": b"\\", b"\\n": b"\n", b"\\r": b"\r", b"\\c": b":"}
_ESCAPE_RE = re.compile(rb"\\(.?)", re.DOTALL)
HEARTBEAT = b"\n"
Buffer = bytes | bytearray


class FrameError(ValueError):
    """The peer sent something that is not STOMP 1.2; the connection cannot go on."""


class FrameTooLarge(FrameError):
    """A frame, its header section or one header line is over a limit."""


@dataclass(frozen=True)
class Limits:
    max_frame: int = 16 * 1024 * 1024  # command, headers and body
    max_headers: int = 64
    max_header_line: int = 8192


@dataclass(frozen=True)
class Frame:
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def encode(self) -> bytes:
        """The frame on the wire; a body always gets its content-length."""
        raw = self.command in _RAW_HEADERS
        headers = dict(self.headers)
        if self.body and "content-length" not in headers:
            headers["content-length"] = str(len(self.body))
        lines = [self.command.encode()]
        for key, value in headers.items():
            k, v = key.encode(), value.encode()
            if not raw:
                k, v = _escape(k), _escape(v)
            lines.append(k + b":" + v)
        return b"\n".join(lines) + b"\n\n" + self.body + b"\0"


def _escape(value: bytes) -> bytes:
    return (
        value.replace(b"\\", b"\\\\")
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
        .replace(b":", b"\\c")
    )


def _unescape(value: bytes) -> bytes:
    def one(match: re.Match[bytes]) -> bytes:
        try:
            return _ESCAPES[match.group(0)]
        except KeyError:
            raise FrameError(f"invalid escape sequence {match.group(0)!r} in a header") from None

    return _ESCAPE_RE.sub(one, value)


def _line(data: Buffer, start: int, end: int) -> bytes:
    """A line without its EOL (LF or CRLF)."""
    if end > start and data[end - 1 : end] == b"\r":
        end -= 1
    return bytes(data[start:end])


def consume(data: Buffer, limits: Limits = Limits()) -> tuple[Frame | None, int]:
    """Parse one frame from the start of ``data``.

    Returns ``(frame, consumed)``: a complete frame and the bytes it used; ``(None, n)``
    with n > 0 when the data starts with n heart-beat EOLs; ``(None, 0)`` when more bytes
    are needed. Raises FrameError (FrameTooLarge) for input that cannot become a valid
    frame within the limits.
    """
    skipped = 0
    while skipped < len(data) and data[skipped : skipped + 1] in (b"\n", b"\r"):
        if data[skipped : skipped + 1] == b"\r":
            if skipped + 1 >= len(data):
                return None, skipped
            if data[skipped + 1 : skipped + 2] != b"\n":
                raise FrameError("a CR not followed by LF between frames")
            skipped += 2
        else:
            skipped += 1
    if skipped:
        return None, skipped
    frame, used = _frame(data, limits)
    return frame, used


def _frame(data: Buffer, limits: Limits) -> tuple[Frame | None, int]:
    lines: list[bytes] = []
    pos = 0
    while True:
        eol = data.find(b"\n", pos, pos + limits.max_header_line + 2)
        if eol < 0:
            if len(data) - pos > limits.max_header_line + 1:
                raise FrameTooLarge(f"a header line over {limits.max_header_line} bytes")
            if len(data) > limits.max_frame:
                raise FrameTooLarge(f"a frame over {limits.max_frame} bytes")
            return None, 0
        line = _line(data, pos, eol)
        if len(line) > limits.max_header_line:
            raise FrameTooLarge(f"a header line over {limits.max_header_line} bytes")
        pos = eol + 1
        if pos > limits.max_frame:
            raise FrameTooLarge(f"a frame over {limits.max_frame} bytes")
        if not line:
            break
        lines.append(line)
        if len(lines) > limits.max_headers + 1:
            raise FrameTooLarge(f"more than {limits.max_headers} headers")
    command = lines[0].decode("ascii", errors="replace") if lines else ""
    if command not in COMMANDS:
        raise FrameError(f"unknown command {command[:40]!r}")
    headers = _headers(command, lines[1:])
    return _body(data, pos, command, headers, limits)


def _headers(command: str, lines: list[bytes]) -> dict[str, str]:
    headers: dict[str, str] = {}
    raw = command in _RAW_HEADERS
    for line in lines:
        key, sep, value = line.partition(b":")
        if not sep or not key:
            raise FrameError(f"a header line without 'name:value': {line[:40]!r}")
        if not raw:
            key, value = _unescape(key), _unescape(value)
        try:
            k, v = key.decode(), value.decode()
        except UnicodeDecodeError:
            raise FrameError("a header that is not UTF-8") from None
        headers.setdefault(k, v)  # STOMP 1.2: the first of repeated headers wins
    return headers


def _body(
    data: Buffer, start: int, command: str, headers: dict[str, str], limits: Limits
) -> tuple[Frame | None, int]:
    length_text = headers.get("content-length")
    if length_text is not None:
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 18:
            raise FrameError(f"content-length {length_text[:20]!r} is not a byte count")
        length = int(length_text)
        if start + length + 1 > limits.max_frame:
            raise FrameTooLarge(f"a frame over {limits.max_frame} bytes")
        if len(data) < start + length + 1:
            return None, 0
        if data[start + length : start + length + 1] != b"\0":
            raise FrameError("the body is not followed by NUL at its content-length")
        end = start + length
    else:
        end = data.find(b"\0", start, limits.max_frame)
        if end < 0:
            if len(data) >= limits.max_frame:
                raise FrameTooLarge(f"a frame over {limits.max_frame} bytes")
            return None, 0
    return Frame(command, headers, bytes(data[start:end])), end + 1


def _awaits_nul(data: Buffer) -> bool:
    """The buffered frame has all its headers, none of them a ``content-length``: only a
    NUL can end it. (A counted body is checked at its length, cheaply, at every read.)"""
    found = [i for i in (data.find(b"\n\n"), data.find(b"\n\r\n")) if i >= 0]
    return bool(found) and data.find(b"\ncontent-length:", 0, min(found) + 1) < 0


class Parser:
    """Buffers what the peer sent and returns each frame once it is complete."""

    def __init__(self, limits: Limits = Limits()) -> None:
        self.limits = limits
        self._buffer = bytearray()
        self._in_body = False  # the buffered frame waits for its NUL (see _awaits_nul)

    @property
    def partial(self) -> bool:
        """Part of a frame is waiting for the rest."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """The frames ``data`` completes, in order; heart-beats are skipped.

        A body that comes in many reads is parsed again only once a NUL arrives (every
        frame ends with one), so a large body costs its length, not its length squared."""
        self._buffer += data
        if self._in_body and b"\0" not in data and len(self._buffer) < self.limits.max_frame:
            return []
        frames: list[Frame] = []
        consumed = False
        while self._buffer:
            frame, used = consume(self._buffer, self.limits)
            if not used:
                break
            del self._buffer[:used]
            consumed = True
            if frame is not None:
                frames.append(frame)
        if consumed or not self._in_body:  # a new frame begins: are its headers whole?
            self._in_body = _awaits_nul(self._buffer)
        return frames
