"""The spool and its queue database: where the database lives, an upgrade from the old
default location, and a spool directory that vanishes (or is replaced) under a running
gateway.  Real gateway processes (tests/support/gateway_proc.py), DCMTK storescu/echoscu.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.app import EXIT_COMPONENT_FAILED, Gateway
from gateway.config import from_dict
from gateway.instances import ReceivedInstance
from gateway.spool import Spool
from gateway.store import Store

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import GatewayProcess
from .support.peers import echoscu, storescu
from .support.web_client import WebClient, web_port

REFUSED = "Refused: OutOfResources"
IN_SPOOL = {"path": ""}  # database.path unset: the default, inside spool.dir


def _wait_until(what: str, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)


def _in_own_dir(gateway_factory: GatewayFactory, **sections: dict[str, object]) -> GatewayProcess:
    """A gateway whose working directory is its own root (relative defaults land there)."""
    gw = gateway_factory(start=False, database=IN_SPOOL, **sections)
    gw.cwd = gw.root
    return gw.start()


def _ct(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.dcm"
    corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    return path


def _everything_under(path: Path) -> list[Path]:
    return sorted(path.rglob("*")) if path.exists() else []


def test_only_spool_dir_set_puts_the_database_inside_it(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = _in_own_dir(gateway_factory)
    assert gw.db_path == gw.spool / "gateway.sqlite3"
    assert gw.db_path.is_file()
    assert not (gw.root / "var").exists()  # nothing at the old default
    assert storescu(gw.port, [_ct(tmp_path, "a")]).statuses == ["Success"]
    (row,) = gw.rows()
    assert (gw.spool / row["path"]).is_file()
    assert gw.stop() == 0
    # The start-up sweep of tmp/ and objects/ leaves the database alone.
    gw.start()
    assert len(gw.rows()) == 1
    assert "removed 0 temp files and 0 orphan files" in gw.log
    assert gw.stop() == 0


def _old_box(root: Path) -> tuple[Path, str]:
    """The state of a box on the old default: queue at var/gateway.sqlite3, one row
    waiting with its file in the spool.  Returns (old database, its SOP Instance UID)."""
    spool = Spool(root / "spool", 0)
    spool.prepare()
    tmp = spool.tmp_dir / "incoming.dcm"
    shutil.copyfile(corpus.testdata("CT_small.dcm"), tmp)
    spooled = spool.commit_file(tmp)
    spool.close()
    old = root / "var" / "gateway.sqlite3"
    store = Store(old)
    store.open()
    uid = "1.2.826.0.1.3680043.8.498.1"
    store.record_instance(
        ReceivedInstance(
            sop_instance_uid=uid,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.4",
            calling_ae="OLDBOX",
            peer_address="127.0.0.1:1",
            transfer_syntax="1.2.840.10008.1.2.1",
            size=spooled.size,
            sha256=spooled.sha256,
            path=spooled.relpath,
        )
    ).result()
    store.close()
    return old, uid


def test_upgrade_moves_the_database_from_the_old_default(
    gateway_factory: GatewayFactory,
) -> None:
    gw = gateway_factory(start=False, database=IN_SPOOL)
    gw.cwd = gw.root
    old, uid = _old_box(gw.root)
    gw.start()
    assert "queue database: moved" in gw.log
    assert f"{old} (the old default location) to {gw.spool / 'gateway.sqlite3'}" in gw.log
    (row,) = gw.rows()
    assert row["sop_instance_uid"] == uid and row["state"] != "failed", dict(row)
    assert (gw.spool / row["path"]).is_file()
    assert [p.name for p in old.parent.iterdir()] == []  # no -wal, -shm or journal left
    assert gw.stop() == 0
    # An old database appearing again (a restored backup?) is not used, and said so.
    shutil.copyfile(gw.db_path, old)
    gw.start()
    assert "(the old default location) is not: remove it" in gw.log
    assert len(gw.rows()) == 1
    assert gw.stop() == 0


def test_upgrade_uses_an_old_database_in_use_in_place(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(start=False, database=IN_SPOOL)
    gw.cwd = gw.root
    old, uid = _old_box(gw.root)
    # Another process (an operator's sqlite3 shell, an old gateway) has it open.
    other = sqlite3.connect(old)
    try:
        other.execute("SELECT count(*) FROM instances").fetchone()
        gw.start()
        assert f"queue database: using {old} in place" in gw.log
        assert "database is locked" in gw.log
        assert not (gw.spool / "gateway.sqlite3").exists()
        gw.db_path = old
        assert [r["sop_instance_uid"] for r in gw.rows()] == [uid]
        assert gw.stop() == 0
    finally:
        other.close()


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_spool_gone_under_a_running_gateway(
    gateway_factory: GatewayFactory, tmp_path: Path, how: str
) -> None:
    gw = _in_own_dir(gateway_factory)
    web = WebClient(web_port(gw))
    assert storescu(gw.port, [_ct(tmp_path, "before")]).statuses == ["Success"]
    # Compressed before the spool goes (a J2K encode losing its input is another story).
    _wait_until("compressed", lambda: gw.rows()[0]["state"] == "compressed")
    assert web.get("/readyz").status == 200
    started = time.monotonic()

    if how == "removed":  # an operator's rm -rf, then an empty directory in its place
        shutil.rmtree(gw.spool)
        reason = "does not exist"
    else:  # a data disk whose mount dropped: another (empty) directory at the path
        gw.spool.rename(tmp_path / "spool-away")
        gw.spool.mkdir()
        reason = "is not the directory the gateway started with"

    _wait_until("/readyz fails", lambda: web.get("/readyz").status == 503)
    problems = web.get("/readyz").json()["problems"]
    assert any("spool directory is missing or replaced" in p and reason in p for p in problems)
    status = web.status()
    assert status["health"]["state"] == "failing"
    assert any("spool directory is missing or replaced" in r for r in status["health"]["reasons"])
    assert status["spool"]["problem"] is not None

    if how == "removed":
        result = storescu(gw.port, [_ct(tmp_path, "nothing-there")])
        assert result.statuses == [REFUSED], result.output
        assert not gw.spool.exists()  # refused without creating anything
        gw.spool.mkdir()
    result = storescu(gw.port, [_ct(tmp_path, "after")], extra=["-d"])  # -d: Error Comment
    assert "DIMSE Status                  : 0xa700" in result.output, result.output
    assert "(0000,0902) LO [spool directory is missing or replaced]" in result.output
    assert echoscu(gw.port)
    # The daemon lives on for a couple of monitor periods, still refusing, still writing
    # nothing into the directory now at the path.
    _wait_until("two monitor periods", lambda: time.monotonic() - started > 2.5)
    assert gw.proc is not None and gw.proc.poll() is None
    assert web.get("/readyz").status == 503
    assert _everything_under(gw.spool) == []

    if how == "replaced":
        # The very same directory back (a remount): ready again, and receiving.
        gw.spool.rmdir()
        (tmp_path / "spool-away").rename(gw.spool)
        _wait_until("/readyz recovers", lambda: web.get("/readyz").status == 200)
        assert storescu(gw.port, [_ct(tmp_path, "back")]).statuses == ["Success"]
        assert "is back (same device and inode)" in gw.log

    assert gw.stop() == 0
    log = gw.log
    assert log.count("C-STOREs are refused until it is back") == 1
    assert "Traceback" not in log and "crashed" not in log
    assert "stopped cleanly" in log  # nothing went wrong in the gateway itself
    if how == "removed":
        assert _everything_under(gw.spool) == []


def test_only_a_clean_stop_is_logged_as_clean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = from_dict(
        {
            "dimse": {"bind": "127.0.0.1", "port": 0, "drain_seconds": 1},
            "spool": {"dir": str(tmp_path / "spool"), "min_free_bytes": 0},
            "web": {"port": 0},
            "upload": {"compression": "none"},
        }
    )
    gateway = Gateway(config)
    # No DIMSE listener: it would patch pynetdicom inside the test process.
    gateway.receiver.start = lambda: ("127.0.0.1", 0)  # type: ignore[method-assign]

    async def broken() -> None:
        await asyncio.sleep(0.1)
        raise RuntimeError("a bug in a background task")

    gateway._sweep_tmp = broken  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, logger="gateway")
    assert asyncio.run(gateway.run()) == EXIT_COMPONENT_FAILED
    messages = [r.getMessage() for r in caplog.records]
    assert not any("stopped cleanly" in m for m in messages), messages
    assert any(
        m.startswith("stopped after an error (RuntimeError: a bug in a background task)")
        for m in messages
    ), messages
    assert os.path.exists(tmp_path / "spool" / "gateway.sqlite3")


def _full_tree(root: Path) -> None:
    """A directory that looks like a spool: the worst case for writing by path."""
    for sub in ("tmp", "objects"):
        (root / sub).mkdir(parents=True)
    for i in range(256):
        (root / "objects" / f"{i:02x}").mkdir()


def test_writes_follow_the_directory_not_the_path(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    assert spool.check() is None
    spool.root.rename(tmp_path / "away")
    _full_tree(spool.root)
    problem = spool.check()
    assert problem is not None and "is not the directory the gateway started with" in problem
    assert spool.sweep_tmp(0) == 0

    refused = spool.temp_file_factory()
    assert refused.error is not None and refused.closed
    refused.write(b"discarded")
    refused.discard()
    with pytest.raises(OSError, match="spool directory is missing or replaced"):
        spool.probe_write()

    # A C-STORE that passed the check just before the swap (the race the check cannot
    # close): its file and its rename still land in the directory we started with.
    spool.check = lambda: None  # type: ignore[method-assign]
    temp = spool.temp_file_factory()
    temp.write(b"data set")
    temp.close()
    spooled = spool.commit_file(Path(temp.name))
    assert (tmp_path / "away" / spooled.relpath).read_bytes() == b"data set"
    spool.remove(spooled.relpath)
    assert not (tmp_path / "away" / spooled.relpath).exists()
    assert [p for p in spool.root.rglob("*") if p.is_file()] == []
    spool.close()


def test_the_same_directory_back_is_used_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    spool.root.rename(tmp_path / "away")
    assert spool.check() is not None and "does not exist" in str(spool.problem)
    (tmp_path / "away").rename(spool.root)  # a remount of the same file system
    assert spool.check() is None and spool.problem is None
    spool.probe_write()
    spool.close()
