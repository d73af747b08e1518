"""gateway.dicom.find_encoding sends the very bytes pynetdicom would, with far fewer encodings.

The patch is process-wide and cannot be undone, so each side runs in its own Python:
one with pynetdicom as it is, one with ``patches.install()``.  Both serve the
same C-FIND answers (pending responses with a status change in the middle, a UTF-8 name,
a sequence) to two associations, one implicit and one explicit VR, each asking twice
with different message IDs.  Every byte the SCP sends (``EVT_DATA_SENT``) must be the
same, and the patched side must call pydicom's writer far less.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pynetdicom.dimse_messages
import pynetdicom.service_class
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_FIND_RSP, DIMSEMessage

from gateway.dicom.find_encoding import PreEncoded

REPO = Path(__file__).resolve().parents[1]

SERVE = r"""
import json, sys
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
import pynetdicom.dsutils
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityWorklistInformationFind

writes = 0
original_write = pynetdicom.dsutils.write_dataset
def counting_write(*args, **kwargs):
    global writes
    writes += 1
    return original_write(*args, **kwargs)
pynetdicom.dsutils.write_dataset = counting_write

Response = Dataset
if sys.argv[1] == "patched":
    from gateway.dicom import find_encoding, patches
    patches.install()
    Response = find_encoding.PreEncoded

def item(n, name):
    ds = Response()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = name
    ds.PatientID = f"P{n}"
    ds.AccessionNumber = f"A{n}"
    step = Dataset()
    step.Modality = "CT"
    step.ScheduledProcedureStepStartDate = "20261204"
    ds.ScheduledProcedureStepSequence = Sequence([step])
    return ds

# The same response objects for every query, as gateway.worklist.service remembers them.
NAMES = ["Dvořák^Zdeněk", "Smith^John", "Jones^Mary", "Müller^Jürgen", "Nováková^Eva"]
ANSWER = [(0xFF00 if n < 5 else 0xFF01, item(n, NAMES[n % 5])) for n in range(10)]

def on_find(event):
    yield from ANSWER
    yield 0x0000, None

sent = []
ae = AE(ae_title="SCP")
syntaxes = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]
ae.add_supported_context(ModalityWorklistInformationFind, syntaxes)
server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
    (evt.EVT_C_FIND, on_find),
    (evt.EVT_DATA_SENT, lambda event: sent.append(event.data.hex())),
])
port = server.socket.getsockname()[1]
statuses = []
for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
    scu = AE(ae_title="SCU")
    scu.add_requested_context(ModalityWorklistInformationFind, syntax)
    assoc = scu.associate("127.0.0.1", port, ae_title="SCP")
    assert assoc.is_established
    query = Dataset()
    query.PatientName = "*"
    for _ in range(2):
        for status, identifier in assoc.send_c_find(query, ModalityWorklistInformationFind):
            statuses.append(int(status.Status))
    assoc.release()
server.shutdown()
print(json.dumps({"sent": sent, "writes": writes, "statuses": statuses}))
"""


def _serve(mode: str) -> dict[str, object]:
    run = subprocess.run(
        [sys.executable, "-c", SERVE, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, object] = json.loads(run.stdout.splitlines()[-1])
    return result


def test_the_bytes_on_the_wire_are_pynetdicoms_own() -> None:
    plain, patched = _serve("plain"), _serve("patched")
    # 2 associations x 2 queries x (10 pending + 1 final).
    assert plain["statuses"] == patched["statuses"] == ([0xFF00] * 5 + [0xFF01] * 5 + [0]) * 4
    assert patched["sent"] == plain["sent"]
    # pynetdicom writes, per pending response, the identifier and the command set (twice);
    # patched, each identifier once per transfer syntax and the command set once per
    # status in a query.
    assert isinstance(plain["writes"], int) and plain["writes"] >= 3 * 40
    assert isinstance(patched["writes"], int) and patched["writes"] <= plain["writes"] // 2


def test_pre_encoded_keeps_one_encoding_per_transfer_syntax() -> None:
    ds = PreEncoded()
    ds.PatientName = "Dvořák^Zdeněk"
    ds.SpecificCharacterSet = "ISO_IR 192"
    implicit = ds.encoded(True, True)
    explicit = ds.encoded(False, True)
    assert implicit is not None and explicit is not None and implicit != explicit
    assert ds.encoded(True, True) is implicit
    assert "Dvořák".encode() in implicit


def test_the_pynetdicom_parts_it_relies_on_are_still_there() -> None:
    """An upgrade that renames these fails here, not in the field."""
    assert callable(pynetdicom.service_class.encode)
    assert callable(pynetdicom.dimse_messages.encode)
    assert callable(DIMSEServiceProvider.send_msg)
    for name in ("primitive_to_message", "encode_msg"):
        assert callable(getattr(DIMSEMessage, name))
    message = C_FIND_RSP()
    assert hasattr(message, "command_set") and hasattr(message, "data_set")
