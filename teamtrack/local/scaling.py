"""`teamtrack scale`: brokers, bridges and dashboards join and leave a running `teamtrack up`.

`teamtrack scale` writes a request (`scale-request.json`) into the state folder; the supervisor
(`teamtrack up`) picks it up within a second, changes the cluster step by step and writes the
outcome (`scale-result.json`), which `teamtrack scale` waits for. Growth comes first, then
shrinking, so that capacity is added before any is taken away. `endpoints.json` is replaced in
one step after every step.

Joining:

* a bridge joins its broker's share group; then the bridges that were there restart one by
  one (each learns its broker's bridge count, which its on-demand mirror needs, and a broker's
  only bridge, on a plain subscription with No Local, moves into the share group): each
  session keeps what arrives meanwhile while the others take the group's messages, and a
  bridge subscribes to the group before it drops a plain subscription, so nothing is answered
  "no matching subscribers" (a message may arrive twice: repeats are dropped downstream);
* a broker gets accounts for its bridges (the other brokers read the password file again),
  its WebSockets gateway and its bridges; their sessions are saved before it is listed;
* a dashboard comes with its device gateway, listed once it answers.

Leaving:

* the bridges that stay restart one by one with their broker's new bridge count, then a
  leaving bridge is told to leave (SIGUSR2, `BridgeService.leave`): it unsubscribes, takes in
  what its broker still queued for it, stores and acknowledges all of it, and ends its session;
* a dashboard is unlisted, then stopped (SIGTERM): its viewers are closed with 1012 (service
  restart) and resume on another instance with their cursor, as after any restart;
* a broker is unlisted, its bridges stopped (their sessions keep what arrives), and it is
  stopped (SIGTERM): Mosquitto disconnects its devices, which move to another broker
  (docs/devices.md, failover), and saves its sessions. It is then started again
  on a port no device knows, its bridges empty their sessions there and leave, and it stops
  for good: what it acknowledged to devices reaches the backend even so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from teamtrack.files import supervisor_running, write_json_atomically
from teamtrack.local.cluster import Child, LocalCluster
from teamtrack.local.ports import MAX_BRIDGES_PER_BROKER, MAX_BROKERS, MAX_DASHBOARDS, bridge_role
from teamtrack.local.servers import LOOPBACK, PRIVATE_UMASK, free_port, port_is_open

REQUEST_FILE = "scale-request.json"
RESULT_FILE = "scale-result.json"
ENDPOINTS_FILE = "endpoints.json"
# A leaving bridge drains for at most this long; a stopping process gets this long after SIGTERM.
LEAVE_LIMIT_S = 40.0
READY_LIMIT_S = 60.0


class ScaleError(RuntimeError):
    """The change cannot be made (or could not be finished); the message says why."""


@dataclass(frozen=True)
class ScaleRequest:
    id: str
    brokers: int | None = None
    bridges_per_broker: int | None = None
    dashboards: int | None = None

    @classmethod
    def new(
        cls, brokers: int | None, bridges_per_broker: int | None, dashboards: int | None
    ) -> ScaleRequest:
        return cls(uuid.uuid4().hex, brokers, bridges_per_broker, dashboards)


# The requesting side (`teamtrack scale`) -------------------------------------------------------
def running_supervisor(state_dir: Path) -> int | None:
    """The pid of the `teamtrack up` serving `state_dir`, or None when none runs there."""
    if not supervisor_running(state_dir):
        return None
    try:
        endpoints = json.loads((state_dir / ENDPOINTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    pid = endpoints.get("supervisor") if isinstance(endpoints, dict) else None
    return pid if isinstance(pid, int) else None


def submit(state_dir: Path, request: ScaleRequest) -> None:
    (state_dir / RESULT_FILE).unlink(missing_ok=True)
    write_json_atomically(state_dir / REQUEST_FILE, asdict(request))


def wait_result(
    state_dir: Path, request_id: str, limit_s: float, on_progress: Callable[[str], None]
) -> dict[str, object]:
    """The supervisor's answer to request `request_id`; its steps are passed to `on_progress`
    as they are made. Raises ScaleError past `limit_s` or when the supervisor is gone."""
    deadline = time.monotonic() + limit_s
    shown = 0
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            result = json.loads((state_dir / RESULT_FILE).read_text())
            if isinstance(result, dict) and result.get("id") == request_id:
                steps = result.get("steps", [])
                for step in steps[shown:]:
                    on_progress(str(step))
                shown = len(steps)
                if result.get("state") != "running":
                    return result
        if running_supervisor(state_dir) is None:
            raise ScaleError("teamtrack up stopped before it answered")
        time.sleep(0.2)
    raise ScaleError(f"no answer within {limit_s:.0f}s (the change may still be under way)")


# The supervisor's side (`teamtrack up`) --------------------------------------------------------
def take_request(state_dir: Path) -> ScaleRequest | None:
    path = state_dir / REQUEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        return None
    path.unlink(missing_ok=True)
    try:
        return ScaleRequest(
            id=str(data["id"]),
            brokers=_count_or_none(data.get("brokers")),
            bridges_per_broker=_count_or_none(data.get("bridges_per_broker")),
            dashboards=_count_or_none(data.get("dashboards")),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _count_or_none(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not a count: {value!r}")
    return value


class Scaler:
    """Applies scale requests to a running `LocalCluster`, one at a time, from the thread that
    supervises it (`poll` is called between supervision rounds; waits keep supervising)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.state_dir = cluster.state_dir
        self._result: dict[str, object] = {}

    def poll(self) -> None:
        request = take_request(self.state_dir)
        if request is None:
            return
        self._result = {"id": request.id, "state": "running", "steps": []}
        self._save_result()
        previous = os.umask(PRIVATE_UMASK)
        try:
            self.apply(request)
            self._result["state"] = "done"
        except Exception as error:  # reported to the caller; the cluster keeps running
            self._result["state"] = "failed"
            self._result["error"] = str(error)
        finally:
            os.umask(previous)
            self.cluster.write_endpoints()
            self._result["scale"] = self._counts()
            self._result["processes"] = self.cluster.processes()
            self._save_result()

    def _counts(self) -> dict[str, int]:
        cluster = self.cluster
        return {"brokers": cluster.brokers, "bridges_per_broker": cluster.bridges_per_broker,
                "dashboards": cluster.dashboards}

    def _save_result(self) -> None:
        write_json_atomically(self.state_dir / RESULT_FILE, self._result)

    def _step(self, text: str) -> None:
        steps = self._result.setdefault("steps", [])
        assert isinstance(steps, list)
        steps.append(text)
        self.cluster.write_endpoints()
        self._save_result()

    # What to do --------------------------------------------------------------------------
    def check(self, request: ScaleRequest) -> tuple[int, int, int]:
        cluster = self.cluster
        brokers = request.brokers or cluster.brokers
        bridges = request.bridges_per_broker or cluster.bridges_per_broker
        dashboards = request.dashboards or cluster.dashboards
        if min(brokers, bridges, dashboards) < 1:
            raise ScaleError("brokers, bridges per broker and dashboards must be at least 1")
        if cluster.options.base_port:
            for name, value, most in (("brokers", brokers, MAX_BROKERS),
                                      ("bridges per broker", bridges, MAX_BRIDGES_PER_BROKER),
                                      ("dashboards", dashboards, MAX_DASHBOARDS)):
                if value > most:
                    raise ScaleError(f"at most {most} {name} with a fixed --base-port "
                                     "(--base-port 0 takes free ports)")
        return brokers, bridges, dashboards

    def apply(self, request: ScaleRequest) -> None:
        brokers, bridges, dashboards = self.check(request)
        cluster = self.cluster
        cluster.grow_ports(brokers, dashboards, bridges)
        # Growth first: capacity arrives before any leaves.
        if bridges > cluster.bridges_per_broker:
            self._add_bridges(bridges)
        if brokers > cluster.brokers:
            self._add_brokers(brokers)
        if dashboards > cluster.dashboards:
            self._add_dashboards(dashboards)
        if dashboards < cluster.dashboards:
            self._remove_dashboards(dashboards)
        if brokers < cluster.brokers:
            self._remove_brokers(brokers)
        if bridges < cluster.bridges_per_broker:
            self._remove_bridges(bridges)

    # Bridges -----------------------------------------------------------------------------
    def _add_bridges(self, count: int) -> None:
        """The new bridges join the share group first; then, if each broker had one bridge
        with a plain subscription, that one is restarted into the group. Meanwhile its
        session still queues every message for it while the group delivers them too: nothing
        waits for its restart, and what arrives twice is dropped downstream."""
        cluster = self.cluster
        cluster.provision_bridges(cluster.brokers, count)
        plain = not cluster.shared_subscriptions
        cluster.shared_subscriptions = True
        previous = cluster.bridges_per_broker
        cluster.bridges_per_broker = count
        started = [(index, instance, port) for index, instance, port in cluster.active_bridges()
                   if instance > previous]
        for index, instance, port in started:
            cluster.start_bridge(index, instance, port)
        for index, instance, port in started:
            self._wait_subscribed(port)
            self._step(f"{bridge_role(index, instance)} joined")
        # The bridges that were there restart one by one, into the share group if they were a
        # broker's only one, and told how many bridges their broker has now (what their
        # on-demand mirror subtracts from the broker's subscription count).
        self._restart_bridges(previous)
        if plain:
            self._step("every broker's first bridge now in its share group")
        cluster.save_bridge_sessions(range(cluster.brokers))

    def _restart_bridges(self, up_to: int) -> None:
        """Restart instances 1..`up_to` of every broker in turn (SIGTERM keeps each session;
        the other bridges of the group take the messages meanwhile)."""
        cluster = self.cluster
        for index, instance, port in cluster.active_bridges():
            if instance <= up_to:
                self._stop(cluster.retire(bridge_role(index, instance)))
                cluster.start_bridge(index, instance, port)
                self._wait_subscribed(port)

    def _remove_bridges(self, count: int) -> None:
        cluster = self.cluster
        leaving = [(index, instance) for index, instance, _ in cluster.active_bridges()
                   if instance > count]
        cluster.bridges_per_broker = count
        # The staying bridges first learn their broker's new bridge count, while the leaving
        # ones still serve the group; then those leave.
        self._restart_bridges(count)
        self._leave([bridge_role(index, instance) for index, instance in leaving])
        cluster.provision_bridges(cluster.brokers, count)
        self._step(f"{len(leaving)} bridge(s) left; {count} per broker")

    def _leave(self, roles: list[str]) -> None:
        """SIGUSR2 to bridges: each drains and ends its session (together, in parallel)."""
        children = [child for child in map(self.cluster.retire, roles) if child is not None]
        for child in children:
            if child.process.running() and child.process.process is not None:
                child.process.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + LEAVE_LIMIT_S
        for child in children:
            while child.process.running() and time.monotonic() < deadline:
                self._idle(0.1)
            child.process.stop()
            self._step(f"{child.role} left (exit {_exit_code(child)})")

    # Brokers -----------------------------------------------------------------------------
    def _add_brokers(self, count: int) -> None:
        cluster = self.cluster
        cluster.provision_bridges(count, cluster.bridges_per_broker)
        added = range(cluster.brokers, count)
        for index in added:
            cluster.start_broker(index)
            self._wait_port(cluster.ports.broker_mqtt[index])
            cluster.start_wsgate(index)
        # Counted before its bridges start: `active_bridges` lists them.
        cluster.brokers = count
        for index, instance, port in cluster.active_bridges():
            if index in added:
                cluster.start_bridge(index, instance, port)
        for index, _, port in cluster.active_bridges():
            if index in added:
                self._wait_subscribed(port)
        cluster.save_bridge_sessions(added)
        for index in added:
            self._wait_port(cluster.ports.broker_ws[index])
            self._step(f"broker-{index + 1} joined with its bridges")

    def _remove_brokers(self, count: int) -> None:
        cluster = self.cluster
        for index in reversed(range(count, cluster.brokers)):
            name = f"broker-{index + 1}"
            bridges = [(instance, port) for broker, instance, port in cluster.active_bridges()
                       if broker == index]
            cluster.brokers = index  # unlisted: nobody is sent there any more
            self._step(f"{name} unlisted")
            self._stop(cluster.retire(f"wsgate-{index + 1}"))
            # Its bridges first (SIGTERM keeps their sessions: what arrives meanwhile is queued
            # there), so that none of them is left retrying a broker that went away.
            for instance, _ in bridges:
                self._stop(cluster.retire(bridge_role(index, instance)))
            self._stop(cluster.retire(name))
            self._step(f"{name} stopped: its devices move to another broker")
            # Its sessions, saved as it stopped, hold what it acknowledged to devices and had
            # not handed to a bridge yet: emptied on a port no device knows.
            drain_port = free_port()
            cluster.start_broker(index, drain_port=drain_port)
            self._wait_port(drain_port)
            for instance, metrics_port in bridges:
                cluster.start_bridge(index, instance, metrics_port, broker_port=drain_port)
            for _, metrics_port in bridges:
                self._wait_subscribed(metrics_port)
            self._leave([bridge_role(index, instance) for instance, _ in bridges])
            self._stop(cluster.retire(name))
            shutil.rmtree(cluster.state_dir / "brokers" / name, ignore_errors=True)
            self._step(f"{name} drained and gone")
        cluster.provision_bridges(count, cluster.bridges_per_broker)

    # Dashboards --------------------------------------------------------------------------
    def _add_dashboards(self, count: int) -> None:
        cluster = self.cluster
        added = range(cluster.dashboards, count)
        for index in added:
            cluster.start_gateway(index)
            cluster.start_dashboard(index)
        for index in added:
            self._wait_port(cluster.ports.dashboards[index])
            self._wait_port(cluster.ports.gateways[index])
        cluster.dashboards = count
        self._step(f"{len(added)} dashboard(s) joined; {count} in all")

    def _remove_dashboards(self, count: int) -> None:
        cluster = self.cluster
        for index in reversed(range(count, cluster.dashboards)):
            cluster.dashboards = index
            self._step(f"dashboard-{index + 1} unlisted")
            # SIGTERM: its viewers are closed with 1012 and resume elsewhere with their cursor.
            self._stop(cluster.retire(f"dashboard-{index + 1}"))
            self._stop(cluster.retire(f"gateway-{index + 1}"))
            self._step(f"dashboard-{index + 1} and gateway-{index + 1} stopped")

    # Waiting while supervising ----------------------------------------------------------------
    def _idle(self, seconds: float) -> None:
        self.cluster.supervise_once()
        time.sleep(seconds)

    def _wait_port(self, port: int) -> None:
        deadline = time.monotonic() + READY_LIMIT_S
        while not port_is_open(LOOPBACK, port):
            if time.monotonic() > deadline:
                raise ScaleError(f"nothing answers on port {port} after {READY_LIMIT_S:.0f}s")
            self._idle(0.05)

    def _wait_subscribed(self, metrics_port: int) -> None:
        self.cluster.wait_subscribed(metrics_port, time.monotonic() + READY_LIMIT_S)

    def _stop(self, child: Child | None) -> None:
        if child is not None:
            child.process.stop()


def _exit_code(child: Child) -> int | None:
    process = child.process.process
    return process.returncode if process is not None else None
