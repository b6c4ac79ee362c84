"""Exponential backoff with jitter and a cap: one small pure function (dramatiq-style).

Used by the dispatcher (row retries), the gates (probe intervals), the follower and the store's
listener (reconnects). Pure: no I/O, no clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter and a cap (dramatiq-style: one small pure function)."""

    initial: float = 1.0
    maximum: float = 180.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds before attempt ``attempt + 1``; ``attempt`` counts from 1.

        Jitter only ever shortens the delay, so the cap holds: within
        ``[base * (1 - jitter), base]`` where ``base = min(maximum, initial * multiplier**(n-1))``.
        """
        exponent = max(attempt - 1, 0)
        base = (
            self.maximum
            if exponent > 64
            else min(self.maximum, self.initial * self.multiplier**exponent)
        )
        spread = (rng or random).random() * self.jitter
        return base * (1.0 - spread)
