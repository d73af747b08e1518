"""The DIMSE status codes the gateway answers and reads, one name per meaning.

A code can mean different things to different services: 0xC001 is "Cannot understand"
to a C-STORE SCU and "Unable to process" to a C-FIND SCU, while PS3.7's "Processing
failure" is 0x0110.  So the C-STORE codes start with ``STORE_``, the C-FIND codes with
``FIND_``, and the codes PS3.7 Annex C gives every DIMSE-N service (MPPS, Storage
Commitment) have its names.  A Storage Commitment report's Failure Reason (0008,1197)
is not a status but borrows the same numbers (PS3.4 J.3.3.1.1): those start with
``FAILURE_``.  gateway/dicom/receive.py, gateway/mpps/,
gateway/commitment/ and gateway/worklist/service.py take them from here;
gateway/dicom/conformance.py lists them.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000

# PS3.7 C: N-CREATE / N-SET (the MPPS SCP, PS3.4 F.7.2, and its upstream).
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110  # also "may no longer be updated" (F.7.2.2.3)
DUPLICATE_INSTANCE = 0x0111
NO_SUCH_INSTANCE = 0x0112
INVALID_ARGUMENT_VALUE = 0x0115  # N-ACTION: its Action Information cannot be used
INVALID_INSTANCE = 0x0117  # the SOP Instance UID breaks the UID rules
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
NO_SUCH_ACTION = 0x0123  # N-ACTION: an Action Type ID the SOP class does not define
NOT_AUTHORIZED = 0x0124
RESOURCE_LIMITATION = 0x0213  # shutting down, or the database cannot take the write

# C-STORE (PS3.4 B.2.3).  Each failure the handler can meet has its own.
STORE_OUT_OF_RESOURCES = 0xA700  # spool below watermark, disk full, spool gone, stopping
STORE_DATASET_MISMATCH = 0xA900  # data set does not match the command or lacks Type 1 UIDs
STORE_CANNOT_UNDERSTAND = 0xC000  # a UID in the command that is not a UID
STORE_PROCESSING_ERROR = 0xC001  # an I/O or database error other than "no space"
STORE_UNDECODABLE = 0xC210  # the data set cannot be parsed

# C-FIND, Modality Worklist (PS3.4 K.4.1.1.4).
FIND_PENDING = 0xFF00
FIND_PENDING_WARNING = 0xFF01  # pending, but optional keys were not supported
FIND_CANCELLED = 0xFE00
FIND_UNABLE_TO_PROCESS = 0xC000  # no worklist is served (no MWL context is offered then)
FIND_FAILED = 0xC001  # the query could not be answered

# Storage Commitment Failure Reason (0008,1197), PS3.4 J.3.3.1.1: why an instance of a
# request is in the report's Failed SOP Sequence.
FAILURE_PROCESSING = 0x0110  # received, but the archive did not confirm it (in time)
FAILURE_NO_SUCH_OBJECT_INSTANCE = 0x0112  # never received (within the timeout)
FAILURE_CLASS_INSTANCE_CONFLICT = 0x0119  # received under another SOP class
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122  # a SOP class the gateway does not store


class Refused(Exception):
    """A DIMSE-N request (MPPS N-CREATE / N-SET, Storage Commitment N-ACTION) refused
    with *status*; ``str()`` is the Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment

    def as_status(self) -> Dataset:
        """The response's status: the code, with the comment as Error Comment."""
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]  # LO
        return ds
