#!/usr/bin/env python3
"""Move gateway/'s flat modules into subpackages and rewrite every reference (issue 15).

    python3 scripts/relayout.py [--dry-run] [--no-ruff]

Run it at the top of a clean checkout.  It works on the files git tracks and stages
what it changes (``git mv``, ``git add``), so its result is one ``git commit`` away.
It is deterministic and idempotent: run again, it changes nothing.  Standard library
only; ruff (``.venv/bin/ruff`` or on PATH) is run at the end when it is there.

1. MOVES (below) is the whole plan: every module that moves, old dotted name -> new.
   KEEP lists the modules known to stay where they are.  A module under gateway/ or a
   helper under tests/ in neither is left in place and listed, to be added to the plan.
   An entry whose module does not exist (yet) is skipped.
2. In every tracked .py file the imports are read with ``ast`` and recomputed: a
   relative import stays relative, computed for the importing module's new depth
   (``from .store import X`` in a module moved one level down becomes
   ``from ..store import X``); an absolute one stays absolute.  A module imported by
   a name it no longer has keeps its old local name (``from gateway.web import server
   as web``), so the code that uses it does not change.
3. In strings and comments of .py files (tokenize), and in every other tracked text
   file (README, pyproject.toml, Makefile, systemd, image, ansible), dotted names
   (``gateway.jobs.Pipeline``, ``"gateway.jobs"`` in a monkeypatch or a logger name,
   ``python -m gateway.receivers``, ``tests.journal_sink``) and paths
   (``gateway/jobs.py``, ``tests/peers.py``) are rewritten where they name a moved
   module, with word boundaries; nothing else in code is touched.  (A local variable
   called ``gateway``, e.g. ``gateway.status``, is code, so it is safe.)  A string
   that holds Python code (a ``python -c`` script) has its imports rewritten as in 2.
   LEAVE_ALONE names functions whose strings are made-up module names.
4. pyproject.toml: setuptools finds the subpackages; mypy's ``packages`` already
   recurses.
5. Each new package gets an ``__init__.py`` with the docstring in PACKAGES.
6. README.md: the ``## Layout`` section becomes ``## Architecture``: the package
   tree, one line per module (DESCRIPTIONS), and one instance's path from C-STORE to
   the archive.  Modules without a description are listed.
7. Comment and docstring lines the rewrite pushed past 100 characters are reflowed
   (their last words move down into the same paragraph); FIXUPS handles other strings.
8. ``ruff check --select I --fix`` and ``ruff format`` on the changed Python files
   (the split imports need sorting), then ruff's E501 report on them.

After a run that moved anything, the dotted names ``gateway.web``, ``gateway.worklist``
and ``gateway.mpps`` are still read as the old modules (so a re-run is a no-op); prose
that means the new packages should say ``gateway/web/``.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# -- the plan -----------------------------------------------------------------------------

#: Every module that moves: old dotted name -> new dotted name.  Entries for modules
#: other branches add (dimse_status, uids, mpps_outbox, worklist_cache) are harmless
#: where those modules do not exist.
MOVES: dict[str, str] = {
    # gateway/dicom/: talking DICOM with the modalities.
    "gateway.receive": "gateway.dicom.receive",
    "gateway.receivers": "gateway.dicom.receivers",
    "gateway.negotiation": "gateway.dicom.negotiation",
    "gateway.conformance": "gateway.dicom.conformance",
    "gateway.patches": "gateway.dicom.patches",
    "gateway.dul_guard": "gateway.dicom.dul_guard",
    "gateway.wakeup": "gateway.dicom.wakeup",
    "gateway.find_encoding": "gateway.dicom.find_encoding",
    "gateway.dimse_status": "gateway.dicom.dimse_status",
    "gateway.uids": "gateway.dicom.uids",
    # gateway/pipeline/: from the queue to the archive.
    "gateway.reconcile": "gateway.pipeline.reconcile",
    "gateway.jobs": "gateway.pipeline.jobs",
    "gateway.transcode": "gateway.pipeline.transcode",
    "gateway.iffaster": "gateway.pipeline.iffaster",
    "gateway.upload": "gateway.pipeline.upload",
    "gateway.archives": "gateway.pipeline.archives",
    "gateway.bandwidth": "gateway.pipeline.bandwidth",
    # gateway/worklist/
    "gateway.worklist": "gateway.worklist.service",
    "gateway.worklist_match": "gateway.worklist.match",
    "gateway.worklist_sources": "gateway.worklist.sources",
    "gateway.worklist_cache": "gateway.worklist.cache",
    # gateway/mpps/
    "gateway.mpps": "gateway.mpps.forwarder",
    "gateway.mpps_outbox": "gateway.mpps.outbox",
    # gateway/web/
    "gateway.web": "gateway.web.server",
    "gateway.page": "gateway.web.page",
    "gateway.webauth": "gateway.web.auth",
    "gateway.status": "gateway.web.status",
    "gateway.heartbeat": "gateway.web.heartbeat",
    "gateway.status_doc": "gateway.web.status_doc",  # metrics reads it for types only
    # tests/support/: what the tests share (no test functions).
    "tests.archive": "tests.support.archive",
    "tests.chaos_archive": "tests.support.chaos_archive",
    "tests.chaos_soak": "tests.support.chaos_soak",
    "tests.cloud_auth": "tests.support.cloud_auth",
    "tests.conformance": "tests.support.conformance",
    "tests.corpus": "tests.support.corpus",
    "tests.crashloop": "tests.support.crashloop",
    "tests.gateway_proc": "tests.support.gateway_proc",
    "tests.journal_sink": "tests.support.journal_sink",
    "tests.peers": "tests.support.peers",
    "tests.powercut": "tests.support.powercut",
    "tests.scripted_archive": "tests.support.scripted_archive",
    "tests.scus": "tests.support.scus",
    "tests.status_sample": "tests.support.status_sample",
    "tests.web_client": "tests.support.web_client",
}

#: Modules that stay where they are: the top level is what every room may use.
KEEP: set[str] = {
    "gateway",
    "gateway.__main__",
    "gateway.cli",
    "gateway.config",
    "gateway.app",
    "gateway.spool",
    "gateway.store",
    "gateway.instances",  # the queue table's owner (branch owners)
    "gateway.queue",
    "gateway.clock",
    "gateway.aio",
    "gateway.auth",
    "gateway.metrics",
    "gateway.notify",
    "gateway.upgrade",
    "gateway.field",
    "tests",
    "tests.conftest",
}

#: Each new package's __init__.py docstring: what the package is and what it may touch.
PACKAGES: dict[str, str] = {
    "gateway.dicom": """\
The DICOM side: what modalities associate with.  The receiver processes, the C-ECHO
and C-STORE handlers and the status each failure answers, what is negotiated (and the
Conformance Statement generated from it), and every change the gateway makes to
pynetdicom (patches.py installs them all, in one call).  Its modules use the top level
(config, spool, store, metrics, notify) and the MPPS and worklist SCPs a receiver
process serves (gateway/mpps/, gateway/worklist/); they do not import gateway/pipeline/
or gateway/web/: an instance is theirs until it is in the spool and its queue row is
committed, and the pipeline takes it from there.""",
    "gateway.pipeline": """\
From the queue to the archive: start-up reconciliation of the spool against the queue,
the stages that claim queue rows, compress them (J2K lossless, in encoder processes)
and upload them (STOW-RS over mutual TLS), and what each archive's answers mean.  Its
modules use only the top level (config, spool, store, auth, metrics, aio), and
gateway/dicom/ does not import them.  Others borrow from here: upload.py's TLS context
and error hints (the worklist's UPS-RS source, the heartbeat, the field tools),
jobs.py's backoff (the MPPS forwarder) and its retry of failed rows (the web API, the
command line).""",
    "gateway.worklist": """\
Modality Worklist: the MWL SCP the modalities query, answered from a local cache that
the sources (the RIS's MWL SCP, a UPS-RS worklist, a drop folder) fill.  Its modules
use the top level (config, store, auth), gateway/dicom/'s negotiation tables and C-FIND
encoding, and gateway/pipeline/upload.py's TLS context for UPS-RS.  The receiver
processes serve its SCP; the pipeline does not import it.""",
    "gateway.mpps": """\
Modality Performed Procedure Step: the rules a modality's N-CREATE and N-SET are
checked against, the steps and the outbox they are kept in, and the forwarder that
sends them to the RIS in order.  Its modules use the top level (config, store, aio),
gateway/dicom/'s negotiation tables and patches, and the pipeline's backoff.  The
receiver processes serve its SCP; the pipeline does not import it.""",
    "gateway.web": """\
What people and monitoring see: the aiohttp server (status page, JSON API, /metrics,
/livez, /readyz), the page itself, its credentials, the status document every reader
uses, and the optional heartbeat.  Its modules read the rest of the gateway; the only
thing they change is what an operator asks for (a retry of failed instances, through
gateway/pipeline/jobs.py).""",
    "tests.support": """\
What the tests share, and no tests: the real peers (DCMTK, GDCM, Orthanc behind
nginx), the gateway as a child process, the doubles of the clouds' token endpoints and
archives, and the loops of the crash, chaos and power-cut runs.  The test modules in
tests/ and the benchmarks in tests/bench/ import them; they import nothing from the
test modules.""",
}

LINE_LENGTH = 100

#: Exact replacements made after the rewrite, for strings it made too long for ruff
#: (comments and docstrings are reflowed; the run ends with ruff's E501 report on the
#: files it changed: add what it lists here).
FIXUPS: dict[str, list[tuple[str, str]]] = {
    "tests/bench/ingest.py": [
        (
            '"python -m gateway run --config gateway.toml (tests/support/gateway_proc.py)"',
            '"python -m gateway run --config gateway.toml"\n" (tests/support/gateway_proc.py)"',
        )
    ],
}
#: Strings in these functions are made-up module names (a test of an import-graph
#: reader), not references: they are left as they are.
LEAVE_ALONE: dict[str, set[str]] = {
    "tests/test_architecture.py": {"test_imports_are_read_from_every_place"},
}

#: README's Architecture section: one line per module, by its final dotted name, in
#: the order the tree shows them.  Packages end with a slash.
DESCRIPTIONS: dict[str, str] = {
    "gateway.__main__": "`python -m gateway`, the same as `dicom-gateway`",
    "gateway.cli": "the command line: the only place that prints and picks exit codes",
    "gateway.config": "one TOML file, loaded and validated once into a frozen Config",
    "gateway.app": "Gateway: start order, the main wait, the two-phase stop",
    "gateway.spool": "received files: tmp/, fsync, rename into objects/, fsync(dir)",
    "gateway.store": "SQLite: schema, migrations, the single writer",
    "gateway.instances": "the queue (`instances` table): its states and every statement on it",
    "gateway.queue": "the queue: its states and every statement on it",
    "gateway.clock": "timestamps as the database keeps them",
    "gateway.aio": "waiting on an event without Python 3.11's wait_for",
    "gateway.auth": "request credentials for the archive and the clouds",
    "gateway.metrics": "Prometheus metrics, one registry per gateway",
    "gateway.notify": "systemd: sd_notify and the journal",
    "gateway.upgrade": "what a box upgraded from an older layout needs at start",
    "gateway.field": "doctor, enroll, send: tools for the technician at the box",
    "gateway.dicom/": "what modalities associate with (DIMSE)",
    "gateway.dicom.receivers": "receiver processes accepting from the one DIMSE socket",
    "gateway.dicom.receive": "C-ECHO and C-STORE handlers: spool, queue row, then 0x0000",
    "gateway.dicom.negotiation": "SOP classes, transfer syntaxes and their preference order",
    "gateway.dicom.dimse_status": "every DIMSE status code, one name per meaning",
    "gateway.dicom.uids": "UID validation",
    "gateway.dicom.conformance": "the Conformance Statement, generated from those tables",
    "gateway.dicom.patches": "every change to pynetdicom, one reason each, one call",
    "gateway.dicom.dul_guard": "A-ABORT for oversized PDUs and network-thread errors",
    "gateway.dicom.wakeup": "reactor threads woken by work, not by 1 ms polls",
    "gateway.dicom.find_encoding": "a remembered C-FIND answer encoded once",
    "gateway.pipeline/": "from the queue to the archive",
    "gateway.pipeline.reconcile": "at start: the spool against the queue, before any association",
    "gateway.pipeline.jobs": "the stages: claim, compress, upload, retry, give up",
    "gateway.pipeline.transcode": "J2K lossless of one instance, verified, in a process pool",
    "gateway.pipeline.iffaster": 'compress_when = "if-faster": how much to compress',
    "gateway.pipeline.upload": "STOW-RS client: one session, mutual TLS, per-instance outcome",
    "gateway.pipeline.archives": "what each archive's STOW-RS answers mean",
    "gateway.pipeline.bandwidth": "byte-rate cap, upload windows, priority lane",
    "gateway.worklist/": "Modality Worklist, cached from the RIS",
    "gateway.worklist.service": "the MWL SCP and the cache refresh",
    "gateway.worklist.match": "C-FIND matching: a pure engine, no I/O",
    "gateway.worklist.sources": "UPS-RS worklist and drop-folder sources",
    "gateway.worklist.cache": "the cache's tables and every statement on them",
    "gateway.mpps/": "Modality Performed Procedure Step",
    "gateway.mpps.forwarder": "the SCP's rules and the forwarder to the RIS",
    "gateway.mpps.outbox": "steps and outbox tables, every statement on them",
    "gateway.web/": "what people and monitoring see",
    "gateway.web.server": "aiohttp: page, JSON API, /metrics, /livez, /readyz",
    "gateway.web.page": "the status page: server-rendered HTML and SVG",
    "gateway.web.auth": "the page's credentials: scrypt passwords, tokens, sessions",
    "gateway.web.status": "builds the status document: the page, API, metrics, heartbeat read it",
    "gateway.web.status_doc": "that document: a typed tree of frozen dataclasses",
    "gateway.web.heartbeat": "POST a compact status to heartbeat.url",
}

#: The README's path of one instance, {queue} being the queue table's owner module.
PATH = """\
One instance, from C-STORE to the archive:

1. **receive** (`dicom/receivers.py`, `dicom/receive.py`): a receiver process accepts
   the association (`dicom/negotiation.py` picks the transfer syntax); pynetdicom
   streams the data set into the spool's `tmp/` (`dicom/patches.py`).
2. **spool** (`spool.py`): the handler checks the file, hashes it, fsyncs it and
   renames it into `objects/`, fsyncs the directory.
3. **queue** ({queue}): its row is committed as `received`; only then does the
   modality get 0x0000, and the main process's pipeline is woken.
4. **compress** (`pipeline/jobs.py`, `pipeline/transcode.py`): the compress stage
   claims the row and encodes it J2K lossless in an encoder process, verified before
   it is used (or keeps it as received: already compressed, or `pipeline/iffaster.py`
   says the link is faster); `compressed`.
5. **upload** (`pipeline/jobs.py`, `pipeline/upload.py`): the upload stage sends it
   by STOW-RS over mutual TLS (`auth.py` for the clouds' credentials,
   `pipeline/bandwidth.py` for the cap); `pipeline/archives.py` reads the archive's
   answer: `uploaded`, or a retry with backoff, or `failed` with the reason.

After a crash, `pipeline/reconcile.py` puts spool and queue back in step before any
association; `web/status.py` reports every stage.
"""

#: The rest of the old Layout section, after the tree.
LAYOUT_REST = """\
`tests/`: pytest with real peers (DCMTK, GDCM, Orthanc + DICOMweb behind nginx with
mutual TLS, Chromium); `tests/support/` what the tests share (`cloud_auth.py` and
`scripted_archive.py` are the doubles of the clouds' token endpoints and archives,
`test_clouds.py` runs each cloud end to end through them); `tests/bench/` the
benchmarks (`e2e.py` end to end against an Orthanc edge node);
`test_conformance_matrix.py` sends pydicom's public test files through DCMTK
`storescu`, GDCM `gdcmscu`, Orthanc and pynetdicom's `storescu`, compares each archive
copy element by element, VR included, and writes `test-artifacts/conformance-matrix.md`.
`systemd/` (unit, sysusers), `ansible/` (role `dicom_gateway`, `site.yml`, example
inventory), `image/` (mkosi image), `scripts/` (`relayout.py` made this layout),
`.ci/run` (CI: `make test`).
"""

ROOTS = ("gateway", "tests")
PYPROJECT_OLD = '[tool.setuptools]\npackages = ["gateway"]\n'
PYPROJECT_NEW = '[tool.setuptools.packages.find]\ninclude = ["gateway", "gateway.*"]\n'

# -- reading the repository -----------------------------------------------------------------


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def module_of(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def path_of(module: str) -> str:
    return module.replace(".", "/") + ".py"


def is_package_file(path: str) -> bool:
    return path.endswith("/__init__.py")


@dataclass
class Plan:
    files: list[str]  # tracked files, as they are now
    moves: dict[str, str] = field(default_factory=dict)  # path -> new path, to do now
    final: dict[str, str] = field(default_factory=dict)  # .py path now -> final module
    new: set[str] = field(default_factory=set)  # every module of the final layout
    unknown: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)

    def resolve(self, name: str) -> str:
        """*name* (a dotted name that may go on past a module: an attribute) in the
        final layout.  Longest prefix first; a module of the final layout wins over an
        old one of the same name only where it is not in MOVES (gateway.web is the old
        module until the script has rewritten it)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            head = ".".join(parts[:end])
            if head in self.new:
                return name
            if head in MOVES:
                return ".".join([MOVES[head], *parts[end:]])
        return name


def make_plan(files: list[str]) -> Plan:
    plan = Plan(files=files)
    tracked = set(files)
    for old, new in MOVES.items():
        src, dst = path_of(old), path_of(new)
        if src in tracked and dst in tracked:
            sys.exit(f"relayout: both {src} and {dst} exist; merge them by hand first")
        if src in tracked:
            plan.moves[src] = dst
        elif dst not in tracked:
            plan.absent.append(old)
    for path in files:
        if not path.endswith(".py"):
            continue
        name = module_of(path)
        plan.final[path] = MOVES.get(name, name)
        top, _, rest = name.partition(".")
        flat = top in ROOTS and bool(rest) and "." not in rest
        helper = top == "gateway" or not rest.startswith("test_")
        if flat and helper and name not in {*MOVES, *KEEP, *PACKAGES}:
            plan.unknown.append(path)
    plan.new = set(plan.final.values()) | set(MOVES.values()) | KEEP | set(PACKAGES)
    plan.new -= set(MOVES)
    clash = sorted(set(MOVES) & set(MOVES.values()))
    if clash:
        sys.exit(f"relayout: modules both moved and moved to: {clash}")
    return plan


# -- rewriting text -------------------------------------------------------------------------

_DOTTED = re.compile(r"(?<![\w.\-])(?:gateway|tests)(?:\.\w+)+")
_STICKY = re.compile(r"#\s*(?:no[q]a\b|type:)")
_PATH = re.compile(r"(?<![\w.\-])(?:gateway|tests)(?:/\w+)+\.py\b")


def rewrite_text(plan: Plan, text: str, log: list[str]) -> str:
    def dotted(m: re.Match[str]) -> str:
        new = plan.resolve(m.group(0))
        if new != m.group(0):
            log.append(f"{m.group(0)} -> {new}")
        return new

    def path(m: re.Match[str]) -> str:
        old = m.group(0)
        new = path_of(plan.resolve(module_of(old)))
        if new != old:
            log.append(f"{old} -> {new}")
        return new

    return _DOTTED.sub(dotted, _PATH.sub(path, text))


# -- rewriting imports ----------------------------------------------------------------------


@dataclass
class Edit:
    start: tuple[int, int]  # (line from 1, column in characters)
    end: tuple[int, int]
    text: str


def _char_col(lines: list[str], lineno: int, byte_col: int) -> int:
    return len(lines[lineno - 1].encode()[:byte_col].decode())


def _relative(target: str, package: str) -> str | None:
    t, p = target.split("."), package.split(".")
    common = 0
    while common < min(len(t), len(p)) and t[common] == p[common]:
        common += 1
    if common == 0:
        return None
    return "." * (len(p) - common + 1) + ".".join(t[common:])


def _alias(name: str, local: str | None) -> str:
    return f"{name} as {local}" if local else name


def _rewrite_from(
    plan: Plan, node: ast.ImportFrom, here: str, there: str
) -> list[tuple[str, list[str]]] | None:
    """``from X import ...`` as (module, names) statements for the final layout, or
    None when it is not ours.  *here*/*there*: the importing module's package now and
    in the final layout."""
    if node.level:
        base = here.split(".")
        if not here or node.level - 1 >= len(base):
            return None
        base = base[: len(base) - (node.level - 1)]
        module = ".".join([*base, *([node.module] if node.module else [])])
    else:
        module = node.module or ""
    if module.split(".")[0] not in ROOTS:
        return None
    groups: dict[str, list[str]] = {}
    for a in node.names:
        full = f"{module}.{a.name}"
        if full in plan.new or a.name == "*":
            target, name, local = module, a.name, a.asname
        elif full in MOVES:
            target, _, name = MOVES[full].rpartition(".")
            local = a.asname or (a.name if name != a.name else None)
        else:
            target, name, local = plan.resolve(module), a.name, a.asname
        groups.setdefault(target, []).append(_alias(name, local))
    out = []
    for target, names in groups.items():
        rel = _relative(target, there) if node.level else None
        out.append((rel if rel is not None else target, names))
    return out


def _original_from(node: ast.ImportFrom) -> list[tuple[str, list[str]]]:
    names = [_alias(a.name, a.asname) for a in node.names]
    return [("." * node.level + (node.module or ""), names)]


def import_edits(
    plan: Plan, source: str, tree: ast.Module, path: str, where: tuple[str, str], notes: list[str]
) -> list[Edit]:
    """The edits to *source*'s imports; *where*: its package now and in the final
    layout ("" for code in a string, which is run as a script)."""
    here, there = where
    lines = source.splitlines(keepends=True)
    comments = _comments(source)
    edits = []
    for node in ast.walk(tree):
        statements: list[str]
        if isinstance(node, ast.ImportFrom):
            new = _rewrite_from(plan, node, here, there)
            if new is None or new == _original_from(node):
                continue
            statements = [f"from {mod} import {', '.join(names)}" for mod, names in new]
        elif isinstance(node, ast.Import):
            aliases = [(plan.resolve(a.name), a) for a in node.names]
            if all(moved == a.name for moved, a in aliases):
                continue
            for moved, a in aliases:
                if moved != a.name and not a.asname:
                    notes.append(
                        f"{path}:{node.lineno}: `import {a.name}` without `as`: "
                        f"check its uses in code ({moved} now)"
                    )
            statements = [f"import {', '.join(_alias(n, a.asname) for n, a in aliases)}"]
        else:
            continue
        assert node.end_lineno is not None and node.end_col_offset is not None
        start = (node.lineno, _char_col(lines, node.lineno, node.col_offset))
        end = (node.end_lineno, _char_col(lines, node.end_lineno, node.end_col_offset))
        inner = [c for pos, c in comments if start < pos < end]
        after = [c for pos, c in comments if pos[0] == end[0] and pos > end]
        # A noqa or type comment on the statement must stay on each of its parts.
        sticky = [c for c in inner + after if _STICKY.match(c)]
        text_lines = []
        for i, stmt in enumerate(statements):
            tail = [c for c in inner if i == 0 and c not in sticky]
            if i < len(statements) - 1:
                tail += sticky
            else:
                tail += [c for c in sticky if c not in after]
            text_lines.append("  ".join([stmt, *tail]))
        prefix = lines[node.lineno - 1][: start[1]]
        joiner = "\n" + prefix if not prefix.strip() else "; "
        edits.append(Edit(start, end, joiner.join(text_lines)))
        old_text = ast.get_source_segment(source, node) or ""
        notes.append(f"{path}:{node.lineno}: {' '.join(old_text.split())}")
        for line in text_lines:
            notes.append(f"{' ' * len(path)}  -> {line}")
    return edits


def _comments(source: str) -> list[tuple[tuple[int, int], str]]:
    return [
        (tok.start, tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]


def string_edits(
    plan: Plan, source: str, tree: ast.Module, path: str, notes: list[str]
) -> list[Edit]:
    skip = [
        (node.lineno, node.end_lineno or node.lineno)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name in LEAVE_ALONE.get(path, set())
    ]
    edits = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.STRING, tokenize.COMMENT):
            continue
        if any(a <= tok.start[0] <= b for a, b in skip):
            continue
        log: list[str] = []
        new = tok.string
        if tok.type == tokenize.STRING:
            new = rewrite_embedded(plan, new, f"{path}:{tok.start[0]}: (in a string)", notes)
        new = rewrite_text(plan, new, log)
        if new != tok.string:
            edits.append(Edit(tok.start, tok.end, new))
            notes.extend(f"{path}:{tok.start[0]}: {entry}" for entry in log)
    return edits


def _prose_lines(source: str) -> dict[int, str]:
    """Line number -> the prefix its words follow, for the lines of comments on lines
    of their own and of docstrings: the lines whose words may move to the next."""
    prose: dict[int, str] = {}
    lines = source.split("\n")
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        line = lines[tok.start[0] - 1]
        if tok.type == tokenize.COMMENT and not line[: tok.start[1]].strip():
            marker = re.match(r"#:? ?", tok.string)
            prose[tok.start[0]] = line[: tok.start[1]] + (marker.group(0) if marker else "")
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        first = node.body[0] if node.body else None
        if not (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            continue
        indent = " " * first.col_offset
        for number in range(first.lineno, (first.end_lineno or first.lineno) + 1):
            text = lines[number - 1]
            own = text[: len(text) - len(text.lstrip())]
            prose[number] = indent if number == first.lineno else own
    return prose


def reflow(source: str, original: str, path: str, notes: list[str]) -> str:
    """Lines the rewrite made longer than LINE_LENGTH, in comments and docstrings: their
    last words move to the start of the next line of the same paragraph (or to a new
    line after it), and so on down; nothing else changes."""
    was_long = {line for line in original.split("\n") if len(line) > LINE_LENGTH}
    lines = source.split("\n")
    if all(len(line) <= LINE_LENGTH or line in was_long for line in lines):
        return source
    prose = _prose_lines(source)
    out: list[str] = []
    carry, carry_prefix = "", ""
    for number, line in enumerate(lines, 1):
        prefix = prose.get(number)
        if carry:
            body = line[len(prefix) :] if prefix is not None else ""
            continues = (
                prefix is not None
                and line.startswith(prefix)
                and bool(body.strip())
                and not body.startswith((" ", "*", "-", '"""', "'''"))
                and not re.match(r"\d+\. ", body)
            )
            if continues:
                line = f"{prefix}{carry} {body}"
            else:
                out.append(carry_prefix + carry)
            carry = ""
        if len(line) > LINE_LENGTH and line not in was_long and prefix is not None:
            cut = line.rfind(" ", len(prefix) + 1, LINE_LENGTH + 1)
            if cut > len(prefix):
                line, carry, carry_prefix = line[:cut], line[cut + 1 :], prefix
                notes.append(f"{path}:{number}: reflowed, moved down: {carry}")
        out.append(line)
    if carry:
        out.append(carry_prefix + carry)
    return "\n".join(out)


def apply(source: str, edits: Iterable[Edit]) -> str:
    lines = source.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))

    def offset(pos: tuple[int, int]) -> int:
        return starts[pos[0] - 1] + pos[1]

    out = source
    previous = len(source) + 1
    for edit in sorted(edits, key=lambda e: e.start, reverse=True):
        a, b = offset(edit.start), offset(edit.end)
        if b > previous:
            raise RuntimeError(f"overlapping edits at {edit.start}")
        out = out[:a] + edit.text + out[b:]
        previous = a
    return out


def rewrite_embedded(plan: Plan, token: str, label: str, notes: list[str]) -> str:
    """A string literal that holds Python code (a script for ``python -c``) with its
    imports rewritten; the literal as it is when it is not code or has escapes."""
    if "import" not in token:
        return token
    m = re.fullmatch(r"([rRuU]?)('\'\'|\"\"\"|'|\")(.*)\2", token, re.S)
    if not m:
        return token  # bytes, f-strings
    body = m.group(3)
    try:
        if ast.literal_eval(token) != body:
            return token  # escapes: the text is not the value
        tree = ast.parse(body)
    except (SyntaxError, ValueError):
        return token
    edits = import_edits(plan, body, tree, label, ("", ""), notes)
    return m.group(1) + m.group(2) + apply(body, edits) + m.group(2) if edits else token


def rewrite_python(plan: Plan, path: str, source: str, notes: list[str]) -> str:
    tree = ast.parse(source, path)
    name, final = module_of(path), plan.final[path]
    if is_package_file(path):
        where = (name, final)
    else:
        where = (name.rpartition(".")[0], final.rpartition(".")[0])
    edits = import_edits(plan, source, tree, path, where, notes)
    edits += string_edits(plan, source, tree, path, notes)
    return apply(source, edits)


# -- README ---------------------------------------------------------------------------------


def architecture(plan: Plan, notes: list[str]) -> str:
    modules = {
        plan.final[p]
        for p in plan.final
        if plan.final[p].startswith("gateway.") and not is_package_file(p)
    }
    packages = [d for d in DESCRIPTIONS if d.endswith("/")]
    rows = [("gateway/", "the package")]
    for group in ["gateway", *(d[:-1] for d in packages)]:
        inside = {m for m in modules if m.rpartition(".")[0] == group}
        if not inside:
            continue
        if group != "gateway":
            rows.append((f"  {group.rpartition('.')[2]}/", DESCRIPTIONS[f"{group}/"]))
        indent = "  " * group.count(".") + "  "
        described = [d for d in DESCRIPTIONS if d in inside]
        for m in described + sorted(inside - set(described)):
            if m not in DESCRIPTIONS:
                notes.append(f"README: no description for {m}: add it to DESCRIPTIONS")
            rows.append((indent + m.rpartition(".")[2] + ".py", DESCRIPTIONS.get(m, "")))
    grouped = {"gateway", *(d[:-1] for d in packages)}
    for m in sorted(m for m in modules if m.rpartition(".")[0] not in grouped):
        notes.append(f"README: {m} is in a package the tree does not know: add it")
    width = max(len(r[0]) for r in rows) + 2
    tree = "\n".join(f"{a:<{width}}{b}".rstrip() for a, b in rows)
    queue = (
        "`instances.py`, through `store.py`'s writer"
        if "gateway.instances" in modules
        else "the `instances` table, through `store.py`'s writer"
    )
    return (
        "## Architecture\n\n"
        "The folders are the pipeline's rooms: a module's place says what it may touch"
        " (each\npackage's `__init__.py` says what). The top level is what every room"
        " uses.\n\n"
        f"```\n{tree}\n```\n\n" + _fill(PATH.format(queue=queue)) + "\n" + LAYOUT_REST
    )


def _fill(text: str, width: int = 88) -> str:
    """*text*'s paragraphs and numbered items wrapped to *width*."""
    blocks = []
    for paragraph in text.strip().split("\n\n"):
        items = re.split(r"\n(?=\d+\. )", paragraph)
        blocks.append(
            "\n".join(
                textwrap.fill(" ".join(item.split()), width, subsequent_indent="   ")
                if re.match(r"\d+\. ", item)
                else textwrap.fill(" ".join(item.split()), width)
                for item in items
            )
        )
    return "\n\n".join(blocks) + "\n"


def rewrite_readme(plan: Plan, text: str, notes: list[str]) -> str:
    section = re.compile(r"^## (Layout|Architecture)\n.*?(?=^## |\Z)", re.S | re.M)
    found = list(section.finditer(text))
    if not found:
        notes.append("README: no ## Layout or ## Architecture section; appended one")
        return text.rstrip("\n") + "\n\n" + architecture(plan, notes)
    if len(found) > 1:
        notes.append("README: both ## Layout and ## Architecture; only the first replaced")
    m = found[0]
    if m.group(1) == "Layout":
        notes.append("README: ## Layout replaced by ## Architecture (check it kept what matters)")
    tail = "" if m.end() == len(text) else "\n"
    return text[: m.start()] + architecture(plan, notes) + tail + text[m.end() :]


# -- main -----------------------------------------------------------------------------------


def ruff_binary() -> str | None:
    local = Path(".venv/bin/ruff")
    return str(local) if local.exists() else shutil.which("ruff")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print, change nothing")
    parser.add_argument("--no-ruff", action="store_true", help="skip ruff at the end")
    args = parser.parse_args()
    os.chdir(git("rev-parse", "--show-toplevel").strip())
    me = Path(__file__).resolve().relative_to(Path.cwd()).as_posix()
    files = sorted(f for f in git("ls-files").splitlines() if f != me and os.path.isfile(f))
    plan = make_plan(files)
    notes: list[str] = []
    changed: dict[str, str] = {}  # final path -> new content

    for path in files:
        raw = Path(path).read_bytes()
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            continue
        if path.endswith(".py"):
            new = reflow(rewrite_python(plan, path, text, notes), text, path, notes)
            for old, fixed in FIXUPS.get(path, []):
                if old in new:
                    new = new.replace(old, fixed)
                    notes.append(f"{path}: FIXUPS: {old} -> {fixed}")
        else:
            log: list[str] = []
            new = rewrite_text(plan, text, log)
            notes.extend(f"{path}: {entry}" for entry in log)
            if path == "pyproject.toml" and PYPROJECT_OLD in new:
                new = new.replace(PYPROJECT_OLD, PYPROJECT_NEW)
                notes.append("pyproject.toml: packages = ['gateway'] -> packages.find")
            elif path == "pyproject.toml" and PYPROJECT_NEW not in new:
                notes.append("pyproject.toml: package list not recognised: check it by hand")
            if path == "README.md":
                new = rewrite_readme(plan, new, notes)
        if new != text:
            changed[plan.moves.get(path, path)] = new

    created = {}
    for package, doc in PACKAGES.items():
        init = path_of(package + ".__init__")
        needed = any(m.startswith(package + ".") for m in plan.final.values())
        if needed and init not in files and not os.path.exists(init):
            created[init] = f'"""{doc}\n"""\n'

    print("relayout: moves")
    for src, dst in plan.moves.items():
        print(f"  git mv {src} {dst}")
    if not plan.moves:
        print("  none (already done)")
    for init in created:
        print(f"  new {init}")
    print("relayout: rewrites")
    for line in notes:
        print(f"  {line}")
    if not notes:
        print("  none")
    if plan.absent:
        print("relayout: in the plan but not in this tree (skipped): " + ", ".join(plan.absent))
    if plan.unknown:
        print("relayout: NOT IN THE PLAN, left in place (add them to MOVES or KEEP):")
        for path in plan.unknown:
            print(f"  {path}")
    if args.dry_run:
        return 0

    for src, dst in plan.moves.items():
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        git("mv", src, dst)
    for path, content in {**created, **changed}.items():
        Path(path).write_text(content)
    touched = sorted({*created, *changed})
    if touched:
        git("add", "--", *touched)

    python = [p for p in touched if p.endswith(".py")]
    ruff = None if args.no_ruff else ruff_binary()
    if python and ruff:
        subprocess.run([ruff, "check", "-q", "--select", "I", "--fix", *python], check=False)
        subprocess.run([ruff, "format", "-q", *python], check=True)
        git("add", "--", *python)
        long = subprocess.run(
            [ruff, "check", "-q", "--select", "E501", "--output-format", "concise", *python],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if long:
            print("relayout: LINES TOO LONG after the rewrite (add them to FIXUPS):")
            print(long)
    elif python and not args.no_ruff:
        print("relayout: ruff not found: run `ruff check --select I --fix` and `ruff format`")
    print(f"relayout: {len(plan.moves)} moved, {len(created)} created, {len(changed)} rewritten")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
