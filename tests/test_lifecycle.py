"""SIGTERM/SIGINT: stop accepting, let in-flight C-STOREs finish, close the store, exit 0."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import GatewayFactory
from .support import corpus
from .support.peers import echoscu, tool


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_a_transfer(
    gateway_factory: GatewayFactory, tmp_path: Path, sig: signal.Signals
) -> None:
    gw = gateway_factory(upload={"compression": "none"})
    files = []
    for i in range(40):
        path = tmp_path / f"mr{i}.dcm"
        corpus.with_new_uids(corpus.testdata("MR2_UNCR.dcm"), path)  # 2 MB each
        files.append(path)
    sender = subprocess.Popen(
        [tool("storescu"), "-v", "-aec", "DICOMGW", "127.0.0.1", str(gw.port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while len(gw.rows()) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.proc is not None
    gw.proc.send_signal(sig)
    assert gw.proc.wait(timeout=30) == 0, gw.log
    output, _ = sender.communicate(timeout=60)

    acknowledged = len(re.findall(r"Received Store Response \(Success\)", output))
    assert 3 <= acknowledged < len(files), output
    rows = gw.rows()
    # Everything acknowledged is durable; at most the one in flight got a row without
    # storescu reading its response before the association went away.
    assert acknowledged <= len(rows) <= acknowledged + 1
    assert len(gw.spool_files()) == len(rows)
    assert "stopped cleanly" in gw.log
    assert not echoscu(gw.port), "the port must be closed after stop"

    gw.start()  # restart finds a consistent spool
    assert gw.temp_files() == []
    assert len(gw.spool_files()) == len(gw.rows()) == len(rows)
    assert gw.stop() == 0


def test_port_in_use_is_a_clear_start_failure(gateway_factory: GatewayFactory) -> None:
    first = gateway_factory("first")
    second = gateway_factory("second", start=False)
    second.config_path.write_text(
        second.config_path.read_text().replace(f"port = {second.port}", f"port = {first.port}")
    )
    with pytest.raises(RuntimeError, match="exited with 71"):
        second.start()
    assert "cannot start" in second.log and "Address already in use" in second.log
    assert first.stop() == 0
