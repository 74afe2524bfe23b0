"""No module imports from a layer above it; ``echolm.app`` is the one composition root.

Layers, lowest first: ``infra`` (settings, adapters) < ``streams`` (faust app, topics) < ``agents``
(behaviour) < ``echolm`` (composition root, CLI, client) < ``bench``. A module may import its own
package and the layers below it. ``devstack`` (development-only servers) sits beside the runtime:
it may import ``infra`` only; ``echolm`` may use it only inside a function (its dev commands import
it lazily, so ``echolm worker`` never loads it), and ``infra``, ``streams`` and ``agents`` never.
Nothing here imports ``tests``.

Read statically from every module's AST: ``import``/``from`` statements anywhere in the file
(``TYPE_CHECKING`` blocks and function bodies too) and ``importlib.import_module("...")`` or
``__import__("...")`` with a constant name, so an import by string does not slip past.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {"infra": 0, "streams": 1, "agents": 2, "echolm": 3, "bench": 4}
CHECKED = ("infra", "streams", "agents", "echolm", "devstack")
DEVSTACK_MAY_IMPORT = {"infra", "devstack"}
PROJECT = {*RANK, "devstack", "tests", "tools"}


@dataclass(frozen=True)
class Edge:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute
    line: int
    in_function: bool  # inside a def (imported lazily, when the function runs)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a ``from`` import refers to (relative ones resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _dynamic_target(node: ast.Call) -> str | None:
    """``importlib.import_module("x")`` / ``import_module("x")`` / ``__import__("x")`` with a constant."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    if name not in {"import_module", "__import__"} or not node.args:
        return None
    first = node.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def edges(source: str, module: str, is_package: bool) -> list[Edge]:
    found: list[Edge] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Edge(module, alias.name, node.lineno, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(Edge(module, resolve(module, is_package, node), node.lineno, in_function))
        elif isinstance(node, ast.Call) and (target := _dynamic_target(node)) is not None:
            found.append(Edge(module, target, node.lineno, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(source), in_function=False)
    return found


def offence(edge: Edge) -> str | None:
    """Why ``edge`` breaks the layering, or None when it is allowed."""
    source, target = edge.module.split(".")[0], edge.target.split(".")[0]
    if target not in PROJECT or target == source:
        return None
    where = f"{edge.module}:{edge.line} imports {edge.target}"
    if target in {"tests", "tools"}:
        return f"{where}: the runtime never imports {target}/"
    if source == "devstack":
        return None if target in DEVSTACK_MAY_IMPORT else f"{where}: devstack may import only infra"
    if target == "devstack":
        if source == "echolm" and edge.in_function:
            return None
        return f"{where}: devstack is development-only (echolm may import it only inside a dev command)"
    if RANK[target] > RANK[source]:
        return f"{where}: {target} is a layer above {source}"
    return None


def project_modules() -> list[tuple[str, Path]]:
    return [(module_name(p), p) for package in CHECKED for p in sorted((ROOT / package).rglob("*.py"))]


def test_the_walk_sees_every_package_and_their_imports() -> None:
    modules = dict(project_modules())
    assert {"infra.resources", "streams.app", "agents.serve", "echolm.app", "devstack.process"} <= set(
        modules
    )
    app = modules["echolm.app"]
    targets = {e.target for e in edges(app.read_text(encoding="utf-8"), "echolm.app", False)}
    assert {"agents", "infra.resources", "streams.app"} <= targets


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("streams.app", "from agents import register_agents", True),
        ("streams.app", "def f():\n    from agents import register_agents", True),
        ("infra.resources", "if TYPE_CHECKING:\n    from agents.state import DecisionState", True),
        ("echolm.cli", "import importlib\nimportlib.import_module('bench.cli')", True),
        ("echolm.cli", "from devstack.localstack import LocalStack", True),
        ("echolm.cli", "def up():\n    from devstack.localstack import LocalStack", False),
        ("infra.resources", "from devstack.process import ChildProcess", True),
        ("devstack.workers", "from echolm.worker import run_worker", True),
        ("devstack.workers", "from .process import ChildProcess", False),
        ("agents.serve", "from .policy.routing import choose", False),
        ("agents", "from .state import DecisionState", False),
        ("echolm.app", "from agents import register_agents", False),
    ],
)
def test_the_rule_itself(module: str, source: str, bad: bool) -> None:
    """The check can fail: known upward imports are caught, allowed ones pass (relative ones too)."""
    found = [offence(e) for e in edges(source, module, is_package="." not in module)]
    assert any(found) is bad, found


@pytest.mark.parametrize(("module", "path"), project_modules(), ids=lambda v: str(v))
def test_no_module_imports_from_a_layer_above(module: str, path: Path) -> None:
    is_package = path.name == "__init__.py"
    offences = [o for e in edges(path.read_text(encoding="utf-8"), module, is_package) if (o := offence(e))]
    assert not offences, "\n".join(offences)


def test_the_worker_and_the_cli_load_neither_devstack_nor_bench() -> None:
    """Dynamically too: importing the production entry points in a fresh interpreter loads no module
    of devstack, bench or tests (what ``echolm worker`` runs ships without them)."""
    code = (
        "import sys, echolm.app, echolm.cli, echolm.worker; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'devstack', 'bench', 'tests'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
