"""The cloud archive for the tests: Orthanc + its DICOMweb plugin behind nginx with
mutual TLS (``ssl_verify_client on``), certificates from a trustme test CA.

Debian packages: orthanc, orthanc-dicomweb, nginx-light (``make test`` installs them).
Everything listens on 127.0.0.1 on free ports; Orthanc's own HTTP port is used by the
tests only to check what arrived.

Observed behaviour of this Orthanc (1.10, DICOMweb 1.7) that the tests rely on:
* STOW-RS of an instance already stored answers 200 and lists it as stored; with
  OverwriteInstances the archive keeps one copy (the latest).
* An instance Orthanc cannot index (e.g. no Series Instance UID) is refused:
  HTTP 400 with the instance in FailedSOPSequence, FailureReason 0xC000, while the
  other instances of the same request are stored.
* A Lua ReceivedInstanceFilter that drops an instance is NOT reported as a failure
  (the plugin lists it as stored), so it cannot stand in for a refusal.
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
    }}
}}
"""


class ArchiveLab:
    def __init__(self, workdir: Path) -> None:
        self.work = workdir
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
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # A re-sent instance replaces the stored copy: one copy, latest content.
            "OverwriteInstances": True,
            "StorageCompression": False,
        }
        (w / "orthanc.json").write_text(json.dumps(orthanc, indent=2))
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
            [ORTHANC, str(self.work / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
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
        self._nginx = subprocess.Popen(
            [NGINX, "-c", str(self.work / "nginx.conf"), "-p", str(self.work)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.nginx_port)

    def stop_nginx(self) -> None:
        if self._nginx is not None and self._nginx.poll() is None:
            self._nginx.send_signal(signal.SIGTERM)
            self._nginx.wait(timeout=15)
        self._nginx = None

    def set_unavailable(self, on: bool) -> None:
        flag = self.work / "unavailable"
        if on:
            flag.touch()
        elif flag.exists():
            flag.unlink()

    def stop(self) -> None:
        self.stop_nginx()
        if self._orthanc is not None and self._orthanc.poll() is None:
            self._orthanc.terminate()
            try:
                self._orthanc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._orthanc.kill()
                self._orthanc.wait()

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

    def nginx_access_log(self) -> str:
        path = self.work / "nginx-access.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture
def archive_lab(tmp_path: Path) -> Iterator[ArchiveLab]:
    """A fresh archive per test (starts in about a second)."""
    lab = ArchiveLab(tmp_path / "archive")
    try:
        yield lab.start()
    finally:
        lab.stop()
        shutil.rmtree(tmp_path / "archive" / "orthanc-storage", ignore_errors=True)
