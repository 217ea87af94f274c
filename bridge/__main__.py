"""`python -m bridge`: one broker's devices into the backend, other brokers' traffic back out.

SIGTERM stops it and keeps its session on the broker (it comes back for it); SIGUSR2 drains it
and ends its session (`BridgeService.leave`): the broker sends its share to the other bridges.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from bridge.service import BridgeConfig, BridgeService
from bridge.settings import BridgeSettings
from teamtrack.backends import BackendError, from_url
from teamtrack.logs import configure_logging
from teamtrack.metrics import service_registry
from teamtrack.mqtt import BrokerAddress, MirrorMode
from teamtrack.runtime import run, serving, settle_heap
from teamtrack.settings import load_settings

log = logging.getLogger("bridge")


async def serve(settings: BridgeSettings) -> None:
    config = BridgeConfig(
        broker=BrokerAddress.parse(settings.broker_url),
        broker_id=settings.broker_id,
        # The broker takes the username as the client id (use_username_as_clientid): the
        # persistent session belongs to the account, so each bridge process has its own.
        client_id=settings.username(),
        username=settings.username(),
        password=settings.mqtt_password.get_secret_value(),
        share_group=settings.share_group,
        shared_subscription=settings.shared_subscription,
        session_expiry_s=settings.session_expiry_s,
        mirror=settings.mirror is not MirrorMode.OFF,
        mirror_on_demand=settings.mirror is MirrorMode.ON_DEMAND,
        broker_bridges=settings.broker_bridges,
        mirror_teams=settings.mirrored_teams(),
        batch_max_events=settings.batch_max_events,
        batch_interval_s=settings.batch_interval_ms / 1000,
        max_pending_events=settings.max_pending_events,
        device_rate_per_s=settings.device_rate_per_s,
        device_burst=settings.device_burst,
        duty_file=str(settings.duty_file) if settings.duty_file is not None else None,
    )
    registry = service_registry()
    service = BridgeService(config, from_url(settings.backend_url), registry)
    async with serving(log, registry, settings.metrics_host, settings.metrics_port) as stopping:
        # SIGUSR2: leave the broker for good (`teamtrack scale` took this bridge away).
        leaving = asyncio.Event()
        loop = asyncio.get_running_loop()

        def leave() -> None:
            leaving.set()
            stopping.set()

        loop.add_signal_handler(signal.SIGUSR2, leave)
        # SIGHUP: read duty.json again now (it is also checked every second).
        loop.add_signal_handler(signal.SIGHUP, service.reload_duty)
        await service.start()
        settle_heap()
        log.info("bridge %s ready on %s", config.client_id, config.broker)
        await stopping.wait()
        if leaving.is_set():
            log.info("leaving the broker for good: draining")
            await service.leave()
        else:
            log.info("stopping")
            await service.stop()


def main() -> None:
    settings = load_settings(BridgeSettings, "python -m bridge")
    configure_logging(settings.log_level)
    try:
        run(serve(settings))
    except BackendError as error:
        print(f"python -m bridge: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    except ValueError as error:
        print(f"python -m bridge: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
