"""The fleet receiver for tests: its certificates (trustme test CAs), a real
`dicom-gateway fleet serve` process, and heartbeat bodies and HTTPS clients that speak
to it as a box would."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import trustme

from gateway.heartbeat_body import Heartbeat

from .gateway_proc import ChildProcess, _toml, start_until_ready
from .peers import free_port


@dataclass(frozen=True)
class BoxCert:
    cert: Path
    key: Path


class FleetPki:
    """The boxes' CA (signs the receiver's server certificate and every box's client
    certificate) and a stranger's CA, written under *directory*."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA()
        self.ca_file = directory / "boxes-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        server = self.ca.issue_cert("localhost", "127.0.0.1", common_name="fleet.test")
        self.server_cert = directory / "receiver.pem"
        self.server_key = directory / "receiver.key"
        for i, pem in enumerate(server.cert_chain_pems):
            pem.write_to_path(str(self.server_cert), append=i > 0)
        server.private_key_pem.write_to_path(str(self.server_key))
        self.stranger_ca = trustme.CA()

    def box(self, name: str, *, stranger: bool = False, common_name: str | None = "") -> BoxCert:
        """A client certificate with subject CN *name* (or *common_name*: None for no CN
        at all), from the boxes' CA or, with *stranger*, from another CA."""
        ca = self.stranger_ca if stranger else self.ca
        cn = name if common_name == "" else common_name
        leaf = ca.issue_cert(f"{_slug(name)}.boxes.test", common_name=cn)
        cert = self.dir / f"{_slug(name)}{'-stranger' if stranger else ''}.pem"
        key = cert.with_suffix(".key")
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        leaf.private_key_pem.write_to_path(str(key))
        os.chmod(key, 0o600)
        return BoxCert(cert, key)

    @staticmethod
    def certificate_not_after(cert: BoxCert) -> float:
        from cryptography import x509

        parsed = x509.load_pem_x509_certificate(cert.cert.read_bytes())
        return parsed.not_valid_after_utc.timestamp()


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch == "-" else "x" for ch in name)[:40] or "x"


#: The box :meth:`FleetReceiverProcess.settled` heartbeats as.
MARKER = "zz-settled-marker"


class FleetReceiverProcess(ChildProcess):
    """`python -m gateway fleet serve --config <dir>/fleet.toml`."""

    def __init__(self, directory: Path, pki: FleetPki, **sections: dict[str, Any]) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = free_port()
        self.view_port = free_port()
        base: dict[str, dict[str, Any]] = {
            "receiver": {
                "bind": "127.0.0.1",
                "port": self.port,
                "tls_cert": str(pki.server_cert),
                "tls_key": str(pki.server_key),
                "client_ca_file": str(pki.ca_file),
            },
            "view": {"port": self.view_port, "refresh_seconds": 1},
            "database": {"path": str(directory / "fleet.sqlite3")},
        }
        for name, values in sections.items():
            base.setdefault(name, {}).update(values)
        self.config_path = directory / "fleet.toml"
        self.config_path.write_text(
            "".join(
                f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())
                for name, values in base.items()
            )
        )
        self.db_path = directory / "fleet.sqlite3"
        self.log_path = directory / "fleet.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._marker: BoxCert | None = None
        self._markers_sent = 0
        self._marker_sent_at = datetime.fromtimestamp(0, UTC)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/heartbeat"

    def start(self, timeout: float = 30.0) -> FleetReceiverProcess:
        command = [sys.executable, "-m", "gateway", "fleet", "serve", "--config",
                   str(self.config_path)]  # fmt: skip
        self.proc = start_until_ready(command, self.log_path, "fleet receiver", timeout)
        return self

    # -- the view ----------------------------------------------------------------------
    def view(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.view_port, timeout=10)
        try:
            conn.request("GET", path)
            reply = conn.getresponse()
            return reply.status, reply.read().decode()
        finally:
            conn.close()

    def boxes(self) -> dict[str, Any]:
        status, text = self.view("/api/boxes")
        assert status == 200, text
        return {b["box"]: b for b in json.loads(text)}

    def metrics(self) -> str:
        status, text = self.view("/metrics")
        assert status == 200, text
        return text

    def settled(self, timeout: float = 15.0) -> tuple[str, str]:
        """(/metrics, the page) built after every heartbeat answered so far.

        The receiver rebuilds them at most every few seconds (gateway/fleet/views.py),
        so what a test reads right after a heartbeat may be older.  This sends one more
        heartbeat, from the box :data:`MARKER`, with values no earlier one had, and
        waits until both show them."""
        if self._marker is None:
            self._marker = self.pki.box(MARKER)
        self._markers_sent += 1
        n = self._markers_sent
        sent_at = max(datetime.now(UTC), self._marker_sent_at + timedelta(milliseconds=1))
        self._marker_sent_at = sent_at
        beat = heartbeat(ae_title=f"SETTLED{n}", uptime_seconds=n + 0.25, sent_at=sent_at)
        reply = post(self, self._marker, encoded(beat))
        assert reply.status == 204, reply
        uptime = f'dicom_gateway_uptime_seconds{{box="{MARKER}"}} {n + 0.25}\n'
        ae = f'<td class="ae">SETTLED{n}</td>'
        deadline = time.monotonic() + timeout
        while True:
            metrics, (status, html) = self.metrics(), self.view("/")
            if uptime in metrics and status == 200 and ae in html:
                return metrics, html
            if time.monotonic() > deadline:
                raise TimeoutError(f"the receiver's views did not show heartbeat {n} of {MARKER}")
            time.sleep(0.1)


def box_tls(pki: FleetPki, cert: BoxCert | None) -> ssl.SSLContext:
    """A box's TLS: verifies the receiver against the boxes' CA, presents *cert*."""
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return ctx


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    @property
    def error(self) -> str:
        return str(json.loads(self.body)["error"]) if self.body else ""


def post(
    receiver: FleetReceiverProcess,
    cert: BoxCert | None,
    body: bytes,
    content_type: str = "application/json",
) -> Reply:
    """POST *body* to the receiver's /heartbeat as the box holding *cert*."""
    conn = http.client.HTTPSConnection(
        "localhost", receiver.port, context=box_tls(receiver.pki, cert), timeout=10
    )
    try:
        conn.request("POST", "/heartbeat", body=body, headers={"Content-Type": content_type})
        reply = conn.getresponse()
        return Reply(reply.status, reply.read(), dict(reply.getheaders()))
    finally:
        conn.close()


def heartbeat(
    *, ae_title: str = "DICOMGW", sent_at: datetime | None = None, **changes: Any
) -> Heartbeat:
    """A healthy box's heartbeat, as gateway/web/heartbeat.py sends it; *changes* replace
    top-level keys.  :data:`LATER_KEYS` are what a box of an earlier release lacks."""
    when = sent_at or datetime.now(UTC)
    minute_ago = when - timedelta(minutes=1)
    beat: dict[str, Any] = {
        "ae_title": ae_title,
        "version": "0.test",
        "boot_id": "0f0e0d0c-boot",
        "sent_at": when.isoformat(timespec="milliseconds"),
        "uptime_seconds": 12.5,
        "health": "ok",
        "reasons": [],
        "queue": {"pending": 3, "uploading": 1, "failed": 0, "done": 40, "done_today": 7,
                  "oldest_pending_at": (when - timedelta(minutes=4)).isoformat(),
                  "by_state": {"received": 1, "compressing": 0, "compressed": 2,
                               "uploading": 1, "uploaded": 40, "failed": 0}},
        "archive": {"state": "reachable", "last_success_at": when.isoformat()},
        "uploads_paused": False,
        "disk": {"free_bytes": 10**10, "min_free_bytes": 10**9, "spool_bytes": 5 * 10**6},
        "certificate_days_left": 200,
        "uploads_window_open": True,
        "worklist": [{"source": "upstream", "last_success_at": when.isoformat(),
                      "refresh_interval_seconds": 60.0}],
        "mpps": {"pending": 0, "sending": 0, "failed": 0, "oldest_pending_at": None},
        # One report due to a modality for a minute (not yet CommitmentReportsStuck).
        "commitment": {"waiting": 2, "due": 1, "reporting": 0, "reported": 30,
                       "oldest_unreported_at": (when - timedelta(minutes=3)).isoformat(),
                       "undelivered": [{"requesting_ae": "CT_ROOM1", "reports_due": 1,
                                        "due_since_at": minute_ago.isoformat()}]},
    }  # fmt: skip
    beat.update(changes)
    return beat  # type: ignore[return-value]


#: Keys a heartbeat gained in issue 16 (and ``commitment`` after issue 17): a box of
#: an earlier release sends none of them.
LATER_KEYS = ("uploads_window_open", "worklist", "mpps", "commitment")


def earlier_release(beat: Heartbeat) -> dict[str, Any]:
    """*beat* as a box of an earlier release sends it."""
    old = {k: v for k, v in beat.items() if k not in LATER_KEYS}
    old["queue"] = {k: v for k, v in beat["queue"].items() if k != "by_state"}
    return old


def encoded(beat: Heartbeat | dict[str, Any]) -> bytes:
    return json.dumps(beat).encode()
