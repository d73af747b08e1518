"""The cloud archive for the tests: Orthanc + its DICOMweb plugin behind nginx with
mutual TLS (``ssl_verify_client on``), certificates from a trustme test CA.

Debian packages: orthanc, orthanc-dicomweb, nginx-light (``make test`` installs them).
Everything listens on 127.0.0.1 on free ports; Orthanc's own HTTP port is used by the
tests only to check what arrived.  tests/test_archive_lab.py pins the behaviour below.

Observed STOW-RS behaviour of this Orthanc (1.10.1, DICOMweb plugin 1.7):
* All stored: HTTP 200, every instance in ReferencedSOPSequence (0008,1199), an empty
  FailedSOPSequence (0008,1198).
* An instance already stored: 200 and listed as stored again, whether the content is
  identical or differs (same SOP Instance UID); with OverwriteInstances the archive
  keeps one copy, the latest.
* An instance missing a mandatory UID (e.g. no Series Instance UID): HTTP 400, the
  instance in FailedSOPSequence with FailureReason 0xC000 (49152); the other instances
  of the same request are stored and listed in ReferencedSOPSequence.
* An instance whose PatientID is :attr:`ArchiveLab.rejected_patient_id`: a Lua
  ReceivedInstanceFilter raises an error, Orthanc does not store it, and the plugin
  stops reading the request there: HTTP 200, this instance and every later one in the
  same request are in neither sequence and not stored (earlier ones are).  An uploader
  must treat an instance missing from the answer as not stored.
* A ReceivedInstanceFilter that merely returns false is worse and is not used: the
  instance is dropped but listed in ReferencedSOPSequence as if stored.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from .peers import free_port, wait_for_port

ORTHANC = "/usr/sbin/Orthanc"
NGINX = "/usr/sbin/nginx"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

_NGINX_CONF = """
{user}
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {work}/nginx-access.log;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {work}/server.pem;
        ssl_certificate_key {work}/server.key;
        ssl_client_certificate {work}/ca.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size 0;
        proxy_request_buffering off;
        location /dicom-web/ {{
            if (-f {work}/unavailable) {{ return 503; }}
            proxy_pass http://127.0.0.1:{orthanc_port};
            proxy_read_timeout 300s;
        }}
        # The gateway's heartbeat (issue 5): accepted and logged, body discarded.
        location = /heartbeat {{
            if ($request_method != POST) {{ return 405; }}
            return 204;
        }}
    }}
}}
"""


# Raising (rather than returning false) is what makes Orthanc refuse the instance
# instead of dropping it silently while DICOMweb reports it stored; see the docstring.
_LUA_FILTER = """
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.PatientID == "{patient_id}" then
    error("test archive refuses PatientID " .. dicom.PatientID)
  end
  return true
end
"""


class ArchiveLab:
    """One archive in ``workdir``; :meth:`start` it, and :meth:`stop` it even on failure."""

    #: Orthanc refuses instances with this PatientID (see the module docstring).
    rejected_patient_id = "ARCHIVE-REFUSES-ME"

    def __init__(self, workdir: Path) -> None:
        self.work = workdir
        #: A command Orthanc and nginx run under, as GatewayProcess.prefix; e.g. a
        #: benchmark that times the gateway runs the archive, a remote server in the
        #: field, under ``nice``, so that it takes only the CPU the gateway leaves.
        self.prefix: list[str] = []
        workdir.mkdir(parents=True, exist_ok=True)
        self.orthanc_port = free_port()
        self.nginx_port = free_port()
        self.orthanc_url = f"http://127.0.0.1:{self.orthanc_port}"
        self.dicomweb_url = f"https://localhost:{self.nginx_port}/dicom-web"
        self._orthanc: subprocess.Popen[bytes] | None = None
        self._nginx: subprocess.Popen[bytes] | None = None
        self._make_certificates()
        self._write_configs()

    # -- set-up -------------------------------------------------------------------------
    def _make_certificates(self) -> None:
        w = self.work
        ca = trustme.CA()
        self.ca = ca  # signs CSRs in tests (dicom-gateway enroll)
        ca.cert_pem.write_to_path(str(w / "ca.pem"))
        server = ca.issue_cert("localhost", "127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(w / "server.pem"))
        for pem in server.cert_chain_pems[1:]:
            pem.write_to_path(str(w / "server.pem"), append=True)
        server.private_key_pem.write_to_path(str(w / "server.key"))
        client = ca.issue_cert("gateway-test-box")
        client.cert_chain_pems[0].write_to_path(str(w / "client.pem"))
        client.private_key_pem.write_to_path(str(w / "client.key"))
        os.chmod(w / "client.key", 0o600)
        other = trustme.CA()
        other.cert_pem.write_to_path(str(w / "untrusted-ca.pem"))
        stranger = other.issue_cert("stranger-box")
        stranger.cert_chain_pems[0].write_to_path(str(w / "untrusted-client.pem"))
        stranger.private_key_pem.write_to_path(str(w / "untrusted-client.key"))
        os.chmod(w / "untrusted-client.key", 0o600)
        self.ca_file = w / "ca.pem"
        self.client_cert = w / "client.pem"
        self.client_key = w / "client.key"
        self.untrusted_ca_file = w / "untrusted-ca.pem"
        self.untrusted_client_cert = w / "untrusted-client.pem"
        self.untrusted_client_key = w / "untrusted-client.key"

    def _write_configs(self) -> None:
        w = self.work
        orthanc: dict[str, Any] = {
            "Name": "gateway-test-archive",
            "StorageDirectory": str(w / "orthanc-storage"),
            "IndexDirectory": str(w / "orthanc-storage"),
            "HttpPort": self.orthanc_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "LuaScripts": [str(w / "filter.lua")],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # A re-sent instance replaces the stored copy: one copy, latest content.
            "OverwriteInstances": True,
            "StorageCompression": False,
        }
        (w / "orthanc.json").write_text(json.dumps(orthanc, indent=2))
        (w / "filter.lua").write_text(_LUA_FILTER.format(patient_id=self.rejected_patient_id))
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (w / d).mkdir(exist_ok=True)
        (w / "nginx.conf").write_text(
            _NGINX_CONF.format(
                work=w,
                port=self.nginx_port,
                orthanc_port=self.orthanc_port,
                # As root nginx's workers would run as nobody and could not see into
                # pytest's 0700 temp directories (the 503 switch, body buffers).
                user="user root;" if os.geteuid() == 0 else "",
            )
        )

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> ArchiveLab:
        for binary in (ORTHANC, NGINX, DICOMWEB_PLUGIN):
            if not Path(binary).exists():
                raise RuntimeError(f"{binary} missing: install orthanc, orthanc-dicomweb, nginx")
        log = open(self.work / "orthanc.log", "ab")  # noqa: SIM115 - the child owns it
        self._orthanc = subprocess.Popen(
            [*self.prefix, ORTHANC, str(self.work / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                self._get("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if self._orthanc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        "Orthanc did not start:\n" + (self.work / "orthanc.log").read_text()
                    ) from None
                time.sleep(0.1)
        self.start_nginx()
        return self

    def start_nginx(self) -> None:
        if self._nginx is not None and self._nginx.poll() is None:
            return
        self._nginx = subprocess.Popen(
            [*self.prefix, NGINX, "-c", str(self.work / "nginx.conf"), "-p", str(self.work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                wait_for_port(self.nginx_port, timeout=0.2)
                return
            except TimeoutError:
                if self._nginx.poll() is not None or time.monotonic() > deadline:
                    log = self.work / "nginx-error.log"
                    self.stop_nginx()
                    raise RuntimeError(
                        "nginx did not start:\n" + (log.read_text() if log.exists() else "")
                    ) from None

    def stop_nginx(self) -> None:
        if self._nginx is not None and self._nginx.poll() is None:
            self._nginx.send_signal(signal.SIGTERM)  # fast shutdown: master and workers
            try:
                self._nginx.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._nginx.kill()
                self._nginx.wait()
        self._nginx = None

    def set_unavailable(self, on: bool) -> None:
        flag = self.work / "unavailable"
        if on:
            flag.touch()
        elif flag.exists():
            flag.unlink()

    def stop(self) -> None:
        """Stop nginx and Orthanc (idempotent).

        Orthanc is killed: a clean stop spends 2 s in its HTTP server's shutdown, and
        nothing in this throwaway archive needs saving once the test has looked.
        """
        self.stop_nginx()
        if self._orthanc is not None:
            if self._orthanc.poll() is None:
                self._orthanc.kill()
            self._orthanc.wait(timeout=15)
        self._orthanc = None

    # -- inspection (plain HTTP straight to Orthanc, test-only) -------------------------
    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.orthanc_url + path, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def _post(self, path: str, payload: Any) -> Any:
        req = urllib.request.Request(
            self.orthanc_url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def instance_count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        found = self._post(
            "/tools/find", {"Level": "Instance", "Query": {}, "Expand": True, "Limit": 100000}
        )
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in found}

    def instance_file(self, sop_instance_uid: str) -> bytes:
        matches = self._post(
            "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}}
        )
        if len(matches) != 1:
            raise AssertionError(f"{sop_instance_uid}: {len(matches)} copies in the archive")
        body = self._get(f"/instances/{matches[0]}/file")
        assert isinstance(body, bytes)
        return body

    def nginx_access_log(self, wait_for: str | None = None, timeout: float = 10.0) -> str:
        """The access log; with ``wait_for``, once that text is in it.

        nginx writes a request's line when it finishes the request, which for an early
        answer (400 for a refused certificate, the 503 switch) is after the client has
        the response, while nginx still reads and discards the body: right after a
        request, its line may not be there yet.  From a coroutine, call this in a thread
        (``asyncio.to_thread``) so the client's connection can close meanwhile.
        """
        path = self.work / "nginx-access.log"
        deadline = time.monotonic() + timeout
        while True:
            text = path.read_text() if path.exists() else ""
            if wait_for is None or wait_for in text:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{wait_for!r} not in nginx's access log:\n{text}")
            time.sleep(0.05)


@pytest.fixture
def archive_lab(tmp_path: Path) -> Iterator[ArchiveLab]:
    """A fresh archive per test (starts in about a second)."""
    lab = ArchiveLab(tmp_path / "archive")
    try:
        yield lab.start()
    finally:
        lab.stop()
        shutil.rmtree(tmp_path / "archive" / "orthanc-storage", ignore_errors=True)
