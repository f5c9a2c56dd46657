"""When to rotate: pure schedule functions (no clock reads; callers pass ``now`` and a random source)."""

from __future__ import annotations

import random
from collections.abc import Callable

JITTER = 0.10


def rotate_at(not_before: float, not_after: float, rand: Callable[[], float] = random.random) -> float:
    """About half-way through the validity, +-10 % of that half so a fleet does not rotate in lockstep.

    ``rand`` returns a float in [0, 1).
    """
    life = max(0.0, not_after - not_before)
    half = life / 2.0
    jitter = (rand() * 2.0 - 1.0) * JITTER * half
    return not_before + half + jitter


def jwt_reusable_until(issued_at: float, expires_at: float) -> float:
    """A cached JWT-SVID is handed out again until half its life has passed."""
    return issued_at + max(0.0, expires_at - issued_at) / 2.0


def backoff_delay(
    failures: int, base: float, cap: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with full jitter in [delay/2, delay]: base * 2**(failures-1), capped."""
    if failures <= 0:
        return base
    delay = min(cap, base * (2.0 ** min(failures - 1, 30)))
    return delay / 2.0 + rand() * delay / 2.0
