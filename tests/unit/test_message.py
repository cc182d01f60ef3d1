"""The Message value and its codec: round trips, headers, ids, and bad input.

Bad input is refused with `InvalidMessage` before anything is written; a blob
that cannot be read raises `CodecError` and nothing else.
"""

from __future__ import annotations

import math
import struct
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvalve_async.clock import LocalClock
from mvalve_async.errors import CodecError, InvalidMessage
from mvalve_async.interfaces import Lane
from mvalve_async.message import (
    DEFAULT_MAX_DESTINATION,
    DEFAULT_MAX_SIZE,
    Headers,
    Message,
    decode,
    encode,
    new_id,
    validate_destination,
)
from mvalve_async.writer import Writer

PREFIX = struct.Struct(">BBI")
prop = settings(max_examples=300, deadline=None)

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text()
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids, max_size=5)
    ),
    max_leaves=25,
)
destinations = st.text(
    st.characters(codec="utf-8").filter(str.isprintable), min_size=1, max_size=40
)
header_maps = st.dictionaries(st.text(min_size=1, max_size=12), st.text(max_size=20), max_size=5)
INJECTIONS = [
    "x'; DROP TABLE q_incoming; --",
    'Robert"); DROP TABLE Students;--',
    "1 OR 1=1",
    "%s %% %(x)s \\' \\\" `q` ;",
    "' UNION SELECT password FROM user #",
]


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same JSON types all the way down (1 is not 1.0 nor True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    return bool(a == b) or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


def round_trip(msg: Message) -> Message:
    return decode(encode(msg))


@prop
@given(json_values, destinations, header_maps, st.booleans(), st.none() | st.floats(0.001, 1e6))
def test_json_content_round_trips(
    content: Any, destination: str, headers: dict[str, str], emergency: bool, duration: float | None
) -> None:
    msg = Message(destination, content, headers=headers, emergency=emergency, duration=duration)
    back = round_trip(msg)
    assert back == msg
    assert same(back.content, content)
    assert (back.id, back.destination, back.created) == (msg.id, destination, msg.created)
    assert (back.emergency, back.duration) == (emergency, duration)
    assert list(back.headers.items()) == list(msg.headers.items())


@prop
@given(st.binary(max_size=2000), st.sampled_from([bytes, bytearray, memoryview]))
def test_bytes_content_round_trips(content: bytes, kind: type) -> None:
    back = round_trip(Message("d", kind(content)))
    assert type(back.content) is bytes
    assert back.content == content


def test_bytes_that_look_like_json_stay_bytes() -> None:
    for raw in (b'{"a": 1}', b"null", b"", b"\x00\xff", orjson.dumps("x")):
        assert round_trip(Message("d", raw)).content == raw


def test_headers_are_case_insensitive_and_preserve_case() -> None:
    h = Headers({"Content-Type": "text/plain", "X-Count": 3})
    assert h["content-type"] == h["CONTENT-TYPE"] == "text/plain"
    assert "x-COUNT" in h and h["x-count"] == "3"  # values are strings
    assert 5 not in h and "missing" not in h
    assert list(h) == ["Content-Type", "X-Count"]
    assert h == {"content-type": "text/plain", "x-count": "3"}
    assert Headers({"A": "1", "a": "2"}) == {"A": "2"}  # a later spelling replaces the value
    msg = Message("d", headers={"X-Trace-ID": "abc", "accept": "*/*"})
    back = round_trip(msg)
    assert list(back.headers) == ["X-Trace-ID", "accept"]
    assert back.headers["x-trace-id"] == "abc"


@pytest.mark.parametrize("bad", [{"": "x"}, {1: "x"}, {None: "x"}])
def test_header_names_must_be_non_empty_strings(bad: dict[Any, str]) -> None:
    with pytest.raises(InvalidMessage):
        Message("d", headers=bad)


def test_ids_made_in_sequence_are_sorted_and_unique() -> None:
    ids = [Message("d").id for _ in range(5000)] + [new_id() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 26 and int(i, 16) >= 0 for i in ids[:10])


@given(st.lists(st.integers(0, 2**63), min_size=2, max_size=20, unique=True))
def test_ids_sort_by_creation_time(stamps: list[int]) -> None:
    ordered = sorted(stamps)
    with pytest.MonkeyPatch.context() as mp:
        it = iter(ordered)
        mp.setattr(time, "time_ns", lambda: next(it))
        ids = [new_id() for _ in ordered]
    assert sorted(ids) == ids


# decode: anything unreadable is a CodecError, and only that ---------------------


@prop
@given(st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_gives_a_message_or_codec_error(blob: bytes) -> None:
    try:
        assert isinstance(decode(blob), Message)
    except CodecError:
        pass


header_fields = st.dictionaries(st.sampled_from("idthue") | st.text(max_size=3), json_values)
blobs = st.builds(
    lambda version, flags, head, body, slack: (
        PREFIX.pack(version, flags, max(0, len(head) + slack)) + head + body
    ),
    st.sampled_from([1, 1, 1, 0, 2, 255]),
    st.sampled_from([0, 1, 0, 1, 2, 128]),
    (header_fields | json_values).map(orjson.dumps),
    st.binary(max_size=30) | json_values.map(orjson.dumps),
    st.sampled_from([0, 0, 0, -1, 1, 5]),
)


@prop
@given(blobs)
def test_decode_of_near_valid_envelopes_gives_a_message_or_codec_error(blob: bytes) -> None:
    try:
        assert isinstance(decode(blob), Message)
    except CodecError:
        pass


@given(st.dictionaries(st.text(max_size=5), json_values) | st.lists(json_values) | st.text())
def test_every_truncation_of_a_json_container_or_string_is_a_codec_error(content: Any) -> None:
    blob = encode(Message("d", content, headers={"h": "v"}))
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            decode(blob[:cut])


@pytest.mark.parametrize(
    ("blob", "words"),
    [(b"", "truncated"), (b"\x01\x00", "truncated"), (PREFIX.pack(1, 0, 50) + b"{}", "truncated"),
     (PREFIX.pack(2, 0, 2) + b"{}null", "version 2"), (PREFIX.pack(0, 0, 2) + b"{}1", "version 0"),
     (PREFIX.pack(1, 2, 2) + b"{}1", "flags 0x2"), (PREFIX.pack(1, 0x81, 2) + b"{}1", "flags"),
     (PREFIX.pack(1, 0, 2) + b"[]1", "not an object"), (PREFIX.pack(1, 0, 2) + b"{}1", "'d'"),
     (PREFIX.pack(1, 0, 10) + b'{"d":"x"}\x00', "not valid")],
)  # fmt: skip
def test_bad_envelopes_raise_codec_error(blob: bytes, words: str) -> None:
    with pytest.raises(CodecError, match=words):
        decode(blob)


@pytest.mark.parametrize(
    "header",
    [{"d": 5, "i": "x", "t": 1}, {"d": "x", "i": "x", "t": "soon"}, {"d": "x", "i": "x"},
     {"d": "x", "i": "x", "t": 1, "u": -1}, {"d": "x", "i": "x", "t": 1, "u": True},
     {"d": "x", "i": "x", "t": 1, "h": [1]}, {"d": "x", "i": "x", "t": 1, "h": {"": 1}},
     {"d": "x", "i": "x", "t": [1]}],
)  # fmt: skip
def test_bad_header_fields_raise_codec_error(header: dict[str, Any]) -> None:
    head = orjson.dumps(header)
    with pytest.raises(CodecError):
        decode(PREFIX.pack(1, 0, len(head)) + head + b"1")


# bad input: InvalidMessage, before anything is written ----------------------------


@pytest.mark.parametrize(
    "destination",
    ["", "x" * (DEFAULT_MAX_DESTINATION + 1), None, 5, b"bytes", ["x"], "a\nb", "a\x00b", "\t",
     "tab\there", "del\x7f", "line\u2028sep", "\x1b[31mred"],
)  # fmt: skip
def test_bad_destinations_raise_invalid_message(destination: object) -> None:
    with pytest.raises(InvalidMessage):
        validate_destination(destination)


def test_destination_length_is_configurable() -> None:
    assert validate_destination("x" * DEFAULT_MAX_DESTINATION) == "x" * DEFAULT_MAX_DESTINATION
    assert validate_destination("x" * 100, max_length=100) == "x" * 100
    with pytest.raises(InvalidMessage, match="101 characters, the limit is 100"):
        validate_destination("x" * 101, max_length=100)
    with pytest.raises(InvalidMessage):
        validate_destination("abc", max_length=2)


@pytest.mark.parametrize(
    "content", [{1, 2}, object(), 1j, {1: "x"}, {"a": {(1, 2): 3}}, 2**64, -(2**63) - 1, "\ud800"]
)
def test_unencodable_content_raises_invalid_message(content: Any) -> None:
    with pytest.raises(InvalidMessage, match="cannot be encoded"):
        encode(Message("d", content))


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (
            {"to": "+331234", "tags": {"a", "b"}},
            'content["tags"]: Type is not JSON serializable: set',
        ),
        ([1, {"x": [2, object()]}], 'content[1]["x"][1]: Type is not JSON serializable: object'),
        ({"a": {(1, 2): 3}}, 'content["a"]: the key (1, 2) is a tuple, not a string'),
        ({"n": 2**64}, 'content["n"]: Integer exceeds 64-bit range'),
        (1j, "content: Type is not JSON serializable: complex"),
    ],
)
def test_unencodable_content_error_says_where_the_value_sits(content: Any, where: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        encode(Message("d", content))
    assert str(caught.value) == f"content cannot be encoded as JSON: {where}"


def test_content_nested_too_deep_is_refused_without_a_path() -> None:
    content: Any = []
    for _ in range(5000):
        content = [content]
    with pytest.raises(InvalidMessage, match="cannot be encoded as JSON: content: Recursion"):
        encode(Message("d", content))


@pytest.mark.parametrize("content", [math.nan, [math.inf], {"x": -math.inf}])
def test_non_finite_floats_are_refused(content: Any) -> None:
    with pytest.raises(InvalidMessage):
        encode(Message("d", content))


def test_oversized_messages_raise_invalid_message() -> None:
    msg = Message("d", b"x" * 1000)
    size = len(encode(msg))
    assert len(encode(msg, max_size=size)) == size
    with pytest.raises(InvalidMessage, match=f"{size} bytes encoded, the limit is {size - 1}"):
        encode(msg, max_size=size - 1)
    with pytest.raises(InvalidMessage):
        encode(Message("d", b"x" * DEFAULT_MAX_SIZE))


@pytest.mark.parametrize("field", ["duration", "delay", "deliver_at"])
@pytest.mark.parametrize("value", [-1, -0.001, math.nan, math.inf, -math.inf, True, "5", [1]])
def test_bad_times_raise_invalid_message(field: str, value: Any) -> None:
    with pytest.raises(InvalidMessage):
        Message("d", **{field: value})


def test_zero_duration_is_refused_but_zero_delay_is_allowed() -> None:
    with pytest.raises(InvalidMessage):
        Message("d", duration=0)
    assert Message("d", delay=0).ready_at(100.0) == 100.0
    assert Message("d", deliver_at=5).ready_at(100.0) == 5.0
    assert Message("d").ready_at(100.0) is None


class RecordingQueue:
    """Just enough of a Queue for a Writer: remembers what it was asked to insert."""

    def __init__(self) -> None:
        self.inserted: list[tuple[Lane, list[Any]]] = []
        self.clock = LocalClock()

    async def insert(self, lane: Lane, rows: list[Any]) -> None:
        self.inserted.append((lane, rows))


@pytest.mark.parametrize(
    "bad",
    [Message(""), Message("x" * 41), Message("a\nb"), Message("d", {1, 2}),
     Message("d", b"x" * DEFAULT_MAX_SIZE)],
)  # fmt: skip
async def test_a_writer_refuses_bad_input_before_writing_anything(bad: Message) -> None:
    queue = RecordingQueue()
    writer = Writer(queue)  # type: ignore[arg-type]
    with pytest.raises(InvalidMessage):
        await writer.insert(bad)
    with pytest.raises(InvalidMessage):
        await writer.insert_many([Message("ok"), Message("ok", emergency=True), bad])
    assert queue.inserted == []
    await Writer(queue, max_destination=50).insert(Message("y" * 50))  # type: ignore[arg-type]
    assert len(queue.inserted) == 1


@pytest.mark.parametrize("text", INJECTIONS)
def test_sql_injection_strings_round_trip_verbatim(text: str) -> None:
    msg = Message(validate_destination(text), {"q": text, text: [text]}, headers={"X-Q": text})
    back = round_trip(msg)
    assert back.destination == text
    assert back.content == {"q": text, text: [text]}
    assert back.headers["x-q"] == text
    assert round_trip(Message(text, text.encode())).content == text.encode()


# the Perl original's headers ---------------------------------------------------------


def test_from_headers_reads_the_x_mvalve_headers() -> None:
    headers = {"X-Mvalve-Destination": "carrier-a", "x-mvalve-EMERGENCY": "Yes",
               "X-MVALVE-DURATION": "2.5", "X-Other": "kept"}  # fmt: skip
    msg = Message.from_headers(headers, content={"body": 1})
    assert (msg.destination, msg.emergency, msg.duration) == ("carrier-a", True, 2.5)
    assert msg.content == {"body": 1}
    assert msg.headers["x-other"] == "kept"
    assert list(msg.headers) == list(headers)
    assert round_trip(msg) == msg


@pytest.mark.parametrize(
    ("value", "emergency"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("0", False), ("no", False),
     ("", False), ("false", False)],
)  # fmt: skip
def test_from_headers_emergency_values(value: str, emergency: bool) -> None:
    msg = Message.from_headers({"X-Mvalve-Destination": "d", "X-Mvalve-Emergency": value})
    assert msg.emergency is emergency
    assert Message.from_headers({"X-Mvalve-Destination": "d"}).duration is None


@pytest.mark.parametrize("duration", ["-1", "0", "nan", "inf"])
def test_from_headers_refuses_bad_durations(duration: str) -> None:
    with pytest.raises(InvalidMessage):
        Message.from_headers({"X-Mvalve-Destination": "d", "X-Mvalve-Duration": duration})


@pytest.mark.parametrize("duration", ["abc", "1s", "0x10"])
def test_from_headers_refuses_non_numeric_durations(duration: str) -> None:
    with pytest.raises(InvalidMessage):
        Message.from_headers({"X-Mvalve-Destination": "d", "X-Mvalve-Duration": duration})


def test_from_headers_needs_a_destination() -> None:
    with pytest.raises(InvalidMessage, match="X-Mvalve-Destination"):
        Message.from_headers({"X-Mvalve-Emergency": "1"})
