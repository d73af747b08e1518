"""DIMSE SCP: C-ECHO and C-STORE of every storage SOP class and transfer syntax.

pynetdicom runs one thread per association.  Each C-STORE data set is streamed by
pynetdicom to a temp file inside the spool (a :class:`SpoolTempFile` in ``spool/tmp``;
gateway/dicom/patches.py makes pynetdicom do so), so a large instance costs disk, not
memory.  The handler validates it, makes it durable (:meth:`Spool.commit_file`), waits
for its queue row to commit, and only then answers 0x0000.  Every way that can fail
maps to a failure status; nothing is acknowledged that is not on disk.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import split_dataset
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import ThreadedAssociationServer

from ..config import DimseConfig, is_valid_uid
from ..instances import ReceivedInstance
from ..notify import CALLING_AE, SOP_INSTANCE_UID
from ..spool import (
    MISSING_COMMENT,
    NO_SPACE_ERRNOS,
    Spool,
    SpoolFull,
    SpoolMissing,
    SpoolTempFile,
    ofd_lock,
)
from ..store import Store
from . import negotiation, patches
from .dimse_status import (
    FIND_CANCELLED,
    FIND_FAILED,
    FIND_PENDING,
    FIND_UNABLE_TO_PROCESS,
    PROCESSING_FAILURE,
    RESOURCE_LIMITATION,
    STORE_CANNOT_UNDERSTAND,
    STORE_DATASET_MISMATCH,
    STORE_OUT_OF_RESOURCES,
    STORE_PROCESSING_ERROR,
    STORE_UNDECODABLE,
    SUCCESS,
)
from .tcp import no_delay

if TYPE_CHECKING:
    from ..commitment.scp import CommitmentScp
    from ..metrics import Metrics
    from ..mpps.scp import MppsScp

log = logging.getLogger(__name__)

#: Every C-STORE status the handler answers: (PS3.4 B.2.3 meaning, when).  The
#: Conformance Statement's table is generated from it.
STORE_STATUSES: dict[int, tuple[str, str]] = {
    SUCCESS: ("Success", "the file and its queue row are durable"),
    STORE_OUT_OF_RESOURCES: (
        "Refused: Out of Resources",
        "spool free space below `spool.min_free_bytes`, disk full, the spool directory"
        " missing or replaced, or the gateway is stopping",
    ),
    STORE_DATASET_MISMATCH: (
        "Error: Data Set does not match SOP Class",
        "SOP Class/Instance UID in the data set differs from the command; Study or Series"
        " Instance UID missing, empty or not a valid UID (no archive could store it)",
    ),
    STORE_CANNOT_UNDERSTAND: (
        "Error: Cannot understand",
        "Affected SOP Class/Instance UID in the command is not a valid UID",
    ),
    STORE_UNDECODABLE: (
        "Error: Cannot understand (data set)",
        "the data set cannot be decoded (truncated, garbage, not in the negotiated"
        " transfer syntax)",
    ),
    STORE_PROCESSING_ERROR: (
        "Error: Cannot understand (processing failure)",
        "an I/O or database error other than no space",
    ),
}

#: Every Modality Worklist C-FIND status the handler answers (PS3.4 K.4.1.1.4).
FIND_STATUSES: dict[int, tuple[str, str]] = {
    FIND_PENDING: ("Pending", "one matching worklist item follows"),
    SUCCESS: ("Success", "all matches sent"),
    FIND_CANCELLED: ("Cancel", "the SCU sent C-CANCEL"),
    FIND_FAILED: ("Failed: Unable to process", "the query could not be answered"),
}

#: How long a C-STORE waits for its queue row to commit before answering failure.
COMMIT_TIMEOUT_S = 60.0
#: At stop, how long drained associations may take to read their last answer and
#: release before they are aborted (within dimse.drain_seconds).
_ANSWER_GRACE_S = 2.0

_HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
_NAMES = {"StudyInstanceUID": "Study Instance UID", "SeriesInstanceUID": "Series Instance UID"}


@dataclass(frozen=True)
class StoreOutcome:
    status: int
    comment: str = ""

    def as_status(self) -> Dataset | int:
        if not self.comment:
            return self.status
        ds = Dataset()
        ds.Status = self.status
        # ErrorComment is LO: 64 characters at most.
        ds.ErrorComment = self.comment[:64]
        return ds


# A-ASSOCIATE-RJ (source, diagnostic), PS3.8 9.3.4 -> metrics label.
_REJECT_REASONS = {
    (1, 2): "application_context",
    (1, 3): "calling_ae_not_allowed",
    (1, 7): "called_ae_unknown",
    (2, 2): "protocol_version",
    (3, 2): "too_many_associations",
}


class _NoDelayServer(ThreadedAssociationServer):
    """Sets TCP_NODELAY on every accepted socket (gateway/dicom/tcp.py).

    With *listen_socket* it serves a socket the gateway bound and listens on, which
    the other receiver processes accept from too (gateway/dicom/receivers.py): it is not
    bound again, its accept does not wait (another process may have taken the
    connection the wake-up was for), and closing it here does not shut it down for
    the others.
    """

    daemon_threads = True

    def __init__(
        self, *args: Any, listen_socket: socket.socket | None = None, **kwargs: Any
    ) -> None:
        self._inherited = listen_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self._inherited is None:
            super().server_bind()
            return
        if self.socket is not None:
            self.socket.close()
        self.socket = self._inherited
        self.socket.settimeout(0)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._inherited is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._inherited is None:
            super().server_close()
        elif self.socket is not None:
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        no_delay(sock)
        # accept() returns a socket without the listener's timeout: without this, a
        # peer that sends half a PDU holds the connection's thread in recv() forever.
        sock.settimeout(self.ae.network_timeout)
        return sock, address


#: The slots file of the gateway-wide association limit, in the spool's root.
SLOTS_FILE = "associations.lock"


class _AssociationSlots:
    """``dimse.max_associations`` across every receiver process.

    An association holds one byte of ``<spool>/associations.lock`` with an
    open-file-description lock on a descriptor of its own, from its A-ASSOCIATE-RQ
    until its connection closes (or its process ends: the kernel drops the lock).  No
    free byte: pynetdicom rejects it as its own limit would
    (:meth:`gateway.dicom.patches.ReceivingAE.refuse`).
    """

    def __init__(self, spool: Spool, count: int) -> None:
        self.spool = spool
        self.count = count

    def take(self) -> int | None:
        """A descriptor holding a free slot; None when all are taken.  A spool that is
        gone counts nothing (its C-STOREs are refused anyway)."""
        try:
            fd = self.spool.open_lock_file(SLOTS_FILE)
        except OSError as exc:
            log.warning("association not counted against the limit: %s", exc)
            return -1
        try:
            for slot in range(self.count):
                if ofd_lock(fd, fcntl.F_WRLCK, slot, wait=False):
                    return fd
        except OSError:
            os.close(fd)
            raise
        os.close(fd)
        return None


def _spool_write_failed(
    where: str, sop_instance: str, exc: OSError, fields: dict[str, str]
) -> StoreOutcome:
    """Writing the spool failed: a full disk is out of resources, anything else an I/O error."""
    log.error("C-STORE %s sop=%s failed writing the spool: %s", where, sop_instance, exc,
              extra=fields)  # fmt: skip
    if exc.errno in NO_SPACE_ERRNOS:
        return StoreOutcome(STORE_OUT_OF_RESOURCES, "spool disk is full")
    return StoreOutcome(STORE_PROCESSING_ERROR, "I/O error writing the spool")


def _spool_missing(where: str, sop_instance: str, fields: dict[str, str]) -> StoreOutcome:
    log.error("C-STORE %s sop=%s refused: %s", where, sop_instance, MISSING_COMMENT, extra=fields)
    return StoreOutcome(STORE_OUT_OF_RESOURCES, MISSING_COMMENT)


def _check_dataset(
    path: Path, sop_class: str, sop_instance: str, transfer_syntax: UID
) -> tuple[str, str]:
    """Parse the received data set far enough to trust it; return (study, series) UID.

    Raises :class:`_Refusal` with the status to answer, or OSError if the file itself
    cannot be read.
    """
    with open(path, "rb"):
        pass  # an unreadable file is an I/O error, not a malformed data set
    try:
        # Values over the defer size are not read, only skipped: a 300 MB pixel data
        # element is checked for fitting in the file without being loaded.
        ds = pydicom.dcmread(path, defer_size=64 * 1024)
        size = _data_set_size(path, ds)
        # keys(), not iteration: iterating a Dataset would convert (and read) values.
        elements = [ds.get_item(tag, keep_deferred=True) for tag in ds.keys()]  # noqa: SIM118
        for raw in elements:
            value_tell = getattr(raw, "value_tell", None)
            length = getattr(raw, "length", None)
            if value_tell is None or length is None or length == 0xFFFFFFFF:
                continue
            if value_tell + length > size:
                raise _Refusal(
                    STORE_UNDECODABLE, f"element {raw.tag} runs past the end of the data"
                )
        if not transfer_syntax.is_deflated:
            for raw in elements:
                implicit = getattr(raw, "is_implicit_VR", None)
                if implicit is not None and implicit != transfer_syntax.is_implicit_VR:
                    raise _Refusal(
                        STORE_UNDECODABLE, "data set not in the negotiated transfer syntax"
                    )
        # pydicom stops quietly when fewer than a header's bytes remain: a data set cut
        # inside an element header shows as bytes after the last whole element.
        last = elements[-1] if elements else None
        tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
        if tell is not None and length not in (None, 0xFFFFFFFF) and tell + length != size:
            raise _Refusal(STORE_UNDECODABLE, "data set ends inside an element header")
        found = {kw: ds.get(kw) for kw in _HEADER_TAGS}
    except _Refusal:
        raise
    except (
        InvalidDicomError,
        EOFError,
        ValueError,
        KeyError,
        TypeError,
        OverflowError,
        zlib.error,
    ) as exc:
        raise _Refusal(STORE_UNDECODABLE, f"data set cannot be decoded: {exc}") from exc
    except Exception as exc:  # pydicom raises a wide range (OSError too) on malformed input
        raise _Refusal(STORE_UNDECODABLE, f"data set cannot be decoded: {exc!r}") from exc
    if found["SOPInstanceUID"] != sop_instance:
        raise _Refusal(STORE_DATASET_MISMATCH, "SOP Instance UID differs from the C-STORE command")
    if found["SOPClassUID"] != sop_class:
        raise _Refusal(STORE_DATASET_MISMATCH, "SOP Class UID differs from the C-STORE command")
    for kw in ("StudyInstanceUID", "SeriesInstanceUID"):
        # Type 1 in every composite IOD, and the key a DICOMweb archive stores by: an
        # instance without them can never be delivered, so the modality hears it now
        # (its operator can fix it) instead of an acknowledged image failing later.
        value = found[kw]
        if value is None or value == "":
            raise _Refusal(STORE_DATASET_MISMATCH, f"no {_NAMES[kw]} in the data set")
        if not is_valid_uid(value):
            raise _Refusal(STORE_DATASET_MISMATCH, f"{_NAMES[kw]} is not a valid UID")
    return str(found["StudyInstanceUID"]), str(found["SeriesInstanceUID"])


def _data_set_size(path: Path, ds: Dataset) -> int:
    """The length of the stream pydicom parsed, which element offsets refer to: the
    file itself, or for deflated data the inflated data set (counted, not held)."""
    if ds.file_meta.TransferSyntaxUID != DeflatedExplicitVRLittleEndian:
        return os.path.getsize(path)
    _, offset = split_dataset(path)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1024 * 1024):
            total += len(inflater.decompress(chunk))
    return total + len(inflater.flush())


class _Refusal(Exception):
    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.outcome = StoreOutcome(status, comment)


class Receiver:
    """The DIMSE listener and its C-ECHO / C-STORE handlers."""

    def __init__(
        self,
        config: DimseConfig,
        spool: Spool,
        store: Store,
        on_stored: Callable[[ReceivedInstance], None] | None = None,
        worklist: Callable[[Dataset], Iterator[Dataset]] | None = None,
        mpps_scp: MppsScp | None = None,
        metrics: Metrics | None = None,
        listen_socket: socket.socket | None = None,
        commitment_scp: CommitmentScp | None = None,
    ) -> None:
        """*listen_socket*: serve this listening socket (bound by the gateway, shared
        with the other receiver processes) instead of binding ``dimse.bind:port``."""
        self.metrics = metrics
        self._listen_socket = listen_socket
        self._slots = _AssociationSlots(spool, config.max_associations)
        self.config = config
        self.spool = spool
        self.store = store
        self.on_stored = on_stored
        self.worklist = worklist
        self.mpps_scp = mpps_scp
        self.commitment_scp = commitment_scp
        self._server: _NoDelayServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._inflight = 0
        self._inflight_cond = threading.Condition()
        self.address: tuple[str, int] = ("", 0)

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        patches.install()
        c = self.config
        # Each data set streams to a temp file on the spool filesystem, so the final
        # rename is atomic; its PDUs are no larger than dimse.max_pdu_size.
        ae = patches.ReceivingAE(c.ae_title, c.max_pdu_size, self.spool.temp_file_factory)
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.network_timeout
        ae.require_called_aet = True
        ae.require_calling_aet = list(c.allowed_aets)
        # Storage contexts are added per association when its request arrives
        # (_on_acse_recv): private and unknown classes cannot be listed in advance.
        services = list(negotiation.SERVICE_TRANSFER_SYNTAXES)
        ae.add_supported_context(negotiation.VERIFICATION, services)
        if self.worklist is not None:
            ae.add_supported_context(negotiation.MODALITY_WORKLIST_FIND, services)
        if self.mpps_scp is not None:
            ae.add_supported_context(negotiation.MPPS, services)
        if self.commitment_scp is not None:
            # Default roles (no SCP/SCU Role Selection answered): the modality is the
            # SCU here; the report goes on an association of our own (reporter.py).
            ae.add_supported_context(negotiation.STORAGE_COMMITMENT, services)
        handlers: list[Any] = [
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        address = (c.bind, c.port)
        if self._listen_socket is not None:
            address = self._listen_socket.getsockname()[:2]
        server = ae.make_server(
            address,
            evt_handlers=handlers,
            server_class=_NoDelayServer,
            listen_socket=self._listen_socket,
        )
        assert isinstance(server, _NoDelayServer)
        ae.serve(server)
        self._server = server
        host, port = server.server_address[:2]
        self.address = (str(host), int(port))
        self._thread = threading.Thread(
            target=server.serve_forever, name="dimse-acceptor", daemon=True
        )
        self._thread.start()
        return self.address

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def active_associations(self) -> int:
        return len(self._server.active_associations) if self._server else 0

    def stop_accepting(self) -> None:
        """Close the listening socket; C-STOREs that arrive from now on are refused."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def drain(self, timeout: float) -> bool:
        """Wait up to *timeout* for in-flight C-STOREs, then abort what is left."""
        deadline = time.monotonic() + timeout
        with self._inflight_cond:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._inflight_cond.wait(left)
            finished = self._inflight == 0
        if self._server is not None:
            # A handler that returned has not necessarily sent its answer yet, and an
            # abort now could overtake it: give the peers a moment to read it and
            # release (the next C-STORE on the association is refused meanwhile).
            grace_end = min(deadline, time.monotonic() + _ANSWER_GRACE_S)
            while self._server.active_associations and time.monotonic() < grace_end:
                time.sleep(0.02)
            for assoc in self._server.active_associations:
                assoc.abort()
        return finished

    # -- handlers -------------------------------------------------------------------
    def _on_acse_recv(self, event: evt.Event) -> None:
        """Support the storage classes this A-ASSOCIATE-RQ proposes, before pynetdicom
        negotiates it (in this same thread, right after this event)."""
        request = getattr(event, "primitive", None)
        acceptor = event.assoc.acceptor
        if not (isinstance(request, A_ASSOCIATE) and event.assoc.is_acceptor):
            return
        if not acceptor.writeable or request.result is not None:
            return  # not a request, or negotiation is already under way
        slot = self._slots.take()
        patches.ReceivingAE.refuse(slot is None)
        if slot is not None and slot >= 0:
            event.assoc._gateway_slot = slot  # type: ignore[attr-defined]
        proposed = [
            str(cx.abstract_syntax)
            for cx in request.presentation_context_definition_list
            if cx.abstract_syntax is not None
        ]
        supported = acceptor.supported_contexts
        have = {str(cx.abstract_syntax) for cx in supported}
        added = negotiation.storage_contexts(
            (uid for uid in proposed if uid not in have), self.config.storage_sop_classes
        )
        acceptor.supported_contexts = supported + added

    def _on_established(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        log.info("association from %s:%s calling AE %r accepted", r.address, r.port, r.ae_title)
        if self.metrics is not None:
            self.metrics.associations_accepted.inc()

    def _on_rejected(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        request = r.primitive
        called = request.called_ae_title if request is not None else "?"
        rj = event.assoc.acceptor.primitive
        why = (getattr(rj, "result_source", 0) or 0, getattr(rj, "diagnostic", 0) or 0)
        reason = _REJECT_REASONS.get((int(why[0]), int(why[1])), "other")
        if self.metrics is not None:
            self.metrics.associations_rejected.labels(reason).inc()
        log.warning(
            "association from %s:%s calling AE %r called AE %r rejected: %s",
            r.address, r.port, r.ae_title, called, reason,
        )  # fmt: skip

    def _on_conn_close(self, event: evt.Event) -> None:
        slot = getattr(event.assoc, "_gateway_slot", None)
        if slot is not None:
            event.assoc._gateway_slot = None  # type: ignore[attr-defined]
            os.close(slot)  # the association's slot is free again
        # A connection that closes halfway through a data set (abort, timeout, peer
        # gone) leaves pynetdicom's partial message behind: drop its temp file now.
        partial = patches.partial_data_set(event.assoc)
        if isinstance(partial, SpoolTempFile) and not partial.closed:
            log.warning("connection closed during a C-STORE; partial data discarded")
            partial.discard()

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """Modality Worklist C-FIND, answered from the local cache only."""
        requestor = event.assoc.requestor
        if self.worklist is None:
            yield FIND_UNABLE_TO_PROCESS, None  # pragma: no cover - no MWL context is offered
            return
        try:
            query = event.identifier
            found = 0
            for response in self.worklist(query):
                if event.is_cancelled:
                    log.info("worklist query from %r cancelled", requestor.ae_title)
                    yield FIND_CANCELLED, None
                    return
                found += 1
                yield FIND_PENDING, response
        except Exception:  # any failure must reach the modality as a status
            log.exception("worklist query from %r failed", requestor.ae_title)
            yield FIND_FAILED, None
            return
        log.info("worklist query from %r: %d items", requestor.ae_title, found)
        yield SUCCESS, None

    # -- MPPS (gateway/mpps/scp.py) and Storage Commitment (gateway/commitment/scp.py);
    # counted in flight like C-STOREs, so a stop lets an accepted request reach its answer.
    def _on_n_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        if self.mpps_scp is None:
            return PROCESSING_FAILURE, None  # pragma: no cover - no MPPS context is offered
        return self._n_call(event, self.mpps_scp.n_create, "MPPS")

    def _on_n_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        if self.mpps_scp is None:
            return PROCESSING_FAILURE, None  # pragma: no cover - no MPPS context is offered
        return self._n_call(event, self.mpps_scp.n_set, "MPPS")

    def _on_n_action(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        if self.commitment_scp is None:
            return PROCESSING_FAILURE, None  # pragma: no cover - no such context is offered
        return self._n_call(event, self.commitment_scp.n_action, "Storage Commitment")

    def _n_call(
        self,
        event: evt.Event,
        handler: Callable[[evt.Event], tuple[int | Dataset, Dataset | None]],
        what: str,
    ) -> tuple[int | Dataset, Dataset | None]:
        if self._stopping.is_set():
            log.warning("%s request refused: shutting down", what)
            return RESOURCE_LIMITATION, None  # the modality sends it again
        with self._inflight_cond:
            self._inflight += 1
        try:
            return handler(event)
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                self._inflight_cond.notify_all()

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset | int:
        with self._inflight_cond:
            self._inflight += 1
        try:
            outcome = self._store(event)
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                self._inflight_cond.notify_all()
        if self.metrics is not None:
            self.metrics.store_answered(outcome.status)
        return outcome.as_status()

    def _record(self, instance: ReceivedInstance) -> None:
        """Commit the queue row of a file :meth:`Spool.commit_file` pinned, and unpin
        it once the write is resolved: the writer removes a replaced copy only if no
        row refers to it then and no C-STORE holds it pinned (gateway/store.py)."""
        future = self.store.record_instance(
            instance, when_done=lambda: self.spool.release(instance.path)
        )
        future.result(timeout=COMMIT_TIMEOUT_S)

    def _store(self, event: evt.Event) -> StoreOutcome:
        req = event.request
        assert isinstance(req, C_STORE)
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_instance = str(req.AffectedSOPInstanceUID or "")
        requestor = event.assoc.requestor
        where = f"from {requestor.ae_title!r} at {requestor.address}"
        # Structured journal fields (gateway.notify); ignored by the stderr format.
        fields = {SOP_INSTANCE_UID: sop_instance, CALLING_AE: requestor.ae_title}
        if self._stopping.is_set():
            log.warning("C-STORE %s refused: shutting down", where, extra=fields)
            return StoreOutcome(
                STORE_OUT_OF_RESOURCES, "gateway is shutting down, send again later"
            )
        if not (is_valid_uid(sop_class) and is_valid_uid(sop_instance)):
            log.warning("C-STORE %s refused: invalid UID in command %r", where, sop_instance)
            return StoreOutcome(
                STORE_CANNOT_UNDERSTAND, "Affected SOP Class/Instance UID is invalid"
            )
        tmp_path = Path(event.dataset_path)
        received = patches.received_file(req)
        if self.spool.check() is not None:
            # Never written into a directory other than the one we started with.
            if isinstance(received, SpoolTempFile):
                received.discard()
            return _spool_missing(where, sop_instance, fields)
        if isinstance(received, SpoolTempFile) and received.error is not None:
            return _spool_write_failed(where, sop_instance, received.error, fields)
        try:
            self.spool.check_room()
            study, series = _check_dataset(
                tmp_path, sop_class, sop_instance, event.context.transfer_syntax
            )
            spooled = self.spool.commit_file(tmp_path)
        except SpoolMissing:
            return _spool_missing(where, sop_instance, fields)
        except SpoolFull as exc:
            log.error("C-STORE %s sop=%s refused: %s", where, sop_instance, exc, extra=fields)
            return StoreOutcome(STORE_OUT_OF_RESOURCES, "spool is full")
        except _Refusal as exc:
            log.warning("C-STORE %s sop=%s refused: %s", where, sop_instance, exc, extra=fields)
            return exc.outcome
        except OSError as exc:
            return _spool_write_failed(where, sop_instance, exc, fields)

        instance = ReceivedInstance(
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            study_instance_uid=study,
            series_instance_uid=series,
            calling_ae=requestor.ae_title,
            peer_address=f"{requestor.address}:{requestor.port}",
            transfer_syntax=str(event.context.transfer_syntax),
            size=spooled.size,
            sha256=spooled.sha256,
            path=spooled.relpath,
        )
        if self.spool.check() is not None:
            # Gone while we wrote: no row, so the file is an orphan the next start removes.
            return _spool_missing(where, sop_instance, fields)
        try:
            self._record(instance)
        except Exception as exc:  # StoreClosed, a timeout, any database error
            # The file stays: its name is its content hash, so an identical copy sent
            # and acknowledged earlier may be this very file.  If no row refers to it,
            # the reconciler removes it at the next start.
            log.error(
                "C-STORE %s sop=%s failed committing the queue row: %r",
                where, sop_instance, exc, extra=fields,
            )  # fmt: skip
            return StoreOutcome(STORE_PROCESSING_ERROR, "queue database error")
        log.info(
            "stored sop=%s class=%s %s ts=%s bytes=%d",
            sop_instance,
            sop_class,
            where,
            instance.transfer_syntax,
            spooled.size,
            extra=fields,
        )
        if self.on_stored is not None:
            self.on_stored(instance)
        return StoreOutcome(SUCCESS)
