"""Load schedules: how many workers should be online at each moment of a run."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulePoint:
    at_seconds: float
    workers: int


@dataclass(frozen=True, slots=True)
class LoadSchedule:
    """Target online-worker counts, linearly interpolated between points, held after the last.

    Before the first point the first count holds. Two points at the same time make a step.
    """

    points: tuple[SchedulePoint, ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a schedule needs at least one point")
        for point in self.points:
            if not math.isfinite(point.at_seconds) or point.at_seconds < 0:
                raise ValueError(f"schedule time {point.at_seconds} must be a finite number >= 0")
            if point.workers < 0:
                raise ValueError(f"schedule count {point.workers} must not be negative")
        times = [point.at_seconds for point in self.points]
        if times != sorted(times):
            raise ValueError("schedule points must be in time order")

    @property
    def end_seconds(self) -> float:
        return self.points[-1].at_seconds

    @property
    def peak(self) -> int:
        return max(point.workers for point in self.points)

    def target_at(self, seconds: float) -> int:
        points = self.points
        # The last point at or before `seconds`; with a step, the later of the equal times wins.
        index = bisect.bisect_right([point.at_seconds for point in points], seconds) - 1
        if index < 0:
            return points[0].workers
        if index == len(points) - 1:
            return points[-1].workers
        before, after = points[index], points[index + 1]
        fraction = (seconds - before.at_seconds) / (after.at_seconds - before.at_seconds)
        return math.floor(before.workers + fraction * (after.workers - before.workers) + 0.5)

    def __str__(self) -> str:
        return ",".join(f"{point.workers}@{point.at_seconds:g}" for point in self.points)


def parse_schedule(text: str) -> LoadSchedule:
    """Parse `COUNT@SECONDS,COUNT@SECONDS,...`, e.g. `100@0,1000@60,1000@120,500@150`."""
    points = []
    for item in text.split(","):
        count, sep, at = item.strip().partition("@")
        if not sep:
            raise ValueError(f"schedule item {item.strip()!r} must be COUNT@SECONDS")
        try:
            points.append(SchedulePoint(at_seconds=float(at), workers=int(count)))
        except ValueError:
            raise ValueError(
                f"schedule item {item.strip()!r} must be an integer count @ a number of seconds"
            ) from None
    return LoadSchedule(tuple(points))
