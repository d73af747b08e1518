"""The durable spool: received files land in ``tmp/``, are fsynced, then renamed into
``objects/``, and the directory is fsynced before anything is acknowledged.

File names are the SHA-256 of the file's own bytes (``objects/ab/abcdef….dcm``), so no
value a peer sent ever becomes part of a path, the same content always lands on the
same name, and a file that was renamed but never committed to the queue is an orphan
the reconciler can recognise and remove.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
_SHARDS = [f"{i:02x}" for i in range(256)]
#: errno values meaning "no room": answered as 0xA700 (out of resources).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class SpoolFull(Exception):
    """Free space on the spool filesystem is below the configured watermark."""


@dataclass(frozen=True)
class SpooledFile:
    relpath: str
    sha256: str
    size: int


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.tmp_dir = root / "tmp"
        self.objects_dir = root / "objects"

    def prepare(self) -> None:
        """Create the directory tree (idempotent) and make it durable."""
        for d in (self.root, self.tmp_dir, self.objects_dir):
            d.mkdir(parents=True, exist_ok=True)
        for shard in _SHARDS:
            (self.objects_dir / shard).mkdir(exist_ok=True)
        fsync_dir(self.objects_dir)
        fsync_dir(self.root)
        fsync_dir(self.root.parent)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_room(self) -> None:
        free = self.free_bytes()
        if free < self.min_free_bytes:
            raise SpoolFull(
                f"spool free space {free} bytes is below min_free_bytes {self.min_free_bytes}"
            )

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    def commit_file(self, tmp_path: Path) -> SpooledFile:
        """Hash, fsync and rename *tmp_path* into ``objects/``; fsync the directory.

        On return the file survives power loss.  *tmp_path* must be on the spool
        filesystem (the receiver points ``tempfile.tempdir`` at :attr:`tmp_dir`).
        """
        digest = hashlib.sha256()
        with open(tmp_path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
            size = f.tell()
            os.fsync(f.fileno())
        sha = digest.hexdigest()
        relpath = f"objects/{sha[:2]}/{sha}.dcm"
        final = self.root / relpath
        os.replace(tmp_path, final)
        fsync_dir(final.parent)
        return SpooledFile(relpath=relpath, sha256=sha, size=size)

    def remove(self, relpath: str) -> None:
        try:
            os.unlink(self.root / relpath)
        except FileNotFoundError:
            pass

    def clean_tmp(self) -> int:
        """Remove every temp file: at start none of them belongs to a live C-STORE."""
        removed = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        return removed

    def stored_relpaths(self) -> set[str]:
        found: set[str] = set()
        for shard in _SHARDS:
            d = self.objects_dir / shard
            if not d.is_dir():
                continue
            for entry in os.scandir(d):
                found.add(f"objects/{shard}/{entry.name}")
        return found
