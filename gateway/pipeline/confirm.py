"""The archive's confirmation by search, for ``commitment.verify = "qido"``.

Some archives answer a STOW-RS before the instance can be found (they index it
later, or may still drop it).  With ``verify = "qido"`` an uploaded instance is
confirmed (``instances.confirmed_at``, what Storage Commitment and the per-study view
count) only once a QIDO-RS search made after its upload finds it: one search per
study (``GET {dicomweb_url}/studies/{study}/instances``), with the upload's TLS and
credentials.  A study whose instances are not (all) found yet is searched again
after a delay that doubles from :data:`_RETRY_INITIAL_S` to :data:`_RETRY_MAX_S`; a
search that fails (no connection, an error answer) is logged and retried the same
way.  The copy searched for is the one uploaded: receiving the instance again clears
its upload, and the confirmation is recorded only for the copy still held
(:func:`gateway.instances.mark_confirmed`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from .. import instances
from ..aio import wait_event
from ..config import Config
from ..store import Store
from .upload import RequestFailed, StowClient

log = logging.getLogger(__name__)

#: Studies searched per round.
_STUDIES_PER_ROUND = 8
_IDLE_POLL_S = 5.0
_RETRY_INITIAL_S = 1.0
_RETRY_MAX_S = 60.0


class Confirmer:
    """Searches the archive for what it said it stored; woken by :meth:`wake`."""

    def __init__(
        self, config: Config, store: Store, on_confirmed: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.on_confirmed = on_confirmed
        self._wake = asyncio.Event()
        #: Study -> (monotonic time of the next search, current delay).
        self._later: dict[str, tuple[float, float]] = {}

    def wake(self) -> None:
        """On the loop: instances were uploaded."""
        self._wake.set()

    async def run(self, client: StowClient) -> None:
        while True:
            now = time.monotonic()
            # Forget studies long due that were not searched again (confirmed meanwhile,
            # received again, failed): the others are back within _RETRY_MAX_S.
            self._later = {s: v for s, v in self._later.items() if v[0] + _RETRY_MAX_S > now}
            waiting = [s for s, (at, _) in self._later.items() if at > now]
            read = functools.partial(
                instances.awaiting_confirmation, studies=_STUDIES_PER_ROUND, skip=waiting
            )
            found = await asyncio.to_thread(self.store.read, read)
            if not found:
                soonest = min((at for at, _ in self._later.values()), default=now + _IDLE_POLL_S)
                await wait_event(self._wake, min(_IDLE_POLL_S, max(0.05, soonest - now)))
                continue
            for study, items in found.items():
                await self._search(client, study, items)

    async def _search(
        self, client: StowClient, study: str, items: list[instances.Unconfirmed]
    ) -> None:
        try:
            held = await client.study_instances(study)
        except RequestFailed as exc:
            delay = self._retry(study)
            log.warning("QIDO-RS search of study %s failed (again in %.0f s): %s",
                        study, delay, exc)  # fmt: skip
            return
        seen = [i for i in items if i.sop_instance_uid in held]
        if seen:
            confirmed = await self.store.run(instances.mark_confirmed(seen), durable=False)
            log.info("study %s: the archive's search found %d of %d uploaded instances",
                     study, confirmed, len(items))  # fmt: skip
            if confirmed and self.on_confirmed is not None:
                self.on_confirmed()
        if len(seen) < len(items):
            self._retry(study)
        else:
            self._later.pop(study, None)

    def _retry(self, study: str) -> float:
        _, delay = self._later.get(study, (0.0, _RETRY_INITIAL_S / 2))
        delay = min(delay * 2, _RETRY_MAX_S)
        self._later[study] = (time.monotonic() + delay, delay)
        return delay
