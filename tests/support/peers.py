"""Real DICOM peers for the tests: DCMTK command-line tools (Debian package ``dcmtk``).

``make test`` installs them; a missing tool fails the test rather than skipping it.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom.dsutils import split_dataset

# storescu flag that proposes each transfer syntax (so compressed data goes as such).
PROPOSE_FLAG = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.57": "-xs",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found: install Debian's dcmtk (make test does)")
    return path


def _ports_below_ephemeral() -> Iterator[int]:
    """Candidate ports below the kernel's ephemeral range, from a point of the range that
    depends on the process, each once."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    first, end = 10000, max(low, 11000)
    start = first + (os.getpid() * 7919) % (end - first)
    yield from range(start, end)
    yield from range(first, start)


_candidates = _ports_below_ephemeral()


def free_port() -> int:
    """A port a server of the test can bind, never handed out twice in this process.

    It is chosen below the ephemeral range: a port the kernel picked with ``bind(0)``
    could be given to an outgoing connection (storescu, an upload) between this choice
    and the server's bind, and the server then failed with "Address already in use"."""
    for port in _candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port left below the ephemeral range")


def wait_for_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout} s")


def transfer_syntax_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


def dataset_bytes(path: Path) -> bytes:
    """The data set part of a DICOM file (everything after the File Meta group)."""
    _, offset = split_dataset(path)
    return Path(path).read_bytes()[offset:]


@dataclass
class StoreResult:
    returncode: int
    output: str
    statuses: list[str]  # one per "Received Store Response" line, in send order

    @property
    def acknowledged(self) -> int:
        return sum(1 for s in self.statuses if s == "Success")


_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu(
    port: int,
    files: list[Path],
    *,
    called: str = "DICOMGW",
    calling: str = "STORESCU",
    extra: list[str] | None = None,
    timeout: float = 120.0,
) -> StoreResult:
    """Send *files* in order with DCMTK storescu; report one status per file sent."""
    cmd = [tool("storescu"), "-v", "-aec", called, "-aet", calling, *(extra or [])]
    cmd += ["127.0.0.1", str(port), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    output = proc.stdout + proc.stderr
    return StoreResult(proc.returncode, output, _RESPONSE.findall(output))


def store_one(port: int, path: Path, **kwargs: object) -> StoreResult:
    """Send one file, proposing exactly its own transfer syntax."""
    flag = PROPOSE_FLAG[transfer_syntax_of(path)]
    extra = [flag, *kwargs.pop("extra", [])]  # type: ignore[misc]
    return storescu(port, [path], extra=extra, **kwargs)  # type: ignore[arg-type]


def echoscu(port: int, *, called: str = "DICOMGW", calling: str = "ECHOSCU") -> bool:
    proc = subprocess.run(
        [tool("echoscu"), "-aec", called, "-aet", calling, "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return proc.returncode == 0


class Storescp:
    """DCMTK storescp writing bit-preserving copies: the reference for what was sent."""

    def __init__(self, directory: Path, aet: str = "DICOMGW") -> None:
        self.directory = directory
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [tool("storescp"), "+B", "-aet", aet, "-od", str(directory), "+xa", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
