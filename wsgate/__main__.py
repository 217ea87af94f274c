"""`python -m wsgate`: MQTT over WebSockets in front of one broker's plain MQTT listener."""

from __future__ import annotations

import logging
import ssl
import sys

from teamtrack.logs import configure_logging
from teamtrack.metrics import service_registry
from teamtrack.runtime import run, serving, settle_heap
from teamtrack.settings import load_settings
from wsgate.service import GatewayConfig, GatewayService
from wsgate.settings import GatewaySettings

log = logging.getLogger("wsgate")


async def serve(config: GatewayConfig, metrics_host: str, metrics_port: int) -> None:
    registry = service_registry()
    service = GatewayService(config, registry)
    async with serving(log, registry, metrics_host, metrics_port) as stopping:
        await service.start()
        settle_heap()
        scheme = "wss" if config.tls_cert else "ws"
        log.info("MQTT over WebSockets on %s://%s:%d/mqtt -> %s", scheme, config.host,
                 service.port, config.broker)
        await stopping.wait()
        log.info("stopping")
        await service.stop()


def main() -> None:
    settings = load_settings(GatewaySettings, "python -m wsgate")
    configure_logging(settings.log_level)
    try:
        config = settings.gateway_config()
        run(serve(config, settings.metrics_host, settings.metrics_port))
    except (ValueError, ssl.SSLError) as error:
        print(f"python -m wsgate: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        print(f"python -m wsgate: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
