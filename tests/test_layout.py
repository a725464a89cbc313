"""The package's layout holds: no module imports another that (directly or not) imports it back, and the stage
folders depend on each other one way. Read from the source with `ast`, so lazy imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import spectra

PACKAGE = Path(spectra.__file__).parent
ENTRYPOINTS = {"spectra.run", "spectra.prepare", "spectra.analyze", "spectra.explore", "spectra.sql"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spectra"):
                # `from spectra.analysis import plots` imports the module spectra.analysis.plots
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("spectra")]
            graph[name] |= {t for t in targets if t in modules and t != name and t != "spectra"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_no_module_import_cycles():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_stage_folders_depend_one_way():
    folders: dict[str, set[str]] = {}
    for module, imported in import_graph().items():
        if module in ENTRYPOINTS or module == "spectra":
            continue
        source = module.split(".")[1]
        folders.setdefault(source, set()).update(
            t.split(".")[1] for t in imported if t.split(".")[1] != source and t not in ENTRYPOINTS
        )
    assert find_cycle(folders) is None, " -> ".join(find_cycle(folders) or [])
    library = {m: imports for m, imports in import_graph().items() if m not in ENTRYPOINTS}
    assert not {m: i & ENTRYPOINTS for m, i in library.items() if i & ENTRYPOINTS}, "a library module imports an entrypoint"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
