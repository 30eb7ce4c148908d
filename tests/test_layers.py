"""The package's layers point one way: a module imports only from its own layer or the layers below it.

    foundation < math and networks < data < estimators < pictures < models < engine < analyses < application

The imports are read from the source (top-level and function-local alike), so an import that runs up a layer, or
closes a cycle between modules, fails here before it can rot the structure. Function-local imports of elbolab
modules are allowed only in the application layer, where they keep ``elbolab --help`` and the classical commands
from importing torch.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "elbolab"

# Every module of the package by layer, lowest first; a name covers its submodules unless a longer name is listed.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "config", "schedules", "precision", "manifest", "outputs", "runs", "records",
                    "progress")),
    ("math and networks", ("objectives", "likelihoods", "networks", "flows", "hierarchy", "density_ratio", "clustering",
                           "kl_anatomy", "classical")),
    ("data", ("data",)),
    ("estimators", ("estimators", "ais", "inference")),  # over any model's distributions, duck-typed
    ("pictures", ("plots", "figures")),
    ("models", ("models",)),
    ("engine", ("checkpoint", "run_folder", "loggers", "optim", "trainer", "evaluate", "loading")),
    ("analyses", ("disentanglement", "topics", "prior_holes", "explorer")),
    ("application", ("pipeline", "report", "cli", "__main__", "__init__", "classical.gmm_cli",
                     "classical.ising_cli")),
]
APPLICATION = len(LAYERS) - 1


def module_name(path: Path, root: Path) -> str:
    """'models.vae' for elbolab/models/vae.py, 'models' for elbolab/models/__init__.py, '__init__' for the package."""
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_length = None, -1
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > best_length:
                best, best_length = index, len(name)
    if best is None:
        raise AssertionError(f"elbolab.{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best


def is_module(name: str, root: Path) -> bool:
    return (root / (name.replace(".", "/") + ".py")).is_file() or (root / name.replace(".", "/")).is_dir()


def imports_of(path: Path, root: Path) -> list[tuple[str, int, bool]]:
    """(imported elbolab module, line, inside a function) for every import of an elbolab module in a file."""
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name[len("elbolab."):], child.lineno, in_function) for a in child.names
                             if a.name.startswith("elbolab."))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "elbolab":
                module = child.module[len("elbolab."):] if child.module != "elbolab" else ""
                for alias in child.names:  # "from elbolab.models import vae" imports the module models.vae
                    candidate = f"{module}.{alias.name}" if module else alias.name
                    found.append((candidate if is_module(candidate, root) else (module or "__init__"), child.lineno,
                                  in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text()), False)
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        mine = layer_of(here)
        for target, line, local in imports_of(path, root):
            theirs = layer_of(target)
            where = f"elbolab/{path.relative_to(root)}:{line}"
            if theirs > mine:
                problems.append(f"{where}: {LAYERS[mine][0]} module {here} imports {target} from the higher layer "
                                f"{LAYERS[theirs][0]}")
            elif local and mine != APPLICATION:
                problems.append(f"{where}: function-local import of {target} below the application layer; import it "
                                "at the top of the module")
    return problems


def import_cycles(root: Path = PACKAGE) -> list[list[str]]:
    """Groups of modules that import each other (strongly connected components of more than one module). A
    package's __init__ importing its own submodules (the model registry) runs down the tree and is left out."""
    graph: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        package_init = path.name == "__init__.py"
        graph[here] = {t for t, _, _ in imports_of(path, root)
                       if t != here and not (package_init and t.startswith(here + "."))}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path, PACKAGE))


def test_no_import_runs_up_a_layer():
    problems = violations()
    assert not problems, "\n".join(problems)


def test_no_import_cycle_between_modules():
    found = import_cycles()
    assert not found, f"import cycles: {found}"


def test_no_module_imports_a_private_name_of_another():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "elbolab":
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    problems.append(f"elbolab/{path.relative_to(PACKAGE)}:{node.lineno} imports {private} from "
                                    f"{node.module}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("planted, expected", [
    ("from elbolab.trainer import Trainer\n", "imports trainer from the higher layer engine"),
    ("def figures():\n    from elbolab import pipeline\n", "imports pipeline from the higher layer application"),
    ("def f():\n    from elbolab.plots import save_figure\n", "function-local import of plots"),
])
def test_the_guard_catches_a_planted_violation(tmp_path, planted, expected):
    copy = tmp_path / "elbolab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "models" / "planted.py").write_text(planted)
    assert any(expected in p for p in violations(copy))


def test_the_guard_catches_a_planted_cycle(tmp_path):
    copy = tmp_path / "elbolab"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "objectives.py").write_text((copy / "objectives.py").read_text() + "\nfrom elbolab import networks\n")
    (copy / "networks.py").write_text((copy / "networks.py").read_text() + "\nfrom elbolab import objectives\n")
    assert ["networks", "objectives"] in import_cycles(copy)


def test_the_public_api_is_listed_and_documented():
    import elbolab

    for name in ("train", "evaluate", "report", "load_run", "load_run_data", "available_models", "get_model_class",
                 "GaussianMixture"):
        assert name in dir(elbolab) and name in elbolab.__all__
        assert (getattr(elbolab, name).__doc__ or "").strip(), name
