"""The message contract: topics, slugs and every validation rule."""

from __future__ import annotations

import orjson
import pytest

from teamtrack.contract import (
    MAX_AGE_MS,
    MAX_FUTURE_MS,
    ContractError,
    Kind,
    Position,
    Presence,
    Reason,
    decode_message,
    decode_position,
    encode_position,
    is_slug,
    parse_topic,
    position_topic,
    status_topic,
)

NOW = 1_800_000_000_000


def body(**fields: object) -> bytes:
    base: dict[str, object] = {"lat": 52.5, "lon": 13.4, "ts": NOW, "seq": 3}
    base.update(fields)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


@pytest.mark.parametrize("value", ["a", "alpha", "team-1", "w_001", "0", "a" * 64])
def test_slugs_accepted(value: str) -> None:
    assert is_slug(value)


@pytest.mark.parametrize(
    "value", ["", "Alpha", "-a", "_a", "a.b", "a/b", "a+b", "é", "a" * 65, "a "]
)
def test_slugs_rejected(value: str) -> None:
    assert not is_slug(value)


def test_topics_round_trip() -> None:
    address = parse_topic(position_topic("alpha", "w001"))
    assert (address.team, address.worker, address.kind) == ("alpha", "w001", Kind.POSITION)
    assert parse_topic(status_topic("alpha", "w001")).kind is Kind.STATUS


@pytest.mark.parametrize(
    "topic",
    [
        "teams/alpha/workers/w001",
        "teams/alpha/workers/w001/position/extra",
        "teams/Alpha/workers/w001/position",
        "teams/alpha/people/w001/position",
        "fleet/alpha/workers/w001/position",
        "teams/alpha/workers/w001/battery",
        "teams/alpha/workers/+/position",
    ],
)
def test_bad_topics(topic: str) -> None:
    with pytest.raises(ContractError) as caught:
        parse_topic(topic)
    assert caught.value.reason is Reason.BAD_TOPIC


def test_valid_position_with_all_optionals() -> None:
    payload = body(acc=5.0, speed=1.4, heading=359.9, battery=100)
    position = decode_position("alpha", "w001", payload, NOW)
    assert position == Position("alpha", "w001", 52.5, 13.4, NOW, 3, 5.0, 1.4, 359.9, 100.0)
    assert decode_position("alpha", "w001", encode_position(position), NOW) == position


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x" * 1025, Reason.TOO_LARGE),
        (b"{", Reason.NOT_JSON),
        (b'{"lat": NaN, "lon": 1, "ts": 1, "seq": 1}', Reason.NOT_JSON),
        (b"[]", Reason.NOT_OBJECT),
        (b'"text"', Reason.NOT_OBJECT),
        (body(seq=...), Reason.MISSING_FIELD),
        (body(lat=...), Reason.MISSING_FIELD),
        (body(name="x"), Reason.UNKNOWN_FIELD),
        (body(lat="52.5"), Reason.BAD_TYPE),
        (body(lat=True), Reason.BAD_TYPE),
        (body(ts=1.5), Reason.BAD_TYPE),
        (body(seq="1"), Reason.BAD_TYPE),
        (body(lat=90.0001), Reason.OUT_OF_RANGE),
        (body(lat=-90.1), Reason.OUT_OF_RANGE),
        (body(lon=180.5), Reason.OUT_OF_RANGE),
        (body(seq=-1), Reason.OUT_OF_RANGE),
        (body(acc=-1), Reason.OUT_OF_RANGE),
        (body(speed=-0.1), Reason.OUT_OF_RANGE),
        (body(heading=360.1), Reason.OUT_OF_RANGE),
        (body(battery=100.5), Reason.OUT_OF_RANGE),
        (body(ts=NOW + MAX_FUTURE_MS + 1), Reason.TS_IN_FUTURE),
        (body(ts=NOW - MAX_AGE_MS - 1), Reason.TS_TOO_OLD),
    ],
)
def test_each_rule_rejects_with_its_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(ContractError) as caught:
        decode_position("alpha", "w001", payload, NOW)
    assert caught.value.reason is reason


def test_boundaries_are_accepted() -> None:
    decode_position("alpha", "w001", body(lat=90, lon=-180, ts=NOW + MAX_FUTURE_MS), NOW)
    decode_position("alpha", "w001", body(ts=NOW - MAX_AGE_MS, battery=0, heading=0), NOW)
    decode_position("alpha", "w001", body(acc=None), NOW)  # explicit null optional


def test_status_messages() -> None:
    message = decode_message(status_topic("alpha", "w1"), b"offline")
    assert getattr(message, "presence", None) is Presence.OFFLINE
    with pytest.raises(ContractError) as caught:
        decode_message(status_topic("alpha", "w1"), b"busy")
    assert caught.value.reason is Reason.BAD_STATUS
