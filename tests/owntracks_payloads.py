"""OwnTracks payloads as the apps send them (written from the booklet's JSON format page and the
apps' published examples), for the decoder's tests and the MQTT and HTTP replays.

`recorded(now_s)` gives each payload with its `tst` moved to around `now_s`, so that the
contract's clock rules (7 days old at most) hold whenever the tests run.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class Recorded:
    name: str
    payload: bytes
    # "location", "lwt", "transition", "ignored:<type>" or "rejected:<reason>"
    outcome: str
    # The topic leaf the app uses over MQTT ("" = owntracks/{user}/{device}).
    leaf: str = ""


def _json(body: dict[str, object]) -> bytes:
    return orjson.dumps(body)


def recorded(now_s: int) -> list[Recorded]:
    t = now_s
    return [
        # Android 2.4, a location with every field the app may add.
        Recorded("android-location-full", _json({
            "_type": "location", "_id": "b4d2a1f0", "acc": 13, "alt": 85, "batt": 64, "bs": 1,
            "BSSID": "b0:f2:8e:a1:c0:10", "conn": "w", "created_at": t - 3, "lat": 52.516275,
            "lon": 13.377704, "m": 1, "SSID": "depot", "t": "u", "tid": "w1", "tst": t - 10,
            "topic": "owntracks/alpha.w001/phone", "vac": 3, "vel": 18, "cog": 87,
            "inregions": ["Depot"], "inrids": ["5f1d2c"],
        }), "location"),
        # iOS: cog and vel -1 while unknown, pressure, a point of interest and a tag.
        Recorded("ios-location-unknown-speed", _json({
            "_type": "location", "acc": 5, "alt": 34, "batt": 87, "bs": 2, "cog": -1,
            "conn": "m", "lat": 52.5201, "lon": 13.4049, "m": 2, "p": 101.3, "poi": "Gate 3",
            "tag": "shift", "t": "p", "tid": "w1", "tst": t - 8, "vac": 3, "vel": -1,
        }), "location"),
        # What the booklet lists as required: lat, lon, tst.
        Recorded("minimal-location", _json({
            "_type": "location", "lat": 52.5, "lon": 13.4, "tst": t - 6,
        }), "location"),
        # A resend of the minimal location (the app repeats what was not acknowledged).
        Recorded("resend-minimal-location", _json({
            "_type": "location", "lat": 52.5, "lon": 13.4, "tst": t - 6,
        }), "location"),
        Recorded("transition-enter", _json({
            "_type": "transition", "wtst": t - 86_400, "lat": 52.5163, "lon": 13.3777,
            "tst": t - 5, "acc": 10, "tid": "w1", "event": "enter", "desc": "Depot", "t": "c",
            "rid": "5f1d2c",
        }), "transition", "event"),
        Recorded("waypoint", _json({
            "_type": "waypoint", "desc": "Depot", "lat": 52.5163, "lon": 13.3777, "rad": 100,
            "tst": t - 86_400, "rid": "5f1d2c",
        }), "ignored:waypoint", "waypoint"),
        Recorded("card", _json({
            "_type": "card", "name": "Worker One", "tid": "w1",
            "face": "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9Q"
                    "DwADhgGAWjR9awAAAABJRU5ErkJggg==",
        }), "ignored:card", "info"),
        Recorded("ios-status", _json({
            "_type": "status", "iOS": {"version": "17.5.1", "locationManager": {"altitude": 1}},
        }), "ignored:status", "status"),
        Recorded("lwt", _json({"_type": "lwt", "tst": t - 3600}), "lwt"),
        # Malformed.
        Recorded("not-json", b"lat=52.5&lon=13.4", "rejected:not_json"),
        Recorded("array", b'[{"_type": "location"}]', "rejected:not_object"),
        Recorded("no-type", _json({"lat": 52.5, "lon": 13.4, "tst": t}), "rejected:missing_field"),
        Recorded("no-lat", _json({"_type": "location", "lon": 13.4, "tst": t}),
                 "rejected:missing_field"),
        Recorded("lat-out-of-range", _json({"_type": "location", "lat": 91, "lon": 13.4,
                                            "tst": t}), "rejected:out_of_range"),
        Recorded("tst-as-string", _json({"_type": "location", "lat": 52.5, "lon": 13.4,
                                         "tst": str(t)}), "rejected:bad_type"),
        Recorded("tst-in-milliseconds", _json({"_type": "location", "lat": 52.5, "lon": 13.4,
                                               "tst": t * 1000}), "rejected:ts_in_future"),
        Recorded("duplicate-lat",
                 f'{{"_type":"location","lat":91,"lat":45.5,"lon":13.4,"tst":{t}}}'.encode(),
                 "rejected:duplicate_key"),
        Recorded("nan-lat",
                 f'{{"_type":"location","lat":NaN,"lon":13.4,"tst":{t}}}'.encode(),
                 "rejected:not_json"),
    ]


def valid_locations(now_s: int) -> list[Recorded]:
    """The distinct locations of `recorded` (a resend counted once)."""
    return [item for item in recorded(now_s)
            if item.outcome == "location" and not item.name.startswith("resend")]
