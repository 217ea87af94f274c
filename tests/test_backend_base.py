"""The backend-independent parts of the backend interface: the events' encoding."""

from __future__ import annotations

from backend_contract import position, status

from teamtrack.backends import Batch
from teamtrack.backends.base import decode_events, encode_events


def test_encoded_events_decode_to_the_same_events() -> None:
    events = [position("alpha", "w1", 0), status("alpha", "w1", "offline")]
    assert decode_events("alpha", encode_events(events)) == events


def test_a_batch_tells_whether_all_its_events_came_in_at_one_broker() -> None:
    own = encode_events([position("alpha", "w1", 0, origin="b1"), status("alpha", "w1", "online")])
    mixed = encode_events(
        [position("alpha", "w1", 1, origin="b1"), position("alpha", "w2", 1, origin="b12")]
    )
    assert Batch("alpha", "1-0", own).all_from("b1")
    assert not Batch("alpha", "1-0", own).all_from("b2")
    assert not Batch("alpha", "1-0", mixed).all_from("b1")
    assert not Batch("alpha", "1-0", mixed).all_from("b12")
