"""Exponential backoff with jitter, for every loop that retries a peer: the pipeline's
uploads (per instance) and the MPPS forwarder (the whole upstream).
"""

from __future__ import annotations

import random

#: The exponent of the backoff stops growing here: 2**62 times any sane initial delay is
#: far beyond any maximum, and a float power of it cannot overflow (2.0 ** 1024 does).
_BACKOFF_MAX_EXPONENT = 62


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Exponential backoff with jitter: attempt n waits between half and all of
    ``min(maximum, initial * 2**(n-1))``, so boxes that lost the archive together do
    not all come back at the same second.  Any attempt count is fine (no overflow)."""
    exponent = min(max(0, attempts - 1), _BACKOFF_MAX_EXPONENT)
    ceiling = min(maximum, initial * 2.0**exponent)
    return ceiling / 2 + random.uniform(0, ceiling / 2)
