"""The OwnTracks app's topics and JSON, decoded into the contract (no servers)."""

from __future__ import annotations

import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from owntracks_payloads import recorded

from teamtrack.contract import ContractError, decode_position
from teamtrack.ingress.owntracks import (
    MAX_OWNTRACKS_BYTES,
    OnlineRefresh,
    OwnTracksKind,
    decode_owntracks,
    parse_owntracks_topic,
)
from teamtrack.provision import acl_text
from teamtrack.registry import parse_registry

NOW_S = int(time.time())


def outcome_of(payload: bytes) -> str:
    try:
        message = decode_owntracks(payload, NOW_S * 1000)
    except ContractError as error:
        return f"rejected:{error.reason.value}"
    if message.kind is OwnTracksKind.IGNORED:
        return f"ignored:{message.type_name}"
    return message.kind.value


@pytest.mark.parametrize("item", recorded(NOW_S), ids=lambda item: item.name)
def test_each_recorded_payload_has_its_outcome(item: object) -> None:
    assert outcome_of(item.payload) == item.outcome  # type: ignore[attr-defined]


def test_a_full_location_becomes_a_native_position() -> None:
    full = recorded(NOW_S)[0]
    message = decode_owntracks(full.payload, NOW_S * 1000)
    position = decode_position("alpha", "w001", message.position, NOW_S * 1000)
    tst = orjson.loads(full.payload)["tst"]
    assert (position.ts, position.seq) == (tst * 1000, tst)
    assert (position.lat, position.lon, position.acc) == (52.516275, 13.377704, 13.0)
    assert position.speed == 5.0  # 18 km/h
    assert (position.heading, position.battery) == (87.0, 64.0)


def test_unknown_optionals_are_left_out_not_refused() -> None:
    ios = next(item for item in recorded(NOW_S) if item.name == "ios-location-unknown-speed")
    body = orjson.loads(decode_owntracks(ios.payload, NOW_S * 1000).position)
    assert "speed" not in body and "heading" not in body
    assert body["battery"] == 87.0


def test_a_resend_has_the_same_identity_as_the_first_copy() -> None:
    first = decode_owntracks(b'{"_type":"location","lat":1,"lon":2,"tst":%d}' % NOW_S)
    again = decode_owntracks(b'{"tst":%d,"lon":2,"lat":1,"_type":"location"}' % NOW_S)
    assert orjson.loads(first.position) == orjson.loads(again.position)


def test_a_transition_keeps_what_a_manager_needs() -> None:
    item = next(item for item in recorded(NOW_S) if item.name == "transition-enter")
    body = orjson.loads(decode_owntracks(item.payload, NOW_S * 1000).transition)
    assert body == {
        "type": "transition", "event": "enter", "ts": (NOW_S - 5) * 1000, "lat": 52.5163,
        "lon": 13.3777, "acc": 10.0, "desc": "Depot", "rid": "5f1d2c", "trigger": "c",
    }


def test_oversized_payloads_are_refused_before_parsing() -> None:
    payload = b'{"_type":"card","face":"' + b"A" * MAX_OWNTRACKS_BYTES + b'"}'
    assert outcome_of(payload) == "rejected:too_large"


def test_deep_nesting_is_refused_not_a_crash() -> None:
    assert outcome_of(b"[" * 5_000 + b"]" * 5_000) == "rejected:not_json"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("owntracks/alpha.w001/phone", ("alpha", "w001", "phone", "")),
        ("owntracks/alpha.w001/phone/event", ("alpha", "w001", "phone", "event")),
    ],
)
def test_topics_of_device_accounts(topic: str, expected: tuple[str, ...]) -> None:
    address = parse_owntracks_topic(topic)
    assert (address.team, address.worker, address.device, address.leaf) == expected


@pytest.mark.parametrize(
    "topic",
    ["owntracks/bridge-b1-1/phone", "owntracks/alpha.w001", "owntracks/alpha.w001/",
     "owntracks/Alpha.w001/phone", "teams/alpha.w001/phone", "owntracks/a.b/c/d/e",
     "owntracks/alpha.w001/" + "d" * 65],
)
def test_other_topics_are_refused(topic: str) -> None:
    with pytest.raises(ContractError) as refused:
        parse_owntracks_topic(topic)
    assert refused.value.reason.value == "bad_topic"


def test_the_acl_lets_a_device_write_only_its_own_owntracks_topics() -> None:
    registry = parse_registry({"teams": [{"id": "alpha", "workers": ["w001", "w002"]}]})
    acl = acl_text(registry)
    device = acl.split("user alpha.w001\n", 1)[1].split("\n\n", 1)[0]
    assert "topic write owntracks/alpha.w001/#" in device
    assert "owntracks/alpha.w002" not in device
    assert [line for line in device.splitlines() if "read" in line] == [
        "topic read owntracks/alpha.w001/+/cmd"]
    bridge = acl.split("user bridge-b1-1\n", 1)[1].split("\n\n", 1)[0]
    assert "topic read $share/teamtrack/owntracks/#" in bridge


def test_online_is_said_once_a_minute_and_again_after_a_last_will() -> None:
    refresh = OnlineRefresh(every_s=60.0, capacity=2)
    assert refresh.due("alpha", "w001", now=0.0)
    assert not refresh.due("alpha", "w001", now=59.0)
    assert refresh.due("alpha", "w001", now=60.5)
    refresh.gone("alpha", "w001")
    assert refresh.due("alpha", "w001", now=61.0)
    refresh.due("alpha", "w002", now=62.0)
    refresh.due("alpha", "w003", now=63.0)  # over capacity: the oldest is forgotten
    assert refresh.due("alpha", "w001", now=64.0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400) | st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats()
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["_type", "lat", "lon", "tst", "vel", "cog", "batt",
                                       "acc", "event", "desc"]), children, max_size=6),
    max_leaves=12,
).map(orjson.dumps))
def test_any_payload_is_decoded_or_refused_with_a_reason(payload: bytes) -> None:
    try:
        message = decode_owntracks(payload, NOW_S * 1000)
    except ContractError:
        return
    if message.kind is OwnTracksKind.LOCATION:
        decode_position("alpha", "w001", message.position, NOW_S * 1000)
