"""`python -m gateway`: devices over HTTP (OwnTracks, NDJSON streams) into the backend."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys

from gateway.service import GatewayService
from gateway.settings import GatewaySettings
from teamtrack.backends import BackendError, from_url
from teamtrack.device_auth import PasswordFileError
from teamtrack.logs import configure_logging
from teamtrack.metrics import service_registry
from teamtrack.runtime import run, serving, settle_heap
from teamtrack.settings import load_settings

PROGRAM = "python -m gateway"
log = logging.getLogger("gateway")


async def serve(settings: GatewaySettings) -> None:
    config = settings.gateway_config()
    registry = service_registry()
    service = GatewayService(config, from_url(settings.backend_url), registry)
    # Listening before /metrics answers: `teamtrack up` takes the metrics port as ready.
    await service.start()
    try:
        async with serving(
            log, registry, settings.metrics_host, settings.metrics_port
        ) as stopping:
            settle_heap()
            # SIGHUP: read duty.json again now (it is also checked every second).
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.reload_duty)
            log.info("gateway %s: OwnTracks on %s/v1/owntracks, NDJSON streams on "
                     "%s/v1/positions (%d device account(s))", config.gateway_id, service.url,
                     service.url, len(service.accounts))
            await stopping.wait()
            log.info("stopping")
    finally:
        await service.stop()


def main() -> None:
    settings = load_settings(GatewaySettings, PROGRAM)
    configure_logging(settings.log_level)
    try:
        run(serve(settings))
    except (ValueError, PasswordFileError, ssl.SSLError) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (BackendError, OSError) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
