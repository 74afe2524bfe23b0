"""Every module of the five packages declares its public names in ``__all__``, and each of them exists.

Exempt: ``__main__`` modules (importing one runs the program) and package ``__init__`` files with no
code (a marker that defines nothing has nothing to export). Names are checked with ``hasattr`` after
a real import, so lazily exported names (``echolm.__getattr__``) count, and a name defined only under
``TYPE_CHECKING`` does not. Anchor: ``httpx:tests/test_exported_members.py``.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("streams", "agents", "infra", "echolm", "devstack")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _defines_nothing(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return not body


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.name == "__main__.py" or (path.name == "__init__.py" and _defines_nothing(path)):
                continue
            names.append(_module_name(path))
    return names


MODULES = _modules()


def test_the_packages_were_found() -> None:
    assert {"streams.app", "agents.serve", "infra.resources", "echolm.client"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_all_and_every_name_exists(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list | tuple), f"{name} defines no __all__ (a list of its public names)"
    assert all(isinstance(item, str) for item in exported), f"{name}.__all__ holds a non-string"
    duplicates = sorted({item for item in exported if list(exported).count(item) > 1})
    assert not duplicates, f"{name}.__all__ repeats {duplicates}"
    missing = [item for item in exported if not hasattr(module, item)]
    assert not missing, f"{name}.__all__ names what the module does not define: {missing}"
