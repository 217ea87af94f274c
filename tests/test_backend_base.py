"""The backend-independent parts of the backend interface: the events' encoding."""

from __future__ import annotations

from backend_contract import position, status

from teamtrack.backends import Batch
from teamtrack.backends.base import Event, decode_events, decode_stored_events, encode_events
from teamtrack.contract import Kind


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


def test_stored_entries_that_do_not_decode_are_left_out_and_counted() -> None:
    good = Event("alpha", "w1", Kind.POSITION, b'{"lat":1,"lon":2,"ts":3,"seq":4}', "b1", 5, 3)
    quoted = Event("alpha", 'q"x', Kind.POSITION, good.body, "b1", 5, 3)  # not a slug
    entries = [
        ("w1", good.to_json()),
        ('q"x', quoted.to_json()),  # the id breaks the JSON it is written into
        ("w2", b"not json"),
        ("w3", b'{"w":"w3"}'),  # JSON, but not an event
        ("w4", b"[]"),
    ]
    events, unreadable = decode_stored_events("alpha", entries)
    assert list(events) == ["w1"] and events["w1"].body == good.body
    assert unreadable == 4
