"""A real modality for Storage Commitment: Orthanc (Debian package ``orthanc``) with its
DICOM server on.

Orthanc has a Storage Commitment SCU (since 1.6.0): ``POST /modalities/{id}/
storage-commitment`` with ``{"DicomInstances": [{"SOPClassUID", "SOPInstanceUID"}]}``
sends the N-ACTION and answers ``{"ID": <Transaction UID>, "Path":
"/storage-commitment/<ID>"}``; the report arrives as an N-EVENT-REPORT on Orthanc's
own DICOM port (it accepts the SOP class as SCU and SCP, so our Role Selection) from
any AE listed in its ``DicomModalities``, and ``GET /storage-commitment/<ID>``
gives ``{"Status": "Pending" | "Success" | "Failure", "Success": [...], "Failures":
[{"SOPInstanceUID", "FailureReason", ...}]}``.  Orthanc keeps the reports in memory:
after a restart an unknown ID answers 404 until its report arrives.  It sends images
by C-STORE with ``POST /modalities/{id}/store``.  With ``--verbose`` it logs each
report it receives ("Incoming storage commitment report, with transaction UID: X"),
which is how a test counts them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pydicom

from .archive import ORTHANC
from .peers import free_port, wait_for_port

#: Our name for the gateway in the modality's DicomModalities.
GATEWAY_ID = "gateway"


class OrthancModality:
    """An Orthanc playing the modality, in *workdir*; the gateway at *gateway_port*."""

    def __init__(
        self,
        workdir: Path,
        gateway_port: int,
        gateway_ae: str = "DICOMGW",
        ae_title: str = "MODALITY",
    ) -> None:
        self.work = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        config: dict[str, Any] = {
            "Name": "test-modality",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomServerEnabled": True,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {GATEWAY_ID: [gateway_ae, "127.0.0.1", gateway_port]},
            "DicomScuTimeout": 30,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))

    @property
    def remote(self) -> dict[str, Any]:
        """Its ``[[dimse.remote]]`` entry for the gateway's config."""
        return {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.dicom_port}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> OrthancModality:
        if not Path(ORTHANC).exists():
            raise RuntimeError(f"{ORTHANC} missing: install orthanc")
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self._proc = subprocess.Popen(
            [ORTHANC, "--verbose", str(self.work / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self._request("GET", "/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start:\n{self.log}") from None
                time.sleep(0.1)
        wait_for_port(self.dicom_port)
        return self

    def kill(self) -> None:
        """Gone at once, as a modality switched off (idempotent)."""
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=15)
        self._proc = None

    def remove_storage(self) -> None:
        shutil.rmtree(self.work / "storage", ignore_errors=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- REST ---------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None and not body.startswith(b"\x00"):
            req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=60) as resp:
            payload = resp.read()
        return json.loads(payload) if payload[:1] in (b"{", b"[") else payload

    def _post(self, path: str, value: Any) -> Any:
        return self._request("POST", path, json.dumps(value).encode())

    def load(self, paths: list[Path]) -> list[str]:
        """Put DICOM files into the modality (its REST upload); their Orthanc IDs."""
        ids = []
        for path in paths:
            req = urllib.request.Request(
                self.url + "/instances", data=path.read_bytes(), method="POST"
            )
            req.add_header("Content-Type", "application/dicom")
            with urllib.request.urlopen(req, timeout=60) as resp:
                ids.append(json.loads(resp.read())["ID"])
        return ids

    def send_to_gateway(self, orthanc_ids: list[str]) -> dict[str, Any]:
        """C-STORE them to the gateway, on one association; raises if any fails."""
        answer: dict[str, Any] = self._post(
            f"/modalities/{GATEWAY_ID}/store", {"Resources": orthanc_ids, "Synchronous": True}
        )
        return answer

    def request_commitment(self, pairs: list[tuple[str, str]]) -> str:
        """N-ACTION to the gateway for (SOP Class UID, SOP Instance UID) pairs; the
        Transaction UID.  Raises urllib.error.HTTPError (500) when it is refused."""
        answer = self._post(
            f"/modalities/{GATEWAY_ID}/storage-commitment",
            {"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in pairs]},
        )
        return str(answer["ID"])

    def report(self, transaction_uid: str) -> dict[str, Any] | None:
        """The report as Orthanc holds it (None: it knows no such transaction)."""
        try:
            value: dict[str, Any] = self._request("GET", f"/storage-commitment/{transaction_uid}")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        return value

    def reports_received(self, transaction_uid: str) -> int:
        """N-EVENT-REPORTs of *transaction_uid* that reached it, from its log."""
        return self.log.count(
            f"Incoming storage commitment report, with transaction UID: {transaction_uid}"
        )


def pairs_of(paths: list[Path]) -> list[tuple[str, str]]:
    """(SOP Class UID, SOP Instance UID) of each file."""
    out = []
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out.append((str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    return out
