"""What the harness reads from and asks of the operating system (Linux `/proc`).

CPU is counted in percent of one core (200 % = both cores of a 2-core machine busy), from the
user and system ticks of `/proc/PID/stat` (they include every thread of the process); RSS is
the resident set from `/proc/PID/statm`, sampled during a step, and its peak reported.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

CLOCK_TICKS_PER_S: Final = os.sysconf("SC_CLK_TCK")
PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")
# Ceiling when the hard limit is "unlimited" (the kernel refuses an infinite soft limit).
FILE_LIMIT_CEILING: Final = 1 << 20
PROC: Final = Path("/proc")
TIMELINE_SAMPLES: Final = 240
MIB: Final = 1024 * 1024


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; return the new soft one.

    Thousands of MQTT connections need thousands of descriptors; child processes inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILE_LIMIT_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return wanted if soft == resource.RLIM_INFINITY else soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def cpu_ticks(pid: int) -> int | None:
    """User plus system clock ticks used so far by the process, or None if it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: fields count after it.
    fields = text[text.rfind(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def rss_bytes(pid: int) -> int | None:
    try:
        text = (PROC / str(pid) / "statm").read_text()
    except OSError:
        return None
    return int(text.split()[1]) * PAGE_BYTES


def machine_busy_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all cores since boot, from /proc/stat."""
    fields = [int(value) for value in (PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already in user time
    return total - idle, total


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    cpu_percent: float  # of one core
    rss_peak_mib: float
    # The first and last samples of the window: memory that only grows under a steady load
    # shows here (something queues without bound).
    rss_start_mib: float
    rss_end_mib: float
    # (seconds into the window, MiB), at most TIMELINE_SAMPLES of the samples.
    rss_timeline: tuple[tuple[float, float], ...] = ()

    @property
    def rss_growth_mib(self) -> float:
        return self.rss_end_mib - self.rss_start_mib

    def document(self) -> dict[str, Any]:
        return {
            "cpu_percent": round(self.cpu_percent, 1),
            "rss_peak_mib": round(self.rss_peak_mib, 1),
            "rss_start_mib": round(self.rss_start_mib, 1),
            "rss_end_mib": round(self.rss_end_mib, 1),
            "rss_timeline": [[round(at, 1), round(mib, 1)] for at, mib in self.rss_timeline],
        }


@dataclass(frozen=True, slots=True)
class UsageReport:
    seconds: float
    processes: dict[str, ProcessUsage]
    machine_busy_percent: float  # of all cores together (100 = every core busy)


class UsageSampler:
    """CPU and peak RSS of named processes over a window: `start()`, `sample()`s, `finish()`."""

    def __init__(self, processes: Mapping[str, int]) -> None:
        self.processes = dict(processes)
        self._start_ticks: dict[str, int] = {}
        self._peak_rss: dict[str, int] = {}
        self._first_rss: dict[str, int] = {}
        self._last_rss: dict[str, int] = {}
        self._timeline: dict[str, list[tuple[float, int]]] = {}
        self._started_at = 0.0
        self._machine_start = (0, 0)

    def start(self) -> None:
        self._started_at = time.monotonic()
        self._machine_start = machine_busy_ticks()
        self._start_ticks = {}
        self._peak_rss = {}
        self._first_rss = {}
        self._last_rss = {}
        self._timeline = {}
        for role, pid in self.processes.items():
            ticks = cpu_ticks(pid)
            if ticks is not None:
                self._start_ticks[role] = ticks
        self.sample()

    def sample(self) -> None:
        elapsed = time.monotonic() - self._started_at
        for role, pid in self.processes.items():
            rss = rss_bytes(pid)
            if rss is None:
                continue
            self._timeline.setdefault(role, []).append((elapsed, rss))
            self._first_rss.setdefault(role, rss)
            self._last_rss[role] = rss
            if rss > self._peak_rss.get(role, 0):
                self._peak_rss[role] = rss

    def finish(self) -> UsageReport:
        self.sample()
        seconds = max(time.monotonic() - self._started_at, 1e-6)
        busy_start, total_start = self._machine_start
        busy_end, total_end = machine_busy_ticks()
        usage = {}
        for role, pid in self.processes.items():
            started = self._start_ticks.get(role)
            ended = cpu_ticks(pid)
            if started is None or ended is None:
                continue
            usage[role] = ProcessUsage(
                cpu_percent=100.0 * (ended - started) / CLOCK_TICKS_PER_S / seconds,
                rss_peak_mib=self._peak_rss.get(role, 0) / MIB,
                rss_start_mib=self._first_rss.get(role, 0) / MIB,
                rss_end_mib=self._last_rss.get(role, 0) / MIB,
                rss_timeline=_thinned(self._timeline.get(role, [])),
            )
        machine = 100.0 * (busy_end - busy_start) / max(total_end - total_start, 1)
        return UsageReport(seconds, usage, machine)


def _thinned(samples: list[tuple[float, int]]) -> tuple[tuple[float, float], ...]:
    step = max(1, math.ceil(len(samples) / TIMELINE_SAMPLES))
    kept = samples[::step]
    if samples and kept[-1] is not samples[-1]:
        kept.append(samples[-1])
    return tuple((at, rss / MIB) for at, rss in kept)


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    output = (completed.stdout or completed.stderr).strip()
    return output.splitlines()[0] if output else None


def _cpu_model() -> str:
    try:
        for line in (PROC / "cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gib() -> float | None:
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def describe_machine() -> dict[str, object]:
    """What a reader needs to compare a report with their own machine."""
    os_release = {}
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            key, _, value = line.partition("=")
            os_release[key] = value.strip('"')
    except OSError:
        pass
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_total_gib(),
        "os": os_release.get("PRETTY_NAME", platform.system()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mosquitto": _first_line(["mosquitto", "-h"]),
        "redis": _first_line(["redis-server", "--version"]),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }
