"""JPEG 2000 compression coverage of the conformance corpus (issue 11, Done when 3).

Run as ``python tests/bench/conformance.py`` (``make bench``).  The full matrix corpus
(tests/support/corpus.py ``MATRIX``, large files included) goes through the real gateway with
``upload.compression = "j2k-lossless"`` into the real archive (Orthanc + DICOMweb
behind nginx mTLS), sent by the SCUs of tests/support/scus.py (default: Orthanc, which sends
every file in its own transfer syntax; ``--scu dcmtk gdcm orthanc pynetdicom`` for
all).  For every image instance that reached the gateway uncompressed it reports
whether the archive holds it as JPEG 2000 Lossless (1.2.840.10008.1.2.4.90 in the
archive's copy *and* ``transcode_outcome = compressed`` in the queue, which the gateway
sets only after the bit-exact verification), and for every other one the queue's
``transcode_outcome`` / ``transcode_reason``.  Images the gateway refused count as
misses too.  Exceptions whose reason PS3.5 Table 8.2.4-1 accounts for (Bits Allocated
other than 8/16, YBR_FULL_422 and other photometric interpretations J2K may not
carry, float pixel data) are listed apart: the target is 100% of the rest.  So are the
images whose data set holds bytes a JPEG 2000 codestream cannot carry (a Pixel Data
value longer than its rows x columns x frames, pixel cells with bits set above Bits
Stored): compressing them would drop bytes the modality sent, so the gateway sends them
as received, and the last column gives the coverage without them too.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.support import scus  # noqa: E402
from tests.support.conformance import MatrixRun, Outcome, run_matrix  # noqa: E402

J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
#: transcode reasons for which PS3.5 itself rules JPEG 2000 out (not a gateway gap).
PS35_EXCLUDES = ("Bits Allocated", "photometric interpretation", "float pixel data",
                 "signed RGB", "signed YBR", "signed PALETTE")  # fmt: skip
#: transcode reasons meaning J2K cannot hold the data set's pixel bytes bit for bit.
NOT_BIT_EXACT = ("pixel data is", "bits above Bits Stored")


def _is_image(o: Outcome) -> bool:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(o.copy.path, stop_before_pixels=True)
        has_pixels = "PixelData" in pydicom.dcmread(o.copy.path, specific_tags=["PixelData"])
    return has_pixels and "Rows" in ds


def _verified_j2k(o: Outcome) -> bool:
    return o.archive_ts == J2K_LOSSLESS and o.transcode_outcome == "compressed"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scu", nargs="+", default=["orthanc"], choices=scus.SCUS)
    parser.add_argument("--small", action="store_true", help="the fast corpus only")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_matrix(
            Path(tmp), full=not args.small, scu_names=tuple(args.scu), compare_copies=False,
            settle_timeout=1800, upload={"compression": "j2k-lossless"},
        )  # fmt: skip
        report(run, args.scu, time.monotonic() - began)
    return 0


def report(run: MatrixRun, scu_names: list[str], seconds: float) -> None:
    print(f"## JPEG 2000 compression coverage ({', '.join(scu_names)}; {seconds:.0f} s)\n")
    print(
        "| SCU | uncompressed images sent | stored as verified J2K | PS3.5 excludes "
        "| not bit-exact in J2K | other exceptions | coverage of what PS3.5 allows "
        "| coverage of what J2K holds bit-exact |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    exceptions: list[tuple[Outcome, str, bool]] = []
    for scu in scu_names:
        candidates = [
            o for o in run.for_scu(scu)
            if (o.wire_ts in NATIVE or (not o.wire_ts and o.copy.transfer_syntax in NATIVE
                                        and o.sent_by_scu))
            and _is_image(o)
        ]  # fmt: skip
        done = [o for o in candidates if _verified_j2k(o)]
        excluded = inexact = other = 0
        for o in candidates:
            if o in done:
                continue
            if not o.wire_ts:
                reason = "refused by the gateway at C-STORE/association"
            elif not o.archive_ts:
                reason = f"not in the archive ({o.state}: {o.last_error})"
            else:
                reason = f"{o.transcode_outcome}: {o.transcode_reason}"
            ps35 = bool(o.archive_ts) and any(k.lower() in reason.lower() for k in PS35_EXCLUDES)
            lossy = not ps35 and any(k.lower() in reason.lower() for k in NOT_BIT_EXACT)
            excluded += ps35
            inexact += lossy
            other += not ps35 and not lossy
            exceptions.append((o, reason, ps35))
        allowed = len(candidates) - excluded
        pct = 100.0 * len(done) / allowed if allowed else 100.0
        exact = allowed - inexact
        pct_exact = 100.0 * len(done) / exact if exact else 100.0
        print(f"| {scu} | {len(candidates)} | {len(done)} | {excluded} | {inexact} | {other} "
              f"| {pct:.1f}% | {pct_exact:.1f}% |")  # fmt: skip
    print("\n| SCU | file | wire TS | PS3.5 excludes J2K | reason |")
    print("|---|---|---|---|---|")
    for o, reason, ps35 in exceptions:
        print(f"| {o.scu} | {o.copy.entry.label} | {o.wire_ts or '-'} | {'yes' if ps35 else 'no'} "
              f"| {reason.replace('|', '/')} |")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
