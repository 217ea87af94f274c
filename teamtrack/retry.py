"""Exponential backoff with jitter, for every reconnect loop of the services."""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    initial: float = 0.1
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2
    _current: float = field(default=0.0, init=False)

    def next_delay(self) -> float:
        self._current = self.initial if self._current == 0 else min(
            self.maximum, self._current * self.factor
        )
        return self._current * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self._current = 0.0
