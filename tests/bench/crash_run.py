"""The kill -9 durability run as a report: ``python tests/bench/crash_run.py --kills 200``.

Same loop and checks as ``tests/test_crash.py`` (:mod:`tests.support.crashloop`): a child
gateway is SIGKILLed at random moments while DCMTK storescu sends, restarted, and
after the last kill every acknowledged instance must be in the spool with its sha256
and one queue row, the database must pass ``PRAGMA integrity_check`` and every kill's
debris must be gone.

Prints one summary line (kills, instances acknowledged, rounds with partial progress,
elapsed seconds, ...) and, if any check failed, the failures; exits 1 then, 0 if all
held.  ``--keep`` leaves the work directory for inspection.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support import crashloop  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs (default 200)")
    parser.add_argument("--seed", type=int, help="seed of the random choices")
    parser.add_argument("--workdir", type=Path, help="where to work (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per round")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="crash-run-", dir=args.workdir))
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None
    try:
        report = crashloop.run(workdir, args.kills, args.seed, log=log)
    except Exception:
        print(f"crash-run: failed to run, work directory kept: {workdir}", file=sys.stderr)
        raise
    print(report.summary(), flush=True)
    if report.problems:
        print(report.details(), file=sys.stderr)
        print(f"crash-run: work directory kept: {workdir}", file=sys.stderr)
        return 1
    if args.keep:
        print(f"crash-run: work directory kept: {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
