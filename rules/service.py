"""The rules service: the backend's all-teams feed into alerts, each alert raised once.

Exactly once, the ingest's way. The service reads the backend through its own consumer group
with acknowledgement (`Backend.consume(..., acknowledge=True)`). For each batch it runs the
rules (`rules.engine`) from the state of its last commit, then writes, in one transaction,
the new alerts (their ids derived from the trigger: inserting one twice is a no-op), the
changed workers' state and each team's applied cursor; only then does it acknowledge. A crash
before the commit makes the backend deliver the batches again and the rules run again from the
same committed state: the same alerts, the same ids. A batch at or before a team's applied
cursor (delivered again after a crash between commit and acknowledgement) is skipped.

Announcing (the outbox): an alert row starts `published = false`. After each commit the
service publishes a notice per unpublished alert and acknowledgement into the team's log (the
dashboards turn them into frames) and then marks them published. A crash between that publish
and that mark (one UPDATE, milliseconds) announces them again after the restart: the same
alert id, which the page keeps once. Zone changes are announced the same way
(`zone_versions.published`).

Clock rules (offline, idle) run every `tick_s` in the same task as the batches, so the state
has one writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from rules.engine import RuleEngine, TeamRules
from rules.webhooks import WebhookCounters, WebhookSender
from teamtrack.alerts import ALERT_KINDS, Alert, AlertStore, ack_notice, alert_notice, zones_notice
from teamtrack.backends import Backend, BackendError, Event, GroupBatch, GroupConsumer
from teamtrack.contract import NOTICE_ORIGIN
from teamtrack.history import HistoryStore
from teamtrack.history_privacy import erasures_after, last_erasure_id
from teamtrack.logs import RateLimitedLog
from teamtrack.registry import RegistryError, load_registry
from teamtrack.retry import Backoff

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RulesConfig:
    group: str = "rules"
    consumer: str = "rules-1"
    start: str = "latest"
    max_pending_batches: int = 1000
    max_batches_per_commit: int = 500
    # Batches that raised no alert are committed and acknowledged together, at most this long
    # after the first of them was applied: what a crash makes the backend deliver again.
    commit_interval_s: float = 1.0
    # How often, at most, acknowledgements stored by others (a dashboard's) are looked for to
    # be announced: after a read at least this long after the last look, and at every tick
    # when nothing comes. The service's own alerts are announced at once.
    announce_poll_s: float = 0.1
    tick_s: float = 0.5
    zone_poll_s: float = 1.0
    read_pace_s: float = 0.05
    default_rules: TeamRules = field(default_factory=TeamRules)
    team_rules: Mapping[str, TeamRules] = field(default_factory=dict)
    registry_path: Path | None = None
    registry_poll_s: float = 30.0
    # Webhooks (rules.webhooks): team -> URL (the registry's `alert_webhook` replaces it when
    # a registry is given) and the secret their signing keys derive from ("": no webhooks).
    team_hooks: Mapping[str, str] = field(default_factory=dict)
    webhook_secret: str = ""
    webhook_poll_s: float = 0.5
    webhook_first_backoff_s: float = 0.5


@dataclass
class RulesCounters:
    batches: int = 0
    batches_skipped: int = 0
    events: int = 0
    # (team, kind) -> alerts raised: one series per team and kind (teams are the registry's).
    alerts: Counter[tuple[str, str]] = field(default_factory=Counter)
    alerts_duplicate: int = 0
    notices: int = 0
    commits: int = 0
    database_errors: int = 0
    publish_errors: int = 0
    queued_batches: int = 0
    workers_forgotten: int = 0


class _Collector(Collector):
    def __init__(self, counters: RulesCounters, teams: Callable[[], Iterable[str]],
                 webhooks: WebhookCounters) -> None:
        self._counters = counters
        self._teams = teams
        self._webhooks = webhooks

    def collect(self) -> Iterator[Any]:
        counters = self._counters
        raised = CounterMetricFamily(
            "teamtrack_rules_alerts", "Alerts raised (stored and announced once), by team and"
            " kind", labels=["team", "kind"],
        )
        # The registry's teams from the start (at 0), so that rates and absent() work.
        for team in sorted({team for team, _kind in counters.alerts} | set(self._teams())):
            for kind in ALERT_KINDS:
                raised.add_metric([team, kind], counters.alerts[team, kind])
        yield raised
        for name, text, value in (
            ("batches", "Backend batches applied", counters.batches),
            ("batches_skipped", "Batches delivered again after their commit, skipped",
             counters.batches_skipped),
            ("events", "Events run through the rules", counters.events),
            ("alerts_duplicate", "Alerts raised again and ignored (same trigger)",
             counters.alerts_duplicate),
            ("notices", "Notices (alerts, acknowledgements, zone changes) published",
             counters.notices),
            ("commits", "Database transactions committed", counters.commits),
            ("workers_forgotten", "Workers erased whole whose state was dropped",
             counters.workers_forgotten),
            ("database_errors", "Failed database operations (retried)",
             counters.database_errors),
            ("publish_errors", "Failed notice publications (retried)",
             counters.publish_errors),
        ):
            family = CounterMetricFamily(f"teamtrack_rules_{name}", text)
            family.add_metric([], value)
            yield family
        for name, text, value in (
            ("webhooks_delivered", "Alerts a team's webhook accepted (2xx)",
             self._webhooks.delivered),
            ("webhooks_failed", "Webhook calls that failed (retried with backoff)",
             self._webhooks.failed),
            ("webhooks_given_up", "Alerts never accepted by their webhook within 10 minutes",
             self._webhooks.given_up),
        ):
            family = CounterMetricFamily(f"teamtrack_rules_{name}", text)
            family.add_metric([], value)
            yield family
        queued = GaugeMetricFamily("teamtrack_rules_queued_batches", "Batches read, not applied")
        queued.add_metric([], counters.queued_batches)
        yield queued


def rules_from_registry(path: Path, default: TeamRules) -> dict[str, TeamRules]:
    registry = load_registry(path)
    return {
        team.id: TeamRules(
            offline_after_s=default.offline_after_s if team.offline_alert_s is None
            else team.offline_alert_s,
            battery_below=default.battery_below if team.battery_alert_below is None
            else team.battery_alert_below,
            idle_after_s=default.idle_after_s if team.idle_alert_s is None
            else team.idle_alert_s,
            idle_radius_m=default.idle_radius_m,
        )
        for team in registry.teams
    }


class RulesService:
    def __init__(self, config: RulesConfig, backend: Backend, history: HistoryStore,
                 registry: CollectorRegistry, alerts: AlertStore | None = None) -> None:
        self.config = config
        self.backend = backend
        self.history = history
        self.store = alerts if alerts is not None else AlertStore(history.engine)
        self.engine = RuleEngine(config.team_rules, config.default_rules)
        self.counters = RulesCounters()
        self._queue: asyncio.Queue[GroupBatch] = asyncio.Queue(config.max_pending_batches)
        self._tasks: list[asyncio.Task[None]] = []
        self._cursors: dict[str, str] = {}
        self._zone_versions: dict[str, int] = {}
        self._next_zone_poll = 0.0
        self._erasure_id = 0
        # Changed workers' states applied and not yet committed (`_work`).
        self._uncommitted: dict[tuple[str, str], Any] = {}
        self._next_registry_poll = 0.0
        self._log = RateLimitedLog(log)
        self._applied = asyncio.Condition()
        self._hooks: dict[str, str] = dict(config.team_hooks)
        self.webhooks = WebhookSender(
            self.store, lambda: self._hooks, config.webhook_secret,
            poll_s=config.webhook_poll_s, first_backoff_s=config.webhook_first_backoff_s,
        )
        registry.register(_Collector(self.counters, lambda: self.engine.rules.keys(),
                                     self.webhooks.counters))

    # Lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        # The ingest migrates the same database at the same moment under `teamtrack up`
        # (migrate waits for it); a database not up yet is retried, not a reason to exit.
        await self._until_done(self.history.migrate)
        # Before the state: an erasure recorded in between is read by the first poll.
        self._erasure_id = await last_erasure_id(self.history)
        states, self._cursors = await self.store.load_state()
        self.engine.load(states)
        self._read_registry()
        await self._poll_zones()
        consumer = self.backend.consume(
            self.config.group, self.config.consumer,
            start="earliest" if self.config.start == "earliest" else "latest",
            acknowledge=True, pace_s=self.config.read_pace_s,
        )
        self._tasks.append(asyncio.create_task(self._read(consumer), name="rules-reader"))
        self._tasks.append(asyncio.create_task(self._work(consumer), name="rules-worker"))
        if self.config.webhook_secret:
            self._tasks.append(asyncio.create_task(self._hook(), name="rules-webhooks"))
        elif self._hooks:
            log.warning("teams have an alert_webhook but no --webhook-secret is set: "
                        "no webhook is called")

    async def wait(self) -> None:
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.backend.close()
        await self.history.close()

    async def wait_applied(self, batches: int) -> None:
        """Return once this service has applied (committed and acknowledged) `batches`."""
        async with self._applied:
            await self._applied.wait_for(lambda: self.counters.batches >= batches)

    # Reading -------------------------------------------------------------------------------
    async def _read(self, consumer: GroupConsumer) -> None:
        async with consumer:
            async for item in consumer:
                await self._queue.put(item)
                self.counters.queued_batches = self._queue.qsize()

    async def _work(self, consumer: GroupConsumer) -> None:
        """Apply batches as they come; commit (and then acknowledge) at once when an alert
        was raised, otherwise every `commit_interval_s` or `max_batches_per_commit` batches:
        a batch that raises nothing changes only the state, which a crash rebuilds by running
        the unacknowledged batches again (docs/alerts.md)."""
        await self._until_done(self._announce)
        config = self.config
        next_tick = time.monotonic()
        next_announce = 0.0
        applied: list[GroupBatch] = []  # applied, not yet committed and acknowledged
        changed = self._uncommitted
        commit_by = float("inf")
        while True:
            items: list[GroupBatch] = []
            timeout = max(min(next_tick, commit_by) - time.monotonic(), 0.0)
            with contextlib.suppress(TimeoutError):
                items.append(await asyncio.wait_for(self._queue.get(), timeout))
            while items and not self._queue.empty() and (
                len(applied) + len(items) < config.max_batches_per_commit
            ):
                items.append(self._queue.get_nowait())
            self.counters.queued_batches = self._queue.qsize()
            now = time.monotonic()
            await self._until_done(self._poll)
            raised = self._apply_batches(items)
            if items and not applied:
                commit_by = now + config.commit_interval_s
            applied += items
            if now >= next_tick:
                raised += self.engine.tick(int(time.time() * 1000))
                next_tick = now + config.tick_s
            changed.update(self.engine.take_changed())
            if raised or (changed and not applied) or (applied and (
                now >= commit_by or len(applied) >= config.max_batches_per_commit
            )):
                await self._until_done(functools.partial(self._commit, raised, changed))
                changed.clear()
                if applied:
                    await self._acknowledge(consumer, applied)
                    applied, commit_by = [], float("inf")
            if raised or now >= next_announce:
                await self._until_done(self._announce)
                next_announce = now + config.announce_poll_s

    async def _acknowledge(self, consumer: GroupConsumer, items: list[GroupBatch]) -> None:
        try:
            await consumer.acknowledge(items)
        except Exception as error:  # any driver's: the batches come again, skipped
            self._log.warning("ack", "acknowledging failed (%s); they come again", error)
        for _item in items:
            self._queue.task_done()
        self.counters.batches += len(items)
        async with self._applied:
            self._applied.notify_all()

    def _apply_batches(self, items: list[GroupBatch]) -> list[Alert]:
        raised: list[Alert] = []
        now_ms = int(time.time() * 1000)
        for item in items:
            batch = item.batch
            applied = self._cursors.get(batch.team)
            if applied is not None and (
                self.backend.cursor_key(batch.cursor) <= self.backend.cursor_key(applied)
            ):
                self.counters.batches_skipped += 1
                continue
            self._cursors[batch.team] = batch.cursor
            if batch.all_from(NOTICE_ORIGIN):
                continue  # our own notices
            try:
                events = orjson.loads(batch.raw)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(events, list):
                continue
            for event in events:
                if isinstance(event, dict) and event.get("o") != NOTICE_ORIGIN:
                    self.counters.events += 1
                    raised += self.engine.event(batch.team, event, now_ms)
        return raised

    async def _commit(self, raised: list[Alert],
                      changed: Mapping[tuple[str, str], Any]) -> None:
        inserted = await self.store.apply(raised, changed, dict(self._cursors))
        self.counters.commits += 1
        self.counters.alerts_duplicate += len(raised) - inserted

    async def _announce(self) -> None:
        """Publish what is stored and not yet announced; then mark it announced."""
        new, acked = await self.store.unpublished()
        now = int(time.time() * 1000)
        events: list[Event] = [alert_notice(alert, now) for alert in new]
        events += [ack_notice(alert, now) for alert in acked]
        if not events:
            return
        await self.backend.publish(events)
        await self.store.mark_published([alert.id for alert in new],
                                        [alert.id for alert in acked])
        self.counters.alerts.update((alert.team, alert.kind) for alert in new)
        self.counters.notices += len(events)

    async def _hook(self) -> None:
        while True:
            await self._until_done(self.webhooks.deliver_once)
            await asyncio.sleep(self.config.webhook_poll_s)

    async def _poll(self) -> None:
        now = time.monotonic()
        if now >= self._next_registry_poll:
            self._read_registry()
        if now >= self._next_zone_poll:
            await self._poll_zones()
            await self._poll_erasures()

    async def _poll_erasures(self) -> None:
        """Workers erased whole since the last poll: their state is dropped, here and from
        what waits to be committed (`teamtrack history erase` deletes the rows again once
        this poll has had time to run: docs/privacy.md)."""
        for erasure in await erasures_after(self.history, self._erasure_id):
            self._erasure_id = erasure.id
            if erasure.before_ms is None:
                self.engine.forget(erasure.team, erasure.worker)
                self._uncommitted.pop((erasure.team, erasure.worker), None)
                self.counters.workers_forgotten += 1

    def _read_registry(self) -> None:
        self._next_registry_poll = time.monotonic() + self.config.registry_poll_s
        if self.config.registry_path is None:
            return
        try:
            self.engine.rules = rules_from_registry(self.config.registry_path,
                                                    self.config.default_rules)
            self._hooks = {team.id: team.alert_webhook
                           for team in load_registry(self.config.registry_path).teams
                           if team.alert_webhook}
        except (RegistryError, OSError) as error:
            self._log.warning("registry", "registry unreadable, keeping its last rules (%s)",
                              error)

    async def _poll_zones(self) -> None:
        self._next_zone_poll = time.monotonic() + self.config.zone_poll_s
        versions = await self.store.zone_versions()
        for team, (version, changed_ms, changed_by, published) in versions.items():
            if self._zone_versions.get(team) != version:
                self.engine.set_zones(team, await self.store.zones(team))
                self._zone_versions[team] = version
            if published < version:
                now = int(time.time() * 1000)
                await self.backend.publish([zones_notice(team, changed_by, changed_ms, now)])
                await self.store.mark_zones_published(team, version)
                self.counters.notices += 1

    async def _until_done(self, operation: Callable[[], Awaitable[None]]) -> None:
        backoff = Backoff(initial=0.2, maximum=10.0)
        while True:
            error: Exception
            try:
                await operation()
            except (SQLAlchemyError, OSError) as failed:
                self.counters.database_errors += 1
                error = failed
            except BackendError as failed:
                self.counters.publish_errors += 1
                error = failed
            else:
                return
            delay = backoff.next_delay()
            self._log.warning("retry", "rules: %s: %s; retrying in %.1fs",
                              type(error).__name__, str(error).splitlines()[0][:200], delay)
            await asyncio.sleep(delay)
