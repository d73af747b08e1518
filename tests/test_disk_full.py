"""Disk full: C-STORE gets 0xA700, no row, no partial file; sends succeed once space returns.

The spool is put on a small tmpfs (needs root, as in CI) so that "full" is real.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import GatewayFactory
from .support import corpus
from .support.gateway_proc import GatewayProcess
from .support.peers import echoscu, storescu

REFUSED = "Refused: OutOfResources"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "smallfs"
    mount_point.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _fill(fs: Path, leave_bytes: int) -> Path:
    """Fill *fs* so that about *leave_bytes* stay free."""
    import shutil

    filler = fs / "filler"
    free = shutil.disk_usage(fs).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler


def _assert_nothing_stored(gw: GatewayProcess) -> None:
    assert gw.rows() == []
    assert gw.spool_files() == []
    assert gw.temp_files() == []


def _gateway_on(gateway_factory: GatewayFactory, fs: Path, min_free_bytes: int) -> GatewayProcess:
    gw = gateway_factory(
        start=False, spool={"dir": str(fs / "spool"), "min_free_bytes": min_free_bytes}
    )
    return gw.start()


def test_below_watermark_refused_then_recovers(
    gateway_factory: GatewayFactory, small_fs: Path, tmp_path: Path
) -> None:
    gw = _gateway_on(gateway_factory, small_fs, min_free_bytes=4 * 1024 * 1024)
    ct = tmp_path / "ct.dcm"
    corpus.with_new_uids(corpus.testdata("CT_small.dcm"), ct)
    filler = _fill(small_fs, leave_bytes=3 * 1024 * 1024)

    result = storescu(gw.port, [ct])
    assert result.statuses == [REFUSED], result.output
    _assert_nothing_stored(gw)
    assert "below min_free_bytes" in gw.log
    assert echoscu(gw.port)

    filler.unlink()
    assert storescu(gw.port, [ct]).statuses == ["Success"]
    assert len(gw.rows()) == 1
    assert gw.stop() == 0


def test_disk_really_full_mid_transfer(
    gateway_factory: GatewayFactory, small_fs: Path, tmp_path: Path
) -> None:
    # No watermark: the write itself hits ENOSPC halfway through the data set.
    gw = _gateway_on(gateway_factory, small_fs, min_free_bytes=0)
    big = corpus.testdata("MR2_UNCR.dcm")  # 2 MB
    filler = _fill(small_fs, leave_bytes=512 * 1024)

    result = storescu(gw.port, [big])
    assert result.statuses == [REFUSED], result.output
    _assert_nothing_stored(gw)
    assert "No space left on device" in gw.log
    assert echoscu(gw.port)

    filler.unlink()
    assert storescu(gw.port, [big]).statuses == ["Success"]
    (row,) = gw.rows()
    assert (gw.spool / row["path"]).stat().st_size == row["size"]
    assert gw.stop() == 0


def test_watermark_above_free_space(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    # Works without a tmpfs: no disk has an exabyte free.
    gw = gateway_factory(spool={"min_free_bytes": 2**60})
    result = storescu(gw.port, [corpus.testdata("CT_small.dcm")])
    assert result.statuses == [REFUSED], result.output
    _assert_nothing_stored(gw)
    assert gw.stop() == 0
