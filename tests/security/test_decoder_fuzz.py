"""A bounded fuzz pass over the device payload decoders: whatever a device sends, the bridge's
decoder either accepts it or raises `ContractError` (a counted reason), never anything else,
and what it accepts is what the history would store. Hostile JSON-ish inputs (duplicate keys,
huge integers, nesting, NaN, escapes) are generated as well as random bytes."""

from __future__ import annotations

import contextlib
import json
import time

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashboard.checks import _plainly_valid
from teamtrack.contract import (
    ContractError,
    check_position_object,
    decode_position,
    decode_status,
    validate_position,
)
from teamtrack.history_decode import OddEvent, decode_event_row

pytestmark = pytest.mark.security
NOW = int(time.time() * 1000)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NAMES = st.sampled_from(["lat", "lon", "ts", "seq", "acc", "speed", "heading", "battery", "x"])
SCALARS = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=False),
    st.integers(min_value=-(2**70), max_value=2**70), st.integers(NOW - 10**9, NOW + 10**9),
    st.text(max_size=8),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@st.composite
def json_objects(draw: st.DrawFn) -> bytes:
    """A JSON object as text, keys possibly repeated, values of any kind."""
    pairs = draw(st.lists(st.tuples(NAMES, VALUES), max_size=10))
    base = {"lat": 45.0, "lon": 7.0, "ts": NOW, "seq": 1} if draw(st.booleans()) else {}
    items = [*base.items(), *pairs]
    return ("{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in items) + "}").encode()


PAYLOADS = st.one_of(
    st.binary(max_size=200),
    json_objects(),
    st.builds(lambda text: text.encode(), st.text(max_size=60)),
    st.sampled_from([b"NaN", b"[]", b"{" * 500, b'{"lat":1e400}', b'{"\\u006cat":1}', b"\xff"]),
)


@FUZZ
@given(PAYLOADS)
def test_the_position_decoder_raises_nothing_but_contract_errors(payload: bytes) -> None:
    try:
        ts = validate_position(payload, NOW)
    except ContractError:
        with pytest.raises(ContractError):
            decode_position("alpha", "w001", payload, NOW)
        return
    position = decode_position("alpha", "w001", payload, NOW)
    assert position.ts == ts
    body = orjson.loads(payload)
    check_position_object(body)  # what the dashboard re-checks holds too
    # The live path and the history agree: what the bridge accepts, the history stores.
    event = {"w": "w001", "k": "p", "o": "b1", "rx": NOW, "q": 0, "p": body}
    try:
        decode_event_row("alpha", event)
    except OddEvent as odd:  # pragma: no cover - the assertion's message
        pytest.fail(f"accepted live, refused by the history ({odd.reason}): {payload!r}")


@FUZZ
@given(json_objects())
def test_the_dashboards_fast_check_never_passes_what_the_contract_refuses(raw: bytes) -> None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return
    if _plainly_valid(body):
        check_position_object(body)


@FUZZ
@given(st.binary(max_size=40))
def test_the_status_decoder_raises_nothing_but_contract_errors(payload: bytes) -> None:
    with contextlib.suppress(ContractError):
        decode_status("alpha", "w001", payload)
