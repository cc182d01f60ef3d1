"""The `Message` value and its codec.

Envelope (version 1), bytes-safe and cheap to parse:

    b"\\x01" | flags (1 byte: bit 0 = content is raw bytes) | u32 header length |
    header (orjson object) | body (raw bytes, or the orjson of the content)

No pickle: a blob read from the queue can only ever become a `Message` or a
`CodecError`.

Compatibility surface: the envelope (its prefix, flags and the header's keys `i`,
`d`, `t`, `h`, `e`, `u`) is written by one version and read by the next, and by
readers of either during an upgrade; changing it needs a VERSION bump, with
`decode` still reading the old envelope.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import CodecError, InvalidMessage

__all__ = [
    "DEFAULT_MAX_DESTINATION",
    "DEFAULT_MAX_SIZE",
    "Headers",
    "Message",
    "decode",
    "encode",
    "new_id",
    "validate_destination",
]

VERSION = 1  # of the envelope: compatibility surface (see the module docstring)
DEFAULT_MAX_SIZE = 1 << 20  # bytes of an encoded message
DEFAULT_MAX_DESTINATION = 40  # characters, the original column width
_PREFIX = struct.Struct(">BBI")
_FLAG_BYTES = 1

# Headers of the Perl original, honoured when a Message is built from them.
H_DESTINATION = "x-mvalve-destination"
H_EMERGENCY = "x-mvalve-emergency"
H_DURATION = "x-mvalve-duration"
H_RETRY_TIME = "x-mvalve-retry-time"


def new_id() -> str:
    """26 hex chars: 16 of nanosecond time then 10 random; sorts by creation time."""
    return f"{time.time_ns():016x}{os.urandom(5).hex()}"


class Headers(Mapping[str, str]):
    """Case-insensitive, case-preserving string headers (HTTP style)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None) -> None:
        self._items: dict[str, tuple[str, str]] = {}
        for key, value in (items or {}).items():
            if not isinstance(key, str) or not key:
                raise InvalidMessage(f"header names must be non-empty strings, got {key!r}")
            self._items[key.lower()] = (key, str(value))

    def __getitem__(self, key: str) -> str:
        return self._items[key.lower()][1]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return {k.lower(): v for k, v in self.items()} == {
            str(k).lower(): str(v) for k, v in other.items()
        }

    def __hash__(self) -> int:  # pragma: no cover - mappings are not hashed
        raise TypeError("Headers is unhashable")

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


def validate_destination(destination: object, max_length: int = DEFAULT_MAX_DESTINATION) -> str:
    if not isinstance(destination, str):
        raise InvalidMessage(f"destination must be a string, got {type(destination).__name__}")
    if not destination:
        raise InvalidMessage("destination must not be empty")
    if len(destination) > max_length:
        raise InvalidMessage(
            f"destination is {len(destination)} characters, the limit is {max_length}"
        )
    if not destination.isprintable():
        raise InvalidMessage(f"destination {destination!r} contains control characters")
    return destination


def _seconds(name: str, value: float | None, *, allow_zero: bool = True) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidMessage(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidMessage(f"{name} must be positive, got {value!r}")
    return float(value)


@dataclass(eq=False)
class Message:
    """A message for `destination`. `content` is any JSON value or bytes.

    `emergency` takes the emergency lane; `duration` (seconds) keeps the
    destination busy after delivery; `deliver_at` (epoch seconds) or `delay`
    (seconds from insertion) make it a timed message. Set by the reader:
    `deliveries` (1 on first delivery), `delivered_at` (the valve's timestamp)
    and `lane`.
    """

    destination: str
    content: Any = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    emergency: bool = False
    duration: float | None = None
    deliver_at: float | None = None
    delay: float | None = None
    id: str = field(default_factory=new_id)
    created: float = field(default_factory=time.time)
    deliveries: int = 0
    delivered_at: float | None = None
    lane: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.headers, Headers):
            self.headers = Headers(self.headers)
        self.emergency = bool(self.emergency)
        self.duration = _seconds("duration", self.duration, allow_zero=False)
        self.deliver_at = _seconds("deliver_at", self.deliver_at)
        self.delay = _seconds("delay", self.delay)

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any], content: Any = None) -> Message:
        """Build from the Perl original's X-Mvalve-* headers."""
        h = Headers(headers)
        if H_DESTINATION not in h:
            raise InvalidMessage("X-Mvalve-Destination header is required")
        duration = h.get(H_DURATION)
        try:
            seconds = float(duration) if duration else None
        except ValueError:
            raise InvalidMessage(f"X-Mvalve-Duration {duration!r} is not a number") from None
        return cls(
            destination=h[H_DESTINATION],
            content=content,
            headers=h,
            emergency=h.get(H_EMERGENCY, "").lower() in {"1", "true", "yes"},
            duration=seconds,
        )

    def ready_at(self, now: float) -> float | None:
        """When a timed message becomes due, or None for an untimed one."""
        if self.deliver_at is not None:
            return self.deliver_at
        if self.delay is not None:
            return now + self.delay
        return None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.id, self.destination, self.content, self.headers) == (
            other.id,
            other.destination,
            other.content,
            other.headers,
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        kind = "bytes" if isinstance(self.content, bytes | bytearray) else "json"
        return (
            f"Message(id={self.id!r}, destination={self.destination!r}, {kind} content, "
            f"emergency={self.emergency}, deliveries={self.deliveries})"
        )


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _unencodable(value: Any, path: str, depth: int = 0) -> str | None:
    """Where in `value` the first thing JSON cannot carry sits, and why:
    `content["tags"][2]: Type is not JSON serializable: set`. None if nothing in it
    fails on its own (e.g. only the nesting is too deep: orjson stops at 254)."""
    if depth > 256:
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}: the key {key!r} is a {type(key).__name__}, not a string"
            found = _unencodable(item, f"{path}[{_json_key(key)}]", depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _unencodable(item, f"{path}[{i}]", depth + 1)
            if found is not None:
                return found
        return None
    try:
        orjson.dumps(value)
    except TypeError as exc:
        return f"{path}: {exc}"
    return None


def _json_key(key: str) -> str:
    try:
        return orjson.dumps(key).decode()
    except TypeError:  # a lone surrogate
        return repr(key)


def encode(message: Message, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Encode to the versioned envelope; `InvalidMessage` if unencodable or too big."""
    header: dict[str, Any] = {"i": message.id, "d": message.destination, "t": message.created}
    if message.headers:
        header["h"] = dict(message.headers.items())
    if message.emergency:
        header["e"] = 1
    if message.duration is not None:
        header["u"] = message.duration
    content = message.content
    if isinstance(content, bytes | bytearray | memoryview):
        flags, body = _FLAG_BYTES, bytes(content)
    else:
        try:
            body = orjson.dumps(content)
        except TypeError as exc:
            where = _unencodable(content, "content") or f"content: {exc}"
            raise InvalidMessage(f"content cannot be encoded as JSON: {where}") from None
        if b"null" in body and not _finite(content):  # orjson writes NaN/inf as null
            raise InvalidMessage("content holds NaN or infinity, which JSON cannot carry")
        flags = 0
    try:
        head = orjson.dumps(header)
    except TypeError as exc:
        raise InvalidMessage(f"message cannot be encoded: {exc}") from None
    size = _PREFIX.size + len(head) + len(body)
    if size > max_size:
        raise InvalidMessage(f"message is {size} bytes encoded, the limit is {max_size}")
    return b"".join((_PREFIX.pack(VERSION, flags, len(head)), head, body))


def decode(blob: bytes) -> Message:
    """Decode an envelope; any malformed input raises `CodecError`, nothing else."""
    try:
        version, flags, head_len = _PREFIX.unpack_from(blob)
    except (struct.error, TypeError):
        raise CodecError("message blob is truncated") from None
    if version != VERSION:
        raise CodecError(f"unknown message envelope version {version}")
    if flags & ~_FLAG_BYTES:
        raise CodecError(f"unknown message flags {flags:#x}")
    start = _PREFIX.size
    end = start + head_len
    if end > len(blob):
        raise CodecError("message header is truncated")
    try:
        header = orjson.loads(blob[start:end])
        body = blob[end:]
        content = body if flags & _FLAG_BYTES else orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"message is not valid: {exc}") from None
    if not isinstance(header, dict):
        raise CodecError("message header is not an object")
    try:
        destination = header["d"]
        headers = header.get("h") or {}
        if not isinstance(destination, str) or not isinstance(headers, dict):
            raise TypeError("bad field types")
        msg = Message(
            destination=destination,
            content=content,
            headers=headers,
            emergency=bool(header.get("e", 0)),
            duration=header.get("u"),
            id=str(header["i"]),
            created=float(header["t"]),
        )
    except (KeyError, TypeError, ValueError, InvalidMessage) as exc:
        raise CodecError(f"message header is not valid: {exc}") from None
    return msg
