"""`teamtrack bench`: device-to-manager latency and throughput, side by side with Mosquitto alone.

The harness starts what it measures (or uses a running cluster), drives load with its own
generator processes, receives on the far side, and joins per-message send and receive records:

    config.py       what a run does (scenarios, shapes, rates, step timing)
    scenarios.py    the paths measured; add one here
    deployments.py  the servers a scenario runs on
    generator.py    `python -m teamtrack.bench.generator`: gmqtt publishers, paced by a tick
    receiver.py     `python -m teamtrack.bench.receiver`: MQTT subscriber or manager WebSockets
    control.py      JSON lines between the harness and those processes
    records.py      per-message records and their files
    accounting.py   delivered, lost, duplicated, latency percentiles
    system.py       CPU and RSS from /proc, open-file limit, machine description
    runner.py       the run: deployments, ladders of rate steps, progress
    results.py      what was measured, and the targets checked against it
    report.py       result.json, summary.md; plots.py the PNGs

See docs/benchmarks/README.md.
"""

from teamtrack.bench.config import BenchConfig, BenchError, FaultInjection, Shape
from teamtrack.bench.results import BenchResult
from teamtrack.bench.runner import run_benchmark

__all__ = ["BenchConfig", "BenchError", "BenchResult", "FaultInjection", "Shape", "run_benchmark"]
