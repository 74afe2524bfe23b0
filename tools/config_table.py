"""The README's configuration table, generated from :class:`infra.settings.Settings`.

One row per setting: the environment variable, its type (with bounds), its default as you would write
it in the environment, and the field's description; secrets (``SecretStr``) are marked. List-of-model
settings (``ECHOLM_TGI__BACKENDS``, a JSON list) also get one row per key of their objects.

::

    python -m tools.config_table                      # print the table
    python -m tools.config_table --write README.md    # replace the table between the markers
    python -m tools.config_table --check README.md    # exit 1 when README's table is stale

The markers are ``<!-- config-table:start -->`` and ``<!-- config-table:end -->``, each on its own line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel, SecretStr, TypeAdapter
from pydantic.fields import FieldInfo

from infra.settings import Settings

__all__ = [
    "END_MARKER",
    "START_MARKER",
    "Row",
    "iter_rows",
    "main",
    "render_table",
    "replace_table",
]

START_MARKER = "<!-- config-table:start -->"
END_MARKER = "<!-- config-table:end -->"
ENV_PREFIX = "ECHOLM_"
NESTED_DELIMITER = "__"
HEADER = ("Variable", "Type", "Default", "Description")
UNSET = "unset"
REQUIRED = "required"
SENSITIVE_NOTE = "**Secret** (`SecretStr`: never logged or printed)."


@dataclass(frozen=True)
class Row:
    """One line of the table; ``field_path`` is the dotted path in Settings (``kafka.sasl_password``)."""

    variable: str
    field_path: str
    type: str
    default: str
    secret: bool
    description: str


# --- walking the model -----------------------------------------------------------------------------


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    """The section model a field holds directly (``kafka: KafkaSettings``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _list_item_model(annotation: Any) -> type[BaseModel] | None:
    """The item model of a ``list[SomeModel]`` field (``tgi.backends``), else None."""
    if get_origin(annotation) is list:
        (item,) = get_args(annotation)
        return _nested_model(item)
    return None


def _is_json(annotation: Any) -> bool:
    """pydantic-settings reads lists (and other complex values) from the environment as JSON."""
    if get_origin(annotation) in (list, dict):
        return True
    return any(_is_json(arg) for arg in get_args(annotation))


def _is_secret(annotation: Any) -> bool:
    if annotation is SecretStr:
        return True
    return any(_is_secret(arg) for arg in get_args(annotation))


def iter_rows(
    model: type[BaseModel] = Settings, prefix: str = ENV_PREFIX, path: str = "", *, in_json: bool = False
) -> Iterator[Row]:
    """Rows for every leaf field of ``model``, sections flattened with ``__`` as the env source does."""
    for name, field in model.model_fields.items():
        field_path = f"{path}{name}"
        variable = f"{prefix}{name}" if in_json else f"{prefix}{name.upper()}"
        section = _nested_model(field.annotation)
        if section is not None and not in_json:
            yield from iter_rows(section, f"{variable}{NESTED_DELIMITER}", f"{field_path}.")
            continue
        yield Row(
            variable=variable,
            field_path=field_path,
            type=_describe_type(field),
            default=_describe_default(field),
            secret=_is_secret(field.annotation),
            description=field.description or "",
        )
        item = _list_item_model(field.annotation)
        if item is not None:
            yield from iter_rows(item, f"{variable}[].", f"{field_path}[].", in_json=True)


# --- rendering values ------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "None"
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _describe_type(field: FieldInfo) -> str:
    bounds: list[str] = []
    for constraint in field.metadata:
        if isinstance(constraint, annotated_types.Ge):
            bounds.append(f">= {constraint.ge}")
        elif isinstance(constraint, annotated_types.Gt):
            bounds.append(f"> {constraint.gt}")
        elif isinstance(constraint, annotated_types.Le):
            bounds.append(f"<= {constraint.le}")
        elif isinstance(constraint, annotated_types.Lt):
            bounds.append(f"< {constraint.lt}")
        elif isinstance(constraint, annotated_types.MinLen):
            bounds.append(f"at least {constraint.min_length} item(s)")
    name = _type_name(field.annotation)
    if _is_json(field.annotation):
        name += " (JSON)"
    return f"{name}, {', '.join(bounds)}" if bounds else name


def _env_text(value: Any, annotation: Any) -> str:
    """A default as it would be written in the environment."""
    if value is None:
        return UNSET
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, Path)):
        return str(value) if str(value) else '""'
    if isinstance(value, (int, float)):
        return repr(value)
    dumped = TypeAdapter(annotation).dump_python(value, mode="json")
    return json.dumps(dumped, separators=(",", ":"))


def _describe_default(field: FieldInfo) -> str:
    if field.is_required():
        return REQUIRED
    return _env_text(field.get_default(call_default_factory=True), field.annotation)


def _cell(text: str) -> str:
    """Table-cell safe: no newlines, escaped pipes, and no <tags> for the renderer to swallow."""
    return text.replace("\n", " ").replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _default_cell(text: str) -> str:
    return text if text in (UNSET, REQUIRED) else _code(text)


def _code(text: str) -> str:
    """A code span: inside one only the pipe needs escaping (entities would show literally)."""
    body = text.replace("\n", " ").replace("|", "\\|")
    return f"`` {body} ``" if "`" in body else f"`{body}`"


def render_table(rows: Sequence[Row] | None = None) -> str:
    """The markdown table (no markers), ending with a newline."""
    rows = list(iter_rows()) if rows is None else rows
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
        "| `ECHOLM_CONFIG` | path | `./echolm.toml` when it exists | "
        "A TOML file with the same sections (`[kafka]`, `[tgi]`, ...); the environment overrides it. |",
    ]
    for row in rows:
        description = f"{SENSITIVE_NOTE} {row.description}".strip() if row.secret else row.description
        cells = (_code(row.variable), _cell(row.type), _default_cell(row.default), _cell(description))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- README markers --------------------------------------------------------------------------------


def _split(document: str) -> tuple[str, str, str]:
    """(before and including the start marker, the table, the end marker and after); ValueError if none."""
    start = document.find(START_MARKER)
    end = document.find(END_MARKER)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"expected {START_MARKER!r} followed by {END_MARKER!r}")
    head_end = start + len(START_MARKER)
    return document[:head_end], document[head_end:end], document[end:]


def replace_table(document: str, table: str) -> str:
    head, _, tail = _split(document)
    return f"{head}\n{table}{tail}"


def _check(path: Path, table: str) -> int:
    try:
        _, current, _ = _split(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{path}: {exc}\n")
        return 2
    if current.strip() == table.strip():
        return 0
    diff = difflib.unified_diff(
        current.strip().splitlines(keepends=False),
        table.strip().splitlines(keepends=False),
        f"{path} (current)",
        "generated from infra.settings.Settings",
        lineterm="",
    )
    sys.stderr.write("\n".join(diff) + "\n")
    sys.stderr.write(
        f"{path}: the configuration table is stale; run `python -m tools.config_table --write {path}`\n"
    )
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.config_table", description=__doc__.split("\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", type=Path, metavar="README", help="exit 1 when the file's table differs")
    mode.add_argument("--write", type=Path, metavar="README", help="replace the table between the markers")
    args = parser.parse_args(argv)
    table = render_table()
    if args.check is not None:
        return _check(args.check, table)
    if args.write is not None:
        try:
            document = args.write.read_text(encoding="utf-8")
            args.write.write_text(replace_table(document, table), encoding="utf-8")
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"{args.write}: {exc}\n")
            return 2
        return 0
    sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
