"""`python -m ingest`: positions and presence changes from the backend into the SQL history."""

from __future__ import annotations

import asyncio
import logging

from ingest.service import IngestConfig, IngestService
from ingest.settings import IngestSettings
from teamtrack.backends import from_url
from teamtrack.history import HistoryStore
from teamtrack.logs import configure_logging
from teamtrack.metrics import service_registry
from teamtrack.runtime import run_or_exit, serving, settle_heap
from teamtrack.settings import load_settings

log = logging.getLogger("ingest")


async def serve(settings: IngestSettings) -> None:
    config = IngestConfig(
        group=settings.group,
        consumer=settings.consumer,
        max_batch_positions=settings.max_batch_positions,
        max_pending_batches=settings.max_pending_batches,
        write_interval_s=settings.write_interval_ms / 1000,
        quiet_write_interval_s=settings.quiet_write_interval_ms / 1000,
        quiet_rows_per_s=settings.quiet_rows_per_s,
        retention_days=settings.retention_days,
        registry_path=settings.registry,
        retention_interval_s=settings.retention_interval_s,
        retention_chunk=settings.retention_batch,
        retention_pause_s=settings.retention_pause_ms / 1000,
        recover_interval_s=settings.recover_interval_s,
        backlog_interval_s=settings.backlog_interval_s,
    )
    registry = service_registry()
    store = HistoryStore.from_url(settings.history_url())
    service = IngestService(config, from_url(settings.backend_url), store, registry)
    async with serving(log, registry, settings.metrics_host, settings.metrics_port) as stopping:
        await service.start()
        settle_heap()
        log.info("ingest %s (group %s) writing to %s database",
                 config.consumer, config.group, store.dialect)
        stop_requested = asyncio.create_task(stopping.wait())
        failure = asyncio.create_task(service.wait())
        done, _ = await asyncio.wait(
            {stop_requested, failure}, return_when=asyncio.FIRST_COMPLETED
        )
        log.info("stopping")
        stop_requested.cancel()
        if failure not in done:
            failure.cancel()
        await service.stop()
        if failure in done:
            failure.result()  # a task of the service failed: exit with its error


def main() -> None:
    settings = load_settings(IngestSettings, "python -m ingest")
    configure_logging(settings.log_level)
    run_or_exit(serve(settings), "python -m ingest")


if __name__ == "__main__":
    main()
