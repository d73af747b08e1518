"""Run the real gateway as a child process (``python -m gateway run``) for the tests."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .peers import free_port

READY_MARK = " ready: "


def start_until_ready(
    command: list[str],
    log_path: Path,
    what: str,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start *command* with its output appended to *log_path*, and wait until it logs
    :data:`READY_MARK`; raise, with what it logged, if it exits or times out first."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    offset = log.tell()
    proc = subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
        cwd=cwd,
    )
    log.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_bytes()[offset:].decode(errors="replace")
        if READY_MARK in text:
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{text}")
        time.sleep(0.05)
    text = log_path.read_text(errors="replace")
    raise TimeoutError(f"{what} not ready after {timeout} s:\n{text}")


def write_config(path: Path, root: Path, port: int, **sections: dict[str, Any]) -> Path:
    """A config with state under *root*; *sections* override or add keys."""
    base: dict[str, dict[str, Any]] = {
        "dimse": {"ae_title": "DICOMGW", "bind": "127.0.0.1", "port": port, "drain_seconds": 10},
        "spool": {"dir": str(root / "spool"), "min_free_bytes": 0},
        "database": {"path": str(root / "gateway.sqlite3")},
        "web": {"port": free_port()},
        "logging": {"level": "INFO"},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. one [[dimse.remote]] entry
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class ChildProcess:
    """A child started with :func:`start_until_ready`: its log, a graceful stop, a kill."""

    log_path: Path
    proc: subprocess.Popen[bytes] | None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


class GatewayProcess(ChildProcess):
    def __init__(self, root: Path, **sections: dict[str, Any]) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = write_config(root / "gateway.toml", root, self.port, **sections)
        self.spool = Path(sections.get("spool", {}).get("dir", root / "spool"))
        # database = {"path": ""}: the default, inside the spool directory.
        db = sections.get("database", {}).get("path", str(root / "gateway.sqlite3"))
        self.db_path = Path(db) if db else self.spool / "gateway.sqlite3"
        self.log_path = root / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        #: The gateway's working directory (relative defaults resolve there); None: ours.
        self.cwd: Path | None = None
        #: A command the gateway runs under (e.g. ``["eatmydata"]``); empty: none.
        self.prefix: list[str] = []

    def start(self, timeout: float = 75.0, env: dict[str, str] | None = None) -> GatewayProcess:
        # Past the gateway's own 60 s for its receiver processes to come up (receivers.
        # _READY_TIMEOUT_S): on a loaded 2-core box their start took over 30 s.
        self.starts += 1
        command = [*self.prefix, sys.executable, "-m", "gateway", "run", "--config",
                   str(self.config_path)]  # fmt: skip
        self.proc = start_until_ready(
            command, self.log_path, "gateway", timeout, env=env, cwd=self.cwd
        )
        return self

    def enqueue_unchecked(self, path: Path) -> None:
        """Put the DICOM file *path* in the queue as if received, without C-STORE.

        For instances an archive refuses for good: the gateway's own ingest refuses the
        ones it can tell (no Study/Series UID), so a test of what happens after the
        archive's refusal places one directly.  Call before :meth:`start`.
        """
        import pydicom

        from gateway.instances import ReceivedInstance
        from gateway.spool import Spool
        from gateway.store import Store

        assert self.proc is None or self.proc.poll() is not None, "stop the gateway first"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        spool = Spool(self.spool, 0)
        spool.prepare()
        tmp = spool.tmp_dir / "enqueued.dcm"
        tmp.write_bytes(Path(path).read_bytes())
        spooled = spool.commit_file(tmp)
        store = Store(self.db_path)
        store.open()
        try:
            store.record_instance(
                ReceivedInstance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    study_instance_uid=str(ds.get("StudyInstanceUID", "")),
                    series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                    calling_ae="CT_ROOM1",
                    peer_address="127.0.0.1:0",
                    transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                    size=spooled.size,
                    sha256=spooled.sha256,
                    path=spooled.relpath,
                )
            ).result(timeout=30)
        finally:
            store.close()

    def rows(self, sql: str = "SELECT * FROM instances", params: tuple[Any, ...] = ()) -> list[Any]:
        conn = sqlite3.connect(self.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def spool_files(self) -> list[Path]:
        return sorted(p for p in (self.spool / "objects").rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted(p for p in (self.spool / "tmp").iterdir())
