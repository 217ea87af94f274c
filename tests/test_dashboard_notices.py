"""Notices of the rules service in the dashboard: checked on the way in (only the rules
service's origin, only the notice shapes), turned into `alert`, `alert_ack` and `zones` frames
in log order with the device events around them."""

from __future__ import annotations

import orjson

from dashboard.checks import EventCheck
from dashboard.frames import frame_head, live_frames
from teamtrack.alerts import Alert, ack_notice, alert_notice, zones_notice
from teamtrack.backends import Batch
from teamtrack.backends.base import encode_events

T0 = 1_795_000_000_000
ALERT = Alert("a" * 32, "alpha", "w001", "zone_enter", "z1", "<b>Depot</b>", T0, T0 + 40,
              "entered <b>Depot</b>", "alice", T0 + 90)


def test_only_the_rules_service_may_write_a_notice() -> None:
    check = EventCheck()
    notice = orjson.loads(alert_notice(ALERT, T0).to_json())
    assert check.odd(notice) is None
    assert check.odd({**notice, "o": "b1"}) == "bad_notice"  # a bridge's origin
    assert check.odd({**notice, "p": {**notice["p"], "extra": 1}}) == "event_unknown_field"
    assert check.odd({**notice, "p": {"type": "alert", "ts": T0, "alert": "x"}}) == (
        "event_bad_type"
    )
    ack = orjson.loads(ack_notice(ALERT, T0).to_json())
    assert check.odd(ack) is None
    assert check.odd({**ack, "p": {**ack["p"], "by": "<script>"}}) == "event_bad_type"


def test_notices_become_their_frames_between_the_events_frames() -> None:
    fix = (b'[{"w":"w001","k":"p","o":"b1","rx":1,"q":1,"p":{"lat":52.5,"lon":13.4,'
           b'"ts":1795000000000,"seq":1}}]')
    notices = encode_events([alert_notice(ALERT, T0), ack_notice(ALERT, T0),
                             zones_notice("alpha", "alice", T0, T0)])
    frames = live_frames("alpha", [Batch("alpha", "1", fix), Batch("alpha", "2", notices),
                                   Batch("alpha", "3", fix)])
    decoded = [orjson.loads(frame) for frame in frames]
    assert [frame["type"] for frame in decoded] == ["events", "alert", "alert_ack", "zones",
                                                    "events"]
    assert [frame["cursor"] for frame in decoded] == ["1", "2", "2", "2", "3"]
    assert decoded[1]["alert"] == ALERT.document()
    assert (decoded[2]["id"], decoded[2]["by"], decoded[2]["at"]) == ("a" * 32, "alice",
                                                                      T0 + 90)
    assert [frame_head(frame) for frame in frames[1:4]] == [("alert", "2"), ("alert_ack", "2"),
                                                            ("zones", "2")]
