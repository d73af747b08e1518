"""Four independent C-STORE SCU implementations, each with its default proposals.

Used by tests/test_conformance_matrix.py and tests/bench/conformance.py.  Every SCU
sends a list of files to ``called@127.0.0.1:port`` in one run and returns its exit
status and output; which instances arrived is read on the receiving side.

* DCMTK ``storescu`` (Debian ``dcmtk``) with no ``-x`` option (its default ``-x=``:
  the uncompressed syntaxes, explicit VR first) and its default list of storage SOP
  classes; ``-nh`` only keeps it going after a file it cannot send.  By default it
  cannot send compressed files (it does not propose their syntax and cannot convert
  them), nor classes outside its list (Segmentation, retired, private), and it
  converts Big Endian to whatever the receiver accepted.
* GDCM ``gdcmscu --store`` (Debian ``libgdcm-tools``): proposes each file's own
  syntax; stops, silently, at the first file the receiver refuses.
* Orthanc as the sender: a second Orthanc (no DICOMweb, no nginx) holds the files,
  uploaded with ``POST /instances`` (Orthanc keeps a file as received unless ingest
  transcoding is configured, which it is not), and sends them with
  ``POST /modalities/{name}/store`` to the receivers configured as DICOM modalities.
* pynetdicom's ``storescu`` app (``python -m pynetdicom storescu``), without
  ``--required-contexts``: one context per class of its 128 standard storage classes
  with [Explicit VR LE, Implicit VR LE, Deflated, Explicit VR BE] (a single context
  with Implicit on offer: what issue 11 point 1 is about); it cannot send compressed
  or Big Endian files, nor classes outside that list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .archive import ORTHANC
from .peers import free_port, tool

SCUS = ("dcmtk", "gdcm", "orthanc", "pynetdicom")
_GDCM_CHUNK = 16


@dataclass
class SendRun:
    scu: str
    returncode: int
    output: str
    seconds: float


def _run(scu: str, cmd: list[str], timeout: float) -> SendRun:
    began = time.monotonic()
    env = dict(os.environ, TCP_NODELAY="1")  # Debian's DCMTK: Nagle off
    proc = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env,
        check=False,
    )  # fmt: skip
    return SendRun(scu, proc.returncode, proc.stdout + proc.stderr, time.monotonic() - began)


def dcmtk_storescu(port: int, called: str, files: list[Path], timeout: float = 300) -> SendRun:
    cmd = [tool("storescu"), "-nh", "-aec", called, "-aet", "DCMTK_SCU", "127.0.0.1", str(port)]
    return _run("dcmtk", [*cmd, *map(str, files)], timeout)


def gdcmscu(port: int, called: str, files: list[Path], timeout: float = 300) -> SendRun:
    if not Path("/usr/bin/gdcmscu").exists():
        raise RuntimeError("gdcmscu not found: install Debian's libgdcm-tools (make test does)")
    cmd = ["/usr/bin/gdcmscu", "--store", "--call", called, "--aetitle", "GDCM_SCU"]
    target = ["127.0.0.1", str(port)]
    # gdcmscu stops, silently, at the first file it cannot send (one association per
    # run): files go in chunks, and a chunk that fails is sent again one file per run so
    # the files after the failing one are still sent (a re-sent instance is idempotent).
    runs: list[tuple[str, SendRun]] = []
    for start in range(0, len(files), _GDCM_CHUNK):
        chunk = files[start : start + _GDCM_CHUNK]
        run = _run("gdcm", [*cmd, *target, *map(str, chunk)], timeout)
        runs.append((f"{chunk[0].name}..{chunk[-1].name}", run))
        if run.returncode != 0:
            runs += [(f.name, _run("gdcm", [*cmd, *target, str(f)], timeout)) for f in chunk]
    return SendRun(
        "gdcm",
        max((r.returncode for _, r in runs), default=0),
        "".join(f"== {what}: exit {r.returncode}\n{r.output}" for what, r in runs),
        sum(r.seconds for _, r in runs),
    )


def pynetdicom_storescu(port: int, called: str, files: list[Path], timeout: float = 300) -> SendRun:
    cmd = [sys.executable, "-m", "pynetdicom", "storescu", "-aec", called, "-aet", "PYNETDICOM_SCU"]
    return _run("pynetdicom", [*cmd, "127.0.0.1", str(port), *map(str, files)], timeout)


class OrthancSender:
    """An Orthanc that holds the corpus and sends it to DICOM modalities.

    ``modalities`` maps a name to (AE title, port) on 127.0.0.1.
    """

    def __init__(self, workdir: Path, modalities: dict[str, tuple[str, int]]) -> None:
        self.work = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        config: dict[str, Any] = {
            "Name": "matrix-sender",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": free_port(),
            "DicomAet": "ORTHANC_SCU",
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "StorageCompression": False,
            "DicomModalities": {
                name: [aet, "127.0.0.1", port] for name, (aet, port) in modalities.items()
            },
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        self._proc: subprocess.Popen[bytes] | None = None
        self.ids: dict[Path, str] = {}

    def start(self) -> OrthancSender:
        log = open(self.work / "orthanc.log", "ab")  # noqa: SIM115 - the child owns it
        self._proc = subprocess.Popen(
            [ORTHANC, str(self.work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self._request("GET", "/system")
                return self
            except (urllib.error.URLError, ConnectionError):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "Orthanc (sender) did not start:\n"
                        + (self.work / "orthanc.log").read_text()
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait(timeout=15)
        self._proc = None

    def _request(self, method: str, path: str, body: bytes | None = None, *,
                 timeout: float = 30) -> Any:  # fmt: skip
        req = urllib.request.Request(self.url + path, data=body, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def upload(self, files: list[Path]) -> None:
        for path in files:
            answer = self._request("POST", "/instances", path.read_bytes())
            self.ids[path] = answer["ID"]

    def file(self, path: Path) -> bytes:
        body = self._request("GET", f"/instances/{self.ids[path]}/file")
        assert isinstance(body, bytes)
        return body

    def store(self, modality: str, files: list[Path], timeout: float = 300) -> SendRun:
        """``POST /modalities/{modality}/store``, synchronous and permissive (a refused
        instance does not stop the others)."""
        began = time.monotonic()
        payload = {
            "Resources": [self.ids[p] for p in files],
            "Synchronous": True,
            "Permissive": True,
        }
        try:
            answer = self._request(
                "POST", f"/modalities/{modality}/store", json.dumps(payload).encode(),
                timeout=timeout,
            )  # fmt: skip
            code, output = 0, json.dumps(answer)
        except urllib.error.HTTPError as exc:
            code, output = exc.code, exc.read().decode(errors="replace")
        log = (self.work / "orthanc.log").read_text(errors="replace")
        return SendRun("orthanc", code, output + "\n" + log[-20000:], time.monotonic() - began)
