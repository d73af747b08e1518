"""The package's house rules, checked so they stay true (issue 15).

* No import cycles between gateway's modules: the graph is read from the source (every
  ``import`` statement, at module level, in functions and under ``TYPE_CHECKING``).
* Each table has one owning module, the only one whose string literals hold SQL
  against it (``FROM``, ``INTO``, ``UPDATE`` or ``JOIN`` followed by the table's name);
  every other module calls the owner's functions.  The schema itself (the migrations
  in gateway/store.py) is DDL and is not what this checks.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import gateway
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
    "commitment_requests": "gateway.commitment.requests",
    "commitment_items": "gateway.commitment.requests",
}

#: Modules allowed, for a time, to query tables they do not own (none now); an entry
#: that is no longer needed fails the test, to say so.
NOT_YET_OWNER_CALLS: dict[str, set[str]] = {}

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
    return {n for n in names if not n.startswith("sqlite_")}


# -- the rules --------------------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "gateway.store" in graph and "gateway.instances" in graph["gateway.store"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


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
