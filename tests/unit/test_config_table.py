"""tools/config_table.py covers every Settings field, marks every secret, and its defaults round-trip.

The README is checked only once it carries the ``<!-- config-table:start/end -->`` markers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
from pydantic import BaseModel, SecretStr

from infra.settings import Settings
from tools import config_table
from tools.config_table import END_MARKER, REQUIRED, START_MARKER, UNSET, iter_rows, main, render_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)


def _contains_secret(annotation: Any) -> bool:
    return annotation is SecretStr or any(_contains_secret(arg) for arg in get_args(annotation))


def expected_variables(model: type[BaseModel] = Settings, prefix: str = "ECHOLM_") -> dict[str, bool]:
    """Variable -> is secret, walked independently of the generator (list items as ``VAR[].key``)."""
    found: dict[str, bool] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if prefix.endswith("[]."):
            found[f"{prefix}{name}"] = _contains_secret(annotation)
            continue
        variable = f"{prefix}{name.upper()}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.update(expected_variables(annotation, f"{variable}__"))
            continue
        found[variable] = _contains_secret(annotation)
        if get_origin(annotation) is list:
            for item in _models_in(annotation):
                found.update(expected_variables(item, f"{variable}[]."))
    return found


def table_rows(table: str) -> list[list[str]]:
    lines = table.strip().splitlines()
    return [[cell.strip() for cell in UNESCAPED_PIPE.split(line)[1:-1]] for line in lines[2:]]


def test_table_covers_every_field_and_nothing_else() -> None:
    table = render_table()
    variables = [row[0].strip("`") for row in table_rows(table)]
    assert len(variables) == len(set(variables)), "a variable appears twice"
    assert set(variables) == {"ECHOLM_CONFIG", *expected_variables()}


def test_table_is_well_formed_markdown() -> None:
    lines = render_table().strip().splitlines()
    assert lines[0] == "| Variable | Type | Default | Description |"
    assert all(len(UNESCAPED_PIPE.findall(line)) == 5 for line in lines), "a cell leaks an unescaped pipe"
    assert all("\n" not in line for line in lines)


def test_every_secret_is_marked_and_nothing_else() -> None:
    expected = expected_variables()
    assert any(expected.values()), "Settings has no SecretStr field at all?"
    for row in table_rows(render_table()):
        variable = row[0].strip("`")
        if variable == "ECHOLM_CONFIG":
            continue
        assert ("**Secret**" in row[3]) == expected[variable], variable


def test_descriptions_come_from_the_fields() -> None:
    rows = {row.field_path: row for row in iter_rows()}
    for path, row in rows.items():
        if "[]" in path:
            continue
        model: type[BaseModel] = Settings
        *sections, leaf = path.split(".")
        for section in sections:
            annotation = model.model_fields[section].annotation
            assert isinstance(annotation, type)
            assert issubclass(annotation, BaseModel)
            model = annotation
        assert row.description == (model.model_fields[leaf].description or "")


def test_rendered_defaults_load_back_to_the_same_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Setting every variable to its rendered default changes nothing: names and default text are right."""
    monkeypatch.chdir(tmp_path)  # no stray ./echolm.toml
    for name in list(os.environ):
        if name.startswith("ECHOLM_"):
            monkeypatch.delenv(name)
    baseline = Settings().model_dump(mode="json")
    for row in iter_rows():
        if "[]" not in row.variable and row.default not in (UNSET, REQUIRED):
            monkeypatch.setenv(row.variable, row.default)
    assert Settings().model_dump(mode="json") == baseline


def test_check_and_write_modes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nIntro.\n\n{START_MARKER}\n| old | table |\n{END_MARKER}\n\nAfter.\n")
    assert main(["--check", str(readme)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--write", str(readme)]) == 0
    assert main(["--check", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nIntro.\n\n")
    assert text.endswith(f"{END_MARKER}\n\nAfter.\n")
    assert render_table() in text

    unmarked = tmp_path / "plain.md"
    unmarked.write_text("# No markers here\n")
    assert main(["--check", str(unmarked)]) == 2
    assert main(["--check", str(tmp_path / "missing.md")]) == 2


def test_print_mode_writes_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == render_table()


def test_readme_table_is_current_once_the_readme_has_markers() -> None:
    # The README is written separately; until it carries the markers there is nothing to compare.
    if not README.is_file() or START_MARKER not in README.read_text(encoding="utf-8"):
        return
    assert config_table.main(["--check", str(README)]) == 0, (
        "README.md's configuration table is stale: python -m tools.config_table --write README.md"
    )
