"""``upload.compress_when = "if-faster"``: compress only as much as does not delay.

The compress stage decides for each claim of instances, from figures the pipeline
keeps as it goes (no probing):

* L, the link rate: bytes the upload stage delivered per second of *busy* time (at
  least one request in flight) over its last requests, at most
  ``upload.max_bytes_per_second``;
* C, the rate of one encoder (input bytes per second) and r, the compression ratio,
  over the last encodes;
* B, the upload backlog: bytes compressed (or passed through) waiting to go up;
* R, the bytes still to decide: received, not yet through the compress stage.

Link and encoders work in parallel.  If a share f of R is compressed, the encoders
need ``f R / (C w)`` (w encoders) and the link ``(B + R - f R (1 - 1/r)) / L``; the
share that makes both equal (the sooner end of the two) is

    f = ((B + R) / L) / (R / (C w) + R (1 - 1/r) / L),   clamped to [0, 1].

Of a claim of k instances the first ``floor(f k + c)`` are compressed, the others go
up raw (outcome ``passthrough``), where c is the share left over from the claims
before (:class:`IfFaster` carries it, for shares of at least :data:`CARRY_FROM`):
the compress stage claims one instance at a time as encoders free up, and without
the carry a share under 1 would compress none of them.  f >= 1 is a link that is
the bottleneck (a slow link, or a long backlog): everything is compressed.  For one
instance on an idle link (B = 0, R = its size) f >= 1 exactly when
``size / L >= size / C + size / r / L``: raw is no sooner.

Until the link is measured, the first :data:`MIN_SAMPLES` instances go up raw, which
measures it soonest, and the next :data:`MIN_SAMPLES` are compressed, which measures
the encoders; then the stage claims nothing more until the figures are in
(:meth:`IfFaster.ready`), for at most :data:`HOLD_MAX_S`: an archive that answers
nothing (an outage) never gives a link rate, and then everything is compressed.
Each queue row gives the reason with the figures.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

#: How many of the last requests / encodes the rates are taken over.
WINDOW = 20
#: Requests and encodes needed before the rates are trusted.
MIN_SAMPLES = 2
#: How long the compress stage waits for the first figures before it compresses
#: without them.
HOLD_MAX_S = 3.0
#: A share under this is not carried from claim to claim.  The model plans as if all
#: pending bytes were there at once; while a modality is still sending, they arrive
#: over time, and a fast link idles between arrivals, so compressing a small share
#: only adds encode time to the last instances (measured: a third of 100 CT slices
#: compressed on an emulated 1 Gbit/s link, 2.1 s against 1.7 s all raw;
#: tests/bench/uplink.py).  A slow or busy link gives shares near or over 1.
CARRY_FROM = 0.5


@dataclass(frozen=True)
class Decision:
    compress: bool
    reason: str


def compress_share(
    *, link_bps: float, compress_bps: float, ratio: float, backlog_bytes: int, pending_bytes: int
) -> float:
    """f of the module docstring (*compress_bps*: of all encoders together)."""
    r_bytes = max(pending_bytes, 1)
    link_s = (backlog_bytes + r_bytes) / link_bps
    per_share_s = r_bytes / compress_bps + r_bytes * (1 - 1 / ratio) / link_bps
    return max(0.0, min(1.0, link_s / per_share_s)) if per_share_s > 0 else 1.0


def plan(
    sizes: list[int],
    *,
    link_bps: float | None,
    compress_bps: float | None,
    ratio: float | None,
    backlog_bytes: int,
    pending_bytes: int,
    carry: float = 0.0,
) -> tuple[list[Decision], float]:
    """For each instance of a claim (sizes in claim order), whether to compress it;
    and the share it leaves over for the next claim, in [0, 1).  *carry*: the share
    left over from the claims before (see the module docstring)."""
    if not link_bps or not compress_bps or not ratio:
        return [Decision(True, "if-faster: no measurements yet")] * len(sizes), carry
    f = compress_share(
        link_bps=link_bps, compress_bps=compress_bps, ratio=ratio,
        backlog_bytes=backlog_bytes, pending_bytes=max(pending_bytes, sum(sizes)),
    )  # fmt: skip
    figures = (
        f"compress {f:.0%}: link {link_bps / 1e6:.1f} MB/s, encoders {compress_bps / 1e6:.1f}"
        f" MB/s, ratio {ratio:.2f}, {backlog_bytes / 1e6:.1f} MB queued to upload,"
        f" {pending_bytes / 1e6:.1f} MB to compress"
    )
    if f < CARRY_FROM:
        carry = 0.0  # a fast link: only whole shares of a claim, nothing carried
    share = f * len(sizes) + carry
    n = min(len(sizes), math.floor(share + 1e-9))
    left = min(max(share - n, 0.0), 1.0 - 1e-9) if CARRY_FROM <= f < 1 else 0.0
    busy = Decision(True, f"if-faster: link busy ({figures})")
    idle = Decision(False, f"if-faster: link idle ({figures})")
    return [busy if i < n else idle for i in range(len(sizes))], left


class LinkMeter:
    """Bytes delivered per second of link busy time, over the last *window* requests.
    Busy time is wall time with at least one request in flight, so concurrent requests
    are not counted twice and idle gaps between them are not counted at all."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._in_flight = 0
        self._mark = 0.0
        self._busy = 0.0  # busy seconds since the last completed request

    def _advance(self) -> None:
        now = time.monotonic()
        if self._in_flight:
            self._busy += now - self._mark
        self._mark = now

    def started(self) -> None:
        self._advance()
        self._in_flight += 1

    def finished(self, nbytes: int, ok: bool) -> None:
        """A request ended; *nbytes* counts only if it was delivered (*ok*)."""
        self._advance()
        self._in_flight = max(0, self._in_flight - 1)
        if ok and nbytes > 0:
            self._samples.append((nbytes, self._busy))
            self._busy = 0.0

    def rate(self) -> float | None:
        if len(self._samples) < MIN_SAMPLES:
            return None
        seconds = sum(s for _, s in self._samples)
        return sum(b for b, _ in self._samples) / seconds if seconds > 0 else None


class CompressMeter:
    """Input bytes per second of one encoder, and the size ratio, over the last encodes."""

    def __init__(self, window: int = WINDOW) -> None:
        self._samples: deque[tuple[int, int, float]] = deque(maxlen=window)

    def add(self, size_in: int, size_out: int, seconds: float) -> None:
        if size_in > 0 and size_out > 0 and seconds > 0:
            self._samples.append((size_in, size_out, seconds))

    def rate(self) -> float | None:
        if len(self._samples) < MIN_SAMPLES:
            return None
        return sum(s[0] for s in self._samples) / sum(s[2] for s in self._samples)

    def ratio(self) -> float | None:
        if len(self._samples) < MIN_SAMPLES:
            return None
        return sum(s[0] for s in self._samples) / sum(s[1] for s in self._samples)


class IfFaster:
    """The figures and the decision, as the pipeline uses them."""

    def __init__(self, max_bytes_per_second: int = 0) -> None:
        self.link = LinkMeter()
        self.encoder = CompressMeter()
        self.cap = max_bytes_per_second
        self._carry = 0.0
        self._probes = 0  # instances sent raw to measure the link
        self._blind = 0  # instances compressed before the figures were in
        self._holding_since: float | None = None

    def measured(self) -> bool:
        return bool(self.link_rate() and self.encoder.rate() and self.encoder.ratio())

    def ready(self) -> bool:
        """May the compress stage claim more?  Not while the instances sent to take the
        first measurements are on their way, for at most HOLD_MAX_S."""
        if self.measured():
            return True
        if self.link_rate() is None and self._probes < MIN_SAMPLES:
            return True
        if self._blind < MIN_SAMPLES:
            return True
        now = time.monotonic()
        if self._holding_since is None:
            self._holding_since = now
        return now - self._holding_since >= HOLD_MAX_S

    def link_rate(self) -> float | None:
        rate = self.link.rate()
        if rate is not None and self.cap:
            return min(rate, float(self.cap))
        return rate

    def plan(
        self, sizes: list[int], backlog_bytes: int, pending_bytes: int, workers: int
    ) -> list[Decision]:
        link = self.link_rate()
        decisions: list[Decision] = []
        while link is None and self._probes < MIN_SAMPLES and len(decisions) < len(sizes):
            self._probes += 1
            decisions.append(Decision(False, "if-faster: measuring the link (sent raw)"))
        rest = sizes[len(decisions) :]
        if not rest:
            return decisions
        rate = self.encoder.rate()
        if not self.measured():
            self._blind += len(rest)
        planned, self._carry = plan(
            rest,
            link_bps=link,
            compress_bps=rate * workers if rate else None,
            ratio=self.encoder.ratio(),
            backlog_bytes=backlog_bytes,
            pending_bytes=pending_bytes,
            carry=self._carry,
        )
        return decisions + planned
