"""``upload.compress_when = "if-faster"``: compress an instance only when that does not
delay it.

The compress stage decides per claimed instance, from figures the pipeline keeps as it
goes (no probing):

* the link rate: bytes the upload stage delivered per second of *busy* time (at least
  one request in flight) over its last requests, at most ``upload.max_bytes_per_second``;
* the compress rate: input bytes per second of one encoder, and the compression ratio,
  over the last encodes;
* the upload backlog: bytes compressed (or passed through) and waiting to go up.

The rule (:func:`decide`), with *size* the instance's size:

1. Not enough measurements yet: compress (optimistic; ``always`` is the default too).
2. Otherwise whichever copy would be in the archive sooner, counted from now:

   * raw: after the backlog, ``(backlog + size) / link``;
   * compressed: when both the encoder is done with it (the encodes queued before it
     in this stage, plus ``size / compress``) and the link with the backlog, then
     ``size / ratio / link``.

   So while the link is busy for longer than the encode takes, compressing costs no
   time and saves link time ("link busy": compress); when the link would wait for the
   encoder, raw often wins ("link idle": raw); on a slow idle link the smaller copy
   wins ("compressing is quicker").  Counting the encodes ahead keeps the encoder
   from becoming the bottleneck on a fast link.

An instance sent raw is recorded as outcome ``passthrough`` with the reason, so the
queue shows why.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

#: How many of the last requests / encodes the rates are taken over.
WINDOW = 20
#: Requests and encodes needed before the rates are trusted.
MIN_SAMPLES = 2


@dataclass(frozen=True)
class Decision:
    compress: bool
    reason: str


def decide(
    size: int,
    *,
    link_bps: float | None,
    compress_bps: float | None,
    ratio: float | None,
    backlog_bytes: int,
    encodes_ahead_s: float = 0.0,
) -> Decision:
    """Whether to compress an instance of *size* bytes (see the module docstring).
    *encodes_ahead_s*: encoding time queued before this one's, per encoder."""
    if not link_bps or not compress_bps or not ratio:
        return Decision(True, "if-faster: no measurements yet")
    drain_s = backlog_bytes / link_bps
    encoded_s = encodes_ahead_s + size / compress_bps
    # When each copy would be in the archive, counted from now.
    raw_s = drain_s + size / link_bps
    compressed_s = max(encoded_s, drain_s) + size / ratio / link_bps
    if raw_s <= compressed_s:
        return Decision(
            False, f"if-faster: link idle (raw {raw_s:.2f} s <= compressed {compressed_s:.2f} s)"
        )
    if drain_s >= encoded_s:
        return Decision(
            True, f"if-faster: link busy ({drain_s:.2f} s queued >= {encoded_s:.2f} s to compress)"
        )
    return Decision(
        True, f"if-faster: compressing is quicker ({compressed_s:.2f} s < raw {raw_s:.2f} s)"
    )


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

    def link_rate(self) -> float | None:
        rate = self.link.rate()
        if rate is not None and self.cap:
            return min(rate, float(self.cap))
        return rate

    def decide(self, size: int, backlog_bytes: int, encodes_ahead_s: float = 0.0) -> Decision:
        return decide(
            size,
            link_bps=self.link_rate(),
            compress_bps=self.encoder.rate(),
            ratio=self.encoder.ratio(),
            backlog_bytes=backlog_bytes,
            encodes_ahead_s=encodes_ahead_s,
        )

    def encode_seconds(self, size: int) -> float:
        rate = self.encoder.rate()
        return size / rate if rate else 0.0
