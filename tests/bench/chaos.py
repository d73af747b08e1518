"""The chaos soak as a report: ``python tests/bench/chaos.py --seconds 1800``.

Same run and checks as ``tests/test_chaos.py`` (:mod:`tests.support.chaos_soak`), longer: a
real gateway uploads through a fault-injecting TLS proxy in front of a real Orthanc
while two storescu loops send new instances and identical and changed re-sends.

Prints the counts (sends, acknowledged, re-sends, archive answers by fault, instances
in the archive, failed with reasons, invariant violations) and each violation; exits 1
if any invariant broke, 0 if all held.  ``--keep`` leaves the work directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.support import chaos_soak  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1800.0, help="chaos (default 1800)")
    parser.add_argument("--seed", type=int, help="seed of the random choices")
    parser.add_argument("--workdir", type=Path, help="where to work (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--faults", help="comma-separated archive faults to draw (default: all; see Fault)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    if args.faults:
        os.environ["CHAOS_FAULTS"] = args.faults
    faults = chaos_soak.faults_from_env()
    workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir=args.workdir))
    log = (lambda _line: None) if args.quiet else (lambda line: print(line, flush=True))
    try:
        report = chaos_soak.run(workdir, args.seconds, args.seed, log, faults)
    finally:
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report.details())
    return 1 if report.violations or not report.drained else 0


if __name__ == "__main__":
    sys.exit(main())
