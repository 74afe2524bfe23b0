"""The generation cache: every model output the evaluation used, keyed by what produced it.

``key = sha256(model file sha256, the full prompt messages, the generation parameters)``, so a
cached text is reused exactly when the same model would see the same chat with the same settings
(and never otherwise: a changed system prompt, example, template input or parameter is a new key).
Rows are JSON objects ``{key, model, text, prompt_tokens, completion_tokens, ttft_s, total_s, at}``
in gzip JSONL files under ``bench/results/quality/``. Each ``put`` appends one gzip member and
flushes, so a run killed at any moment loses at most the generation in flight; ``compact``
rewrites a file as one member (smaller, same rows). Reading tolerates a torn last member.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CachedGeneration", "GenerationCache", "generation_key"]


def generation_key(
    model_sha256: str, messages: Sequence[Mapping[str, str]], params: Mapping[str, Any]
) -> str:
    """sha256 of the canonical JSON of (model sha, [(role, content)...], params with sorted keys)."""
    blob = json.dumps(
        {
            "model": model_sha256,
            "messages": [[m["role"], m["content"]] for m in messages],
            "params": dict(sorted(params.items())),
        },
        ensure_ascii=False,
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedGeneration:
    key: str
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    at: float

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> CachedGeneration:
        return cls(
            key=str(row["key"]),
            model=str(row["model"]),
            text=str(row["text"]),
            prompt_tokens=int(row["prompt_tokens"]),
            completion_tokens=int(row["completion_tokens"]),
            ttft_s=float(row["ttft_s"]),
            total_s=float(row["total_s"]),
            at=float(row["at"]),
        )

    def row(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "model": self.model,
            "text": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": round(self.ttft_s, 4),
            "total_s": round(self.total_s, 4),
            "at": round(self.at, 1),
        }


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of one gzip JSONL file; stops quietly at a torn trailing member or line."""
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    return
                if isinstance(row, dict):
                    yield row
    except (EOFError, OSError, zlib.error):
        return


class GenerationCache:
    """All ``*.jsonl.gz`` files of a folder, read once; new rows go to ``write_to`` (one of them)."""

    def __init__(self, folder: Path, *, write_to: str = "generations.jsonl.gz") -> None:
        self.folder = folder
        self.path = folder / write_to
        self.rows: dict[str, CachedGeneration] = {}
        for path in sorted(folder.glob("*.jsonl.gz")):
            for row in _read_rows(path):
                try:
                    hit = CachedGeneration.from_row(row)
                except (KeyError, TypeError, ValueError):
                    continue
                self.rows.setdefault(hit.key, hit)

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, key: str) -> CachedGeneration | None:
        return self.rows.get(key)

    def put(self, hit: CachedGeneration) -> None:
        self.rows[hit.key] = hit
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps(hit.row(), ensure_ascii=False) + "\n"
        with self.path.open("ab") as raw:
            raw.write(gzip.compress(line.encode("utf-8"), mtime=0))
            raw.flush()

    def compact(self) -> int:
        """Rewrite ``write_to`` as one gzip member holding every row read from it (others untouched)."""
        if not self.path.is_file():
            return 0
        rows = list(_read_rows(self.path))
        tmp = self.path.with_suffix(".tmp")
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        tmp.write_bytes(gzip.compress(body, mtime=0))
        tmp.replace(self.path)
        return len(rows)
