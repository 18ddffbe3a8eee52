"""ARCHITECTURE.md's mechanical claims about bookgen's imports: no package imports one above it, no module
imports itself back through others, and the few imports inside functions are the ones kept there on purpose."""

from __future__ import annotations

import ast

from tests.helpers import REPO

PACKAGE = REPO / "bookgen"
# lowest first: a module may import its own floor and those below it
FLOORS = [
    {"errors", "config", "fileio", "restart_guard", "faults", "locks", "run_files", "native_ops", "deepspeed_import",
     "__init__"},
    {"config_io", "distributed"},
    {"data", "tracking"},
    {"model"},
    {"checkpoint", "evaluation", "generation", "planning"},
    {"cpu"},
    {"train"},
    {"commands"},
    {"cli"},
]
# inside functions on purpose: the error path's rank label (torch costs a command 3 s), and the CPU-only seam
KEPT_INSIDE = {("bookgen.cli", "bookgen.distributed"), ("bookgen.train.loop", "bookgen.cpu")}


def _modules() -> dict[str, ast.Module]:
    return {"bookgen." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__"):
            ast.parse(p.read_text(encoding="utf-8")) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """(imported bookgen module, at the top level?) for every import of one of bookgen's modules."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bookgen":
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "bookgen" else [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "bookgen"]
        else:
            continue
        found += [(name, id(node) in top) for name in names]
    return found


def _floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, floor in enumerate(FLOORS) if part in floor or part == "__version__")


def test_no_package_imports_one_above_it():
    upward = [(m, t) for m, tree in _modules().items() for t, _ in _imports(tree) if _floor(t) > _floor(m)]
    assert upward == []


def test_no_import_cycle_among_modules():
    modules = _modules()
    graph = {m: {t if t in modules else t.rsplit(".", 1)[0] for t, at_top in _imports(tree) if at_top}
             for m, tree in modules.items()}
    graph = {m: {t for t in targets if t in modules and t != m} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            assert visit(module, []) is None


def test_imports_inside_functions_are_only_those_kept_there_on_purpose():
    inside = {(m, t) for m, tree in _modules().items() for t, at_top in _imports(tree) if not at_top}
    assert inside <= KEPT_INSIDE, inside - KEPT_INSIDE


def test_few_functions_take_the_whole_experiment_config():
    """The resolver, the specs' constructors, the commands and what records the config read the experiment;
    every other function is handed its spec or a config section (decided once, ARCHITECTURE.md)."""
    taking = sorted(f"{module}.{node.name}" for module, tree in _modules().items() for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and any(arg.annotation is not None and "ExperimentConfig" in ast.unparse(arg.annotation)
                            for arg in node.args.posonlyargs + node.args.args + node.args.kwonlyargs))
    assert len(taking) <= 15, taking
