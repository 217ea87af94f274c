"""Where the processes of `teamtrack up` listen (`PortPlan`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from teamtrack.local.servers import free_port

# Bridges a broker may have with a fixed base port: their /metrics ports are base + 700 + 10 (i-1)
# + (n-2), ten a broker after the first (base 0 takes free ports and has no such limit).
MAX_BRIDGES_PER_BROKER = 11
# Brokers and dashboards with a fixed base port: broker 11 would be at base + 100 (Redis), and
# dashboard 101 at base + 400 (the WebSockets gateways' metrics).
MAX_BROKERS = 10
MAX_DASHBOARDS = 100


def bridge_role(index: int, instance: int) -> str:
    """The child name of bridge `instance` (from 1) of broker `index` (from 0): `bridge-1`,
    `bridge-1-2`, ...; the first keeps the name it had when every broker had one bridge."""
    return f"bridge-{index + 1}" if instance == 1 else f"bridge-{index + 1}-{instance}"


@dataclass(frozen=True)
class PortPlan:
    """Where everything listens; `base_port=0` takes free ports instead.

    From the base port: broker i at base + 10 (i-1) (+1 for MQTT over WebSockets: its gateway,
    `python -m wsgate`; +2 for MQTT over TLS), Redis at base + 100, Kafka at base + 101 with its
    KRaft controller at base + 102 (only the server of the chosen backend is started), bridge
    metrics at base + 200 + (i-1), dashboards at base + 300 + (j-1), gateway metrics at
    base + 400 + (i-1), device gateways (one per dashboard, `python -m gateway`) at
    base + 500 + (j-1) and their metrics at base + 600 + (j-1).
    Kafka nodes 2..N of a cluster (`kafka_nodes`) at base + 101 + 2 (k-1), controller + 1.
    Bridges 2..N of broker i (`bridges_per_broker`) have their metrics at
    base + 700 + 10 (i-1) + (n-2): bridge n of broker i, so at most 11 bridges per broker.
    The supervisor's own metrics (`teamtrack.local.cluster_metrics`) at base + 800, the ingest's at
    base + 801, the rules service's at base + 802.
    """

    broker_mqtt: list[int]
    broker_ws: list[int]
    redis: int
    bridge_metrics: list[int]
    dashboards: list[int]
    wsgate_metrics: list[int] = field(default_factory=list)
    kafka: int = 0
    kafka_controller: int = 0
    # Kafka nodes 2..N, (port, controller port) each; node 1 is kafka / kafka_controller.
    kafka_more: list[tuple[int, int]] = field(default_factory=list)
    broker_mqtts: list[int] = field(default_factory=list)
    gateways: list[int] = field(default_factory=list)
    gateway_metrics: list[int] = field(default_factory=list)
    # Per broker, the /metrics ports of its bridges 2..N (bridge 1's is in bridge_metrics).
    more_bridge_metrics: list[list[int]] = field(default_factory=list)
    supervisor_metrics: int = 0
    ingest_metrics: int = 0
    rules_metrics: int = 0

    @property
    def kafka_nodes(self) -> list[tuple[int, int]]:
        return [(self.kafka, self.kafka_controller), *self.kafka_more]

    def bridges(self) -> list[tuple[int, int, int]]:
        """(broker index from 0, bridge instance from 1, /metrics port) of every bridge,
        broker by broker: b1's bridges 1..N, then b2's."""
        return [
            (index, instance, port)
            for index, first in enumerate(self.bridge_metrics)
            for instance, port in enumerate(
                [first, *(self.more_bridge_metrics[index] if self.more_bridge_metrics else [])],
                start=1,
            )
        ]

    @classmethod
    def build(
        cls, base: int, brokers: int, dashboards: int, kafka_nodes: int = 1,
        bridges_per_broker: int = 1,
    ) -> PortPlan:
        more_bridges = range(bridges_per_broker - 1)
        if base == 0:
            return cls(
                broker_mqtt=[free_port() for _ in range(brokers)],
                broker_ws=[free_port() for _ in range(brokers)],
                redis=free_port(),
                bridge_metrics=[free_port() for _ in range(brokers)],
                dashboards=[free_port() for _ in range(dashboards)],
                wsgate_metrics=[free_port() for _ in range(brokers)],
                kafka=free_port(),
                kafka_controller=free_port(),
                kafka_more=[(free_port(), free_port()) for _ in range(kafka_nodes - 1)],
                broker_mqtts=[free_port() for _ in range(brokers)],
                gateways=[free_port() for _ in range(dashboards)],
                gateway_metrics=[free_port() for _ in range(dashboards)],
                more_bridge_metrics=[
                    [free_port() for _ in more_bridges] for _ in range(brokers)
                ],
                supervisor_metrics=free_port(),
                ingest_metrics=free_port(),
                rules_metrics=free_port(),
            )
        return cls(
            broker_mqtt=[base + 10 * index for index in range(brokers)],
            broker_ws=[base + 10 * index + 1 for index in range(brokers)],
            redis=base + 100,
            bridge_metrics=[base + 200 + index for index in range(brokers)],
            dashboards=[base + 300 + index for index in range(dashboards)],
            wsgate_metrics=[base + 400 + index for index in range(brokers)],
            kafka=base + 101,
            kafka_controller=base + 102,
            kafka_more=[
                (base + 101 + 2 * index, base + 102 + 2 * index)
                for index in range(1, kafka_nodes)
            ],
            broker_mqtts=[base + 10 * index + 2 for index in range(brokers)],
            gateways=[base + 500 + index for index in range(dashboards)],
            gateway_metrics=[base + 600 + index for index in range(dashboards)],
            more_bridge_metrics=[
                [base + 700 + 10 * index + extra for extra in more_bridges]
                for index in range(brokers)
            ],
            supervisor_metrics=base + 800,
            ingest_metrics=base + 801,
            rules_metrics=base + 802,
        )

    def all_ports(self) -> Iterator[int]:
        yield from self.broker_mqtt
        yield from self.broker_ws
        yield from self.broker_mqtts
        yield self.redis
        for port, controller_port in self.kafka_nodes:
            yield port
            yield controller_port
        yield from self.bridge_metrics
        for ports in self.more_bridge_metrics:
            yield from ports
        yield from self.dashboards
        yield from self.wsgate_metrics
        yield from self.gateways
        yield from self.gateway_metrics
        yield self.supervisor_metrics
        yield self.ingest_metrics
        yield self.rules_metrics

    def grown(
        self, base: int, brokers: int, dashboards: int, bridges_per_broker: int
    ) -> PortPlan:
        """This plan with room for at least `brokers`, `dashboards` and `bridges_per_broker`
        (`teamtrack scale`): what is planned keeps its ports; with a base port the new ones
        are where `build` would put them, with base 0 they are free ports."""
        have_brokers = len(self.broker_mqtt)
        have_dashboards = len(self.dashboards)
        have_more = max((len(ports) for ports in self.more_bridge_metrics), default=0)
        if (brokers <= have_brokers and dashboards <= have_dashboards
                and bridges_per_broker - 1 <= have_more):
            return self
        brokers = max(brokers, have_brokers)
        dashboards = max(dashboards, have_dashboards)
        bridges_per_broker = max(bridges_per_broker, have_more + 1)
        if base:
            wider = PortPlan.build(base, brokers, dashboards, len(self.kafka_nodes),
                                   bridges_per_broker)
            return replace(wider, kafka_more=self.kafka_more)

        def extend(ports: list[int], size: int) -> list[int]:
            return [*ports, *(free_port() for _ in range(size - len(ports)))]

        more = [*self.more_bridge_metrics, *([] for _ in range(brokers - have_brokers))]
        return replace(
            self,
            broker_mqtt=extend(self.broker_mqtt, brokers),
            broker_ws=extend(self.broker_ws, brokers),
            broker_mqtts=extend(self.broker_mqtts, brokers),
            bridge_metrics=extend(self.bridge_metrics, brokers),
            wsgate_metrics=extend(self.wsgate_metrics, brokers),
            more_bridge_metrics=[extend(ports, bridges_per_broker - 1) for ports in more],
            dashboards=extend(self.dashboards, dashboards),
            gateways=extend(self.gateways, dashboards),
            gateway_metrics=extend(self.gateway_metrics, dashboards),
        )
