"""`python -m rules`: positions and presence from the backend into alerts."""

from __future__ import annotations

import asyncio
import logging

from rules.engine import TeamRules
from rules.service import RulesConfig, RulesService
from rules.settings import RulesSettings
from teamtrack.backends import from_url
from teamtrack.history import HistoryStore
from teamtrack.logs import configure_logging
from teamtrack.metrics import service_registry
from teamtrack.runtime import run_or_exit, serving, settle_heap
from teamtrack.settings import load_settings

log = logging.getLogger("rules")


async def serve(settings: RulesSettings) -> None:
    config = RulesConfig(
        group=settings.group,
        consumer=settings.consumer,
        start=settings.start,
        tick_s=settings.tick_ms / 1000,
        commit_interval_s=settings.commit_interval_ms / 1000,
        default_rules=TeamRules(
            offline_after_s=settings.offline_alert_s,
            battery_below=settings.battery_alert_below,
            idle_after_s=settings.idle_alert_s,
            idle_radius_m=settings.idle_radius_m,
        ),
        registry_path=settings.registry,
        webhook_secret=settings.webhook_secret.get_secret_value(),
    )
    registry = service_registry()
    store = HistoryStore.from_url(settings.history_url())
    service = RulesService(config, from_url(settings.backend_url), store, registry)
    async with serving(log, registry, settings.metrics_host, settings.metrics_port) as stopping:
        await service.start()
        settle_heap()
        log.info("rules %s (group %s) on %s database", config.consumer, config.group,
                 store.dialect)
        stop_requested = asyncio.create_task(stopping.wait())
        failure = asyncio.create_task(service.wait())
        done, _ = await asyncio.wait({stop_requested, failure},
                                     return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping")
        stop_requested.cancel()
        if failure not in done:
            failure.cancel()
        await service.stop()
        if failure in done:
            failure.result()


def main() -> None:
    settings = load_settings(RulesSettings, "python -m rules")
    configure_logging(settings.log_level)
    run_or_exit(serve(settings), "python -m rules")


if __name__ == "__main__":
    main()
