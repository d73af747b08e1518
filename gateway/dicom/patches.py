"""Every change the gateway makes to pynetdicom, in one place, installed by one call.

pynetdicom 3 has no hook for where a received data set is written, how large a PDU it
reads may be, or waking its reactor threads when there is work, so the gateway
replaces some of its module globals and wraps some of its methods, private ones
included.  All of them are here:

* :data:`PATCHES`: what :func:`install` changes, in that order, each with its reason.
  pynetdicom looks these names up in its modules and classes, so the change is
  process-wide; a patch that would treat another association of the process
  differently asks first whether the association is the receiving server's (a
  :class:`ReceivingAE`'s) and leaves the others to pynetdicom.
* :class:`ReceivingAE`: the receiving server's AE, and what is scoped to it.
* :data:`READS`: pynetdicom's private names the gateway reads or sets without
  replacing them (and the functions below that do it), and the attributes it adds to
  pynetdicom's objects.

The code of each patch lives with its purpose (gateway/dicom/dul_guard.py, wakeup.py,
find_encoding.py, negotiation.py); this module is the only one that puts it into
pynetdicom.  tests/test_patches.py checks that every name in :data:`PATCHES` and
:data:`READS` is still in pynetdicom with the shape the gateway expects, so a
pynetdicom upgrade that changes one fails there, by name.

:func:`install` is called at the start of a receiver process (gateway/dicom/receivers.py)
and by :meth:`gateway.dicom.receive.Receiver.start`; the main process, whose only
associations are the ones it opens itself, installs nothing.

**Two wrappers of one reactor.**  ``DULServiceProvider.run_reactor`` is wrapped
twice: by gateway.dicom.dul_guard (an exception aborts the association) and then by
gateway.dicom.wakeup (its sleeps end on work).  The wake-up wrapper is the outer one: its
waker exists for the whole life of the reactor, the guard's abort included, and is
closed however the reactor ends; the guard sees pynetdicom's exception first.
tests/test_patches.py checks both together.

**The gateway's own associations and the PDU-size guard.**  ``dimse.max_pdu_size`` is
what the receiving server advertises and what its guard enforces, so a modality that
keeps to it is never aborted.  The associations the gateway opens to its upstreams
(the MPPS forwarder, the worklist C-FIND) are not guarded: they go to a peer the
operator configured, and they advertise pynetdicom's default maximum PDU (16382
bytes), which the upstream's answers keep to.  Guarding them by a smaller
``dimse.max_pdu_size`` would abort valid answers; advertising it instead would change
what the gateway asks of every RIS for a setting that is about the listening port.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pynetdicom.acse
import pynetdicom.association
import pynetdicom.dimse_messages
import pynetdicom.dul
import pynetdicom.service_class
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer

from ..spool import SpoolTempFile
from . import dul_guard, find_encoding, wakeup

_refused = threading.local()


class ReceivingAE(AE):
    """The receiving server's AE; the patches that are scoped to it read it.

    * *max_pdu_size* (``dimse.max_pdu_size``, 0: no limit) is both what it advertises
      and what the PDU-size guard (gateway.dicom.dul_guard) allows its peers;
    * C-STORE data sets are streamed into files from *temp_file* (the spool's
      ``tmp/``, on the objects' filesystem, so the commit is a rename);
    * :attr:`maximum_associations` reads 0 in an association's thread after
      :meth:`refuse` was called there: pynetdicom's acceptor then rejects it with
      "local limit exceeded" (PS3.8 A-ASSOCIATE-RJ 2, 3, 2) as it does for its own
      limit.  The gateway-wide limit across receiver processes uses it
      (``receive._AssociationSlots``).
    """

    def __init__(self, ae_title: str, max_pdu_size: int, temp_file: Callable[..., Any]) -> None:
        super().__init__(ae_title=ae_title)
        self.maximum_pdu_size = max_pdu_size
        self.pdu_limit = max_pdu_size
        self.temp_file = temp_file

    @property
    def maximum_associations(self) -> int:
        if getattr(_refused, "refused", False):
            return 0
        return super().maximum_associations

    @maximum_associations.setter
    def maximum_associations(self, value: int) -> None:
        AE.maximum_associations.fset(self, value)  # type: ignore[attr-defined]

    @staticmethod
    def refuse(refused: bool) -> None:
        """Whether the association of the calling thread is to be rejected (call it
        from an ``EVT_ACSE_RECV`` handler, before pynetdicom negotiates)."""
        _refused.refused = refused

    def serve(self, server: ThreadedAssociationServer) -> None:
        """Register *server* (made by ``make_server``, run by the gateway's own thread):
        ``start_server`` would register it, and its ``shutdown`` removes it again."""
        self._servers.append(server)


def _receiving_ae(dul: DULServiceProvider) -> ReceivingAE | None:
    ae = getattr(dul.assoc, "ae", None)
    return ae if isinstance(ae, ReceivingAE) else None


def _pdu_limit(dul: DULServiceProvider) -> int | None:
    ae = _receiving_ae(dul)
    return None if ae is None else ae.pdu_limit


def _discard_partial(dul: DULServiceProvider) -> None:
    partial = partial_data_set(dul.assoc)
    if isinstance(partial, SpoolTempFile) and not partial.closed:
        partial.discard()


def _scoped_temp_file(original: Callable[..., Any]) -> Callable[..., Any]:
    """pynetdicom opens the file in the DUL thread of the association receiving it."""

    def named_temporary_file(*args: Any, **kwargs: Any) -> Any:
        thread = threading.current_thread()
        ae = _receiving_ae(thread) if isinstance(thread, DULServiceProvider) else None
        if ae is None:
            return original(*args, **kwargs)
        return ae.temp_file(*args, **kwargs)

    return named_temporary_file


def _value(value: object) -> Callable[[Any], object]:
    return lambda _original: value


@dataclass(frozen=True)
class Patch:
    """``owner.name`` (a module or a class) becomes ``replace(the original)``."""

    owner: Any
    name: str
    replace: Callable[[Any], Any]
    why: str

    @property
    def target(self) -> str:
        return _dotted(self.owner, self.name)


#: What install() changes, in this order, and why.
PATCHES: tuple[Patch, ...] = (
    Patch(_config, "STORE_RECV_CHUNKED_DATASET", _value(True),
          "stream each C-STORE data set to a file, so a large instance costs disk, not memory"),
    Patch(pynetdicom.dimse_messages, "NamedTemporaryFile", _scoped_temp_file,
          "the receiving server's file goes into the spool's tmp/: its commit is a rename"),
    Patch(_config, "LOG_REQUEST_IDENTIFIERS", _value(False),
          "no decoding of each C-FIND identifier for a log the gateway silences (patient names)"),
    Patch(_config, "LOG_RESPONSE_IDENTIFIERS", _value(False),
          "nor of each response: some 15% of the cost of a worklist answer"),
    Patch(_config, "UNRESTRICTED_STORAGE_SERVICE", _value(True),
          "retired, private and unknown storage classes reach the C-STORE handler"),
    Patch(pynetdicom.acse, "negotiate_unrestricted", _value(negotiate_as_acceptor),
          "... and their transfer syntax is ours by preference, not the requestor's first"),
    Patch(DULServiceProvider, "_read_pdu_data",
          lambda original: dul_guard.refuse_oversized(original, _pdu_limit, _discard_partial),
          "a PDU larger than the receiving server allows is aborted before it is read"),
    Patch(DULServiceProvider, "run_reactor",
          lambda original: dul_guard.abort_on_exception(original, _discard_partial),
          "an exception in the DUL thread aborts the association instead of hanging it"),
    Patch(AssociationSocket, "_shutdown_socket", dul_guard.close_after_shutdown,
          "a socket whose peer hung up is closed now, not by the garbage collector"),
    # Outside dul_guard's wrapper of the same method (see the module docstring).
    Patch(DULServiceProvider, "run_reactor", wakeup.wake_dul_reactor,
          "the DUL reactor wakes on a PDU to send or a readable socket, not its next poll"),
    Patch(Association, "_run_reactor", wakeup.wake_association_reactor,
          "the association reactor wakes on a complete DIMSE message or a DUL event"),
    Patch(pynetdicom.dul, "time", _value(wakeup.Time()),
          "whose sleep() in a reactor thread waits for that wake-up (never longer)"),
    Patch(pynetdicom.association, "time", _value(wakeup.Time()),
          "the same for the association reactor"),
    Patch(pynetdicom.service_class, "encode", _value(find_encoding.encode),
          "a remembered worklist answer (PreEncoded) is encoded once, not once per query"),
    Patch(pynetdicom.dimse_messages, "encode", _value(find_encoding.encode),
          "the same where the DIMSE message encodes its command set"),
    Patch(DIMSEServiceProvider, "send_msg", find_encoding.reuse_pending_command_set,
          "pending C-FIND responses reuse their association's last command set"),
)  # fmt: skip


@dataclass(frozen=True)
class Read:
    """A private name of pynetdicom the gateway uses as it is, or an attribute it adds."""

    target: str
    why: str


#: Private names read or set without a patch, and the gateway's own attributes.
READS: tuple[Read, ...] = (
    Read("pynetdicom.ae.ApplicationEntity._servers",
         "ReceivingAE.serve: the server's shutdown() removes itself from this list"),
    Read("pynetdicom.dimse_primitives.C_STORE._dataset_file",
         "received_file: the file a C-STORE data set was streamed into"),
    Read("pynetdicom.dimse_messages.DIMSEMessage._data_set_file",
         "partial_data_set: the file of a C-STORE still arriving, discarded if it ends"),
    Read("pynetdicom.association.Association._kill",
         "gateway.dicom.dul_guard: set with the DUL's flag to end an aborted association"),
    Read("pynetdicom.dul.DULServiceProvider._kill_thread",
         "gateway.dicom.dul_guard: ends the DUL reactor of an aborted association"),
    Read("pynetdicom.dul.DULServiceProvider.kill_dul",
         "stop_association_attempts: a DUL is a thread, found among threading.enumerate()"),
    Read("pynetdicom.acse.ACSE._negotiate_as_acceptor",
         "reads ae.maximum_associations in the association's thread (ReceivingAE.refuse)"),
    Read("pynetdicom._globals.APPLICATION_CONTEXT_NAME",
         "gateway.dicom.conformance: the DICOM application context name it prints"),
    Read("gateway: _gateway_waker, _gateway_find_rsp, _gateway_slot",
         "attributes added to DULServiceProvider/Association, DIMSEServiceProvider and"
         " Association by wakeup, find_encoding and receive"),
)  # fmt: skip

_lock = threading.Lock()
_installed = False
#: (owner, name) -> what pynetdicom had there before install().
_originals: dict[tuple[Any, str], Any] = {}


def install() -> None:
    """Make every change in :data:`PATCHES`, once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        for patch in PATCHES:
            current = getattr(patch.owner, patch.name)
            _originals.setdefault((patch.owner, patch.name), current)
            setattr(patch.owner, patch.name, patch.replace(current))
        _installed = True


def original(patch: Patch) -> Any:
    """What pynetdicom itself has at *patch*'s target, installed or not."""
    return _originals.get((patch.owner, patch.name), getattr(patch.owner, patch.name))


def shape(obj: object) -> str:
    """What tests/test_patches.py compares: a value's type, a module's name, a
    callable's parameter names."""
    if isinstance(obj, bool):
        return "bool"
    if inspect.ismodule(obj):
        return f"module {obj.__name__}"
    return "(" + ", ".join(inspect.signature(obj).parameters) + ")"  # type: ignore[arg-type]


def _dotted(owner: Any, name: str) -> str:
    if inspect.ismodule(owner):
        return f"{owner.__name__}.{name}"
    return f"{owner.__module__}.{owner.__qualname__}.{name}"


# -- reads (READS) ------------------------------------------------------------------------


def received_file(request: C_STORE) -> Any:
    """The file pynetdicom streamed *request*'s data set into (a SpoolTempFile for the
    receiving server), or None."""
    return getattr(request, "_dataset_file", None)


def partial_data_set(assoc: Association) -> Any:
    """The file of the C-STORE data set *assoc* is receiving now, or None."""
    return getattr(assoc.dimse.message, "_data_set_file", None)


def stop_association_attempts(ae: AE) -> None:
    """Stop the association attempts of *ae* (requestor) that have not returned yet.

    ``ae.associate()`` hands out the Association only when the negotiation is over, and
    its DUL thread is not a daemon thread: one waiting for a silent upstream's answer
    would hold up the exit of the gateway until the ACSE timeout."""
    for thread in threading.enumerate():
        if isinstance(thread, DULServiceProvider) and thread.assoc.ae is ae:
            thread.kill_dul()
            if thread.socket is not None:
                with contextlib.suppress(OSError):
                    thread.socket.close()
