"""Power cuts on demand, for ``tests/test_power_cut.py``.

The gateway's spool (and its queue database, which sits inside it) lives on an ext4
file system on a loop device.  The loop device's backing file lives on btrfs, itself on
a second loop device over a sparse file.  ``cp --reflink=always`` of the backing file
(the FICLONE ioctl) gives a copy of the ext4 *device* as it is at that instant: what
a disk holds after a power cut, while everything ext4 and SQLite still keep in the page
cache above it is gone.  Each copy is then attached to its own loop device and mounted,
which replays the ext4 journal, exactly as the next boot would.

Why a reflink copy is a crash-consistent image (kernel 6.x, ``fs/btrfs/reflink.c``,
``fs/remap_range.c``, ``drivers/block/loop.c``):

- The loop device runs with ``--direct-io=on``: each block write from ext4 becomes one
  ``O_DIRECT`` write iocb on the backing file and completes (ends the bio ext4 waits
  for) only once btrfs has written it.  A flush or FUA from ext4 (``fsync``, a journal
  commit) becomes ``vfs_fsync`` of the backing file.  Without direct I/O the data would
  sit a second time in btrfs's own page cache, and each FICLONE would first have to
  write that back (``btrfs_wait_ordered_range``), holding the inode lock longer; the
  copy's *contents* would be the same (completed writes), so direct I/O is chosen for
  less memory and shorter, cheaper snapshots, not for different semantics.
- ``btrfs_remap_file_range_prep`` takes the source inode's ``i_rwsem`` (and mmap
  lock) exclusively, and then waits for the direct I/O still in flight
  (``inode_dio_wait``; an async direct write may have dropped the inode lock after
  submitting its bios) and for the ordered extents of the range.  A new btrfs direct
  write needs the inode lock (shared) to start, so none starts during the clone.  The
  copy therefore holds every loop write that btrfs had begun before the clone took
  the lock (those in flight finish first, each iocb whole) and none begun after it.
  That is a state a real disk can be in after a power cut: every write the device
  acknowledged before that instant is there, and no write is torn.
- What it does not model: a disk with a volatile write cache that loses *acknowledged
  but not yet flushed* writes, or tears a sector.  ext4 and SQLite only count on what
  was flushed (``fsync``: data, journal commit, cache flush), and a flushed write is
  in every copy taken after the flush returned, so the copies here are a strict
  subset of the power-cut states, never an impossible one.  (``dm-log-writes`` with
  replay to each flush mark would cover the volatile-cache states too.)

The ext4 is mounted with ``commit=60``: without ``fsync``, nothing written in the last
minute reaches the device by a journal commit (and the flusher writes dirty data back
only after 30 s, ``dirty_expire_centisecs``).  That makes a receive path that does not
fsync lose data in every copy, reliably; a correct one does not depend on the commit
interval at all, since it forces the journal commit with ``fsync`` before it answers.

Every loop device and mount made here is undone when the :class:`DiskLab` context
ends, also on failure.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .peers import tool

BTRFS_BYTES = 2 * 1024**3  # sparse
EXT4_BYTES = 768 * 1024**2
#: ext4's journal commit interval: far beyond the test's length (see the module doc).
EXT4_COMMIT_SECONDS = 60

_SENDING_FILE = re.compile(r"Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"Received Store Response \(([^)]*)\)")


class LabError(RuntimeError):
    pass


def run(*cmd: str | Path) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise LabError(f"{' '.join(map(str, cmd))} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def require_tools() -> None:
    """Root and the tools: a missing one fails the test (``make test-slow`` installs)."""
    if os.geteuid() != 0:
        raise LabError("the power-cut test needs root (losetup, mount)")
    for name in ("losetup", "mount", "umount", "mkfs.btrfs", "mkfs.ext4", "cp", "eatmydata"):
        if shutil.which(name) is None:
            raise LabError(f"{name} not found: make test-slow installs btrfs-progs, eatmydata")


class DiskLab:
    """btrfs on a loop device, holding ``ext4.img``; that ext4 mounted at :attr:`mnt`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.btrfs = root / "btrfs"
        self.mnt = root / "ext4"
        self.image = self.btrfs / "ext4.img"
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> DiskLab:
        require_tools()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            outer = self.root / "btrfs.img"
            self._stack.callback(outer.unlink, missing_ok=True)  # last: after detaching
            with open(outer, "wb") as f:
                f.truncate(BTRFS_BYTES)
            run("mkfs.btrfs", "-q", outer)
            self._mount(self._attach(outer), self.btrfs, None, self._stack)
            with open(self.image, "wb") as f:
                f.truncate(EXT4_BYTES)
            # Inode tables and journal written now, not by ext4lazyinit during the test.
            run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.image)
            run("sync", "-f", self.image)
            dev = self._attach(self.image, "--direct-io=on")
            dio = run("losetup", "--noheadings", "--output", "DIO", dev).strip()
            if dio != "1":
                raise LabError(f"{dev}: direct I/O refused by the backing file system ({dio!r})")
            self._mount(dev, self.mnt, f"commit={EXT4_COMMIT_SECONDS}", self._stack)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _attach(self, image: Path, *options: str, stack: contextlib.ExitStack | None = None) -> str:
        dev = run("losetup", "--find", "--show", *options, image).strip()
        (stack or self._stack).callback(_detach, dev)
        return dev

    def _mount(
        self, dev: str, where: Path, options: str | None, stack: contextlib.ExitStack
    ) -> None:
        where.mkdir(parents=True, exist_ok=True)
        run("mount", *(["-o", options] if options else []), dev, where)
        stack.callback(_umount, where)

    def snapshot(self, name: str) -> Path:
        """A reflink copy of the ext4 device: the disk after a power cut now."""
        dst = self.btrfs / name
        run("cp", "--reflink=always", self.image, dst)
        return dst

    @contextlib.contextmanager
    def mounted(self, snapshot: Path) -> Iterator[Path]:
        """*snapshot* attached read-write and mounted (ext4 replays its journal)."""
        where = self.root / "copy"
        with contextlib.ExitStack() as stack:
            stack.callback(snapshot.unlink, missing_ok=True)
            dev = self._attach(snapshot, stack=stack)
            self._mount(dev, where, None, stack)
            yield where


def _umount(where: Path) -> None:
    for _ in range(50):
        proc = subprocess.run(["umount", str(where)], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        time.sleep(0.1)  # a process of ours still closing files: it is being stopped
    run("umount", "--lazy", where)
    raise LabError(f"umount {where} kept failing ({proc.stderr.strip()}); lazily detached")


def _detach(dev: str) -> None:
    for _ in range(50):
        proc = subprocess.run(["losetup", "-d", dev], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            return
        time.sleep(0.1)
    raise LabError(f"losetup -d {dev}: {proc.stderr.strip()}")


# -- storescu, read as it goes -----------------------------------------------------------


class Sender:
    """DCMTK storescu sending *files* in one association; acknowledgements as they come.

    An acknowledgement is storescu's ``Received Store Response (Success)`` line for the
    file it last announced with ``Sending file:``.  The line is read from storescu's pipe
    after it was written, which is after the gateway answered: a file in
    :meth:`acknowledged` at some moment was acknowledged before that moment.
    """

    def __init__(self, port: int, files: list[Path], calling: str) -> None:
        cmd = [tool("storescu"), "-v", "-nh", "-aec", "DICOMGW", "-aet", calling]
        env = dict(os.environ, TCP_NODELAY="1")  # Debian's DCMTK: Nagle off
        self.proc = subprocess.Popen(
            [*cmd, "127.0.0.1", str(port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=env,
        )
        self.output: list[str] = []
        self.statuses: list[str] = []
        self._acked: list[tuple[float, Path]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        current: Path | None = None
        for line in self.proc.stdout:
            self.output.append(line)
            if m := _SENDING_FILE.search(line):
                current = Path(m.group(1))
            elif m := _RESPONSE.search(line):
                self.statuses.append(m.group(1))
                if m.group(1) == "Success" and current is not None:
                    with self._lock:
                        self._acked.append((time.monotonic(), current))
        self.proc.stdout.close()

    def acknowledged(self) -> list[tuple[float, Path]]:
        with self._lock:
            return list(self._acked)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self._thread.join(timeout)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    #: Seconds after the first storescu started, when the copy began.
    at: float
    #: How long the reflink copy took.
    seconds: float
    #: Files acknowledged before the copy began.
    acknowledged: frozenset[Path]
    #: Seconds from the last acknowledgement seen to the copy (None: none yet).
    since_last_ack: float | None
    #: Taken while storescu was still sending.
    during_send: bool


def snapshot_while_sending(
    lab: DiskLab, senders: list[Sender], rng: random.Random, gap: tuple[float, float],
    timeout: float,
) -> list[Snapshot]:  # fmt: skip
    """Copy the disk at random moments until every sender is done, then once more."""
    began = time.monotonic()
    shots: list[Snapshot] = []

    def shoot(during_send: bool) -> None:
        acks = [a for s in senders for a in s.acknowledged()]
        start = time.monotonic()
        path = lab.snapshot(f"snap-{len(shots):03d}.img")
        last = max((t for t, _ in acks), default=None)
        shots.append(
            Snapshot(
                path=path,
                at=start - began,
                seconds=time.monotonic() - start,
                acknowledged=frozenset(p for _, p in acks),
                since_last_ack=None if last is None else start - last,
                during_send=during_send,
            )
        )

    while any(s.running() for s in senders):
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"storescu still sending after {timeout} s")
        time.sleep(rng.uniform(*gap))
        if any(s.running() for s in senders):
            shoot(during_send=True)
    for s in senders:
        s.wait(30)
    shoot(during_send=False)  # right after the last acknowledgement
    return shots
