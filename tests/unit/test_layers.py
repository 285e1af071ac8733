"""The house's layers: ``pipeline/`` is split into packages (``pipeline.LAYERS``, lowest
first; the README's "Layout" draws them). Every import is counted, those inside functions
and under ``TYPE_CHECKING`` too:

- a module imports from its own package or a lower one, never a higher one;
- nothing imports ``pipeline.synthetic`` but itself (and the tests and benchmarks);
- no import closes a cycle between modules;
- no module of ``pipeline/``, ``dags/`` or ``plugins/`` is over ``MODULE_LINES`` lines and
  no function over ``FUNCTION_LINES``, but those ``SIZE_EXCEPTIONS`` names (the README's
  "Layout" names them too, and why).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import pipeline

REPO = Path(__file__).resolve().parents[2]
SYNTHETIC = "synthetic"
MODULE_LINES = 800
FUNCTION_LINES = 120
SIZE_EXCEPTIONS: frozenset[str] = frozenset()  # "path" or "path:function"


@dataclass(frozen=True)
class Edge:
    source: str  # a module name, or a file outside the package (dags/, plugins/)
    target: str  # a module of the package
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, known: set[str], package: str) -> list[tuple[str, int]]:
    """The package's modules ``path`` imports, anywhere in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
            names.append((node.module, node.lineno))
        else:
            continue
        for name, line in names:
            if name.split(".")[0] != package:
                continue
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known:
                found.append((name, line))
    # `from pipeline.stages import score` names the package and its module: keep the module
    return sorted(set(found) - {(n, line) for n, line in found if _covered(n, line, found)})


def _covered(name: str, line: int, found: list[tuple[str, int]]) -> bool:
    """``name`` is a package whose module the same line imports (``from p.q import m``)."""
    return any(other.startswith(name + ".") and ln == line for other, ln in found)


def layer_of(module: str, layers: tuple[str, ...]) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in layers else None


def problems(root: Path, layers: tuple[str, ...], outside: list[Path]) -> list[str]:
    """Everything that breaks the layering under ``root`` (a package folder), with the
    files of ``outside`` (DAGs, plugins) held to "never the synthetic world"."""
    package = root.name
    known = modules(root)
    found: list[str] = []
    edges: list[Edge] = []
    for module, path in known.items():
        if module != package and not module.endswith(".__init__"):
            top = module.split(".")[1]
            if top not in layers and path.name != "__init__.py":
                found.append(f"{module}: in no layer ({package}.LAYERS names {', '.join(layers)})")
        edges += [Edge(module, t, line) for t, line in imports(path, set(known), package)]
    rank = {name: i for i, name in enumerate(layers)}
    for e in edges:
        here, there = layer_of(e.source, layers), layer_of(e.target, layers)
        if here is None or there is None or e.target == e.source:
            continue
        if there == SYNTHETIC and here != SYNTHETIC:
            found.append(f"{e.source} imports the synthetic world ({e.target}, line {e.line})")
        elif rank[there] > rank[here]:
            found.append(
                f"{e.source} (layer {here}) imports {e.target} (layer {there}, higher) at line "
                f"{e.line}: move the piece it needs down, or the importer up"
            )
    for path in outside:
        for target, line in imports(path, set(known), package):
            if layer_of(target, layers) == SYNTHETIC:
                found.append(
                    f"{path.relative_to(REPO)} imports the synthetic world ({target}, line {line})"
                )
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(edges)]
    return found


def cycles(edges: list[Edge]) -> list[list[str]]:
    """One cycle through each strongly connected set of modules (Tarjan), if any."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, set()).add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            members = []
            while True:
                w = stack.pop()
                on.discard(w)
                members.append(w)
                if w == v:
                    break
            if len(members) > 1:
                out.append(_path_through(sorted(members), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path_through(members: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A cycle from the first member back to itself, inside the strongly connected set."""
    start, inside = members[0], set(members)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, ()) & inside):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    return members


def outside_files() -> list[Path]:
    return sorted([*(REPO / "dags").glob("*.py"), *(REPO / "plugins").glob("*.py")])


def test_the_package_keeps_its_layers_and_has_no_import_cycle() -> None:
    found = problems(REPO / "pipeline", pipeline.LAYERS, outside_files())
    assert not found, "the layering is broken:\n" + "\n".join(found)


def oversized(paths: list[Path], root: Path = REPO) -> list[str]:
    """Modules over ``MODULE_LINES`` lines and functions over ``FUNCTION_LINES``."""
    found = []
    for path in paths:
        text = path.read_text()
        name = path.relative_to(root).as_posix()
        if len(text.splitlines()) > MODULE_LINES:
            found.append(name)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                if node.end_lineno - node.lineno + 1 > FUNCTION_LINES:
                    found.append(f"{name}:{node.name}")
    return found


def test_no_module_or_function_outgrows_a_reading() -> None:
    paths = [*sorted((REPO / "pipeline").rglob("*.py")), *outside_files()]
    found = set(oversized(paths))
    assert found <= SIZE_EXCEPTIONS, (
        f"over {MODULE_LINES} lines (a module) or {FUNCTION_LINES} (a function): "
        f"{sorted(found - SIZE_EXCEPTIONS)}; split it by what it computes, or name it in "
        "SIZE_EXCEPTIONS and in the README's Layout, with why"
    )
    assert found >= SIZE_EXCEPTIONS, f"no longer oversized: {sorted(SIZE_EXCEPTIONS - found)}"


def test_the_size_check_finds_a_long_function(tmp_path: Path) -> None:
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * FUNCTION_LINES)
    short = tmp_path / "short.py"
    short.write_text("def g():\n" + "    x = 1\n" * (FUNCTION_LINES - 1))
    assert oversized([long, short], tmp_path) == ["long.py:f"]


def test_every_layer_is_a_package_with_modules() -> None:
    for layer in pipeline.LAYERS:
        folder = REPO / "pipeline" / layer
        assert (folder / "__init__.py").is_file(), folder
        assert [p for p in folder.glob("*.py") if p.name != "__init__.py"], folder


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (  # an import inside a function, upwards
            {"low/a.py": "def f():\n    from pkg.high import b\n", "high/b.py": ""},
            "pkg.low.a (layer low) imports pkg.high.b (layer high, higher) at line 2",
        ),
        (  # a cycle inside one layer, one side under TYPE_CHECKING
            {
                "low/a.py": "from pkg.low import b\n",
                "low/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                "    from pkg.low.a import X\n",
            },
            "import cycle: pkg.low.a -> pkg.low.b -> pkg.low.a",
        ),
        (  # the product reaching into the simulated world
            {"high/a.py": "import pkg.synthetic.w\n", "synthetic/w.py": ""},
            "pkg.high.a imports the synthetic world (pkg.synthetic.w, line 1)",
        ),
        (  # a module left beside the layers
            {"loose.py": ""},
            "pkg.loose: in no layer",
        ),
    ],
)
def test_the_check_finds_what_breaks_the_layering(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    root = tmp_path / "pkg"
    _write(
        root, {"__init__.py": "", **{f"{d}/__init__.py": "" for d in ("low", "high", "synthetic")}}
    )
    _write(root, files)
    found = problems(root, ("low", "high", SYNTHETIC), [])
    assert any(expected in f for f in found), found


def test_a_layered_package_passes(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    _write(
        root,
        {
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "",
            "high/__init__.py": "",
            "high/b.py": "from pkg.low import a\ndef f():\n    from pkg.high import c\n",
            "high/c.py": "import pkg.low.a\n",
            "synthetic/__init__.py": "",
            "synthetic/w.py": "from pkg.high import b\n",
        },
    )
    assert problems(root, ("low", "high", SYNTHETIC), []) == []


def test_an_artifact_pickled_before_the_layers_still_loads() -> None:
    """A policy registered before the layout names its model's class by its former module
    (``pipeline.uplift``): it loads, found where the class lives now."""
    import pickle

    from pipeline.campaigns import uplift
    from pipeline.store import registry

    model = uplift.TwoModel("treated", "control", ("tenure_days",), ())  # type: ignore[arg-type]
    raw = pickle.dumps(model, protocol=0)  # names its classes as text: "pipeline.campaigns.uplift"
    former = raw.replace(b"pipeline.campaigns.uplift", b"pipeline.uplift")
    assert former != raw
    with pytest.raises(ModuleNotFoundError):
        pickle.loads(former)
    assert registry.unpickle(former) == model
    assert set(registry.FORMER_MODULES.values()) <= set(modules(REPO / "pipeline"))
