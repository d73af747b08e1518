"""The DIMSE receivers in processes of their own (gateway/dicom/receivers.py): spool pins
across processes, a receiver process that dies, and who runs at which priority."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.dicom.receivers import GATEWAY_NICENESS
from gateway.spool import Spool

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import GatewayProcess
from .support.peers import echoscu, storescu
from .support.web_client import WebClient, web_port

_REPO = Path(__file__).resolve().parents[1]


def _wait(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _receiver_pids(gw: GatewayProcess) -> list[int]:
    assert gw.proc is not None
    out = subprocess.run(
        ["pgrep", "-P", str(gw.proc.pid), "-f", "gateway.dicom.receivers"],
        capture_output=True,
        text=True,
    ).stdout
    return sorted(int(p) for p in out.split())


def _exited(pid: int) -> bool:
    """Gone, or a zombie (exited, not yet reaped by init, which adopted it)."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _ct(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.dcm"
    corpus.with_new_uids(corpus.testdata("CT_small.dcm"), path)
    return path


# -- pins across processes ------------------------------------------------------------------


def test_a_pin_held_by_another_process_keeps_the_file(tmp_path: Path) -> None:
    """A file another process renamed into the spool (pinned until its row commits)
    is not removed by this process's writer, and goes once that pin is released."""
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pathlib import Path
                from gateway.spool import Spool
                spool = Spool(Path({str(spool.root)!r}), 0)
                spool.attach({spool.identity()!r})
                tmp = spool.tmp_dir / "incoming"
                tmp.write_bytes(b"DICM same content")
                f = spool.commit_file(tmp)
                print(f.relpath, flush=True)
                sys.stdin.readline()
                spool.release(f.relpath)
                print("released", flush=True)
                sys.stdin.readline()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(_REPO)},
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        relpath = holder.stdout.readline().strip()
        assert relpath.startswith("objects/"), relpath
        assert spool.pinned(relpath)
        assert not spool.remove_unpinned(relpath, lambda: False)
        assert spool.path_of(relpath).exists()
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        assert not spool.pinned(relpath)
        # Unpinned now, but a committed row (as the check under the lock says) keeps it.
        assert not spool.remove_unpinned(relpath, lambda: True)
        assert spool.path_of(relpath).exists()
        assert spool.remove_unpinned(relpath, lambda: False)
        assert not spool.path_of(relpath).exists()
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
        spool.close()


def test_pins_in_one_process_count(tmp_path: Path) -> None:
    """Two pins on one path in one process: the first release keeps the file pinned."""
    spool = Spool(tmp_path / "spool", 0)
    spool.prepare()
    try:
        paths = []
        for name in ("a", "b"):
            tmp = spool.tmp_dir / name
            tmp.write_bytes(b"DICM same content")
            paths.append(spool.commit_file(tmp).relpath)
        assert paths[0] == paths[1]
        spool.release(paths[0])
        assert spool.pinned(paths[0])
        assert not spool.remove_unpinned(paths[0], lambda: False)
        spool.release(paths[0])
        assert spool.remove_unpinned(paths[0], lambda: False)
    finally:
        spool.close()


# -- the receiver processes of a running gateway ---------------------------------------------


def test_receivers_are_processes_and_come_first(gateway_factory: GatewayFactory) -> None:
    gw = gateway_factory(dimse={"receiver_processes": 2})
    pids = _receiver_pids(gw)
    assert len(pids) == 2, gw.log
    assert gw.proc is not None
    for pid in pids:
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0
    # Every thread of the gateway process but the one that restarts receivers.
    tasks = Path(f"/proc/{gw.proc.pid}/task")
    nice = [os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in tasks.iterdir()]
    assert nice.count(0) == 1, nice
    assert all(n == GATEWAY_NICENESS for n in nice if n != 0), nice
    assert "2 DIMSE receiver processes serve" in gw.log


def test_a_receiver_process_that_dies_is_started_again(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    gw = gateway_factory(dimse={"receiver_processes": 2})
    web = WebClient(web_port(gw))
    before = _receiver_pids(gw)
    os.kill(before[0], signal.SIGKILL)
    # Meanwhile the other one answers.
    assert storescu(gw.port, [_ct(tmp_path, "meanwhile")]).statuses == ["Success"]
    _wait("a new receiver process", lambda: len(set(_receiver_pids(gw)) - set(before)) == 1)
    assert "DIMSE receiver process 0 exited" in gw.log or "process 1 exited" in gw.log
    metrics = web.get("/metrics").text
    assert 'dicom_gateway_component_restarts_total{component="receiver"} 1.0' in metrics
    files = [_ct(tmp_path, f"after-{i}") for i in range(6)]
    assert storescu(gw.port, files).statuses == ["Success"] * 6
    assert echoscu(gw.port)
    assert len(gw.rows()) == 7
    assert gw.proc is not None and gw.proc.poll() is None
    assert gw.stop() == 0
    assert "stopped cleanly" in gw.log


def test_the_receivers_go_when_the_gateway_is_killed(gateway_factory: GatewayFactory) -> None:
    """SIGKILL of the gateway: its receivers see the socket pair close and exit."""
    gw = gateway_factory(dimse={"receiver_processes": 2})
    pids = _receiver_pids(gw)
    gw.kill()

    _wait("receivers gone", lambda: all(_exited(pid) for pid in pids))


def test_a_restart_after_kill_waits_for_the_old_receivers(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """kill -9 of the gateway, and at once a new start on the same spool: it waits
    for the old receiver processes (they hold the spool's instance lock until they
    have drained and exited) before it reconciles, then serves."""
    gw = gateway_factory(dimse={"receiver_processes": 2})
    assert storescu(gw.port, [_ct(tmp_path, "before")]).statuses == ["Success"]
    old = _receiver_pids(gw)
    gw.kill()
    gw.start()
    assert all(_exited(pid) for pid in old)
    assert storescu(gw.port, [_ct(tmp_path, "after")]).statuses == ["Success"]
    assert len(gw.rows()) == 2
    assert all((gw.spool / r["path"]).exists() for r in gw.rows())


@pytest.mark.parametrize("processes", [1, 3])
def test_any_number_of_receiver_processes(
    gateway_factory: GatewayFactory, tmp_path: Path, processes: int
) -> None:
    gw = gateway_factory(dimse={"receiver_processes": processes})
    assert len(_receiver_pids(gw)) == processes
    files = [_ct(tmp_path, f"n{i}") for i in range(4)]
    assert storescu(gw.port, files).statuses == ["Success"] * 4
    assert len(gw.rows()) == 4
