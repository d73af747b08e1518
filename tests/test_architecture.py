"""The package's house rules, checked so they stay true (issue 15).

* No import cycles between gateway's modules: the graph is read from the source (every
  ``import`` statement, at module level, in functions and under ``TYPE_CHECKING``).
* Each table has one owning module, the only one whose string literals hold SQL
  against it (``FROM``, ``INTO``, ``UPDATE`` or ``JOIN`` followed by the table's name);
  every other module calls the owner's functions.  The schema itself (the migrations
  in gateway/store.py) is DDL and is not what this checks.  The fleet receiver's
  database (gateway/fleet/database.py) is a file of its own, checked the same way.
* Rooms: a module in a subpackage (gateway/dicom/, pipeline/, worklist/, mpps/, web/)
  imports the top level and its own subpackage freely; an import of another
  subpackage is on :data:`ACROSS_ROOMS`, with its reason.  A top-level module imports
  no subpackage, except the composition roots (:data:`COMPOSITION_ROOTS`), which wire
  the rooms together, and the edges on :data:`ACROSS_ROOMS`.
* gateway/fleet/ (the fleet receiver, run on a monitoring host) uses only the top
  level, and only the command line imports it.
* README.md's "Architecture" tree lists every module, and no module that is gone.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import gateway
from gateway.fleet.database import FleetDatabase
from gateway.store import Store

PACKAGE = Path(gateway.__file__).parent

#: Each table and the module that owns it.  A new table needs an entry here (the test
#: reads the tables from a freshly migrated database).
OWNERS: dict[str, str] = {
    "instances": "gateway.instances",
    "discarded_files": "gateway.instances",  # the writer's temp table of spool files
    "mpps": "gateway.mpps.outbox",
    "mpps_outbox": "gateway.mpps.outbox",
    "worklist_items": "gateway.worklist.cache",
    "worklist_sources": "gateway.worklist.cache",
    "worklist_mpps": "gateway.worklist.cache",
    "boxes": "gateway.fleet.boxes",  # in the fleet receiver's own database
    "commitment_requests": "gateway.commitment.requests",
    "commitment_items": "gateway.commitment.requests",
}

#: Modules allowed, for a time, to query tables they do not own (none now); an entry
#: that is no longer needed fails the test, to say so.
NOT_YET_OWNER_CALLS: dict[str, set[str]] = {}

#: Top-level modules that put the rooms together, and so import any of them.
COMPOSITION_ROOTS: dict[str, str] = {
    "gateway.app": "the Gateway starts and stops every room's components",
    "gateway.cli": "its commands reach into the rooms: the MPPS outbox, the page's"
    " passwords and tokens, the Conformance Statement",
}

#: Every import from one room into another (or from a top-level module into a room):
#: (importer, imported) -> why.  An entry that is no longer needed fails the test.
ACROSS_ROOMS: dict[tuple[str, str], str] = {
    ("gateway.commitment.decide", "gateway.dicom.dimse_status"):
        "the Failure Reasons of a report borrow the DIMSE status numbers (PS3.4 J.3.3.1.1)",
    ("gateway.commitment.reporter", "gateway.dicom.negotiation"):
        "the transfer syntaxes proposed to the modality for the report",
    ("gateway.commitment.reporter", "gateway.dicom.patches"):
        "a stop ends an association attempt pynetdicom cannot cancel",
    ("gateway.commitment.reporter", "gateway.dicom.tcp"):
        "TCP_NODELAY on the report's association",
    ("gateway.mpps.forwarder", "gateway.dicom.tcp"):
        "TCP_NODELAY on the association to the upstream",
    ("gateway.commitment.scp", "gateway.dicom.dimse_status"):
        "the statuses the Storage Commitment SCP answers",
    ("gateway.commitment.scp", "gateway.dicom.negotiation"):
        "the SOP Class and transfer syntaxes of the N-ACTION it checks",
    ("gateway.dicom.conformance", "gateway.commitment.scp"):
        "the Conformance Statement lists the Storage Commitment SCP's statuses",
    ("gateway.dicom.receive", "gateway.commitment.scp"):
        "the receiver hands N-ACTION to the Storage Commitment SCP (a type only)",
    ("gateway.dicom.receivers", "gateway.commitment.scp"):
        "a receiver process serves the Storage Commitment SCP",
    ("gateway.pipeline.jobs", "gateway.commitment.requests"):
        "retention keeps the files of an unreported commitment",
    ("gateway.studies", "gateway.commitment.requests"):
        "a study's 'committed' stage is read from the commitment requests",
    ("gateway.config", "gateway.pipeline.archives"):
        "upload.archive is checked against the archive profiles' names at load",
    ("gateway.config", "gateway.pipeline.bandwidth"):
        "upload.windows are parsed at load, so a bad window is a one-line config error",
    ("gateway.dicom.receive", "gateway.mpps.scp"):
        "the receiver hands N-CREATE and N-SET to the MPPS SCP (a type only)",
    ("gateway.dicom.receivers", "gateway.mpps.scp"):
        "a receiver process serves the MPPS SCP",
    ("gateway.dicom.receivers", "gateway.worklist.service"):
        "a receiver process serves the worklist SCP",
    ("gateway.mpps.scp", "gateway.dicom.dimse_status"):
        "the statuses the MPPS SCP answers",
    ("gateway.mpps.scp", "gateway.worklist.cache"):
        "a step marks the worklist items it refers to, in the same transaction",
    ("gateway.mpps.forwarder", "gateway.dicom.dimse_status"):
        "the statuses the upstream answers",
    ("gateway.mpps.forwarder", "gateway.dicom.negotiation"):
        "the transfer syntaxes proposed to the upstream",
    ("gateway.mpps.forwarder", "gateway.dicom.patches"):
        "a stop ends an association attempt pynetdicom cannot cancel",
    ("gateway.mpps.forwarder", "gateway.worklist.cache"):
        "the worklist marks are pruned with the steps",
    ("gateway.worklist.service", "gateway.dicom.dimse_status"):
        "the C-FIND statuses it answers",
    ("gateway.worklist.service", "gateway.dicom.find_encoding"):
        "a remembered C-FIND answer encoded once",
    ("gateway.worklist.service", "gateway.dicom.negotiation"):
        "the transfer syntaxes proposed to the RIS",
    ("gateway.web.gauges", "gateway.mpps.outbox"):
        "the outbox states, as metric labels",
    ("gateway.web.gauges", "gateway.commitment.requests"):
        "the Storage Commitment request states, as metric labels",
    ("gateway.web.server", "gateway.pipeline.jobs"):
        "pause, resume and a wake-up after a retry act on the running Pipeline (a type)",
    ("gateway.web.status", "gateway.dicom.receivers"):
        "reads the open associations (a type only)",
    ("gateway.web.status", "gateway.mpps.outbox"):
        "reads the outbox",
    ("gateway.web.status", "gateway.commitment.requests"):
        "reads the Storage Commitment requests' counts and undelivered reports",
    ("gateway.web.status", "gateway.pipeline.jobs"):
        "reads the pipeline's state (a type only)",
    ("gateway.web.status", "gateway.worklist.service"):
        "reads the worklist sources' freshness (a type only)",
}  # fmt: skip

_SQL_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE|JOIN)\s+(?:temp\.|main\.)?([A-Za-z_]\w*)")


# -- reading the source -----------------------------------------------------------------


def modules() -> dict[str, Path]:
    """Every module of the package (subpackages too), by dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that *module* imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                # `import gateway.a.b` imports the longest known prefix (and its parents).
                parts = alias.name.split(".")
                for end in range(len(parts), 0, -1):
                    if ".".join(parts[:end]) in known:
                        deps.add(".".join(parts[:end]))
                        break
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    deps.add(f"{target}.{alias.name}")  # a submodule
                elif target in known:
                    deps.add(target)  # a name from the module
    deps.discard(module)
    return deps


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: _imported(name, path, set(found)) for name, path in found.items()}


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One import cycle (a path that ends where it starts), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        path.append(start)
        on_path.add(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                on_path.discard(node)
                done.add(node)
            elif child in on_path:
                return [*path[path.index(child) :], child]
            elif child not in done and child in graph:
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
                on_path.add(child)
    return None


def room_of(module: str, found: Mapping[str, Path]) -> str | None:
    """The subpackage *module* is in (``"gateway.mpps"``), or None at the top level."""
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and found[module].name == "__init__.py"):
        return ".".join(parts[:2])
    return None


def across_rooms(graph: Mapping[str, set[str]], found: Mapping[str, Path]) -> set[tuple[str, str]]:
    """The imports that enter a subpackage from outside it, composition roots aside."""
    edges = set()
    for module, deps in graph.items():
        if module in COMPOSITION_ROOTS:
            continue
        here = room_of(module, found)
        for dep in deps:
            there = room_of(dep, found)
            if there is not None and there != here:
                edges.add((module, dep))
    return edges


def tables_in(text: str, tables: set[str]) -> set[str]:
    """The tables *text* reads or writes, if it is SQL."""
    return {m.group(1) for m in _SQL_TABLE.finditer(text)} & tables


def sql_tables(path: Path, tables: set[str]) -> set[str]:
    """The tables the string literals of the module at *path* run SQL against (an
    f-string's literal parts count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= tables_in(node.value, tables)
    return found


def schema_tables(tmp_path: Path) -> set[str]:
    """The tables of a freshly migrated database, the writer's temp tables too."""
    store = Store(tmp_path / "q.sqlite3")
    store.open()
    try:
        names = store.submit(
            lambda conn: [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " UNION SELECT name FROM sqlite_temp_master WHERE type = 'table'"
                )
            ]
        ).result(timeout=30)
    finally:
        store.close()
    fleet = FleetDatabase(tmp_path / "fleet.sqlite3")
    fleet.open()
    try:
        names += fleet.read(
            lambda conn: [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
        )
    finally:
        fleet.close()
    return {n for n in names if not n.startswith("sqlite_")}


# -- the rules --------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "gateway.store" in graph and "gateway.instances" in graph["gateway.store"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_fleet_receiver_uses_only_the_top_level() -> None:
    graph = import_graph()
    fleet = {m for m in graph if m == "gateway.fleet" or m.startswith("gateway.fleet.")}
    assert "gateway.fleet.server" in fleet
    top_level = {m for m in graph if m.count(".") == 1 and m not in fleet}
    top_level.add("gateway")
    for module in fleet:
        outside = graph[module] - fleet
        assert outside <= top_level - {"gateway.app", "gateway.cli"}, (module, outside)
    importers = {m for m, deps in graph.items() if deps & fleet} - fleet
    assert importers == {"gateway.cli"}, importers


def test_each_module_keeps_to_its_room() -> None:
    found = modules()
    unlisted = sorted(across_rooms(import_graph(), found) - set(ACROSS_ROOMS))
    assert not unlisted, (
        "imports across rooms that tests/test_architecture.py does not allow:\n"
        + "\n".join(f"  {a} -> {b}" for a, b in unlisted)
        + "\nimport from the top level or your own subpackage, move the shared code to the"
        " top level, or add the edge to ACROSS_ROOMS with its reason"
    )


def test_the_rooms_allow_list_is_still_needed() -> None:
    found = modules()
    graph = import_graph()
    for root in COMPOSITION_ROOTS:
        assert room_of(root, found) is None, f"{root} is not a top-level module"
        assert any(room_of(dep, found) for dep in graph[root]), (
            f"{root} imports no subpackage: remove it from COMPOSITION_ROOTS"
        )
    stale = sorted(set(ACROSS_ROOMS) - across_rooms(graph, found))
    assert not stale, f"ACROSS_ROOMS entries no longer needed, remove them: {stale}"
    assert all(reason.strip() for reason in ACROSS_ROOMS.values())


def test_every_table_has_an_owner(tmp_path: Path) -> None:
    assert set(OWNERS) == schema_tables(tmp_path), "give each new table an owner in OWNERS"
    assert set(OWNERS.values()) <= set(modules())


def test_only_a_tables_owner_runs_sql_against_it() -> None:
    tables = set(OWNERS)
    strays: dict[str, set[str]] = {}
    for name, path in modules().items():
        others = {t for t in sql_tables(path, tables) if OWNERS[t] != name}
        if others - NOT_YET_OWNER_CALLS.get(name, set()):
            strays[name] = others
    assert not strays, f"SQL against tables these modules do not own (call the owner): {strays}"


def test_each_owner_holds_its_tables_sql() -> None:
    """The map is true: each owner does run SQL against each table it owns."""
    found = modules()
    for table, owner in OWNERS.items():
        assert table in sql_tables(found[owner], set(OWNERS)), (table, owner)


def test_the_temporary_exceptions_are_still_needed() -> None:
    """Once gateway/web/status.py calls the owners, its entry must go."""
    found = modules()
    for name, tables in NOT_YET_OWNER_CALLS.items():
        assert name in found
        assert tables <= sql_tables(found[name], set(OWNERS)), (
            f"{name} no longer needs NOT_YET_OWNER_CALLS entries {tables}: remove them"
        )


def readme_tree() -> set[str]:
    """The modules README.md's "Architecture" tree lists, as paths under gateway/."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme.split("\n## Architecture\n", 1)[1]
    tree = section.split("```\n", 2)[1]
    listed: set[str] = set()
    folder = ""
    for line in tree.splitlines()[1:]:  # the first line is gateway/ itself
        name = line.split()[0]
        depth = (len(line) - len(line.lstrip())) // 2
        if name.endswith("/"):
            folder = name
        elif name.endswith(".py"):
            listed.add(name if depth == 1 else folder + name)
    return listed


def test_the_readme_lists_every_module() -> None:
    files = {
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    }
    listed = readme_tree()
    assert not files - listed, f"modules missing from README.md's Architecture: {files - listed}"
    assert not listed - files, (
        f"README.md's Architecture lists modules that are gone: {listed - files}"
    )


# -- the checks themselves catch what they should ----------------------------------------


def test_a_cycle_is_found() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"a"}, "a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_imports_are_read_from_every_place(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import clock\n"
        "from .store import Store\n"
        "import gateway.jobs\n"
        "if TYPE_CHECKING:\n"
        "    from .mpps import MppsScp\n"
        "def f():\n"
        "    from .worklist import Worklist\n"
    )
    (tmp_path / "probe.py").write_text(source)
    known = {"gateway", "gateway.clock", "gateway.store", "gateway.jobs", "gateway.mpps",
             "gateway.worklist", "gateway.cli"}  # fmt: skip
    assert _imported("gateway.probe", tmp_path / "probe.py", known) == {
        "gateway.clock", "gateway.store", "gateway.jobs", "gateway.mpps", "gateway.worklist",
    }  # fmt: skip
    # From a subpackage (the lead's layout): `..` is the package above.
    (tmp_path / "scp.py").write_text("from ..store import Store\nfrom . import rules\n")
    known |= {"gateway.dicom", "gateway.dicom.rules"}
    assert _imported("gateway.dicom.scp", tmp_path / "scp.py", known) == {
        "gateway.store", "gateway.dicom.rules",
    }  # fmt: skip


def test_a_room_crossing_is_found() -> None:
    pkg, mod = Path("__init__.py"), Path("m.py")
    found = {"gateway": pkg, "gateway.store": mod, "gateway.metrics": mod,
             "gateway.app": mod, "gateway.mpps": pkg, "gateway.mpps.scp": mod,
             "gateway.mpps.outbox": mod, "gateway.web": pkg, "gateway.web.status": mod}  # fmt: skip
    assert room_of("gateway.mpps.scp", found) == room_of("gateway.mpps", found) == "gateway.mpps"
    assert room_of("gateway.store", found) is None
    graph = {
        "gateway.mpps.scp": {"gateway.store", "gateway.mpps.outbox", "gateway.mpps"},
        "gateway.web.status": {"gateway.mpps.outbox", "gateway.store"},
        "gateway.metrics": {"gateway.web.status", "gateway.web"},
        "gateway.app": {"gateway.web.status", "gateway.mpps.scp"},
        "gateway.store": set(),
    }
    assert across_rooms(graph, found) == {
        ("gateway.web.status", "gateway.mpps.outbox"),
        ("gateway.metrics", "gateway.web.status"),
        ("gateway.metrics", "gateway.web"),
    }


def test_sql_is_recognised() -> None:
    tables = set(OWNERS)
    assert tables_in("SELECT a FROM instances WHERE b = ?", tables) == {"instances"}
    assert tables_in(
        "SELECT w.item_id FROM worklist_items w LEFT JOIN worklist_mpps m ON m.x = w.x", tables
    ) == {"worklist_items", "worklist_mpps"}
    assert tables_in("INSERT OR IGNORE INTO temp.discarded_files (path)", tables) == {
        "discarded_files"
    }
    assert tables_in("UPDATE mpps SET status = ?", tables) == {"mpps"}
    assert tables_in("DELETE FROM mpps_outbox WHERE seq = ?", tables) == {"mpps_outbox"}
    assert tables_in("the mpps outbox, from the instances table", tables) == set()
    assert tables_in("SELECT 1", tables) == set()
    # On a real module: an f-string's parts are read too.
    found = modules()
    assert sql_tables(found["gateway.instances"], tables) == {"instances", "discarded_files"}
