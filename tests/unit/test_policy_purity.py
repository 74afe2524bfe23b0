"""``agents/policy`` stays pure: no I/O libraries, no clocks, no files, no global randomness.

Checked statically (the imports and calls in each module's AST) and dynamically (importing every
policy module in a fresh interpreter must not load an I/O stack).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "agents" / "policy"
MODULES = sorted(p for p in POLICY.glob("*.py"))

# What the brief forbids by name, plus the rest of the I/O stack and the clocks.
BANNED = {
    "faust", "httpx", "pymilvus", "torch", "sentence_transformers",  # the brief's list
    "aiokafka", "mode", "requests", "urllib", "socket", "asyncio", "subprocess", "os", "pathlib", "io",
    "shutil", "tempfile", "sqlite3", "pickle", "logging", "time", "datetime", "random", "threading",
    "multiprocessing", "sklearn", "transformers", "orjson", "json", "prometheus_client",
}  # fmt: skip
# Everything a policy module may import; a new need is a conscious change to this list.
ALLOWED = {
    "__future__", "collections", "dataclasses", "enum", "functools", "hashlib", "heapq", "bisect",
    "itertools", "math", "re", "string", "typing", "unicodedata", "numpy",
    "infra.protocols", "infra.settings", "infra.errors", "agents.policy",
}  # fmt: skip
BANNED_CALLS = {"open", "print", "input", "eval", "exec", "compile", "__import__", "breakpoint"}
# numpy functions that do I/O or use the global random state (``np.random.default_rng(seed)`` is fine)
BANNED_NUMPY = {
    "load", "save", "savez", "savez_compressed", "loadtxt", "savetxt", "genfromtxt", "fromfile", "tofile",
    "memmap", "seed", "rand", "randn", "randint", "random_sample", "shuffle", "permutation", "choice",
    "normal", "uniform", "standard_normal",
}  # fmt: skip
# Third-party stacks that must not even be loaded indirectly (the stdlib ones come with pydantic).
HEAVY = {
    "faust", "httpx", "pymilvus", "torch", "sentence_transformers", "aiokafka", "mode", "requests",
    "sklearn", "transformers", "prometheus_client", "grpc",
}  # fmt: skip


def attribute_chain(node: ast.Attribute) -> list[str]:
    parts = [node.attr]
    value: ast.expr = node.value
    while isinstance(value, ast.Attribute):
        parts.append(value.attr)
        value = value.value
    if isinstance(value, ast.Name):
        parts.append(value.id)
    return parts[::-1]


def imported_modules(tree: ast.AST) -> list[str]:
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside agents.policy
                names.append("agents.policy")
            elif node.module:
                names.append(node.module)
    return names


def is_allowed(module: str) -> bool:
    return any(module == a or module.startswith(a + ".") for a in ALLOWED)


def import_offences(source: str) -> list[str]:
    modules = imported_modules(ast.parse(source))
    banned = [f"banned import {m}" for m in modules if m.split(".")[0] in BANNED]
    unknown = [f"import {m} outside the allowed list" for m in modules if not is_allowed(m)]
    return banned + [u for u in unknown if u.split()[1] not in {b.split()[2] for b in banned}]


def call_offences(source: str) -> list[str]:
    offences: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_CALLS:
            offences.append(f"line {node.lineno}: {node.func.id}()")
        if isinstance(node, ast.Attribute):
            chain = attribute_chain(node)
            if chain[0] in {"np", "numpy"} and chain[-1] in BANNED_NUMPY:
                offences.append(f"line {node.lineno}: {'.'.join(chain)}")
        if isinstance(node, ast.Global):
            offences.append(f"line {node.lineno}: global {', '.join(node.names)}")
    return offences


def test_every_policy_module_is_checked() -> None:
    names = {p.stem for p in MODULES}
    assert {"retrieval", "prompt", "routing", "replay", "admission", "scoring"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_are_pure(path: Path) -> None:
    offences = import_offences(path.read_text())
    assert not offences, f"{path.name}: {offences}; agents/policy must do no I/O and read no clock"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_io_calls_or_clock_reads(path: Path) -> None:
    offences = call_offences(path.read_text())
    assert not offences, f"{path.name}: {offences}"


@pytest.mark.parametrize(
    ("source", "caught"),
    [
        ("import faust", True),
        ("from httpx import AsyncClient", True),
        ("import pymilvus.client", True),
        ("import torch", True),
        ("from sentence_transformers import SentenceTransformer", True),
        ("import time", True),
        ("from datetime import datetime", True),
        ("import os.path", True),
        ("import yaml", True),  # not on the allowed list
        ("x = open('f')", True),
        ("import numpy as np\nnp.save('f', 1)", True),
        ("import numpy as np\nnp.random.seed(0)", True),
        ("import numpy as np\nx = np.random.rand(3)", True),
        ("def f():\n    global STATE", True),
        ("import numpy as np\nrng = np.random.default_rng(0)\nrng.normal()", False),
        ("from . import retrieval\nimport math, re\nfrom infra.protocols import Example", False),
        ("candidate.load", False),  # only numpy's load is I/O
    ],
)
def test_the_checker_catches_what_it_should(source: str, caught: bool) -> None:
    assert bool(import_offences(source) + call_offences(source)) is caught


def test_importing_policy_loads_no_io_stack() -> None:
    modules = ", ".join(f"agents.policy.{p.stem}" for p in MODULES if p.stem != "__init__")
    code = (
        f"import sys, {modules}\n"
        f"loaded = [m for m in {sorted(HEAVY)!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"importing agents.policy loaded {out.stdout.strip()}"
