"""Retry backoff: pure functions from an attempt number to a delay.

Jitter comes from an injected random source so tests can pin it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from pgqueue.errors import MAX_DELAY_SECONDS, ConfigError

DEFAULT_BASE_SECONDS = 1.0
DEFAULT_MAX_SECONDS = 3600.0
DEFAULT_JITTER = 0.25


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base * 2**(attempt-1)``, capped at ``max``, times a jitter
    factor drawn uniformly from ``[1-jitter, 1+jitter)``: the longest delay is
    ``max * (1 + jitter)``, and never more than ten years (what a retry's ``run_at``
    takes)."""

    base_seconds: float = DEFAULT_BASE_SECONDS
    max_seconds: float = DEFAULT_MAX_SECONDS
    jitter: float = DEFAULT_JITTER

    def __post_init__(self) -> None:
        # ConfigError is a ValueError, which these raised before.
        if not 0 <= self.base_seconds <= MAX_DELAY_SECONDS:
            raise ConfigError(f"backoff base must be within 0..{MAX_DELAY_SECONDS} seconds")
        if not 0 <= self.max_seconds <= MAX_DELAY_SECONDS:
            raise ConfigError(f"backoff max must be within 0..{MAX_DELAY_SECONDS} seconds")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("backoff jitter must be between 0 and 1")

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based) failed."""
        exponent = min(max(attempt, 1) - 1, 60)
        raw = min(self.max_seconds, self.base_seconds * (2.0**exponent))
        # The jitter could take a max near ten years past what the worker's retry takes
        # (it would fall back to the default backoff): capped there.
        return float(min(raw * (1.0 - self.jitter + 2.0 * self.jitter * rand()), MAX_DELAY_SECONDS))
