"""What a box upgraded from an older layout needs at start.

Before the queue database moved into the spool directory, ``database.path`` defaulted
to ``var/gateway.sqlite3`` relative to the working directory.  A box upgraded from
then, with ``database.path`` still unset, has its queue there: it must not start with
an empty one.  :func:`adopt_legacy_database` moves it into the spool (same file system:
a rename, once nobody else has it open) or uses it where it is, and logs which.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

#: The default of ``database.path`` before it moved into ``spool.dir``.
LEGACY_DATABASE = Path("var/gateway.sqlite3")


def database_in_use(config: Config) -> Path:
    """The database a start would open (before any move): for tools that only read."""
    new = config.database_path
    if config.database.path is None and not new.exists() and LEGACY_DATABASE.exists():
        return LEGACY_DATABASE
    return new


def adopt_legacy_database(config: Config) -> Path:
    """The database to open; moves one left at the old default into the spool.

    Runs after the spool directory exists and before the database is opened.
    """
    new = config.database_path
    old = LEGACY_DATABASE
    if database_in_use(config) == new:
        if config.database.path is None and old.exists():
            log.warning(
                "queue database: %s is used; %s (the old default location) is not: remove"
                " it once sure it holds nothing still to send",
                new, os.path.abspath(old),
            )  # fmt: skip
        return new
    if os.stat(old.parent).st_dev != os.stat(new.parent).st_dev:
        log.warning(
            "queue database: using %s in place (the old default location, on another file"
            " system than the spool %s); to keep them together stop the gateway and move"
            " it with its -wal and -shm files to %s, or set database.path to keep it",
            os.path.abspath(old), config.spool.dir, new,
        )  # fmt: skip
        return old
    try:
        _move(old, new)
    except (OSError, sqlite3.Error) as exc:
        log.warning(
            "queue database: using %s in place (the old default location): cannot move it"
            " to %s: %s; stop whatever has it open and restart to move it",
            os.path.abspath(old), new, exc,
        )  # fmt: skip
        return old
    log.warning(
        "queue database: moved %s (the old default location) to %s, inside spool.dir",
        os.path.abspath(old), new,
    )  # fmt: skip
    return new


def _move(old: Path, new: Path) -> None:
    """Rename *old* to *new* as one file, only if no other connection has it open."""
    # timeout=0: another process holding it is a reason to leave it, not to wait.
    conn = sqlite3.connect(old, isolation_level=None, timeout=0)
    try:
        # Leaving WAL needs the only connection: it checkpoints every committed
        # transaction into the main file and removes -wal and -shm, or fails
        # ("database is locked") while anybody else has the database open.
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
        if mode != "delete":
            raise sqlite3.OperationalError(f"journal_mode is {mode}, not delete")
        # Held across the rename: nobody opens it in between.  No page is written,
        # so no journal appears next to the old name.
        conn.execute("BEGIN EXCLUSIVE")
        if new.exists():
            raise FileExistsError(f"{new} appeared meanwhile")
        os.rename(old, new)
        # The writers' lock file (gateway/store.py) holds no data; nobody has it now.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{old}-writers")
        for directory in {new.parent, old.parent}:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        conn.execute("COMMIT")
    finally:
        conn.close()
