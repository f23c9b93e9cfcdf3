"""The package's import structure, read from the source with `ast` (nothing is imported):

- no cycle among transferkit's modules, counting imports inside functions too (a lazy import that closes a
  cycle still ties the two modules together, and turns into an ImportError the day it moves to the top) and
  imports under `if TYPE_CHECKING:` (they never run, but a module that names another's types depends on it: a
  cycle through them is a circle in the design that holds only because the names are not imported);
- transferkit.serving runs in a container without torch: no module of serving or of the runtime layer below it
  (transferkit.runtimes) imports torch, TensorRT or the torch-side packages (transferkit.export, .training,
  .data), directly or through what it imports at module level. Only runtimes/runtime.py may import torch and
  tensorrt, inside the methods of its optional runtimes.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import transferkit

PACKAGE_DIR = Path(transferkit.__file__).resolve().parent
SERVING = "transferkit.serving"
TORCH_FREE = (SERVING, "transferkit.runtimes")  # what the serving image runs
# what the serving image does not have, or must not pull in (it would drag torch in)
TORCH_SIDE_THIRD_PARTY = {"torch", "torchvision", "tensorrt", "timm"}
TORCH_SIDE_PACKAGES = ("transferkit.export", "transferkit.training", "transferkit.data")
# the optional runtimes: torch (AOTInductor) and TensorRT, imported only when one of them is selected
LAZY_ALLOWED = {"transferkit.runtimes.runtime": {"torch", "tensorrt"}}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # a transferkit module, or the top-level name of a third-party package
    module_level: bool  # False: inside a function body (runs only when called)
    line: int
    type_only: bool = False  # under `if TYPE_CHECKING:`: never runs


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(name: str, known: set[str]) -> str:
    """`transferkit.a.b.func` -> the longest prefix that is a module (`transferkit.a.b`)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in known:
            return ".".join(parts[:end])
    return name


def _imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def add(name: str, node: ast.AST, module_level: bool, type_only: bool) -> None:
        if name == "transferkit" or name.startswith("transferkit."):
            found.append(Import(module, _resolve(name, known), module_level, node.lineno, type_only))
        else:
            found.append(Import(module, name.split(".")[0], module_level, node.lineno, type_only))

    def visit(node: ast.AST, module_level: bool, type_only: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, module_level, type_only)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{alias.name}"
                    add(full if full in known else base, child, module_level, type_only)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for body in child.body:  # never runs: recorded as type-only
                    visit(ast.Module(body=[body], type_ignores=[]), module_level, True)
                for other in child.orelse:  # an `else:` does run
                    visit(ast.Module(body=[other], type_ignores=[]), module_level, type_only)
                continue
            # a function body runs when called; a class body runs at import time like the module's
            function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, module_level and not function, type_only)

    visit(tree, True)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` / `if typing.TYPE_CHECKING:` guard imports for type checkers only."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(type_only: bool = False) -> list[Import]:
    """Every import in the package; those under `if TYPE_CHECKING:` only when `type_only` (they never run)."""
    modules = _modules()
    known = set(modules)
    found = [imp for name, path in modules.items() for imp in _imports_of(name, path, known)]
    return found if type_only else [imp for imp in found if not imp.type_only]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected component that has one (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(component, edges) for component in components]


def _cycle_in(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def _parents(module: str) -> list[str]:
    """Importing a.b.c first runs a/__init__.py and a/b/__init__.py."""
    parts = module.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts))]


def test_the_graph_sees_the_imports_it_must_see():
    """Guard against a walker that silently finds nothing (which would make the two tests below pass)."""
    imports = import_graph()
    edges = {(i.source, i.target, i.module_level) for i in imports}
    assert ("transferkit.cli", "transferkit.errors", True) in edges
    assert ("transferkit.runtimes.runtime", "torch", False) in edges  # inside a method
    assert ("transferkit.serving.processes", "psutil", True) in edges
    typed = {(i.source, i.target) for i in import_graph(type_only=True) if i.type_only}
    assert ("transferkit.export.table", "transferkit.export.results") in typed  # `if TYPE_CHECKING:` is seen
    assert not any(i.type_only for i in import_graph())  # and left out of what runs
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}}) == [["a", "a"]] and find_cycles({"a": {"b"}}) == []


def test_no_import_cycles_among_modules():
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], int] = {}
    for imp in import_graph(type_only=True):
        if imp.target.startswith("transferkit") and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
            lines.setdefault((imp.source, imp.target), imp.line)
    cycles = find_cycles(edges)
    described = [
        " -> ".join(cycle) + "  (" + ", ".join(f"{a} line {lines[a, b]}" for a, b in zip(cycle, cycle[1:])) + ")"
        for cycle in cycles
    ]
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_serving_never_imports_torch_or_the_torch_side_packages():
    imports = import_graph()
    module_level: dict[str, set[str]] = {}
    for imp in imports:
        if imp.module_level:
            module_level.setdefault(imp.source, set()).add(imp.target)
    problems = []
    for imp in imports:
        if not imp.source.startswith(TORCH_FREE):
            continue
        forbidden = imp.target in TORCH_SIDE_THIRD_PARTY or imp.target.startswith(TORCH_SIDE_PACKAGES)
        allowed_lazily = imp.target in LAZY_ALLOWED.get(imp.source, set())
        if forbidden and (imp.module_level or not allowed_lazily):
            where = "at module level" if imp.module_level else "inside a function"
            problems.append(f"{imp.source} line {imp.line} imports {imp.target} {where}")
    # what importing each serving module runs: its module-level imports, theirs, and the parent packages
    for module in sorted(m for m in _modules() if m.startswith(TORCH_FREE)):
        seen, todo, via = {module}, [module], {module: module}
        while todo:
            current = todo.pop()
            for target in sorted(module_level.get(current, set()) | set(_parents(current))):
                if target not in seen:
                    seen.add(target)
                    via[target] = current
                    todo.append(target)
        for target in sorted(seen):
            if target in TORCH_SIDE_THIRD_PARTY or target.startswith(TORCH_SIDE_PACKAGES):
                chain = [target]
                while chain[-1] != module:
                    chain.append(via[chain[-1]])
                if len(chain) > 2:  # direct imports are reported above
                    problems.append(f"importing {module} imports {target}: " + " -> ".join(reversed(chain)))
    assert not problems, "\n".join(problems)


def test_the_serving_image_holds_every_module_the_service_imports():
    """The image and the Bento get SERVING_FILES only (serving/build.py): everything `transferkit.serving.service`
    imports at module level, with the packages above, must be among them, or the container fails to start."""
    from fnmatch import fnmatch

    from transferkit.serving.build import SERVING_FILES

    module_level: dict[str, set[str]] = {}
    for imp in import_graph():
        if imp.module_level and imp.target.startswith("transferkit"):
            module_level.setdefault(imp.source, set()).add(imp.target)
    modules = _modules()
    seen, todo = {f"{SERVING}.service"}, [f"{SERVING}.service"]
    while todo:
        current = todo.pop()
        for target in module_level.get(current, set()) | set(_parents(current)):
            if target not in seen and target in modules:
                seen.add(target)
                todo.append(target)
    files = {m: modules[m].relative_to(PACKAGE_DIR.parent).as_posix() for m in seen}
    missing = sorted(f for f in files.values() if not any(fnmatch(f, pattern) for pattern in SERVING_FILES))
    assert len(seen) > 10 and not missing, f"imported by the service but not in the image: {missing}"


def declared_layers() -> dict[str, int]:
    """docs/architecture.md's layer list -> {top-level module or package: its layer, 1 the lowest}."""
    text = (PACKAGE_DIR.parents[1] / "docs" / "architecture.md").read_text()
    block = text.split("<!-- layers:begin -->", 1)[1].split("<!-- layers:end -->", 1)[0]
    layers = {}
    for line in block.strip().splitlines():
        number, _, names = line.partition(". ")
        for name in names.split(","):
            layers[name.strip()] = int(number)
    return layers


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_sits_in_a_declared_layer_and_imports_none_above_it():
    layers = declared_layers()
    tops = {_top(m) for m in _modules()}
    assert tops == set(layers), f"in the code, not in the layers: {tops - set(layers)}; gone: {set(layers) - tops}"
    upward = [
        f"{imp.source} (layer {layers[_top(imp.source)]}) imports {imp.target} (layer {layers[_top(imp.target)]}) "
        f"at line {imp.line}"
        for imp in import_graph()
        if imp.target.startswith("transferkit") and layers[_top(imp.target)] > layers[_top(imp.source)]
    ]
    assert not upward, "imports that point up the declared layers:\n" + "\n".join(upward)
