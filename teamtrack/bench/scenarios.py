"""The paths the harness measures, end to end, with the same generator and the same accounting.

A scenario says what it runs on (a lone broker, or a cluster with a given backend), which
broker the workers publish to, and who receives on the far side. Adding a path is adding an
entry to `SCENARIOS` (and, for a new kind of deployment, teaching `deployments.py` to start
it); the runner, the reports and the plots pick it up from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class ReceiverKind(StrEnum):
    MQTT = "mqtt"  # a subscriber with the observer login on a broker
    WEBSOCKET = "websocket"  # one manager WebSocket per team on a dashboard instance


class SenderKind(StrEnum):
    MQTT = "mqtt"  # one MQTT connection per worker to a broker
    HTTP = "http"  # one NDJSON stream per worker to a device gateway (python -m gateway)


class DeploymentKind(StrEnum):
    LONE_BROKER = "lone-broker"  # one Mosquitto, nothing else
    CLUSTER = "cluster"  # brokers, bridges, a backend, dashboards (`teamtrack up`)


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    kind: DeploymentKind
    backend: str | None = None  # the cluster's broadcast backend: "redis" or "kafka"

    @property
    def label(self) -> str:
        return self.kind.value if self.backend is None else f"{self.kind.value} ({self.backend})"


LONE_BROKER: Final = DeploymentSpec(DeploymentKind.LONE_BROKER)
REDIS_CLUSTER: Final = DeploymentSpec(DeploymentKind.CLUSTER, "redis")
KAFKA_CLUSTER: Final = DeploymentSpec(DeploymentKind.CLUSTER, "kafka")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: str  # what a message goes through, for the report
    deployment: DeploymentSpec
    receiver: ReceiverKind
    # Index of the broker (or device gateway) the workers publish to, and of the broker (MQTT
    # receiver) or the dashboard instance (WebSocket receiver) the far side uses: a different
    # one than the workers' whenever the deployment has more than one, so every message
    # crosses instances.
    sender_broker: int = 0
    receiver_endpoint: int = 1
    sender: SenderKind = SenderKind.MQTT


SCENARIOS: Final[dict[str, Scenario]] = {
    scenario.name: scenario
    for scenario in (
        Scenario(
            "baseline",
            "worker -> Mosquitto -> subscriber on the same broker (R0: the ceiling of the "
            "Python clients on this machine)",
            LONE_BROKER,
            ReceiverKind.MQTT,
            receiver_endpoint=0,
        ),
        Scenario(
            "redis",
            "worker -> broker A -> bridge -> Redis -> dashboard instance B -> manager WebSocket",
            REDIS_CLUSTER,
            ReceiverKind.WEBSOCKET,
        ),
        Scenario(
            "mqtt-mirror",
            "worker -> broker A -> bridge A -> Redis -> bridge B (mirror) -> broker B -> "
            "mosquitto_sub-style subscriber",
            REDIS_CLUSTER,
            ReceiverKind.MQTT,
        ),
        Scenario(
            "http",
            "worker -> device gateway A (NDJSON stream) -> Redis -> dashboard instance B -> "
            "manager WebSocket",
            REDIS_CLUSTER,
            ReceiverKind.WEBSOCKET,
            sender=SenderKind.HTTP,
        ),
        Scenario(
            "kafka",
            "worker -> broker A -> bridge -> Kafka -> dashboard instance B -> manager WebSocket",
            KAFKA_CLUSTER,
            ReceiverKind.WEBSOCKET,
        ),
    )
}


# Not a path measured on a ladder of rates: the fault suite under load, with recovery times
# (`teamtrack/bench/faultbench.py`); only run when named.
FAULTS: Final = "faults"
# Nor is a season's peak with the cluster scaled during it (`teamtrack/bench/spike.py`).
SPIKE: Final = "spike"


def parse_scenarios(names: str) -> tuple[str, ...]:
    """`baseline,redis` -> ("baseline", "redis"); ValueError naming the known ones otherwise."""
    chosen = tuple(name.strip() for name in names.split(",") if name.strip())
    unknown = [name for name in chosen if name not in SCENARIOS and name not in (FAULTS, SPIKE)]
    if unknown or not chosen:
        raise ValueError(
            f"unknown scenario(s) {', '.join(unknown) or '(none given)'}; "
            f"known: {', '.join(SCENARIOS)}, {FAULTS}, {SPIKE}"
        )
    return chosen
