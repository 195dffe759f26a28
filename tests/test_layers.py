"""The import graph of the package and of the benchmarks, parsed from the sources.

Layers, lowest first: ``ops`` (kernels and their references; with the argument, memory and preset helpers that
import nothing of varcore) -> ``models`` (modules, official names and keys; ``checkpoints`` loads them) ->
``sampling`` and ``train`` -> applications (``cli``, ``digits``, ``probe``, ``sample_ddp``). A module imports only
from its own layer or below; the one exception is a model's official sampling method delegating to the sampler
with a function-level import. No module imports a ``_private`` name of another, and no import cycle exists.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"ops": 0, "argtypes": 0, "memory": 0, "presets": 0, "models": 1, "checkpoints": 1, "sampling": 2,
          "train": 2, "cli": 3, "digits": 3, "probe": 3, "sample_ddp": 3, "__main__": 4, "": 4}
# function-level imports allowed to go up: the official method names on the models run the samplers
DELEGATIONS = {("varcore.models.var", "varcore.sampling"), ("varcore.models.code", "varcore.sampling"),
               ("varcore.models.gpt", "varcore.sampling"), ("varcore.models.llamagen", "varcore.sampling")}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, modules: set):
    """(target module, imported names, whether at module level, line) of every import of a module in ``modules``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, [], id(node) in top, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source not in modules:
                continue
            plain = []
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                if f"{source}.{alias.name}" in modules:
                    yield f"{source}.{alias.name}", [], id(node) in top, node.lineno
                else:
                    plain.append(alias.name)
            if plain:
                yield source, plain, id(node) in top, node.lineno


def scan(root: Path, package_dir: Path):
    files = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    return files, {name: list(imports(path, name, set(files))) for name, path in files.items()}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else ""]


def violations(files: dict, graph: dict, layered: bool = True) -> list:
    found = []
    for name, edges in graph.items():
        for target, names, top_level, line in edges:
            where = f"{files[name].name}:{line} {name} -> {target}"
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            if private:
                found.append(f"{where}: imports the private name(s) {private}")
            if layered and layer(target) > layer(name):
                delegation = any(name == a and target.startswith(b) for a, b in DELEGATIONS)
                if top_level or not delegation:
                    found.append(f"{where}: imports upward (layer {layer(name)} -> {layer(target)})")
    return found + cycles(graph)


def cycles(graph: dict) -> list:
    """Cycles of module-level imports (a module importing a package imports its __init__)."""
    edges = {name: sorted({t for t, _, top, _ in e if top and t != name}) for name, e in graph.items()}
    state, stack, found = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges.get(node, []):
            if state.get(nxt) == "open":
                found.append("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_package_imports_downward_only_without_private_names_or_cycles():
    files, graph = scan(ROOT, ROOT / "varcore")
    assert len(files) > 40 and any(edges for edges in graph.values())
    unknown = sorted({n.split(".")[1] for n in files if "." in n} - set(LAYERS))
    assert not unknown, f"modules without a layer in this test: {unknown}"
    assert violations(files, graph) == []


def test_benchmarks_have_no_import_cycles():
    bench = ROOT / "benchmarks"
    files = {p.stem: p for p in sorted(bench.glob("*.py"))}
    graph = {name: list(imports(path, name, set(files))) for name, path in files.items()}
    assert "costs" in files and any(t == "costs" for t, *_ in graph["bench_sampler"])
    assert violations(files, graph, layered=False) == []


def _tree(tmp_path, sources: dict):
    for rel, text in sources.items():
        path = tmp_path / "varcore" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return scan(tmp_path, tmp_path / "varcore")


@pytest.mark.parametrize("sources,expected", [
    ({"ops/a.py": "from varcore.models.b import X\n", "models/b.py": "X = 1\n"}, "imports upward"),
    ({"ops/a.py": "def f():\n    from varcore.sampling import s\n", "sampling/s.py": ""}, "imports upward"),
    ({"models/var.py": "from varcore.sampling.s import run\n", "sampling/s.py": ""}, "imports upward"),
    ({"models/a.py": "from varcore.models.b import _helper\n", "models/b.py": ""}, "private name"),
    ({"models/a.py": "from . import b\n", "models/b.py": "from varcore.models import a\n"}, "import cycle"),
])
def test_the_checker_catches_each_kind_of_violation(tmp_path, sources, expected):
    sources = {"__init__.py": "", "ops/__init__.py": "", "models/__init__.py": "", "sampling/__init__.py": "",
               **sources}
    files, graph = _tree(tmp_path, sources)
    found = violations(files, graph)
    assert len(found) == 1 and expected in found[0], found


def test_the_checker_allows_the_model_delegations(tmp_path):
    files, graph = _tree(tmp_path, {"__init__.py": "", "models/__init__.py": "", "sampling/__init__.py": "",
                                    "models/var.py": "def sample():\n    from varcore.sampling import s\n",
                                    "sampling/s.py": "from varcore.models.var import sample\n"})
    assert violations(files, graph) == []
