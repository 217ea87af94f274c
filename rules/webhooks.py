"""Alerts pushed to a team's webhook: signed, retried with backoff, bounded.

Each announced alert of a team with `alert_webhook` in the registry is POSTed there as JSON
(`{"team", "alert": {...as in the alert frame}}`), one request per alert, oldest first, with

    X-Teamtrack-Alert-Id: <the alert id>      (receivers drop a second delivery by it)
    X-Teamtrack-Timestamp: <epoch seconds>
    X-Teamtrack-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">

keyed by the team's own key, `HMAC-SHA256(--webhook-secret, "webhook:" + team)` (so a team's
receiver cannot sign for another team). A 2xx marks the alert delivered (`alerts.hook_state`,
in the database: a restart goes on where it was). Anything else (an error status, a refused
connection, a 5 s timeout) backs the team off, 0.5 s doubling up to 60 s; an alert still not
delivered `max_age_s` (600) after it was raised is given up and counted. At least once: a crash
between a 2xx and its mark sends that alert again, with the same id. Bounded: one request at a
time, at most 50 alerts read per pass, no queue in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import orjson

from teamtrack.alerts import Alert, AlertStore
from teamtrack.logs import RateLimitedLog

log = logging.getLogger(__name__)
DELIVERED, GIVEN_UP = 1, 2


def team_key(secret: str, team: str) -> bytes:
    return hmac.new(secret.encode(), f"webhook:{team}".encode(), hashlib.sha256).digest()


def signature(key: bytes, timestamp: int, body: bytes) -> str:
    return "sha256=" + hmac.new(key, str(timestamp).encode() + b"." + body,
                                hashlib.sha256).hexdigest()


@dataclass
class WebhookCounters:
    delivered: int = 0
    failed: int = 0
    given_up: int = 0


def _post(url: str, body: bytes, headers: Mapping[str, str], timeout_s: float) -> int:
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")  # noqa: S310 (http(s) only: the registry's pattern)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


class WebhookSender:
    def __init__(self, store: AlertStore, hooks: Callable[[], Mapping[str, str]], secret: str,
                 *, poll_s: float = 0.5, timeout_s: float = 5.0, max_age_s: float = 600.0,
                 first_backoff_s: float = 0.5, max_backoff_s: float = 60.0) -> None:
        self.store = store
        self.hooks = hooks
        self.secret = secret
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self.counters = WebhookCounters()
        self._backoff: dict[str, tuple[float, float]] = {}  # team -> (until, current delay)
        self._log = RateLimitedLog(log)

    async def run(self) -> None:
        while True:
            await self.deliver_once()
            await asyncio.sleep(self.poll_s)

    async def deliver_once(self) -> None:
        hooks = dict(self.hooks())
        now = time.monotonic()
        ready = [team for team in hooks if self._backoff.get(team, (0.0, 0.0))[0] <= now]
        for alert in await self.store.webhook_pending(ready):
            if alert.team in self._backoff and self._backoff[alert.team][0] > time.monotonic():
                continue  # failed earlier in this pass
            if time.time() * 1000 - alert.raised_ms > self.max_age_s * 1000:
                await self.store.mark_hooked([alert.id], GIVEN_UP)
                self.counters.given_up += 1
                continue
            if await self._send(hooks[alert.team], alert):
                await self.store.mark_hooked([alert.id], DELIVERED)
                self.counters.delivered += 1
                self._backoff.pop(alert.team, None)
            else:
                self.counters.failed += 1
                _until, delay = self._backoff.get(alert.team, (0.0, 0.0))
                delay = min(max(delay * 2, self.first_backoff_s), self.max_backoff_s)
                self._backoff[alert.team] = (time.monotonic() + delay, delay)

    async def _send(self, url: str, alert: Alert) -> bool:
        body = orjson.dumps({"team": alert.team, "alert": alert.document()})
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "teamtrack-rules",
            "X-Teamtrack-Alert-Id": alert.id,
            "X-Teamtrack-Timestamp": str(timestamp),
            "X-Teamtrack-Signature": signature(team_key(self.secret, alert.team), timestamp,
                                               body),
        }
        try:
            status = await asyncio.to_thread(_post, url, body, headers, self.timeout_s)
        except (OSError, ValueError, http.client.HTTPException) as error:
            self._log.warning(alert.team, "webhook of team %s: %s", alert.team,
                              type(error).__name__)
            return False
        if 200 <= status < 300:
            return True
        self._log.warning(alert.team, "webhook of team %s answered %d", alert.team, status)
        return False
